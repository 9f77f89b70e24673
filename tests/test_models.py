"""Model I/O: architecture naming tables against real transformers checkpoints, lazy reading, sharded atomic writing."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import DENSE_FIRST, FAMILIES, LINEAR_ATTENTION, build_tiny, make_variants

from evomerge.errors import EvomergeError
from evomerge.models import ModelDir, ModelWriter, architecture_for, check_finite, live_param, load_live_model

LAYERS = 3
GEMMA4_PRE = ("embed_tokens.weight", "embed_tokens_per_layer.weight", "per_layer_model_projection.weight", "per_layer_projection_norm.weight")  # per-layer embeddings, their projection and its norm
PRE_POST = {  # family -> (tensors before the layers, after the layers), as transformers saves them
    "llama": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "mistral": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "qwen2": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "qwen3": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "gemma": ({"model.embed_tokens.weight"}, {"model.norm.weight"}),
    "gemma2": ({"model.embed_tokens.weight"}, {"model.norm.weight"}),
    "gemma3_text": ({"model.embed_tokens.weight"}, {"model.norm.weight"}),
    "gemma3": ({"language_model.model.embed_tokens.weight"}, {"language_model.model.norm.weight"}),
    "olmo2": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "phi3": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    **{f: ({"transformer.wte.weight", "transformer.wpe.weight"}, {"transformer.ln_f.weight", "transformer.ln_f.bias"})
       for f in ("gpt2", "gpt_bigcode")},
    "gpt_neox": ({"gpt_neox.embed_in.weight"},
                 {"gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"}),
    "qwen3_moe": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "mixtral": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "granite": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "arcee": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "cohere2": ({"model.embed_tokens.weight"}, {"model.norm.weight"}),
    "glm4": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "starcoder2": ({"model.embed_tokens.weight"}, {"model.norm.weight", "model.norm.bias"}),
    "olmo3": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "exaone4": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "smollm3": ({"model.embed_tokens.weight"}, {"model.norm.weight"}),
    "seed_oss": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "apertus": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "ernie4_5": ({"model.embed_tokens.weight"}, {"model.norm.weight"}),
    "hunyuan_v1_dense": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "qwen3_5_text": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "mistral3": ({"language_model.model.embed_tokens.weight"}, {"language_model.model.norm.weight"}),
    "qwen3_5": ({"model.language_model.embed_tokens.weight"}, {"model.language_model.norm.weight", "lm_head.weight"}),
    "qwen3_next": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "qwen3_5_moe_text": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "qwen3_5_moe": ({"model.language_model.embed_tokens.weight"}, {"model.language_model.norm.weight", "lm_head.weight"}),
    "gemma4_text": ({f"model.{n}" for n in GEMMA4_PRE}, {"model.norm.weight"}),
    "gemma4": ({f"model.language_model.{n}" for n in GEMMA4_PRE}, {"model.language_model.norm.weight"}),
    "qwen2_vl": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),  # the hub's names
    "qwen2_5_vl": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "gpt_oss": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "qwen2_moe": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "lfm2": ({"model.embed_tokens.weight"}, {"model.embedding_norm.weight"}),
    "granitemoehybrid": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "cohere": ({"model.embed_tokens.weight"}, {"model.norm.weight"}),
    "stablelm": ({"model.embed_tokens.weight"}, {"model.norm.weight", "model.norm.bias", "lm_head.weight"}),
    "phi": ({"model.embed_tokens.weight"}, {"model.final_layernorm.weight", "model.final_layernorm.bias", "lm_head.weight",
                                            "lm_head.bias"}),
    "qwen3_vl_moe": ({"model.language_model.embed_tokens.weight"}, {"model.language_model.norm.weight", "lm_head.weight"}),
    "qwen3_vl": ({"model.language_model.embed_tokens.weight"}, {"model.language_model.norm.weight", "lm_head.weight"}),
    "glm4_moe": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    **{f: ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"})
       for f in ("deepseek_v3", "deepseek_v32", "glm_moe_dsa")},
    "glm4_moe_lite": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "llama4_text": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    "afmoe": ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    **{f: ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"})
       for f in ("helium", "glm", "olmoe", "granitemoe", "deepseek_v2", "dots1", "minimax_m2", "hunyuan_v1_moe")},
    "falcon_h1": ({"model.embed_tokens.weight"}, {"model.final_layernorm.weight", "lm_head.weight"}),
    "nemotron_h": ({"backbone.embeddings.weight"}, {"backbone.norm_f.weight", "lm_head.weight"}),
    "exaone": ({"transformer.wte.weight"}, {"transformer.ln_f.weight", "lm_head.weight"}),
    **{f: ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"})
       for f in ("internlm3", "ministral", "ministral3")},
    "ernie4_5_moe": ({"model.embed_tokens.weight"}, {"model.norm.weight"}),
    "jamba": ({"model.embed_tokens.weight"}, {"model.final_layernorm.weight", "lm_head.weight"}),
    "mamba": ({"backbone.embeddings.weight"}, {"backbone.norm_f.weight"}),
    "falcon": ({"transformer.word_embeddings.weight"}, {"transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"}),
    "lfm2_moe": ({"model.embed_tokens.weight"}, {"model.embedding_norm.weight"}),
    "nemotron": ({"model.embed_tokens.weight"}, {"model.norm.weight", "model.norm.bias", "lm_head.weight"}),
    "vaultgemma": ({"model.embed_tokens.weight"}, {"model.norm.weight"}),
    "phimoe": ({"model.embed_tokens.weight"}, {"model.norm.weight", "model.norm.bias", "lm_head.weight", "lm_head.bias"}),
    "llama4": ({"language_model.model.embed_tokens.weight"}, {"language_model.model.norm.weight",
                                                              "language_model.lm_head.weight"}),
}
VOCAB = {"model.embed_tokens.weight", "lm_head.weight", "transformer.word_embeddings.weight", "backbone.embeddings.weight", "lm_head.bias", "transformer.wte.weight", "gpt_neox.embed_in.weight",
         "embed_out.weight", "language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
         "language_model.lm_head.weight"}
TIED = {"gemma", "gemma2", "gemma3_text", "gemma3", "gpt2", "gpt_bigcode", "mamba", "ernie4_5_moe", "cohere2", "starcoder2", "smollm3", "ernie4_5", "mistral3",
        "gemma4_text", "gemma4", "lfm2", "cohere", "vaultgemma", "lfm2_moe"}
BRANCH_NORMED = {"gemma2", "gemma3_text", "gemma3", "olmo2", "glm4", "olmo3", "exaone4", "gemma4_text", "gemma4",
                 "afmoe"}  # norm each branch's output: no output projection folds a scale
NOT_TEXT = r"vision_tower\.|vision_model\.|multi_modal_projector\.|(model\.)?visual\.|model\.(vision_tower|audio_tower|embed_vision|embed_audio)\."  # an image-text model's other parts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny(f, root / f, num_layers=LAYERS, seed=1) for f in FAMILIES}


@pytest.fixture(scope="module")
def live(tiny):
    return {f: load_live_model(p) for f, p in tiny.items()}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[2, 5, 9, 17, 33, 40, 3]])).logits


# ---------------------------------------------------------------------------------------------------------------------
# Architecture tables


@pytest.mark.parametrize("family", FAMILIES)
def test_naming_table_matches_the_checkpoint(tiny, family):
    md = ModelDir.open(tiny[family])
    arch = md.arch
    assert arch.name == family and md.num_layers == LAYERS
    pre, post = PRE_POST[family]
    assert {n for n in md.tensor_names if arch.is_pre_layer(n)} == pre
    assert {n for n in md.tensor_names if arch.is_post_layer(n)} == post
    for name in md.tensor_names:
        assert arch.is_vocab_tensor(name) == (name in VOCAB)
        if name in VOCAB:
            assert md.shape(name)[0] == 64
        numbers = [] if re.match(NOT_TEXT, name) else re.findall(r"\.(\d+)\.", name)
        assert arch.layer_of(name) == (int(numbers[0]) if numbers else None)
        assert (arch.layer_of(name) is None) == (name in pre | post or re.match(NOT_TEXT, name) is not None)
    layer_names = [n for n in md.tensor_names if arch.layer_of(n) is not None]
    assert {arch.layer_of(n) for n in layer_names} == set(range(LAYERS))
    for name in layer_names:  # renaming moves a tensor onto another layer's slot, which exists (of the same kind)
        renamed = arch.rename_layer(name, 2)
        dense = family in DENSE_FIRST and arch.layer_of(name) == 0 and re.search(r"\.(mlp|feed_forward)\.", name)  # layer
        # 0's MLP only; Llama 4's
        dense = dense or family.startswith("llama4") and arch.layer_of(name) == 1 and ".feed_forward." in name  # experts:
        # layer 1's only
        full_attention = family in (*LINEAR_ATTENTION, "lfm2", "lfm2_moe", "granitemoehybrid") and ".self_attn." in name  # layer 1
        # only; 0, 2 attend linearly (LFM2's by a short convolution, Granite-4's by Mamba-2)
        kv_shared = family.startswith("gemma4") and re.search(r"\.(k_proj|v_proj|k_norm)\.", name)  # layer 2 has none
        other_mixer = family == "nemotron_h" and ".mixer." in name and arch.layer_of(name) != 2  # Mamba-2, experts,
        # attention: layer 2's mixer is the attention
        other_mixer = other_mixer or family == "jamba" and arch.layer_of(name) == 1 and re.search(  # attention and
            r"\.(self_attn|feed_forward)\.", name)  # experts in layer 1, Mamba and an MLP in 0 and 2
        assert arch.layer_of(renamed) == 2 and (renamed in md) != bool(full_attention or kv_shared or dense or other_mixer)
        assert arch.rename_layer(renamed, arch.layer_of(name)) == name
    head = [n for n in md.tensor_names if n.endswith("lm_head.weight") or n == "embed_out.weight"]  # GPT-NeoX's
    assert arch.tied_embeddings(md.config) == (family in TIED) == (not head)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_of_agrees_with_the_live_module_classes(tiny, live, family):
    """attn / mlp / norm from the name equals what the owning module in transformers is (e.g. LlamaAttention)."""
    md, model = ModelDir.open(tiny[family]), live[family]
    live_names = {id(p): n for n, p in [*model.named_parameters(), *model.named_buffers()]}  # Apertus: xIELU's beta
    seen = set()
    for name in md.tensor_names:
        param = live_param(model, name)  # a view (an expert of the fused experts; xIELU's beta): the tensor it views
        parts = live_names[id(param if id(param) in live_names else param._base)].split(".")
        numeric = [i for i, p in enumerate(parts) if p.isdigit()]
        owner = ".".join(parts[:numeric[0] + 2] if numeric and len(parts) > numeric[0] + 2 else parts[:-1])  # e.g.
        # model.layers.0.self_attn; the layer itself for its own tensors (Gemma-4's layer_scalar)
        cls = type(model.get_submodule(owner)).__name__
        expected = next((b for key, b in (("Attention", "attn"), ("GatedDeltaNet", "attn"), ("ShortConv", "attn"),
                                          ("RMSNorm", "norm"), ("Mamba", "attn"), ("H1Mixer", "attn"), ("MLP", "mlp"), ("SparseMoeBlock", "mlp"), ("HybridMoE", "mlp"),
                                          ("Norm", "norm"), ("MoE", "mlp")) if key.lower() in cls.lower()), None)
        assert md.arch.block_of(name) == expected, (name, cls)
        seen.add(expected)
    assert {"attn", "norm", None, *(("mlp",) if family != "mamba" else ())} <= seen


EPS_KEY = {"gpt2": "layer_norm_epsilon", "gpt_bigcode": "layer_norm_epsilon", "falcon": "layer_norm_epsilon", "mamba": "layer_norm_epsilon", "gpt_neox": "layer_norm_eps", "cohere2": "layer_norm_eps",
           "starcoder2": "norm_epsilon", "lfm2": "norm_eps", "cohere": "layer_norm_eps", "stablelm": "layer_norm_eps",
           "phi": "layer_norm_eps", "nemotron": "norm_eps", "nemotron_h": "layer_norm_epsilon", "lfm2_moe": "norm_eps"}


# the config key counting the dense first layers, where it is not first_k_dense_replace
DENSE_COUNT = {"afmoe": "num_dense_layers", "lfm2_moe": "num_dense_layers", "ernie4_5_moe": "moe_layer_start_index"}
# mixtures of experts whose layer 1 is a dense MLP
DENSE_LAYER_1 = {"qwen3_moe": {"mlp_only_layers": [1]}, "qwen3_next": {"mlp_only_layers": [1]},
                 "qwen2_moe": {"mlp_only_layers": [1]},
                 **{f: {DENSE_COUNT.get(f, "first_k_dense_replace"): 2} for f in DENSE_FIRST if f != "afmoe"},  # (AFMoE's branches are normed)
                 "llama4_text": {"interleave_moe_layer_step": 4}}


@pytest.mark.parametrize("family, overrides", [(f, {}) for f in sorted(set(FAMILIES) - BRANCH_NORMED)]
                         + [(f, DENSE_LAYER_1[f]) for f in DENSE_LAYER_1]
                         + [("falcon", {"new_decoder_architecture": False})])  # Falcon-7B's one norm for both branches
def test_output_projections_fold_a_hidden_state_scale(tmp_path, family, overrides):
    """A layer with its output projections times c computes c * layer(x / c): each branch adds c times its output to a
    stream whose norms ignore the scale (exact with a negligible norm epsilon, as here). `DENSE_LAYER_1`: the hooked
    layer of a mixture of experts is a dense one."""
    eps = {EPS_KEY.get(family, "rms_norm_eps"): 1e-30}
    path = build_tiny(family, tmp_path / family, num_layers=LAYERS, tokenizer=False, **eps, **overrides)
    md, c = ModelDir.open(path), 0.37
    outs = [n for n in md.tensor_names if md.arch.is_output_projection(n)]
    branches = {"attn"} if family == "mamba" else {"attn", "mlp"}  # (Mamba's layers have a mixer only)
    assert {md.arch.block_of(n) for n in outs} == branches and {md.arch.layer_of(n) for n in outs} == {0, 1, 2}
    layer = re.match(md.arch.layer, md.arch.live_names(outs[0])[-1]).group(1) + "1"  # e.g. model.layers.1

    def divide_input(module, args, kwargs):
        return ((args[0] / c, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] / c})

    def multiply_output(module, args, output):
        return (output[0] * c, *output[1:]) if isinstance(output, tuple) else output * c

    hooked = load_live_model(md, dtype=torch.float64)
    hooks = [hooked.get_submodule(layer).register_forward_pre_hook(divide_input, with_kwargs=True),
             hooked.get_submodule(layer).register_forward_hook(multiply_output)]
    folded = load_live_model(md, dtype=torch.float64)
    with torch.no_grad():
        for name in outs:
            if md.arch.layer_of(name) == 1:
                live_param(folded, name).mul_(c)
    expected = _logits(hooked)
    torch.testing.assert_close(_logits(folded), expected, rtol=0, atol=1e-7)  # the norms compute in float32
    for hook in hooks:
        hook.remove()
    assert not torch.allclose(expected, _logits(hooked), atol=1e-3)


def test_lfm2_attention_layers_listed_by_index_follow_a_restacked_path():
    """LFM2's hub configs may name their attention layers by index (full_attn_idxs) rather than per layer
    (layer_types); a written layer path lists them anew, so each slot keeps its source layer's kind."""
    arch = architecture_for({"architectures": ["Lfm2ForCausalLM"]}, "config.json")
    config = {"architectures": ["Lfm2ForCausalLM"], "num_hidden_layers": 4, "full_attn_idxs": [1, 3]}
    assert arch.set_num_layers(config, 3, source_layers=[3, 0, 1]) == {**config, "num_hidden_layers": 3,
                                                                        "full_attn_idxs": [0, 2]}


