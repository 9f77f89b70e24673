"""`evomerge search` checks everything a search needs before it makes a run dir: each problem is one line naming the
experiment file and the key, exit code 2, and nothing written; a worker's preflight stops a search whose every trial
would fail, and a run that starts failing stops after `budget.max_consecutive_failures` trials in a row."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.run.ledger import Ledger

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_tiny  # noqa: E402

TOY = Path(__file__).resolve().parents[1] / "evals" / "toy"


def experiment(zoo: Path, **sections) -> dict:
    doc = {"name": "checks", "seed": 0,
           "space": {"kind": "ps", "method": "ties", "base_model": str(zoo / "base"),
                     "models": [str(zoo / "expert_cipher"), str(zoo / "expert_reverse")],
                     "search": ["weight", "density"], "layer_groups": 1,
                     "bounds": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}},
           "optimizer": {"name": "random"}, "budget": {"trials": 2},
           "evaluation": {"tasks": ["toy_cipher_gen", "toy_reverse_gen"], "limit": 2}, "validation": {"top_k": 1}}
    for section, value in sections.items():
        doc[section] = {**doc.get(section, {}), **value} if isinstance(value, dict) else value
    return doc


def search(tmp_path: Path, doc: dict, *extra):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    return CliRunner().invoke(main, ["search", str(path), "--run-dir", str(tmp_path / "run"), *extra])


def assert_refused(result, tmp_path: Path, key: str, message: str) -> None:
    """Exit 2, one line `error: <experiment file>: <key>: <message...>`, and no run dir."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'exp.yaml'}: {key}: "), result.output
    assert message in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """Models the tiny zoo's experts cannot merge with: another layer count, another hidden size."""
    root = tmp_path_factory.mktemp("odd")
    return {"three_layers": build_tiny("llama", root / "three_layers", num_layers=3, hidden=32),
            "wider": build_tiny("llama", root / "wider", num_layers=2, hidden=48)}


def test_a_missing_model_dir(tiny_zoo, tmp_path):
    doc = experiment(tiny_zoo, space={"models": [str(tiny_zoo / "expert_cipher"), str(tmp_path / "nope")]})
    assert_refused(search(tmp_path, doc), tmp_path, "space.models", "no such model directory")


def test_more_layer_groups_than_layers(tiny_zoo, tmp_path):
    assert_refused(search(tmp_path, experiment(tiny_zoo, space={"layer_groups": 3})), tmp_path, "space.layer_groups",
                   "3 groups for 2 layers")


def test_density_bounds_outside_the_unit_interval(tiny_zoo, tmp_path):
    doc = experiment(tiny_zoo, space={"bounds": {"weight": [0.0, 1.0], "density": [0.1, 1.5]}})
    assert_refused(search(tmp_path, doc), tmp_path, "space.bounds.density", "1.5")


def test_models_of_different_layer_counts(tiny_zoo, odd_models, tmp_path):
    doc = experiment(tiny_zoo, space={"models": [str(tiny_zoo / "expert_cipher"), str(odd_models["three_layers"])]})
    assert_refused(search(tmp_path, doc), tmp_path, "space.models", "one layer count")


def test_tensor_shapes_that_differ(tiny_zoo, odd_models, tmp_path):
    doc = experiment(tiny_zoo, space={"models": [str(tiny_zoo / "expert_cipher"), str(odd_models["wider"])]})
    assert_refused(search(tmp_path, doc), tmp_path, "space.models", "has shape")


def test_a_layer_path_over_models_that_differ(tiny_zoo, odd_models, tmp_path):
    doc = dfs_experiment(tiny_zoo, [tiny_zoo / "expert_cipher", odd_models["wider"]])
    assert_refused(search(tmp_path, doc), tmp_path, "space.models", "has shape")


def dfs_experiment(tiny_zoo, models: list) -> dict:
    doc = experiment(tiny_zoo, space={"kind": "dfs", "models": [str(m) for m in models], "repeats": 1, "scale": "slot"})
    for key in ("method", "base_model", "search", "layer_groups", "bounds"):
        del doc["space"][key]
    return doc


