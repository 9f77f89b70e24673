"""The Recipe: the one value that flows from the search to the merge, the ledger and the exports.

A Recipe has at most two stages:
  1. `merge` (parameter space): a mergekit-style merge (method, base_model, models or slices, parameters, dtype, seed);
  2. `layers` (data-flow space): a layer path, a list of slots (source, layer, scale) where `source` is a model or
     `merged` (the result of stage 1).
`provenance` never changes the weights and is left out of `Recipe.identity`.

Parameter values follow mergekit: a scalar, a gradient list interpolated across the layers of a slice, or `{filter, value}`
entries matched against tensor names (the first match wins, no filter matches everything).
This module knows nothing of torch; the merge package checks a recipe against the method registry.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from evomerge.chat_templates import NAMED_CHAT_TEMPLATES
from evomerge.errors import EvomergeError, read_yaml

MERGED = "merged"  # the name of the parameter-space result inside a layer path
TEXT_MODULE = "text_decoder"  # mergekit's module name for an image-text model's text model (whose layers are the layers)

Scalar = Union[bool, float, int, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Conditional(_Frozen):
    value: ScalarOrGradient
    filter: str | None = None


ParamValue = Union[Conditional, list[Conditional], ScalarOrGradient]
Params = dict[str, ParamValue]


class ModelEntry(_Frozen):
    model: str
    parameters: Params = Field(default_factory=dict)


class SliceSource(_Frozen):
    model: str
    layer_range: tuple[int, int]
    parameters: Params = Field(default_factory=dict)


class OutputSlice(_Frozen):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Params = Field(default_factory=dict)


class RowSource(_Frozen):
    """mergekit's other sources of a token's embedding row: zeros, or a model's row of a token (or row id) of its own."""

    kind: Literal["zero", "model_token"]
    model: str | None = None
    token: str | None = None
    token_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _complete(self):
        if self.kind == "zero" and (self.model, self.token, self.token_id) != (None, None, None):
            raise ValueError("kind zero takes no model, token or token_id")
        if self.kind == "model_token" and (self.model is None or (self.token is None) == (self.token_id is None)):
            raise ValueError("kind model_token needs a model and one of token or token_id")
        return self


class TokenSetting(_Frozen):
    """mergekit's `tokenizer.tokens.<token>`: the row a model that lacks the token gets (every model, with `force`),
    from `source`: a model (its row of the token) or a RowSource."""

    # a model name, or a mapping (a RowSource): the discriminator picks one, so an error is that one's alone (and
    # format_validation_error leaves "tagged" out of its location)
    source: Annotated[Union[Annotated[str, Tag("tagged-model")], Annotated[RowSource, Tag("tagged-from")]],
                      Discriminator(lambda v: "tagged-from" if isinstance(v, (dict, RowSource)) else "tagged-model")]
    force: bool = False


class MergekitTokenizer(_Frozen):
    """mergekit's `tokenizer:` block (a merge stage holds its fields as tokenizer_source, tokens, pad_to_multiple_of)."""

    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(None, gt=0)


class Module(_Frozen):
    """mergekit's `modules.<name>`: one part of an image-text model (its text model `text_decoder`, its vision tower,
    its projector) merged from models or slices of its own, with parameters between its slices' and the stage's."""

    models: list[ModelEntry] | None = Field(None, min_length=1)
    slices: list[OutputSlice] | None = Field(None, min_length=1)
    parameters: Params = Field(default_factory=dict)

    @model_validator(mode="after")
    def _models_or_slices(self):
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        return self


