"""Evaluation: result arithmetic, the lm-eval adapter over live models (known answers, in-place re-evaluation),
the table, and the one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.evaluate.harness import HarnessEvaluator
from evomerge.evaluate.result import TaskScore, mean_ci95, weighted_fitness, wilson_ci
from evomerge.evaluate.table import evaluate_targets, format_table, load_model_dir
from evomerge.models.io import load_live_model
from evomerge.zoo.train import quick_accuracy

TOY = Path(__file__).resolve().parents[1] / "evals" / "toy"


@pytest.fixture(scope="module")
def tokenizer(tiny_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_zoo / "base")


@pytest.fixture(scope="module")
def digits_evaluator(tokenizer):
    return HarnessEvaluator(["toy_digits", "toy_digits_gen"], tokenizer, split="search")


def _model(zoo: Path, name: str):
    return load_live_model(zoo / name)


def test_wilson_interval_known_values():
    # z = 1.96: 50/100 -> [0.4038, 0.5962]; 0/10 -> [0, 0.2775]; 10/10 -> [0.7225, 1]
    assert wilson_ci(0.5, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    assert wilson_ci(0.0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_ci(1.0, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)


def test_mean_interval_known_values():
    z = 1.959964
    # 50/100 and 100/100: q = 51.92073 / 103.84146 = 0.5 and 101.92073 / 103.84146 = 0.98150; the mean is 0.75
    half = z * math.sqrt(0.5 * 0.5 / 103.84146 + 0.98150 * 0.01850 / 103.84146) / 2
    assert mean_ci95([0.5, 1.0], [100, 100]) == pytest.approx((0.75 - half, 0.75 + half), abs=1e-5)
    # every document solved: an interval below 1, not [1, 1]; 200/200 -> q = 201.92073 / 203.84146 = 0.99058, half = z sqrt(3 v) / 3
    half = z * math.sqrt(3 * 0.99058 * 0.00942 / 203.84146) / 3
    assert mean_ci95([1.0, 1.0, 1.0], [200, 200, 200]) == pytest.approx((1 - half, 1.0), abs=1e-5)
    # inside (0, 1) it is the plain normal interval to within a few percent of its width
    lo, hi = mean_ci95([0.3, 0.6], [400, 400])
    plain = z * math.sqrt(0.3 * 0.7 / 400 + 0.6 * 0.4 / 400) / 2
    assert (hi - lo) / 2 == pytest.approx(plain, rel=0.02) and (lo + hi) / 2 == pytest.approx(0.45)


def test_weighted_fitness_and_failures():
    scores = {t: TaskScore(task=t, metric="acc", value=v, n=100) for t, v in [("a", 0.5), ("b", 0.8), ("c", 0.2)]}
    result = weighted_fitness(scores, {"a": 1.0, "b": 3.0})
    assert result.ok and result.fitness == pytest.approx((0.5 + 3 * 0.8) / 4)
    nan = dict(scores, b=TaskScore(task="b", metric="acc", value=math.nan, n=100))
    failed = weighted_fitness(nan, {"a": 1.0, "b": 1.0})
    assert failed.status == "failed" and math.isnan(failed.fitness) and "non-finite score on b" in failed.error
    assert weighted_fitness(nan, {"a": 1.0}).ok  # an unweighted NaN is reported, not fatal
    ppl = dict(scores, c=TaskScore(task="c", metric="word_perplexity", value=3.0, n=10, higher_is_better=False))
    assert weighted_fitness(ppl, {"a": 1.0, "c": 1.0}).fitness == pytest.approx((0.5 - 3.0) / 2)  # lower is better
    assert weighted_fitness(ppl, {"a": 1.0, "c": 1.0}, "min").fitness == -3.0


def test_lm_eval_scores_equal_an_independent_computation(tiny_zoo, digits_evaluator):
    """The adapter's accuracy equals the zoo's own two-forward-pass scorer on the same documents, and the expert beats
    chance on its own skill (a known answer: it was trained for it)."""
    model = _model(tiny_zoo, "expert_digits")
    result = digits_evaluator.evaluate(model)
    em, mc = quick_accuracy(model, "digits", split="search", n=100)
    acc, exact = result.scores["toy_digits"], result.scores["toy_digits_gen"]
    assert (acc.value, exact.value) == pytest.approx((mc, em))
    assert acc.n == exact.n == 100 and acc.chance == 0.25 and exact.chance == pytest.approx(0.001)
    assert acc.ci95[0] > acc.chance  # well above chance, beyond the 95% interval
    assert result.fitness == pytest.approx((acc.value + exact.value) / 2)


def test_per_document_scores_and_racing_on_lm_eval(tiny_zoo, digits_evaluator):
    """Each document's score (lm-eval's samples) averages to the task score; racing in stages scores the same documents
    the same way, and an unreachable threshold stops the candidate after the first slice."""
    model = _model(tiny_zoo, "expert_digits")
    result = digits_evaluator.evaluate(model)
    for task, score in result.scores.items():
        assert len(result.docs[task]) == score.n == 100 and result.docs[task].mean() == pytest.approx(score.value)
    assert set(result.docs["toy_digits_gen"]) <= {0.0, 1.0} and result.sizes == {"toy_digits": 100, "toy_digits_gen": 100}
    staged = digits_evaluator.race(model, -1.0, first=0.25, delta=0.05)  # never stops: stages of 25, 25, 50 documents
    assert not staged.estimated and staged.fitness == pytest.approx(result.fitness)
    for task in result.docs:
        np.testing.assert_array_equal(staged.docs[task], result.docs[task])
    stopped = digits_evaluator.race(model, 2.0, first=0.25, delta=0.05)
    assert stopped.estimated and {t: len(v) for t, v in stopped.docs.items()} == {"toy_digits": 25, "toy_digits_gen": 25}
    assert stopped.fitness == pytest.approx(np.mean([result.docs[t][:25].mean() for t in result.docs]))
    assert stopped.scores["toy_digits"].n == 25


def test_racing_shows_each_document_the_few_shot_examples_a_full_evaluation_shows_it(tiny_zoo, tokenizer, tmp_path):
    """lm-eval draws few-shot examples from one generator, document after document: a racing stage that starts at
    document 25 must go on drawing where documents 0 .. 24 left off, else the documents of later stages are shown other
    examples than in a full evaluation (and than in a candidate scored in one stage). Staged scores equal full ones,
    and the prompts are lm-eval's own for the same documents."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = digits_task_dir(tmp_path, "shots", "num_fewshot: 1\nfewshot_split: validation\n", "_toy_choice_template")
    model = _model(tiny_zoo, "expert_digits")
    evaluator = HarnessEvaluator(["shots"], tokenizer, split="test", limit=80, task_dirs=[str(tasks)])
    full = evaluator.evaluate(model)
    staged = evaluator.race(model, -1.0, first=0.125, delta=0.05)  # stages of 10, 10, 20 and 40 documents
    assert not staged.estimated
    np.testing.assert_array_equal(staged.docs["shots"], full.docs["shots"])

    prompts = {}
    original = evaluator._run

    def recording(*args, **kwargs):
        raw = original(*args, **kwargs)
        prompts.update({s["doc_id"]: s["arguments"][0][0] for s in raw["samples"]["shots"]})
        return raw

    evaluator._run = recording
    evaluator.race(model, -1.0, first=0.125, delta=0.05)
    own = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer), tasks=["shots"], limit=80,
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                          bootstrap_iters=0, log_samples=True)
    expected = {s["doc_id"]: s["arguments"][0][0] for s in own["samples"]["shots"]}
    assert len(prompts) == 80 and prompts == expected


