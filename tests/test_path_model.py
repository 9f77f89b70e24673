"""Layer paths: the live path model (resident layers, hidden-state scales) == the merged dir with scales folded in."""

import importlib.util
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.export import export_text
from evomerge.merge.materialize import merge_to_dir
from evomerge.models.architectures import ARCHITECTURES, architecture_for
from evomerge.models.io import load_live_model
from evomerge.recipe import LayerSlot, Recipe, recipe_from_dict
from evomerge.run.path_model import build_path_model, decoder_layers
from tiny_models import LINEAR_ATTENTION, build_tiny, make_variants


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("path_models")
    base = build_tiny("llama", root / "base", num_layers=3, hidden=32, rms_norm_eps=1e-12, dtype=torch.float64)
    (a,) = make_variants(base, root, n=1, scale=0.05)
    return str(base), str(a)


PATH = [("base", 0, 1.0), ("a", 1, 0.8), ("a", 1, 1.25), ("base", 2, 0.5), ("a", 2, 1.0)]


def live_path(models):
    base, a = models
    live = {"base": load_live_model(base, dtype=torch.float64), "a": load_live_model(a, dtype=torch.float64)}
    layers = {name: decoder_layers(m) for name, m in live.items()}
    return live, build_path_model(live["base"], layers, PATH, last=live["a"])


def test_path_model_shares_weights_and_matches_the_folded_merge(models, tmp_path):
    base, a = models
    names = {"base": base, "a": a}
    live, path_model = live_path(models)
    assert path_model.model.layers[1].layer.mlp is live["a"].model.layers[1].mlp  # no copy
    repeated = path_model.model.layers[2].layer, path_model.model.layers[1].layer  # own layer_idx (KV cache), same weights
    assert repeated[0] is not repeated[1] and repeated[0].self_attn.q_proj is repeated[1].self_attn.q_proj
    path_params = {p.data_ptr() for p in path_model.parameters()}
    assert path_params <= {p.data_ptr() for m in live.values() for p in m.parameters()}  # no new memory
    assert len(live["base"].model.layers) == 3 and live["base"].config.num_hidden_layers == 3  # sources untouched
    recipe = Recipe(layers=[LayerSlot(source=names[s], layer=i, scale=c) for s, i, c in PATH])
    merge_to_dir(recipe, tmp_path / "out", progress=False)
    merged = load_live_model(tmp_path / "out", dtype=torch.float64)
    assert merged.config.num_hidden_layers == len(PATH)
    tokens = torch.randint(4, 60, (2, 7))
    with torch.no_grad():
        expected = merged(tokens).logits
        got = path_model(tokens).logits
        unscaled = build_path_model(live["base"], {n: decoder_layers(m) for n, m in live.items()},
                                    [(s, i, 1.0) for s, i, _ in PATH], last=live["a"])(tokens).logits
    # transformers' RMSNorm computes in float32, hence 1e-6 and not float64 round-off; ignoring the scales is far off
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert (unscaled - expected).abs().max() > 1e-3