class MergeStage(_Frozen):
    method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = Field(None, min_length=1)
    slices: list[OutputSlice] | None = Field(None, min_length=1)
    modules: dict[str, Module] | None = Field(None, min_length=1)  # instead of models or slices (image-text models)
    parameters: Params = Field(default_factory=dict)
    dtype: str | None = None  # compute dtype; None keeps the sources' dtype
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # "base", a model, or None (the base, else the first model)
    tokens: dict[str, TokenSetting] | None = None  # with tokenizer_source: rows of chosen tokens (mergekit's)
    pad_to_multiple_of: int | None = Field(None, gt=0)  # with tokenizer_source: rows padded with their mean
    chat_template: str | None = None  # "auto" (the one most of the models have), a name or a template; None: the tokenizer's
    seed: int = 0  # keys the counter-based masks of DARE/DELLA

    @model_validator(mode="after")
    def _models_or_slices(self):
        if [self.models, self.slices, self.modules].count(None) != 2:
            raise ValueError("give exactly one of 'models', 'slices' or 'modules'")
        if self.modules and TEXT_MODULE not in self.modules:
            raise ValueError(f"modules: the text model's module {TEXT_MODULE!r} is missing")
        for name, module in (self.modules or {}).items():
            if name != TEXT_MODULE and module.slices is not None:
                raise ValueError(f"modules.{name}: evomerge merges the modules beside the text model whole, layers in "
                                 f"place: give its models")
        if (self.tokens or self.pad_to_multiple_of) and not self.tokenizer_source:
            raise ValueError("tokens and pad_to_multiple_of need a tokenizer_source (base, union or a model)")
        return self

    @field_validator("chat_template")
    @classmethod
    def _a_template(cls, value: str | None) -> str | None:
        if value not in (None, "auto", *NAMED_CHAT_TEMPLATES) and "{" not in value:
            raise ValueError(f"{value!r} is neither a Jinja template nor 'auto' (the template most of the models have) "
                             f"nor one of the named templates {', '.join(NAMED_CHAT_TEMPLATES)}")
        return value

    @property
    def parts(self) -> dict[str, Module]:
        """The stage's modules, text model first; without `modules:` one, the text model's, of its models or slices."""
        if not self.modules:
            return {TEXT_MODULE: Module.model_construct(models=self.models, slices=self.slices, parameters={})}
        return {TEXT_MODULE: self.modules[TEXT_MODULE], **self.modules}

    @property
    def template_model(self) -> str:
        """The model whose config (and tensor layout) the output starts from: the base, else the first model."""
        return self.base_model or self.referenced_models()[0]

    def referenced_models(self) -> list[str]:
        names = [self.base_model] if self.base_model else []
        for part in self.parts.values():
            names += [entry.model for entry in part.models or []]
            for out in part.slices or []:
                names += [s.model for s in out.sources] + ([out.base_model] if out.base_model else [])
        return list(dict.fromkeys(names))


class LayerSlot(_Frozen):
    source: str  # a model, or MERGED
    layer: int = Field(ge=0)
    scale: float = Field(1.0, gt=0, allow_inf_nan=False)  # multiplies the hidden state entering this layer (DFS)
    # mergekit passthrough's `scale`: multiplies this layer's weights, tensor by tensor (filters allowed). Imported
    # mergekit paths use it; exports fold hidden-state `scale` into it where that is exact (see evomerge.export).
    weight_scale: ParamValue | None = None

    @field_validator("weight_scale")
    @classmethod
    def _numbers(cls, setting: ParamValue | None) -> ParamValue | None:
        for _, value in iter_settings({"weight_scale": setting} if setting is not None else {}):
            if not is_finite_number(value):
                raise ValueError(f"expected a finite number, got {value!r}")
        return setting


