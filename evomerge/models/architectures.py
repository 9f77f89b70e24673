"""Checkpoint naming per model family: where the layer index sits in a tensor name, what comes before and after the layers.

One frozen `Architecture` value per family; every question about a tensor name is a regex match against its fields.
Names are those of the safetensors checkpoint (e.g. `model.layers.3.mlp.up_proj.weight`), not of the live module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from evomerge.errors import EvomergeError
from evomerge.recipe import TEXT_MODULE

Block = Literal["attn", "mlp", "norm"]
# config keys counting a model's first dense layers (ERNIE-4.5-MoE's: the first with experts)
DENSE_COUNT_KEYS = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")


@dataclass(frozen=True)
class Architecture:
    name: str  # the canonical `model_type`
    architectures: tuple[str, ...]  # config.json `architectures` values
    layer: str  # regex: group 1 is everything up to the index, group 2 the index
    pre: str  # regex (fullmatch): tensors before the layers
    post: str  # regex (fullmatch): tensors after the layers
    vocab: str  # regex (fullmatch): tensors with one row per vocabulary entry
    tied_default: bool  # `tie_word_embeddings` when config.json leaves it out
    num_layers_key: str = "num_hidden_layers"
    attn: str = r"\.(self_attn|attn|attention)\."
    mlp: str = r"\.mlp\."
    norm: str = r"norm|\bln_"
    # regex (search): the tensors that end a residual branch (attention and MLP output projections, with their biases);
    # multiplying them by c multiplies what the layer adds to the hidden state by c. Empty where no such weights exist
    # (Gemma-2 normalises each branch's output, with a (1 + w) norm weight).
    output_projections: str = ""
    # config keys holding one entry per layer (e.g. sliding vs full attention), a list or a string of one character a
    # layer (Nemotron-H's hybrid_override_pattern); they follow the layers when the stack changes
    per_layer_keys: tuple[str, ...] = ("layer_types", "mlp_layer_types")
    # (regex, replacement) from checkpoint names to the live transformers module, where transformers renames on load
    live_renames: tuple[tuple[str, str], ...] = ()
    # parameter filters match the live names too (mergekit reads a checkpoint without a table of its own names under
    # them); False where mergekit's table names the checkpoint's tensors as they are (EXAONE 3)
    filters_see_live_names: bool = True
    # (regex, replacement, chunk, chunks): a mixture of experts' per-expert checkpoint tensors, which the live module
    # (transformers >= 5) holds fused, one [experts, rows, columns] tensor per kind: the tensor is expert `e` (the
    # regex's group) of the live tensor the replacement names, its chunk-th of `chunks` along the rows
    live_experts: tuple[tuple[str, str, int, int], ...] = ()
    # config.json key of the text model's settings (layer count, per-layer lists, vocab size) in an image-text model
    text_config: str = ""
    # regex (match): the layers of an image-text model's other parts (its vision tower), group 1 the prefix, group 2 the
    # index; a gradient list spreads over them as over the text layers (mergekit plans each part on its own)
    part_layer: str = ""
    # mergekit's modules of an image-text model beside its text model (`TEXT_MODULE`), as (name, regex (match) of its
    # tensors), where mergekit's table has several: a recipe's `modules:` merges each from models of its own
    modules: tuple[tuple[str, str], ...] = ()
    # regex (match): checkpoint tensors transformers does not load (Qwen3.5's multi-token-prediction head): a merge
    # writes them merged as any tensor; a search's live models have none, so its workers leave them out
    unloaded: str = ""
    # why a written model cannot move, repeat or drop this family's layers (a layer path, or mergekit slices that
    # restack layers, is refused); empty where it can
    fixed_layers: str = ""

    def live_names(self, tensor_name: str) -> list[str]:
        """Names a checkpoint tensor may have in a live transformers model, the checkpoint's own first."""
        renamed = [re.sub(pattern, repl, tensor_name) for pattern, repl in self.live_renames]
        return list(dict.fromkeys([tensor_name, *renamed]))

    def live_expert(self, tensor_name: str) -> tuple[str, int, int, int] | None:
        """(live name, expert, chunk, chunks) of a per-expert tensor the live model holds fused (`live_experts`)."""
        for pattern, replacement, chunk, chunks in self.live_experts:
            if m := re.fullmatch(pattern, tensor_name):
                return m.expand(replacement), int(m.group("e")), chunk, chunks
        return None

    def filter_names(self, tensor_name: str) -> tuple[str, ...]:
        """The names a parameter filter is matched against: the checkpoint's and the live module's (a hub MoE
        checkpoint's experts fused), under which mergekit reads the tensor where it has no table naming the checkpoint's,
        so `mlp` matches Mixtral's experts (block_sparse_moe.experts.0.w1) in both tools."""
        if not self.filters_see_live_names:
            return (tensor_name,)
        expert = self.live_expert(tensor_name)
        return tuple(self.live_names(tensor_name)) + ((expert[0],) if expert else ())

    def layer_of(self, tensor_name: str) -> int | None:
        m = re.match(self.layer, tensor_name)
        return int(m.group(2)) if m else None

    def rename_layer(self, tensor_name: str, new_index: int) -> str:
        m = re.match(self.layer, tensor_name)
        if not m:
            raise ValueError(f"{tensor_name!r} is not a layer tensor of {self.name}")
        return f"{m.group(1)}{new_index}{tensor_name[m.end(2):]}"

    def is_pre_layer(self, tensor_name: str) -> bool:
        """Embeddings: the tensors applied before the first layer."""
        return re.fullmatch(self.pre, tensor_name) is not None

    def is_post_layer(self, tensor_name: str) -> bool:
        """Final norm and lm_head: the tensors applied after the last layer."""
        return re.fullmatch(self.post, tensor_name) is not None

    def is_vocab_tensor(self, tensor_name: str) -> bool:
        return re.fullmatch(self.vocab, tensor_name) is not None

    def is_unloaded(self, tensor_name: str) -> bool:
        return bool(self.unloaded) and re.match(self.unloaded, tensor_name) is not None

    def is_output_projection(self, tensor_name: str) -> bool:
        return bool(self.output_projections) and re.search(self.output_projections, tensor_name) is not None

    def block_of(self, tensor_name: str) -> Block | None:
        """The parameter group of a tensor: attention, MLP, a norm (final norm included), or None (embeddings, lm_head)."""
        for block, pattern in (("attn", self.attn), ("mlp", self.mlp), ("norm", self.norm)):
            if re.search(pattern, tensor_name):
                return block
        return None

    def part_positions(self, tensor_names: list[str]) -> dict[str, float]:
        """t = i / (n - 1) (1 when n == 1) of each tensor in layer i of a part of n layers (`part_layer`)."""
        found = {n: (m.group(1), int(m.group(2))) for n in tensor_names if self.part_layer and (m := re.match(self.part_layer, n))}
        counts: dict[str, int] = {}
        for prefix, i in found.values():
            counts[prefix] = max(counts.get(prefix, 0), i + 1)
        return {n: i / (counts[p] - 1) if counts[p] > 1 else 1.0 for n, (p, i) in found.items()}

    def module_of(self, tensor_name: str) -> str:
        """The mergekit module a tensor belongs to: one of `modules`, else the text model's."""
        return next((name for name, pattern in self.modules if re.match(pattern, tensor_name)), TEXT_MODULE)

    def text_settings(self, config: dict) -> dict:
        """The part of config.json that describes the text model: all of it, or its `text_config` (an image-text config
        without one, as Qwen2.5-VL's on the hub, holds the text model's settings at the top)."""
        settings = config.get(self.text_config, config) if self.text_config else config
        return settings if isinstance(settings, dict) else {}

    def num_layers(self, config: dict) -> int:
        """The layer count; where a config leaves it out, the length of its list of each layer's kind (Nemotron-H's
        `layers_block_type`, as transformers 5 writes it)."""
        settings = self.text_settings(config)
        count = settings.get(self._count_key(settings))
        kinds = next((v for k in self.per_layer_keys if isinstance(v := settings.get(k), (list, str))), None)
        if not isinstance(count, int) and kinds is None:
            raise EvomergeError(f"{self.name} config needs an integer layer count",
                                key=".".join(filter(None, (self.text_config, self.num_layers_key))))
        return count if isinstance(count, int) else len(kinds)

    def _count_key(self, settings: dict) -> str:
        """The key of the layer count: the family's, or transformers' own where a config it wrote holds that one
        (EXAONE 3's hub configs say num_layers, transformers 5 writes num_hidden_layers)."""
        return next((k for k in (self.num_layers_key, "num_hidden_layers") if isinstance(settings.get(k), int)),
                    self.num_layers_key)

    def set_num_layers(self, config: dict, n: int, *, source_layers: list[int] | None = None) -> dict:
        """A copy of `config` with n layers. Per-layer lists are re-indexed by `source_layers` (the original index of each
        new layer) when given, else dropped when their length no longer fits, so transformers rebuilds its default."""
        if source_layers is not None and len(source_layers) != n:
            raise ValueError(f"source_layers has {len(source_layers)} entries for {n} layers")
        settings = self.text_settings(config)
        out = {**settings, self._count_key(settings): n}
        for key in self.per_layer_keys:
            values = settings.get(key)
            if not isinstance(values, (list, str)):
                continue
            if source_layers is not None:
                out[key] = [values[i] for i in source_layers]
                out[key] = "".join(out[key]) if isinstance(values, str) else out[key]
            elif len(values) != n:
                del out[key]
        if source_layers is not None and "mlp_only_layers" in settings:  # Qwen3-MoE's dense layers, listed anew
            step = settings.get("decoder_sparse_step") or 1  # else every step-th layer is sparse
            dense = {i for i in range(self.num_layers(config)) if i in settings["mlp_only_layers"] or (i + 1) % step}
            out.update(mlp_only_layers=[j for j, i in enumerate(source_layers) if i in dense], decoder_sparse_step=1)
        if source_layers is not None and isinstance(settings.get("full_attn_idxs"), list):  # LFM2's attention layers
            out["full_attn_idxs"] = [j for j, i in enumerate(source_layers) if i in settings["full_attn_idxs"]]
        if source_layers is not None and "interleave_moe_layer_step" in settings:  # Llama 4's layers with experts and
            # without RoPE: listed, else transformers' defaults (every step-th, every interval-th)
            step, interval = settings["interleave_moe_layer_step"] or 1, settings.get("no_rope_layer_interval") or 4
            moe = settings.get("moe_layers")
            moe = range(step - 1, self.num_layers(config), step) if moe is None else moe
            no_rope = settings.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(self.num_layers(config))]
            out.update(moe_layers=[j for j, i in enumerate(source_layers) if i in moe],
                       no_rope_layers=[no_rope[i] for i in source_layers])
        if source_layers is not None and isinstance(settings.get("moe_layer_start_index"), int):  # ERNIE-4.5-MoE:
            # experts in layers start..end, every step-th
            end, step = settings.get("moe_layer_end_index", -1), settings.get("moe_layer_interval", 1)
            in_place = source_layers == list(range(self.num_layers(config)))  # (slices that keep every layer)
            if not in_place and (step != 1 or end not in (-1, self.num_layers(config) - 1)):
                raise EvomergeError(f"{self.name} layers cannot be restacked: its config puts experts in layers "
                                    f"{settings['moe_layer_start_index']} to {end}, one in {step}", key="layers")
            out["moe_layer_end_index"] = end if in_place or end == -1 else n - 1
        kinds = _indexer_kinds(settings, self.num_layers(config)) if source_layers is not None else None
        if kinds is not None:  # GLM-5: listed anew; a "shared" layer needs one before it
            out["indexer_types"] = [kinds[i] for i in source_layers]
            if out["indexer_types"][0] == "shared":
                raise EvomergeError(f"{self.name} cannot start with a layer that reuses the sparse-attention selection of "
                                    f"the layer before it (indexer_types 'shared'); this writes layer {source_layers[0]} "
                                    f"as layer 0", key="layers")
        for key in DENSE_COUNT_KEYS:  # GLM-4.5, DeepSeek-V3, AFMoE, ERNIE-4.5-MoE: the first k layers' MLPs are dense
            if source_layers is None or not isinstance(settings.get(key), int):
                continue
            dense = [i < settings[key] for i in source_layers]
            out[key] = dense.index(False) if False in dense else n
            if True in dense[out[key]:] and not isinstance(out.get("mlp_layer_types"), list):
                j = dense.index(True, out[key])
                raise EvomergeError(f"{self.name} cannot have a dense-MLP layer after a mixture-of-experts one (its config "
                                    f"counts its first dense layers, {key}); this writes dense layer {source_layers[j]} "
                                    f"as layer {j}", key="layers")
        if source_layers is not None and _attention_layers(settings) and _attention_layers(out) == 0:
            raise EvomergeError(f"a {self.name} model needs one of its attention layers (transformers builds its masks "
                                f"there); this path keeps none (source layers {source_layers})", key="layers")
        return self.with_text_settings(config, out)

    def with_text_settings(self, config: dict, settings: dict) -> dict:
        """A copy of `config` whose text model is described by `settings`."""
        return {**config, self.text_config: settings} if self.text_config in config else settings

    def check_modules(self, names: list[str], source: str) -> None:
        """A recipe's `modules:` names every mergekit module of this family, and no other."""
        known = [TEXT_MODULE, *(name for name, _ in self.modules)]
        if len(known) == 1:
            raise EvomergeError(f"{self.name} is one module (its text model) in mergekit: give models or slices, not "
                                f"modules", source=source, key="modules")
        for name in names:
            if name not in known:
                raise EvomergeError(f"no module {name!r} in {self.name} (its modules: {', '.join(known)})",
                                    source=source, key=f"modules.{name}")
        missing = [name for name in known if name not in names]
        if missing:
            raise EvomergeError(f"module {missing[0]} of {self.name} is missing (mergekit would write a model without "
                                f"it)", source=source, key="modules")

    def check_layers_stay(self, layers: list[tuple[int, int]], num_layers: int, source: str, key: str) -> None:
        """Refuses, where this family's layers cannot move (`fixed_layers`), a written model whose layers ((written,
        source) index pairs) are not its source's num_layers layers, each in its place."""
        if not self.fixed_layers:
            return
        if moved := [(k, i) for k, i in layers if k != i]:
            raise EvomergeError(f"{self.name} layers cannot be moved or repeated ({self.fixed_layers}); this writes "
                                f"layer {moved[0][1]} as layer {moved[0][0]}", source=source, key=key)
        if (written := len({k for k, _ in layers})) != num_layers:
            raise EvomergeError(f"{self.name} layers cannot be dropped ({self.fixed_layers}); this writes "
                                f"{written} of its {num_layers} layers", source=source, key=key)

    def tied_embeddings(self, config: dict) -> bool:
        return bool(config.get("tie_word_embeddings", self.tied_default))


