"""Scoring models: lm-eval over live models (harness.HarnessEvaluator), results with 95% intervals and chance levels.

Heavy imports (lm-eval, transformers) happen inside the modules that need them.
"""

from evomerge.evaluate.result import EvalResult, TaskScore, weighted_fitness, wilson_ci

__all__ = ["EvalResult", "TaskScore", "weighted_fitness", "wilson_ci"]