class Recipe(_Frozen):
    merge: MergeStage | None = None
    layers: list[LayerSlot] | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _some_stage(self):
        if self.merge is None and not self.layers:
            raise ValueError("a recipe needs a 'merge' stage, a 'layers' path, or both")
        if self.layers and self.merge is None and any(s.source == MERGED for s in self.layers):
            raise ValueError(f"layer source {MERGED!r} needs a 'merge' stage")
        return self

    def weights_dict(self) -> dict:
        """Everything that changes the weights, in canonical form (a stage without `modules:` as before they were read,
        so that a recipe keeps its identity: a resumed run knows the recipes it scored by it)."""
        unset = {"modules"} if self.merge and self.merge.modules is None else set()
        return self.model_dump(mode="json", exclude={"provenance": True, "merge": {"chat_template", *unset}})

    @property
    def identity(self) -> str:
        canonical = json.dumps(self.weights_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def template_model(self) -> str:
        """The model whose config the output starts from: the merge stage's, else the path's first source's."""
        return self.merge.template_model if self.merge else self.layers[0].source

    def referenced_models(self) -> list[str]:
        names = self.merge.referenced_models() if self.merge else []
        names += [s.source for s in self.layers or [] if s.source != MERGED]
        return list(dict.fromkeys(names))

    def source_layers(self) -> list[int] | None:
        """The original index of each output layer (per-layer config lists follow it): a layer path's slots, else the
        merge stage's slices (their first source's layer_range); None without either."""
        if self.layers:
            return [slot.layer for slot in self.layers]
        if self.merge and (slices := self.merge.parts[TEXT_MODULE].slices):
            return [i for out in slices for i in range(*out.sources[0].layer_range)]
        return None

    def with_provenance(self, **fields) -> "Recipe":
        return self.model_copy(update={"provenance": {**self.provenance, **fields}})


# ---------------------------------------------------------------------------------------------------------------------
# Parameter resolution (mergekit semantics)


def evaluate_setting(setting: ParamValue, tensor_name: str | tuple[str, ...], t: float) -> Any:
    """A parameter's value for one tensor: filters by substring of the tensor name (of any of its names, given several),
    gradients interpolated at t in [0, 1]."""
    names = (tensor_name,) if isinstance(tensor_name, str) else tensor_name
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not setting:
        return None
    if all(isinstance(e, Conditional) for e in setting):
        for cond in setting:
            if cond.filter in (None, "*") or any(cond.filter in name for name in names):
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    if any(isinstance(e, bool) or not isinstance(e, (int, float)) for e in setting):
        return setting[int(t * (len(setting) - 1))]  # discrete values are picked, not blended
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def resolve(name: str, scopes: list[Params | None], tensor_name: str | tuple[str, ...], t: float) -> Any:
    """First defined value of `name` over scopes ordered from highest to lowest precedence (None when absent)."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    return None


def is_finite_number(value: Any) -> bool:
    """An int or float, not a bool, neither NaN nor infinite: what a numeric merge parameter may be."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def iter_settings(params: Params):
    """Every scalar (name, value) inside a parameter mapping, through gradients and filters; for range checks."""
    for name, setting in params.items():
        stack = [setting]
        while stack:
            item = stack.pop()
            if isinstance(item, Conditional):
                stack.append(item.value)
            elif isinstance(item, list):
                stack.extend(item)
            else:
                yield name, item


# ---------------------------------------------------------------------------------------------------------------------
# YAML I/O: evomerge documents and mergekit documents (single or mergekit-multi)

_STAGE_OUTPUT_KEYS = ("dtype", "out_dtype", "tokenizer_source", "chat_template")  # one value for the whole recipe
_MERGEKIT_KEYS = {"merge_method", "base_model", "models", "slices", "modules", "parameters", *_STAGE_OUTPUT_KEYS}


def format_validation_error(err: ValidationError, source: str, *, key: str | None = None,
                            fields=()) -> EvomergeError:
    """One line for all of a pydantic error's problems, each `location: message`. `key` prefixes the locations (a
    section of a larger file); a model check's `field: message` is located at that field when it is one of `fields`."""
    parts = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not str(p).startswith(("function-", "union[", "list[", "tagged"))]
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        head, _, rest = msg.partition(": ")
        if not loc and e["type"] == "value_error" and head in fields and rest:
            loc, msg = [head], rest
        loc = ".".join(([key] if key else []) + loc)
        parts.append(f"{loc}: {msg}" if loc else msg)
    return EvomergeError("; ".join(dict.fromkeys(parts)), source=source)


def _merge_stage_from_mergekit(doc: dict, source: str) -> MergeStage:
    unknown = set(doc) - _MERGEKIT_KEYS - {"name", "tokenizer"}
    if unknown:
        key = sorted(unknown)[0]
        raise EvomergeError(f"unknown mergekit key (supported: {', '.join(sorted(_MERGEKIT_KEYS))})", source=source, key=key)
    fields = {k: v for k, v in doc.items() if k in _MERGEKIT_KEYS and k != "merge_method" and v is not None}
    if "tokenizer" in doc:  # mergekit's newer form of tokenizer_source, with rows of chosen tokens and padding
        if "tokenizer_source" in doc:
            raise EvomergeError("give tokenizer or tokenizer_source, not both", source=source, key="tokenizer")
        try:
            block = MergekitTokenizer.model_validate(doc["tokenizer"])
        except ValidationError as err:
            raise format_validation_error(err, source, key="tokenizer") from None
        fields.update(tokenizer_source=block.source, tokens=block.tokens, pad_to_multiple_of=block.pad_to_multiple_of)
    fields["method"] = doc.get("merge_method")
    try:
        return MergeStage.model_validate(fields)
    except ValidationError as err:
        raise format_validation_error(err, source) from None


