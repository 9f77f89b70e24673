"""Racing: score a candidate on a first slice of the documents and go on only while it can still reach a threshold.

Stages: the first `first` fraction of each task's documents, then twice that, and so on to all of them. After each stage
but the last, each task's full-set score gets an upper confidence bound (Serfling's inequality, Hoeffding's bound for
sampling without replacement; scores in [0, 1], the scored documents taken as a random sample of the task's):

    UCB_t = mean_t + sqrt((1 - (n_t - 1) / N_t) ln(T / delta) / (2 n_t))      n_t of N_t documents, T tasks

so that, by a union bound over the tasks, every full-set score lies below its UCB with probability >= 1 - delta. The
candidate stops when the fitness of the UCBs (every aggregate increases with each task's score) is below the threshold:
then with probability >= 1 - delta its full-set fitness would have been too. A stopped candidate's fitness is that of
the documents it was scored on (an estimate). The search loop sets the threshold: the k-th best fully scored fitness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

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


def upper_bound(values: np.ndarray, total: int, delta: float) -> float:
    """Serfling's (1 - delta) upper bound on the mean over all `total` documents, given the first len(values)."""
    n = len(values)
    if n >= total:
        return float(np.mean(values))
    return min(1.0, float(np.mean(values)) + math.sqrt((1 - (n - 1) / total) * math.log(1 / delta) / (2 * n)))


def race(score: Scorer, sizes: Mapping[str, int], threshold: float | None, fitness: Callable[[dict[str, float]], float],
         *, first: float, delta: float) -> tuple[dict[str, np.ndarray], bool]:
    """(per-document scores of every task, stopped early?). threshold None: score everything in one stage."""
    plans = {t: stage_ends(n, first) if threshold is not None else [n] for t, n in sizes.items()}
    n_stages = min(len(p) for p in plans.values())
    if any(len(p) != n_stages for p in plans.values()):  # tasks too unequal to stage together: one stage
        plans, n_stages = {t: [n] for t, n in sizes.items()}, 1
    docs = {t: np.empty(0) for t in sizes}
    for j in range(n_stages):
        new = score({t: list(range(len(docs[t]), plans[t][j])) for t in sizes})
        docs = {t: np.concatenate([docs[t], np.asarray(new[t], dtype=np.float64)]) for t in sizes}
        if j < n_stages - 1:
            bounds = {t: upper_bound(v, sizes[t], delta / len(sizes)) for t, v in docs.items()}
            if fitness(bounds) < threshold:
                return docs, True
    return docs, False
