"""`evomerge merge`: a loadable HF dir on success; on bad input one line naming file and key, exit 2, and no OUT."""

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from tiny_models import build_tiny, make_variants, with_chat_template


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_models")
    base = build_tiny("llama", root / "base", num_layers=3)
    a, b = make_variants(base, root, n=2, scale=0.05)
    return str(base), str(a), str(b)


def write(path, doc):
    path.write_text(yaml.safe_dump(doc, sort_keys=False) if isinstance(doc, dict) else doc)
    return str(path)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ties(models, **over):
    base, a, b = models
    doc = {"merge_method": "ties", "base_model": base,
           "models": [{"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
                      {"model": b, "parameters": {"weight": [0.2, 0.8], "density": 0.7}}],
           "dtype": "float32"}
    doc.update(over)
    return doc


def test_merge_writes_a_loadable_model_with_card_tokenizer_and_shards(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write(tmp_path / "r.yaml", ties(models))
    result = run("merge", recipe, tmp_path / "out", "--out-shard-size", "20KB")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert "merge_method: ties" in (out / "README.md").read_text() or "method: ties" in (out / "README.md").read_text()
    assert model.config.num_hidden_layers == 3
    assert not list(tmp_path.glob(".*tmp*"))


def test_layer_path_updates_num_hidden_layers(models, tmp_path):
    base, a, _ = models
    recipe = write(tmp_path / "p.yaml", {"layers": [{"source": base, "layer": 0}, {"source": a, "layer": 2},
                                                    {"source": a, "layer": 2}, {"source": base, "layer": 1}]})
    result = run("merge", recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    merged = load_file(tmp_path / "out" / "model.safetensors")
    source = load_file(f"{a}/model.safetensors")
    for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
        assert torch.equal(merged[f"model.layers.1.{suffix}"], source[f"model.layers.2.{suffix}"])
        assert torch.equal(merged[f"model.layers.2.{suffix}"], source[f"model.layers.2.{suffix}"])


def corrupt(models, tmp_path):
    bad = tmp_path / "nan_model"
    shutil.copytree(models[1], bad)
    tensors = load_file(bad / "model.safetensors")
    name = next(n for n in tensors if "q_proj" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return str(bad)


def truncated(models, tmp_path):
    """Model a with its weights cut short, as an interrupted download leaves them (the header is whole)."""
    cut = tmp_path / "cut_model"
    shutil.copytree(models[1], cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    return str(cut)


def broken_tokenizer_config(models, tmp_path):
    """The base with a tokenizer_config.json that is not JSON (a half-written edit)."""
    broken = tmp_path / "broken_tokenizer"
    shutil.copytree(models[0], broken)
    (broken / "tokenizer_config.json").write_text('{"chat_template": ')
    return str(broken)


def quantized(models, tmp_path, *, weights="F8_E4M3"):
    """Model a as an FP8 checkpoint with block scales (quant_method fp8): its projections float8_e4m3fn, each with a
    weight_scale_inv; weights="F32" keeps them float under the same quantization_config (a stale one)."""
    out = tmp_path / f"quantized_{weights}"
    shutil.copytree(models[1], out)
    tensors = load_file(out / "model.safetensors")
    if weights == "F8_E4M3":
        for name in [n for n in tensors if n.endswith("proj.weight")]:
            tensors[name] = tensors[name].to(torch.float8_e4m3fn)
            tensors[name.replace(".weight", ".weight_scale_inv")] = torch.ones(1, 1)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def without_tokenizer(models, tmp_path):
    """Model a without its tokenizer files."""
    out = tmp_path / "no_tokenizer"
    shutil.copytree(models[1], out, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    return str(out)


def other_arch(tmp_path):
    return str(build_tiny("gpt2", tmp_path / "gpt2", num_layers=3))


def other_shape(tmp_path):
    return str(build_tiny("llama", tmp_path / "wide", num_layers=3, hidden=32))


BAD = {
    "unknown method": (lambda m, p: ties(m, merge_method="tiez"), "did you mean 'ties'"),
    "misspelled key": (lambda m, p: {**ties(m), "base_modle": m[0]}, "base_modle"),
    "misspelled parameter": (lambda m, p: ties(m, parameters={"normalise": True}), "parameters.normalise"),
    "density out of range": (lambda m, p: ties(m, parameters={"density": 1.5}), "parameters.density"),
    "della epsilon": (lambda m, p: ties(m, merge_method="della", parameters={"density": 0.5, "epsilon": 0.6}), "epsilon"),
    "missing model dir": (lambda m, p: ties(m, base_model=str(p / "nope")), "nope"),
    "lora adapter missing": (lambda m, p: ties(m, base_model=f"{m[0]}+{p / 'adapter'}"),
                             "adapter: not a LoRA adapter dir (needs adapter_config.json and adapter_model.safetensors)"),
    "architecture differs": (lambda m, p: ties(m, base_model=other_arch(p)), "architecture"),
    "shape differs": (lambda m, p: ties(m, base_model=other_shape(p)), "shape"),
    "nan weights": (lambda m, p: ties(m, base_model=corrupt(m, p)), "allow-nonfinite"),
    "slerp needs two": (lambda m, p: {"merge_method": "slerp", "base_model": m[0], "models": [{"model": x} for x in m],
                                      "parameters": {"t": 0.5}}, "exactly 1"),
    "model_stock needs two plus base": (lambda m, p: {"merge_method": "model_stock", "base_model": m[0],
                                                      "models": [{"model": m[1]}]}, "at least 2"),
    "slerp t for attention only": (lambda m, p: {"merge_method": "slerp", "base_model": m[0], "models": [{"model": m[1]}],
                                                 "parameters": {"t": [{"filter": "self_attn", "value": 0.5}]}},
                                   "t: missing required parameter 't' (tensor model.embed_tokens.weight)"),
    "karcher max_iter not whole": (lambda m, p: {"merge_method": "karcher", "models": [{"model": x} for x in m],
                                                 "parameters": {"max_iter": 2.5}},
                                   "parameters.max_iter: expected a whole number, got 2.5"),
    "arcee_fusion takes one model besides the base": (
        lambda m, p: {"merge_method": "arcee_fusion", "base_model": m[0], "models": [{"model": x} for x in m]},
        "method arcee_fusion takes exactly 1 model besides the base, got 2"),
    "nan density": (lambda m, p: ties(m, parameters={"density": float("nan")}),
                    "parameters.density: expected a finite number, got nan"),
    "hub id not fetched": (lambda m, p: ties(m, base_model="evomerge-tests/no-such-model"),
                           "evomerge-tests/no-such-model: no such directory, and fetching it from the Hugging Face Hub"),
    "hidden-state scale 0": (lambda m, p: {"layers": [{"source": m[1], "layer": 0, "scale": 0}]},
                             "layers.0.scale: Input should be greater than 0"),
    "weight scale not a number": (lambda m, p: {"layers": [{"source": m[1], "layer": 0, "weight_scale": "x"}]},
                                  "layers.0.weight_scale: expected a finite number, got 'x'"),
    "no models": (lambda m, p: {"merge_method": "linear", "models": []}, "models: List should have at least 1"),
    "no slices": (lambda m, p: {"merge_method": "passthrough", "slices": []}, "slices: List should have at least 1"),
    "a slice of no sources": (lambda m, p: {"merge_method": "passthrough", "slices": [{"sources": []}]},
                              "slices.0.sources: List should have at least 1"),
    "quantized weights": (lambda m, p: {**ties(m), "models": [{"model": quantized(m, p), "parameters": {"weight": 1.0}}]},
                          "quantized_F8_E4M3: a quantized checkpoint (fp8: model.layers.0.mlp.down_proj.weight is "
                          "F8_E4M3); merging needs its full-precision weights"),
    "truncated weights": (lambda m, p: {**ties(m), "models": [{"model": truncated(m, p), "parameters": {"weight": 1.0}}]},
                          "cut_model: unreadable safetensors file model.safetensors (truncated: "),
    "broken tokenizer config, template auto": (
        lambda m, p: ties(m, base_model=broken_tokenizer_config(m, p), chat_template="auto"),
        "broken_tokenizer/tokenizer_config.json: unreadable (Expecting value"),
    "broken tokenizer config, a template": (  # the template is written into it after merging every tensor
        lambda m, p: ties(m, base_model=broken_tokenizer_config(m, p), chat_template="{{ messages }}"),
        "broken_tokenizer/tokenizer_config.json: unreadable (Expecting value"),
    "unknown chat template name": (lambda m, p: ties(m, chat_template="chatm1"),
                                   "chat_template: 'chatm1' is neither a Jinja template nor 'auto'"),
    "tokenizer source over a model without one": (
        lambda m, p: {**ties(m), "tokenizer_source": "base",
                      "models": [{"model": without_tokenizer(m, p), "parameters": {"weight": 1.0}}]},
        "no_tokenizer: tokenizer_source needs every model's tokenizer; transformers cannot load this one ("),
    "tokenizer block beside tokenizer_source": (lambda m, p: ties(m, tokenizer={"source": "base"}, tokenizer_source="base"),
                                                "tokenizer: give tokenizer or tokenizer_source, not both"),
    "padding to 0": (lambda m, p: ties(m, tokenizer={"pad_to_multiple_of": 0}),
                     "tokenizer.pad_to_multiple_of: Input should be greater than 0"),
    "a token the tokenizer lacks": (lambda m, p: ties(m, tokenizer={"tokens": {"<nope>": {"source": {"kind": "zero"}}}}),
                                    "tokens.<nope>: '<nope>' is not a token of the merged model's tokenizer"),
    "a token's row from no recipe model": (lambda m, p: ties(m, tokenizer={"tokens": {"a": {"source": str(p / "nope")}}}),
                                           "nope' is not one of the recipe's models"),
    "a token's row of a token the model lacks": (
        lambda m, p: ties(m, tokenizer={"tokens": {"a": {"source": {"kind": "model_token", "model": m[1], "token": "<nope>"}}}}),
        "has no token '<nope>'"),
    "a token's row past the model's": (
        lambda m, p: ties(m, tokenizer={"tokens": {"a": {"source": {"kind": "model_token", "model": m[1], "token_id": 999}}}}),
        "has no row 999"),
    "a model_token without a token": (
        lambda m, p: ties(m, tokenizer={"tokens": {"a": {"source": {"kind": "model_token", "model": m[1]}}}}),
        "tokenizer.tokens.a.source: kind model_token needs a model and one of token or token_id"),
    "padding without tokenizer_source": (lambda m, p: {"merge": {"method": "linear", "models": [{"model": m[1]}],
                                                                 "pad_to_multiple_of": 8}},
                                         "merge: tokens and pad_to_multiple_of need a tokenizer_source"),
    "tokenizer of another model": (lambda m, p: ties(m, tokenizer_source=other_shape(p)),
                                   "wide' is not one of the recipe's models"),
    "modules of a text model": (lambda m, p: modules(m, text_decoder={"models": [{"model": m[1]}]}),
                                "modules: llama is one module (its text model) in mergekit: give models or slices"),
    "modules without the text model": (lambda m, p: modules(m, vision_tower={"models": [{"model": m[1]}]}),
                                       "modules: the text model's module 'text_decoder' is missing"),
    "a vision tower of slices": (
        lambda m, p: modules(m, text_decoder={"models": [{"model": m[1]}]},
                             vision_tower={"slices": [{"sources": [{"model": m[1], "layer_range": [0, 2]}]}]}),
        "modules.vision_tower: evomerge merges the modules beside the text model whole, layers in place: give its models"),
    "models and modules": (lambda m, p: {**modules(m, text_decoder={"models": [{"model": m[1]}]}),
                                         "models": [{"model": m[1]}]},
                           "give exactly one of 'models', 'slices' or 'modules'"),
}


def modules(models, **parts):
    return {"merge_method": "linear", "modules": parts, "parameters": {"weight": 1.0}}


def test_tokenizer_source_names_a_recipe_model_however_its_path_is_spelled(models, tmp_path):
    """`tokenizer_source: dir/../b` is model `b`: the output gets b's tokenizer files (it was a KeyError after merging
    every tensor)."""
    base, a, b = models
    own = tmp_path / "own_tokenizer"
    shutil.copytree(b, own)
    config = json.loads((own / "tokenizer_config.json").read_text())
    (own / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    doc = ties((base, a, str(own)), tokenizer_source=f"{tmp_path}/../{tmp_path.name}/own_tokenizer")
    result = run("merge", write(tmp_path / "r.yaml", doc), tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 77


def test_della_with_density_zero_drops_that_models_delta(models, tmp_path):
    """Density 0 drops a delta whatever epsilon (as density 1 keeps it): della over (a, b) with b at density 0 is della
    over a alone (b is last, so a's mask key, its position, is the same)."""
    base, a, b = models
    entry = {"model": a, "parameters": {"weight": 0.7, "density": 0.5, "epsilon": 0.2}}
    both = {"merge_method": "della", "base_model": base, "dtype": "float32",
            "models": [entry, {"model": b, "parameters": {"weight": 0.9, "density": 0.0, "epsilon": 0.2}}]}
    for name, doc in (("both", both), ("alone", {**both, "models": [entry]})):
        result = run("merge", write(tmp_path / f"{name}.yaml", doc), tmp_path / name)
        assert result.exit_code == 0, result.output
    alone, dropped = load_file(tmp_path / "alone/model.safetensors"), load_file(tmp_path / "both/model.safetensors")
    assert set(alone) == set(dropped) and all(torch.equal(alone[n], dropped[n]) for n in alone)


@pytest.mark.parametrize("choice", ["auto", "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"])
def test_chat_template_auto_takes_the_most_common_one_and_a_template_is_written_as_given(models, tmp_path, choice):
    from transformers import AutoTokenizer

    base, a, b = models
    common = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    base, a, b = (str(with_chat_template(m, tmp_path / f"chat_{i}", t)) for i, (m, t) in  # b's: the same once stripped,
                  enumerate([(base, None), (a, common), (b, common + "\n")]))  # as mergekit compares them
    result = run("merge", write(tmp_path / "r.yaml", ties((base, a, b), chat_template=choice)), tmp_path / "out")
    assert result.exit_code == 0, result.output
    expected = common if choice == "auto" else choice
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template == expected
    assert tokenizer.apply_chat_template(messages, tokenize=False) == ("hi|yo|" if choice == "auto" else "<user>hi<assistant>yo")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == expected  # older transformers


def test_hub_ids_pinned_to_a_revision_merge_the_snapshot_of_that_revision(models, tmp_path, monkeypatch):
    """`org/name@revision` (mergekit's syntax) fetches that revision; the hub here is a stand-in serving the dirs."""
    import huggingface_hub

    base, a, b = models
    served = {("someone/base", None): base, ("someone/a", "v1"): a, ("someone/a", "0123abc"): b}
    asked = []

    def snapshot_download(repo_id, revision=None, **_):
        asked.append((repo_id, revision))
        return served[repo_id, revision]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    pinned = ties(("someone/base", "someone/a@v1", "someone/a@0123abc"))
    assert run("merge", write(tmp_path / "hub.yaml", pinned), tmp_path / "hub").exit_code == 0
    assert run("merge", write(tmp_path / "local.yaml", ties(models)), tmp_path / "local").exit_code == 0
    assert set(asked) == set(served)
    hub, local = load_file(tmp_path / "hub/model.safetensors"), load_file(tmp_path / "local/model.safetensors")
    assert set(hub) == set(local) and all(torch.equal(hub[n], local[n]) for n in hub)
    # the card's metadata names the hub repos merged (the Hub's family tree of the model); local dirs are no repos
    cards = [yaml.safe_load((tmp_path / out / "README.md").read_text().split("---")[1]) for out in ("hub", "local")]
    assert cards[0]["base_model"] == ["someone/base", "someone/a"] and cards[0]["base_model_relation"] == "merge"
    assert "base_model" not in cards[1] and cards[1]["tags"] == ["merge", "evomerge"]


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
RENDERED = {  # CONVERSATION with a generation prompt, as each format's models expect it
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\n2+2?\n\n### Response:\n",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\nHello!"
              "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|] Hi \n[|assistant|]Hello![|endofturn|]\n[|user|]2+2?\n[|assistant|]",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
              "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST] Be brief.\n\n Hi  [/INST] Hello!</s> [INST] 2+2? [/INST]",
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_a_named_chat_template_is_written_and_renders_its_format(models, tmp_path, name):
    from transformers import AutoTokenizer

    result = run("merge", write(tmp_path / "r.yaml", ties(models, chat_template=name)), tmp_path / "out")
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == RENDERED[name]


def test_named_chat_templates_render_as_mergekits_up_to_its_whitespace():
    """mergekit 0.1.5's files give chatml and mistral prompts alike, the other three with other whitespace only (the
    module docstring of evomerge/chat_templates.py says where)."""
    pytest.importorskip("mergekit")
    import importlib.resources
    import re

    from mergekit._data import chat_templates
    from transformers.utils.chat_template_utils import render_jinja_template

    from evomerge.chat_templates import NAMED_CHAT_TEMPLATES

    def render(template, conversation, generate):
        return render_jinja_template(conversations=[conversation], chat_template=template, bos_token="<s>",
                                     eos_token="</s>", add_generation_prompt=generate)[0][0]

    assert set(NAMED_CHAT_TEMPLATES) == {f.name.removesuffix(".jinja") for f in
                                         importlib.resources.files(chat_templates).iterdir() if f.name.endswith(".jinja")}
    for name, ours in NAMED_CHAT_TEMPLATES.items():
        theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
        for conversation in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[1:2]):
            for generate in (True, False):
                a, b = render(ours, conversation, generate), render(theirs, conversation, generate)
                assert a == b if name in ("chatml", "mistral") else re.sub(r"\s", "", a) == re.sub(r"\s", "", b)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_no_out(models, tmp_path, case):
    make_doc, expected = BAD[case]
    recipe = write(tmp_path / "bad.yaml", make_doc(models, tmp_path))
    result = run("merge", recipe, tmp_path / "out")
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: ") and expected in line, line
    assert str(tmp_path / "bad.yaml") in line or expected in ("nope",), line
    assert not (tmp_path / "out").exists()


def test_mergekit_tokenizer_block_is_tokenizer_source(models, tmp_path):
    """mergekit's newer `tokenizer: {source: X}` merges as `tokenizer_source: X` does."""
    for name, extra in (("block", {"tokenizer": {"source": models[1]}}), ("key", {"tokenizer_source": models[1]})):
        assert run("merge", write(tmp_path / f"{name}.yaml", {**ties(models), **extra}), tmp_path / name).exit_code == 0
    block, key = load_file(tmp_path / "block/model.safetensors"), load_file(tmp_path / "key/model.safetensors")
    assert block.keys() == key.keys() and all(torch.equal(block[n], key[n]) for n in key)


def test_a_stale_quantization_config_over_float_weights_merges(models, tmp_path):
    """A quantization_config left in config.json over float weights (a dequantized merge of a QLoRA run) is no reason
    to refuse: the weights are what is merged."""
    stale = quantized(models, tmp_path, weights="F32")
    doc = {**ties(models), "models": [{"model": stale, "parameters": {"weight": 1.0}}]}
    assert run("merge", write(tmp_path / "stale.yaml", doc), tmp_path / "out").exit_code == 0
    doc["models"] = [{"model": models[1], "parameters": {"weight": 1.0}}]
    assert run("merge", write(tmp_path / "plain.yaml", doc), tmp_path / "plain").exit_code == 0
    assert load_file(tmp_path / "out/model.safetensors").keys() == load_file(tmp_path / "plain/model.safetensors").keys()
    assert all(torch.equal(t, load_file(tmp_path / "plain/model.safetensors")[n])
               for n, t in load_file(tmp_path / "out/model.safetensors").items())


@pytest.mark.parametrize("device, expected", [("gpu", "error: --device: not a device: 'gpu'"),
                                              ("cuda:7", "error: --device: device 'cuda:7' ")])
def test_a_device_this_machine_lacks_is_one_line_and_no_out(models, tmp_path, device, expected):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    result = run("merge", write(tmp_path / "ok.yaml", ties(models)), tmp_path / "out", "--device", device)
    assert result.exit_code == 2 and result.output.startswith(expected) and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "out").exists()


def test_non_empty_out_is_refused_unless_force(models, tmp_path):
    recipe = write(tmp_path / "r.yaml", ties(models))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result = run("merge", recipe, tmp_path / "out")
    assert result.exit_code == 2 and "--force" in result.output
    assert (tmp_path / "out" / "keep.txt").exists()
    assert run("merge", recipe, tmp_path / "out", "--force").exit_code == 0
    assert (tmp_path / "out" / "config.json").exists()


def test_nan_weights_merge_with_allow_nonfinite(models, tmp_path):
    recipe = write(tmp_path / "r.yaml", ties(models, base_model=corrupt(models, tmp_path)))
    assert run("merge", recipe, tmp_path / "out", "--allow-nonfinite").exit_code == 0


@pytest.mark.parametrize("size", ["0", "-1MB", "0KB"])
def test_out_shard_size_must_be_positive(models, tmp_path, size):
    result = run("merge", write(tmp_path / "r.yaml", ties(models)), tmp_path / "out", "--out-shard-size", size)
    assert result.exit_code == 2 and result.output == f"error: --out-shard-size: must be positive, got '{size}' " \
                                                      "(examples: 500MB, 5GB)\n"
    assert not (tmp_path / "out").exists()


def test_eval_checks_every_target_before_scoring_any(models, tmp_path):
    bad = write(tmp_path / "bad.yaml", ties(models, base_model=str(tmp_path / "nope")))
    result = run("eval", models[0], bad, "--tasks", "toy_digits", "--output-json", tmp_path / "scores.json")
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {bad}: ") and "nope" in result.output
    assert len(result.output.splitlines()) == 1 and not (tmp_path / "scores.json").exists()  # models[0] not scored
    result = run("eval", models[0], tmp_path / "no_model", "--tasks", "toy_digits")
    assert result.exit_code == 2 and result.output == f"error: {tmp_path / 'no_model'}: not a model directory " \
                                                      "(no config.json)\n"
    broken = tmp_path / "broken_tokenizer"  # a recipe's merged model gets its base's tokenizer files as they are
    shutil.copytree(models[0], broken)
    (broken / "tokenizer.json").write_text("{")
    recipe = write(tmp_path / "r.yaml", ties(models, base_model=str(broken)))
    result = run("eval", models[0], recipe, "--tasks", "toy_digits", "--output-json", tmp_path / "scores.json")
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {recipe}: {broken}: transformers cannot load its tokenizer (")
    assert len(result.output.splitlines()) == 1 and not (tmp_path / "scores.json").exists()


def test_eval_exits_1_when_a_target_fails_after_writing_the_table(models, tmp_path):
    """A target whose evaluation fails (NaN weights) is a row marked failed in the table and the JSON, and the exit
    code says so (it was 0, so a script could not tell)."""
    nan = corrupt(models, tmp_path)
    result = run("eval", models[0], nan, "--tasks", "toy_digits", "--limit", "4", "--output-json", tmp_path / "s.json",
                 "--split", "test")
    assert result.exit_code == 1, result.output
    assert [r["status"] for r in json.loads((tmp_path / "s.json").read_text())["results"]] == ["ok", "failed"]
    assert f"error: 1 of 2 target(s) failed: {nan}\n" in result.output


@pytest.mark.parametrize("option", ["--output-json", "--output-md"])
def test_eval_checks_where_it_writes_before_scoring(models, tmp_path, option):
    out = tmp_path / "missing" / "scores"
    result = run("eval", models[0], "--tasks", "toy_digits", option, out)
    assert result.exit_code == 2 and result.output == f"error: {out}: cannot write (no such directory: {out.parent})\n"


def test_a_layer_path_over_a_model_with_layer_types(tmp_path):
    """mergekit keeps layer_types as they were (export warns); `evomerge merge` of the export cuts them to the path."""
    from evomerge.export import export_text
    from evomerge.recipe import load_recipe

    model = str(build_tiny("gemma2", tmp_path / "gemma2", num_layers=3))
    types = json.loads((tmp_path / "gemma2" / "config.json").read_text())["layer_types"]
    path = write(tmp_path / "path.yaml", {"layers": [{"source": model, "layer": i} for i in (0, 1, 1, 2)]})
    text, warnings = export_text(load_recipe(path), "mergekit")
    assert warnings == [f"{model}'s config has layer_types, which mergekit does not update for a layer path (3 entries "
                        "kept for 4 layers): its output may not load or may differ; `evomerge merge` writes them cut "
                        "to the path"]
    assert "slices:" in text
    result = run("merge", write(tmp_path / "exported.yaml", text), tmp_path / "out")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["layer_types"] == [types[0], types[1], types[1], types[2]]
    source = json.loads((tmp_path / "gemma2" / "config.json").read_text())
    assert {k: v for k, v in config.items() if k not in ("num_hidden_layers", "layer_types", "torch_dtype", "dtype")} \
        == {k: v for k, v in source.items() if k not in ("num_hidden_layers", "layer_types", "torch_dtype", "dtype")}


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_masks_do_not_depend_on_where_the_models_are_stored(models, tmp_path, method):
    moved = tmp_path / "elsewhere" / "deeper"
    copies = [shutil.copytree(m, moved / f"copy{i}") for i, m in enumerate(models)]
    for name, paths in (("here", models), ("moved", [str(p) for p in copies])):
        doc = ties(paths, merge_method=method, parameters={"epsilon": 0.1} if method == "della" else {})
        assert run("merge", write(tmp_path / f"{name}.yaml", doc), tmp_path / name).exit_code == 0
    here, moved_out = load_file(tmp_path / "here" / "model.safetensors"), load_file(tmp_path / "moved" / "model.safetensors")
    assert here.keys() == moved_out.keys() and all(torch.equal(here[k], moved_out[k]) for k in here)


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4")
    base = build_tiny("gemma4_text", root / "base", num_layers=3)
    return str(base), str(make_variants(base, root, n=1, scale=0.05)[0])


def passthrough(model, *ranges):
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": model, "layer_range": list(r)}]} for r in ranges]}


@pytest.mark.parametrize("key, doc, message", [
    ("slices", lambda m: passthrough(m[0], (0, 2), (1, 3)), "cannot be moved or repeated (its per-layer embeddings "
     "(embed_tokens_per_layer) hold a slice per layer and its last layers reuse earlier layers' keys and values); "
     "this writes layer 1 as layer 2"),
    ("slices", lambda m: passthrough(m[0], (0, 2)), "cannot be dropped (its per-layer embeddings"),
    ("layers", lambda m: {"layers": [{"source": m[1], "layer": i} for i in (0, 2, 1)]}, "this writes layer 2 as layer 1"),
])
def test_gemma4_layers_stay_where_they_are(gemma4, tmp_path, key, doc, message):
    """Gemma-4's per-layer embeddings are one tensor with a slice per layer, and its last layers reuse the keys and
    values of earlier ones: a written model that moves, repeats or drops its layers would be broken, so a layer path
    or mergekit slices that restack them are refused (one line, exit 2, no OUT). Slices that keep every layer in its
    place merge, equal to the plain merge."""
    result = run("merge", write(tmp_path / "r.yaml", doc(gemma4)), tmp_path / "out")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"error: {tmp_path / 'r.yaml'}: {key}: gemma4_text layers ") and message in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("parts, key, message", [
    ({"text_decoder": {"models": [{"model": "A"}]}, "vision_tower": {"models": [{"model": "A"}]},
      "projector": {"models": [{"model": "A"}]}},
     "modules.projector", "no module 'projector' in gemma3 (its modules: text_decoder, vision_tower, multi_modal_projector)"),
    ({"text_decoder": {"models": [{"model": "A"}]}, "vision_tower": {"models": [{"model": "A"}]}},
     "modules", "module multi_modal_projector of gemma3 is missing (mergekit would write a model without it)"),
    ({"text_decoder": {"models": [{"model": "A"}]}, "vision_tower": {"models": [{"model": "A"}], "parameters": {"t": 1}},
      "multi_modal_projector": {"models": [{"model": "A"}]}},
     "modules.vision_tower.parameters.t", "unknown parameter 't' for method linear"),
])
def test_modules_name_each_module_of_the_family_once(tmp_path, parts, key, message):
    """mergekit's `modules:` (an image-text model's text model, vision tower and projector, each merged from models of
    its own): a module the family lacks, or one left out, is one line naming it (mergekit would leave the module's
    tensors out of the written model)."""
    base = str(build_tiny("gemma3", tmp_path / "base", num_layers=2))
    parts = {name: {**part, "models": [{"model": base}]} for name, part in parts.items()}
    doc = {"merge_method": "linear", "modules": parts, "parameters": {"weight": 1.0}}
    result = run("merge", write(tmp_path / "r.yaml", doc), tmp_path / "out")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"error: {tmp_path / 'r.yaml'}: {key}: {message}"), result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["qwen3_5_text", "lfm2", "nemotron_h"])
def test_a_hybrid_layer_path_keeps_an_attention_layer(tmp_path, family):
    """Qwen3.5's linear-attention, LFM2's convolution and Nemotron-H's Mamba layers need one softmax-attention layer in
    the model (transformers builds its masks there): a written path without one is refused in one line; a search's
    trial over such a path fails with that line, not transformers' error."""
    from evomerge.recipe import LayerSlot, Recipe
    from evomerge.run.worker import TrialRunner

    base = build_tiny(family, tmp_path / "base", num_layers=3)
    kinds = json.loads((base / "config.json").read_text())
    kinds = kinds.get("layer_types") or kinds["layers_block_type"]
    others = [i for i, kind in enumerate(kinds) if "attention" not in kind or kind == "linear_attention"]
    result = run("merge", write(tmp_path / "r.yaml", {"layers": [{"source": str(base), "layer": i} for i in others]}),
                 tmp_path / "out")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"layers: a {family} model needs one of its attention layers" in result.output and not (tmp_path / "out").exists()
    runner = TrialRunner([str(base)], str(base), lambda: None, dtype="float32")
    trial = runner.run(0, Recipe(layers=[LayerSlot(source=str(base), layer=i) for i in others]))
    assert trial.status == "failed" and f"a {family} model needs one of its attention layers" in trial.error, trial.error


def test_jamba_layers_stay_where_they_are(tmp_path):
    """Jamba's config gives each layer's kind (attention or Mamba, experts or an MLP) by periods and offsets, which
    cannot spell a restacked path's kinds: a layer path that moves its layers is refused."""
    base = str(build_tiny("jamba", tmp_path / "base", num_layers=3))
    result = run("merge", write(tmp_path / "r.yaml", {"layers": [{"source": base, "layer": i} for i in (0, 2, 1)]}),
                 tmp_path / "out")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"error: {tmp_path / 'r.yaml'}: layers: jamba layers cannot be moved or repeated "
                                    "(its config gives each layer's kind by periods and offsets"), result.output
    assert not (tmp_path / "out").exists()


def test_gemma4_slices_in_place_merge(gemma4, tmp_path):
    base, ft = gemma4
    sliced = {"merge_method": "linear", "dtype": "float32", "slices": [
        {"sources": [{"model": m, "layer_range": list(r), "parameters": {"weight": 0.5}} for m in (base, ft)]}
        for r in ((0, 1), (1, 3))]}
    plain = {"merge_method": "linear", "dtype": "float32",
             "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (base, ft)]}
    assert run("merge", write(tmp_path / "s.yaml", sliced), tmp_path / "s").exit_code == 0
    assert run("merge", write(tmp_path / "p.yaml", plain), tmp_path / "p").exit_code == 0
    got, expected = load_file(tmp_path / "s/model.safetensors"), load_file(tmp_path / "p/model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)


def test_a_qwen2_5_vl_config_without_text_config_merges_as_the_hubs_do(tmp_path):
    """Qwen2.5-VL's hub config.json holds the text model's settings at its top (no text_config): the layer count is
    read there, a merge writes it there, and the result equals the merge of the same models with transformers 5's
    config (text_config); transformers loads both."""
    from transformers import AutoModelForImageTextToText

    base = build_tiny("qwen2_5_vl", tmp_path / "new" / "base", num_layers=3, hidden=32)
    models = [base, *make_variants(base, tmp_path / "new", n=1)]
    for model in models:  # the same weights, the config as the hub has it
        shutil.copytree(model, tmp_path / "hub" / model.name)
        config = json.loads((model / "config.json").read_text())
        text = config.pop("text_config")
        (tmp_path / "hub" / model.name / "config.json").write_text(json.dumps({**text, **config}))
    for kind in ("new", "hub"):
        base, a = (str(tmp_path / kind / m.name) for m in models[:2])
        sources = [{"model": base, "layer_range": [0, 2]},
                   {"model": a, "layer_range": [0, 2], "parameters": {"weight": 0.5, "density": 0.5}}]
        doc = {"merge_method": "ties", "base_model": base, "slices": [{"sources": sources}], "dtype": "float32"}
        assert run("merge", write(tmp_path / f"{kind}.yaml", doc), tmp_path / f"{kind}_out").exit_code == 0
    hub, new = (json.loads((tmp_path / f"{k}_out/config.json").read_text()) for k in ("hub", "new"))
    assert "text_config" not in hub and hub["num_hidden_layers"] == 2 and new["text_config"]["num_hidden_layers"] == 2
    merged = [load_file(tmp_path / f"{k}_out/model.safetensors") for k in ("hub", "new")]
    assert merged[0].keys() == merged[1].keys() and all(torch.equal(merged[0][n], merged[1][n]) for n in merged[0])
    for kind in ("hub", "new"):
        assert AutoModelForImageTextToText.from_pretrained(tmp_path / f"{kind}_out").config.text_config.num_hidden_layers == 2


def test_an_image_text_merge_ships_the_image_processor(tmp_path):
    """A merged image-text model takes images: it ships the image processor of the model whose tokenizer it ships
    (preprocessor_config.json, as AutoImageProcessor reads it), beside the tokenizer."""
    from transformers import AutoImageProcessor, Gemma3ImageProcessor

    base = build_tiny("gemma3", tmp_path / "base", num_layers=2)
    (ft,) = make_variants(base, tmp_path, n=1)
    Gemma3ImageProcessor(size={"height": 56, "width": 56}).save_pretrained(base)
    doc = {"merge_method": "linear", "models": [{"model": str(base)}, {"model": str(ft)}], "parameters": {"weight": 0.5}}
    assert run("merge", write(tmp_path / "r.yaml", doc), tmp_path / "out").exit_code == 0
    assert AutoImageProcessor.from_pretrained(tmp_path / "out").size == {"height": 56, "width": 56}


def test_gpt_oss_mxfp4_checkpoints_are_refused_as_quantized(tmp_path):
    """The hub's gpt-oss checkpoints hold their experts in MXFP4 (uint8 blocks and scales beside a quantization_config):
    refused in one line, where their BF16 versions (the names transformers writes) merge."""
    base = build_tiny("gpt_oss", tmp_path / "base", num_layers=2, hidden=32)
    (bf16,) = make_variants(base, tmp_path, n=1)
    mxfp4 = tmp_path / "mxfp4"
    shutil.copytree(bf16, mxfp4)
    tensors = load_file(mxfp4 / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts = tensors.pop(name)
        tensors[f"{name}_blocks"] = torch.zeros(*experts.shape[:2], experts.shape[2] // 32, 16, dtype=torch.uint8)
        tensors[f"{name}_scales"] = torch.zeros(*experts.shape[:2], experts.shape[2] // 32, dtype=torch.uint8)
    save_file(tensors, mxfp4 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((mxfp4 / "config.json").read_text())
    (mxfp4 / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}}))
    doc = {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                                                {"model": str(bf16), "parameters": {"weight": 0.5}}]}
    assert run("merge", write(tmp_path / "bf16.yaml", doc), tmp_path / "out").exit_code == 0
    doc["models"][1]["model"] = str(mxfp4)
    result = run("merge", write(tmp_path / "mxfp4.yaml", doc), tmp_path / "refused")
    assert result.exit_code == 2 and "a quantized checkpoint (mxfp4: model.layers.0.mlp.experts." in result.output, result.output
    assert not (tmp_path / "refused").exists()