def _attention_layers(settings: dict) -> int | None:
    """How many layers a hybrid config's per-layer kinds make softmax attention (not linear attention, a state-space
    mixer or a convolution); None where it lists no kinds."""
    for key in ("layer_types", "layers_block_type"):
        if isinstance(kinds := settings.get(key), list):
            return sum(k == "attention" or k.endswith("_attention") and k != "linear_attention" for k in kinds)
    if isinstance(pattern := settings.get("hybrid_override_pattern"), str):  # Nemotron-H's: "*" an attention layer
        return pattern.count("*")
    return len(settings["full_attn_idxs"]) if isinstance(settings.get("full_attn_idxs"), list) else None  # LFM2's


def _indexer_kinds(settings: dict, count: int) -> list[str] | None:
    """GLM-5's layers' sparse-attention kinds, "full" (an indexer of its own) or "shared": as listed (indexer_types),
    spelled (index_topk_pattern, "FSSF..."), or by transformers' rule from index_topk_freq and index_skip_topk_offset;
    None for a config with none of them."""
    if isinstance(settings.get("indexer_types"), list):
        return settings["indexer_types"]
    if (pattern := settings.get("index_topk_pattern")) is not None:
        return [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
    if "index_topk_freq" in settings or "index_skip_topk_offset" in settings:
        freq, offset = max(settings.get("index_topk_freq", 1), 1), settings.get("index_skip_topk_offset", 2)
        return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(count)]
    return None


