"""Natural niches: M2N2's competition for documents, selection and split-point crossover (Abrantes, Lange & Tang,
"Competition and Attraction Improve Model Fusion", arXiv 2508.16204), over the genomes of any search space.

The archive holds `archive_size` genomes with their per-document scores S (members x documents). Each document is a
resource the members share: with z_j = (sum_i S_ij)^alpha (1 where nobody scores),

    F_ij = S_ij / z_j,      fitness_i = sum_j F_ij

so a document few members solve is worth more, and a specialist survives beside generalists (alpha = 0: the plain sum).
A told result joins the archive while it has room; then it replaces the member of lowest fitness over the archive plus
itself, or is dropped if that is itself.

A child: parent 1 drawn with probability proportional to fitness; parent 2 (`matchmaker`) with probability proportional
to what it adds where parent 1 is weak, sum_j max(0, F_2j - F_1j), else like parent 1. Crossover at a split point s in
genome order with a mixing ratio w ~ U(0, 1): gene k of the child is (1 - v_k) parent1_k + v_k parent2_k, v_k = w for
k < s and 1 - w from s on (linear: genomes are box coordinates, so M2N2's slerp of weight vectors becomes a lerp).
Genome order is the space's: a PS genome is [parameter][model][layer group][part] (spaces.ps), so a split point
separates one parameter's models and layers from the rest -- e.g. weight of expert 1, layers >= 2 | everything after;
a DFS genome is its slots' indicators (repetition, model, layer order), then the scales. Then Gaussian noise of std
`mutation` (a fraction of each gene's range).

The first asks are the anchors the run gives (the space's default merge and its source experts, when the space can
express them); then random genomes until two members are in the archive; then children.

Told without per-document scores (an evaluator that gives none), a result counts as one document scored by its fitness
less the archive's lowest (scores must be >= 0 to share): fitness-proportional selection and elitist replacement.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field

from evomerge.optim.base import Candidate, Optimizer


def shared_fitness(scores: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(F, fitness) of a members x documents score matrix: F_ij = S_ij / (sum_i S_ij)^alpha, fitness_i = sum_j F_ij."""
    z = scores.sum(axis=0)
    z = np.where(z > 0, z, 1.0) ** alpha
    shares = scores / z
    return shares, shares.sum(axis=1)


def _proportional(weights: np.ndarray) -> np.ndarray:
    """Probabilities proportional to `weights`; uniform when they sum to zero."""
    total = weights.sum()
    return weights / total if total > 0 else np.full(len(weights), 1.0 / len(weights))


class NaturalNiches(Optimizer):
    name = "niches"

    def __init__(self, lower, upper, *, archive_size: Annotated[int, Field(ge=2)] = 8,
                 alpha: Annotated[float, Field(ge=0)] = 1.0, matchmaker: bool = True, crossover: bool = True,
                 mutation: Annotated[float, Field(ge=0)] = 0.05, **common):
        """archive_size: members kept; alpha: how strongly a document's value falls with the members that solve it;
        matchmaker: pick parent 2 by what it adds to parent 1 (else by fitness); crossover: split-point crossover (else
        the child is parent 1); mutation: Gaussian noise std as a fraction of each gene's range."""
        super().__init__(lower, upper, **common)
        self.archive_size, self.alpha, self.matchmaker, self.crossover, self.mutation = (
            archive_size, alpha, matchmaker, crossover, mutation)
        self.rng = np.random.default_rng(self.seed)
        self.members: list[np.ndarray] = []  # genomes
        self.scores: list[np.ndarray] = []  # their per-document scores (one row each)
        self.scalar: bool | None = None  # told fitness only (no per-document scores); set by the first success

    def _ask(self, first_id: int) -> list[np.ndarray]:
        if first_id < len(self.anchors):
            return [self.anchors[first_id]]
        if len(self.members) < 2:
            return [self.rng.uniform(self.lower, self.upper)]
        first, second = self._parents()
        child = self._cross(first, second) if self.crossover else first.copy()
        return [child + self.rng.normal(0.0, self.mutation, self.dim) * (self.upper - self.lower)]

    def _tell(self, candidate: Candidate, fitness: tuple[float, ...] | None) -> None:
        if fitness is None:
            return
        docs = self.results[-1].docs
        if self.scalar is None:
            self.scalar = docs is None
        if self.scalar != (docs is None):
            raise ValueError("natural niches needs per-document scores for every result, or for none")
        row = np.array([fitness[0]]) if docs is None else docs
        if self.scores and len(row) != len(self.scores[0]):
            raise ValueError(f"{len(row)} document scores; the archive's members have {len(self.scores[0])}")
        if len(self.members) < self.archive_size:
            self.members.append(candidate.genome)
            self.scores.append(row)
            return
        _, fit = shared_fitness(self._matrix(self.scores + [row]), self.alpha)
        worst = int(np.argmin(fit))
        if worst < len(self.members):
            self.members[worst], self.scores[worst] = candidate.genome, row

    def _matrix(self, rows: list[np.ndarray]) -> np.ndarray:
        scores = np.stack(rows)
        return scores - scores.min(axis=0) if self.scalar else scores

    def _parents(self) -> tuple[np.ndarray, np.ndarray]:
        shares, fit = shared_fitness(self._matrix(self.scores), self.alpha)
        probs = _proportional(fit)
        i = self.rng.choice(len(probs), p=probs)
        if self.matchmaker:
            probs = _proportional(np.maximum(0.0, shares - shares[i]).sum(axis=1))
        j = self.rng.choice(len(probs), p=probs)
        return self.members[i], self.members[j]

    def _cross(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        split, w = self.rng.integers(0, self.dim), self.rng.uniform()
        v = np.where(np.arange(self.dim) < split, w, 1.0 - w)
        return (1.0 - v) * first + v * second
