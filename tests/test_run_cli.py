"""`evomerge export` and `evomerge report` on a finished run; the exported YAML merges to the winner."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from evomerge.export import export_text
from evomerge.merge.materialize import merge_to_dir
from evomerge.models.io import ModelDir
from evomerge.recipe import LayerSlot, Recipe, load_recipe, save_recipe
from evomerge.run.config import experiment_from_dict, load_experiment
from evomerge.run.loop import search
from test_search_loop import evaluator_factory, experiment, models  # noqa: F401  (module fixture)
from tiny_models import IMAGE_TEXT, add_mtp_layer, build_tiny, make_variants


@pytest.fixture(scope="module")
def ps_run(models, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("runs") / "ps"
    doc = experiment(models, **{"budget.trials": 8, "workers.num": 1})
    doc["space"] = {**doc["space"], "method": "ties", "search": ["weight", "density"], "layer_groups": 2,
                    "bounds": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}}
    search(experiment_from_dict(doc), run_dir, evaluator_factory(models), progress=False)
    return run_dir


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tensors(path):
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("fmt", ["evomerge", "mergekit"])
def test_exported_winner_merges_to_the_same_model(ps_run, tmp_path, fmt):
    result = run("export", ps_run, "--format", fmt, "-o", tmp_path / "best.yaml")
    assert result.exit_code == 0, result.output
    assert run("merge", tmp_path / "best.yaml", tmp_path / "merged").exit_code == 0
    merge_to_dir(load_recipe(ps_run / "best" / "recipe.yaml"), tmp_path / "reference", progress=False)
    expected, got = tensors(tmp_path / "reference"), tensors(tmp_path / "merged")
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0)
    if fmt == "mergekit":
        assert (tmp_path / "best.yaml").read_text().startswith("merge_method: ties")


def test_mergekit_runs_the_exported_winner(ps_run, tmp_path):
    pytest.importorskip("mergekit")
    from mergekit_harness import load_dir, run_mergekit

    run("export", ps_run, "--format", "mergekit", "-o", tmp_path / "best.yaml")
    run_mergekit(tmp_path / "best.yaml", tmp_path / "mergekit")
    merge_to_dir(load_recipe(ps_run / "best" / "recipe.yaml"), tmp_path / "ours", progress=False)
    theirs, ours = load_dir(tmp_path / "mergekit"), tensors(tmp_path / "ours")
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], atol=2e-5, rtol=1e-5)


def test_a_multislerp_search_exports_a_winner_mergekit_merges_alike(models, tmp_path):  # noqa: F811
    """A method without a base (task vectors from the base when one is given) searched per layer group."""
    pytest.importorskip("mergekit")
    from mergekit_harness import load_dir, run_mergekit

    doc = experiment(models, **{"budget.trials": 4, "workers.num": 1})
    doc["space"] = {**doc["space"], "method": "multislerp", "search": ["weight"], "layer_groups": 2,
                    "bounds": {"weight": [0.1, 1.0]}}
    search(experiment_from_dict(doc), tmp_path / "run", evaluator_factory(models), progress=False)
    assert run("export", tmp_path / "run", "--format", "mergekit", "-o", tmp_path / "best.yaml").exit_code == 0
    assert (tmp_path / "best.yaml").read_text().startswith("merge_method: multislerp")
    run_mergekit(tmp_path / "best.yaml", tmp_path / "mergekit")
    merge_to_dir(load_recipe(tmp_path / "run" / "best" / "recipe.yaml"), tmp_path / "ours", progress=False)
    theirs, ours = load_dir(tmp_path / "mergekit"), tensors(tmp_path / "ours")
    assert set(theirs) == set(ours)
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], atol=2e-5, rtol=1e-5)


def test_mergekit_merges_a_recipe_over_the_committed_toy_zoo(tmp_path):
    pytest.importorskip("mergekit")
    from mergekit_harness import load_dir, run_mergekit

    zoo = Path(__file__).resolve().parents[1] / "zoo"
    (tmp_path / "ties.yaml").write_text(f"""merge_method: ties
base_model: {zoo / "base"}
models:
  - {{model: {zoo / "expert_cipher"}, parameters: {{weight: [0.4, 0.9], density: 0.6}}}}
  - {{model: {zoo / "expert_reverse"}, parameters: {{weight: 0.7, density: 0.3}}}}
