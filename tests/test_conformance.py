"""evomerge merge == mergekit run_merge on the same mergekit YAML, tensor by tensor, for every method both tools have.

Tolerances: float32 sources, both tools compute in float32: 2e-5 absolute (summation order differs). TIES-family: our
top-k keeps every element tied at the threshold while mergekit's argsort picks arbitrarily among ties; random float
deltas have no ties, so the comparison is element-wise. DARE/DELLA draw different masks (mergekit uses torch's global RNG,
we a counter-based generator), so they are compared by statistics: with rescale the L1 norm of each task vector is kept
exactly by both, and the merged delta agrees in expectation.
"""

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("mergekit")

from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.export import export_text  # noqa: E402
from evomerge.models.architectures import ARCHITECTURES, architecture_for  # noqa: E402
from evomerge.recipe import LayerSlot, Recipe  # noqa: E402
from mergekit_harness import RANDOMIZED, build_zoo, load_dir, method_configs, run_evomerge, run_mergekit, write_config  # noqa: E402
from tiny_models import DENSE_FIRST, FAMILIES, IMAGE_TEXT, MOE, add_mtp_layer, build_tiny, make_variants  # noqa: E402

DETERMINISTIC = [name for name in method_configs("b", ["x", "y", "z"]) if name not in RANDOMIZED]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("conformance_zoo"))


def merge_both(zoo, tmp_path, name):
    base, models = zoo
    config = write_config(tmp_path / f"{name}.yaml", name, method_configs(base, models)[name])
    run_mergekit(config, tmp_path / "mergekit")
    run_evomerge(config, tmp_path / "evomerge")
    return load_dir(tmp_path / "mergekit"), load_dir(tmp_path / "evomerge")


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_same_tensors_as_mergekit(zoo, tmp_path, name):
    theirs, ours = merge_both(zoo, tmp_path, name)
    assert set(ours) == set(theirs)
    for tensor_name, expected in theirs.items():
        got = ours[tensor_name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, tensor_name
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name} {tensor_name}: {m}")


@pytest.mark.parametrize("name", sorted(RANDOMIZED))
def test_randomized_methods_agree_in_distribution(zoo, tmp_path, name):
    base_dir, _ = zoo
    base = load_dir(base_dir)
    theirs, ours = merge_both(zoo, tmp_path, name)
    for tensor_name, expected in theirs.items():
        if expected.numel() < 2048:
            continue
        d_theirs, d_ours = expected - base[tensor_name], ours[tensor_name] - base[tensor_name]
        kept_theirs, kept_ours = (d_theirs != 0).float().mean(), (d_ours != 0).float().mean()
        assert abs(kept_theirs - kept_ours) < 0.05, (tensor_name, kept_theirs, kept_ours)
        l1_theirs, l1_ours = d_theirs.abs().sum(), d_ours.abs().sum()
        assert abs(l1_theirs - l1_ours) / l1_theirs < 0.1, (tensor_name, l1_theirs, l1_ours)
        # same expectation: the merged deltas correlate with each other as two draws of one distribution do
        corr = torch.corrcoef(torch.stack([d_theirs.flatten(), d_ours.flatten()]))[0, 1]
        assert corr > 0.2, (tensor_name, corr)


def test_dare_keeps_density_and_l1_exactly_with_rescale(zoo, tmp_path):
    base_dir, models = zoo
    base = load_dir(base_dir)
    model = load_dir(models[0])
    config = write_config(tmp_path / "dare.yaml", "dare_linear", {
        "base_model": base_dir, "models": [{"model": models[0], "parameters": {"weight": 1.0, "density": 0.3}}]})
    run_evomerge(config, tmp_path / "out")
    ours = load_dir(tmp_path / "out")
    for name, tensor in ours.items():
        delta, original = tensor - base[name], model[name] - base[name]
        if delta.numel() >= 4096:
            assert abs((delta != 0).float().mean() - 0.3) < 0.03, name
            torch.testing.assert_close(delta.abs().sum(), original.abs().sum(), rtol=1e-4, atol=1e-6)