def _passthrough_path(stage: MergeStage) -> list[LayerSlot] | None:
    """A passthrough `slices:` document with one source per slice is a layer path (its `scale` scales weights); under
    `modules:` too, where the modules beside the text model come whole from the last slice's model (as a path's do)."""
    text = stage.parts[TEXT_MODULE]
    if stage.method != "passthrough" or not text.slices or (set(stage.parameters) | set(text.parameters)) - {"scale"}:
        return None
    last = text.slices[-1].sources[0].model
    if any(module.parameters or module.models != [ModelEntry(model=last)]
           for name, module in stage.parts.items() if name != TEXT_MODULE):
        return None
    slots = []
    for out in text.slices:
        if len(out.sources) != 1 or out.base_model or set(out.parameters) - {"scale"}:
            return None
        src = out.sources[0]
        if set(src.parameters) - {"scale"}:
            return None
        setting = resolve_scope_setting("scale", [src.parameters, out.parameters, text.parameters, stage.parameters])
        first, end = src.layer_range
        for i in range(first, end):
            t = (i - first) / (end - first - 1) if end - first > 1 else 1.0  # mergekit's t within a slice
            slots.append(LayerSlot(source=src.model, layer=i, weight_scale=None if setting is None else at_t(setting, t)))
    return slots


def at_t(setting: ParamValue, t: float) -> ParamValue:
    """The setting with every gradient list evaluated at t (filters kept)."""
    if isinstance(setting, Conditional):
        return Conditional(value=at_t(setting.value, t), filter=setting.filter)
    if isinstance(setting, list) and setting and all(isinstance(c, Conditional) for c in setting):
        return [at_t(c, t) for c in setting]
    if isinstance(setting, list):
        return evaluate_setting(setting, "", t)
    return setting


def resolve_scope_setting(name: str, scopes: list[Params]) -> ParamValue | None:
    """The unevaluated setting of `name` from the first scope that has it."""
    return next((scope[name] for scope in scopes if name in scope), None)


def recipe_from_dict(docs: list[dict], source: str = "<recipe>") -> Recipe:
    """Build a Recipe from parsed YAML documents (evomerge, mergekit, or mergekit-multi)."""
    docs = [d for d in docs if d is not None]
    if not docs:
        raise EvomergeError("empty recipe", source=source)
    for d in docs:
        if not isinstance(d, dict):
            raise EvomergeError(f"expected a mapping, got {type(d).__name__}", source=source)
    if len(docs) == 1 and "merge_method" not in docs[0]:
        try:
            return Recipe.model_validate(docs[0])
        except ValidationError as err:
            raise format_validation_error(err, source) from None
    if any("merge_method" not in d for d in docs):
        raise EvomergeError("a multi-document recipe must be mergekit-multi (every document has 'merge_method')", source=source)
    if len(docs) == 1:
        return Recipe(merge=_merge_stage_from_mergekit(docs[0], source))
    if len(docs) != 2:
        raise EvomergeError("mergekit-multi recipes with more than two documents are not supported", source=source)
    first, second = docs
    name = first.get("name")
    if not name:
        raise EvomergeError("the first document of a mergekit-multi recipe needs a 'name'", source=source, key="name")
    stage, path_stage = _merge_stage_from_mergekit(first, source), _merge_stage_from_mergekit(second, source)
    for key in (*_STAGE_OUTPUT_KEYS, "tokens", "pad_to_multiple_of"):
        value = getattr(path_stage, key)
        if value is not None and value != getattr(stage, key):
            raise EvomergeError(f"{value!r} in the second document differs from the first's ({getattr(stage, key)!r}); "
                                f"evomerge reads it from the first document: set it there", source=source, key=key)
    path = _passthrough_path(path_stage)
    if path is None:
        raise EvomergeError("the second mergekit-multi document must be passthrough slices, one source each (under "
                            "modules:, the modules beside the text model from the last slice's model)", source=source)
    path = [slot.model_copy(update={"source": MERGED}) if slot.source == name else slot for slot in path]
    return Recipe(merge=stage, layers=path)


def load_recipe(path: str | os.PathLike) -> Recipe:
    return recipe_from_dict(read_yaml(path, "recipe", documents=True), source=str(path))


def _params_to_yaml(params: Params) -> dict:
    return {k: (v.model_dump(exclude_none=True) if isinstance(v, Conditional) else
                [c.model_dump(exclude_none=True) if isinstance(c, Conditional) else c for c in v] if isinstance(v, list) else v)
            for k, v in params.items()}


def _inputs_to_mergekit(part: MergeStage | Module) -> dict:
    """The `models:` or `slices:` and the `parameters:` of a stage or a module."""
    doc: dict[str, Any] = {}
    if part.models is not None:
        doc["models"] = [{"model": m.model, **({"parameters": _params_to_yaml(m.parameters)} if m.parameters else {})}
                         for m in part.models]
    if part.slices is not None:
        doc["slices"] = [out.model_dump(mode="json", exclude_defaults=True) for out in part.slices]
    if part.parameters:
        doc["parameters"] = _params_to_yaml(part.parameters)
    return doc


