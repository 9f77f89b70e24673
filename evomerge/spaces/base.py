"""SearchSpace: a bounded genome <-> a Recipe.

Convention: optimizers see the unit cube. A genome is a flat float vector u in [0, 1]^dim; gene k stands for the raw value
low_k + u_k (high_k - low_k). That bounds transform is the only place raw bounds appear (`raw`), so one sigma0 or one
distribution fits every gene, whatever its range. `decode` is pure: the same genome always gives the same Recipe.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from evomerge.recipe import Recipe

DECIMALS = 6  # decoded values are rounded so recipes read well in YAML; far below any effect on a merge


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Gene:
    name: str
    low: float  # raw bounds
    high: float
    start: float  # raw value at x0

    @property
    def unit_start(self) -> float:
        return (self.start - self.low) / (self.high - self.low)


class SearchSpace(ABC):
    """Subclasses set `genes` and `source` and implement `_decode(raw) -> Recipe`."""

    genes: tuple[Gene, ...]
    source: str  # the space file, for messages

    @property
    def dim(self) -> int:
        return len(self.genes)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(self.dim), np.ones(self.dim)

    @property
    def x0(self) -> np.ndarray:
        return np.array([g.unit_start for g in self.genes])

    def raw(self, genome) -> np.ndarray:
        """The bounds transform: unit genome -> raw gene values (validated: shape, finite, inside [0, 1])."""
        u = np.asarray(genome, dtype=np.float64)
        if u.shape != (self.dim,):
            raise ValueError(f"genome has shape {u.shape}, the space has dim {self.dim}")
        if not np.all(np.isfinite(u)) or u.min(initial=0.0) < -1e-9 or u.max(initial=1.0) > 1 + 1e-9:
            raise ValueError("genome values must be finite and inside [0, 1]")
        low, high = (np.array([getattr(g, side) for g in self.genes]) for side in ("low", "high"))
        return low + np.clip(u, 0.0, 1.0) * (high - low)

    def unit(self, raw) -> np.ndarray:
        """The inverse of `raw`: raw gene values -> the unit genome."""
        low, high = (np.array([getattr(g, side) for g in self.genes]) for side in ("low", "high"))
        return (np.asarray(raw, dtype=np.float64) - low) / (high - low)

    @property
    def anchors(self) -> list[np.ndarray]:
        """Genomes worth trying first: x0, then (where a space can express them) each source model as it is."""
        return [self.x0]

    def decode(self, genome) -> Recipe:
        return self._decode(self.raw(genome))

    def named(self, genome) -> dict[str, float]:
        """Raw gene values by name (for ledgers and reports)."""
        return {g.name: round(float(v), DECIMALS) for g, v in zip(self.genes, self.raw(genome))}

    @abstractmethod
    def _decode(self, raw: np.ndarray) -> Recipe: ...

    @abstractmethod
    def describe(self) -> str: ...


def rounded(value) -> float:
    return round(float(value), DECIMALS)