def test_nemotron_h_layer_kinds_of_a_hub_config_follow_a_restacked_path():
    """Nemotron-H's hub configs give each layer's mixer as a character of hybrid_override_pattern (transformers 5
    writes layers_block_type); a written layer path spells it anew from its slots' sources, and transformers reads the
    kinds back in that order."""
    from transformers import NemotronHConfig

    arch = architecture_for({"architectures": ["NemotronHForCausalLM"]}, "config.json")
    config = {"architectures": ["NemotronHForCausalLM"], "num_hidden_layers": 4, "hybrid_override_pattern": "M-E*"}
    written = arch.set_num_layers(config, 3, source_layers=[3, 0, 1])
    assert written == {**config, "num_hidden_layers": 3, "hybrid_override_pattern": "*M-"}
    assert NemotronHConfig(**written).layers_block_type == ["full_attention", "linear_attention", "mlp"]  # *, M, -
    assert arch.num_layers({"layers_block_type": ["mamba", "moe"]}) == 2  # as transformers 5 writes it: no count


def test_ernie_moe_expert_layers_of_a_restacked_path():
    """ERNIE-4.5-MoE puts experts in layers moe_layer_start_index..moe_layer_end_index, every moe_layer_interval-th
    ((i + 1) % interval == 0); a written path counts its dense first layers anew and ends the span at its last layer,
    and refuses spans it cannot spell (an interval, or an end before the last layer)."""
    from transformers import Ernie4_5_MoeConfig

    arch = architecture_for({"architectures": ["Ernie4_5_MoeForCausalLM"]}, "config.json")
    config = {"architectures": ["Ernie4_5_MoeForCausalLM"], "num_hidden_layers": 4, "moe_layer_start_index": 2,
              "moe_layer_end_index": 3, "moe_layer_interval": 1}
    written = arch.set_num_layers(config, 5, source_layers=[1, 0, 2, 3, 3])
    assert written == {**config, "num_hidden_layers": 5, "moe_layer_start_index": 2, "moe_layer_end_index": 4}
    loaded = Ernie4_5_MoeConfig(**written)
    assert [loaded.moe_layer_start_index <= i <= loaded.moe_layer_end_index for i in range(5)] == [False, False] + [True] * 3
    assert arch.set_num_layers({**config, "moe_layer_end_index": -1}, 2, source_layers=[0, 3])["moe_layer_end_index"] == -1
    with pytest.raises(EvomergeError, match="this writes dense layer 0 as layer 1"):
        arch.set_num_layers(config, 2, source_layers=[3, 0])
    for odd in ({"moe_layer_interval": 2}, {"moe_layer_end_index": 2}):
        with pytest.raises(EvomergeError, match="cannot be restacked: its config puts experts in layers 2 to"):
            arch.set_num_layers({**config, **odd}, 2, source_layers=[2, 3])
        assert arch.set_num_layers({**config, **odd}, 4, source_layers=[0, 1, 2, 3]) == {**config, **odd}  # slices
        # that keep every layer in place
    assert arch.is_unloaded("model.mtp_block.0.self_attn.q_proj.weight") and not arch.is_unloaded("model.norm.weight")


