"""Racing: score a candidate on a first slice of the documents and go on only while it can still reach a threshold.

Stages: the first `first` fraction of each task's documents, then twice that, and so on to all of them. After each stage
but the last (a look; L looks in all), the candidate's full-set fitness gets an upper confidence bound at delta / L,
and it stops when that bound is below the threshold. The bound is Serfling's (Hoeffding's inequality for sampling
without replacement; scores in [0, 1], the scored documents taken as a random sample of the task's): task t's mean over
its first n_t of N_t documents, p_t, is sub-Gaussian around the full-set mean with variance proxy rho_t / (4 n_t),
rho_t = 1 - (n_t - 1) / N_t (0 once n_t = N_t). With d the look's delta / L:

  - mean (weights w_t summing to 1): fitness <= sum_t w_t p_t + sqrt(ln(1 / d) sum_t w_t^2 rho_t / (2 n_t)), one
    bound on the weighted sum (the tasks are sampled independently);
  - min, geometric: each task's UCB_t = p_t + sqrt(ln(T / d) rho_t / (2 n_t)) (a union bound over the T weighted
    tasks), and fitness <= aggregate(UCB) (both increase with every task's score).

Either way the full-set fitness lies below a look's bound with probability >= 1 - delta / L, so (a union bound over the
L looks) a candidate that would have reached the threshold is stopped with probability <= delta. A stopped candidate's
fitness is that of the documents it was scored on (an estimate). The search loop sets the threshold: the k-th best
fully scored fitness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from evomerge.evaluate.result import aggregate

Scorer = Callable[[dict[str, list[int]]], dict[str, np.ndarray]]  # {task: document indices} -> {task: their scores}


def stage_ends(size: int, first: float) -> list[int]:
    """Documents scored after each stage: ceil(first * 2^j * size), the last `size`; strictly increasing."""
    ends, fraction = [], first
    while fraction < 1:
        end = math.ceil(fraction * size)
        if ends and end <= ends[-1] or end >= size:
            break
        ends.append(end)
        fraction *= 2
    return ends + [size]


def upper_bound(docs: Mapping[str, np.ndarray], sizes: Mapping[str, int], weights: Mapping[str, float], how: str,
                delta: float) -> float:
    """Serfling's (1 - delta) upper bound on the full-set fitness, from the documents scored so far (module doc)."""
    total = sum(weights.values())
    w = {t: v / total for t, v in weights.items() if v > 0}
    means = {t: float(np.mean(docs[t])) for t in w}
    spread = {t: _variance_proxy(len(docs[t]), sizes[t]) for t in w}  # 4 x the variance proxy of task t's mean
    if how == "mean":
        return min(1.0, sum(w[t] * means[t] for t in w) + math.sqrt(math.log(1 / delta) / 2 * sum(
            w[t] ** 2 * spread[t] for t in w)))
    bounds = {t: min(1.0, means[t] + math.sqrt(math.log(len(w) / delta) / 2 * spread[t])) for t in w}
    return aggregate(bounds, w, how)


def _variance_proxy(n: int, total: int) -> float:
    return 0.0 if n >= total else (1 - (n - 1) / total) / n


def race(score: Scorer, sizes: Mapping[str, int], threshold: float | None, weights: Mapping[str, float], how: str, *,
         first: float, delta: float) -> tuple[dict[str, np.ndarray], bool]:
    """(per-document scores of every task, stopped early?). threshold None: score everything in one stage."""
    plans = {t: stage_ends(n, first) if threshold is not None else [n] for t, n in sizes.items()}
    n_stages = min(len(p) for p in plans.values())
    if any(len(p) != n_stages for p in plans.values()):  # tasks too unequal to stage together: one stage
        plans, n_stages = {t: [n] for t, n in sizes.items()}, 1
    docs = {t: np.empty(0) for t in sizes}
    per_look = delta / max(1, n_stages - 1)
    for j in range(n_stages):
        new = score({t: list(range(len(docs[t]), plans[t][j])) for t in sizes})
        docs = {t: np.concatenate([docs[t], np.asarray(new[t], dtype=np.float64)]) for t in sizes}
        if j < n_stages - 1 and upper_bound(docs, sizes, weights, how, per_look) < threshold:
            return docs, True
    return docs, False