def _stage_to_mergekit(stage: MergeStage) -> dict:
    doc: dict[str, Any] = {"merge_method": stage.method}
    if stage.base_model:
        doc["base_model"] = stage.base_model
    if stage.modules:
        doc["modules"] = {name: _inputs_to_mergekit(module) for name, module in stage.modules.items()}
    doc.update(_inputs_to_mergekit(stage))
    for key in _STAGE_OUTPUT_KEYS:
        if getattr(stage, key):
            doc[key] = getattr(stage, key)
    if stage.tokens or stage.pad_to_multiple_of:  # mergekit's tokenizer block says it all
        block = MergekitTokenizer(source=doc.pop("tokenizer_source"), tokens=stage.tokens,
                                  pad_to_multiple_of=stage.pad_to_multiple_of)
        doc["tokenizer"] = block.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
    return doc


def _path_to_slices(layers: list[LayerSlot], rename: dict[str, str]) -> list[dict]:
    """Consecutive slots of one source with the same weight scale become one passthrough slice."""
    slices: list[dict] = []
    for slot in layers:
        if slot.scale != 1.0:
            raise ValueError("fold hidden-state scales into weight_scale first (evomerge.export.fold_hidden_scales)")
        model = rename.get(slot.source, slot.source)
        params = {} if slot.weight_scale is None else {"scale": _params_to_yaml({"scale": slot.weight_scale})["scale"]}
        last = slices[-1]["sources"][0] if slices else None
        if last and last["model"] == model and last["layer_range"][1] == slot.layer and last.get("parameters", {}) == params:
            last["layer_range"][1] += 1
        else:
            source = {"model": model, "layer_range": [slot.layer, slot.layer + 1]}
            slices.append({"sources": [{**source, "parameters": params} if params else source]})
    return slices


def to_mergekit_docs(recipe: Recipe, stage_name: str = "evomerge-ps", modules: tuple[str, ...] = ()) -> list[dict]:
    """mergekit documents for a recipe: one for a single stage, two (mergekit-multi) for PS+DFS.

    mergekit has no hidden-state scale: a path must have its `scale`s folded into `weight_scale` first. `modules`: an
    image-text model's modules beside its text model, whose slices mergekit reads only under `modules:`; a path takes
    them whole from its last slot's source (as `evomerge merge` does).
    """
    docs = []
    if recipe.merge:
        docs.append(_stage_to_mergekit(recipe.merge))
    if recipe.layers:
        rename = {MERGED: stage_name}
        slices = _path_to_slices(recipe.layers, rename)
        last = rename.get(recipe.layers[-1].source, recipe.layers[-1].source)
        path_doc: dict[str, Any] = {"merge_method": "passthrough", **({"modules": {
            TEXT_MODULE: {"slices": slices}, **{name: {"models": [{"model": last}]} for name in modules}}}
            if modules else {"slices": slices})}
        if recipe.merge:
            docs[0] = {"name": stage_name, **docs[0]}
            for key in (*_STAGE_OUTPUT_KEYS, "tokenizer"):
                if docs[0].get(key):
                    path_doc[key] = docs[0][key]
        docs.append(path_doc)
    return docs


class _FlowListDumper(yaml.SafeDumper):
    def represent_list(self, data):
        flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _FlowListDumper.represent_list)
_FlowListDumper.add_representer(tuple, _FlowListDumper.represent_list)


def dump_yaml(docs: list[dict] | dict) -> str:
    docs = docs if isinstance(docs, list) else [docs]
    return "---\n".join(yaml.dump(d, Dumper=_FlowListDumper, sort_keys=False) for d in docs)


def to_evomerge_yaml(recipe: Recipe) -> str:
    return dump_yaml(recipe.model_dump(mode="json", exclude_defaults=True))


def to_mergekit_yaml(recipe: Recipe, modules: tuple[str, ...] = ()) -> str:
    return dump_yaml(to_mergekit_docs(recipe, modules=modules))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file. An OS error (a
    missing or read-only directory, a full disk) is a one-line EvomergeError naming `path`; no temp file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        where = "no such directory" if isinstance(err, FileNotFoundError) else err.strerror
        raise EvomergeError(f"cannot write ({where}: {path.parent})", source=str(path)) from None


def save_recipe(recipe: Recipe, path: str | os.PathLike, fmt: Literal["evomerge", "mergekit"] = "evomerge") -> None:
    write_text_atomic(path, to_evomerge_yaml(recipe) if fmt == "evomerge" else to_mergekit_yaml(recipe))
