"""Racing: score a candidate on a first slice of the documents and go on only while it can still reach a threshold.

Stages: the first `first` fraction of each task's documents, then twice that, and so on to all of them. After each stage
but the last (a look; L looks in all) the candidate stops if an exact test at level d = delta / L says its full-set
fitness is below the threshold. Per-document scores are 0 or 1 (racing's metrics are proportions): task t has N_t
documents, of which an unknown K_t are solved; its first n_t documents, taken as a random sample of them, show
X_t ~ Hypergeometric(N_t, K_t, n_t) solved, independently across tasks. With weights w_t summing to 1:

  - mean (fitness F = sum_t w_t K_t / N_t): the p-value of "F >= threshold" is the largest P_K(S <= s) over every
    K = (K_1 .. K_T) with F >= threshold, where S = sum_t m_t X_t is the scored documents' weighted count (m_t: w_t / n_t
    in small integer steps; 1 for every task when weights and slices are equal) and s its observed value. P_K(S <= s)
    falls as any K_t grows, so the largest is among the least K that reach the threshold: K_1 .. K_{T-1} run over their
    ranges (in cells when there are too many combinations, each cell taken at its least K) and K_T is the least that
    completes them. The candidate stops when that p-value is <= d.
  - min, geometric: task t's exact upper bound at d / T, UCB_t = the largest K_t / N_t with P(X_t <= x_t) > d / T (a union
    bound over the T weighted tasks); the candidate stops when aggregate(UCB) < threshold (it grows with every score).

Either way a candidate whose full-set fitness reaches the threshold is stopped at a look with probability <= d, so (a
union bound over the L looks) with probability <= delta over the race. An exact test, unlike Hoeffding's or Serfling's
bound (which assume the widest spread scores in [0, 1] can have), is as tight as the scored documents allow. A stopped
candidate's fitness is that of the documents it was scored on (an estimate). The search loop sets the threshold: the
k-th best fully scored fitness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from evomerge.evaluate.result import aggregate

Scorer = Callable[[dict[str, list[int]]], dict[str, np.ndarray]]  # {task: document indices} -> {task: their scores}
STEPS = 16  # the weighted count's resolution: m_t in 1 .. STEPS
COMBINATIONS = 2**21  # mean_p_value's default budget


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


def hypergeometric_pmf(size: int, scored: int) -> np.ndarray:
    """[K, x] = P(X = x) for K = 0 .. size solved among `size` documents, x = 0 .. scored solved among `scored` of
    them drawn at random: C(K, x) C(size - K, scored - x) / C(size, scored), in logs (math.lgamma)."""
    log_fact = np.array([math.lgamma(i + 1) for i in range(size + 1)])
    k, x = np.arange(size + 1)[:, None], np.arange(scored + 1)[None, :]
    possible = (x <= k) & (scored - x <= size - k)

    def log_choose(a, b):
        return log_fact[a] - log_fact[np.clip(b, 0, None)] - log_fact[np.clip(a - b, 0, None)]

    log_pmf = log_choose(k, x) + log_choose(size - k, scored - x) - log_choose(np.array(size), np.array(scored))
    return np.where(possible, np.exp(np.where(possible, log_pmf, 0.0)), 0.0)


def reachable(docs: Mapping[str, np.ndarray], sizes: Mapping[str, int], weights: Mapping[str, float], how: str,
              threshold: float, level: float) -> bool:
    """False when the exact test at `level` says the full-set fitness is below `threshold` (module doc)."""
    total = sum(weights.values())
    tasks = [t for t, v in weights.items() if v > 0]
    w = {t: weights[t] / total for t in tasks}
    if any(not np.isin(docs[t], (0.0, 1.0)).all() for t in tasks):
        raise ValueError("racing's exact test needs per-document scores of 0 or 1")
    solved = {t: int(np.sum(docs[t])) for t in tasks}
    if how == "mean":
        return mean_p_value(solved, {t: len(docs[t]) for t in tasks}, sizes, w, threshold) > level
    bounds = {}
    for t in tasks:  # the largest K whose chance of showing at most the solved count seen is above level / T
        tail = hypergeometric_pmf(sizes[t], len(docs[t]))[:, :solved[t] + 1].sum(axis=1)  # P(X_t <= x_t) per K
        bounds[t] = int(np.flatnonzero(tail > level / len(tasks)).max()) / sizes[t]
    return aggregate(bounds, w, how) >= threshold


def mean_p_value(solved: Mapping[str, int], scored: Mapping[str, int], sizes: Mapping[str, int],
                 weights: Mapping[str, float], threshold: float, budget: int = COMBINATIONS) -> float:
    """The p-value of "the weighted mean of K_t / N_t is >= threshold" from the solved counts of the scored documents
    (weights summing to 1): max over the least such K of P_K(sum_t m_t X_t <= observed) (module doc). `budget`: at most
    this many (K combination, count value) pairs at once; past it the K of all tasks but the last go in cells."""
    tasks = list(weights)
    per_doc = {t: weights[t] / scored[t] for t in tasks}
    steps = {t: max(1, round(STEPS * per_doc[t] / max(per_doc.values()))) for t in tasks}
    common = math.gcd(*steps.values())
    steps = {t: m // common for t, m in steps.items()}
    observed = sum(steps[t] * solved[t] for t in tasks)
    pmfs = {t: hypergeometric_pmf(sizes[t], scored[t]) for t in tasks}
    *free, last = tasks
    # The distribution of sum_{t in free} m_t X_t for every combination of their K, each K_t at the least of its cell,
    # and the most F those combinations reach (each K_t at the top of its cell).
    length = 1 + sum(steps[t] * scored[t] for t in free)
    cells = max(1, int((budget / length) ** (1 / max(1, len(free)))))
    count, reach = np.ones((1, 1)), np.zeros(1)  # [combination, value], combinations in (K_t cell, earlier) order
    for t in free:
        width = math.ceil((sizes[t] + 1) / cells)
        least = np.arange(0, sizes[t] + 1, width)
        most = np.minimum(least + width - 1, sizes[t])
        # new count[(K_t, earlier), v] = sum_x P_{K_t}(X_t = x) count[earlier, v - m_t x]: matrix products over x of
        # the earlier counts shifted by m_t x (10x the speed of a loop of shifted adds), x in chunks within the budget
        values = count.shape[1] + steps[t] * scored[t]
        mixed = np.zeros((len(least), len(count) * values))
        chunk = max(1, budget // (len(count) * values))
        for start in range(0, scored[t] + 1, chunk):
            xs = np.arange(start, min(start + chunk, scored[t] + 1))
            shifted = np.zeros((len(xs), len(count), values))
            for i, x in enumerate(xs):
                shifted[i, :, steps[t] * x:steps[t] * x + count.shape[1]] = count
            mixed += pmfs[t][np.ix_(least, xs)] @ shifted.reshape(len(xs), -1)
        count = mixed.reshape(-1, values)
        reach = (weights[t] * most[:, None] / sizes[t] + reach[None, :]).reshape(-1)
    need = np.ceil((threshold - reach) * sizes[last] / weights[last] - 1e-9)  # the least K_last completing each
    feasible = need <= sizes[last]
    if not feasible.any():
        return 0.0  # no outcome reaches the threshold
    k_last = np.clip(need[feasible], 0, sizes[last]).astype(int)
    tail = np.cumsum(pmfs[last], axis=1)  # [K, x] = P(X_last <= x)
    value = np.arange(count.shape[1])  # the free tasks' weighted count
    room = np.clip((observed - value) // steps[last], -1, scored[last])  # X_last may be at most this; -1: nothing
    below = np.where(room >= 0, tail[k_last[:, None], np.maximum(room, 0)[None, :]], 0.0)
    return float(np.max(np.sum(count[feasible] * below, axis=1)))


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
        if j < n_stages - 1 and not reachable(docs, sizes, weights, how, threshold, per_look):
            return docs, True
    return docs, False