def test_a_task_that_samples_scores_alike_every_time_as_lm_eval_seeds_it(tmp_path):
    """A generation task with do_sample draws from torch's generator: each evaluation seeds it as lm-eval's command line
    does (simple_evaluate's seeds), so a model scores the same whatever ran before (a search's candidates, a resume),
    the scores equal lm-eval's own, and the process's generators are left as they were."""
    import random

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    tasks = digits_task_dir(tmp_path, "sampled", """
        generation_kwargs: {until: ["\\n"], max_gen_toks: 6, do_sample: true, temperature: 1.5}
    """)
    zoo = Path(__file__).resolve().parents[1] / "zoo"  # the committed toy zoo: its digits expert has the skill
    model, tokenizer = _model(zoo, "expert_digits"), AutoTokenizer.from_pretrained(zoo / "expert_digits")
    evaluator = HarnessEvaluator(["sampled"], tokenizer, split="test", limit=60, task_dirs=[str(tasks)])

    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    def seeded(seed=7):
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)

    seeded()
    expected = draws()
    seeded()
    first = evaluator.evaluate(model)
    assert draws() == expected  # the process's generators are where they were
    torch.rand(5)  # the generator elsewhere
    again = evaluator.evaluate(model)
    np.testing.assert_array_equal(again.docs["sampled"], first.docs["sampled"])
    own = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64), tasks=["sampled"], limit=60,
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False), bootstrap_iters=0)
    assert first.scores["sampled"].value == own["results"]["sampled"]["exact_match,none"]
    greedy = HarnessEvaluator(["toy_digits_gen"], tokenizer, split="test", limit=60).evaluate(model)
    assert first.scores["sampled"].value < greedy.scores["toy_digits_gen"].value  # it did sample


def digits_task_dir(root: Path, task: str, lines: str, template: str = "_toy_gen_template") -> Path:
    """A user task dir with one task, `task`: a toy digits task (generation by default) with the YAML `lines` added."""
    d = root / f"{task}_tasks"
    (d / "data").mkdir(parents=True)
    shutil.copy(TOY / "toy_data.py", d)
    for split in ("search", "validation", "test"):
        shutil.copy(TOY / "data" / f"digits_{split}.jsonl", d / "data")
    (d / f"{task}.yaml").write_text((TOY / template).read_text()
                                    + f"task: {task}\ndataset_kwargs: {{skill: digits}}\n" + textwrap.dedent(lines))
    return d


def filtered_task_dir(root: Path) -> Path:
    """A user task over the toy digits data with two filters: `never` first (a regex that matches no answer, so every
    response becomes lm-eval's "[invalid]"), then `whole` (the response as generated)."""
    return digits_task_dir(root, "filtered", """
        filter_list:
          - name: never
            filter: [{function: regex, regex_pattern: "(QQQ)"}, {function: take_first}]
          - name: whole
            filter: [{function: take_first}]
    """)


