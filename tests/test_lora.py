"""`model+adapter` (mergekit's reference to a model with a LoRA adapter): the adapted weights, against a float64
reference written from the adapter's tensors, PEFT's own merge and mergekit's; in a merge, a search's live model, and
the refusals."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.models.io import ModelDir, load_live_model
from tiny_models import build_tiny

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # PEFT's notes on saving


def make_adapter(base, out, *, rslora=False, dora=False):
    """A trained-looking LoRA adapter of `base` (random A and B) on q, v, down projections and the embeddings, with
    lm_head saved whole (modules_to_save) and changed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                             modules_to_save=["lm_head"], init_lora_weights=False, use_rslora=rslora, use_dora=dora)
    adapted = peft.get_peft_model(model, config)
    with torch.no_grad():
        adapted.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    adapted.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("lora") / "base", num_layers=2, hidden=32)


def reference(base, adapter, rslora):
    """W + s B A (embeddings: (B A)^T), lm_head replaced, in float64, from the files themselves."""
    weights, lora = load_file(base / "model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    out = {n: t.double() for n, t in weights.items()}
    for key, a in lora.items():
        module = key.removeprefix("base_model.model.")
        if module.endswith(".lora_A.weight") or module.endswith(".lora_embedding_A"):
            linear = module.endswith(".lora_A.weight")
            b = lora[key.replace("lora_A", "lora_B") if linear else key.replace("lora_embedding_A", "lora_embedding_B")]
            name = module.removesuffix(".lora_A.weight" if linear else ".lora_embedding_A") + ".weight"
            scale = 8 / (math.sqrt(4) if rslora else 4)
            delta = b.double() @ a.double()
            out[name] += scale * (delta if linear else delta.T)
    out["lm_head.weight"] = lora["base_model.model.lm_head.weight"].double()
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_a_model_with_its_adapter_is_what_peft_and_the_reference_give(base, tmp_path, rslora):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(base, tmp_path / "adapter", rslora=rslora)
    adapted = ModelDir.open(f"{base}+{adapter}")
    expected = reference(base, adapter, rslora)
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    theirs = merged.state_dict()
    assert set(adapted.tensor_names) == set(expected)
    moved = 0
    for name in adapted.tensor_names:
        got = adapted.get(name)
        torch.testing.assert_close(got.double(), expected[name], atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(got, theirs[name], atol=1e-6, rtol=1e-6, msg=lambda m: f"peft {name}: {m}")
        moved += not torch.equal(got, ModelDir.open(base).get(name))
    assert moved == 8  # q, v, down in 2 layers, the embeddings, lm_head

    # a worker's live model of it (a layer path runs its layers as they are) holds the adapted weights
    live = load_live_model(f"{base}+{adapter}").state_dict()
    for name in adapted.tensor_names:
        assert torch.equal(live[name], adapted.get(name)), name


def test_merge_of_an_adapted_model_equals_mergekit(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter")
    doc = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f"{base}+{adapter}", "parameters": {"weight": 0.7}}, {"model": str(base), "parameters": {"weight": 0.3}}]}
    (tmp_path / "r.yaml").write_text(json.dumps(doc))
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yaml"), str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    pytest.importorskip("mergekit")
    from mergekit_harness import load_dir, run_mergekit

    run_mergekit(tmp_path / "r.yaml", tmp_path / "mergekit")
    theirs = load_dir(tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        torch.testing.assert_close(ours[name], expected, atol=2e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_adapters_it_cannot_apply_are_one_line(base, tmp_path):
    dora = make_adapter(base, tmp_path / "dora", dora=True)
    resized = shutil.copytree(make_adapter(base, tmp_path / "plain"), tmp_path / "resized")
    tensors = load_file(resized / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(70, 32)
    from safetensors.torch import save_file

    save_file(tensors, resized / "adapter_model.safetensors")
    for adapter, message in ((dora, "DoRA is not supported (adapter_config.json: use_dora)"),
                             (resized, "adapter tensor base_model.model.lm_head.weight replaces no base weight of its "
                                       "shape (a resized vocabulary is not supported)")):
        doc = {"merge_method": "linear", "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
        (tmp_path / "r.yaml").write_text(json.dumps(doc))
        result = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out")])
        assert result.exit_code == 2 and result.output == f"error: {tmp_path / 'r.yaml'}: {adapter}: {message}\n"
        assert not (tmp_path / "out").exists()


def test_a_search_over_adapted_models_with_paths_relative_to_its_file(base, tmp_path):
    """A layer-path search runs an adapted model's own layers and scores with its model's tokenizer; `model+adapter`
    in an experiment file is relative to the file, part by part."""
    shutil.copytree(base, tmp_path / "models" / "base")
    make_adapter(base, tmp_path / "models" / "adapter")
    (tmp_path / "exp").mkdir()
    doc = {"name": "adapted", "seed": 0, "space": {"kind": "dfs", "models": ["../models/base+../models/adapter",
                                                                             "../models/base"], "repeats": 1},
           "optimizer": {"name": "random"}, "budget": {"trials": 2},
           "evaluation": {"tasks": ["toy_cipher_gen"], "limit": 2}, "validation": {"top_k": 1}}
    (tmp_path / "exp" / "e.yaml").write_text(json.dumps(doc))
    result = CliRunner().invoke(main, ["search", str(tmp_path / "exp" / "e.yaml"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0 and "2 trials, 0 failed" in result.output, result.output
    frozen = (tmp_path / "run" / "config.yaml").read_text()
    assert f"{tmp_path / 'models' / 'base'}+{tmp_path / 'models' / 'adapter'}" in frozen


def test_eval_scores_a_model_with_its_adapter(tmp_path):
    """`evomerge eval base+adapter`: an adapter that saves every tensor of expert_cipher whole (modules_to_save) makes
    the base that expert, and its row is the expert's."""
    from safetensors.torch import save_file

    zoo = Path(__file__).resolve().parents[1] / "zoo"  # the committed toy zoo: its cipher expert has the skill
    expert = load_file(zoo / "expert_cipher" / "model.safetensors")
    adapter = tmp_path / "to_cipher"
    adapter.mkdir()
    save_file({f"base_model.model.{n}": t for n, t in expert.items()}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    targets = [str(zoo / "base"), str(zoo / "expert_cipher"), f"{zoo / 'base'}+{adapter}"]
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(main, ["eval", *targets, "--tasks", "toy_cipher_gen", "--limit", "20",
                                       "--split", "test", "--output-json", str(out)])
    assert result.exit_code == 0, result.output
    assert "base+to_cipher" in result.output
    base, expert, adapted = [r["scores"]["toy_cipher_gen"]["value"] for r in json.loads(out.read_text())["results"]]
    assert adapted == expert > base
