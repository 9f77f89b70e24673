"""Tiny random Hugging Face models of every supported family, for tests.

    build_tiny("llama", tmp_path / "m")                    -> a saved model dir (config, model.safetensors, tokenizer)
    make_variants(base, tmp_path, n=2)                     -> [ft1, ft2]: base's config, ft_i = base + small deltas

A character-level tokenizer (ids: <pad>=0, <unk>=1, <s>=2, </s>=3, then characters) is saved with each model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from evomerge.models.io import ModelDir, ModelWriter

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3", "olmo2", "gpt2",
            "gpt_neox", "qwen3_moe", "mixtral", "granite", "arcee", "cohere2", "glm4", "starcoder2", "olmo3", "exaone4",
            "smollm3", "seed_oss", "apertus", "ernie4_5", "hunyuan_v1_dense", "qwen3_5_text", "mistral3", "qwen3_5",
            "qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe", "gemma4_text", "gemma4", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gpt_oss", "qwen2_moe", "lfm2", "qwen3_vl_moe", "granitemoehybrid", "cohere", "stablelm", "phi",
            "glm4_moe", "deepseek_v3", "glm4_moe_lite", "llama4_text", "llama4", "afmoe", "helium", "glm", "nemotron",
            "vaultgemma", "olmoe", "phimoe", "granitemoe", "deepseek_v2", "dots1", "minimax_m2", "hunyuan_v1_moe",
            "falcon_h1", "nemotron_h", "lfm2_moe", "exaone", "internlm3", "gpt_bigcode", "falcon", "mamba", "ministral",
            "ministral3", "ernie4_5_moe", "deepseek_v32", "jamba", "glm_moe_dsa")
IMAGE_TEXT = ("gemma3", "mistral3", "qwen3_5", "qwen3_5_moe", "gemma4", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",  # a text
              "qwen3_vl_moe", "llama4")
# model (its family the key's) beside a
# 2-layer vision tower
MOE = ("qwen3_moe", "mixtral", "qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe", "qwen2_moe", "glm4_moe", "deepseek_v3",
       "glm4_moe_lite", "afmoe", "olmoe", "phimoe", "deepseek_v2", "dots1", "minimax_m2", "hunyuan_v1_moe",
       "lfm2_moe", "ernie4_5_moe", "deepseek_v32", "jamba", "glm_moe_dsa")  # mixtures of experts, per-expert checkpoint tensors
# mixtures of experts whose first layer is dense
DENSE_FIRST = ("glm4_moe", "deepseek_v3", "glm4_moe_lite", "afmoe", "deepseek_v2", "dots1", "lfm2_moe", "ernie4_5_moe",
               "deepseek_v32", "glm_moe_dsa")
EXPERTS_UNDER = {"lfm2_moe": "feed_forward", "jamba": "feed_forward"}  # the module holding the experts, where not mlp


def expert_layers(family: str, num_layers: int) -> list[int]:
    """The layers of a tiny mixture of experts that hold experts (Jamba's: every other one, from layer 1)."""
    return list(range(1, num_layers, 2) if family == "jamba" else range(int(family in DENSE_FIRST), num_layers))


LINEAR_ATTENTION = ("qwen3_5_text", "qwen3_5", "qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe")  # some layers (0, 2)
_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
_CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _config(family: str, num_layers: int, hidden: int, vocab: int, **overrides):
    import transformers

    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=num_layers, n_head=2, n_positions=128,
                                       **ids, **overrides)
    if family == "gpt_bigcode":
        return transformers.GPTBigCodeConfig(vocab_size=vocab, n_embd=hidden, n_layer=num_layers, n_head=2,
                                             n_positions=128, **ids, **overrides)
    if family == "falcon":  # Falcon-40B's layout (a norm per branch) and a head of its own, as mergekit 0.1.5's table
        return transformers.FalconConfig(**{**dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers,
                                                   num_attention_heads=2, num_kv_heads=1, new_decoder_architecture=True,
                                                   tie_word_embeddings=False, max_position_embeddings=128),
                                            **ids, **overrides})  # (overrides may ask for 7B's layout)
    if family == "mamba":  # a state of 8 per channel
        return transformers.MambaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers, state_size=8,
                                        **ids, **overrides)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=num_layers, num_attention_heads=2,
                                          max_position_embeddings=128, **ids, **overrides)
    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "gemma": "GemmaConfig",
               "gemma2": "Gemma2Config", "phi3": "Phi3Config", "qwen3": "Qwen3Config",
               "gemma3_text": "Gemma3TextConfig", "olmo2": "Olmo2Config", "qwen3_moe": "Qwen3MoeConfig",
               "mixtral": "MixtralConfig", "granite": "GraniteConfig", "arcee": "ArceeConfig",
               "cohere2": "Cohere2Config", "glm4": "Glm4Config", "starcoder2": "Starcoder2Config",
               "olmo3": "Olmo3Config", "exaone4": "Exaone4Config", "smollm3": "SmolLM3Config", "seed_oss": "SeedOssConfig",
               "apertus": "ApertusConfig", "ernie4_5": "Ernie4_5Config", "hunyuan_v1_dense": "HunYuanDenseV1Config",
               "qwen3_5_text": "Qwen3_5TextConfig", "qwen3_next": "Qwen3NextConfig",
               "qwen3_5_moe_text": "Qwen3_5MoeTextConfig", "gemma4_text": "Gemma4TextConfig",
               "gpt_oss": "GptOssConfig", "qwen2_moe": "Qwen2MoeConfig", "lfm2": "Lfm2Config",
               "granitemoehybrid": "GraniteMoeHybridConfig", "cohere": "CohereConfig", "stablelm": "StableLmConfig",
               "phi": "PhiConfig", "qwen2_vl_text": "Qwen2VLTextConfig", "qwen2_5_vl_text": "Qwen2_5_VLTextConfig", "qwen3_vl_text": "Qwen3VLTextConfig",
               "qwen3_vl_moe_text": "Qwen3VLMoeTextConfig", "glm4_moe": "Glm4MoeConfig",
               "deepseek_v3": "DeepseekV3Config", "glm4_moe_lite": "Glm4MoeLiteConfig", "llama4_text": "Llama4TextConfig",
               "afmoe": "AfmoeConfig", "helium": "HeliumConfig", "glm": "GlmConfig", "nemotron": "NemotronConfig",
               "vaultgemma": "VaultGemmaConfig", "olmoe": "OlmoeConfig", "phimoe": "PhimoeConfig",
               "granitemoe": "GraniteMoeConfig", "deepseek_v2": "DeepseekV2Config", "dots1": "Dots1Config",
               "minimax_m2": "MiniMaxM2Config", "hunyuan_v1_moe": "HunYuanMoEV1Config", "falcon_h1": "FalconH1Config",
               "nemotron_h": "NemotronHConfig", "lfm2_moe": "Lfm2MoeConfig", "exaone": "ExaoneConfig",
               "internlm3": "InternLM3Config", "ministral": "MinistralConfig", "ministral3": "Ministral3Config",
               "ernie4_5_moe": "Ernie4_5_MoeConfig",
               "deepseek_v32": "DeepseekV32Config", "jamba": "JambaConfig",
               "glm_moe_dsa": "GlmMoeDsaConfig"}
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; available: {', '.join(FAMILIES)}")
    dims = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    if family.startswith(("gemma", "qwen3", "arcee", "cohere2", "glm", "olmo3", "exaone4", "seed_oss", "apertus",
                          "ernie4_5", "hunyuan", "helium", "nemotron", "vaultgemma", "dots1", "minimax", "falcon", "internlm3",
                          "ministral")):
        dims["head_dim"] = hidden // 2  # their default head_dim (256, 128) whatever the hidden size
    if family in ("qwen3_moe", "qwen3_next", "qwen3_5_moe_text", "qwen2_moe"):  # 4 experts of 2 per token, each with
        dims.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden)  # an MLP as wide as the hidden state
    if family in ("qwen3_next", "qwen3_5_moe_text", "qwen2_moe"):  # and a shared expert
        dims.update(shared_expert_intermediate_size=hidden)
    if family in ("olmoe", "phimoe", "granitemoe", "minimax_m2"):  # 4 experts of 2 per token, each as wide as the
        dims.update({"num_experts" if family == "olmoe" else "num_local_experts": 4}, num_experts_per_tok=2,  # hidden
                    intermediate_size=hidden)  # state
    if family == "ernie4_5_moe":  # a dense layer, then 4 experts of 2 per token beside a shared one
        dims.update(moe_num_experts=4, moe_k=2, moe_intermediate_size=hidden, moe_num_shared_experts=1,
                    moe_layer_start_index=1)
    if family == "hunyuan_v1_moe":  # 4 experts of 2 per token beside a shared MLP
        dims.update(num_experts=4, moe_topk=2, intermediate_size=hidden)
    if family == "nemotron_h":  # one mixer a layer, in turn: Mamba-2 (4 heads), experts (4 of 2 per token beside a
        # shared one), attention, an MLP (the hub's hybrid_override_pattern: M, E, *, -)
        dims.update(hybrid_override_pattern=("ME*-" * num_layers)[:num_layers],
                    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
                    moe_shared_expert_intermediate_size=hidden, n_groups=1, topk_group=1, mamba_num_heads=4,
                    mamba_head_dim=hidden // 2, ssm_state_size=8, n_groups_mamba=1, chunk_size=8, head_dim=hidden // 2,
                    initializer_range=0.05)  # (its default, 0.02, leaves a layer's share of the logits below 1e-3)
    if family == "falcon_h1":  # a Mamba-2 mixer of 4 heads beside the attention
        dims.update(mamba_d_ssm=2 * hidden, mamba_n_heads=4, mamba_d_head=hidden // 2, mamba_d_state=8, mamba_chunk_size=8)
    if family == "phimoe":  # biases in the attention and the head, as Phi-3.5-MoE's
        dims.update(attention_bias=True, lm_head_bias=True)
    if family in ("glm4_moe", "deepseek_v3", "glm4_moe_lite", "deepseek_v2", "dots1", "deepseek_v32", "glm_moe_dsa"):  # a dense layer, then 4 experts of 2 per
        dims.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, n_shared_experts=1,  # token
                    first_k_dense_replace=1, n_group=1, topk_group=1)  # beside a shared one
    if family == "llama4_text":  # experts (4, 1 per token, beside a shared one) in every other layer, from layer 1;
        dims.update(num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,  # the others dense; every
                    intermediate_size=hidden, intermediate_size_mlp=2 * hidden, head_dim=hidden // 2,  # 4th layer
                    attention_chunk_size=4)  # NoPE with full attention, the others chunked
    if family == "afmoe":  # a dense layer, then 4 experts of 2 per token beside a shared one; sliding and full
        dims.update(num_dense_layers=1, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,  # attention
                    moe_intermediate_size=hidden, head_dim=hidden // 2, global_attn_every_n_layers=2, sliding_window=4)
    if family == "glm4_moe":  # q and k normed
        dims.update(use_qk_norm=True)
    if family in ("deepseek_v3", "glm4_moe_lite", "deepseek_v2", "deepseek_v32", "glm_moe_dsa"):  # multi-head latent
        dims.pop("head_dim", None)  # attention: queries and keys-values through low-rank projections
        dims.update(num_key_value_heads=2)  # as many as the heads: its keys are per head
        dims.update(q_lora_rank=hidden // 2 if family != "deepseek_v2" else None,  # V2-Lite's queries: one projection
                    kv_lora_rank=hidden // 2, qk_rope_head_dim=4, qk_nope_head_dim=hidden // 4, v_head_dim=hidden // 2)
    if family == "jamba":  # Mamba layers around an attention one (layer 1), 4 experts of 2 per token in every other
        dims.update(num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,  # layer from 1
                    attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4)  # (a dense MLP before)
    if family in ("deepseek_v32", "glm_moe_dsa"):  # its indexer: 2 heads of 8
        dims.update(index_n_heads=2, index_head_dim=8, index_topk=4)
    if family == "glm_moe_dsa":  # an indexer in layers 0, 2, ...; the others reuse the selection of the layer before
        dims.update(index_topk_freq=2, index_skip_topk_offset=1)
    if family == "gpt_oss":  # 4 experts of 2 per token (fused, with biases), sliding and full attention alternating
        dims.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=hidden, head_dim=hidden // 2,
                    sliding_window=4)
    if family == "lfm2":  # short-convolution layers around an attention one (by full_attn_idxs, as the hub's configs)
        dims.update(full_attn_idxs=[i for i in range(num_layers) if i % 2 == 1])
    if family == "lfm2_moe":  # the same kinds by layer_types; a dense layer, then 4 experts of 2 per token
        dims.update(layer_types=["full_attention" if i % 2 else "conv" for i in range(num_layers)], num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=hidden, num_dense_layers=1)
    if family == "granitemoehybrid":  # Mamba-2 layers around an attention one, 4 experts of 2 per token and a shared MLP
        dims.update(layer_types=["attention" if i % 2 else "mamba" for i in range(num_layers)], num_local_experts=4,
                    num_experts_per_tok=2, intermediate_size=hidden, shared_intermediate_size=hidden, mamba_n_heads=4,
                    mamba_d_head=hidden // 2, mamba_d_state=8, mamba_n_groups=1, mamba_expand=2)
    if family == "cohere":  # q and k norms, as Command R+ (mergekit's table requires them)
        dims.update(use_qk_norm=True)
    if family == "mixtral":
        dims.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=hidden)
    if family == "gemma4_text":  # per-layer embeddings; the last layer reuses the keys and values of an earlier one of
        # its kind (from 3 layers on: the layers before it hold both kinds); the kinds alternate, the last one full
        kinds = ["full_attention" if (num_layers - 1 - i) % 2 == 0 else "sliding_attention" for i in range(num_layers)]
        dims.update(hidden_size_per_layer_input=8, vocab_size_per_layer_input=vocab, global_head_dim=hidden // 2,
                    layer_types=kinds, num_kv_shared_layers=int(num_layers >= 3), sliding_window=4)
    if family.endswith("vl_text"):  # multimodal rotary embeddings: sections (time, height, width) of head_dim / 2
        quarter = hidden // 4
        sections = [quarter // 4, (quarter - quarter // 4) // 2, quarter - quarter // 4 - (quarter - quarter // 4) // 2]
        dims.update(head_dim=hidden // 2, rope_parameters={"rope_type": "default", "mrope_section": sections,
                                                           **({"mrope_interleaved": True} if family.startswith("qwen3") else {})})
    if family == "qwen3_vl_moe_text":  # 4 experts of 2 per token, their MLPs half as wide as the hidden state (so that
        dims.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden // 2)  # no expert is square)
    if family in LINEAR_ATTENTION:  # linear attention (every other layer here, so a model has both kinds), two heads
        dims.update(linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=hidden // 2,
                    linear_value_head_dim=hidden // 2, full_attention_interval=2)
    return getattr(transformers, classes[family])(**{**dims, **ids, **overrides})


def _image_text_config(family: str, num_layers: int, hidden: int, vocab: int, **overrides):
    """An image-text model: its text model as `_config` builds it, a 2-layer vision tower (Gemma-3's SigLIP without a
    head, Mistral-3's Pixtral, Qwen3.5's own)."""
    import transformers

    text = dict(num_layers=num_layers, hidden=hidden, vocab=vocab, **overrides)
    if family == "gemma3":
        vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=28, patch_size=14, vision_use_head=False)
        return transformers.Gemma3Config(text_config=_config("gemma3_text", **text), vision_config=vision,
                                         mm_tokens_per_image=4, boi_token_index=vocab - 3, eoi_token_index=vocab - 2,
                                         image_token_index=vocab - 1)
    if family == "llama4":
        vision = transformers.Llama4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=28, patch_size=14, vision_output_dim=16,
                                                 projector_input_dim=16, projector_output_dim=hidden)
        return transformers.Llama4Config(text_config=_config("llama4_text", **text).to_dict(),
                                         vision_config=vision.to_dict(), image_token_index=vocab - 1)
    if family == "mistral3":
        vision = transformers.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, head_dim=8, image_size=28, patch_size=14)
        return transformers.Mistral3Config(text_config=_config("mistral", **text).to_dict(),
                                           vision_config=vision.to_dict(), image_token_index=vocab - 1)
    if family == "gemma4":
        vision = transformers.Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                                 position_embedding_size=64, patch_size=4)
        return transformers.Gemma4Config(text_config=_config("gemma4_text", **text).to_dict(), vision_config=vision.to_dict(),
                                         audio_config=None, boi_token_id=vocab - 4, eoi_token_id=vocab - 3,
                                         image_token_id=vocab - 2, video_token_id=vocab - 1)
    qwen = {"qwen3_5": "Qwen3_5", "qwen3_5_moe": "Qwen3_5Moe", "qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL",
            "qwen3_vl": "Qwen3VL", "qwen3_vl_moe": "Qwen3VLMoe"}[family]  # their config classes' prefix
    qwen3 = dict(intermediate_size=32, out_hidden_size=hidden, num_position_embeddings=16)
    own = {"qwen2_vl": dict(embed_dim=16, mlp_ratio=2), "qwen2_5_vl": dict(intermediate_size=32, out_hidden_size=hidden),
           "qwen3_vl": dict(**qwen3, deepstack_visual_indexes=[0, 1, 1]),
           "qwen3_vl_moe": dict(**qwen3, deepstack_visual_indexes=[0, 1, 1])}.get(family, qwen3)  # Qwen3-VL: three
    # deepstack mergers, as the hub's models have (and mergekit's table names)
    vision = getattr(transformers, f"{qwen}VisionConfig")(depth=2, hidden_size=16 if family != "qwen2_vl" else hidden,
                                                          num_heads=2, **own)
    return getattr(transformers, f"{qwen}Config")(text_config=_config(f"{family}_text", **text).to_dict(),
                                                  vision_config=vision.to_dict(), image_token_id=vocab - 1,
                                                  video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
                                                  vision_end_token_id=vocab - 4)


