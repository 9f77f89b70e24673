"""Worker pools: where trials run. The loop submits tasks while a worker is idle and waits for results.

    pool.submit(Task(candidate, recipe, split))          # only while pool.idle > 0 (threshold: racing, see loop)
    results = pool.wait()                                  # >= 1 TrialResult, in completion order

`LocalPool` runs trials in this process on one TrialRunner, one at a time. `RayPool` runs one TrialRunner per Ray actor
(one per GPU, or per CPU slot); an actor that dies (its process, or its whole node) is replaced and its trial retried
on the first worker free, at most `retries` times, then the trial is recorded failed. A replacement joins once Ray
places it (it may never: its node is gone and the others are full); the run goes on with the workers left, and stops
(resumable) only when none is left and none could be placed and loaded within `placement_timeout_s` (the same bound
holds for the first workers). Ray is imported only here, and only when a RayPool is made.
"""

from __future__ import annotations

import os
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe
from evomerge.run.memory import MODES, MemoryPlan, choose_sources, measured_capacity
from evomerge.run.worker import TrialResult, TrialRunner


@dataclass(frozen=True)
class Task:
    candidate: int
    recipe: Recipe  # a value: it pickles for Ray
    split: str
    threshold: float | None = None  # racing: stop scoring once the candidate cannot reach it (None: score in full)


