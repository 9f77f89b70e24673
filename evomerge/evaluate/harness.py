"""lm-eval over a live model: tasks are loaded once, then `evaluate(model)` runs as often as the weights change.

    ev = HarnessEvaluator(["toy"], tokenizer, split="search")      # once per worker: task index, datasets, split
    for recipe in candidates:
        materializer.apply(recipe)                                   # weights change in place
        result = ev.evaluate(model)                                  # EvalResult: scores, fitness, status, docs
        raced = ev.race(model, threshold, first=0.25, delta=0.05)    # in stages, stopped below the threshold

lm-eval's HFLM wraps the model object itself (no copy), so every call scores the current weights; HFLM keeps no
logits across calls (tests/test_evaluate.py checks this). lm-eval's logs go to the `lm_eval` logger, not the console.

Batch size: a number, or "auto" (lm-eval's probe, run once on the first model scored). An out-of-memory error
(torch.OutOfMemoryError) inside an evaluation halves it and scores the same model again from the start, so its scores
are those of a run at the smaller batch; the evaluator keeps the smaller batch for every later model. Only an
out-of-memory error at batch 1 is a failed result. Each halving is a line in the result's `notes`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from dataclasses import replace
from typing import Callable, Mapping, Sequence

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.evaluate import racing
from evomerge.evaluate.result import EvalResult, TaskScore, weighted_fitness
from evomerge.evaluate.tasks import cut_split, load_tasks, select_split

log = logging.getLogger(__name__)

PROPORTIONS = {"acc", "acc_norm", "exact_match"}  # metrics whose per-document values are 0 or 1
FEWSHOT_SEED = 1234  # lm-eval's fewshot_random_seed (simple_evaluate's and its command line's default)
PYTHON_SEED, NUMPY_SEED, TORCH_SEED = 0, 1234, 1234  # its random_seed, numpy_random_seed, torch_random_seed


class HarnessEvaluator:
    """Scores a live causal LM on lm-eval tasks; fitness = aggregate (mean, min, geometric: result.aggregate) of each
    task's score (`metrics`). Every result carries each document's score too (lm-eval's per-sample output).

    tasks: task, group or tag names from evals/, `task_dirs`, or (network=True) lm-eval's built-in tasks.
    split: "search" | "validation" | "test" (any split the tasks' data has); None = each task's own test split.
    limit: score only the first `limit` documents of each task.
    weights: {task or group: weight}; a group's weight is shared equally by its tasks, tasks left out weigh 0.
        None: every task weighs 1.
    metrics: {task or group: "metric" or "metric,filter"} (lm-eval's result key, as mergekit-evolve's `metric`): what
        a task's score is, e.g. "exact_match,flexible-extract"; default: its first metric under its first filter.
    cut: {search, validation, seed, split}: each task's split cut into search / validation / test (tasks.cut_split).
    aggregate: "mean" (weighted), "min" or "geometric" (result.aggregate).
    apply_chat_template, system_instruction: as lm-eval's (prompts through the tokenizer's chat template; a system
        message first). fewshot_as_multiturn: few-shot examples as turns of the conversation, not one user message;
        default (None) as lm-eval's command line, on with the chat template (its `evaluate` defaults to off).
    batch_size: documents per forward pass (lm-eval's HFLM), or "auto"; halved on out of memory (see above).
    """

    def __init__(self, tasks: Sequence[str], tokenizer, *, split: str | None = "search", limit: int | None = None,
                 weights: Mapping[str, float] | None = None, metrics: Mapping[str, str] | None = None,
                 task_dirs: Sequence[str] = (), network: bool = False, cut: Mapping | None = None,
                 batch_size: int | str = 64, aggregate: str = "mean", apply_chat_template: bool = False,
                 system_instruction: str | None = None, fewshot_as_multiturn: bool | None = None):
        if limit is not None and limit < 1:
            raise EvomergeError(f"limit must be >= 1, got {limit}", key="limit")
        if fewshot_as_multiturn and not apply_chat_template:
            raise EvomergeError("fewshot_as_multiturn needs apply_chat_template (without a chat template the few-shot "
                                "examples are plain text before the prompt)", key="fewshot_as_multiturn")
        self.limit, self.tokenizer, self.batch_size = limit, tokenizer, batch_size
        self.task_dict = load_tasks(tasks, task_dirs, network=network)
        self.tasks = dict(self.task_dict["tasks"])  # leaf name -> lm-eval Task
        for task in self.tasks.values() if cut else ():
            cut_split(task, **cut)
        self.sizes = {name: min(select_split(task, split), limit or math.inf) for name, task in self.tasks.items()}
        self.chance = {name: chance_level(task, limit) for name, task in self.tasks.items()}  # of the split chosen above
        self.weights = self._leaf_weights(weights)
        self.metrics = self._leaf_metrics(metrics or {})  # leaf name -> (metric, filter)
        self.aggregate = aggregate
        turns = apply_chat_template if fewshot_as_multiturn is None else fewshot_as_multiturn
        self.chat = {"apply_chat_template": apply_chat_template, "system_instruction": system_instruction,
                     "fewshot_as_multiturn": turns}
        self._lm = None

    def evaluate(self, model, tokenizer=None, *, limit: int | None = None) -> EvalResult:
        """Score the model's current weights (with `tokenizer`, default the evaluator's; on the first `limit` documents
        of each task, default the evaluator's limit). Errors inside lm-eval or the model become a failed EvalResult."""

        def score() -> EvalResult:
            raw = self._run(model, tokenizer or self.tokenizer, limit or self.limit)
            scores = {name: self._score(name, raw) for name in self.tasks}
            docs = {name: self._per_document(name, raw) for name in self.tasks}
            return replace(weighted_fitness(scores, self.weights, self.aggregate), docs=docs, sizes=dict(self.sizes))

        return self._at_a_batch_that_fits(score)

    def race(self, model, threshold: float | None, *, first: float, delta: float, tokenizer=None) -> EvalResult:
        """Score in stages (evaluate.racing), stopping once the fitness cannot reach `threshold` (with probability
        >= 1 - delta). Task scores are the means of the documents scored: for metrics that are means (exact match, acc)."""

        def score() -> EvalResult:
            docs, stopped = racing.race(lambda ranges: self._score_documents(model, tokenizer or self.tokenizer, ranges),
                                        self.sizes, threshold, self.weights, self.aggregate, first=first, delta=delta)
            scores = {name: self._mean_score(name, values) for name, values in docs.items()}
            return replace(weighted_fitness(scores, self.weights, self.aggregate), docs=docs, sizes=dict(self.sizes),
                           estimated=stopped)

        return self._at_a_batch_that_fits(score)

    def _at_a_batch_that_fits(self, score: Callable[[], EvalResult]) -> EvalResult:
        """score(), timed. Out of memory halves the batch and runs all of score() again (racing: every stage), so the
        result is that of one run at the smaller batch; any other error, or out of memory at batch 1, is a failed
        result (style item 7)."""
        import torch

        start, notes = time.perf_counter(), []
        while True:
            try:
                result = score()
            except torch.OutOfMemoryError as err:
                if self._halve_batch(err, notes):
                    continue  # leaving the except clause drops the error, and the tensors its traceback holds
                return self._failed(err, start, notes)
            except Exception as err:  # noqa: BLE001 - a failed candidate is a value
                return self._failed(err, start, notes)
            return replace(result, seconds=time.perf_counter() - start, notes=tuple(notes))

    def _halve_batch(self, err: Exception, notes: list[str]) -> bool:
        """After an out-of-memory error: halve the batch for this and every later evaluation; False at batch 1."""
        import torch

        if not isinstance(self.batch_size, int) or self.batch_size == 1:  # "auto": the probe itself ran out
            return False
        smaller = self.batch_size // 2
        notes.append(f"out of memory at evaluation batch {self.batch_size} ({str(err).strip().splitlines()[0][:200]}); "
                     f"scored again at batch {smaller}")
        log.warning("%s", notes[-1])
        self.batch_size, self._lm = smaller, None  # the next _lm_for wraps the model at the new batch size
        torch.cuda.empty_cache()  # what the failed batch held goes back to the device (a no-op without CUDA)
        return True

    def _failed(self, err: Exception, start: float, notes: list[str] = ()) -> EvalResult:
        import torch

        at = f" (at evaluation batch {self.batch_size})" if isinstance(err, torch.OutOfMemoryError) else ""
        log.warning("evaluation failed%s: %s: %s", at, type(err).__name__, err)
        return replace(EvalResult.failed(f"{type(err).__name__}{at}: {err}", seconds=time.perf_counter() - start),
                       notes=tuple(notes))

    def _run(self, model, tokenizer, limit: int | None = None, samples: dict[str, list[int]] | None = None) -> dict:
        """lm-eval's results and per-sample output for the first `limit` documents of each task, or for `samples`."""
        import torch
        from lm_eval import evaluator

        lm = self._lm_for(model, tokenizer)
        _check_finite(model)
        for name, task in self.tasks.items():  # the few-shot examples drawn anew, as lm-eval's command line draws them:
            task.set_fewshot_seed(FEWSHOT_SEED)  # the same for every candidate (its sampler's own generator is unseeded)
            if samples and task.config.num_fewshot:
                _skip_fewshot_draws(task, min(samples[name]))
        # lm-eval draws tqdm bars on stderr: keep them off the console, in the log at debug level.
        with torch.no_grad(), _seeded_as_lm_eval(model.device), contextlib.redirect_stderr(io.StringIO()) as noise:
            raw = evaluator.evaluate(lm, self.task_dict, limit=None if samples else limit, samples=samples,
                                     bootstrap_iters=0 if samples else 1000, log_samples=True, **self.chat)
        log.debug("lm-eval: %s", noise.getvalue()[-2000:])
        return raw

    def _score_documents(self, model, tokenizer, ranges: dict[str, list[int]]) -> dict[str, np.ndarray]:
        """{task: scores of the documents at these indices} (each list non-empty: lm-eval reads [] as every document)."""
        raw = self._run(model, tokenizer, samples=ranges)
        return {name: self._per_document(name, raw) for name in self.tasks}

    def _lm_for(self, model, tokenizer):
        """One HFLM per (model, tokenizer) object pair (cheap: it wraps the objects). A new pair gets a new wrapper."""
        if self._lm is None or self._lm.model is not model or self._lm.tokenizer is not tokenizer:
            from lm_eval.models.huggingface import HFLM

            max_length = getattr(model.config, "max_position_embeddings", None)
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, max_length=max_length)
                if self.batch_size == "auto":
                    # lm-eval probes before every run of requests: once here, then a fixed batch (halved on OOM)
                    self.batch_size = self._lm._detect_batch_size()
                    log.info("evaluation batch size (auto): %d", self.batch_size)
                    self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size,
                                    max_length=max_length)
            model.eval()
        return self._lm

    def _score(self, name: str, raw: dict) -> TaskScore:
        values = raw["results"][name]
        metric, kept = self.metrics[name]
        stderr = values.get(f"{metric}_stderr,{kept}")
        return TaskScore(task=name, metric=metric, value=float(values[f"{metric},{kept}"]),
                         n=int(raw["n-samples"][name]["effective"]),
                         stderr=float(stderr) if isinstance(stderr, (int, float)) else None, chance=self.chance[name],
                         higher_is_better=bool(raw["higher_is_better"][name].get(metric, True)),
                         proportion=metric in PROPORTIONS)

    def _per_document(self, name: str, raw: dict) -> np.ndarray:
        """The scored metric of each document scored, in document order (lm-eval's samples, under the metric's filter).
        A sample that is not a number (perplexities: a log-likelihood and a word or byte count) is scored by the task's
        aggregation over that one document."""
        metric, kept = self.metrics[name]
        samples = sorted((s for s in raw["samples"][name] if s["filter"] == kept), key=lambda s: s["doc_id"])
        one_document = self.tasks[name].aggregation()[metric]
        return np.array([float(s[metric]) if np.isscalar(s[metric]) else one_document([s[metric]]) for s in samples],
                        dtype=np.float64)

    def _mean_score(self, name: str, values: np.ndarray) -> TaskScore:
        task, (metric, _) = self.tasks[name], self.metrics[name]
        n = len(values)
        return TaskScore(task=name, metric=metric, value=float(values.mean()), n=n,
                         stderr=float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else None, chance=self.chance[name],
                         higher_is_better=bool(task.higher_is_better().get(metric, True)),
                         proportion=metric in PROPORTIONS)

    def _leaf_weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        if weights is None:
            return {name: 1.0 for name in self.tasks}
        leaves: dict[str, float] = {}
        for name, weight in weights.items():
            members = self._members(name, "weight")
            for member in members:
                leaves[member] = leaves.get(member, 0.0) + weight / len(members)
        if sum(leaves.values()) <= 0:
            raise EvomergeError("task weights sum to zero", key="weights")
        return leaves

    def _leaf_metrics(self, metrics: Mapping[str, str]) -> dict[str, tuple[str, str]]:
        chosen = {name: scored_metric(task) for name, task in self.tasks.items()}
        for name, metric in metrics.items():
            for member in self._members(name, "metric"):
                chosen[member] = scored_metric(self.tasks[member], metric, key=f"metrics.{name}")
        return chosen

    def _members(self, name: str, setting: str) -> list[str]:
        """The tasks a task or group name covers; one that covers none is an error of the `setting`s (weights, ...)."""
        members = self._leaves_of(name)
        if not members:
            raise EvomergeError(f"{setting} for {name!r}, which is not among the evaluated tasks "
                                f"({', '.join(self.tasks)})", key=f"{setting}s")
        return members

    def _leaves_of(self, name: str) -> list[str]:
        if name in self.tasks:
            return [name]
        children = self.task_dict["group_map"].get(name, [])
        return [leaf for child in children for leaf in self._leaves_of(child)]