def test_a_smooth_filter_split_space_decodes_to_what_mergekit_merges(zoo, tmp_path):
    """A TIES genome of `layer_groups: 2, smooth: true, split: [q_proj, mlp]` (2 groups interpolated over 3 layers,
    a gene per filter and the rest), exported for mergekit: mergekit's merge equals evomerge's."""
    import numpy as np

    from evomerge.recipe import save_recipe
    from evomerge.spaces import space_from_dict

    base, models = zoo
    space = space_from_dict({"kind": "ps", "method": "ties", "base_model": base, "models": models[:2],
                             "layer_groups": 2, "smooth": True, "split": ["q_proj", "mlp"],
                             "bounds": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}},
                            num_layers={m: 3 for m in [base, *models]})
    recipe = space.decode(np.random.default_rng(0).random(space.dim))
    save_recipe(recipe, tmp_path / "decoded.yaml", fmt="mergekit")
    run_mergekit(tmp_path / "decoded.yaml", tmp_path / "mergekit")
    run_evomerge(tmp_path / "decoded.yaml", tmp_path / "evomerge")
    theirs, ours = load_dir(tmp_path / "mergekit"), load_dir(tmp_path / "evomerge")
    assert set(ours) == set(theirs)
    for tensor_name, expected in theirs.items():
        torch.testing.assert_close(ours[tensor_name], expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["ties", "slices_ties", "passthrough", "linear", "breadcrumbs_ties"])
def test_round_trips_give_the_same_tensors(zoo, tmp_path, name):
    """mergekit YAML -> Recipe -> mergekit YAML (run by mergekit) and -> evomerge YAML (run by us): same tensors."""
    from evomerge.recipe import load_recipe, save_recipe

    base, models = zoo
    original = write_config(tmp_path / "original.yaml", name, method_configs(base, models)[name])
    recipe = load_recipe(original)
    save_recipe(recipe, tmp_path / "exported_mergekit.yaml", fmt="mergekit")
    save_recipe(recipe, tmp_path / "exported_evomerge.yaml", fmt="evomerge")
    run_evomerge(original, tmp_path / "reference")
    run_mergekit(tmp_path / "exported_mergekit.yaml", tmp_path / "mergekit")
    run_evomerge(tmp_path / "exported_evomerge.yaml", tmp_path / "evomerge")
    reference = load_dir(tmp_path / "reference")
    for other in (load_dir(tmp_path / "mergekit"), load_dir(tmp_path / "evomerge")):
        assert set(other) == set(reference)
        for tensor_name, expected in reference.items():
            torch.testing.assert_close(other[tensor_name], expected, atol=2e-5, rtol=1e-5)


# mergekit 0.1.5's gpt-neox table requires the `attention.bias` and `rotary_emb.inv_freq` buffers of older checkpoints,
# which transformers no longer saves; its Qwen2-VL table reads `num_hidden_layers` at the top of the config, where
# transformers 5 has none (it moves the text model's settings into text_config). It has no table for DeepSeek-V3 or
# GLM-4.7-Flash or Llama 4's text model and infers one from the first layer's names, a dense layer's: it leaves their
# experts out.
NO_MERGEKIT_EXPERTS = {"deepseek_v3", "glm4_moe_lite", "llama4_text", "afmoe", "deepseek_v2", "dots1", "deepseek_v32",
                       "glm_moe_dsa"}  # (AFMoE's
# table is partial)
NO_MERGEKIT_LAYERS = {"nemotron_h"}  # no table either, and what it infers finds no layer under `backbone.`: it writes
# the embeddings, final norm and head only


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"gpt_neox", "qwen2_vl"} - NO_MERGEKIT_EXPERTS
                                           - NO_MERGEKIT_LAYERS))
