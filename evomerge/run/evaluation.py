"""The search's evaluator: one lm-eval HarnessEvaluator per split, built once per worker and reused for every trial; and
the objectives of a multi-objective search, read from an evaluation's per-task scores."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import EvomergeError, did_you_mean
from evomerge.run.config import HELD_OUT, EvaluationConfig


@dataclass
class Evaluation:
    fitness: float
    scores: dict[str, Any] = field(default_factory=dict)  # {task: TaskScore.to_dict()}: JSON for the ledger
    status: str = "ok"
    error: str | None = None
    docs: bytes | None = None  # per-document scores, packed (evaluate.docs)
    estimated: bool = False  # racing stopped it: fitness from the documents scored
    notes: tuple[str, ...] = ()  # e.g. scored again at a smaller batch after out of memory (logged by the loop)


class SplitEvaluator:
    """`evaluate(model, split, threshold=None)`; the sample limit applies to the search split only (validation/test are
    scored whole), and so does racing, when configured: with a threshold, a search candidate is scored in stages.
    The search loop's `make_evaluator(evaluation, base)`: a worker scores with the tokenizer of its live base model."""

    def __init__(self, evaluation: EvaluationConfig, tokenizer_source: str):
        self.config, self.tokenizer_source = evaluation, tokenizer_source
        self.tokenizer = None
        self.by_split: dict[str, Any] = {}

    def _for(self, split: str):
        from evomerge.evaluate.harness import HarnessEvaluator

        if split not in self.by_split:
            if self.tokenizer is None:
                from transformers import AutoTokenizer

                from evomerge.models.io import resolve_model
                from evomerge.models.lora import model_part

                self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_part(self.tokenizer_source)))
            c = self.config
            self.by_split[split] = HarnessEvaluator(c.tasks, self.tokenizer, split=split,
                                                    limit=c.limit if split == c.split else None, weights=c.weights,
                                                    metrics=c.metrics, task_dirs=c.task_dirs, network=c.network,
                                                    cut=c.cut.model_dump() if c.cut else None, aggregate=c.aggregate,
                                                    batch_size=c.batch_size, apply_chat_template=c.apply_chat_template,
                                                    system_instruction=c.system_instruction,
                                                    fewshot_as_multiturn=c.fewshot_as_multiturn)
            if split == c.split:
                self._warn_round_trip(self.by_split[split])
        return self.by_split[split]

    def _warn_round_trip(self, evaluator) -> None:
        from evomerge.evaluate.round_trip import round_trip_problems

        for problem in round_trip_problems(self.tokenizer, evaluator.tasks):
            print(f"warning: {self.tokenizer_source}: {problem}", file=sys.stderr)

    def evaluate(self, model, split: str, limit: int | None = None, threshold: float | None = None) -> Evaluation:
        """`limit`: score only the first `limit` documents of each task (the worker's preflight: 1); `threshold`: race
        a search candidate against it (evaluation.racing)."""
        from evomerge.evaluate.docs import pack

        racing = self.config.racing
        if threshold is not None and racing is not None and split == self.config.split:
            result = self._for(split).race(model, threshold, first=racing.first, delta=racing.delta)
        else:
            result = self._for(split).evaluate(model, limit=limit)
        return Evaluation(result.fitness, {t: s.to_dict() for t, s in result.scores.items()}, result.status, result.error,
                          docs=pack(result.docs, result.sizes) if result.docs else None, estimated=result.estimated,
                          notes=result.notes)


def objective_values(scores: dict[str, Any], names: list[str]) -> list[float]:
    """The objectives vector of one evaluation: task t's score (`value`, negated if lower is better), in `names` order.
    A name with no score is a config error (`evaluation.objectives`), not a failed candidate: every trial would fail."""
    from evomerge.evaluate.result import oriented

    for name in names:
        if name not in scores:
            raise EvomergeError(f"no score for task {name!r}; {did_you_mean(name, scores)}", key="evaluation.objectives")
    return [oriented(float(scores[t]["value"]), scores[t].get("higher_is_better", True)) for t in names]