def test_repeated_layers_get_their_own_kv_cache_entries(models):
    _, path_model = live_path(models)
    tokens = torch.randint(4, 60, (1, 5))
    with torch.no_grad():
        greedy = path_model.generate(tokens, max_new_tokens=6, do_sample=False, use_cache=True)
        no_cache = path_model.generate(tokens, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(greedy, no_cache)


def test_exported_path_folds_scales_for_mergekit(models, tmp_path):
    """A path with hidden-state scales exports to mergekit passthrough slices whose weight scales give the same model."""
    base, a = models
    names = {"base": base, "a": a}
    recipe = Recipe(layers=[LayerSlot(source=names[s], layer=i, scale=c) for s, i, c in PATH])
    text, warnings = export_text(recipe, "mergekit")
    assert warnings == [] and "o_proj" in text and "down_proj" in text
    reimported = recipe_from_dict(list(yaml.safe_load_all(text)))
    assert reimported.merge.method == "passthrough" and len(reimported.merge.slices) == len(PATH)
    merge_to_dir(recipe, tmp_path / "direct", progress=False)
    merge_to_dir(reimported, tmp_path / "via_mergekit_yaml", progress=False)
    direct, via = load_file(tmp_path / "direct/model.safetensors"), load_file(tmp_path / "via_mergekit_yaml/model.safetensors")
    outputs = [via]
    if importlib.util.find_spec("mergekit"):  # and mergekit itself, on the exported YAML
        from mergekit_harness import load_dir, run_mergekit

        (tmp_path / "export.yaml").write_text(text)
        run_mergekit(tmp_path / "export.yaml", tmp_path / "mergekit")
        outputs.append(load_dir(tmp_path / "mergekit"))
    for other in outputs:
        assert set(other) == set(direct)
        for name in direct:
            torch.testing.assert_close(other[name], direct[name], atol=0, rtol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_a_head_tied_to_the_embeddings_is_the_written_models(family, tmp_path):
    """Llama-3.2 and Gemma tie the head to the embeddings: the written model keeps one matrix, the first slot's source's
    embeddings, so the scored path model must use it as its head too (not the last slot's). mergekit agrees."""
    base = build_tiny(family, tmp_path / "base", num_layers=3, hidden=32, rms_norm_eps=1e-12, dtype=torch.float64,
                      tie_word_embeddings=True)
    (a,) = make_variants(base, tmp_path, n=1, scale=0.05)
    names = {"base": str(base), "a": str(a)}
    live = {n: load_live_model(p, dtype=torch.float64) for n, p in names.items()}
    path = [("base", 0, 1.0), ("a", 1, 0.8), ("a", 2, 1.25)]
    path_model = build_path_model(live["base"], {n: decoder_layers(m) for n, m in live.items()}, path, last=live["a"])
    recipe = Recipe(layers=[LayerSlot(source=names[s], layer=i, scale=c) for s, i, c in path])
    merge_to_dir(recipe, tmp_path / "out", progress=False)
    written = load_file(tmp_path / "out/model.safetensors")
    assert "lm_head.weight" not in written  # one matrix for both
    tokens = torch.randint(4, 60, (2, 7))
    with torch.no_grad():
        expected = load_live_model(tmp_path / "out", dtype=torch.float64)(tokens).logits
        torch.testing.assert_close(path_model(tokens).logits, expected, atol=1e-6, rtol=1e-5)
        path_model.tie_weights()  # as lm-eval's HFLM does to every model it wraps: it must change nothing
        torch.testing.assert_close(path_model(tokens).logits, expected, atol=1e-6, rtol=1e-5)
    for m in live.values():  # the live sources keep their own heads (the old path model lent it the last one's, which
        assert m.lm_head.weight is m.get_input_embeddings().weight  # tie_weights then re-pointed at the first's)
    if importlib.util.find_spec("mergekit"):
        from mergekit_harness import load_dir, run_mergekit

        (tmp_path / "export.yaml").write_text(export_text(recipe, "mergekit")[0])
        run_mergekit(tmp_path / "export.yaml", tmp_path / "mergekit")
        theirs = load_dir(tmp_path / "mergekit")
        for name in written:
            torch.testing.assert_close(theirs[name], written[name], atol=0, rtol=1e-12)


LAYER_PATH_FAMILIES = [arch.name for arch in ARCHITECTURES if not arch.fixed_layers]
# gemma3's layers alternate sliding-window and full attention, each with its own rotary embedding: the path model must
# give each slot its layer's kind (a window of 3 tokens is shorter than the 7 scored, so a wrong kind changes the logits)
OVERRIDES = {"gemma3_text": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "sliding_window": 3}}
# Qwen3.5 runs its linear attention in float32 whatever the model's dtype, so a scale folded into a weight agrees only to
# float32 rounding (amplified over the layers): there the path's scales are powers of two, exact in any precision
FLOAT32_INSIDE, BINARY = set(LINEAR_ATTENTION), {0.8: 0.5, 1.25: 2.0}


@pytest.mark.parametrize("family", LAYER_PATH_FAMILIES)
def test_every_family_scores_the_model_it_writes(family, tmp_path):
    """For every family a search runs layer paths on: the live path model's logits are the written model's; scales
    where the family's output projections can hold them (else the search refuses scales, tests/test_checks.py)."""
    eps = {"cohere2": "layer_norm_eps", "starcoder2": "norm_epsilon", "lfm2": "norm_eps", "cohere": "layer_norm_eps",
           "stablelm": "layer_norm_eps", "phi": "layer_norm_eps", "nemotron": "norm_eps",
           "nemotron_h": "layer_norm_epsilon", "lfm2_moe": "norm_eps", "gpt2": "layer_norm_epsilon",
           "gpt_bigcode": "layer_norm_epsilon", "falcon": "layer_norm_epsilon", "mamba": "layer_norm_epsilon",
           "gpt_neox": "layer_norm_eps"}.get(family, "rms_norm_eps")
    base = build_tiny(family, tmp_path / "base", num_layers=3, hidden=32, dtype=torch.float64,
                      **{eps: 1e-12, **OVERRIDES.get(family, {})})
    (a,) = make_variants(base, tmp_path, n=1, scale=0.05)
    names = {"base": str(base), "a": str(a)}
    foldable = bool(architecture_for(json.loads((base / "config.json").read_text()), "config.json").output_projections)
    path = [(s, i, BINARY.get(c, c) if family in FLOAT32_INSIDE else c if foldable else 1.0) for s, i, c in PATH]
    live = {n: load_live_model(p, dtype=torch.float64) for n, p in names.items()}
    path_model = build_path_model(live["base"], {n: decoder_layers(m) for n, m in live.items()}, path, last=live["a"])
    merge_to_dir(Recipe(layers=[LayerSlot(source=names[s], layer=i, scale=c) for s, i, c in path]), tmp_path / "out",
                 progress=False)
    written = load_live_model(tmp_path / "out", dtype=torch.float64)
    if family in OVERRIDES:  # each slot keeps its source layer's attention kind
        assert written.config.layer_types == [OVERRIDES[family]["layer_types"][i] for _, i, _ in path]
    tokens = torch.randint(4, 60, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(path_model(tokens).logits, written(tokens).logits, atol=1e-6, rtol=1e-5)
