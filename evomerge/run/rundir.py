"""The run directory, the search's only source of truth:

    runs/<name>/
      config.yaml      the resolved experiment, frozen when the run starts
      ledger.sqlite    append-only trials (evomerge.run.ledger)
      optimizer.pkl    the optimizer after the last tell and the asks that follow it (atomic)
      best/            recipe.yaml (evomerge) and scores.json of the winner
      logs/
      lock             held (fcntl.flock) by the one process searching here; the OS drops it if that process dies

Policy for a config that differs from the frozen one: refused, naming the differing keys; only where the run runs
(config.RUNTIME_KEYS) may change on resume, and the budget, which is then frozen anew: more trials continue the
search, fewer (not below the candidates the ledger holds) end it sooner. Either way the run equals one started with
that budget, since the optimizers do not read it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import yaml

from evomerge.errors import EvomergeError
from evomerge.recipe import write_text_atomic
from evomerge.run.config import RUNTIME_KEYS, Experiment, differences, experiment_from_dict
from evomerge.run.ledger import Ledger


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.ledger = self.path / "ledger.sqlite"
        self.optimizer = self.path / "optimizer.pkl"
        self.best = self.path / "best"
        self.logs = self.path / "logs"
        self._lock_file = None

    def __enter__(self) -> "RunDir":
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    def lock(self) -> None:
        """Take the run dir for this process, or refuse: two searches writing one ledger would interleave their trials."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / "lock", "a+")
        except OSError as err:
            raise EvomergeError(f"cannot write in the run dir ({err.strerror}); a search writes its ledger and "
                                "checkpoints there: make it writable, or copy it (with ledger.sqlite-wal) to a "
                                "writable place and resume that copy", source=str(self.path)) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise EvomergeError("run dir in use by another search (wait for it, or stop it first)",
                                source=str(self.path)) from None
        handle.seek(0), handle.truncate(), handle.write(f"{os.getpid()}\n"), handle.flush()
        self._lock_file = handle

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    @property
    def started(self) -> bool:
        return self.config.exists()

    def frozen(self) -> Experiment:
        if not self.started:
            raise EvomergeError("not a run directory (no config.yaml)", source=str(self.path))
        try:
            doc = yaml.safe_load(self.config.read_text())
        except yaml.YAMLError as err:
            raise EvomergeError(f"invalid YAML: {str(err).splitlines()[0]}", source=str(self.config)) from None
        return experiment_from_dict(doc, source=str(self.config))

    def freeze(self, experiment: Experiment) -> Experiment:
        """Write the config of a new run; for a started run, check `experiment` against the frozen one and return the
        frozen one with the runtime keys of `experiment`."""
        if not self.started:
            for folder in (self.best, self.logs):
                folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.config, experiment.to_yaml())
            return experiment
        frozen = self.frozen()
        changed = differences(frozen, experiment, ignore=RUNTIME_KEYS + ("budget.trials", "budget.hours"))
        if changed:
            raise EvomergeError(f"this run dir belongs to a different config ({'; '.join(changed)}); use another run dir, "
                                "or resume with the frozen config", source=str(self.config))
        if experiment.budget != frozen.budget:
            frozen = self.set_budget(experiment.budget.trials, experiment.budget.hours)
        return frozen.model_copy(update={"workers": frozen.workers.model_copy(update={
            key.split(".")[1]: getattr(experiment.workers, key.split(".")[1]) for key in RUNTIME_KEYS})})

    def open_ledger(self) -> Ledger:
        """The run's ledger, made on a run's first start; where optimizer.pkl exists it has seen trials that only the
        ledger holds, so a missing ledger.sqlite is refused, not made empty."""
        if self.optimizer.exists() and not self.ledger.exists():
            raise EvomergeError("no ledger.sqlite, though optimizer.pkl has seen trials: restore ledger.sqlite (with "
                                "ledger.sqlite-wal) from the original run dir, or start a new run dir",
                                source=str(self.path))
        return Ledger(self.ledger)

    def set_budget(self, trials: int, hours: float | None) -> Experiment:
        """Freeze a new budget into config.yaml and return the frozen config; trials below the candidates in the
        ledger are refused (every scored trial stays in the run)."""
        frozen = self.frozen()
        ledger = self.open_ledger()
        try:
            held = max((t.candidate + 1 for t in ledger.trials(frozen.evaluation.split)), default=0)
        finally:
            ledger.close()
        if trials < held:
            raise EvomergeError(f"budget.trials: {trials} is below the {held} candidates the ledger already holds; "
                                f"a budget of {held} or more keeps every scored trial", source=str(self.config))
        frozen = frozen.model_copy(update={"budget": frozen.budget.model_copy(update={"trials": trials, "hours": hours})})
        write_text_atomic(self.config, frozen.to_yaml())
        return frozen
