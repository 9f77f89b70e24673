"""Worker pools: where trials run. The loop submits tasks while a worker is idle and waits for results.

    pool.submit(Task(candidate, recipe, split))          # only while pool.idle > 0 (threshold: racing, see loop)
    results = pool.wait()                                  # >= 1 TrialResult, in completion order

`LocalPool` runs trials in this process on one TrialRunner, one at a time. `RayPool` runs one TrialRunner per Ray actor
(one per GPU, or per CPU slot); an actor that dies is replaced and its trial retried, at most `retries` times, then the
trial is recorded failed. Ray is imported only here, and only when a RayPool is made.
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe
from evomerge.run.worker import TrialResult, TrialRunner


@dataclass(frozen=True)
class Task:
    candidate: int
    recipe: Recipe  # a value: it pickles for Ray
    split: str
    threshold: float | None = None  # racing: stop scoring once the candidate cannot reach it (None: score in full)


@dataclass(frozen=True)
class RunnerSpec:
    """What each worker loads: the source models, the base of its live merged model, and an evaluator factory."""
    models: tuple[str, ...]
    base: str
    make_evaluator: Callable[[], Any]
    device: str = "cpu"
    dtype: str | None = None
    compile: bool = False  # workers.compile
    preflight_split: str | None = None  # score the base on one document per task of this split first (None: don't)

    def build(self, name: str) -> TrialRunner:
        runner = TrialRunner(list(self.models), self.base, self.make_evaluator, device=self.device, dtype=self.dtype,
                             name=name, compile=self.compile)
        if self.preflight_split:
            runner.preflight(self.preflight_split)
        return runner


class Pool(ABC):
    size: int

    @property
    @abstractmethod
    def idle(self) -> int: ...

    @abstractmethod
    def submit(self, task: Task) -> None: ...

    @abstractmethod
    def wait(self) -> list[TrialResult]:
        """Block until at least one submitted task is done; call only with tasks in flight."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalPool(Pool):
    """In process. `slots` tasks may be submitted at once (as many as the experiment's workers); they run on `wait`, the
    oldest first. A subclass may pick another order, to test that results arriving out of order change nothing."""

    def __init__(self, spec: RunnerSpec, slots: int = 1):
        self.size = slots
        self.runner = spec.build("local")
        self.tasks: deque[Task] = deque()

    @property
    def idle(self) -> int:
        return self.size - len(self.tasks)

    def submit(self, task: Task) -> None:
        self.tasks.append(task)

    def next_task(self) -> Task:
        return self.tasks.popleft()

    def wait(self) -> list[TrialResult]:
        task = self.next_task()
        return [self.runner.run(task.candidate, task.recipe, task.split, task.threshold)]


class RayPool(Pool):
    def __init__(self, spec: RunnerSpec, num: int, *, ray_address: str | None = None, retries: int = 2, cpus: int = 1):
        import ray

        self.ray, self.spec, self.size, self.retries, self.cpus = ray, spec, num, retries, cpus
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # A local cluster's workers import what this process can (e.g. an evaluator defined next to the caller).
            env = None if ray_address else {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
            try:
                ray.init(address=ray_address, num_cpus=None if ray_address else num * cpus, include_dashboard=False,
                         log_to_driver=False, runtime_env=env)
            except ConnectionError as err:  # Ray joins an address given explicitly without its token unless told to
                raise EvomergeError(f"cannot join the Ray cluster at {ray_address} ({err}); is it running (`ray status`)? "
                                    "If it uses token authentication, set RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN, if "
                                    "the token is not in ~/.ray/auth_token)", key="workers.ray_address") from None
        gpu = spec.device.startswith("cuda")
        if gpu and ray.cluster_resources().get("GPU", 0) < 1:  # an actor asking for a GPU would wait for one forever
            self.close()
            raise EvomergeError(f"{spec.device} asked for, but the Ray cluster has no GPU", key="workers.device")
        self._actor_class = ray.remote(_RayRunner).options(num_cpus=cpus, num_gpus=1 if gpu else 0)
        self.actors = [self._start(i) for i in range(num)]
        try:  # a worker that cannot load its models or pass its preflight fails the search now, not every trial later
            errors = [e for e in ray.get([a.ready.remote() for a in self.actors]) if e]
        except ray.exceptions.RayError as err:
            errors = [f"a Ray worker failed to start: {str(err).strip().splitlines()[-1]}"]
        if errors:
            self.close()
            raise EvomergeError(errors[0])
        self.free = deque(range(num))
        self.in_flight: dict[Any, tuple[int, Task, int]] = {}  # object ref -> (actor index, task, attempt)
        self.replaced = 0

    def _start(self, index: int):
        spec = self.spec
        if spec.device.startswith("cuda"):  # Ray shows the actor its own GPU as cuda:0
            spec = replace(spec, device="cuda")
        return self._actor_class.remote(spec, f"ray-{index}", self.cpus)

    @property
    def idle(self) -> int:
        return len(self.free)

    def submit(self, task: Task, attempt: int = 0, index: int | None = None) -> None:
        index = self.free.popleft() if index is None else index
        ref = self.actors[index].run.remote(task.candidate, task.recipe, task.split, task.threshold)
        self.in_flight[ref] = (index, task, attempt)

    def wait(self) -> list[TrialResult]:
        results = []
        while not results and self.in_flight:
            done, _ = self.ray.wait(list(self.in_flight), num_returns=1)
            for ref in done:
                index, task, attempt = self.in_flight.pop(ref)
                try:
                    results.append(self.ray.get(ref))
                except self.ray.exceptions.RayActorError as err:
                    self.ray.kill(self.actors[index], no_restart=True)
                    self.actors[index] = self._start(index)
                    self.replaced += 1
                    if attempt < self.retries:
                        self.submit(task, attempt + 1, index)
                        continue
                    results.append(TrialResult(task.candidate, task.split, "failed", None, worker=f"ray-{index}",
                                               error=f"worker died {attempt + 1} times: {type(err).__name__}"))
                self.free.append(index)
        return results

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor, no_restart=True)
        self.actors = []
        if self._owns_ray:
            self.ray.shutdown()


class _RayRunner:
    """The actor: a TrialRunner built inside the worker process."""

    def __init__(self, spec: RunnerSpec, name: str, cpus: int = 1):
        import torch

        torch.set_num_threads(cpus)  # its reserved cores: more threads than cores would make OpenMP threads wait
        self.runner, self.error = None, None
        try:
            self.runner = spec.build(name)
        except EvomergeError as err:  # e.g. the preflight: reported by ready() as the line that stops the search
            self.error = str(err)

    def ready(self) -> str | None:
        """None when the worker can take trials, else the one-line reason it cannot."""
        return self.error

    def run(self, candidate: int, recipe: Recipe, split: str, threshold: float | None = None) -> TrialResult:
        return self.runner.run(candidate, recipe, split, threshold)


def make_pool(spec: RunnerSpec, workers) -> Pool:
    """The pool a WorkersConfig asks for."""
    if workers.backend == "ray":
        return RayPool(spec, workers.num, ray_address=workers.ray_address, cpus=workers.cpus)
    return LocalPool(spec, workers.num)