def test_the_metric_and_filter_a_task_scores_are_chosen(tokenizer, tmp_path):
    """Default: the first metric under the first filter (here `never`: nothing matches, 0); `metrics` picks the other
    filter, whose exact match equals the zoo's own scorer on the same documents, on every split, per document too."""
    from evomerge.run.config import EvaluationConfig
    from evomerge.run.evaluation import SplitEvaluator

    zoo = Path(__file__).resolve().parents[1] / "zoo"  # the committed toy zoo: its digits expert has the skill
    model, tasks = _model(zoo, "expert_digits"), str(filtered_task_dir(tmp_path))
    default = HarnessEvaluator(["filtered"], tokenizer, split="search", limit=40, task_dirs=[tasks]).evaluate(model)
    assert default.ok and default.scores["filtered"].value == 0.0 and not default.docs["filtered"].any()
    chosen = HarnessEvaluator(["filtered"], tokenizer, split="search", limit=40, task_dirs=[tasks],
                              metrics={"filtered": "exact_match,whole"})
    em, _ = quick_accuracy(model, "digits", split="search", n=40)
    result = chosen.evaluate(model)
    assert em > 0.9 and result.scores["filtered"].value == pytest.approx(em) and result.fitness == pytest.approx(em)
    assert result.docs["filtered"].mean() == pytest.approx(em)
    staged = chosen.race(model, -1.0, first=0.25, delta=0.05)  # racing reads the per-document scores of that filter
    np.testing.assert_array_equal(staged.docs["filtered"], result.docs["filtered"])
    config = EvaluationConfig(tasks=["filtered"], task_dirs=[tasks], metrics={"filtered": "exact_match,whole"})
    held_out = SplitEvaluator(config, str(zoo / "base")).evaluate(model, "validation")
    em, _ = quick_accuracy(model, "digits", "validation", n=100)
    assert held_out.scores["filtered"]["value"] == pytest.approx(em)


def test_eval_cli_metric(tokenizer, tmp_path):
    """`evomerge eval --metric TASK=METRIC,FILTER` scores as the evaluator's `metrics`; a bad one: one line, exit 2."""
    from click.testing import CliRunner

    from evomerge.cli import main

    zoo, tasks, out = Path(__file__).resolve().parents[1] / "zoo", filtered_task_dir(tmp_path), tmp_path / "scores.json"
    common = ["eval", str(zoo / "expert_digits"), "--tasks", "filtered", "--task-dir", str(tasks), "--limit", "20"]
    result = CliRunner().invoke(main, [*common, "--metric", "filtered=exact_match,whole", "--output-json", str(out)])
    assert result.exit_code == 0, result.output
    expected = HarnessEvaluator(["filtered"], tokenizer, split="test", limit=20, task_dirs=[str(tasks)],
                                metrics={"filtered": "exact_match,whole"}).evaluate(_model(zoo, "expert_digits"))
    (saved,) = json.loads(out.read_text())["results"]
    assert saved["scores"]["filtered"]["value"] == expected.scores["filtered"].value > 0  # not the `never` filter's 0
    for value, message in [("filtered", "--metric: 'filtered': expected TASK=METRIC or TASK=METRIC,FILTER"),
                           ("filtered=exact_match,nope", "--metric: task filtered has no filter 'nope' (its filters: "
                                                         "never, whole)")]:
        result = CliRunner().invoke(main, [*common, "--metric", value])
        assert result.exit_code == 2 and result.output == f"error: {message}\n", result.output


@pytest.mark.parametrize("metrics, key, message", [
    ({"filtered": "acc"}, "metrics.filtered", "task filtered has no metric 'acc' (its metrics: exact_match)"),
    ({"filtered": "exact_match,flexible-extract"}, "metrics.filtered",
     "task filtered has no filter 'flexible-extract' (its filters: never, whole)"),
    ({"toy_digits": "acc"}, "metrics", "metric for 'toy_digits', which is not among the evaluated tasks (filtered)"),
])
def test_a_metric_or_filter_the_task_lacks(tokenizer, tmp_path, metrics, key, message):
    with pytest.raises(EvomergeError) as err:
        HarnessEvaluator(["filtered"], tokenizer, task_dirs=[str(filtered_task_dir(tmp_path))], metrics=metrics)
    assert (err.value.key, err.value.message) == (key, message)


def one_split_task_dir(root: Path) -> Path:
    """A user task with one split, `test` (the toy digits test documents), as most published benchmarks have."""
    d = root / "one_split_tasks"
    d.mkdir(parents=True)
    (d / "digits_one.yaml").write_text(json.dumps({
        "task": "digits_one", "dataset_path": "json", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(TOY / "data" / "digits_test.jsonl")}},
        "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
        "target_delimiter": "", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}))
    return d