def test_exaone_configs_as_the_hub_and_transformers_write_them(tmp_path):
    """EXAONE 3's hub configs say ExaoneForCausalLM and num_layers; transformers 5 loads it as Llama and writes
    LlamaForCausalLM and num_hidden_layers under model_type exaone. Both are EXAONE (its checkpoint names), and a
    written model with fewer layers keeps the key its config had, which transformers reads back."""
    from transformers import AutoConfig

    hub = {"architectures": ["ExaoneForCausalLM"], "model_type": "exaone", "num_layers": 4}
    written = {"architectures": ["LlamaForCausalLM"], "model_type": "exaone", "num_hidden_layers": 4}
    for config, key in ((hub, "num_layers"), (written, "num_hidden_layers")):
        arch = architecture_for(config, "config.json")
        assert arch.name == "exaone" and arch.num_layers(config) == 4
        assert arch.set_num_layers(config, 2) == {**config, key: 2}
        (tmp_path / "config.json").write_text(json.dumps(arch.set_num_layers(config, 2)))
        assert AutoConfig.from_pretrained(tmp_path).num_hidden_layers == 2
    assert architecture_for({**written, "model_type": "llama"}, "config.json").name == "llama"
    assert arch.layer_of("transformer.h.3.attn.attention.q_proj.weight") == 3 and arch.is_pre_layer("transformer.wte.weight")