def check_tasks(evaluation: EvaluationConfig, source: str, optimizer: str = "") -> None:
    """Load the tasks once before a run starts, as a worker will: a wrong name, a missing data file, a split a task
    lacks (the search split, or a held-out one scored after the budget), a weight naming no task, or a metric the
    fitness (or racing, or the optimizer) cannot take would fail every trial alike."""
    from evomerge.evaluate.harness import HarnessEvaluator

    c = evaluation
    try:
        harness = HarnessEvaluator(c.tasks, None, split=c.split, limit=c.limit, weights=c.weights, metrics=c.metrics,
                                   task_dirs=c.task_dirs, network=c.network, aggregate=c.aggregate,
                                   cut=c.cut.model_dump() if c.cut else None, apply_chat_template=c.apply_chat_template,
                                   fewshot_as_multiturn=c.fewshot_as_multiturn)
        for name, task in harness.tasks.items():
            available = list(task.dataset.keys()) if hasattr(task.dataset, "keys") else []
            for split in HELD_OUT:
                if split not in available:
                    raise EvomergeError(f"task {name} has no split {split!r}, which the search scores after its budget "
                                        f"(available: {', '.join(available) or 'none'})", key="tasks")
    except EvomergeError as err:  # a task YAML at fault keeps its own name; otherwise the experiment's key
        raise EvomergeError(err.message, source=err.source or source, key=f"evaluation.{err.key or 'tasks'}") from None
    if evaluation.racing is not None:
        _check_racing(harness, source)
    _check_directions(harness, evaluation.aggregate, optimizer, source)
    _check_fewshot(harness.tasks, source)


def _check_fewshot(tasks: dict, source: str) -> None:
    """Few-shot examples are documents shown to every candidate: from a held-out split they would show the search the
    documents that pick (validation) or score (test) its winner. Where lm-eval draws them: fewshot_split; else the
    training split, else the validation split, else the split being scored."""
    for name, task in tasks.items():
        c, fewshot = task.config, task.config.fewshot_config  # lm-eval's FewshotConfig: fewshot_split, samples
        split = getattr(fewshot, "split", None) or getattr(c, "fewshot_split", None)
        if not c.num_fewshot or (split is None and getattr(fewshot, "samples", None) is not None):
            continue
        split = split or c.training_split or c.validation_split
        if split in HELD_OUT:
            raise EvomergeError(f"task {name} draws its {c.num_fewshot} few-shot examples from the {split!r} split, which "
                                f"the search must not see; set its fewshot_split to the search split (or another one)",
                                source=source, key="evaluation.tasks")


def _check_directions(harness, aggregate: str, optimizer: str, source: str) -> None:
    """A score where lower is better (perplexity) enters the fitness negated: the mean and the minimum take that, the
    geometric mean (of logarithms) and natural niches (which shares per-document scores >= 0) cannot."""
    for name, task in harness.tasks.items():
        metric, _ = harness.metrics[name]
        if task.higher_is_better().get(metric, True):
            continue
        if aggregate == "geometric":
            raise EvomergeError(f"the geometric mean takes scores where higher is better; task {name} scores {metric}, "
                                "where lower is; use mean or min", source=source, key="evaluation.aggregate")
        if optimizer == "niches":
            raise EvomergeError(f"natural niches shares per-document scores where higher is better; task {name} scores "
                                f"{metric}, where lower is", source=source, key="optimizer.name")


def _check_racing(harness, source: str) -> None:
    """Racing bounds means of per-document scores in [0, 1]: every task's score must be a proportion."""
    from evomerge.evaluate.harness import PROPORTIONS

    for name, (metric, _) in harness.metrics.items():
        if metric not in PROPORTIONS:
            raise EvomergeError(f"racing needs metrics that are proportions ({', '.join(sorted(PROPORTIONS))}); task "
                                f"{name} scores {metric}", source=source, key="evaluation.racing")
