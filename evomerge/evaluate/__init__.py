"""Scoring models: the Evaluator protocol, lm-eval over live models, results with 95% intervals and chance levels.

    Evaluator: anything with `evaluate(model) -> EvalResult` (harness.HarnessEvaluator for lm-eval tasks,
    proximity.ProximityEvaluator as the cheap deterministic stand-in for tests). Heavy imports (lm-eval, transformers)
    happen inside the modules that need them.
"""

from typing import Protocol

from evomerge.evaluate.result import EvalResult, TaskScore, weighted_fitness, wilson_ci


class Evaluator(Protocol):
    def evaluate(self, model) -> EvalResult: ...


__all__ = ["EvalResult", "Evaluator", "TaskScore", "weighted_fitness", "wilson_ci"]
