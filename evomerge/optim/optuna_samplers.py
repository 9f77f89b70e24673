"""Optuna samplers (TPE, CMA-ES, NSGA-II) through study.ask/tell, one candidate per ask.

The trials live in the study's storage: by default an SQLite file `optuna.sqlite3` in the run directory, or any SQLAlchemy
URL (e.g. PostgreSQL, for a study shared between machines); in memory when there is neither. This object holds the rest:
the seeded sampler (its RNG state) and which trial each pending candidate is. Pickling it drops the connection; the
unpickled optimizer reconnects to the same storage on first use, and marks FAIL any trial still RUNNING there that it
does not know (asked after its last checkpoint), so samplers ignore it. A tell repeated after a crash is skipped.
Searches that start at once on a fresh database race to create optuna's tables there; the one whose CREATE fails
connects again, to the tables the other made.
Gene i is the float parameter `x{i}` over [lower_i, upper_i].
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from pydantic import Field

from evomerge.errors import EvomergeError
from evomerge.optim.base import Candidate, Optimizer

optuna.logging.set_verbosity(optuna.logging.WARNING)  # no log line per trial


class OptunaOptimizer(Optimizer):
    def __init__(self, lower, upper, *, storage: str | None = None, study_name: str = "evomerge", **common):
        super().__init__(lower, upper, **common)
        self.storage = storage or (f"sqlite:///{Path(self.run_dir).resolve() / 'optuna.sqlite3'}" if self.run_dir else None)
        self._memory = None if self.storage else optuna.storages.InMemoryStorage()
        self.study_name = study_name
        self.distributions = {f"x{i}": FloatDistribution(lo, hi) for i, (lo, hi) in enumerate(zip(self.lower, self.upper))}
        self._trial_of: dict[int, int] = {}  # pending candidate id -> trial number
        self._study: optuna.Study | None = None

    def _start(self, sampler: optuna.samplers.BaseSampler) -> None:
        self.sampler = sampler
        try:
            self._study = optuna.create_study(storage=self._storage(), study_name=self.study_name,
                                              sampler=sampler, directions=["maximize"] * self.n_objectives)
        except optuna.exceptions.DuplicatedStudyError:
            raise EvomergeError(f"study {self.study_name!r} already exists in {self.storage}; resume from the optimizer "
                                "checkpoint, or choose another study_name", key="optimizer.study_name") from None

    @property
    def study(self) -> optuna.Study:
        if self._study is None:  # unpickled: reconnect, and fail the trials asked after the checkpoint
            self._study = optuna.load_study(study_name=self.study_name, storage=self._storage(), sampler=self.sampler)
            known = set(self._trial_of.values())
            for trial in self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if trial.number not in known:
                    self._study.tell(trial.number, state=TrialState.FAIL)
        return self._study

    def _storage(self, attempts: int = 5) -> optuna.storages.BaseStorage:
        if not self.storage:
            return self._memory
        from sqlalchemy.exc import IntegrityError, NoSuchModuleError, OperationalError, ProgrammingError

        for attempt in range(attempts):
            try:
                return optuna.storages.RDBStorage(self.storage)
            except (IntegrityError, ProgrammingError):  # another search created the same table first (see above)
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
            except (ImportError, NoSuchModuleError) as err:
                raise EvomergeError(f"no database driver for {self.storage} ({str(err).splitlines()[0]}); for "
                                    "PostgreSQL: pip install 'psycopg[binary]' and postgresql+psycopg://...",
                                    key="optimizer.options.storage") from None
            except OperationalError as err:
                reason = str(err.orig).strip().splitlines()[0] if err.orig else type(err).__name__
                raise EvomergeError(f"cannot open the study's database {self.storage} ({reason})",
                                    key="optimizer.options.storage") from None

    def __getstate__(self):
        return {**self.__dict__, "_study": None if self.storage else self._study}

    def _ask(self, first_id: int) -> list[np.ndarray]:
        trial = self.study.ask(self.distributions)
        self._trial_of[first_id] = trial.number
        return [np.array([trial.params[name] for name in self.distributions])]

    def _tell(self, candidate: Candidate, fitness: tuple[float, ...] | None) -> None:
        study = self.study  # reconnect first: while unpickled, this trial must still count as known (not failed)
        number = self._trial_of.pop(candidate.id)
        if fitness is None:
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        else:
            study.tell(number, list(fitness), skip_if_finished=True)


class TPE(OptunaOptimizer):
    name = "tpe"
    multi_objective = True

    def __init__(self, lower, upper, *, n_startup_trials: Annotated[int, Field(ge=0)] = 10, **common):
        """n_startup_trials: random trials before TPE models the results. Pending trials count as lies (constant liar)."""
        super().__init__(lower, upper, **common)
        self._start(optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=n_startup_trials, multivariate=True,
                                               constant_liar=True))


class OptunaCMAES(OptunaOptimizer):
    """Starts at the centre of the box with sigma 1/6 of the range: optuna 4.9 deprecated x0 and sigma0 (use `cmaes`)."""

    name = "optuna_cmaes"

    def __init__(self, lower, upper, *, popsize: Annotated[int, Field(ge=2)] | None = None, **common):
        super().__init__(lower, upper, **common)
        self._start(optuna.samplers.CmaEsSampler(popsize=popsize, seed=self.seed, warn_independent_sampling=False))


class _NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable: since optuna 5.1 its generation bookkeeping holds a threading.Lock, which
    does not pickle; the checkpoint leaves it out and an unpickled sampler gets a new one."""

    def __getstate__(self):
        return {name: value for name, value in self.__dict__.items() if name != "_thread_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state, _thread_lock=threading.Lock())


class NSGA2(OptunaOptimizer):
    name = "nsga2"
    multi_objective = True

    def __init__(self, lower, upper, *, population_size: Annotated[int, Field(ge=2)] = 50, **common):
        super().__init__(lower, upper, **common)
        self._start(_NSGAIISampler(population_size=population_size, seed=self.seed))