_LLAMA_OUT = r"\.(self_attn\.o_proj|mlp\.down_proj)\.(weight|bias)$"


def _decoder(name: str, architectures: tuple[str, ...], *, layers: str, embeddings: str, final_norm: str,
             tied: bool = False, **fields) -> Architecture:
    """A decoder whose checkpoint names its layers `{layers}.{i}.`, its embeddings `{embeddings}.weight`, its final norm
    `{final_norm}.weight` (and bias) and its head `lm_head.weight` (regexes); `fields` set the rest."""
    return Architecture(**{
        "name": name,
        "architectures": architectures,
        "layer": rf"({layers}\.)(\d+)\.",
        "pre": rf"{embeddings}\.weight",
        "post": rf"{final_norm}\.(weight|bias)|lm_head\.weight",
        "vocab": rf"{embeddings}\.weight|lm_head\.weight",
        "tied_default": tied,
        **fields,
    })


def _llama_like(name: str, architecture: str, **fields) -> Architecture:
    """A decoder named as Llama's (`model.layers.`); `fields` override the rest."""
    llama = {"layers": r"model\.layers", "embeddings": r"model\.embed_tokens", "final_norm": r"model\.norm",
             "output_projections": _LLAMA_OUT}
    return _decoder(name, fields.pop("architectures", (architecture,)), **{**llama, **fields})