def test_a_layer_path_longer_than_any_model_could_be(tiny_zoo, tmp_path):
    """A mistyped repeats (1e9) is refused before the space lays out its slots (it once took every GiB there was)."""
    doc = dfs_experiment(tiny_zoo, [tiny_zoo / "expert_cipher", tiny_zoo / "expert_reverse"])
    doc["space"]["repeats"] = 10**9
    assert_refused(search(tmp_path, doc), tmp_path, "space.repeats",
                   "1000000000 repeats of 4 layers make 4,000,000,000 slots; at most 65,536")


@pytest.mark.parametrize("kind", [[], {"a": 1}, 3])
def test_a_space_kind_that_is_not_a_name(tiny_zoo, tmp_path, kind):
    assert_refused(search(tmp_path, experiment(tiny_zoo, space={"kind": kind})), tmp_path, "space.kind",
                   f"unknown space kind {kind!r}; available: dfs, ps")


def test_a_layer_path_search_over_a_family_whose_layers_stay_in_place(tiny_zoo, tmp_path):
    """Jamba's config spells its layers' kinds by periods: a search that moves its layers is refused before any trial."""
    jamba = build_tiny("jamba", tmp_path / "jamba", num_layers=2, hidden=32)
    assert_refused(search(tmp_path, dfs_experiment(tiny_zoo, [jamba])), tmp_path, "space.kind",
                   "a data-flow search moves and repeats layers, which jamba models cannot (its config gives each "
                   "layer's kind by periods and offsets")


def test_a_layer_path_search_over_models_whose_config_counts_their_dense_layers(tiny_zoo, tmp_path):
    """GLM-4.5 and DeepSeek-V3 configs count their first dense-MLP layers (first_k_dense_replace): a search's paths
    would put one after a layer of experts, which no written model of theirs could describe; GLM-5's would start with a
    layer that reuses the sparse-attention selection of the one before it. Without dense layers, and where the config
    lists each layer's kind (GLM-4.7-Flash), it runs."""
    glm = build_tiny("glm4_moe", tmp_path / "glm", num_layers=2, hidden=32)
    assert_refused(search(tmp_path, dfs_experiment(tiny_zoo, [glm])), tmp_path, "space.kind",
                   "a data-flow search would try paths no written glm4_moe model can describe: glm4_moe cannot have a "
                   "dense-MLP layer after a mixture-of-experts one (its config counts its first dense layers, "
                   "first_k_dense_replace); this writes dense layer 0 as layer 1")
    glm5 = build_tiny("glm_moe_dsa", tmp_path / "glm5", num_layers=2, hidden=32, first_k_dense_replace=0)  # indexer
    assert_refused(search(tmp_path, dfs_experiment(tiny_zoo, [glm5])), tmp_path, "space.kind",  # kinds: full, shared
                   "a data-flow search would try paths no written glm_moe_dsa model can describe: glm_moe_dsa cannot "
                   "start with a layer that reuses the sparse-attention selection of the layer before it")
    for family, dense in (("deepseek_v3", 0), ("glm4_moe_lite", 1)):
        model = build_tiny(family, tmp_path / family, num_layers=2, hidden=32, first_k_dense_replace=dense)
        (tmp_path / f"run_{family}").mkdir()
        result = search(tmp_path / f"run_{family}", dfs_experiment(tiny_zoo, [model]))
        assert result.exit_code == 0 and "2 trials, 0 failed" in result.output, result.output