def test_every_family_merges_and_stacks_layers_as_mergekit_does(family, tmp_path):
    """Our naming table against mergekit's architecture file of each family: a TIES merge with per-layer and
    filtered weights, and a layer path exported as passthrough slices (scales where the family can hold them), give
    the same tensors under the same names (the path through `evomerge export`). The path keeps the layer count:
    mergekit copies a config's per-layer `layer_types` unchanged, which transformers refuses for another count.
    Mixtures of experts in fused form: mergekit 0.1.5's tables name only that (it leaves per-expert tensors out).
    A family mergekit 0.1.5 has no table for (OLMo-3, Qwen3.5, ...) it infers from the tensor names, with every
    non-layer tensor before the layers: a path's final norm and head then come from its first slot's source, where its
    tables (and evomerge) take them from the last slot's; those two are left out of the path's comparison there.
    Tensors are compared under the live module's names: without a table for Granite 3.x MoE, mergekit writes its
    fused experts and router so, evomerge as its checkpoints name them (both load)."""
    from mergekit.architecture import arch_info_for_config
    from transformers import AutoConfig

    base = build_tiny(family, tmp_path / "base", num_layers=3, hidden=32, fused=family in MOE)
    a, b = make_variants(base, tmp_path, n=2)
    config = write_config(tmp_path / "ties.yaml", "ties", method_configs(str(base), [str(a), str(b), str(base)])["ties"])
    run_mergekit(config, tmp_path / "ties_mergekit")
    run_evomerge(config, tmp_path / "ties_evomerge")
    arch = architecture_for(json.loads((base / "config.json").read_text()), "config.json")
    kinds = ["ties"]
    # mergekit 0.1.5 stacks an image-text model's layers only by its `modules:` syntax (the export writes it where
    # mergekit has a table of modules); Gemma-4's cannot move at all
    if (family not in IMAGE_TEXT or arch.modules) and not arch.fixed_layers:
        kinds.append("path")
        path = Recipe(layers=[LayerSlot(source=str(a), layer=0), LayerSlot(source=str(base), layer=2, scale=0.8),
                              LayerSlot(source=str(b), layer=1, scale=1.25)])
        text, _ = export_text(path, "mergekit")  # a family that cannot fold scales exports them unscaled, with a warning
        (tmp_path / "path.yaml").write_text(text)
        run_mergekit(tmp_path / "path.yaml", tmp_path / "path_mergekit")
        run_evomerge(tmp_path / "path.yaml", tmp_path / "path_evomerge")
    inferred = arch_info_for_config(AutoConfig.from_pretrained(base)) is None
    # mergekit's Qwen2.5-VL table lists the projector's MLP as the template of two layers without an index, so a
    # gradient takes its end value there (t = 1); evomerge merges it as the other tensors outside the layers (t = 0)
    at_gradient_end = r"visual\.merger\.mlp\." if family == "qwen2_5_vl" else "$^"
    # mergekit's LFM2 table puts its final norm (embedding_norm) before the layers: a path takes it from the first
    # slot's source, evomerge (as for every final norm) from the last slot's
    final_norm_first = "model.embedding_norm.weight" if family == "lfm2" else None
    for kind in kinds:
        theirs, ours = ({arch.live_names(n)[-1]: t for n, t in load_dir(tmp_path / f"{kind}_{tool}").items()}
                        for tool in ("mergekit", "evomerge"))
        assert set(ours) == set(theirs), (kind, set(ours) ^ set(theirs))
        for name, expected in theirs.items():
            if not (kind == "path" and (inferred and arch.is_post_layer(name) or name == final_norm_first)) \
                    and not re.search(at_gradient_end, name):
                torch.testing.assert_close(ours[name], expected, atol=2e-5, rtol=1e-5, msg=lambda m: f"{kind} {name}: {m}")


ARCHITECTURES_BY_NAME = {a.name: a for a in ARCHITECTURES}
# mergekit has a table of their modules (its Qwen2-VL table reads the layer count at the top of a config, where
# transformers 5 writes it into text_config: it cannot read our Qwen2-VL at all)
MODULES = [f for f in IMAGE_TEXT if ARCHITECTURES_BY_NAME[f].modules and f != "qwen2_vl"]