def save_tokenizer(path: str | Path, vocab: int = 64) -> None:
    """A character-level fast tokenizer over the first `vocab` ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = (_SPECIALS + list(_CHARS))[:vocab]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(path))


def build_tiny(family: str, path: str | Path, *, seed: int = 0, num_layers: int = 2, hidden: int = 16, vocab: int = 64,
               dtype: torch.dtype = torch.float32, tokenizer: bool = True, fused: bool = False, **overrides) -> Path:
    """A randomly initialised model of `family` saved at `path`; `overrides` go to the transformers config class.
    `fused`: a mixture of experts saved under the live module's names (one gate_up_proj and down_proj tensor per layer,
    as mergekit 0.1.5 reads them), not transformers' per-expert checkpoint names."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = (_image_text_config if family in IMAGE_TEXT else _config)(family, num_layers=num_layers, hidden=hidden,
                                                                       vocab=vocab, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        auto = AutoModelForImageTextToText if family in IMAGE_TEXT else AutoModelForCausalLM
        model = auto.from_config(config).to(dtype)
    path = Path(path)
    model.save_pretrained(path)
    if fused:  # (a head tied to the embeddings is not saved, as save_pretrained leaves it out)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        save_file({n: t.contiguous() for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")},
                  path / "model.safetensors", metadata={"format": "pt"})
    if family == "gemma3":  # the vision tower named as in the hub's checkpoints (and mergekit's table)
        tensors = load_file(path / "model.safetensors")
        save_file({re.sub(r"^vision_tower\.", "vision_tower.vision_model.", n): t for n, t in tensors.items()},
                  path / "model.safetensors", metadata={"format": "pt"})
    if family in ("exaone", "internlm3"):  # config.json as the hub's (transformers 5, loading them as Llama, writes
        config = json.loads((path / "config.json").read_text())  # LlamaForCausalLM, and EXAONE's layer count anew)
        config["architectures"] = ["ExaoneForCausalLM" if family == "exaone" else "InternLM3ForCausalLM"]
        if family == "exaone":
            config["num_layers"] = config.pop("num_hidden_layers")
        (path / "config.json").write_text(json.dumps(config, indent=2))
    if family == "qwen3_vl_moe":  # the experts as the hub's checkpoints hold them, [experts, in, out]
        tensors = load_file(path / "model.safetensors")
        save_file({n: t.mT.contiguous() if n.endswith(("experts.gate_up_proj", "experts.down_proj")) else t
                   for n, t in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})
    if tokenizer:
        save_tokenizer(path, vocab)
    return path


