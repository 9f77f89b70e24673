"""Merge-method registry: the signature of each method function *is* its parameter schema.

A method is a pure function over tensors:

    @merge_method("ties", base="required", ranges={"density": (0, 1)})
    def ties(base, tensors, *, weight: PerModel, density: PerModel = 1.0, normalize: bool = True, ...):

- `base` is the base model's tensor (None when the method takes no base), `tensors` the other models' tensors, in recipe order.
- Keyword parameters annotated `PerModel` take one value per entry of `tensors` (a list); the rest are scalars shared by all.
- A parameter with no default is required. A trailing `_` is dropped from the public name (`lambda_` is `lambda`).
- A keyword `key` marks a randomized method (DARE, DELLA): the materializer passes a list of `MaskKey` aligned with
  `tensors`, `MaskKey(seed, tensor name, model position)` for each model (see `evomerge.merge.rng`).
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

from evomerge.errors import EvomergeError, did_you_mean

PerModel = Annotated[Any, "per_model"]
BasePolicy = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class ParamSpec:
    name: str  # public name, as in YAML
    arg: str  # python argument name
    kind: type  # float, int or bool
    default: Any  # None when required
    per_model: bool
    low: float | None = None
    high: float | None = None

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    params: tuple[ParamSpec, ...]
    base: BasePolicy  # "none": every model is an ordinary input and gets per-model parameters
    min_models: int  # counted without the base
    max_models: int | None
    randomized: bool
    reference: str = ""

    def param(self, name: str) -> ParamSpec:
        return next(p for p in self.params if p.name == name)

    @functools.cached_property  # planning asks for every tensor
    def per_model_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.per_model)

    @functools.cached_property
    def global_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if not p.per_model)


METHODS: dict[str, MethodSpec] = {}


def merge_method(
    name: str,
    *,
    base: BasePolicy,
    min_models: int = 1,
    max_models: int | None = None,
    ranges: dict[str, tuple[float | None, float | None]] | None = None,
    reference: str = "",
):
    """Register `fn` under `name`; its keyword-only parameters become the ParamSpecs."""
    ranges = ranges or {}

    def register(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn, include_extras=True)
        params, randomized = [], False
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if p.name == "key":
                randomized = True
                continue
            hint = hints.get(p.name)
            per_model = typing.get_origin(hint) is Annotated and "per_model" in hint.__metadata__
            default = None if p.default is inspect.Parameter.empty else p.default
            kind = bool if isinstance(default, bool) or hint is bool else int if hint is int else float
            public = p.name.rstrip("_")
            low, high = ranges.get(public, (None, None))
            params.append(ParamSpec(public, p.name, kind, default, per_model, low, high))
        unknown = set(ranges) - {p.name for p in params}
        assert not unknown, f"ranges for unknown parameters {unknown} of {name}"
        assert name not in METHODS, f"merge method {name!r} registered twice"
        METHODS[name] = MethodSpec(name, fn, tuple(params), base, min_models, max_models, randomized, reference)
        return fn

    return register


def get_method(name: str, *, source: str | None = None, key: str = "merge_method") -> MethodSpec:
    import evomerge.merge.methods  # noqa: F401  (registers the built-in methods)
    if name not in METHODS:
        raise EvomergeError(f"unknown merge method {name!r}; {did_you_mean(name, METHODS)}", source=source, key=key)
    return METHODS[name]