def test_a_layer_path_search_warns_of_a_model_whose_vocabulary_differs(tiny_zoo, tmp_path):
    """Every path is scored with the first model's tokenizer, but a winner ships its first slot's source's: a model
    whose vocabulary maps tokens to other ids is named (on stderr and in the log); one whose tokenizer.json is only
    written differently is not."""
    import shutil

    swapped, reformatted = tmp_path / "swapped", tmp_path / "reformatted"
    for copy in (swapped, reformatted):
        shutil.copytree(tiny_zoo / "expert_reverse", copy)
    tokenizer = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (swapped / "tokenizer.json").write_text(json.dumps(tokenizer))
    (reformatted / "tokenizer.json").write_text(json.dumps(json.loads((reformatted / "tokenizer.json").read_text()),
                                                           indent=4, sort_keys=True))
    doc = dfs_experiment(tiny_zoo, [tiny_zoo / "expert_cipher", reformatted, swapped])
    doc["budget"]["trials"] = 1
    result = search(tmp_path, doc)
    assert result.exit_code == 0, result.output
    warning = (f"space.models: the vocabulary of {swapped} differs from that of {tiny_zoo / 'expert_cipher'}, whose "
               f"tokenizer the search scores every layer path with; a winner whose path starts in {swapped} ships "
               f"{swapped}'s tokenizer")
    assert f"warning: {warning}" in result.output and warning in (tmp_path / "run/logs/search.log").read_text()
    assert str(reformatted) not in result.output


def test_hidden_state_scales_the_written_model_could_not_hold(tiny_zoo, tmp_path):
    gemma2 = build_tiny("gemma2", tmp_path / "gemma2", num_layers=2, hidden=32)
    assert_refused(search(tmp_path, dfs_experiment(tiny_zoo, [gemma2])), tmp_path, "space.scale",
                   "hidden-state scales cannot be folded into gemma2 weights")


@pytest.mark.parametrize("family, example", [("gpt2", "transformer.h.0.attn.c_attn.bias"),
                                             ("exaone", "transformer.h.0.attn.attention.k_proj.weight")])
def test_attention_and_mlp_genes_for_a_family_whose_attention_is_not_named_self_attn(tiny_zoo, tmp_path, family, example):
    """(EXAONE 3's live model names it self_attn, but mergekit's filters see its checkpoint's names.)"""
    from tiny_models import make_variants

    base = build_tiny(family, tmp_path / family, num_layers=2, hidden=32)
    doc = experiment(tiny_zoo, space={"base_model": str(base), "models": [str(m) for m in make_variants(base, tmp_path)],
                                      "split": "attn_mlp"})
    assert_refused(search(tmp_path, doc), tmp_path, "space.split", "split: attn_mlp finds attention tensors by the name "
                   f"'self_attn'; {family} names them otherwise ({example})")


@pytest.mark.parametrize("split, message", [
    (["q_prj"], "filter 'q_prj' matches no tensor of {base} (e.g. "),
    (["self_attn", "q_proj"], "every tensor filter 'q_proj' matches is taken by a filter before it (the first that "
                              "matches wins)"),
])
def test_split_filters_whose_genes_would_go_unused(tiny_zoo, tmp_path, split, message):
    doc = experiment(tiny_zoo, space={"split": split})
    assert_refused(search(tmp_path, doc), tmp_path, "space.split", message.format(base=tiny_zoo / "base"))


def test_weights_of_a_task_not_evaluated(tiny_zoo, tmp_path):
    doc = experiment(tiny_zoo, evaluation={"weights": {"toy_digits_gen": 2.0}})
    assert_refused(search(tmp_path, doc), tmp_path, "evaluation.weights", "'toy_digits_gen'")


def test_a_search_split_the_tasks_lack(tiny_zoo, tmp_path):
    doc = experiment(tiny_zoo, evaluation={"split": "train"})
    assert_refused(search(tmp_path, doc), tmp_path, "evaluation.split", "has no split 'train'")


def test_a_held_out_split_a_task_lacks(tiny_zoo, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "two_splits.py").write_text(textwrap.dedent("""
        import datasets

        def load(**_):
            rows = [{"prompt": "sub abc= ", "answer": "x"}]
            return {"search": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
    """))
    (tasks / "mine.yaml").write_text((TOY / "_toy_gen_template").read_text().replace("toy_data.load", "two_splits.load")
                                     + "task: mine\n")
    doc = experiment(tiny_zoo, evaluation={"tasks": ["mine"], "task_dirs": [str(tasks)]})
    assert_refused(search(tmp_path, doc), tmp_path, "evaluation.tasks", "task mine has no split 'validation'")