def _fused_experts(experts: str, gate: str, up: str, down: str, layers: str = r"model\.layers", live: str = "mlp"
                   ) -> tuple[tuple[str, str, int, int], ...]:
    """`{layers}.{i}.{experts}.{e}.{gate, up, down}.weight` of a checkpoint, live in `{live}.experts.gate_up_proj[e]`
    (the gate's rows, then the up projection's) and `{live}.experts.down_proj[e]` (transformers 5's MoE modules)."""
    head = rf"({layers}\.\d+)\.{experts}\.(?P<e>\d+)"
    return ((rf"{head}\.{gate}\.weight", rf"\1.{live}.experts.gate_up_proj", 0, 2),
            (rf"{head}\.{up}\.weight", rf"\1.{live}.experts.gate_up_proj", 1, 2),
            (rf"{head}\.{down}\.weight", rf"\1.{live}.experts.down_proj", 0, 1))


# Qwen3.5: three of each four layers attend linearly (a gated delta rule, `linear_attn`), their kinds in layer_types
_QWEN3_5 = _llama_like("qwen3_5_text", "Qwen3_5ForCausalLM", attn=r"\.(self_attn|linear_attn|attn)\.",
                       output_projections=r"\.(self_attn\.o_proj|linear_attn\.out_proj|mlp\.down_proj)\.weight$",
                       unloaded=r"mtp\.")

# Qwen3-Next and Qwen3.5-MoE: Qwen3.5's layers with a mixture of experts beside a shared expert (its output gated)
_QWEN3_5_MOE = dict(attn=_QWEN3_5.attn, unloaded=_QWEN3_5.unloaded,
                    output_projections=r"\.(self_attn\.o_proj|linear_attn\.out_proj|mlp\.(shared_expert\.)?down_proj|"
                                       r"mlp\.experts\.\d+\.down_proj)\.weight$|\.mlp\.experts\.down_proj$")

_TEXT_MODEL = r"(?:language_model\.model|model\.language_model)"  # an image-text checkpoint's text model, both namings
# mergekit's modules beside the text model: Gemma-3's and Mistral-3's (LLaVA's names), Qwen3-VL's (its deepstack mergers
# project vision features as its merger does)
_LLAVA_MODULES = (("vision_tower", r"(model\.)?vision_tower\."),
                  ("multi_modal_projector", r"(model\.)?multi_modal_projector\."))
_QWEN3_VL_MODULES = (("multi_modal_projector", r"model\.visual\.(merger|deepstack_merger_list)\."),
                     ("vision_tower", r"model\.visual\."))