def test_gpt2_names_without_the_transformer_prefix():
    arch = architecture_for({"architectures": ["GPT2LMHeadModel"], "n_layer": 12}, "config.json")
    assert arch.layer_of("h.11.mlp.c_fc.weight") == 11
    assert arch.rename_layer("h.11.attn.c_attn.bias", 3) == "h.3.attn.c_attn.bias"
    assert arch.is_pre_layer("wte.weight") and arch.is_post_layer("ln_f.bias") and not arch.is_pre_layer("ln_f.bias")
    assert arch.is_vocab_tensor("wte.weight") and arch.block_of("h.0.ln_2.weight") == "norm"
    assert arch.is_pre_layer("wpe.weight") and not arch.is_vocab_tensor("wpe.weight")
    assert arch.num_layers({"n_layer": 12}) == 12 and arch.set_num_layers({"n_layer": 12}, 4) == {"n_layer": 4}


def test_architecture_detection_by_model_type_and_unsupported():
    assert architecture_for({"model_type": "mistral"}, "c.json").name == "mistral"
    assert architecture_for({"architectures": ["PhiMoEForCausalLM"]}, "c.json").name == "phimoe"  # the hub's spelling
    with pytest.raises(EvomergeError) as err:
        architecture_for({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, "m/config.json")
    assert "m/config.json" in str(err.value) and "BertForMaskedLM" in str(err.value)
    assert "LlamaForCausalLM" in str(err.value) and "GPTNeoXForCausalLM" in str(err.value)
    with pytest.raises(EvomergeError, match="LlamaForSequenceClassification"):  # same model_type, not a causal LM
        architecture_for({"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"}, "c.json")
    with pytest.raises(EvomergeError, match="num_hidden_layers"):
        architecture_for({"model_type": "llama"}, "c.json").num_layers({})


def test_set_num_layers_carries_per_layer_lists(tiny):
    from transformers import Gemma2Config

    md = ModelDir.open(tiny["gemma2"])
    types = md.config["layer_types"]
    assert types == ["sliding_attention", "full_attention", "sliding_attention"]
    grown = md.arch.set_num_layers(md.config, 4, source_layers=[0, 1, 1, 2])
    assert grown["num_hidden_layers"] == 4 and grown["layer_types"] == [types[0], types[1], types[1], types[2]]
    assert md.config["num_hidden_layers"] == LAYERS and md.config["layer_types"] == types  # the input is left alone
    assert Gemma2Config(**grown).layer_types == grown["layer_types"]
    shrunk = md.arch.set_num_layers(md.config, 2)  # no map: the list is dropped and transformers rebuilds its default
    assert "layer_types" not in shrunk and len(Gemma2Config(**shrunk).layer_types) == 2
    assert md.arch.set_num_layers(md.config, LAYERS)["layer_types"] == types
    with pytest.raises(ValueError):
        md.arch.set_num_layers(md.config, 2, source_layers=[0])


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_next", "qwen2_moe"])
def test_a_layer_path_over_dense_layers_of_a_mixture_of_experts_keeps_each_layer_s_mlp(tmp_path, family):
    """Qwen3-MoE (Qwen3-Next too) builds layer i dense (one MLP) when i is in `mlp_only_layers` or (i + 1) %
    decoder_sparse_step != 0: a written layer path lists its dense layers anew, so transformers builds each layer as its
    source was built and loads every tensor (no missing or unexpected key, no random weights), equal to the source's."""
    from evomerge.merge.materialize import merge_to_dir
    from evomerge.recipe import LayerSlot, Recipe

    base = build_tiny(family, tmp_path / "base", num_layers=4, hidden=32, decoder_sparse_step=2,
                      mlp_only_layers=[3])  # dense 0, 2 (the step) and 3 (listed); sparse 1
    slots = [1, 0, 3, 1, 2]
    merge_to_dir(Recipe(layers=[LayerSlot(source=str(base), layer=i) for i in slots]), tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["mlp_only_layers"], config["decoder_sparse_step"]) == ([1, 2, 4], 1)
    _loads_as_its_sources(tmp_path / "out", base, slots)


def _loads_as_its_sources(out: Path, base: Path, slots: list[int]) -> None:
    """transformers loads every tensor of `out` (no missing or unexpected key), and its layer j is `base`'s slots[j]."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    source = AutoModelForCausalLM.from_pretrained(base).model.layers
    for j, i in enumerate(slots):
        for (name, got), (_, want) in zip(model.model.layers[j].state_dict().items(), source[i].state_dict().items()):
            assert torch.equal(got, want), (j, name)


@pytest.mark.parametrize("family", DENSE_FIRST)
def test_a_layer_path_keeps_the_dense_first_layers_of_glm_and_deepseek_first(tmp_path, family):
    """GLM-4.5 and DeepSeek-V3 (AFMoE: `num_dense_layers`) build their first `first_k_dense_replace` layers dense: a
    written path counts its dense
    layers anew where they stay first, and is refused (one line, before any tensor) where one follows a layer of
    experts. GLM-4.7-Flash's config lists each layer's kind (`mlp_layer_types`), which follows any path (and so does
    DeepSeek-V3.2's as transformers 5 writes it)."""
    from evomerge.merge.materialize import merge_to_dir
    from evomerge.recipe import LayerSlot, Recipe

    key = DENSE_COUNT.get(family, "first_k_dense_replace")
    indexers = {"index_topk_freq": 1} if family == "glm_moe_dsa" else {}  # (GLM-5: an indexer in every layer here)
    base = build_tiny(family, tmp_path / "base", num_layers=4, hidden=32, **{key: 2}, **indexers)  # dense 0, 1
    slots = [1, 0, 0, 3, 2]
    merge_to_dir(Recipe(layers=[LayerSlot(source=str(base), layer=i) for i in slots]), tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())[key] == 3
    _loads_as_its_sources(tmp_path / "out", base, slots)
    slots = [2, 0, 3]
    recipe = Recipe(layers=[LayerSlot(source=str(base), layer=i) for i in slots])
    if "mlp_layer_types" not in json.loads((base / "config.json").read_text()):  # (as transformers 5 writes GLM-4.7-Flash's
        # and DeepSeek-V3.2's configs: then any path)
        with pytest.raises(EvomergeError, match=r"^r.yaml: layers: .* this writes dense layer 0 as layer 1$"):
            merge_to_dir(recipe, tmp_path / "refused", source="r.yaml", progress=False)
        assert not (tmp_path / "refused").exists()
        return
    merge_to_dir(recipe, tmp_path / "out2", progress=False)
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["mlp_layer_types"] == ["sparse", "dense", "sparse"]
    _loads_as_its_sources(tmp_path / "out2", base, slots)


def test_a_layer_path_over_glm5_lists_its_indexer_kinds_anew(tmp_path):
    """GLM-5 runs a sparse-attention indexer in the layers its config's indexer_types call "full"; a "shared" layer
    has none and reuses the selection of the layer before it. A written path lists the kinds anew from its slots'
    sources (hub configs may give them by index_topk_freq and index_skip_topk_offset instead), and one that would
    start with a shared layer is refused."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.materialize import merge_to_dir
    from evomerge.recipe import LayerSlot, Recipe

    base = build_tiny("glm_moe_dsa", tmp_path / "base", num_layers=4, hidden=32, first_k_dense_replace=0)
    config = json.loads((base / "config.json").read_text())
    assert config["indexer_types"] == ["full", "shared", "full", "shared"]
    slots = [2, 3, 0, 1, 1]
    merge_to_dir(Recipe(layers=[LayerSlot(source=str(base), layer=i) for i in slots]), tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["indexer_types"] == ["full", "shared", "full", "shared", "shared"]
    _loads_as_its_sources(tmp_path / "out", base, slots)
    with torch.no_grad():
        assert torch.isfinite(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(torch.randint(4, 60, (1, 7))).logits).all()
    arch = architecture_for(config, "config.json")
    hub = {k: v for k, v in config.items() if k != "indexer_types"}  # the kinds by index_topk_freq / offset only
    assert arch.set_num_layers(hub, 2, source_layers=[2, 1])["indexer_types"] == ["full", "shared"]
    with pytest.raises(EvomergeError, match=r"cannot start with a layer that reuses .* this writes layer 1 as layer 0$"):
        arch.set_num_layers(hub, 2, source_layers=[1, 0])


def test_a_layer_path_over_llama4_lists_its_expert_and_nope_layers_anew(tmp_path):
    """Llama 4 builds its experts every interleave_moe_layer_step-th layer (`moe_layers`) and attends without rotary
    embeddings, over all tokens, every no_rope_layer_interval-th (`no_rope_layers`); both default from those steps. A
    written path lists both anew from its source layers, so the model transformers loads is the path the search ran
    (the same logits as the live path model) with every tensor in place."""
    from evomerge.merge.materialize import merge_to_dir
    from evomerge.recipe import LayerSlot, Recipe
    from evomerge.run.path_model import build_path_model, decoder_layers

    base = build_tiny("llama4_text", tmp_path / "base", num_layers=4, hidden=32, dtype=torch.float64,
                      rms_norm_eps=1e-12)  # experts in 1, 3; layer 3 NoPE
    slots = [3, 0, 1, 3, 2]
    merge_to_dir(Recipe(layers=[LayerSlot(source=str(base), layer=i) for i in slots]), tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["moe_layers"], config["no_rope_layers"]) == ([0, 2, 3], [0, 1, 1, 0, 1])
    _loads_as_its_sources(tmp_path / "out", base, slots)
    live = load_live_model(base, dtype=torch.float64)
    path = build_path_model(live, {"base": decoder_layers(live)}, [("base", i, 1.0) for i in slots])
    tokens = torch.randint(4, 60, (2, 9))  # longer than a chunk (4): chunked and full attention differ
    with torch.no_grad():
        torch.testing.assert_close(load_live_model(tmp_path / "out", dtype=torch.float64)(tokens).logits,
                                   path(tokens).logits, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def test_lazy_reading(tiny):
    md = ModelDir.open(tiny["llama"])
    assert md.has_tokenizer and md.config["hidden_size"] == 16 and md.path == tiny["llama"]
    for name in md.tensor_names:
        t = md.get(name)
        assert tuple(t.shape) == md.shape(name) and t.dtype == md.dtype(name) == torch.float32
    name = "model.layers.1.mlp.up_proj.weight"
    assert md.get(name, dtype=torch.float64).dtype == torch.float64
    assert torch.equal(pickle.loads(pickle.dumps(md)).get(name), md.get(name))
    with pytest.raises(EvomergeError, match="no tensor named 'nope'"):
        md.get("nope")


def test_check_finite(tiny, tmp_path):
    md = ModelDir.open(tiny["qwen2"])
    assert check_finite(md) == []
    broken = {"model.layers.0.self_attn.q_proj.bias": float("nan"), "model.norm.weight": float("-inf")}
    with ModelWriter(tmp_path / "bad") as w:
        for name in md.tensor_names:
            t = md.get(name)
            if name in broken:
                t[0] = broken[name]
            w.add(name, t)
        w.write_config(md.config)
    assert sorted(check_finite(tmp_path / "bad")) == sorted(broken)


def test_open_errors(tiny, tmp_path):
    def error(path, **kw) -> str:
        with pytest.raises(EvomergeError) as err:
            ModelDir.open(path, **kw)
        return str(err.value)

    missing = tmp_path / "missing"
    assert str(missing) in error(missing) and "no such model directory" in error(missing)
    assert error(missing, source="recipe.yaml").startswith(f"recipe.yaml: {missing}: ")

    d = tmp_path / "noconfig"
    d.mkdir()
    (d / "model.safetensors").write_bytes((tiny["llama"] / "model.safetensors").read_bytes())
    assert str(d) in error(d) and "no config.json" in error(d)
    (d / "config.json").write_text("{not json")
    assert "unreadable config.json" in error(d)

    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text((tiny["llama"] / "config.json").read_text())
    assert "no model.safetensors" in error(d)
    (d / "pytorch_model.bin").write_bytes(b"")
    assert "convert them to safetensors" in error(d)

    md = ModelDir.open(tiny["llama"])
    with ModelWriter(tmp_path / "sharded", max_shard_bytes=4000) as w:
        for name in md.tensor_names:
            w.add(name, md.get(name))
        w.write_config(md.config)
    shard = sorted((tmp_path / "sharded").glob("model-00002-of-*.safetensors"))[0]
    shard.unlink()
    msg = error(tmp_path / "sharded")
    assert str(tmp_path / "sharded") in msg and f"shard {shard.name}, which is missing" in msg


def test_hub_id_that_cannot_be_fetched_is_a_clear_error():
    code = "from evomerge.models import ModelDir\nModelDir.open('evomerge-tests/no-such-model')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "EvomergeError: evomerge-tests/no-such-model: no such directory, and fetching it from the Hugging Face Hub " \
           "failed" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Writing


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_write_round_trips_bit_exactly(tiny, live, tmp_path, family):
    md, out, limit = ModelDir.open(tiny[family]), tmp_path / "out", 3000
    with ModelWriter(out, max_shard_bytes=limit) as w:
        for name in md.tensor_names:
            w.add(name, md.get(name))
        w.write_config(md.config)
        assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(w.copy_tokenizer(md))
        w.write_text("README.md", "# merged\n")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    sizes = {s: [md.get(t).numel() * 4 for t, f in index["weight_map"].items() if f == s] for s in shards}
    assert all(sum(b) <= limit or len(b) == 1 for b in sizes.values())  # a tensor larger than a shard gets its own
    assert index["metadata"]["total_size"] == sum(md.get(t).numel() * 4 for t in md.tensor_names)
    assert (out / "README.md").read_text() == "# merged\n" and not (out / "model.safetensors").exists()

    back = ModelDir.open(out)
    assert sorted(back.tensor_names) == sorted(md.tensor_names) and back.config == md.config and back.has_tokenizer
    for name in md.tensor_names:
        assert back.dtype(name) == md.dtype(name) and torch.equal(back.get(name), md.get(name))
    assert torch.equal(_logits(load_live_model(back)), _logits(live[family]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left beside it


def test_single_file_when_it_fits_and_dtype_kept(tmp_path):
    src = ModelDir.open(build_tiny("llama", tmp_path / "bf16", dtype=torch.bfloat16, tokenizer=False))
    assert not src.has_tokenizer
    with ModelWriter(tmp_path / "out") as w:
        for name in src.tensor_names:
            w.add(name, src.get(name))
        w.write_config(src.config)
        assert w.copy_tokenizer(src) == ["generation_config.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "generation_config.json",
                                                                      "model.safetensors"]
    back = ModelDir.open(tmp_path / "out")
    for name in src.tensor_names:
        assert back.dtype(name) == torch.bfloat16 and torch.equal(back.get(name), src.get(name))


def test_writer_is_atomic_and_refuses_a_non_empty_dir(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with ModelWriter(out, max_shard_bytes=8) as w:
            w.add("a", torch.ones(4))
            w.add("b", torch.ones(4))  # the first shard is already on disk
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    out.mkdir()  # an empty directory is fine
    with ModelWriter(out) as w:
        w.add("a", torch.ones(4))
    with pytest.raises(EvomergeError) as err:
        with ModelWriter(out) as w:
            pass
    assert str(out) in str(err.value) and "--force" in str(err.value)

    with pytest.raises(RuntimeError):  # a failed forced write leaves the old directory as it was
        with ModelWriter(out, force=True) as w:
            w.add("b", torch.zeros(2))
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and os.listdir(out) == ["model.safetensors"]

    with ModelWriter(out, force=True) as w:
        w.write_text("note.txt", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and os.listdir(out) == ["note.txt"]


def test_writer_copies_the_tensor_it_is_given(tmp_path):
    t = torch.arange(4.0)
    with ModelWriter(tmp_path / "out") as w:
        w.add("t", t)
        t.zero_()  # changed after add, before the shard is written
        with pytest.raises(ValueError, match="added twice"):
            w.add("t", t)
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["t"], torch.arange(4.0))


# ---------------------------------------------------------------------------------------------------------------------
# Live models


@pytest.mark.parametrize("family", FAMILIES)
def test_live_param_covers_every_checkpoint_tensor(tiny, live, family):
    md, model = ModelDir.open(tiny[family]), live[family]
    found = {name: live_param(model, name) for name in md.tensor_names}
    for name, param in found.items():  # Qwen3-VL-MoE's experts transposed on load (the hub's [experts, in, out])
        stored = md.get(name)
        assert torch.equal(param.detach(), stored if param.shape == stored.shape else stored.mT), name
    assert len({id(p) for p in found.values()}) == len(found)
    if family in TIED:  # the lm_head the checkpoint leaves out is the embedding itself
        embed = next(n for n in md.tensor_names if md.arch.is_vocab_tensor(n))
        assert live_param(model, "lm_head.weight") is found[embed]
    with pytest.raises(EvomergeError, match="no parameter for checkpoint tensor 'nope.weight'"):
        live_param(model, "nope.weight")


def test_live_param_accepts_gpt2_names_without_prefix(live):
    model = live["gpt2"]
    assert live_param(model, "h.1.mlp.c_fc.weight") is live_param(model, "transformer.h.1.mlp.c_fc.weight")
    assert live_param(model, "wte.weight") is model.transformer.wte.weight


def test_make_variants(tiny, tmp_path):
    base = ModelDir.open(tiny["phi3"])
    ft1, ft2 = (ModelDir.open(p) for p in make_variants(base.path, tmp_path / "a", n=2, seed=3))
    again = ModelDir.open(make_variants(base.path, tmp_path / "b", n=1, seed=3)[0])
    assert ft1.config == base.config and ft1.has_tokenizer
    for name in base.tensor_names:
        d1, d2 = ft1.get(name) - base.get(name), ft2.get(name) - base.get(name)
        assert 0 < d1.abs().max() < 0.2 and not torch.equal(d1, d2)
        assert torch.equal(again.get(name), ft1.get(name))