def cipher_task_dir(tasks: Path) -> Path:
    """A new task dir holding the toy cipher data and its loader (toy_data.py), for a task YAML of the test's own."""
    tasks.mkdir()
    (tasks / "toy_data.py").write_text((TOY / "toy_data.py").read_text())
    (tasks / "data").mkdir()
    for split in ("search", "validation", "test"):
        (tasks / "data" / f"cipher_{split}.jsonl").write_text((TOY / "data" / f"cipher_{split}.jsonl").read_text())
    return tasks


def few_shot_task_dir(root: Path, lines: str) -> Path:
    """The toy cipher task with few-shot examples, `lines` saying where they come from."""
    tasks = cipher_task_dir(root / "fewshot_tasks")
    (tasks / "shots.yaml").write_text((TOY / "_toy_gen_template").read_text() + "task: shots\ndataset_kwargs:\n"
                                      "  skill: cipher\nnum_fewshot: 2\n" + lines)
    return tasks


@pytest.mark.parametrize("lines, split", [("fewshot_split: test\n", "test"),
                                          ("validation_split: validation\n", "validation")])  # lm-eval's fallback
def test_few_shot_examples_from_a_held_out_split(tiny_zoo, tmp_path, lines, split):
    """Few-shot examples from validation or test would show every candidate documents that pick or score the winner."""
    doc = experiment(tiny_zoo, evaluation={"tasks": ["shots"], "task_dirs": [str(few_shot_task_dir(tmp_path, lines))]})
    assert_refused(search(tmp_path, doc), tmp_path, "evaluation.tasks",
                   f"task shots draws its 2 few-shot examples from the '{split}' split")


def test_few_shot_examples_from_the_search_split_are_fine(tiny_zoo, tmp_path):
    from evomerge.run.config import EvaluationConfig
    from evomerge.run.evaluation import check_tasks

    tasks = few_shot_task_dir(tmp_path, "fewshot_split: search\nvalidation_split: validation\n")
    check_tasks(EvaluationConfig(tasks=["shots"], task_dirs=[str(tasks)]), "exp.yaml")


def test_a_chat_template_the_scoring_tokenizer_lacks(tiny_zoo, tmp_path):
    doc = experiment(tiny_zoo, evaluation={"apply_chat_template": True})
    assert_refused(search(tmp_path, doc), tmp_path, "evaluation.apply_chat_template",
                   f"the tokenizer of {tiny_zoo / 'base'}, which the search scores with and its winners ship, has no chat")


def test_few_shot_turns_without_a_chat_template(tiny_zoo, tmp_path):
    doc = experiment(tiny_zoo, evaluation={"fewshot_as_multiturn": True})
    assert_refused(search(tmp_path, doc), tmp_path, "evaluation.fewshot_as_multiturn",
                   "fewshot_as_multiturn needs apply_chat_template")


