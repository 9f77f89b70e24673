"""Random search: genomes drawn uniformly from the box, one per ask -- the baseline every search must beat."""

from __future__ import annotations

import numpy as np

from evomerge.optim.base import Candidate, Optimizer


class RandomSearch(Optimizer):
    name = "random"
    multi_objective = True

    def __init__(self, lower, upper, **common):
        super().__init__(lower, upper, **common)
        self.rng = np.random.default_rng(self.seed)

    def _ask(self, first_id: int) -> list[np.ndarray]:
        return [self.rng.uniform(self.lower, self.upper)]

    def _tell(self, candidate: Candidate, fitness: tuple[float, ...] | None) -> None:
        pass  # nothing learns
