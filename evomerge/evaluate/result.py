"""What one evaluation returns: per-task scores with uncertainty and chance level, the fitness, and a status.

Failures are values (style item 7): an exception or a non-finite fitness gives status "failed", fitness NaN, and the
error text; `EvalResult.ok` is False, so a search can record it and never rank it best.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_ci(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion p observed over n trials (sound at p = 0 or 1, unlike p +- z*se)."""
    if n <= 0:
        return (math.nan, math.nan)
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = center - half, center + half
    return (0.0 if lo < 1e-12 else lo, 1.0 if hi > 1 - 1e-12 else hi)  # exact ends at p = 0 and p = 1


def mean_ci95(values: list[float], sizes: list[int], z: float = Z95) -> tuple[float, float]:
    """95% normal interval of the plain mean of k independent proportions, mean +- z sqrt(sum_i v_i) / k, with each
    task's variance taken at its Agresti-Coull estimate q_i = (p_i n_i + z^2/2) / (n_i + z^2): v_i = q_i (1 - q_i) /
    (n_i + z^2). A task at 0 or 1 then keeps a width (p (1 - p) / n has none there: a model that solves every document
    got [1.00, 1.00]); elsewhere v_i is within a few percent of p (1 - p) / n."""
    if not values or min(sizes) <= 0:
        return (math.nan, math.nan)
    k, z2 = len(values), z * z
    q = [(p * n + z2 / 2) / (n + z2) for p, n in zip(values, sizes)]
    mean, half = sum(values) / k, z * math.sqrt(sum(qi * (1 - qi) / (n + z2) for qi, n in zip(q, sizes))) / k
    return (max(0.0, mean - half), min(1.0, mean + half))


@dataclass(frozen=True)
class TaskScore:
    """One task's primary metric. `chance` is the score of uniform guessing (None when it has no closed form)."""

    task: str
    metric: str
    value: float
    n: int
    stderr: float | None = None
    chance: float | None = None
    higher_is_better: bool = True
    proportion: bool = True  # per-document values are 0/1 (acc, exact_match): Wilson interval

    @property
    def ci95(self) -> tuple[float, float]:
        if self.proportion:
            return wilson_ci(self.value, self.n)
        if self.stderr is None:
            return (math.nan, math.nan)
        return (self.value - Z95 * self.stderr, self.value + Z95 * self.stderr)

    def to_dict(self) -> dict:
        return {**asdict(self), "ci95": list(self.ci95)}


@dataclass(frozen=True)
class EvalResult:
    scores: dict[str, TaskScore] = field(default_factory=dict)
    fitness: float = math.nan
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None
    seconds: float = 0.0
    docs: dict[str, np.ndarray] = field(default_factory=dict)  # {task: score per document scored} (evaluate.docs)
    sizes: dict[str, int] = field(default_factory=dict)  # {task: documents on the split}, scored or not
    estimated: bool = False  # racing stopped it early: scores and fitness are those of the documents scored
    notes: tuple[str, ...] = ()  # what the evaluator had to do to score it (e.g. a smaller batch after out of memory)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failed(cls, error: str, scores: dict[str, TaskScore] | None = None, seconds: float = 0.0) -> "EvalResult":
        return cls(scores=scores or {}, fitness=math.nan, status="failed", error=error, seconds=seconds)

    def metrics(self) -> dict[str, float]:
        """{task: value}: the flat view a ledger stores."""
        return {task: s.value for task, s in self.scores.items()}

    def to_dict(self) -> dict:
        return {"status": self.status, "error": self.error, "fitness": self.fitness, "seconds": self.seconds,
                "scores": {task: s.to_dict() for task, s in self.scores.items()}}


def oriented(value: float, higher_is_better: bool = True) -> float:
    """A task score turned so that higher is better (a perplexity negated): what the fitness and the objectives take."""
    return value if higher_is_better else -value


AGGREGATES = ("mean", "min", "geometric")
GEOMETRIC_EPS = 0.01  # geometric: exp(sum_t w_t ln(s_t + eps) / sum_t w_t) - eps, so one zero score does not zero it all


def aggregate(values: dict[str, float], weights: dict[str, float], how: str = "mean") -> float:
    """The fitness of per-task scores: the weighted mean; the smallest score of a task with weight > 0 ("min": the
    weakest skill); or the weighted geometric mean of s_t + GEOMETRIC_EPS, less the epsilon (a skill at 0 costs the
    most, so every skill counts). All three are 1 when every score is 1, and increase with each score."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {how!r}")
    total = sum(weights.values())
    if total <= 0:
        return math.nan
    if how == "min":
        return min(values[t] for t, w in weights.items() if w > 0)
    if how == "geometric":
        return math.exp(sum(w * math.log(max(values[t], 0.0) + GEOMETRIC_EPS) for t, w in weights.items()) / total) \
            - GEOMETRIC_EPS
    return sum(w * values[t] for t, w in weights.items()) / total


def weighted_fitness(scores: dict[str, TaskScore], weights: dict[str, float], how: str = "mean") -> EvalResult:
    """Fitness = aggregate(scores, weights, how) over the weighted tasks, a score where lower is better (perplexity)
    negated, so that the fitness always grows as the model gets better; NaN anywhere -> a failed result."""
    missing = sorted(set(weights) - set(scores))
    if missing:
        return EvalResult.failed(f"no score for weighted task(s) {', '.join(missing)}", scores)
    values = {t: oriented(scores[t].value, scores[t].higher_is_better) for t in weights}
    fitness = aggregate(values, weights, how) if all(math.isfinite(v) for v in values.values()) else math.nan
    if not math.isfinite(fitness):
        bad = [t for t in weights if not math.isfinite(scores[t].value)]
        return EvalResult.failed(f"non-finite score on {', '.join(bad) or 'fitness'}", scores)
    return EvalResult(scores=scores, fitness=fitness)