def test_a_cut_splits_one_split_three_ways(tokenizer, tmp_path):
    """`cut`: the 200 documents of the task's test split shuffled by numpy's PCG64 (seed 0): the first 50 are the search
    split, the next 30 validation, the other 120 test, in that shuffled order; the same cut every time."""
    tasks, cut = [str(one_split_task_dir(tmp_path))], {"search": 50, "validation": 30, "seed": 0}
    rows = [json.loads(line)["prompt"] for line in (TOY / "data" / "digits_test.jsonl").read_text().splitlines()]
    order = np.random.default_rng(0).permutation(len(rows))
    expected = {"search": order[:50], "validation": order[50:80], "test": order[80:]}
    for split, indices in expected.items():
        evaluator = HarnessEvaluator(["digits_one"], tokenizer, split=split, task_dirs=tasks, cut=cut)
        assert evaluator.sizes == {"digits_one": len(indices)}
        docs = [d["prompt"] for d in evaluator.tasks["digits_one"].eval_docs]
        assert docs == [rows[i] for i in indices], split
    shares = {"search": 0.25, "validation": 0.1}  # of the 200: 50 and 20, the other 130 test
    for split, n in {"search": 50, "validation": 20, "test": 130}.items():
        assert HarnessEvaluator(["digits_one"], tokenizer, split=split, task_dirs=tasks, cut=shares).sizes["digits_one"] == n
    with pytest.raises(EvomergeError, match=r"task digits_one has no split 'search'"):
        HarnessEvaluator(["digits_one"], tokenizer, split="search", task_dirs=tasks)  # without a cut
    with pytest.raises(EvomergeError, match=r"task digits_one: its 'test' split has 200 documents, too few for 150 search "
                                            r"\+ 50 validation \+ a test split"):
        HarnessEvaluator(["digits_one"], tokenizer, task_dirs=tasks, cut={"search": 150, "validation": 50})
    with pytest.raises(EvomergeError, match=r"task digits_one has no split 'train' to cut \(available: test\)"):
        HarnessEvaluator(["digits_one"], tokenizer, task_dirs=tasks, cut={"search": 5, "validation": 5, "split": "train"})


def test_documents_kept_in_memory_are_the_ones_lm_eval_would_iterate(digits_evaluator):
    """select_split keeps a task's documents in memory; its doc_iterator yields what lm-eval's own yields."""
    for task in digits_evaluator.tasks.values():
        lm_evals = type(task).doc_iterator  # the class's, reading the dataset
        for kwargs in ({}, {"limit": 7}, {"samples": list(range(25, 50))}, {"samples": [3, 9, 60]},
                       {"limit": 10, "rank": 1, "world_size": 3}, {"samples": list(range(30)), "rank": 2, "world_size": 4}):
            assert list(task.doc_iterator(**kwargs)) == list(lm_evals(task, **kwargs)), kwargs


def test_in_place_weight_changes_are_re_evaluated(tiny_zoo, digits_evaluator):
    model = _model(tiny_zoo, "base")
    before = digits_evaluator.evaluate(model).metrics()
    expert = _model(tiny_zoo, "expert_digits").state_dict()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(expert[name])
    after = digits_evaluator.evaluate(model).metrics()
    assert after != before
    assert after == digits_evaluator.evaluate(_model(tiny_zoo, "expert_digits")).metrics()


def test_split_limit_and_weights(tokenizer, tiny_zoo):
    ev = HarnessEvaluator(["toy"], tokenizer, split="validation", limit=7, weights={"toy_cipher": 2, "toy_reverse": 1})
    assert ev.sizes == {"toy_cipher": 7, "toy_reverse": 7, "toy_digits": 7}
    assert ev.weights == {"toy_cipher": 2.0, "toy_reverse": 1.0}
    result = ev.evaluate(_model(tiny_zoo, "multitask"))
    s = result.scores
    assert all(x.n == 7 for x in s.values())
    assert result.fitness == pytest.approx((2 * s["toy_cipher"].value + s["toy_reverse"].value) / 3)
    group = HarnessEvaluator(["toy"], tokenizer, weights={"toy": 3.0})
    assert group.weights == {"toy_cipher": 1.0, "toy_reverse": 1.0, "toy_digits": 1.0}


def test_evaluation_is_quiet(tiny_zoo, digits_evaluator, capfd):
    model = _model(tiny_zoo, "base")
    capfd.readouterr()  # transformers' loading bar is not ours
    digits_evaluator.evaluate(model)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_a_model_with_any_non_finite_weight_is_a_failed_result(digits_evaluator, tiny_zoo, tokenizer):
    """lm-eval's argmax over NaN log-likelihoods would still give an accuracy: the adapter must refuse it, also when
    only the embedding row of one digit is NaN (it reaches only the documents with that digit)."""
    model = _model(tiny_zoo, "base")
    assert digits_evaluator.evaluate(model).ok
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids("5")].fill_(math.nan)
    result = digits_evaluator.evaluate(model)
    assert result.status == "failed" and math.isnan(result.fitness) and "non-finite weights" in result.error