_LLAVA_RENAMES = ((r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head."),
                  (r"^multi_modal_projector\.", "model.multi_modal_projector."))


def _image_text(name: str, architecture: str, *, tied: bool, vision_layers: str, text: str = _TEXT_MODEL,
                **fields) -> Architecture:
    """An image-text model whose text model's tensors are named `{text}.` and its vision layers `vision_layers`."""
    return Architecture(**{
        "name": name,
        "architectures": (architecture,),
        "layer": rf"({text}\.layers\.)(\d+)\.",
        "pre": rf"{text}\.embed_tokens\.weight",
        "post": rf"{text}\.norm\.weight|(language_model\.)?lm_head\.weight",
        "vocab": rf"{text}\.embed_tokens\.weight|(language_model\.)?lm_head\.weight",
        "tied_default": tied,
        "text_config": "text_config",
        "part_layer": vision_layers,
        **fields,
    })


# output projections of a mixture of experts named as Qwen3-MoE's (its dense layers' too)
_EXPERTS_OUT = r"\.(self_attn\.o_proj\.weight|mlp\.down_proj\.weight|mlp\.experts\.(\d+\.down_proj\.weight|down_proj))$"
# Mixtral's naming (block_sparse_moe.experts.E.w1, w2, w3: gate, down, up), its router's live name added per family
_MIXTRAL = dict(mlp=r"\.(mlp|block_sparse_moe)\.",
                output_projections=r"\.(self_attn\.o_proj\.weight|block_sparse_moe\.experts\.\d+\.w2\.weight|"
                                   r"mlp\.experts\.down_proj)$",
                live_experts=_fused_experts(r"block_sparse_moe\.experts", "w1", "w3", "w2"))
_GRANITE_MOE_RENAMES = ((r"\.block_sparse_moe\.input_linear\.weight$", ".block_sparse_moe.experts.gate_up_proj"),
                        (r"\.block_sparse_moe\.output_linear\.weight$", ".block_sparse_moe.experts.down_proj"),
                        (r"\.block_sparse_moe\.router\.layer\.", ".block_sparse_moe.router."))  # checkpoint -> live

# Gemma-4: beside each layer's own tensors, a non-layer tensor holds a slice per layer (per-layer embeddings, their
# projection), and the last layers reuse earlier layers' keys and values; each branch's output is normed (Gemma-2)
_GEMMA4 = dict(tied=True, mlp=r"\.(mlp|experts|router)\.", output_projections="",
               fixed_layers="its per-layer embeddings (embed_tokens_per_layer) hold a slice per layer and its last "
                            "layers reuse earlier layers' keys and values")
_GEMMA4_PRE = r"embed_tokens(_per_layer)?\.weight|per_layer_model_projection\.weight|per_layer_projection_norm\.weight"

_LLAMA4 = dict(mlp=r"\.(feed_forward|layers\.\d+\.mlp)\.",  # (its vision tower's layers': mlp)
               output_projections=r"\.(self_attn\.o_proj\.weight|feed_forward\.((shared_expert\.)?down_proj\.weight|"
                                  r"experts\.down_proj))$")

_GPT2 = _decoder(  # older GPT-2 checkpoints (the hub's `gpt2`) leave out the `transformer.` prefix
    "gpt2", ("GPT2LMHeadModel",), layers=r"(?:transformer\.)?h", embeddings=r"(transformer\.)?wte",
    final_norm=r"(transformer\.)?ln_f", tied=True, pre=r"(transformer\.)?(wte|wpe)\.weight",  # (position embeddings)
    num_layers_key="n_layer", output_projections=r"\.(attn|mlp)\.c_proj\.(weight|bias)$")

ARCHITECTURES: tuple[Architecture, ...] = (
    _llama_like("llama", "LlamaForCausalLM"),
    _llama_like("mistral", "MistralForCausalLM"),
    _llama_like("qwen2", "Qwen2ForCausalLM"),
    _llama_like("gemma", "GemmaForCausalLM", tied=True),
    _llama_like("gemma2", "Gemma2ForCausalLM", tied=True, output_projections=""),
    _llama_like("phi3", "Phi3ForCausalLM"),
    _llama_like("qwen3", "Qwen3ForCausalLM"),
    _llama_like("gemma3_text", "Gemma3ForCausalLM", tied=True, output_projections=""),
    _llama_like("olmo2", "Olmo2ForCausalLM", output_projections=""),  # norms each branch's output, as Gemma-2
    _llama_like("granite", "GraniteForCausalLM"),
    _llama_like("arcee", "ArceeForCausalLM"),
    _llama_like("ministral", "MinistralForCausalLM"),  # Ministral-8B as transformers 5 names it (the hub's: Mistral)
    _llama_like("ministral3", "Ministral3ForCausalLM"),  # Ministral 3's text model
    _llama_like("internlm3", "InternLM3ForCausalLM",  # transformers loads it as Llama, and writes that architecture
                architectures=("InternLM3ForCausalLM", "LlamaForCausalLM")),
    _llama_like("cohere2", "Cohere2ForCausalLM", tied=True),  # attention and MLP in parallel, on one norm
    _llama_like("cohere", "CohereForCausalLM", tied=True),  # Command R (v1), as Cohere-2
    _llama_like("stablelm", "StableLmForCausalLM"),  # StableLM(-2): norms with biases
    _llama_like("phi", "PhiForCausalLM",  # Phi-1, 1.5, 2: attention and MLP in parallel, on one norm; a head bias
                post=r"model\.final_layernorm\.(weight|bias)|lm_head\.(weight|bias)",
                vocab=r"model\.embed_tokens\.weight|lm_head\.(weight|bias)",
                output_projections=r"\.(self_attn\.dense|mlp\.fc2)\.(weight|bias)$"),
    _llama_like("glm4", "Glm4ForCausalLM", output_projections=""),  # norms each branch's output, as Gemma-2
    _llama_like("starcoder2", "Starcoder2ForCausalLM", tied=True,
                output_projections=r"\.(self_attn\.o_proj|mlp\.c_proj)\.(weight|bias)$"),
    _llama_like("olmo3", "Olmo3ForCausalLM", output_projections=""),  # norms each branch's output, as OLMo-2
    _llama_like("exaone4", "Exaone4ForCausalLM", output_projections=""),  # norms each branch's output, as OLMo-2
    _llama_like("smollm3", "SmolLM3ForCausalLM", tied=True, per_layer_keys=("layer_types", "no_rope_layers")),
    _llama_like("seed_oss", "SeedOssForCausalLM"),
    _llama_like("apertus", "ApertusForCausalLM"),  # its MLP's activation (xIELU) has weights of its own, merged as any
    _llama_like("ernie4_5", "Ernie4_5ForCausalLM", tied=True),
    _llama_like("hunyuan_v1_dense", "HunYuanDenseV1ForCausalLM"),
    _llama_like("helium", "HeliumForCausalLM"),
    _llama_like("glm", "GlmForCausalLM"),  # GLM-4-9B (its -hf checkpoints): gate and up projections fused
    _llama_like("nemotron", "NemotronForCausalLM"),  # Minitron: norms with biases, a two-matrix MLP (squared ReLU)
    _llama_like("vaultgemma", "VaultGemmaForCausalLM", tied=True),
    _QWEN3_5,
    _llama_like("lfm2", "Lfm2ForCausalLM", tied=True,  # LFM2: short-convolution layers beside attention (layer_types)
                attn=r"\.(self_attn|conv)\.", mlp=r"\.feed_forward\.", post=r"model\.embedding_norm\.weight|lm_head\.weight",
                output_projections=r"\.((self_attn|conv)\.out_proj|feed_forward\.w2)\.weight$"),  # embedding_norm: the
    # final norm, despite its name
    _llama_like("lfm2_moe", "Lfm2MoeForCausalLM", tied=True,  # LFM2-MoE: LFM2's layers, experts after dense first ones
                attn=r"\.(self_attn|conv)\.", mlp=r"\.feed_forward\.", post=r"model\.embedding_norm\.weight|lm_head\.weight",
                output_projections=r"\.((self_attn|conv)\.out_proj|feed_forward\.(experts\.\d+\.)?w2)\.weight$|"
                                   r"\.feed_forward\.experts\.down_proj$",
                live_experts=_fused_experts(r"feed_forward\.experts", "w1", "w3", "w2", live="feed_forward")),
    _llama_like("gemma4_text", "Gemma4ForCausalLM", **_GEMMA4, pre=rf"model\.({_GEMMA4_PRE})"),
    # Mixtures of experts: checkpoints hold each expert's tensors (the hub's) or the live module's fused ones (as
    # transformers 5 and mergekit 0.1.5 name them); a merge takes either, expert by expert or fused tensor by tensor.
    *(_llama_like(name, architecture, output_projections=_EXPERTS_OUT,
                  live_experts=_fused_experts(r"mlp\.experts", "gate_proj", "up_proj", "down_proj"))
      for name, architecture in (("qwen3_moe", "Qwen3MoeForCausalLM"), ("olmoe", "OlmoeForCausalLM"))),
    _llama_like("mixtral", "MixtralForCausalLM", **_MIXTRAL, live_renames=((r"\.block_sparse_moe\.gate\.", ".mlp.gate."),)),
    _llama_like("qwen2_moe", "Qwen2MoeForCausalLM",  # Qwen1.5-MoE, Qwen2-57B-A14B: a gated shared expert, as Qwen3-Next's
                output_projections=_QWEN3_5_MOE["output_projections"],
                live_experts=_fused_experts(r"mlp\.experts", "gate_proj", "up_proj", "down_proj")),
    _llama_like("granitemoehybrid", "GraniteMoeHybridForCausalLM",  # Granite 4.0: Mamba-2 layers beside attention ones,
                # each with a shared MLP beside its experts (fused in the checkpoint, renamed in the live module)
                attn=r"\.(self_attn|mamba)\.", mlp=r"\.(shared_mlp|block_sparse_moe)\.",
                output_projections=r"\.(self_attn\.o_proj|mamba\.out_proj|(shared_mlp|block_sparse_moe)\.output_linear)"
                                   r"\.weight$",
                live_renames=_GRANITE_MOE_RENAMES),
    _llama_like("granitemoe", "GraniteMoeForCausalLM", mlp=r"\.block_sparse_moe\.",  # Granite 3.x MoE: experts fused
                output_projections=r"\.(self_attn\.o_proj|block_sparse_moe\.output_linear)\.weight$",  # as Granite 4.0's
                live_renames=_GRANITE_MOE_RENAMES),
    _llama_like("minimax_m2", "MiniMaxM2ForCausalLM", **_MIXTRAL,  # MiniMax-M2: Mixtral's naming
                live_renames=((r"\.block_sparse_moe\.gate\.", ".mlp.gate."),
                              (r"\.block_sparse_moe\.e_score_correction_bias$", ".mlp.e_score_correction_bias"))),
    _llama_like("hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM",  # Hunyuan-A13B: experts beside a shared MLP
                output_projections=r"\.(self_attn\.o_proj\.weight|mlp\.(shared_mlp\.)?down_proj\.weight|"
                                   r"mlp\.experts\.(\d+\.down_proj\.weight|down_proj))$",
                live_experts=_fused_experts(r"mlp\.experts", "gate_proj", "up_proj", "down_proj")),
    _llama_like("phimoe", "PhimoeForCausalLM", mlp=_MIXTRAL["mlp"], live_experts=_MIXTRAL["live_experts"],  # Phi-3.5-MoE:
                architectures=("PhimoeForCausalLM", "PhiMoEForCausalLM"),  # (transformers' class, the hub config's)
                output_projections=r"\.(self_attn\.o_proj\.(weight|bias)|block_sparse_moe\.experts\.\d+\.w2\.weight|"
                                   r"mlp\.experts\.down_proj)$",  # Mixtral's naming; norms, attention, head with biases
                post=r"model\.norm\.(weight|bias)|lm_head\.(weight|bias)",
                vocab=r"model\.embed_tokens\.weight|lm_head\.(weight|bias)",
                live_renames=((r"\.block_sparse_moe\.gate\.", ".mlp.router."),)),
    _llama_like("falcon_h1", "FalconH1ForCausalLM",  # Falcon-H1: attention and Mamba-2 side by side in every layer
                attn=r"\.(self_attn|mamba)\.", mlp=r"\.feed_forward\.", post=r"model\.final_layernorm\.weight|lm_head\.weight",
                output_projections=r"\.(self_attn\.o_proj|mamba\.out_proj|feed_forward\.down_proj)\.weight$"),
    _decoder(  # Nemotron-H (Nemotron Nano 2, Nemotron 3 Nano): each layer one mixer, Mamba-2, attention, an MLP or
        # experts, as `layers_block_type` (hub configs: `hybrid_override_pattern`, a character a layer) says; the
        # checkpoints name the decoder `backbone.`, transformers `model.`
        "nemotron_h", ("NemotronHForCausalLM",),
        layers=r"(?:backbone|model)\.layers", embeddings=r"(backbone|model)\.embeddings", final_norm=r"(backbone|model)\.norm_f",
        attn=r"\.mixer\.(?!(experts|shared_experts|gate|up_proj|down_proj)\b)",
        mlp=r"\.mixer\.(experts|shared_experts|gate|up_proj|down_proj)\b",
        output_projections=r"\.mixer\.(out_proj|o_proj|down_proj|(shared_experts|experts\.\d+)\.down_proj)\.weight$|"
                           r"\.mixer\.experts\.down_proj$",
        per_layer_keys=("layers_block_type", "hybrid_override_pattern"),
        unloaded=r"(backbone\.)?mtp\.",  # its multi-token-prediction layers, which transformers ignores on load
        live_renames=((r"^backbone\.", "model."),),
        live_experts=tuple((rf"(?:backbone|model)\.(layers\.\d+)\.mixer\.experts\.(?P<e>\d+)\.{kind}\.weight",
                            rf"model.\1.mixer.experts.{kind}", 0, 1) for kind in ("up_proj", "down_proj")),
    ),
    _llama_like("gpt_oss", "GptOssForCausalLM",  # experts fused in its checkpoints too, with biases; attention sinks
                output_projections=r"\.(self_attn\.o_proj\.(weight|bias)|mlp\.experts\.down_proj(_bias)?)$"),
    # GLM-4.5 to 4.7 and DeepSeek-V3 (R1, V3.1; Kimi-K2): dense first layers, then experts beside shared ones; their
    # hub checkpoints hold a multi-token-prediction layer past num_hidden_layers (merged as the layers' successor)
    *(_llama_like(name, architecture, vocab=r"model\.(layers\.\d+\.)?embed_tokens\.weight|lm_head\.weight|"
                                          r"model\.layers\.\d+\.shared_head\.head\.weight",
                  output_projections=r"\.(self_attn\.o_proj|mlp\.(shared_experts\.)?down_proj|mlp\.experts\.\d+\.down_proj)"
                                     r"\.weight$|\.mlp\.experts\.down_proj$",
                  live_experts=_fused_experts(r"mlp\.experts", "gate_proj", "up_proj", "down_proj"))
      for name, architecture in (("glm4_moe", "Glm4MoeForCausalLM"), ("deepseek_v3", "DeepseekV3ForCausalLM"),
                                 ("glm4_moe_lite", "Glm4MoeLiteForCausalLM"),  # 4.7-Flash: DeepSeek-V3's attention
                                 ("deepseek_v2", "DeepseekV2ForCausalLM"),  # V2, V2-Lite, Coder-V2 (no MTP layer)
                                 ("dots1", "Dots1ForCausalLM"),  # dots.llm1: DeepSeek-V3's MoE, plain attention
                                 ("deepseek_v32", "DeepseekV32ForCausalLM"),  # V3.2: V3's, and a sparse-attention
                                 # indexer in each attention
                                 ("glm_moe_dsa", "GlmMoeDsaForCausalLM"))),  # GLM-5: V3.2's, an indexer in the layers
    # its config's indexer_types call "full", the "shared" ones reuse the selection of the layer before
    # ERNIE-4.5-MoE (21B-A3B, 300B-A47B): dense first layers (moe_layer_start_index), then experts beside shared ones;
    # its hub checkpoints' multi-token-prediction tensors (mtp_*), which transformers ignores, and its routers' bias
    # under another name
    _llama_like("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", tied=True, unloaded=r"model\.mtp_",
                output_projections=r"\.(self_attn\.o_proj|mlp\.(shared_experts\.)?down_proj|mlp\.experts\.\d+\.down_proj)"
                                   r"\.weight$|\.mlp\.experts\.down_proj$",
                live_renames=((r"\.mlp\.moe_statics\.", ".mlp.gate.moe_statics."),),
                live_experts=_fused_experts(r"mlp\.experts", "gate_proj", "up_proj", "down_proj")),
    # Jamba: Mamba layers with an attention one every attn_layer_period-th, experts every expert_layer_period-th (dense
    # MLPs between); periods and offsets cannot spell a restacked path's kinds, so its layers stay in place
    _llama_like("jamba", "JambaForCausalLM", attn=r"\.(self_attn|mamba)\.", mlp=r"\.feed_forward\.",
                post=r"model\.final_layernorm\.weight|lm_head\.weight",
                output_projections=r"\.(self_attn\.o_proj|mamba\.out_proj|feed_forward\.(experts\.\d+\.)?down_proj)\.weight$|"
                                   r"\.feed_forward\.experts\.down_proj$",
                live_experts=_fused_experts(r"feed_forward\.experts", "gate_proj", "up_proj", "down_proj",
                                            live="feed_forward"),
                fixed_layers="its config gives each layer's kind by periods and offsets "
                             "(attn_layer_period, expert_layer_period), which a restacked path cannot keep"),
    # AFMoE (Arcee Trinity): dense first layers (num_dense_layers), then experts beside shared ones; each branch's
    # output normed (Gemma-2), its attention gated
    _llama_like("afmoe", "AfmoeForCausalLM", output_projections="",
                live_experts=_fused_experts(r"mlp\.experts", "gate_proj", "up_proj", "down_proj")),
    # Llama 4: experts every interleave_moe_layer_step-th layer (fused in its checkpoints, [experts, in, out]) beside a
    # shared expert, dense MLPs elsewhere; every no_rope_layer_interval-th layer attends without rotary embeddings
    _llama_like("llama4_text", "Llama4ForCausalLM", **_LLAMA4),
    _llama_like("qwen3_next", "Qwen3NextForCausalLM", **_QWEN3_5_MOE,  # its dense layers as Qwen3-MoE's
                live_experts=_fused_experts(r"mlp\.experts", "gate_proj", "up_proj", "down_proj")),
    _llama_like("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", **_QWEN3_5_MOE,
                live_experts=_fused_experts(r"mlp\.experts", "gate_proj", "up_proj", "down_proj")),
    # Image-text models: the text model's layers are the layers; the vision tower and projector merge as the other
    # non-layer tensors do, a gradient spread over the tower's layers as over the text layers. Gemma-3 and Mistral-3
    # checkpoints name the text model `language_model.model.` (the hub's, and transformers 5 writes so) or
    # `model.language_model.` (the live module's names); both load.
    _image_text("gemma3", "Gemma3ForConditionalGeneration", tied=True,
                vision_layers=r"((?:model\.)?vision_tower\.(?:vision_model\.)?encoder\.layers\.)(\d+)\.",
                live_renames=(*_LLAVA_RENAMES, (r"^(model\.)?vision_tower\.(vision_model\.)?", "model.vision_tower.")),
                modules=_LLAVA_MODULES),
    _image_text("gemma4", "Gemma4ForConditionalGeneration", text=r"model\.language_model",
                vision_layers=r"(model\.(?:vision_tower\.encoder|audio_tower)\.layers\.)(\d+)\.", **_GEMMA4,
                pre=rf"model\.language_model\.({_GEMMA4_PRE})"),
    _image_text("llama4", "Llama4ForConditionalGeneration", tied=False,  # Llama 4 Scout, Maverick
                vision_layers=r"(vision_model\.model\.layers\.)(\d+)\.", mlp=_LLAMA4["mlp"],
                output_projections=rf"^{_TEXT_MODEL}\.layers\.\d+{_LLAMA4['output_projections']}",  # not the vision's
                modules=(("vision_model", r"(model\.)?vision_model\."), _LLAVA_MODULES[1])),
    _image_text("mistral3", "Mistral3ForConditionalGeneration", tied=True,  # Mistral Small 3.x, Ministral 3
                vision_layers=r"((?:model\.)?vision_tower\.transformer\.layers\.)(\d+)\.",
                mlp=r"\.(mlp|feed_forward)\.", output_projections=_LLAMA_OUT,
                live_renames=(*_LLAVA_RENAMES, (r"^vision_tower\.", "model.vision_tower.")), modules=_LLAVA_MODULES),
    _image_text("qwen3_5", "Qwen3_5ForConditionalGeneration", tied=False, text=r"model\.language_model",
                vision_layers=r"(model\.visual\.blocks\.)(\d+)\.", attn=_QWEN3_5.attn,
                output_projections=_QWEN3_5.output_projections, unloaded=_QWEN3_5.unloaded),
    _image_text("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", tied=False, text=r"model\.language_model",
                vision_layers=r"(model\.visual\.blocks\.)(\d+)\.", **_QWEN3_5_MOE,
                live_experts=_fused_experts(r"mlp\.experts", "gate_proj", "up_proj", "down_proj",
                                            layers=r"model\.language_model\.layers")),
    # Qwen2-VL and Qwen2.5-VL checkpoints (the hub's, and transformers 5 writes so) name the text model `model.` and
    # the vision tower `visual.`, those of transformers 4.52-4.57 `model.language_model.` and `model.visual.`; both load
    *(_image_text(name, architecture, tied=False, text=r"model(?:\.language_model)?",
                  vision_layers=r"((?:model\.)?visual\.blocks\.)(\d+)\.", mlp=r"\.mlp\.(?!\d)",  # not the projector's
                  output_projections=r"^model\.(language_model\.)?layers\.\d+" + _LLAMA_OUT,  # not the vision tower's
                  live_renames=((r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
                                (r"^visual\.", "model.visual.")),
                  modules=(("multi_modal_projector", r"(model\.)?visual\.merger\."),
                           ("vision_tower", r"(model\.)?visual\.")))
      for name, architecture in (("qwen2_vl", "Qwen2VLForConditionalGeneration"),
                                 ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"))),
    # Qwen3-VL: its deepstack mergers (one per early text layer that takes vision features) spread a gradient as layers
    _image_text("qwen3_vl", "Qwen3VLForConditionalGeneration", tied=False, text=r"model\.language_model",
                vision_layers=r"(model\.visual\.(?:blocks|deepstack_merger_list)\.)(\d+)\.",
                output_projections=_LLAMA_OUT, modules=_QWEN3_VL_MODULES),
    # Qwen3-VL-MoE: fused experts in its checkpoints, the hub's as [experts, in, out] (transformers transposes them on
    # load; a search's live model takes them so)
    _image_text("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", tied=False, text=r"model\.language_model",
                vision_layers=r"(model\.visual\.(?:blocks|deepstack_merger_list)\.)(\d+)\.",
                output_projections=r"\.(self_attn\.o_proj\.weight|mlp\.down_proj\.weight|mlp\.experts\.down_proj)$",
                modules=_QWEN3_VL_MODULES),
    _GPT2,
    replace(_GPT2, name="gpt_bigcode", architectures=("GPTBigCodeForCausalLM",)),  # StarCoder (1), SantaCoder: GPT-2's
    # names (one key-value head)
    _decoder("mamba", ("MambaForCausalLM",), layers=r"backbone\.layers", embeddings=r"backbone\.embeddings",  # one
             final_norm=r"backbone\.norm_f", tied=True, attn=r"\.mixer\.", mlp=r"$^",  # state-space mixer a layer,
             output_projections=r"\.mixer\.out_proj\.weight$"),  # no MLP
    _decoder("falcon", ("FalconForCausalLM",), layers=r"transformer\.h", embeddings=r"transformer\.word_embeddings",
             final_norm=r"transformer\.ln_f", tied=True, attn=r"\.self_attention\.",  # attention and MLP in parallel,
             output_projections=r"\.(self_attention\.dense|mlp\.dense_4h_to_h)\.(weight|bias)$"),  # on one norm
    # (7B) or one each (40B, 180B: ln_attn, ln_mlp)
    _decoder(  # EXAONE 3.0, 3.5: Llama's layers under GPT-2's names; transformers loads it as Llama, renamed
        "exaone", ("ExaoneForCausalLM", "LlamaForCausalLM"),  # the second: its config as transformers 5 writes it
        # the names of its checkpoint, then of its live model
        layers=r"(?:transformer\.h|model\.layers)", embeddings=r"(transformer\.wte|model\.embed_tokens)",
        final_norm=r"(transformer\.ln_f|model\.norm)",
        num_layers_key="num_layers",
        output_projections=r"\.(attn\.attention\.out_proj|mlp\.c_proj)\.weight$",
        filters_see_live_names=False,
        live_renames=((r"^transformer\.wte\.", "model.embed_tokens."), (r"^transformer\.ln_f\.", "model.norm."),
                      *((rf"^transformer\.h\.(\d+)\.{old}\.", rf"model.layers.\1.{new}.") for old, new in (
                          ("attn.attention.q_proj", "self_attn.q_proj"), ("attn.attention.k_proj", "self_attn.k_proj"),
                          ("attn.attention.v_proj", "self_attn.v_proj"), ("attn.attention.out_proj", "self_attn.o_proj"),
                          ("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm"),
                          ("mlp.c_fc_0", "mlp.gate_proj"), ("mlp.c_fc_1", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")))),
    ),
    Architecture(
        name="gpt_neox",
        architectures=("GPTNeoXForCausalLM",),
        layer=r"(gpt_neox\.layers\.)(\d+)\.",
        pre=r"gpt_neox\.embed_in\.weight",
        post=r"gpt_neox\.final_layer_norm\.(weight|bias)|embed_out\.weight",
        vocab=r"gpt_neox\.embed_in\.weight|embed_out\.weight",
        tied_default=False,
        output_projections=r"\.(attention\.dense|mlp\.dense_4h_to_h)\.(weight|bias)$",
        live_renames=((r"^embed_out\.", "lm_head."),),  # transformers >= 5 calls it lm_head, checkpoints embed_out
    ),
)


def architecture_for(config: dict, source: str) -> Architecture:
    """The family of a config.json, by its `architectures` entries (the one named by its `model_type` where several
    families share one: transformers loads EXAONE 3 as Llama), or its `model_type` when those are absent."""
    declared, model_type = config.get("architectures") or [], config.get("model_type")
    found = [arch for arch in ARCHITECTURES
             if any(a in arch.architectures for a in declared) or (not declared and model_type == arch.name)]
    if found:
        return next((arch for arch in found if arch.name == model_type), found[0])
    supported = ", ".join(a for arch in ARCHITECTURES for a in arch.architectures)
    found = ", ".join(declared) or f"model_type {config.get('model_type')!r}"
    raise EvomergeError(f"unsupported architecture {found} (supported: {supported})", source=source, key="architectures")