def test_a_scoring_tokenizer_whose_config_does_not_read(tiny_zoo, tmp_path):
    """Every worker would fail to load it: refused before the run dir exists, naming the file."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_zoo / "base", base)
    (base / "tokenizer_config.json").write_text('{"model_max_length": ')
    doc = experiment(tiny_zoo, space={"base_model": str(base)})
    assert_refused(search(tmp_path, doc), tmp_path, str(base / "tokenizer_config.json"), "unreadable (Expecting value")


def test_weights_cut_short_are_refused_by_search_and_planned_by_plan(tiny_zoo, tmp_path):
    """A safetensors file shorter than its header says (an interrupted download): `search` refuses it before the run
    dir exists; `evomerge plan` reads headers alone, so a header-only file is enough for it (README)."""
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(tiny_zoo / "expert_cipher", cut)
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[:len(weights) // 3])
    doc = experiment(tiny_zoo, space={"models": [str(cut), str(tiny_zoo / "expert_reverse")]})
    assert_refused(search(tmp_path, doc), tmp_path, "space.models",
                   f"{cut}: unreadable safetensors file model.safetensors (truncated: ")
    plan = CliRunner().invoke(main, ["plan", str(tmp_path / "exp.yaml")])
    assert plan.exit_code == 0, plan.output


def test_a_missing_task_dir(tiny_zoo, tmp_path):
    doc = experiment(tiny_zoo, evaluation={"task_dirs": [str(tmp_path / "nope")]})
    assert_refused(search(tmp_path, doc), tmp_path, "evaluation.task_dirs", "task dir does not exist")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks(tiny_zoo, tmp_path):
    assert_refused(search(tmp_path, experiment(tiny_zoo, workers={"device": "cuda"})), tmp_path, "workers.device",
                   "'cuda' is not available")
    assert_refused(search(tmp_path, experiment(tiny_zoo, workers={"device": "gpu"})), tmp_path, "workers.device",
                   "not a device: 'gpu'")


def test_a_ray_address_nothing_answers(tiny_zoo, tmp_path):
    import socket

    with socket.socket() as unused:  # a port that was free a moment ago: nothing listens there
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = search(tmp_path, experiment(tiny_zoo), "--ray-address", f"127.0.0.1:{port}")
    assert_refused(result, tmp_path, "workers.ray_address", f"nothing answers at 127.0.0.1:{port}")


def failing_metric_task_dir(root: Path, broken: str) -> Path:
    """A user task over the toy cipher data whose metric imports a module (`broken` names one that does not exist:
    the package is missing); data loading, as in the up-front checks, is fine."""
    tasks = cipher_task_dir(root / "metric_tasks")
    (tasks / "scoring.py").write_text(textwrap.dedent(f"""
        import importlib

        def process_results(doc, results):
            importlib.import_module({broken!r})  # e.g. a judge's client package
            return {{"exact_match": float(results[0].strip() == doc["answer"])}}
    """))
    (tasks / "judged.yaml").write_text((TOY / "_toy_gen_template").read_text()
                                       + "task: judged\ndataset_kwargs:\n  skill: cipher\n"
                                       + "process_results: !function scoring.process_results\n")
    return tasks


def test_the_preflight_stops_a_search_whose_every_trial_would_fail_and_resume_goes_on_after_the_fix(tiny_zoo, tmp_path):
    tasks = failing_metric_task_dir(tmp_path, broken="a_package_that_is_not_installed")
    doc = experiment(tiny_zoo, evaluation={"tasks": ["judged"], "task_dirs": [str(tasks)]})
    result = search(tmp_path, doc)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: evaluation: scoring the base model on one document per task failed before the "
                           "first trial") and "No module named 'a_package_that_is_not_installed'" in line, line
    run_dir = tmp_path / "run"
    assert (run_dir / "config.yaml").exists() and Ledger(run_dir / "ledger.sqlite").trials("search") == []

    (tasks / "scoring.py").write_text((tasks / "scoring.py").read_text().replace("a_package_that_is_not_installed",
                                                                                 "json"))  # the package is installed
    result = CliRunner().invoke(main, ["resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    trials = Ledger(run_dir / "ledger.sqlite").trials("search")
    assert len(trials) == 2 and all(t.ok for t in trials)


@pytest.mark.parametrize("section, value, key, message", [
    ("evaluation", {"aggregate": "geometric"}, "evaluation.aggregate",
     "the geometric mean takes scores where higher is better; task texts_ppl scores word_perplexity, where lower is"),
    ("optimizer", {"name": "niches"}, "optimizer.name",
     "natural niches shares per-document scores where higher is better; task texts_ppl scores word_perplexity"),
])
def test_a_perplexity_task_where_the_fitness_cannot_take_it(tiny_zoo, tmp_path, section, value, key, message):
    from test_evaluate import perplexity_task_dir

    doc = experiment(tiny_zoo, evaluation={"tasks": ["texts_ppl"], "task_dirs": [str(perplexity_task_dir(tmp_path))]})
    doc[section] = {**doc[section], **value}
    assert_refused(search(tmp_path, doc), tmp_path, key, message)


def test_a_search_on_a_perplexity_task_picks_the_lowest_perplexity(tiny_zoo, tmp_path):
    from test_evaluate import perplexity_task_dir

    doc = experiment(tiny_zoo, evaluation={"tasks": ["texts_ppl"], "task_dirs": [str(perplexity_task_dir(tmp_path))]},
                     budget={"trials": 4})
    result = search(tmp_path, doc)
    assert result.exit_code == 0, result.output
    trials = Ledger(tmp_path / "run" / "ledger.sqlite").trials("search")
    assert len(trials) == 4 and all(t.ok for t in trials)
    perplexities = {t.candidate: t.scores["texts_ppl"]["value"] for t in trials}
    assert all(t.fitness == -perplexities[t.candidate] for t in trials)
    best = json.loads((tmp_path / "run" / "best" / "scores.json").read_text())  # top_k 1: the best search fitness wins
    assert perplexities[best["candidate"]] == min(perplexities.values()) < max(perplexities.values())
    from evomerge.report import write_report

    summary = (write_report(tmp_path / "run") / "summary.md").read_text()  # no "solved" table for perplexities
    assert "Documents the winner solves" not in summary
    assert f"| test | texts_ppl | {best['scores']['test']['texts_ppl']['value']:.3f} |  |  |" in summary  # no CI, chance


def test_a_search_scores_the_metric_evaluation_metrics_names(tiny_zoo, tmp_path):
    """The same search (random proposals ignore the scores) once by the perplexity task's first metric, once by
    `metrics: {texts_ppl: bits_per_byte}`: each candidate's bits per byte is its log word perplexity x words / bytes /
    ln 2, the same log-likelihood over the same texts."""
    import math

    from test_evaluate import PPL_TEXTS, perplexity_task_dir

    tasks, runs = str(perplexity_task_dir(tmp_path)), {}
    for name, metrics in (("words", None), ("bits", {"texts_ppl": "bits_per_byte"})):
        (tmp_path / name).mkdir()
        doc = experiment(tiny_zoo, evaluation={"tasks": ["texts_ppl"], "task_dirs": [tasks], "metrics": metrics,
                                               "limit": None}, budget={"trials": 3})
        assert search(tmp_path / name, doc).exit_code == 0
        runs[name] = Ledger(tmp_path / name / "run" / "ledger.sqlite").trials("search")
    words, size = sum(len(text.split()) for text in PPL_TEXTS), sum(len(text.encode()) for text in PPL_TEXTS)
    for perplexity, bits in zip(runs["words"], runs["bits"]):
        score = bits.scores["texts_ppl"]
        assert score["metric"] == "bits_per_byte" and bits.fitness == -score["value"]
        assert bits.scores["texts_ppl"]["value"] == pytest.approx(
            math.log(perplexity.scores["texts_ppl"]["value"]) * words / size / math.log(2), rel=1e-5)


def test_a_metric_the_task_lacks(tiny_zoo, tmp_path):
    from test_evaluate import filtered_task_dir

    doc = experiment(tiny_zoo, evaluation={"tasks": ["filtered"], "task_dirs": [str(filtered_task_dir(tmp_path))],
                                           "metrics": {"filtered": "exact_match,flexible-extract"}})
    assert_refused(search(tmp_path, doc), tmp_path, "evaluation.metrics.filtered",
                   "task filtered has no filter 'flexible-extract' (its filters: never, whole)")


def start_recipe(tmp_path: Path, zoo: Path, method: str = "ties", models=("expert_cipher", "expert_reverse")) -> Path:
    """A mergekit recipe beside the experiment, its models relative to it, the base listed too (mergekit's habit)."""
    import os

    rel = lambda name: os.path.relpath(zoo / name, tmp_path)  # noqa: E731
    recipe = {"merge_method": method, "base_model": rel("base"), "parameters": {"density": 0.6},
              "models": [{"model": rel("base")}, {"model": rel(models[0]), "parameters": {"weight": 0.3, "density": 1.0}},
                         {"model": rel(models[1]), "parameters": {"weight": 0.8}}]}
    (tmp_path / "start.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "start.yaml"


def test_a_search_starts_at_a_recipe(tiny_zoo, tmp_path):
    """`space.start`: natural niches scores the recipe first (CMA-ES would centre its first population there)."""
    start_recipe(tmp_path, tiny_zoo)
    doc = experiment(tiny_zoo, space={"start": "start.yaml"}, optimizer={"name": "niches"})
    result = search(tmp_path, doc)
    assert result.exit_code == 0, result.output
    first = Ledger(tmp_path / "run" / "ledger.sqlite").trials("search")[0]
    # genes weight[cipher], weight[reverse], density[cipher], density[reverse] on the unit scale of bounds [0, 1] and
    # [0.2, 1]: 0.3, 0.8, (1.0 - 0.2) / 0.8, (0.6 - 0.2) / 0.8
    assert first.genome == pytest.approx([0.3, 0.8, 1.0, 0.5])


@pytest.mark.parametrize("change, message", [
    ({"optimizer": {"name": "random"}}, "optimizer random does not begin at a genome; start is for cmaes, niches"),
    ({"method": "dare_ties"}, "start.yaml has method dare_ties; the space merges by ties"),
    ({"models": ("expert_cipher", "expert_digits")}, "start.yaml merges ["),
])
def test_a_start_recipe_the_space_cannot_begin_at(tiny_zoo, tmp_path, change, message):
    start_recipe(tmp_path, tiny_zoo, **{k: v for k, v in change.items() if k != "optimizer"})
    doc = experiment(tiny_zoo, space={"start": "start.yaml"}, optimizer=change.get("optimizer", {"name": "cmaes"}))
    assert_refused(search(tmp_path, doc), tmp_path, "space.start", message)


def test_a_search_over_a_task_with_one_split_cuts_it(tiny_zoo, tmp_path):
    """`evaluation.cut`: a task with only a test split (as most benchmarks) is searched on its cut search split, its
    winner picked on validation and scored on test; `evomerge eval --cut` scores the same test documents. Without the
    cut it is refused up front."""
    from test_evaluate import one_split_task_dir

    tasks = str(one_split_task_dir(tmp_path))
    doc = experiment(tiny_zoo, evaluation={"tasks": ["digits_one"], "task_dirs": [tasks]})
    assert_refused(search(tmp_path, doc), tmp_path, "evaluation.split", "task digits_one has no split 'search' "
                   "(available: test); evaluation.cut (eval --cut) cuts one into search, validation and test")
    doc["evaluation"]["cut"] = {"search": 50, "validation": 30}
    result = search(tmp_path, doc)
    assert result.exit_code == 0 and "2 trials, 0 failed" in result.output, result.output
    scores = json.loads((tmp_path / "run" / "best" / "scores.json").read_text())["scores"]
    assert scores["validation"]["digits_one"]["n"] == 30 and scores["test"]["digits_one"]["n"] == 120
    out = tmp_path / "eval.json"
    run = CliRunner().invoke(main, ["eval", str(tmp_path / "run" / "best" / "recipe.yaml"), "--tasks", "digits_one",
                                    "--task-dir", tasks, "--cut", "search=50,validation=30", "--output-json", str(out)])
    assert run.exit_code == 0, run.output
    (row,) = json.loads(out.read_text())["results"]
    assert row["scores"]["digits_one"]["value"] == scores["test"]["digits_one"]["value"]
    for bad, message in (("search=50", "--cut: 'search=50': validation: Field required"),
                         ("search=50,validation=1.5", "validation: Value error, a number of documents (1, 2, ...) or a "
                                                      "share of the split between 0 and 1, not 1.5"),
                         ("search=50,validation=30,tset=1", "tset: Extra inputs are not permitted"),
                         ("search=190,validation=30", "--cut: task digits_one: its 'test' split has 200 documents")):
        run = CliRunner().invoke(main, ["eval", str(tiny_zoo / "base"), "--tasks", "digits_one", "--task-dir", tasks,
                                        "--cut", bad])
        assert run.exit_code == 2 and message in run.output and len(run.output.splitlines()) == 1, run.output