@contextlib.contextmanager
def _seeded_as_lm_eval(device):
    """Python's, numpy's and torch's generators (on CPU and the model's device) seeded as lm-eval's command line seeds
    them, and put back after: a task that samples (do_sample) scores a model alike whatever this process ran before."""
    import random

    import torch

    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        random.seed(PYTHON_SEED)
        np.random.seed(NUMPY_SEED)
        torch.manual_seed(TORCH_SEED)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def _skip_fewshot_draws(task, documents: int) -> None:
    """Draw the few-shot examples of the task's first `documents` documents and drop them. lm-eval draws them from one
    generator, document after document, so a racing stage that starts at document i must go on from where a whole
    evaluation is at i: then each document is shown the same examples however the documents are staged."""
    docs = task.eval_docs
    for i in range(documents):
        task.fewshot_context(docs[i], num_fewshot=task.config.num_fewshot)


def _check_finite(model) -> None:
    """NaN/inf weights give NaN log-likelihoods, which lm-eval's argmax turns into plausible-looking accuracies. Every
    weight is checked (one read of each, one sync): a NaN in any embedding row would reach some document only."""
    import torch

    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        raise FloatingPointError("model has non-finite weights (NaN/inf)")


def scored_metric(task, wanted: str | None = None, key: str = "metrics") -> tuple[str, str]:
    """(metric, filter) of a task's score: `wanted` ("metric" under the first filter, or "metric,filter"), else the
    first metric of its metric_list (lm-eval's defaults for its output type when it has none) under its first filter
    ("none" when it has no filter_list). lm-eval keys its results "metric,filter"."""
    metrics = list(task.aggregation())
    filters = [f["name"] for f in task.config.filter_list] if task.config.filter_list else ["none"]
    if wanted is None:
        return metrics[0], filters[0]
    metric, _, kept = (part.strip() for part in wanted.partition(","))
    name = task.config.task
    if metric not in metrics:
        raise EvomergeError(f"task {name} has no metric {metric!r} (its metrics: {', '.join(metrics)})", key=key)
    if kept and kept not in filters:
        raise EvomergeError(f"task {name} has no filter {kept!r} (its filters: {', '.join(filters)})", key=key)
    return metric, kept or filters[0]


def chance_level(task, limit: int | None = None) -> float | None:
    """Uniform guessing: `metadata.chance` when the task states it, else mean 1/#choices for multiple choice."""
    stated = (task.config.metadata or {}).get("chance")
    if stated is not None:
        return float(stated)
    if task.config.output_type != "multiple_choice":
        return None
    docs = task.eval_docs
    docs = [docs[i] for i in range(min(len(docs), limit or len(docs)))]
    return sum(1.0 / len(task.doc_to_choice(doc)) for doc in docs) / len(docs)
