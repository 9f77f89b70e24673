"""Evaluation memory: `evaluation.batch_size` (a number or auto), and an out-of-memory error inside an evaluation, which
halves the batch and scores the same candidate again; only out of memory at batch 1 fails the trial.

The models here run out of memory as a CUDA device would: a forward pre-hook raises torch.OutOfMemoryError for a batch of
more sequences than the "device" holds, so every path runs on CPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from evomerge.evaluate.harness import HarnessEvaluator
from evomerge.models.io import load_live_model
from evomerge.run.config import experiment_from_dict
from evomerge.run.evaluation import SplitEvaluator
from evomerge.run.ledger import Ledger
from evomerge.run.loop import search
from test_checks import assert_refused, experiment
from test_checks import search as search_cli

TASKS = ["toy_digits", "toy_digits_gen"]  # multiple choice (loglikelihood) and generation


@contextlib.contextmanager
def memory_for(model: torch.nn.Module, rows: int):
    """While open, `model` runs out of memory on a forward pass over more than `rows` sequences (0: on every one)."""

    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if ids is not None and ids.shape[0] > rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate the activations of {ids.shape[0]} "
                                         "sequences")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def tokenizer(tiny_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_zoo / "base")


def evaluator(tokenizer, batch_size) -> HarnessEvaluator:
    return HarnessEvaluator(TASKS, tokenizer, split="search", limit=12, batch_size=batch_size)


def test_out_of_memory_halves_the_batch_and_scores_as_a_run_at_that_batch(tiny_zoo, tokenizer):
    model = load_live_model(tiny_zoo / "expert_digits")
    reference = evaluator(tokenizer, 3).evaluate(model)
    assert reference.ok and not reference.notes
    ev = evaluator(tokenizer, 12)
    with memory_for(model, rows=3):
        result = ev.evaluate(model)
        assert result.ok and result.metrics() == reference.metrics() and result.fitness == reference.fitness
        assert [n.split(" (")[0] for n in result.notes] == ["out of memory at evaluation batch 12",
                                                            "out of memory at evaluation batch 6"]
        assert result.notes[-1].endswith("scored again at batch 3") and ev.batch_size == 3
        again = ev.evaluate(model)  # the next candidate starts at the batch that fitted
        assert again.ok and again.notes == () and again.metrics() == reference.metrics()
        raced = evaluator(tokenizer, 8).race(model, threshold=None, first=0.5, delta=0.05)  # racing's stages too
        assert raced.ok and raced.metrics() == reference.metrics()
        assert [n.split(" (")[0] for n in raced.notes] == ["out of memory at evaluation batch 8",
                                                           "out of memory at evaluation batch 4"]


def test_auto_batch_size_is_the_largest_that_fits(tiny_zoo, tokenizer):
    model = load_live_model(tiny_zoo / "expert_digits")
    ev = evaluator(tokenizer, "auto")
    with memory_for(model, rows=5):
        result = ev.evaluate(model)  # lm-eval's probe from 64 down (accelerate's steps) to one that fits
    assert result.ok and result.notes == () and 1 <= ev.batch_size <= 5
    assert result.metrics() == evaluator(tokenizer, ev.batch_size).evaluate(model).metrics()
    unlimited = evaluator(tokenizer, "auto")
    assert unlimited.evaluate(model).ok and unlimited.batch_size == 64  # lm-eval's largest


def test_out_of_memory_at_batch_1_is_a_failed_result(tiny_zoo, tokenizer):
    model = load_live_model(tiny_zoo / "expert_digits")
    with memory_for(model, rows=0):
        result = evaluator(tokenizer, 2).evaluate(model)
    assert result.status == "failed" and result.error.startswith("OutOfMemoryError (at evaluation batch 1): CUDA out")
    assert [n.split(" (")[0] for n in result.notes] == ["out of memory at evaluation batch 2"]


class OutOfMemoryEvaluator(SplitEvaluator):
    """The search's evaluator over a device that holds `rows` sequences while it scores trials (the worker's preflight,
    one document per task, runs before the device fills up: it passes at the configured batch)."""

    def __init__(self, evaluation, base, rows: int):
        super().__init__(evaluation, base)
        self.rows = rows

    def evaluate(self, model, split, limit=None, threshold=None):
        if limit is not None:  # the preflight
            return super().evaluate(model, split, limit, threshold)
        with memory_for(model, self.rows):
            return super().evaluate(model, split, limit, threshold)


def _search(zoo: Path, run_dir: Path, batch_size, rows: int | None = None):
    """3 trials, the best validated; one multiple-choice task (validation and test are scored on all their documents)."""
    doc = experiment(zoo, budget={"trials": 3}, validation={"top_k": 1},
                     evaluation={"tasks": ["toy_digits"], "limit": 6, "batch_size": batch_size})
    make = SplitEvaluator if rows is None else lambda evaluation, base: OutOfMemoryEvaluator(evaluation, base, rows)
    return search(experiment_from_dict(doc), run_dir, make, progress=False)


def _rows(run_dir: Path, split: str) -> list[tuple]:
    with contextlib.closing(Ledger(run_dir / "ledger.sqlite")) as ledger:
        return [(t.candidate, t.genome, t.status, t.fitness, t.scores) for t in ledger.trials(split)]


@pytest.mark.slow  # ~15 s: two searches of 3 trials with lm-eval on the tiny zoo
def test_a_search_that_runs_out_of_memory_equals_a_search_at_the_batch_that_fits(tiny_zoo, tmp_path):
    reference = _search(tiny_zoo, tmp_path / "reference", batch_size=4)
    summary = _search(tiny_zoo, tmp_path / "oom", batch_size=16, rows=4)
    assert summary == reference and summary.failed == 0
    for split in ("search", "validation", "test"):
        assert _rows(tmp_path / "oom", split) == _rows(tmp_path / "reference", split)
    log = (tmp_path / "oom" / "logs" / "search.log").read_text()
    assert "candidate 0 (search, local): out of memory at evaluation batch 16" in log
    assert "candidate 0 (search, local): out of memory at evaluation batch 8" in log and "scored again at batch 4" in log
    assert "candidate 1 (search" not in log  # the smaller batch is kept for later candidates


@pytest.mark.slow  # ~6 s
def test_out_of_memory_at_batch_1_is_a_failed_trial_and_the_run_goes_on(tiny_zoo, tmp_path):
    from evomerge.errors import EvomergeError

    with pytest.raises(EvomergeError, match="all 3 trials failed"):
        _search(tiny_zoo, tmp_path / "run", batch_size=2, rows=0)
    rows = _rows(tmp_path / "run", "search")
    assert [r[0] for r in rows] == [0, 1, 2] and all(r[2] == "failed" for r in rows)
    with contextlib.closing(Ledger(tmp_path / "run" / "ledger.sqlite")) as ledger:
        assert all(t.error.startswith("OutOfMemoryError (at evaluation batch 1)") for t in ledger.trials("search"))


@pytest.mark.parametrize("value", [0, -4, "big", 2.5])
def test_a_bad_batch_size_is_one_line_naming_the_file_and_key(tiny_zoo, tmp_path, value):
    result = search_cli(tmp_path, experiment(tiny_zoo, evaluation={"batch_size": value}))
    assert_refused(result, tmp_path, "evaluation.batch_size", f"must be a whole number >= 1 or auto, got {value!r}")