@pytest.mark.parametrize("family", MODULES)
def test_modules_merge_each_part_from_its_own_models_as_mergekit_does(family, tmp_path):
    """mergekit's `modules:` syntax: the text model from slices (two, with parameters of their own), the vision tower
    and the projector each from their own models, each module's parameters between its slices' and the stage's (a
    gradient over the vision tower's layers), the same tensors as mergekit's."""
    base = build_tiny(family, tmp_path / "base", num_layers=3, hidden=32, fused=family in MOE)
    a, b = make_variants(base, tmp_path, n=2)
    base, a, b = str(base), str(a), str(b)
    vision = next(name for name, _ in ARCHITECTURES_BY_NAME[family].modules if name.startswith("vision"))
    text = {"slices": [{"sources": [{"model": m, "layer_range": [0, 2], **extra} for m, extra in
                                    ((a, {"parameters": {"weight": 0.7}}), (b, {}), (base, {}))],
                        "parameters": {"density": 0.5}},
                       {"sources": [{"model": m, "layer_range": [2, 3]} for m in (a, b, base)]}],
            "parameters": {"weight": [0.2, 0.9]}}
    modules = {"text_decoder": text,
               vision: {"models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": b}],
                        "parameters": {"weight": [1.0, 0.0], "density": 0.8}},
               "multi_modal_projector": {"models": [{"model": b}], "parameters": {"weight": 0.5}}}
    config = write_config(tmp_path / "modules.yaml", "ties", {"merge_method": "ties", "base_model": base,
                                                              "modules": modules, "parameters": {"weight": 0.4,
                                                                                                 "density": 0.6}})
    run_mergekit(config, tmp_path / "mergekit")
    run_evomerge(config, tmp_path / "evomerge")
    arch = ARCHITECTURES_BY_NAME[family]
    theirs, ours = ({arch.live_names(n)[-1]: t for n, t in load_dir(tmp_path / tool).items()}
                    for tool in ("mergekit", "evomerge"))
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for name, expected in theirs.items():
        torch.testing.assert_close(ours[name], expected, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    tower = next(n for n in load_dir(base) if arch.module_of(n) == vision)
    assert not torch.equal(load_dir(tmp_path / "evomerge")[tower], load_dir(base)[tower])


@pytest.mark.parametrize("family", sorted(set(MOE) - {"qwen3_5_moe", "lfm2_moe", "ernie4_5_moe", "jamba"} - NO_MERGEKIT_EXPERTS))
def test_per_expert_checkpoints_merge_as_mergekit_merges_them_fused(family, tmp_path):
    """A hub MoE checkpoint holds each expert's tensors; mergekit 0.1.5 reads them fused (transformers 5's layout) and
    writes them so, evomerge merges and writes them expert by expert. For element-wise methods the values agree:
    evomerge's experts, fused as transformers fuses them (gate rows, then up rows), are mergekit's tensors; a filter
    matches the names mergekit reads them under too (`mlp`: Mixtral's block_sparse_moe experts and router).
    (Of an image-text Qwen3.5-MoE, an LFM2-MoE, an ERNIE-4.5-MoE or a Jamba checkpoint with per-expert tensors
    mergekit 0.1.5 writes no expert at all.)"""
    base = build_tiny(family, tmp_path / "base", num_layers=2, hidden=32)
    a, b = make_variants(base, tmp_path, n=2)
    arch = architecture_for(json.loads((base / "config.json").read_text()), "config.json")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(a), "parameters": {"weight": [0.3, 0.9]}},
                         {"model": str(b), "parameters": {"weight": [{"filter": "self_attn", "value": 0.6},
                                                                     {"filter": "mlp", "value": 0.1},
                                                                     {"value": [0.2, 0.8]}]}}]}
    config = write_config(tmp_path / "ta.yaml", "task_arithmetic", recipe)
    run_mergekit(config, tmp_path / "mergekit")
    run_evomerge(config, tmp_path / "evomerge")
    theirs, ours = load_dir(tmp_path / "mergekit"), load_dir(tmp_path / "evomerge")
    fused: dict[str, dict[int, dict[int, torch.Tensor]]] = {}  # live name -> expert -> chunk -> tensor
    for name, tensor in ours.items():
        if where := arch.live_expert(name):
            live_name, expert, chunk, _ = where
            fused.setdefault(live_name, {}).setdefault(expert, {})[chunk] = tensor
        else:  # Mixtral's router: block_sparse_moe.gate there, mlp.gate in transformers 5
            torch.testing.assert_close(tensor, theirs[arch.live_names(name)[-1]], atol=2e-5, rtol=1e-5)
    assert set(theirs) == set(fused) | {arch.live_names(n)[-1] for n in ours if not arch.live_expert(n)}
    assert len(fused) == (2 if family in DENSE_FIRST else 4)  # gate_up_proj and down_proj of each layer of experts
    for live_name, experts in fused.items():
        stacked = torch.stack([torch.cat([chunks[k] for k in sorted(chunks)]) for _, chunks in sorted(experts.items())])
        torch.testing.assert_close(stacked, theirs[live_name], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "granitemoe"])