dtype: float32
""")
    run_mergekit(tmp_path / "ties.yaml", tmp_path / "mergekit")  # needs the zoo configs' `architectures`
    merge_to_dir(load_recipe(tmp_path / "ties.yaml"), tmp_path / "ours", progress=False)
    theirs, ours = load_dir(tmp_path / "mergekit"), tensors(tmp_path / "ours")
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], atol=2e-5, rtol=1e-5)


def test_export_warns_of_a_source_whose_config_lacks_architectures(ps_run, tmp_path):
    recipe = load_recipe(ps_run / "best" / "recipe.yaml")
    expert = recipe.merge.models[0].model
    bare = tmp_path / "bare"
    shutil.copytree(expert, bare)
    config = json.loads((bare / "config.json").read_text())
    del config["architectures"]
    (bare / "config.json").write_text(json.dumps(config))
    models = [m.model_copy(update={"model": str(bare)}) if m.model == expert else m for m in recipe.merge.models]
    save_recipe(recipe.model_copy(update={"merge": recipe.merge.model_copy(update={"models": models})}),
                tmp_path / "recipe.yaml")
    text, warnings = export_text(load_recipe(tmp_path / "recipe.yaml"), "mergekit")
    assert text.startswith("merge_method: ties")
    assert [w for w in warnings if "architectures" in w] == [
        f"{bare}: config.json has no `architectures`, which mergekit needs to read the model (save_pretrained writes "
        'it, e.g. ["LlamaForCausalLM"])']


def test_report_writes_plots_and_summary(ps_run):
    result = run("report", ps_run)
    assert result.exit_code == 0, result.output
    out = ps_run / "report"
    for name in ("fitness.png", "parameters.png", "summary.md"):
        assert (out / name).stat().st_size > 1000 or name == "summary.md", name
    summary = (out / "summary.md").read_text()
    assert "Trials: 8" in summary and "Median time per trial" in summary


def test_report_of_a_damaged_winners_scores_is_one_line(ps_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ps_run, copy)
    (copy / "best" / "scores.json").write_text("{")
    result = run("report", copy)
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"error: {copy / 'best' / 'scores.json'}: unreadable winner's scores (JSONDecodeError")


def test_export_into_a_missing_dir_is_one_line(ps_run, tmp_path):
    result = run("export", ps_run, "-o", tmp_path / "missing" / "best.yaml")
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path / 'missing' / 'best.yaml'}: cannot write (no such directory: " \
                            f"{tmp_path / 'missing'})\n"
    assert not (tmp_path / "missing").exists()


def test_resume_of_a_run_dir_it_cannot_write_is_one_line(ps_run, models, tmp_path, monkeypatch):  # noqa: F811
    import os
    import shutil

    import evomerge.cli

    monkeypatch.setattr(evomerge.cli, "_evaluator_factory", lambda config, source: evaluator_factory(models))
    copy = tmp_path / "copy"
    shutil.copytree(ps_run, copy)
    if os.geteuid() == 0:  # root writes anywhere: make the lock itself unopenable instead
        (copy / "lock").unlink(missing_ok=True)
        (copy / "lock").mkdir()
    else:
        copy.chmod(0o555)
    result = run("resume", copy)
    copy.chmod(0o755)
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"error: {copy}: cannot write in the run dir (")
    assert "copy it (with ledger.sqlite-wal) to a writable place" in result.output


def test_export_and_report_refuse_a_dir_without_a_run(tmp_path):
    for verb in ("export", "report"):
        result = run(verb, tmp_path)
        assert result.exit_code == 2 and result.output.startswith("error: ") and str(tmp_path) in result.output


def test_search_refuses_objectives_for_a_single_objective_optimizer(models, tmp_path):  # noqa: F811
    import yaml

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(models, **{"evaluation.objectives": ["a", "b"]})))  # cmaes
    result = run("search", path, "--run-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert result.output == (f"error: {path}: evaluation.objectives: optimizer cmaes takes one objective; use one of "
                             "nsga2, random, tpe, or drop objectives (the search then maximizes the fitness)\n")
    assert not (tmp_path / "run").exists()


def test_resume_of_a_finished_run_reprints_its_winner(ps_run, models, tmp_path, monkeypatch):  # noqa: F811
    import json

    import evomerge.cli

    monkeypatch.setattr(evomerge.cli, "_evaluator_factory", lambda config, source: evaluator_factory(models))
    winner = json.loads((ps_run / "best" / "scores.json").read_text())["candidate"]
    result = run("resume", ps_run)
    assert result.exit_code == 0, result.output
    assert f"winner: trial {winner} (" in result.output and "8 trials, 0 failed" in result.output
    result = run("resume", tmp_path, "--ray-address", "127.0.0.1:1")
    assert result.exit_code == 2 and "not a run directory (no config.yaml)" in result.output


def test_resume_with_a_new_trial_budget(ps_run, models, tmp_path, monkeypatch):  # noqa: F811
    import evomerge.cli

    monkeypatch.setattr(evomerge.cli, "_evaluator_factory", lambda config, source: evaluator_factory(models))
    shutil.copytree(ps_run, tmp_path / "run")
    result = run("resume", tmp_path / "run", "--trials", 3)
    assert result.exit_code == 2
    assert result.output == (f"error: {tmp_path / 'run' / 'config.yaml'}: budget.trials: 3 is below the 8 candidates the "
                             "ledger already holds; a budget of 8 or more keeps every scored trial\n")
    shutil.rmtree(tmp_path / "run" / "best")
    result = run("export", tmp_path / "run")
    assert result.exit_code == 2 and f"`evomerge resume {tmp_path / 'run'} --trials N` ends a stopped search" in result.output
    result = run("resume", tmp_path / "run", "--trials", 10)
    assert result.exit_code == 0, result.output
    assert "10 trials, 0 failed" in result.output
    assert load_experiment(tmp_path / "run" / "config.yaml").budget.trials == 10
    result = run("resume", tmp_path / "run", "--trials", 30, "--hours", 1e-9)  # past after a trial or none
    assert result.exit_code == 0, result.output
    ran = load_experiment(tmp_path / "run" / "config.yaml").budget
    assert ran.trials in (10, 11) and ran.hours == 1e-9
    assert f"the run ends at {ran.trials} trials" in result.output and f"{ran.trials} trials, 0 failed" in result.output


def test_ctrl_c_says_how_the_run_goes_on(ps_run, models, tmp_path, monkeypatch):  # noqa: F811
    import evomerge.cli
    import evomerge.run.loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evomerge.cli, "_evaluator_factory", lambda config, source: evaluator_factory(models))
    monkeypatch.setattr(evomerge.run.loop, "resume", interrupted)
    result = run("resume", ps_run)
    assert result.exit_code == 130
    assert result.output == (f"\ninterrupted: the trials scored are in the ledger; `evomerge resume {ps_run}` goes on, "
                             f"`evomerge resume {ps_run} --trials N` ends the search at N trials\n")


def test_a_failed_held_out_score_is_an_error_until_resume_scores_it(models, tmp_path, monkeypatch):  # noqa: F811
    import yaml

    import evomerge.cli

    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(experiment(models, **{"budget.trials": 4, "workers.num": 1,
                                                                            "validation.top_k": 0})))
    broken = evaluator_factory(models, fail_splits=("test",))
    monkeypatch.setattr(evomerge.cli, "_evaluator_factory", lambda config, source: broken)
    result = run("search", tmp_path / "exp.yaml", "--run-dir", tmp_path / "run")
    assert result.exit_code == 1 and "test of trial" in result.output
    assert "FileNotFoundError: no test data" in result.output
    assert f"run `evomerge resume {tmp_path / 'run'}` to score them" in result.output
    monkeypatch.setattr(evomerge.cli, "_evaluator_factory", lambda config, source: evaluator_factory(models))
    result = run("resume", tmp_path / "run")
    assert result.exit_code == 0 and "error" not in result.output
    assert re.search(r"winner: trial \d+ \(search -[\d.]+, test -[\d.]+\); 4 trials, 0 failed", result.output)


def test_search_seed_option_replaces_the_experiments_seed(models, tmp_path, monkeypatch):  # noqa: F811
    import yaml

    import evomerge.cli
    from test_search_loop import genomes

    monkeypatch.setattr(evomerge.cli, "_evaluator_factory", lambda config, source: evaluator_factory(models))
    doc = experiment(models, **{"budget.trials": 4, "workers.num": 1, "validation.top_k": 0})
    for seed in (0, 5):
        (tmp_path / f"seed{seed}.yaml").write_text(yaml.safe_dump({**doc, "seed": seed}))
    assert run("search", tmp_path / "seed0.yaml", "--run-dir", tmp_path / "flag", "--seed", 5).exit_code == 0
    assert run("search", tmp_path / "seed5.yaml", "--run-dir", tmp_path / "file").exit_code == 0
    assert run("search", tmp_path / "seed0.yaml", "--run-dir", tmp_path / "zero").exit_code == 0
    assert yaml.safe_load((tmp_path / "flag" / "config.yaml").read_text())["seed"] == 5
    assert genomes(tmp_path / "flag") == genomes(tmp_path / "file") != genomes(tmp_path / "zero")
    # --trials and --hours replace the budget likewise; searching the same run dir again with more goes on
    result = run("search", tmp_path / "seed0.yaml", "--run-dir", tmp_path / "zero", "--trials", 7, "--hours", 5)
    assert result.exit_code == 0 and "7 trials, 0 failed" in result.output
    assert yaml.safe_load((tmp_path / "zero" / "config.yaml").read_text())["budget"] == {
        "trials": 7, "hours": 5.0, "max_consecutive_failures": 10}
    assert [c for c, _ in genomes(tmp_path / "zero")] == list(range(7))


def test_search_refuses_an_unknown_task_before_it_starts(models, tmp_path):  # noqa: F811
    import yaml

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(models, **{"evaluation.tasks": ["toy_gne"]})))
    result = run("search", path, "--run-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {path}: evaluation.tasks: unknown task 'toy_gne'")
    assert "did you mean 'toy_gen'?" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def search_and_merge(tmp_path: Path, space: dict, trials: int = 3) -> Recipe:
    """A search of `trials` random candidates over `space` (toy cipher, 2 documents), none failing, and its winner merged
    into tmp_path / "out"; the winner's recipe."""
    doc = {"name": "models", "seed": 0, "space": space, "optimizer": {"name": "random"}, "budget": {"trials": trials},
           "evaluation": {"tasks": ["toy_cipher_gen"], "limit": 2}, "validation": {"top_k": 1}}
    (tmp_path / "exp.yaml").write_text(json.dumps(doc))
    result = run("search", tmp_path / "exp.yaml", "--run-dir", tmp_path / "run")
    assert result.exit_code == 0 and f"{trials} trials, 0 failed" in result.output, result.output
    assert run("merge", tmp_path / "run/best/recipe.yaml", tmp_path / "out").exit_code == 0
    return load_recipe(tmp_path / "run/best/recipe.yaml")