def test_table_and_json(tiny_zoo, tmp_path):
    out = tmp_path / "scores.json"
    report = evaluate_targets([str(tiny_zoo / "base"), str(tiny_zoo / "expert_digits")], ["toy_digits"],
                              split="test", limit=20, output_json=out, echo=None)
    saved = json.loads(out.read_text())
    assert saved["split"] == "test" and saved["tasks"] == ["toy_digits"] and saved["chance"] == {"toy_digits": 0.25}
    assert [r["target"] for r in saved["results"]] == [str(tiny_zoo / "base"), str(tiny_zoo / "expert_digits")]
    assert all(r["scores"]["toy_digits"]["n"] == 20 for r in saved["results"])
    rows = {line.split()[0]: line.split()[1:] for line in format_table(report).splitlines()[1:] if line.strip()}
    for result in report["results"]:
        value = result["scores"]["toy_digits"]["value"]
        assert rows[Path(result["target"]).name][0] == f"{value:.2f}"
    base, expert = (r["scores"]["toy_digits"]["value"] for r in report["results"])
    assert expert > base + 0.3  # the digits expert knows the task
    assert rows["chance"][0] == "0.25"
    assert format_table(report, markdown=True).startswith("| model | toy_digits | mean |")
    assert format_table(report).splitlines()[-1].endswith("95% Wilson intervals (mean: normal approximation, Agresti-Coull variances)")


def test_eval_cli_batch_size_and_dtype(tiny_zoo, tmp_path):
    """`evomerge eval --batch-size N --dtype D` scores what a one-document batch in float64 scores (the same documents
    and per-document scores); a bad value is one line naming the option, exit 2, before any model is loaded."""
    from click.testing import CliRunner

    from evomerge.cli import main

    def scores(*options):
        out = tmp_path / f"scores{len(list(tmp_path.iterdir()))}.json"
        result = CliRunner().invoke(main, ["eval", str(tiny_zoo / "expert_digits"), "--tasks", "toy_digits,toy_gen",
                                           "--limit", "12", "--output-json", str(out), *options])
        assert result.exit_code == 0, result.output
        (saved,) = json.loads(out.read_text())["results"]
        return {task: (s["value"], s["n"]) for task, s in saved["scores"].items()}

    reference = scores("--batch-size", "1", "--dtype", "float64")
    assert scores("--batch-size", "5") == reference and scores("--batch-size", "auto") == reference
    assert reference["toy_digits"][0] > 0.5  # the digits expert on its own task: these are real scores
    for option, value, message in [("--batch-size", "0", "--batch-size: must be a whole number >= 1 or auto, got '0'"),
                                   ("--dtype", "int8", "--dtype: unknown dtype 'int8'"),
                                   ("--device", "gpu", "--device: not a device: 'gpu'"),
                                   ("--device", "cuda", "--device: device 'cuda' is not available on this machine")]:
        if value == "cuda" and torch.cuda.is_available():
            continue
        result = CliRunner().invoke(main, ["eval", str(tiny_zoo / "base"), "--tasks", "toy_digits", option, value])
        assert result.exit_code == 2 and result.output.startswith(f"error: {message}"), result.output
        assert len(result.output.splitlines()) == 1


IDENTITY = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[{{ m['content'] }}] {% endif %}" \
    "{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"


def test_apply_chat_template_scores_the_prompts_the_template_makes(tiny_zoo, tmp_path):
    """A template that writes the prompt as it is (after <s>) scores every document as the plain prompt does; one that
    prepends text, or a system message it renders, changes what is scored. Through `evomerge eval` too."""
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from evomerge.cli import main
    from tiny_models import with_chat_template

    model = load_live_model(tiny_zoo / "expert_digits")
    tasks = ["toy_digits", "toy_digits_gen"]
    plain = HarnessEvaluator(tasks, AutoTokenizer.from_pretrained(tiny_zoo / "expert_digits"), split="search").evaluate(model)
    assert plain.scores["toy_digits"].value > 0.5  # real scores to change
    for template, system, same in [(IDENTITY, None, True), ("{{ bos_token }}inc 000=111\n" + IDENTITY, None, False),
                                   (IDENTITY, "upc abc=ABC", False)]:
        tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / "expert_digits")
        tokenizer.chat_template = template
        result = HarnessEvaluator(tasks, tokenizer, split="search", apply_chat_template=True,
                                  system_instruction=system).evaluate(model)
        assert result.ok, result.error
        equal = [np.array_equal(result.docs[t], plain.docs[t]) for t in tasks]
        assert all(equal) if same else not all(equal), (template, system)

    def cli(target, *options):
        out = tmp_path / f"scores{len(list(tmp_path.glob('scores*')))}.json"
        result = CliRunner().invoke(main, ["eval", str(target), "--tasks", "toy_digits", "--split", "search",
                                           "--output-json", str(out), *options])
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())["results"][0]["scores"]["toy_digits"]["value"]

    templated = with_chat_template(tiny_zoo / "expert_digits", tmp_path / "templated", IDENTITY)
    assert cli(templated, "--apply-chat-template") == cli(templated) == plain.scores["toy_digits"].value
    assert cli(templated, "--apply-chat-template", "--system-instruction", "upc abc=ABC") != cli(templated)

    # a search's evaluator takes both from evaluation: the scores of the system message above
    from evomerge.run.config import EvaluationConfig
    from evomerge.run.evaluation import SplitEvaluator

    config = EvaluationConfig(tasks=tasks, apply_chat_template=True, system_instruction="upc abc=ABC")
    searched = SplitEvaluator(config, str(templated)).evaluate(model, "search")
    assert searched.fitness == result.fitness != plain.fitness