def test_a_scaled_layer_path_over_hub_expert_checkpoints_exports_scales_mergekit_applies(family, tmp_path):
    """A hub checkpoint names each expert's tensors (Granite 3.x MoE: fused ones of its own names), mergekit reads them
    under the live module's fused names: the exported filters that fold a path's hidden-state scales name both, so
    mergekit scales every expert's output projection as evomerge does (before, it scaled attention only)."""
    base = build_tiny(family, tmp_path / "base", num_layers=3, hidden=32)
    a, b = make_variants(base, tmp_path, n=2)
    arch = architecture_for(json.loads((base / "config.json").read_text()), "config.json")
    path = Recipe(layers=[LayerSlot(source=str(a), layer=0), LayerSlot(source=str(base), layer=2, scale=0.8),
                          LayerSlot(source=str(b), layer=1, scale=1.25)])
    text, _ = export_text(path, "mergekit")
    (tmp_path / "path.yaml").write_text(text)
    run_mergekit(tmp_path / "path.yaml", tmp_path / "mergekit")
    run_evomerge(tmp_path / "path.yaml", tmp_path / "evomerge")
    theirs, ours = load_dir(tmp_path / "mergekit"), load_dir(tmp_path / "evomerge")
    fused: dict[str, dict[int, dict[int, torch.Tensor]]] = {}  # as the per-expert test above
    for name, tensor in ours.items():
        if where := arch.live_expert(name):
            fused.setdefault(where[0], {}).setdefault(where[1], {})[where[2]] = tensor
        elif not arch.is_post_layer(name) or arch.layer_of(name) is not None:
            torch.testing.assert_close(tensor, theirs[arch.live_names(name)[-1]], atol=2e-5, rtol=1e-5)
    for live_name, experts in fused.items():
        stacked = torch.stack([torch.cat([chunks[k] for k in sorted(chunks)]) for _, chunks in sorted(experts.items())])
        torch.testing.assert_close(stacked, theirs[live_name], atol=2e-5, rtol=1e-5)
    source = load_dir(base)  # slot 1 is base's layer 2, its output projections times 1 / 0.8
    scaled = [n for n in ours if arch.layer_of(n) == 1 and arch.is_output_projection(n) and "self_attn" not in n]
    assert scaled
    for name in scaled:
        torch.testing.assert_close(ours[name], source[arch.rename_layer(name, 2)] / 0.8, atol=1e-6, rtol=1e-5)


