"""CMA-ES via pycma's CMAEvolutionStrategy, ask/tell by generation (the choice of Sakana's evolutionary model merge).

`ask` gives a whole generation, then [] until every member is told (results in any order); the generation goes to cma
once complete. cma minimizes, so it is told -fitness; a failed member is told a loss worse than the worst seen yet.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated

import cma
import numpy as np
from pydantic import Field

from evomerge.optim.base import Candidate, Optimizer


class CMAES(Optimizer):
    name = "cmaes"

    def __init__(self, lower, upper, *, sigma0: Annotated[float, Field(gt=0)] = 0.2,
                 popsize: Annotated[int, Field(ge=2)] | None = None, **common):
        """sigma0: the initial step as a fraction of each gene's range; popsize: cma's default 4 + 3 ln(dim) if None."""
        super().__init__(lower, upper, **common)
        # cma samples from numpy's global RNG (and re-seeds it when given a seed): it gets a private state, swapped in
        # around every call, so runs are reproducible from `seed` and the state pickles with the optimizer.
        self._rng_state = np.random.RandomState(self.seed).get_state()
        options = {"bounds": [self.lower, self.upper], "CMA_stds": self.upper - self.lower, "seed": np.nan,
                   "verbose": -9, "verb_disp": 0, "verb_log": 0}  # verb_log 0: never write outcmaes/
        if popsize is not None:
            options["popsize"] = popsize
        with self._private_rng():
            self.es = cma.CMAEvolutionStrategy(self.x0, sigma0, options)
        self._generation: list[np.ndarray] = []  # as cma returned them, to give back unchanged
        self._first_id = 0
        self._losses: dict[int, float | None] = {}  # index in the generation -> loss (None: failed)
        self._worst_loss: float | None = None

    @contextmanager
    def _private_rng(self):
        outside = np.random.get_state()
        np.random.set_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = np.random.get_state()
            np.random.set_state(outside)

    def _ask(self, first_id: int) -> list[np.ndarray]:
        if self._generation:
            return []  # the current generation is still out
        with self._private_rng():
            self._generation = self.es.ask()
        self._first_id = first_id
        return self._generation

    def _tell(self, candidate: Candidate, fitness: tuple[float, ...] | None) -> None:
        loss = None if fitness is None else -fitness[0]
        self._losses[candidate.id - self._first_id] = loss
        if loss is not None:
            self._worst_loss = loss if self._worst_loss is None else max(self._worst_loss, loss)
        if len(self._losses) < len(self._generation):
            return
        penalty = (self._worst_loss if self._worst_loss is not None else 0.0) + 1.0  # ranks below every success
        losses = [penalty if self._losses[i] is None else self._losses[i] for i in range(len(self._generation))]
        with self._private_rng():
            self.es.tell(self._generation, losses)
        self._generation, self._losses = [], {}

    @property
    def generation(self) -> int:
        return self.es.countiter