def test_few_shot_examples_are_turns_of_the_chat_as_lm_eval_gives_them(tiny_zoo, tmp_path):
    """With a chat template the few-shot examples are turns of the conversation by default, as lm-eval's command line
    and simple_evaluate give them (its `evaluate`, which the harness calls, puts them in one user message), drawn with
    its seed (its sampler's own generator is unseeded: each evaluation drew other examples): the scores equal lm-eval's
    own on the same model and documents, both ways, the two ways score differently here, and every evaluation is
    shown the same examples. Through `evomerge eval` too; without a chat template the option is refused."""
    from click.testing import CliRunner
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from evomerge.cli import main
    from tiny_models import with_chat_template

    tasks = digits_task_dir(tmp_path, "shots", "num_fewshot: 1\nfewshot_split: search\n", "_toy_choice_template")
    model = load_live_model(tiny_zoo / "expert_digits")
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / "expert_digits")
    tokenizer.chat_template = IDENTITY  # as turns: <s>q1a1q; in one message: <s>q1a1\n\nq

    def ours(**chat):
        return HarnessEvaluator(["shots"], tokenizer, split="test", limit=60, task_dirs=[str(tasks)],
                                apply_chat_template=True, **chat).evaluate(model)

    def lm_eval_own(**chat):
        results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer), tasks=["shots"], limit=60,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                  apply_chat_template=True, bootstrap_iters=0, **chat)
        return results["results"]["shots"]["acc,none"]

    default, turns, one = ours(), ours(fewshot_as_multiturn=True), ours(fewshot_as_multiturn=False)
    assert default.scores["shots"].value == turns.scores["shots"].value == lm_eval_own()
    evaluator = HarnessEvaluator(["shots"], tokenizer, split="test", limit=60, task_dirs=[str(tasks)],
                                 apply_chat_template=True)  # every candidate is shown the same examples
    assert all(np.array_equal(evaluator.evaluate(model).docs["shots"], turns.docs["shots"]) for _ in range(3))
    assert one.scores["shots"].value == lm_eval_own(fewshot_as_multiturn=False)
    assert not np.array_equal(turns.docs["shots"], one.docs["shots"])

    templated = with_chat_template(tiny_zoo / "expert_digits", tmp_path / "templated", IDENTITY)
    for options, expected in [((), turns), (("--no-fewshot-as-multiturn",), one)]:
        out = tmp_path / f"scores{len(options)}.json"
        result = CliRunner().invoke(main, ["eval", str(templated), "--tasks", "shots", "--task-dir", str(tasks),
                                           "--limit", "60", "--apply-chat-template", *options,
                                           "--output-json", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["results"][0]["scores"]["shots"]["value"] == expected.scores["shots"].value
    result = CliRunner().invoke(main, ["eval", str(templated), "--tasks", "shots", "--task-dir", str(tasks),
                                       "--fewshot-as-multiturn"])
    assert result.exit_code == 2 and result.output.startswith("error: --fewshot-as-multiturn: fewshot_as_multiturn "
                                                              "needs apply_chat_template"), result.output


def test_eval_cli_scores_a_hub_id_as_its_downloaded_snapshot(tiny_zoo, tmp_path, monkeypatch):
    """`evomerge eval org/name` scores the hub model (as search and merge take hub ids); the hub here is a stand-in
    that serves the zoo's digits expert, and the scores equal those of the dir itself."""
    import huggingface_hub
    from click.testing import CliRunner

    from evomerge.cli import main

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **_: asked.append(repo_id) or str(tiny_zoo / "expert_digits"))
    outputs = {}
    for target in ("someone/expert-digits", str(tiny_zoo / "expert_digits")):
        out = tmp_path / f"{len(outputs)}.json"
        result = CliRunner().invoke(main, ["eval", target, "--tasks", "toy_digits", "--limit", "12",
                                           "--output-json", str(out)])
        assert result.exit_code == 0, result.output
        (saved,) = json.loads(out.read_text())["results"]
        outputs[target] = saved["scores"]["toy_digits"]["value"]
    assert asked[0] == "someone/expert-digits" and len(set(outputs.values())) == 1 and outputs[target] > 0.5


def test_table_rows_markdown_file_and_labels(tmp_path):
    score = lambda v: {"value": v, "n": 100, "proportion": True, "ci95": list(wilson_ci(v, 100))}  # noqa: E731
    report = {"split": "test", "tasks": ["t_a", "t_b"], "n": {"t_a": 100, "t_b": 100}, "chance": {"t_a": 0.25, "t_b": 0.0},
              "results": [{"target": "runs/ps/best/recipe.yaml", "status": "ok", "fitness": 0.75,
                           "scores": {"t_a": score(0.5), "t_b": score(1.0)}},
                          {"target": "experiments/baselines/ties.yaml", "status": "ok", "fitness": 0.5,
                           "scores": {"t_a": score(0.5), "t_b": score(0.5)}}]}
    rows = format_table(report, markdown=True).splitlines()
    assert rows[2] == "| ps (winner) | 0.50 [0.40,0.60] | 1.00 [0.96,1.00] | 0.750 [0.70,0.80] |"
    assert rows[3].startswith("| ties | 0.50 [0.40,0.60] |")


# --- bad input: one line, naming the task or file ---------------------------------------------------------------

def test_unknown_task(tokenizer):
    with pytest.raises(EvomergeError, match=r"unknown task 'toy_cipher_gne'.*did you mean 'toy_cipher_gen'"):
        HarnessEvaluator(["toy_cipher_gne"], tokenizer)


def _task_dir(tmp_path: Path, skill: str, rows: dict[str, int] | None) -> Path:
    """A user task dir holding a copy of the toy loader, one task over `skill`, and data files with `rows` lines."""
    d = tmp_path / "tasks"
    (d / "data").mkdir(parents=True)
    shutil.copy(TOY / "toy_data.py", d)
    shutil.copy(TOY / "_toy_choice_template", d)
    (d / "mine.yaml").write_text(f"include: _toy_choice_template\ntask: mine\ndataset_kwargs:\n  skill: {skill}\n")
    line = (TOY / "data" / "digits_test.jsonl").read_text().splitlines()[0] + "\n"
    for split, n in (rows or {}).items():
        (d / "data" / f"{skill}_{split}.jsonl").write_text(line * n)
    return d


def test_a_task_file_that_is_not_yaml_is_named(tmp_path, tokenizer):
    """lm-eval skips a YAML it cannot parse without a word: the task it held is 'unknown'; the error names the file.
    The toy loader's `!function` tags and includes in the same dir parse."""
    d = _task_dir(tmp_path, "digits", rows={"search": 2, "validation": 2, "test": 2})
    (d / "broken.yaml").write_text("task: broken\ndoc_to_text: [prompt\n")
    with pytest.raises(EvomergeError, match=rf"^{d / 'broken.yaml'}: tasks: unknown task 'broken', and lm-eval skipped "
                                            r"this file, which is not valid YAML \(.*, line 3\)$"):
        HarnessEvaluator(["broken"], tokenizer, task_dirs=[str(d)])
    HarnessEvaluator(["mine"], tokenizer, task_dirs=[str(d)], split="search")  # the other tasks still load


def test_missing_data_file(tmp_path, tokenizer):
    d = _task_dir(tmp_path, "nothing", rows=None)
    with pytest.raises(EvomergeError, match=r"mine\.yaml.*data file missing: .*nothing_search\.jsonl"):
        HarnessEvaluator(["mine"], tokenizer, task_dirs=[str(d)])


def test_a_missing_json_data_file_names_the_task_file_not_its_group(tmp_path, tokenizer, monkeypatch):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "mine.yaml").write_text("task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: data/mine.jsonl}\n"
                                 "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\n"
                                 "metric_list: [{metric: exact_match}]\n")
    (d / "group.yaml").write_text("group: mine_group\ntask: [mine]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EvomergeError, match=rf"^{d / 'mine.yaml'}: tasks: data file missing: .*{tmp_path / 'data'}"
                                            r"/mine.jsonl.* \(relative data_files are read from the working directory\)"):
        HarnessEvaluator(["mine_group"], tokenizer, task_dirs=[str(d)])


