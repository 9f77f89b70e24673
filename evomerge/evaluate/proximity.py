"""A cheap, deterministic evaluator with the same protocol as HarnessEvaluator, for tests of the search (style item 14).

Each task t has a target state dict theta_t; its score is a smooth bump around the target,

    score_t(theta) = exp(-||theta - theta_t||^2 / ||theta_t - theta_ref||^2)         (1 at theta_t, 1/e at theta_ref)

so a merge that moves toward every expert scores well on all tasks, and the optimum of the mean lies between the
experts: the shape of the real problem, at the cost of a few tensor norms. Non-finite weights give a failed result.
"""

from __future__ import annotations

import math
import time
from typing import Mapping

import torch

from evomerge.evaluate.result import EvalResult, TaskScore, weighted_fitness


class ProximityEvaluator:
    def __init__(self, targets: Mapping[str, Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor],
                 weights: Mapping[str, float] | None = None):
        self.targets = {t: {n: v.detach().double().cpu() for n, v in sd.items()} for t, sd in targets.items()}
        self.scale = {t: sum(float(((sd[n] - reference[n].double().cpu()) ** 2).sum()) for n in sd) or 1.0
                      for t, sd in self.targets.items()}
        self.weights = dict(weights) if weights is not None else {t: 1.0 for t in self.targets}
        self.tasks = list(self.targets)

    @torch.no_grad()
    def evaluate(self, model) -> EvalResult:
        start = time.perf_counter()
        params = {n: p.detach().double().cpu() for n, p in model.state_dict().items()}
        if not all(bool(torch.isfinite(p).all()) for p in params.values()):
            return EvalResult.failed("model has non-finite weights", seconds=time.perf_counter() - start)
        scores = {}
        for task, target in self.targets.items():
            dist = sum(float(((params[n] - v) ** 2).sum()) for n, v in target.items())
            scores[task] = TaskScore(task=task, metric="proximity", value=math.exp(-dist / self.scale[task]), n=1,
                                     proportion=False)
        result = weighted_fitness(scores, self.weights)
        return EvalResult(result.scores, result.fitness, result.status, result.error, time.perf_counter() - start)