def added_tokens(model: Path, tokens: list[str]) -> None:
    """`model` with `tokens` added to its tokenizer and embedding rows for them (as a chat fine-tune adds its own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.save_pretrained(model)
    live = AutoModelForCausalLM.from_pretrained(model)
    live.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # rows of their own for the new tokens (and head bias entries, Phi-2's)
        live.get_input_embeddings().weight[-len(tokens):] = torch.randn(len(tokens), live.config.hidden_size)
        live.get_output_embeddings().weight[-len(tokens):] = torch.randn(len(tokens), live.config.hidden_size)
        if live.get_output_embeddings().bias is not None:
            live.get_output_embeddings().bias[-len(tokens):] = torch.randn(len(tokens))
    live.save_pretrained(model)


def swapped_tokens(model: Path, first: str, second: str, rows: set[str] | None = None) -> None:
    """`model` with two tokens' ids swapped in its tokenizer and their embedding and head rows (`rows`, default
    VOCAB_ROWS) swapped too: the same model, its vocabulary in another order."""
    from safetensors.torch import load_file, save_file

    tokenizer = json.loads((model / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    i, j = vocab[first], vocab[second]
    vocab[first], vocab[second] = j, i
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    tensors = load_file(model / "model.safetensors")
    for name in (rows or VOCAB_ROWS) & set(tensors):
        tensors[name][[i, j]] = tensors[name][[j, i]]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


VOCAB_ROWS = {"model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"}  # one row per token


def test_a_multi_token_prediction_layer_s_rows_follow_the_tokens(tmp_path):
    """GLM-4.5's multi-token-prediction layer has embeddings and a head of its own (mergekit 0.1.5 leaves the layer
    out): under tokenizer_source their rows are aligned by token as the model's own are, so a linear merge of a model
    and the same model with two token ids swapped (rows and tokenizer) is the merge of the unswapped ones."""
    base = add_mtp_layer(build_tiny("glm4_moe", tmp_path / "base", num_layers=2, hidden=32))
    a, b = make_variants(base, tmp_path, n=2)
    unswapped = load_dir(b)
    mtp_rows = {"model.layers.2.embed_tokens.weight", "model.layers.2.shared_head.head.weight"}
    swapped_tokens(b, "x", "y", VOCAB_ROWS | mtp_rows)
    recipe = {"merge_method": "linear", "tokenizer_source": str(a),
              "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}
    run_evomerge(write_config(tmp_path / "linear.yaml", "linear", recipe), tmp_path / "out")
    ours, a_tensors = load_dir(tmp_path / "out"), load_dir(a)
    assert mtp_rows <= set(ours)
    for name in VOCAB_ROWS & set(ours) | mtp_rows:
        torch.testing.assert_close(ours[name], (a_tensors[name] + unswapped[name]) / 2, atol=1e-6, rtol=1e-6)
    # a `tokens` setting that takes its row from a model without the layer (here the first slice's) is one line naming
    # the recipe, and nothing is written
    plain = build_tiny("glm4_moe", tmp_path / "plain", num_layers=2, hidden=32, seed=1)
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(plain), "layer_range": [0, 1]}]},
                                                        {"sources": [{"model": str(a), "layer_range": [1, 2]}]}],
              "tokenizer": {"source": str(a), "tokens": {"x": {"source": str(plain)}}}}
    with pytest.raises(EvomergeError, match=rf"^{tmp_path}/slices.yaml: tokens: {plain} has no "
                                            r"model\.layers\.2\.embed_tokens\.weight, which a setting takes a row of$"):
        run_evomerge(write_config(tmp_path / "slices.yaml", "passthrough", recipe), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def differing_tokenizers(tmp_path: Path, family: str = "llama") -> tuple[Path, Path, Path]:
    """A base and two variants whose tokenizers differ: a adds two tokens, b one other and swaps two ids."""
    base = build_tiny(family, tmp_path / "base", num_layers=2, hidden=32)
    a, b = make_variants(base, tmp_path, n=2)
    torch.manual_seed(0)
    added_tokens(a, ["<|im_start|>", "<|im_end|>"])
    added_tokens(b, ["<tool>"])
    swapped_tokens(b, "x", "y")
    return base, a, b


@pytest.mark.parametrize("method, tokenizer_source, family", [
    ("ties", "a", "llama"), ("linear", "a", "llama"), ("task_arithmetic", "base", "llama"), ("ties", "b", "llama"),
    ("ties", "union", "llama"), ("linear", "union", "llama"), ("ties", "union", "phi"), ("linear", "b", "phi")])
def test_tokenizer_source_aligns_embeddings_by_token_as_mergekit_does(tmp_path, method, tokenizer_source, family):
    """Sources whose tokenizers differ (a adds two tokens, b one other and swaps two ids): with `tokenizer_source`
    every embedding and head row follows the chosen tokenizer by token, with mergekit's stand-ins where a source lacks
    a token; the merged model reads its tokenizer's added tokens (it had the common 64 rows only: an IndexError).
    Phi-2's head has a bias, one entry per token, which follows the tokens too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, a, b = differing_tokenizers(tmp_path, family)
    models = {"base": str(base), "a": str(a), "b": str(b), "union": "union"}
    doc = method_configs(str(base), [str(a), str(b), str(base)])[method]
    config = write_config(tmp_path / "recipe.yaml", method, {**doc, "tokenizer_source": models[tokenizer_source]})
    run_mergekit(config, tmp_path / "mergekit")
    run_evomerge(config, tmp_path / "evomerge")
    theirs, ours = load_dir(tmp_path / "mergekit"), load_dir(tmp_path / "evomerge")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "evomerge")
    # rows compared by token: mergekit's union adds the models' tokens in the order of a Python set (it varies from
    # run to run), evomerge in the recipe's order
    theirs_ids = AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()
    order = [theirs_ids[token] for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        expected = expected[order] if name in VOCAB_ROWS else expected
        torch.testing.assert_close(ours[name], expected, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert ours["model.embed_tokens.weight"].shape[0] == len(tokenizer) == {"a": 66, "b": 65, "base": 64, "union": 67}[tokenizer_source]
    with torch.no_grad():  # every id of its tokenizer, the added ones last
        AutoModelForCausalLM.from_pretrained(tmp_path / "evomerge")(torch.arange(len(tokenizer))[None])


TOKEN_SETTINGS = {
    "a": {"<|im_end|>": {"source": {"kind": "zero"}},  # base and b lack it: zeros, not a's row
          "x": {"source": {"kind": "model_token", "model": "b", "token": "y"}, "force": True},  # every model: b's "y"
          "<|im_start|>": {"source": {"kind": "model_token", "model": "base", "token_id": 3}},
          "z": {"source": "b", "force": True}},  # every model: b's own "z" row
    "union": {"<tool>": {"source": {"kind": "zero"}, "force": True}},
}


@pytest.mark.parametrize("tokenizer_source, pad", [("a", 8), ("union", 32), ("base", 48)])
def test_tokenizer_block_rows_of_chosen_tokens_and_padding_as_mergekit(tmp_path, tokenizer_source, pad):
    """mergekit's `tokenizer:` block: `tokens` (a token's row from a model, another token's row, or zeros; `force` in
    every model) and `pad_to_multiple_of` (rows added up to a multiple, each the mean of the rows): same tensors."""
    from transformers import AutoTokenizer

    base, a, b = differing_tokenizers(tmp_path)
    names = {"base": str(base), "a": str(a), "b": str(b)}
    tokens = {token: {**setting, "source": names.get(setting["source"], setting["source"]) if isinstance(
        setting["source"], str) else {k: names.get(v, v) for k, v in setting["source"].items()}}
        for token, setting in TOKEN_SETTINGS.get(tokenizer_source, {}).items()}
    block = {"source": names.get(tokenizer_source, tokenizer_source), "pad_to_multiple_of": pad,
             **({"tokens": tokens} if tokens else {})}
    doc = method_configs(str(base), [str(a), str(b), str(base)])["ties"]
    config = write_config(tmp_path / "recipe.yaml", "ties", {**doc, "tokenizer": block})
    run_mergekit(config, tmp_path / "mergekit")
    run_evomerge(config, tmp_path / "evomerge")
    theirs, ours = load_dir(tmp_path / "mergekit"), load_dir(tmp_path / "evomerge")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "evomerge")
    rows = -(-len(tokenizer) // pad) * pad  # padded up to the multiple
    theirs_ids = AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()  # union: another order (above)
    order = [theirs_ids[token] for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    order += list(range(len(order), rows))
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        expected = expected[order] if name in VOCAB_ROWS else expected
        torch.testing.assert_close(ours[name], expected, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert ours["model.embed_tokens.weight"].shape[0] == rows > len(tokenizer)
    assert json.loads((tmp_path / "evomerge" / "config.json").read_text())["vocab_size"] == rows
    if tokenizer_source == "a":  # zeros where only a had the token: ties of a's row with two zero rows
        vocab = tokenizer.get_vocab()
        assert not torch.equal(ours["lm_head.weight"][vocab["<|im_end|>"]], load_dir(a)["lm_head.weight"][vocab["<|im_end|>"]])


def test_embeddings_cut_below_the_tokenizer_shipped_are_a_warning(tmp_path):
    """Without tokenizer_source the embeddings keep the common rows (as mergekit's); when the tokenizer shipped (the
    base's) has more tokens, the merge says so, on its warnings and in the model card, and names the way out."""
    from evomerge.merge.materialize import merge_to_dir
    from evomerge.recipe import load_recipe

    base = build_tiny("llama", tmp_path / "base", num_layers=2, hidden=32)
    (a,) = make_variants(base, tmp_path, n=1)
    added_tokens(base, ["<|im_start|>", "<|im_end|>"])
    doc = {"base_model": str(base), "models": [{"model": str(a), "parameters": {"weight": 1.0}}]}
    warning = (f"the merged embeddings have 64 rows (the smallest vocabulary of the sources), but the tokenizer copied "
               f"from {base} has 66 tokens: those past 64 have no row; set tokenizer_source (base, a model, or union) "
               f"to merge the embeddings by token")
    plan = merge_to_dir(load_recipe(write_config(tmp_path / "cut.yaml", "task_arithmetic", doc)), tmp_path / "cut",
                        progress=False)
    assert plan.warnings == [warning] and warning in (tmp_path / "cut/README.md").read_text()
    aligned = write_config(tmp_path / "aligned.yaml", "task_arithmetic", {**doc, "tokenizer_source": "base"})
    assert merge_to_dir(load_recipe(aligned), tmp_path / "aligned", progress=False).warnings == []
    assert load_dir(tmp_path / "aligned")["model.embed_tokens.weight"].shape[0] == 66