def linear_search_and_merge(tmp_path: Path, models: list[Path], trials: int, **space) -> dict:
    """`search_and_merge` of a linear-weight search over `models`; the winner's merge stage, as its YAML has it."""
    search_and_merge(tmp_path, {"kind": "ps", "method": "linear", "models": [str(m) for m in models],
                                "search": ["weight"], **space}, trials)
    return yaml.safe_load((tmp_path / "run/best/recipe.yaml").read_text())["merge"]


@pytest.mark.parametrize("family", IMAGE_TEXT)
def test_a_search_over_image_text_models_scores_and_writes_them(tmp_path, family):
    """Image-text checkpoints (Gemma-3, Gemma-4, Mistral-3, Qwen3.5, Qwen3.5-MoE, Qwen2-VL, Qwen2.5-VL, Qwen3-VL): a
    worker merges into the live model lm-eval scores, and the winner is written with its vision tower and its text
    model's settings (text_config); Qwen2-VL's and Qwen2.5-VL's checkpoint names are not the live model's. Qwen3.5's hub checkpoints
    carry a multi-token-prediction head (`mtp.`) that transformers does not load: the search leaves it out of the live
    models, the winner's merge writes it merged. Qwen3.5-MoE's experts are per-expert tensors here (as transformers
    writes them), views of the live model's fused ones."""
    base = build_tiny(family, tmp_path / "base", num_layers=3, hidden=32)
    models = [base, *make_variants(base, tmp_path, n=2, scale=0.05)]
    if family.startswith("qwen3_5"):
        for i, model in enumerate(models):
            shard = load_file(model / "model.safetensors")
            head = {"mtp.fc.weight": torch.full((32, 64), float(i)), "mtp.norm.weight": torch.full((32,), float(i)),
                    "mtp.layers.0.mlp.up_proj.weight": torch.full((64, 32), float(i))}
            save_file({**shard, **head}, model / "model.safetensors", metadata={"format": "pt"})
    split = {"gemma3": "attn_mlp", "mistral3": ["self_attn", "mlp"], "qwen3_5": ["self_attn", "linear_attn", "mlp"],
             "qwen3_5_moe": ["self_attn", "linear_attn", "mlp"], "gemma4": "attn_mlp", "qwen2_vl": ["self_attn", "mlp"],
             "qwen2_5_vl": ["self_attn", "mlp"], "qwen3_vl": ["self_attn", "mlp"], "qwen3_vl_moe": ["self_attn", "mlp"],
             "llama4": ["self_attn", "feed_forward"]}
    recipe = linear_search_and_merge(tmp_path, models, 3, layer_groups=3, split=split[family],
                                     bounds={"weight": [0.0, 1.0]})
    config, source = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "out", base))
    assert config["architectures"] == source["architectures"] and config["text_config"]["num_hidden_layers"] == 3
    written = tensors(tmp_path / "out")
    assert set(written) == set(load_file(base / "model.safetensors"))  # the vision tower and projector included
    if family.startswith("qwen3_5"):  # the head merged as any tensor outside the layers (t = 0, no filter matches): the mean
        # of the models' constants 0, 1, 2 weighted by each model's first value of its last (unfiltered) weight entry
        weights = [m["parameters"]["weight"][-1]["value"][0] for m in recipe["models"]]
        expected = sum(i * w for i, w in enumerate(weights)) / sum(weights)
        torch.testing.assert_close(written["mtp.fc.weight"], torch.full((32, 64), expected), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["gemma3", "llama4", "qwen2_5_vl", "qwen3_5"])
