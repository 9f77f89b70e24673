"""CMA-ES via pycma's CMAEvolutionStrategy, ask/tell by generation (the choice of Sakana's evolutionary model merge).

`ask` gives a whole generation, then [] until every member is told (results in any order); the generation goes to cma
once complete. cma minimizes, so it is told -fitness; a failed member is told a loss worse than the worst seen yet.

Resume: cma keeps each sample's genotype (before its bound repair) in `sent_solutions`, a dict keyed by
`hash(x.tobytes())`; bytes hashes are salted per process, so an unpickled strategy finds none of them and would rebuild
the genotypes from the repaired genomes. This class keeps the generation's genotypes itself and gives them back to cma
before telling it, so a run resumed in another process goes on exactly as the uninterrupted one.
"""

from __future__ import annotations

from typing import Annotated

import cma
import numpy as np
from pydantic import Field

from evomerge.optim.base import Candidate, Optimizer


class StandardNormal:
    """cma's `randn(lam, N)` from a seeded generator of our own (cma's default is numpy's global RNG)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


# Above this many genes a full covariance (n x n, several copies, and its eigendecomposition) costs more memory and
# time than a search can spare: 3.7 GB at 12,000 genes, ~16 GB for the N^2 scales of a DFS over two 80-layer models.
FULL_COVARIANCE_MAX_DIM = 5000


class CMAES(Optimizer):
    name = "cmaes"

    def __init__(self, lower, upper, *, sigma0: Annotated[float, Field(gt=0)] = 0.2,
                 popsize: Annotated[int, Field(ge=2)] | None = None, diagonal: bool | None = None, **common):
        """sigma0: the initial step as a fraction of each gene's range; popsize: cma's default 4 + 3 ln(dim) if None;
        diagonal: a diagonal covariance (sep-CMA-ES, Ros & Hansen 2008: memory and time linear in the genes); None
        picks it above FULL_COVARIANCE_MAX_DIM genes."""
        super().__init__(lower, upper, **common)
        self.diagonal = self.dim > FULL_COVARIANCE_MAX_DIM if diagonal is None else diagonal
        # seed nan: cma neither seeds nor uses numpy's global RNG, it samples from our own (which pickles with it)
        options = {"bounds": [self.lower, self.upper], "CMA_stds": self.upper - self.lower, "seed": np.nan,
                   "randn": StandardNormal(self.seed), "verbose": -9, "verb_disp": 0, "verb_log": 0,  # no outcmaes/
                   "CMA_diagonal": self.diagonal}
        if popsize is not None:
            options["popsize"] = popsize
        self.es = cma.CMAEvolutionStrategy(self.x0, sigma0, options)
        self._generation: list[np.ndarray] = []  # as cma returned them, to give back unchanged
        self._genotypes: list[np.ndarray] = []  # cma's genotypes of those (before the bound repair)
        self._first_id = 0
        self._losses: dict[int, float | None] = {}  # index in the generation -> loss (None: failed)
        self._worst_loss: float | None = None

    def _ask(self, first_id: int) -> list[np.ndarray]:
        if self._generation:
            return []  # the current generation is still out
        self._generation = self.es.ask()
        self._genotypes = [self.es.sent_solutions[x]["geno"].copy() for x in self._generation]
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
        self._remind_genotypes()
        self.es.tell(self._generation, losses)
        self._generation, self._genotypes, self._losses = [], [], {}

    def _remind_genotypes(self) -> None:
        """Re-file the generation's genotypes under this process's hashes (a no-op in the process that asked)."""
        for x, geno in zip(self._generation, self._genotypes):
            if x not in self.es.sent_solutions:
                self.es.sent_solutions.insert(x, geno=geno.copy(), iteration=self.es.countiter)

    @property
    def generation(self) -> int:
        return self.es.countiter
