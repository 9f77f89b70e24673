"""A data-flow-space candidate as a live model that runs resident layers in the order of its layer path, copying nothing.

The path model is a shallow copy of a skeleton model (embeddings, final norm, head) whose layer list is replaced by one
slot per path entry. A slot reuses a resident decoder layer's parameters; only the modules holding a `layer_idx` (its
attention, an attention's indexer) are shallow-copied so that each slot has its own KV-cache entry when a layer appears
twice. A slot scales the hidden state
entering it (Sakana's DFS scaling). A repeated layer therefore costs no memory.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from evomerge.errors import EvomergeError


class ScaledSlot(nn.Module):
    """Runs `layer` on `scale * hidden_states`."""

    def __init__(self, layer: nn.Module, scale: float):
        super().__init__()
        self.layer, self.scale = layer, scale

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what a decoder reads of its layers (Nemotron-H's block_type)
            layer = self.__dict__.get("_modules", {}).get("layer")  # (none yet while a copy is being built)
            if layer is None:
                raise
            return getattr(layer, name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        return self.layer(hidden_states, *args, **kwargs)


def _decoder(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise EvomergeError(f"data-flow search needs a decoder with `model.layers` (Llama, Mistral, Qwen2 style); "
                            f"got {type(model).__name__}", key="space.dfs")
    return inner


def _slot(layer: nn.Module, index: int, scale: float) -> nn.Module:
    shared = copy.copy(layer)
    shared._modules = {name: _with_cache_entry(child, index) for name, child in layer._modules.items()}
    return ScaledSlot(shared, scale)


def _with_cache_entry(module: nn.Module, index: int) -> nn.Module:
    """`module`, or where it or a module inside it has a `layer_idx` (an attention, Qwen3.5's `linear_attn`, DeepSeek-V3.2's
    attention indexer: each with its cache entry) a copy whose such modules are copies with `layer_idx = index`; the
    parameters stay shared."""
    if not any(hasattr(m, "layer_idx") for m in module.modules()):
        return module
    shared = copy.copy(module)
    shared._modules = {name: _with_cache_entry(child, index) for name, child in module._modules.items()}
    if hasattr(shared, "layer_idx"):
        shared.layer_idx = index
    return shared


def build_path_model(first: nn.Module, layers: dict[str, nn.ModuleList], path: list[tuple[str, int, float]],
                     last: nn.Module | None = None) -> nn.Module:
    """A model running `layers[source][layer]` for each (source, layer, scale) of `path`.

    As in mergekit, embeddings come from `first` (the first slot's source) and the final norm and head from `last`;
    a head tied to the embeddings stays `first`'s, since the written model stores one matrix for both (its embeddings).
    """
    last = first if last is None else last
    model = copy.copy(first)
    model._modules = dict(first._modules)
    tied = first.get_output_embeddings().weight is first.get_input_embeddings().weight
    model._modules["lm_head"] = first.lm_head if tied else last.lm_head
    decoder = copy.copy(_decoder(first))
    decoder._modules = dict(decoder._modules)
    norm = next(n for n in ("norm", "embedding_norm", "final_layernorm", "norm_f") if n in decoder._modules)  # the
    decoder._modules[norm] = getattr(_decoder(last), norm)  # final norm (LFM2's, Phi-2's, Nemotron-H's names)
    decoder._modules["layers"] = nn.ModuleList(_slot(layers[src][i], k, s) for k, (src, i, s) in enumerate(path))
    config = copy.deepcopy(first.config)
    config.num_hidden_layers = len(path)
    kinds = config.attribute_map.get("layer_types", "layer_types")  # Nemotron-H's: layers_block_type
    if vars(config).get(kinds):  # (Falcon-H1's is a property of the layer count)
        setattr(config, kinds, [getattr(config, kinds)[min(i, len(getattr(config, kinds)) - 1)] for _, i, _ in path])
    model.config = decoder.config = config
    model._modules["model"] = decoder
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _decoder(model).layers
