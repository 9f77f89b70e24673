"""The search's evaluator: one lm-eval HarnessEvaluator per split, built once per worker and reused for every trial."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evomerge.run.config import EvaluationConfig


@dataclass
class Evaluation:
    fitness: float
    scores: dict[str, Any] = field(default_factory=dict)  # {task: TaskScore.to_dict()}: JSON for the ledger
    status: str = "ok"
    error: str | None = None


class SplitEvaluator:
    """`evaluate(model, split)`; the sample limit applies to the search split only (validation/test are scored whole)."""

    def __init__(self, evaluation: EvaluationConfig, tokenizer_source: str):
        self.config, self.tokenizer_source = evaluation, tokenizer_source
        self.tokenizer = None
        self.by_split: dict[str, Any] = {}

    def _for(self, split: str):
        from evomerge.evaluate.harness import HarnessEvaluator

        if split not in self.by_split:
            if self.tokenizer is None:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_source)
            c = self.config
            self.by_split[split] = HarnessEvaluator(c.tasks, self.tokenizer, split=split,
                                                    limit=c.limit if split == c.split else None, weights=c.weights,
                                                    task_dirs=c.task_dirs, network=c.network)
        return self.by_split[split]

    def evaluate(self, model, split: str) -> Evaluation:
        result = self._for(split).evaluate(model)
        return Evaluation(result.fitness, {t: s.to_dict() for t, s in result.scores.items()}, result.status, result.error)


def evaluator_factory(tokenizer_source: str):
    """make_evaluator(evaluation_config) for the search loop."""
    return lambda evaluation: SplitEvaluator(evaluation, tokenizer_source)