def test_a_data_flow_search_over_image_text_models_runs_their_text_layers(tmp_path, family):
    """A layer path over image-text models (Gemma-3's alternating attention, Llama 4's text model nested as a causal LM
    of its own, Qwen2.5-VL's multimodal rotary positions, Qwen3.5's linear attention): the worker runs the text
    model's layers in the path's order; the winner is written with the path's text layers (text_config) and the
    vision tower and projector of its last slot's source, and its mergekit export names them as modules where
    mergekit has a table of modules (it reads an image-text model's slices only so)."""
    base = build_tiny(family, tmp_path / "base", num_layers=3, hidden=32)
    a, b = make_variants(base, tmp_path, n=2, scale=0.05)
    recipe = search_and_merge(tmp_path, {"kind": "dfs", "models": [str(a), str(b)], "repeats": 2, "scale": "none"})
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == len(recipe.layers)
    arch, written, last = ModelDir.open(base).arch, tensors(tmp_path / "out"), tensors(Path(recipe.layers[-1].source))
    outside = [n for n in last if arch.layer_of(n) is None and not arch.is_pre_layer(n)
               and arch.module_of(n) != "text_decoder" or arch.part_layer and re.match(arch.part_layer, n)]
    assert outside and all(torch.equal(written[n], last[n]) for n in outside)
    exported = yaml.safe_load((tmp_path / "run/best/recipe.mergekit.yaml").read_text())
    assert ("modules" in exported) == bool(arch.modules), exported


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "falcon", "mamba"])
def test_a_data_flow_search_over_older_layouts_runs_their_layers(tmp_path, family):
    """GPT-2's and Falcon's layers (`transformer.h`), GPT-NeoX's (`gpt_neox.layers`), Mamba's (`backbone.layers`): a
    worker runs them in a path's order, scaled, and the winner is written with the path's layers: each slot its
    source's layer, the hidden-state scales folded into the output projections only."""
    base = build_tiny(family, tmp_path / "base", num_layers=3, hidden=32)
    a, b = make_variants(base, tmp_path, n=2, scale=0.05)
    recipe = search_and_merge(tmp_path, {"kind": "dfs", "models": [str(a), str(b)], "repeats": 2, "scale": "slot"})
    arch, written = ModelDir.open(base).arch, tensors(tmp_path / "out")
    assert json.loads((tmp_path / "out/config.json").read_text())[arch.num_layers_key] == len(recipe.layers)
    for k, slot in enumerate(recipe.layers):
        source = tensors(Path(slot.source))
        kept = [n for n in source if arch.layer_of(n) == slot.layer and not arch.is_output_projection(n)]
        assert kept and all(torch.equal(written[arch.rename_layer(n, k)], source[n]) for n in kept), (k, slot)