def add_mtp_layer(path: str | Path, seed: int = 0) -> Path:
    """Gives the model at `path` (GLM-4.5, DeepSeek-V3) a multi-token-prediction layer as the hub's checkpoints hold it,
    numbered num_hidden_layers (transformers saves none): a decoder layer like the last one, random, beside its own
    tensors (enorm, hnorm, eh_proj, shared_head) and a copy of the embeddings."""
    md = ModelDir.open(path)
    n, last = md.num_layers, md.layer_tensor_names(md.num_layers - 1)
    hidden, vocab = md.shape("model.embed_tokens.weight")[::-1]
    gen = torch.Generator().manual_seed(seed)
    shapes = {**{md.arch.rename_layer(name, n): md.shape(name) for name in last},
              **{f"model.layers.{n}.{k}.weight": (hidden,) for k in ("enorm", "hnorm", "shared_head.norm")},
              f"model.layers.{n}.eh_proj.weight": (hidden, 2 * hidden), f"model.layers.{n}.embed_tokens.weight": (vocab, hidden),
              f"model.layers.{n}.shared_head.head.weight": (vocab, hidden)}
    tensors = {**{name: md.get(name) for name in md.tensor_names},
               **{name: 0.1 * torch.randn(shape, generator=gen) for name, shape in shapes.items()}}
    md.close()
    save_file(tensors, Path(path) / "model.safetensors", metadata={"format": "pt"})
    return Path(path)


def make_variants(base: str | Path, root: str | Path, n: int = 2, *, seed: int = 0, scale: float = 0.02) -> list[Path]:
    """[root/ft1, ..., root/ftn]: copies of the model at `base` (same config and tokenizer) whose every tensor is
    base + scale * N(0, 1), drawn from a generator seeded by (seed, i)."""
    paths = []
    with ModelDir.open(base) as src:
        for i in range(1, n + 1):
            gen = torch.Generator().manual_seed(seed * 1009 + i)
            with ModelWriter(Path(root) / f"ft{i}") as out:
                for name in src.tensor_names:
                    t = src.get(name)
                    out.add(name, (t.double() + scale * torch.randn(t.shape, generator=gen, dtype=torch.float64)).to(t.dtype))
                out.write_config(src.config)
                out.copy_tokenizer(src)
            paths.append(Path(root) / f"ft{i}")
    return paths


def with_chat_template(model_dir: str | Path, out: Path, template: str | None) -> Path:
    """A copy of `model_dir` at `out` whose tokenizer_config.json holds `template` as its chat template (None: none)."""
    shutil.copytree(model_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps({**config, **({"chat_template": template} if template else {})}))
    return out
