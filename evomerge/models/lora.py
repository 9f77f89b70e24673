"""A model with a LoRA adapter applied, as mergekit's `model+adapter` reference names it: W' = W + s * B @ A.

The adapter is a PEFT LoRA adapter dir (adapter_config.json, adapter_model.safetensors). Each adapted weight is
computed when it is read, in float32 (float64 for a float64 model), and returned in the base weight's dtype; every other tensor is the base's. The
scale s is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), r the rank of that weight's A; an embedding's delta is
(B @ A) transposed (PEFT stores it so), a Conv1D's too (fan_in_fan_out). Tensors the adapter saves whole
(modules_to_save, an embedding's base_layer) replace the base's. What this does not do is refused in one line: DoRA, other
PEFT methods, trained biases, alpha_pattern, an adapter whose saved tensors change a shape (a resized vocabulary).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.models.io import ModelDir, model_failure, read_header, resolve_model

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Delta:
    a: str  # adapter tensor names
    b: str
    scale: float
    transposed: bool  # the delta is (B @ A).T


def split_reference(ref: str) -> tuple[str, str] | None:
    """`model+adapter` -> (model, adapter) when `ref` is not a directory itself."""
    if "+" not in ref or Path(ref).expanduser().is_dir():
        return None
    model, adapter = ref.rsplit("+", 1)
    return model, adapter


def model_part(ref: str) -> str:
    """The model of a `model+adapter` reference (its tokenizer and config are the model's), else `ref` itself."""
    return (split_reference(ref) or (ref,))[0]


class AdaptedModelDir(ModelDir):
    """The base model dir, with `get` giving adapted weights (module doc)."""

    @classmethod
    def open_adapted(cls, model: str, adapter: str, *, source: str | None, headers_only: bool) -> "AdaptedModelDir":
        base = ModelDir.open(model, source=source, headers_only=headers_only)
        path = resolve_model(adapter, source)
        fail = model_failure(path, source)
        if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
            raise fail(f"not a LoRA adapter dir (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        try:
            config = json.loads((path / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError) as err:
            raise fail(f"unreadable {ADAPTER_CONFIG} ({err})") from None
        header = read_header(path / ADAPTER_WEIGHTS, fail, whole=not headers_only)
        adapted = cls(base.path, base.config, base.arch, base._files, base._header)
        adapted.adapter_file = path / ADAPTER_WEIGHTS
        adapted.deltas, adapted.replaced = _plan(config, header, base, fail)
        return adapted

    def get(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.deltas and name not in self.replaced:
            return super().get(name, device, dtype)
        stored = self.dtype(name)
        work = torch.promote_types(stored, torch.float32)  # float32, or float64 for a float64 model
        weight = self._adapter(self.replaced[name]) if name in self.replaced else super().get(name)
        if name in self.deltas:
            d = self.deltas[name]
            delta = self._adapter(d.b).to(work) @ self._adapter(d.a).to(work)
            weight = weight.to(work) + d.scale * (delta.T if d.transposed else delta)
        return weight.to(stored).to(device=device, dtype=dtype)

    @property
    def adapted_names(self) -> list[str]:
        return [n for n in self.tensor_names if n in self.deltas or n in self.replaced]

    def _adapter(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if self.adapter_file not in self._handles:
            self._handles[self.adapter_file] = safe_open(self.adapter_file, framework="pt", device="cpu")
        return self._handles[self.adapter_file].get_tensor(key)


def _plan(config: dict, header: dict[str, dict], base: ModelDir, fail) -> tuple[dict[str, Delta], dict[str, str]]:
    """{base tensor: its Delta}, {base tensor: the adapter tensor that replaces it}."""
    if config.get("peft_type", "LORA") != "LORA":
        raise fail(f"a {config.get('peft_type')} adapter; only LoRA adapters are applied")
    for key, what in (("use_dora", "DoRA"), ("alpha_pattern", "alpha_pattern"), ("lora_bias", "trained LoRA biases")):
        if config.get(key):
            raise fail(f"{what} is not supported ({ADAPTER_CONFIG}: {key})")
    if config.get("bias", "none") != "none":
        raise fail(f"trained biases are not supported ({ADAPTER_CONFIG}: bias {config.get('bias')!r})")
    alpha, rslora, fan_in_fan_out = config.get("lora_alpha", 8), config.get("use_rslora", False), config.get("fan_in_fan_out")
    deltas, replaced = {}, {}
    names = {live: n for n in base.tensor_names for live in base.arch.live_names(n)}
    names.update({n: n for n in base.tensor_names})

    def target(module: str, key: str) -> str:
        name = names.get(f"{module}.weight")
        if name is None:
            raise fail(f"adapter tensor {key} names no weight of the base model")
        return name

    for key in header:
        rest = key.removeprefix(PEFT_PREFIX)
        if "lora_magnitude_vector" in rest:
            raise fail(f"DoRA is not supported ({key})")
        for a_suffix, b_suffix, transposed in ((".lora_A.weight", ".lora_B.weight", bool(fan_in_fan_out)),
                                               (".lora_embedding_A", ".lora_embedding_B", True)):
            if rest.endswith(a_suffix):
                b_key = key[: -len(a_suffix)] + b_suffix
                if b_key not in header:
                    raise fail(f"adapter tensor {key} has no {b_suffix.lstrip('.')} beside it")
                r = header[key]["shape"][0]
                deltas[target(rest[: -len(a_suffix)], key)] = Delta(key, b_key, alpha / (math.sqrt(r) if rslora else r),
                                                                    transposed)
        if rest.endswith((".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")):
            continue
        if ".lora_" in rest:
            raise fail(f"adapter tensor {key} is not a LoRA weight this applies")
        name = target(rest.replace(".base_layer.", ".").removesuffix(".weight"), key) if rest.endswith(".weight") \
            else None
        if name is None or list(header[key]["shape"]) != list(base.shape(name)):
            raise fail(f"adapter tensor {key} replaces no base weight of its shape (a resized vocabulary is not "
                       "supported)")
        replaced[name] = key
    return deltas, replaced