def test_empty_and_unknown_split(tmp_path, tokenizer):
    d = _task_dir(tmp_path, "few", rows={"search": 0, "validation": 3, "test": 3})
    with pytest.raises(EvomergeError, match="task mine: split 'search' is empty"):
        HarnessEvaluator(["mine"], tokenizer, task_dirs=[str(d)], split="search")
    with pytest.raises(EvomergeError, match=r"task mine has no split 'train' \(available: search, validation, test\)"):
        HarnessEvaluator(["mine"], tokenizer, task_dirs=[str(d)], split="train")
    assert HarnessEvaluator(["mine"], tokenizer, task_dirs=[str(d)], split="test").sizes == {"mine": 3}


def test_missing_task_dir(tokenizer, tmp_path):
    with pytest.raises(EvomergeError, match="task dir does not exist"):
        HarnessEvaluator(["toy"], tokenizer, task_dirs=[str(tmp_path / "nope")])


def test_model_without_tokenizer(tiny_zoo, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_zoo / "base" / f, bare / f)
    with pytest.raises(EvomergeError, match=r"bare: model has no tokenizer"):
        load_model_dir(bare)
    with pytest.raises(EvomergeError, match="not a model directory"):
        load_model_dir(tmp_path)
    shutil.copy(tiny_zoo / "base" / "tokenizer.json", bare / "tokenizer.json")
    (bare / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(EvomergeError, match=r"bare/tokenizer_config.json: unreadable \(Expecting"):
        load_model_dir(bare)
    shutil.copy(tiny_zoo / "base" / "tokenizer_config.json", bare / "tokenizer_config.json")
    weights = (bare / "model.safetensors").read_bytes()
    (bare / "model.safetensors").write_bytes(weights[:-1])  # a download cut short by one byte
    with pytest.raises(EvomergeError, match=r"bare: unreadable safetensors file model.safetensors \(truncated: "):
        load_model_dir(bare)
    shutil.copy(tiny_zoo / "base" / "model.safetensors", bare / "model.safetensors")
    for name, text, what in (("tokenizer.json", "{}", "tokenizer"), ("generation_config.json", "[]", "generation_config"),
                             ("config.json", '{"model_type": "nope"}', "config")):
        (bare / name).write_text(text)  # files transformers reads, broken: one line each, before any scoring
        with pytest.raises(EvomergeError, match=rf"bare: transformers cannot load its {what}"):
            load_model_dir(bare)
        shutil.copy(tiny_zoo / "base" / name, bare / name)
    load_model_dir(bare)


def test_a_tokenizer_that_drops_spaces_is_warned_about_when_the_search_evaluator_is_built(tiny_zoo, tmp_path, capsys):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    from evomerge.evaluate.round_trip import round_trip_problems
    from evomerge.run.config import EvaluationConfig
    from evomerge.run.evaluation import SplitEvaluator

    spaceless = tmp_path / "spaceless"
    shutil.copytree(tiny_zoo / "base", spaceless)
    tok = AutoTokenizer.from_pretrained(spaceless)
    tok.backend_tokenizer.normalizer = normalizers.Replace(" ", "")
    tok.save_pretrained(spaceless)
    config = EvaluationConfig(tasks=["toy_digits", "toy_cipher"], limit=2)
    for model, expected in ((tiny_zoo / "base", []), (spaceless, ["toy_cipher", "toy_digits"])):
        evaluator = SplitEvaluator(config, str(model))
        assert evaluator.evaluate(_model(tiny_zoo, "base"), "search").status == "ok"
        assert evaluator.evaluate(_model(tiny_zoo, "base"), "validation").status == "ok"  # checked once, on search
        lines = capsys.readouterr().err.splitlines()
        warned = sorted(line.split("task ")[1].split(":")[0] for line in lines if line.startswith("warning: "))
        assert warned == expected, lines
    [problem, _] = round_trip_problems(tok, evaluator.by_split["search"].tasks)
    assert problem == ("task toy_digits: the tokenizer does not give its prompts back ('inc 173=' -> 'inc173='); scores "
                       "will mean little: check the model's tokenizer files and tokenizer_class")


PPL_TEXTS = ["the cat sat on the mat", "a dog ran", "one two three four five", "zip zap"]


def perplexity_task_dir(root: Path) -> Path:
    """A user task dir: word perplexity (lm-eval's loglikelihood_rolling) of local texts, the same on every split."""
    d = root / "ppl_tasks"
    d.mkdir(parents=True, exist_ok=True)
    (d / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in PPL_TEXTS))
    files = {split: str(d / "texts.jsonl") for split in ("search", "validation", "test")}
    (d / "texts_ppl.yaml").write_text(json.dumps({
        "task": "texts_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test",
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]}))
    return d


