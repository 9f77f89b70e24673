"""The ask/tell interface over a box [lower, upper]^d, with explicit, picklable state.

    candidates = opt.ask()                 # a batch the optimizer is ready to propose ([] = tell me results first)
    opt.tell(candidate.id, fitness)        # any order; float, one float per objective, or None for a failure
    opt.tell(candidate.id, fitness, docs)  # with each document's score (a flat vector): natural niches compete on them

Fitness is maximized. A result whose fitness is None or not finite (NaN, inf) is failed: recorded, never best, and each
optimizer decides what its backend is told. Candidates asked and not yet told are `pending`; they survive pickling, so a
resumed run re-evaluates them and tells their results. The library driver loops (cma.fmin2, study.optimize) are not used.
"""

from __future__ import annotations

import os
import pickle
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from evomerge.errors import EvomergeError

Fitness = float | Sequence[float] | None


@dataclass(frozen=True)
class Candidate:
    id: int  # 0, 1, 2, ... in order of asking
    genome: np.ndarray


@dataclass(frozen=True)
class Result:
    id: int
    genome: np.ndarray
    fitness: tuple[float, ...] | None  # one value per objective; None when failed
    docs: np.ndarray | None = None  # per-document scores, when the evaluator gives them

    @property
    def ok(self) -> bool:
        return self.fitness is not None


class Optimizer(ABC):
    name: ClassVar[str]
    multi_objective: ClassVar[bool] = False

    def __init__(self, lower, upper, *, seed: int = 0, n_objectives: int = 1, x0=None, anchors=(),
                 run_dir: str | os.PathLike | None = None):
        self.lower, self.upper = (np.array(b, dtype=np.float64) for b in (lower, upper))
        if self.lower.ndim != 1 or self.lower.shape != self.upper.shape or not np.all(self.lower < self.upper):
            raise ValueError("bounds must be two 1-d arrays of one length with lower < upper")
        if n_objectives < 1 or (n_objectives > 1 and not self.multi_objective):
            raise EvomergeError(f"optimizer {self.name} takes one objective, got {n_objectives}", key="optimizer")
        self.seed, self.n_objectives = seed, n_objectives
        self.x0 = (self.lower + self.upper) / 2 if x0 is None else np.clip(np.asarray(x0, dtype=np.float64), self.lower,
                                                                            self.upper)
        # genomes worth trying first (the space's source experts and default merge, x0 first); used by natural niches
        self.anchors = [np.clip(np.asarray(a, dtype=np.float64), self.lower, self.upper) for a in anchors] or [self.x0]
        self.run_dir = None if run_dir is None else str(run_dir)
        self.pending: dict[int, Candidate] = {}
        self.results: list[Result] = []
        self.n_asked = 0

    @property
    def dim(self) -> int:
        return len(self.lower)

    def ask(self) -> list[Candidate]:
        genomes = self._ask(self.n_asked)
        batch = [Candidate(self.n_asked + i, np.clip(np.asarray(g, dtype=np.float64), self.lower, self.upper))
                 for i, g in enumerate(genomes)]
        self.pending.update((c.id, c) for c in batch)
        self.n_asked += len(batch)
        return batch

    def tell(self, candidate_id: int, fitness: Fitness, docs=None) -> Result:
        """Record a result, then `_tell` it (which finds it, with its docs, as self.results[-1])."""
        if candidate_id not in self.pending:
            raise KeyError(f"candidate {candidate_id} is not pending (never asked, or told already)")
        values = self._values(fitness)
        candidate = self.pending.pop(candidate_id)
        docs = None if values is None or docs is None else np.asarray(docs, dtype=np.float64)
        result = Result(candidate.id, candidate.genome, values, docs)
        self.results.append(result)
        self._tell(candidate, values)
        return result

    def _values(self, fitness: Fitness) -> tuple[float, ...] | None:
        if fitness is None:
            return None
        values = tuple(float(v) for v in np.atleast_1d(np.asarray(fitness, dtype=np.float64)))
        if len(values) != self.n_objectives:
            raise ValueError(f"expected {self.n_objectives} fitness value(s), got {len(values)}")
        return values if np.all(np.isfinite(values)) else None

    @property
    def n_told(self) -> int:
        return len(self.results)

    @property
    def n_failed(self) -> int:
        return sum(not r.ok for r in self.results)

    @property
    def best(self) -> Result | None:
        """The best result told so far (the earliest among equals); None before any success. One objective only."""
        if self.n_objectives > 1:
            raise ValueError("several objectives have no single best; use pareto_front()")
        return max((r for r in self.results if r.ok), key=lambda r: r.fitness[0], default=None)

    def pareto_front(self) -> list[Result]:
        """Successful results no other result dominates (>= in every objective, > in one), in order of asking."""
        ok = [r for r in self.results if r.ok]
        return [ok[i] for i in non_dominated([r.fitness for r in ok])]

    @abstractmethod
    def _ask(self, first_id: int) -> list[np.ndarray]:
        """Genomes to propose now; they will get ids first_id, first_id + 1, ..."""

    @abstractmethod
    def _tell(self, candidate: Candidate, fitness: tuple[float, ...] | None) -> None: ...


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (>= in every objective, > in one; maximizing), in order."""
    f = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    return [i for i, fi in enumerate(f) if not np.any(np.all(f >= fi, axis=1) & np.any(f > fi, axis=1))]


def save_optimizer(optimizer: Optimizer, path: str | os.PathLike) -> None:
    """Pickle to a temp file in the same directory, then rename: a reader never sees half a checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(pickle.dumps(optimizer, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(tmp, path)


def load_optimizer(path: str | os.PathLike) -> Optimizer:
    try:
        optimizer = pickle.loads(Path(path).read_bytes())
    except Exception as err:  # a truncated or foreign file: the caller falls back to the ledger
        raise EvomergeError(f"cannot load the optimizer checkpoint ({type(err).__name__}: {err})", source=str(path)) from None
    if not isinstance(optimizer, Optimizer):
        raise EvomergeError(f"not an optimizer checkpoint (holds a {type(optimizer).__name__})", source=str(path))
    return optimizer