@pytest.mark.parametrize("family, mtp", [("nemotron_h", "mtp.layers.0.mixer.up_proj.weight"),
                                         ("ernie4_5_moe", "model.mtp_linear_proj.0.weight")])
def test_a_search_leaves_multi_token_prediction_layers_out_of_the_live_models(tmp_path, family, mtp):
    """Nemotron-H's hub checkpoints (their decoder named `backbone.`) and ERNIE-4.5-MoE's may carry multi-token-prediction
    layers (`mtp.`, `model.mtp_*`) that transformers ignores on load: a search leaves them out of its live models and the
    winner's merge writes them, merged as the tensors after the layers are."""
    base = build_tiny(family, tmp_path / "base", num_layers=3, hidden=32)
    models = [base, *make_variants(base, tmp_path, n=2, scale=0.05)]
    for i, model in enumerate(models):
        shard = load_file(model / "model.safetensors")
        save_file({**shard, mtp: torch.full((32, 32), float(i))}, model / "model.safetensors", metadata={"format": "pt"})
    recipe = linear_search_and_merge(tmp_path, models, 2, bounds={"weight": [0.1, 1.0]})
    weights = [m["parameters"]["weight"] for m in recipe["models"]]
    expected = sum(i * w for i, w in enumerate(weights)) / sum(weights)
    torch.testing.assert_close(tensors(tmp_path / "out")[mtp], torch.full((32, 32), expected), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["ps", "dfs"])