def test_a_perplexity_task_equals_an_independent_computation_and_lowers_the_fitness(tmp_path):
    """Word perplexity exp(-sum_i ll_i / sum_i words_i), ll_i the log-likelihood of text i after the BOS token, computed
    here by one forward pass per text; each document scores its own exp(-ll_i / words_i); the fitness is -perplexity."""
    import re

    import numpy as np
    from transformers import AutoTokenizer

    from tiny_models import build_tiny

    path = build_tiny("llama", tmp_path / "model", hidden=32, dtype=torch.float64)
    tokenizer, model = AutoTokenizer.from_pretrained(path), load_live_model(path, dtype=torch.float64)
    evaluator = HarnessEvaluator(["texts_ppl"], tokenizer, task_dirs=[str(perplexity_task_dir(tmp_path))], split="search")
    result = evaluator.evaluate(model)
    ll, words = [], []
    for text in PPL_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([[tokenizer.bos_token_id, *ids]])).logits[0, :-1], dim=-1)
        ll.append(logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item())
        words.append(len(re.split(r"\s+", text)))
    score = result.scores["texts_ppl"]
    assert score.metric == "word_perplexity" and not score.higher_is_better and score.n == len(PPL_TEXTS)
    assert score.value == pytest.approx(math.exp(-sum(ll) / sum(words)), rel=1e-9)
    np.testing.assert_allclose(result.docs["texts_ppl"], np.exp(-np.array(ll) / np.array(words)), rtol=1e-9)
    assert result.ok and result.fitness == -score.value
    bits = HarnessEvaluator(["texts_ppl"], tokenizer, task_dirs=[str(perplexity_task_dir(tmp_path))], split="search",
                            metrics={"texts_ppl": "bits_per_byte"}).evaluate(model)  # the task's second metric
    size = np.array([len(text.encode()) for text in PPL_TEXTS])
    assert bits.scores["texts_ppl"].metric == "bits_per_byte"
    assert bits.scores["texts_ppl"].value == pytest.approx(-sum(ll) / size.sum() / math.log(2), rel=1e-9)
    np.testing.assert_allclose(bits.docs["texts_ppl"], -np.array(ll) / size / math.log(2), rtol=1e-9)
    report = {"split": "search", "tasks": ["texts_ppl"], "n": evaluator.sizes, "chance": evaluator.chance,
              "results": [{"target": "m", **result.to_dict()}]}
    table = format_table(report).splitlines()
    assert table[0].split() == ["model", "texts_ppl", "fitness"]
    assert "Wilson for scores of 0 or 1, +- 1.96 standard errors for others" in table[-1]  # not "Wilson intervals"