@dataclass(frozen=True)
class RunnerSpec:
    """What each worker loads: the source models, the base of its live merged model, and an evaluator factory; where
    the sources live (`sources`: device, host, disk, or auto with a `memory` plan: run.memory.choose_sources, on the
    worker's own device when `device_memory` is None) and which models a layer path may run (device: every model)."""
    models: tuple[str, ...]
    base: str
    make_evaluator: Callable[[], Any]
    device: str = "cpu"
    dtype: str | None = None
    compile: bool = False  # workers.compile
    preflight_split: str | None = None  # score the base on one document per task of this split first (None: don't)
    sources: str = "device"
    path_models: tuple[str, ...] = ()
    memory: MemoryPlan | None = None
    device_memory: int | None = None

    def build(self, name: str) -> TrialRunner:
        sources = self.sources
        if self.memory is not None:
            capacity = self.device_memory or measured_capacity(self.device)
            sources = choose_sources(self.sources, self.memory, capacity, source=name)
        elif sources not in MODES:
            raise ValueError(f"sources {sources!r} needs a memory plan (one of {', '.join(MODES)} does not)")
        runner = TrialRunner(list(self.models), self.base, self.make_evaluator, device=self.device, dtype=self.dtype,
                             sources=sources, path_models=list(self.path_models), name=name, compile=self.compile)
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
    oldest first. A subclass may pick another order, to test that results arriving out of order change nothing.
    While it is open torch runs `cpus` threads (workers.cpus, as in a Ray worker); close() restores the process's."""

    def __init__(self, spec: RunnerSpec, slots: int = 1, cpus: int | None = None):
        import torch

        self.size = slots
        self.runner = spec.build("local")
        self.tasks: deque[Task] = deque()
        self.threads_before = torch.get_num_threads()
        if cpus is not None:  # racing's small batches ran ~1.5x slower on 2 threads than on 1 (2 cores, the toy)
            torch.set_num_threads(cpus)

    def close(self) -> None:
        import torch

        torch.set_num_threads(self.threads_before)

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
    def __init__(self, spec: RunnerSpec, num: int, *, ray_address: str | None = None, retries: int = 2, cpus: int = 1,
                 placement_timeout_s: float = 1800.0):
        import ray

        self.ray, self.spec, self.size, self.retries, self.cpus = ray, spec, num, retries, cpus
        self.placement_timeout_s = placement_timeout_s
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
            errors = [e for e in ray.get([a.ready.remote() for a in self.actors], timeout=placement_timeout_s) if e]
        except ray.exceptions.GetTimeoutError:  # e.g. more workers than the cluster has room for: never placed
            room = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            each = f"{cpus} CPU(s){' and 1 GPU' if gpu else ''}"
            errors = [f"{num} worker(s) of {each} each were not all placed and loaded within {placement_timeout_s:g} s; "
                      f"the cluster has {room} (`ray status`)"]
        except ray.exceptions.RayError as err:
            errors = [f"a Ray worker failed to start: {str(err).strip().splitlines()[-1]}"]
        if errors:
            self.close()
            raise EvomergeError(errors[0])
        self.free = deque(range(num))
        self.in_flight: dict[Any, tuple[int, Task, int]] = {}  # object ref -> (actor index, task, attempt)
        self.retry: deque[tuple[Task, int]] = deque()  # tasks whose worker died: (task, attempts so far), run first
        self.starting: dict[Any, int] = {}  # ready() ref of a replacement not placed or loaded yet -> actor index
        self.replaced = 0

    def _start(self, index: int):
        spec = self.spec
        if spec.device.startswith("cuda"):  # Ray shows the actor its own GPU as cuda:0
            spec = replace(spec, device="cuda")
        return self._actor_class.remote(spec, f"ray-{index}", self.cpus)

    @property
    def idle(self) -> int:
        return max(0, len(self.free) - len(self.retry))  # free workers take the retried tasks first

    def submit(self, task: Task, attempt: int = 0) -> None:
        index = self.free.popleft()
        ref = self.actors[index].run.remote(task.candidate, task.recipe, task.split, task.threshold)
        self.in_flight[ref] = (index, task, attempt)

    def wait(self) -> list[TrialResult]:
        results: list[TrialResult] = []
        idle_since = None  # since when no worker has run a trial: only replacements left to wait for
        while not results and (self.in_flight or self.retry):
            while self.retry and self.free:
                self.submit(*self.retry.popleft())
            if not self.in_flight and not self.starting:
                raise EvomergeError(f"no Ray worker left to run candidate {self.retry[0][0].candidate}: every worker "
                                    "died and none could be started again; `evomerge resume RUN_DIR` once the cluster "
                                    "has room", key="workers")
            idle_since = None if self.in_flight else idle_since or time.monotonic()
            timeout = None if idle_since is None else max(0.0, idle_since + self.placement_timeout_s - time.monotonic())
            done, _ = self.ray.wait([*self.in_flight, *self.starting], num_returns=1, timeout=timeout)
            if not done:  # only replacements left, and none placed in time: the cluster lost the room for them
                raise EvomergeError(f"no Ray worker left: {len(self.starting)} replacement(s) for workers that died "
                                    f"could not be placed within {self.placement_timeout_s:g} s (`ray status` shows "
                                    "the cluster's room); `evomerge resume RUN_DIR` once it has room", key="workers")
            for ref in done:
                if ref in self.starting:
                    self._joined(ref)
                else:
                    results.extend(self._finished(ref))
        return results

    def _finished(self, ref) -> list[TrialResult]:
        """The result of a trial; [] when its worker died and the trial waits for another worker."""
        index, task, attempt = self.in_flight.pop(ref)
        try:
            result = self.ray.get(ref)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ObjectLostError) as err:  # the process or node
            self._replace(index)
            if attempt < self.retries:
                self.retry.append((task, attempt + 1))
                return []
            return [TrialResult(task.candidate, task.split, "failed", None, worker=f"ray-{index}",
                                error=f"worker died {attempt + 1} times: {type(err).__name__}")]
        self.free.append(index)
        return [result]

    def _replace(self, index: int) -> None:
        """A new actor in a dead one's place; it takes trials once Ray has placed it and it has loaded its models."""
        self.ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._start(index)
        self.starting[self.actors[index].ready.remote()] = index
        self.replaced += 1

    def _joined(self, ref) -> None:
        index = self.starting.pop(ref)
        try:
            error = self.ray.get(ref)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ObjectLostError) as err:
            error = f"{type(err).__name__}"
        if error:  # e.g. placed on a node without the models: its slot stays empty, the run goes on without it
            print(f"warning: ray-{index} could not be started again ({error}); going on with the other workers",
                  file=sys.stderr)
            self.ray.kill(self.actors[index], no_restart=True)
            return
        self.free.append(index)

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
    return LocalPool(spec, workers.num, cpus=workers.cpus)