def test_a_search_over_mixtures_of_experts_scores_and_writes_them(tmp_path, kind):
    """Qwen3-MoE checkpoints hold each expert's tensors, the live model (transformers 5) fused ones: a worker with its
    sources on the device reads and writes experts through views of them, a layer path runs their layers, and the
    winner is written with the checkpoint's names."""
    base = build_tiny("qwen3_moe", tmp_path / "base", num_layers=3, hidden=32)
    a, b = make_variants(base, tmp_path, n=2, scale=0.05)
    space = ({"kind": "ps", "method": "ties", "base_model": str(base), "models": [str(a), str(b)],
              "search": ["weight", "density"], "layer_groups": 3, "bounds": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}}
             if kind == "ps" else {"kind": "dfs", "models": [str(a), str(b)], "repeats": 1})
    doc = {"name": "moe", "seed": 0, "space": space, "optimizer": {"name": "random"}, "budget": {"trials": 3},
           "evaluation": {"tasks": ["toy_cipher_gen"], "limit": 2}, "validation": {"top_k": 1},
           "workers": {"sources": "device"}}
    (tmp_path / "exp.yaml").write_text(json.dumps(doc))
    result = run("search", tmp_path / "exp.yaml", "--run-dir", tmp_path / "run")
    assert result.exit_code == 0 and "3 trials, 0 failed" in result.output, result.output
    assert run("merge", tmp_path / "run/best/recipe.yaml", tmp_path / "out").exit_code == 0
    written, names = tensors(tmp_path / "out"), set(load_file(base / "model.safetensors"))
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in written
    assert set(written) == names if kind == "ps" else {re.sub(r"layers\.\d+", "L", n) for n in written} == {
        re.sub(r"layers\.\d+", "L", n) for n in names}


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3", "deepseek_v32", "glm_moe_dsa"])
def test_a_multi_token_prediction_layer_follows_the_layers_it_was_trained_after(tmp_path, family):
    """GLM-4.5's and DeepSeek-V3's hub checkpoints hold a multi-token-prediction (MTP) layer numbered num_hidden_layers,
    which transformers does not load: searches leave it out of their live models; the winner's merge writes it merged
    as the tensors after the layers are (t = 0, a gradient's first value), a layer path writes its last slot's source's,
    renumbered after the path's layers, and where a model lacks it (a fine-tune saved by transformers) the merge leaves
    it out and says so. Its embeddings and head are vocabulary rows (aligned as the model's own)."""
    indexers = {"index_topk_freq": 1} if family == "glm_moe_dsa" else {}  # (GLM-5: an indexer in every layer, so a
    base = add_mtp_layer(build_tiny(family, tmp_path / "base", num_layers=3, hidden=32, first_k_dense_replace=0,  # path
                                    **indexers))  # may start anywhere)
    a, b = make_variants(base, tmp_path, n=2, scale=0.05)  # no dense layer: a data-flow search runs any path
    sources = {str(m): load_file(m / "model.safetensors") for m in (base, a, b)}
    mtp = sorted(n for n in sources[str(base)] if n.startswith("model.layers.3."))
    assert len(mtp) > 20 and {"model.layers.3.embed_tokens.weight", "model.layers.3.eh_proj.weight"} <= set(mtp)
    spaces = {"ps": {"kind": "ps", "method": "linear", "models": [str(base), str(a), str(b)], "search": ["weight"],
                     "layer_groups": 3, "bounds": {"weight": [0.1, 1.0]}},
              "dfs": {"kind": "dfs", "models": [str(a), str(b)], "repeats": 1}}
    for kind, space in spaces.items():
        doc = {"name": "mtp", "seed": 0, "space": space, "optimizer": {"name": "random"}, "budget": {"trials": 3},
               "evaluation": {"tasks": ["toy_cipher_gen"], "limit": 2}, "validation": {"top_k": 1}}
        (tmp_path / f"{kind}.yaml").write_text(json.dumps(doc))
        result = run("search", tmp_path / f"{kind}.yaml", "--run-dir", tmp_path / kind)
        assert result.exit_code == 0 and "3 trials, 0 failed" in result.output, result.output
        assert run("merge", tmp_path / kind / "best/recipe.yaml", tmp_path / f"{kind}_out").exit_code == 0
        written, recipe = tensors(tmp_path / f"{kind}_out"), load_recipe(tmp_path / kind / "best/recipe.yaml")
        if kind == "ps":  # linear at t = 0: sum_i w_i x_i / sum_i w_i with each model's first weight
            weights = {m.model: m.parameters["weight"][0] for m in recipe.merge.models}
            for name in mtp:
                expected = sum(w * sources[m][name].double() for m, w in weights.items()) / sum(weights.values())
                torch.testing.assert_close(written[name].double(), expected, atol=1e-6, rtol=1e-5)
        else:  # the last slot's source's, after the path's layers
            n, last = len(recipe.layers), sources[recipe.layers[-1].source]
            assert {name for name in written if re.match(rf"model\.layers\.{n}\.", name)} == {
                name.replace("layers.3.", f"layers.{n}.") for name in mtp}
            for name in mtp:
                assert torch.equal(written[name.replace("layers.3.", f"layers.{n}.")], last[name]), name
    path = Recipe(layers=[LayerSlot(source=str(m), layer=i) for m, i in ((a, 0), (b, 1), (a, 1), (b, 2), (a, 2))])
    merge_to_dir(path, tmp_path / "path_out", progress=False)
    written = tensors(tmp_path / "path_out")
    assert not any(name.startswith("model.layers.3.embed_tokens") for name in written)
    for name in mtp:
        assert torch.equal(written[name.replace("layers.3.", "layers.5.")], sources[str(a)][name]), name
    plain = build_tiny(family, tmp_path / "plain", num_layers=3, hidden=32, seed=1, first_k_dense_replace=0,  # no MTP
                       **indexers)
    (tmp_path / "mixed.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(plain), "parameters": {"weight": 0.5}}]}))
    result = run("merge", tmp_path / "mixed.yaml", tmp_path / "mixed_out")
    assert result.exit_code == 0 and f"warning: the multi-token-prediction layer past the last of {base} is left out: " \
        "it follows the last slice's (or slot's) models, which do not all have one" in result.output, result.output
    assert not any(name.startswith("model.layers.3.") for name in tensors(tmp_path / "mixed_out"))
    counted = json.loads((base / "config.json").read_text()).get("num_nextn_predict_layers")  # (V3.2's, GLM-5's: none)
    assert json.loads((tmp_path / "mixed_out" / "config.json").read_text()).get("num_nextn_predict_layers") == (
        None if counted is None else 0)


def test_a_mergekit_evolve_config_becomes_an_experiment_that_searches(tmp_path, monkeypatch):
    """`evomerge import-evolve`: mergekit-evolve's genome (granularity, filters, smooth, normalize), tasks (weights,
    metrics), limit and chat default as an experiment, models made absolute; it searches as written (its tasks cut),
    and the keys evomerge takes elsewhere are noted."""
    import yaml

    base = build_tiny("llama", tmp_path / "base", num_layers=4, hidden=32)
    make_variants(base, tmp_path, n=2)
    monkeypatch.chdir(tmp_path)
    config = {"genome": {"models": ["base", "ft1", "ft2"], "merge_method": "dare_ties", "base_model": "base",
                         "layer_granularity": 2, "filters": ["self_attn"], "smooth": True},
              "tasks": [{"name": "toy_cipher_gen", "weight": 2.0, "metric": "exact_match,none"},
                        {"name": "toy_reverse_gen", "metric": "exact_match,none"}],
              "limit": 4, "shuffle": True, "apply_chat_template": False}
    (tmp_path / "evol.yml").write_text(yaml.safe_dump(config))
    assert run("import-evolve", "evol.yml", "-o", "exp.yaml", "--cut", "search=60,validation=40").exit_code == 0
    text = (tmp_path / "exp.yaml").read_text()
    assert "# shuffle: True -- evaluation.cut shuffles the documents it cuts" in text
    exp = yaml.safe_load(text)
    assert exp["space"] == {"kind": "ps", "method": "dare_ties", "base_model": str(base),
                            "models": [str(tmp_path / "ft1"), str(tmp_path / "ft2")], "search": ["weight", "density"],
                            "bounds": {"weight": [0.0, 1.0], "density": [0.0, 1.0]}, "dtype": "bfloat16",
                            "layer_groups": 2, "fixed": {"normalize": True}, "split": ["self_attn"], "smooth": True}
    assert exp["evaluation"] == {"tasks": ["toy_cipher_gen", "toy_reverse_gen"],
                                 "cut": {"search": 60, "validation": 40, "seed": 0, "split": None},
                                 "metrics": {"toy_cipher_gen": "exact_match,none", "toy_reverse_gen": "exact_match,none"},
                                 "apply_chat_template": False, "weights": {"toy_cipher_gen": 2.0, "toy_reverse_gen": 1.0},
                                 "limit": 4}
    result = run("search", "exp.yaml", "--run-dir", "run", "--trials", "3")
    assert result.exit_code == 0 and "3 trials, 0 failed" in result.output, result.output
    for chat, expected in [({}, {"apply_chat_template": True, "fewshot_as_multiturn": True}),  # mergekit-evolve's
                           # defaults, then its keys given
                           ({"apply_chat_template": True, "fewshot_as_multiturn": False},
                            {"apply_chat_template": True, "fewshot_as_multiturn": False})]:
        plain = {k: v for k, v in config.items() if k != "apply_chat_template"}
        (tmp_path / "chat.yml").write_text(yaml.safe_dump({**plain, **chat}))
        assert run("import-evolve", "chat.yml", "-o", "chat.yaml").exit_code == 0
        evaluation = yaml.safe_load((tmp_path / "chat.yaml").read_text())["evaluation"]
        assert {k: evaluation.get(k) for k in expected} == expected
    for genome, message in [({"merge_method": "slerp"}, "genome.merge_method: merge_method 'slerp': mergekit-evolve's"),
                            ({"tokenizer_source": "base"}, "genome.tokenizer_source: a search scores and ships"),
                            ({"layer_granularity": 3}, "genome.layer_granularity: 4 layers do not split into groups of 3")]:
        (tmp_path / "bad.yml").write_text(yaml.safe_dump({**config, "genome": {**config["genome"], **genome}}))
        result = run("import-evolve", "bad.yml")
        assert result.exit_code == 2 and result.output.startswith(f"error: bad.yml: {message}"), result.output
