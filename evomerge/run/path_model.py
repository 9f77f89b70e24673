"""A data-flow-space candidate as a live model that runs resident layers in the order of its layer path, copying nothing.

The path model is a shallow copy of a skeleton model (embeddings, final norm, head) whose layer list (an image-text
model's: its text model's) is replaced by one slot per path entry. A slot reuses a resident decoder layer's parameters;
only the modules holding a `layer_idx` (its attention, an attention's indexer) are shallow-copied so that each slot has
its own KV-cache entry when a layer appears twice. A slot scales the hidden state entering it (Sakana's DFS scaling).
A repeated layer therefore costs no memory.
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


# where a causal LM holds its decoder (the module with the layers): most at `model`, image-text models at
# `model.language_model` (Llama 4: a causal LM of its own at `language_model`, with the head), GPT-2's and Falcon's at
# `transformer`, GPT-NeoX's at `gpt_neox`, Mamba's at `backbone`
_DECODER_AT = (("model",), ("model", "language_model"), ("language_model", "model"), ("transformer",), ("gpt_neox",),
               ("backbone",))
_LAYERS = ("layers", "h")  # the decoder's list of layers (GPT-2's and Falcon's: h)
_FINAL_NORMS = ("norm", "embedding_norm", "final_layernorm", "norm_f", "ln_f", "final_layer_norm")  # (LFM2's, Phi-2's,
# Mamba's and Nemotron-H's, GPT-2's and Falcon's, GPT-NeoX's)


def _decoder_at(model: nn.Module) -> tuple[str, ...]:
    for names in _DECODER_AT:
        inner = model
        for name in names:
            inner = getattr(inner, name, None)
        if any(isinstance(getattr(inner, layers, None), nn.ModuleList) for layers in _LAYERS):
            return names
    raise EvomergeError(f"data-flow search needs a decoder with a list of layers (`model.layers`, as Llama's); "
                        f"got {type(model).__name__}", key="space.dfs")


def _layers_name(decoder: nn.Module) -> str:
    return next(name for name in _LAYERS if isinstance(getattr(decoder, name, None), nn.ModuleList))


def _inner(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    for name in names:
        model = getattr(model, name)
    return model


def _decoder(model: nn.Module) -> nn.Module:
    return _inner(model, _decoder_at(model))


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
    tied = first.get_output_embeddings().weight is first.get_input_embeddings().weight
    config = copy.deepcopy(first.config)
    text = config.get_text_config()  # an image-text model's text_config: where its layer count and kinds are
    configs = {id(first.config): config, id(first.config.get_text_config()): text}
    names = _decoder_at(first)
    chain = [_copied(first, configs)]  # the path model, then each module on the way to its decoder: copies
    for name in names:
        chain.append(_copied(chain[-1]._modules[name], configs))
        chain[-2]._modules[name] = chain[-1]
    model, decoder = chain[0], chain[-1]
    owner = next(k for k, module in enumerate(chain) if "lm_head" in module._modules)  # Llama 4's: its text model
    chain[owner]._modules["lm_head"] = _inner(first if tied else last, names[:owner]).lm_head
    norm = next(n for n in _FINAL_NORMS if n in decoder._modules)
    decoder._modules[norm] = getattr(_decoder(last), norm)
    decoder._modules[_layers_name(decoder)] = nn.ModuleList(_slot(layers[src][i], k, s) for k, (src, i, s) in enumerate(path))
    text.num_hidden_layers = len(path)
    kinds = text.attribute_map.get("layer_types", "layer_types")  # Nemotron-H's: layers_block_type
    if vars(text).get(kinds):  # (Falcon-H1's is a property of the layer count)
        setattr(text, kinds, [getattr(text, kinds)[min(i, len(getattr(text, kinds)) - 1)] for _, i, _ in path])
    return model


def _copied(module: nn.Module, configs: dict[int, object]) -> nn.Module:
    """A shallow copy of `module` with a children dict of its own, and its config the path's (`configs`, by the id of
    the config it replaces)."""
    shared = copy.copy(module)
    shared._modules = dict(module._modules)
    if id(getattr(module, "config", None)) in configs:
        shared.config = configs[id(module.config)]
    return shared


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = _decoder(model)
    return getattr(decoder, _layers_name(decoder))
