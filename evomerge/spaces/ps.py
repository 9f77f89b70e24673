"""Parameter-space (PS) search: a merge method's parameters per model and per layer group -> a Recipe `merge` stage.

Which parameters exist, which are per model, and their valid ranges come from the method registry (the one source of
truth); the space file only picks some of them, narrows their bounds and fixes others.

Genes, in order: for each searched parameter, for each model (once for a global parameter), for each layer group, for each
part (`split`: one per filter, then `rest`; otherwise one part) -- i.e. one [models, groups, parts] block per parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, Field, field_validator, model_validator

from evomerge.errors import EvomergeError, did_you_mean
from evomerge.recipe import Conditional, MergeStage, ModelEntry, Params, Recipe
from evomerge.spaces.base import Gene, Schema, SearchSpace, rounded

# `split`: mergekit {filter, value} entries, one per filter (a substring of tensor names; the first that matches wins),
# then one without a filter for every other tensor (`rest`: e.g. the norms inside the layers, and the embeddings / final
# norm / lm_head). attn_mlp is the common case; a list such as [q_proj, k_proj, v_proj, o_proj, mlp] goes finer.
ATTN_MLP = ("self_attn", "mlp")


def _ordered(bounds: tuple[float, float]) -> tuple[float, float]:
    low, high = bounds
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"low {low} must be below high {high}, both finite")
    return bounds


Bounds = Annotated[tuple[float, float], AfterValidator(_ordered)]  # errors then name bounds.<parameter>


class PSConfig(Schema):
    kind: Literal["ps"] = "ps"
    method: str
    base_model: str | None = None
    models: list[str] = Field(min_length=1)  # the models merged (into the base, when the method has one)
    search: list[str] | None = None  # default: the method's per-model numeric parameters (else its global numeric ones)
    bounds: dict[str, Bounds] = Field(default_factory=dict)  # default: the method's range for the parameter
    fixed: Params = Field(default_factory=dict)  # parameters set, not searched (per-model ones apply to every model)
    layer_groups: int | Literal["all"] = 1  # 1: one value per model (Sakana's 7B); "all" or num_layers: one per layer
    split: Literal["attn_mlp"] | list[str] | None = None  # genes for attention, MLP and the rest; or per filter
    smooth: bool = False  # layer groups as the points of a gradient (mergekit interpolates between them), not as steps
    dtype: str | None = None
    seed: int = 0  # keys the random masks of DARE/DELLA
    start: str | None = None  # a recipe file (same method and models) the search starts from (`started_at`)

    @field_validator("layer_groups")
    @classmethod
    def _positive(cls, groups):
        if groups != "all" and groups < 1:
            raise ValueError("must be at least 1, or 'all'")
        return groups

    @field_validator("split")
    @classmethod
    def _filters(cls, split):
        distinct = isinstance(split, list) and split and all(split) and len(set(split)) == len(split)
        if isinstance(split, list) and not (distinct and "rest" not in split):
            raise ValueError("a list of distinct, non-empty tensor-name filters ('rest' is the tensors none matches)")
        return split

    @property
    def filters(self) -> tuple[str, ...]:
        """The split's filters, in the order mergekit tries them."""
        return ATTN_MLP if self.split == "attn_mlp" else tuple(self.split or ())

    @model_validator(mode="after")
    def _distinct_models(self):
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: a model is listed twice")
        if self.base_model in self.models:
            raise ValueError("models: list only the models merged into base_model, not the base itself")
        if self.search is not None and len(set(self.search)) != len(self.search):
            raise ValueError("search: a parameter is listed twice")
        return self

    def referenced_models(self) -> list[str]:
        return ([self.base_model] if self.base_model else []) + list(self.models)


class ParameterSpace(SearchSpace):
    def __init__(self, config: PSConfig, *, num_layers: Mapping[str, int], source: str = "<space>"):
        from evomerge.merge.plan import validate_stage  # the registry loads the methods (torch); configs parse without it
        from evomerge.merge.registry import get_method

        self.config, self.source = config, source
        self.spec = get_method(config.method, source=source, key="method")
        if self.spec.base == "none" and config.base_model:
            raise EvomergeError(f"method {config.method} takes no base_model; list every model under models",
                                source=source, key="base_model")
        self.num_layers = _layer_count(config, num_layers, source)
        self.groups = self.num_layers if config.layer_groups == "all" else config.layer_groups
        if self.groups > self.num_layers:
            raise EvomergeError(f"{self.groups} groups for {self.num_layers} layers; at most one group per layer",
                                source=source, key="layer_groups")
        self.group_of_layer = [i * self.groups // self.num_layers for i in range(self.num_layers)]  # contiguous groups
        self.parts = tuple((f, f) for f in config.filters) + (("rest", None),) if config.split else (("", None),)
        self.searched = _searched_params(self.spec, config, source)
        self.genes = tuple(self._genes())
        validate_stage(self.decode(self.x0).merge, source)  # base policy, model count, fixed values: same for every genome
        self._check_keep_probabilities()

    def _range(self, name: str) -> tuple[float, float] | None:
        """A parameter's values over the space: its bounds if searched, its fixed or default value if a number."""
        if any(p.name == name for p in self.searched):
            return _bounds(self.spec.param(name), self.config, self.source)
        value = self.config.fixed.get(name, self.spec.param(name).default)
        return (float(value), float(value)) if isinstance(value, (int, float)) else None

    def _check_keep_probabilities(self):
        """DELLA keeps an entry with probability density +- epsilon, which must stay inside (0, 1) for a density
        between 0 and 1 (merge.sparsify.della_magprune): bounds that let a candidate leave it would fail its trials."""
        from evomerge.merge.methods import TASK_ARITHMETIC_FAMILY

        member = TASK_ARITHMETIC_FAMILY.get(self.config.method)
        if member is None or member.sparsifier != "della_magprune":
            return
        density, epsilon = self._range("density"), self._range("epsilon")
        if density is None or epsilon is None or density[1] <= 0 or density[0] >= 1 or epsilon[1] <= 0:
            return  # nothing kept, everything kept, or no spread: no probability leaves (0, 1)
        if epsilon[1] >= min(density[0], 1 - density[1]):
            raise EvomergeError(f"{self.config.method} keeps entries with probability density +- epsilon inside (0, 1): "
                                f"with density in [{density[0]}, {density[1]}] epsilon must stay below "
                                f"{max(0.0, min(density[0], 1 - density[1])):g}, it reaches {epsilon[1]:g} (e.g. bounds: "
                                "{density: [0.3, 0.8], epsilon: [0.0, 0.15]})", source=self.source, key="bounds")

    def _genes(self):
        for p in self.searched:
            low, high = _bounds(p, self.config, self.source)
            start = float(np.clip(p.default, low, high)) if p.default is not None else (low + high) / 2  # the default merge
            for model in self.config.models if p.per_model else [None]:
                for g in range(self.groups):
                    for suffix, _ in self.parts:
                        name = p.name + (f"[{model}]" if model else "") + (f".g{g}" if self.groups > 1 else "")
                        yield Gene(name + (f".{suffix}" if suffix else ""), low, high, start)

    @property
    def anchors(self) -> list[np.ndarray]:
        """x0 (the default merge), then each model alone -- weight 1 for it and 0 for the others, density 1 (every delta
        kept) -- when weight is searched per model with 0 and 1 inside its bounds, and density (if searched) reaches 1.
        The other genes stay at x0. For TIES, DARE, task arithmetic and linear this is the expert itself."""
        per_model = {p.name: _bounds(p, self.config, self.source) for p in self.searched if p.per_model}
        weight, density = per_model.get("weight"), per_model.get("density", (0.0, 1.0))
        if weight is None or not (weight[0] <= 0.0 <= 1.0 <= weight[1]) or density[1] < 1.0:
            return [self.x0]
        return [self.x0] + [self.unit(self._alone(k)) for k in range(len(self.config.models))]

    def _alone(self, k: int) -> np.ndarray:
        raw, offset = self.raw(self.x0), 0
        for p in self.searched:
            n = len(self.config.models) if p.per_model else 1
            block = raw[offset:offset + n * self.groups * len(self.parts)].reshape(n, -1)  # a view: writes reach raw
            offset += block.size
            if p.per_model and p.name == "weight":
                block[:] = 0.0
                block[k] = 1.0
            elif p.per_model and p.name == "density":
                block[:] = 1.0
        return raw

    def started_at(self, stage: MergeStage, layer_tensors: Mapping[int, list[tuple[str, ...]]]) -> list[str]:
        """Move x0 to the genome nearest `stage` (this space's method and models): each gene the mean of the stage's
        values over the tensors of the layers and part it sets (`layer_tensors`: the base's tensors per layer, each by
        the names filters match, Architecture.filter_names), clipped to its bounds; a gene the stage leaves unset keeps
        its start. Returns the clipped genes' names."""
        from evomerge.recipe import resolve

        entries, last = {m.model: m.parameters for m in stage.models or []}, max(self.num_layers - 1, 1)
        totals, counts = [], []  # per searched parameter: [models, groups, parts], the genes' order (module doc)
        for p in self.searched:
            models = self.config.models if p.per_model else [None]
            total, count = np.zeros((2, len(models), self.groups, len(self.parts)))
            for layer, names in layer_tensors.items():
                for tensor in names:  # the tensor's names
                    part = next(k for k, (_, f) in enumerate(self.parts)  # the first that matches
                                if f is None or any(f in n for n in tensor))
                    for m, model in enumerate(models):
                        value = resolve(p.name, [entries.get(model), stage.parameters], tensor, layer / last)
                        if isinstance(value, (int, float)):
                            total[m, self.group_of_layer[layer], part] += value
                            count[m, self.group_of_layer[layer], part] += 1
            totals.append(total.ravel())
            counts.append(count.ravel())
        clipped, genes = [], []
        for gene, total, count in zip(self.genes, np.concatenate(totals), np.concatenate(counts)):
            start = total / count if count else gene.start
            if not gene.low <= start <= gene.high:
                clipped.append(gene.name)
            genes.append(Gene(gene.name, gene.low, gene.high, float(np.clip(start, gene.low, gene.high))))
        self.genes = tuple(genes)
        return clipped

    def _decode(self, raw: np.ndarray) -> Recipe:
        cfg = self.config
        per_model: dict[str, Params] = {m: {} for m in cfg.models}
        shared: Params = dict(cfg.fixed)  # fixed per-model values sit here too: mergekit falls back to these for each model
        offset = 0
        for p in self.searched:
            n = len(cfg.models) if p.per_model else 1
            size = n * self.groups * len(self.parts)
            block = raw[offset:offset + size].reshape(n, self.groups, len(self.parts))
            offset += size
            if p.per_model:
                for model, values in zip(cfg.models, block):
                    per_model[model][p.name] = self._setting(values)
            else:
                shared[p.name] = self._setting(block[0])
        stage = MergeStage(method=cfg.method, base_model=cfg.base_model, parameters=shared, dtype=cfg.dtype, seed=cfg.seed,
                           models=[ModelEntry(model=m, parameters=per_model[m]) for m in cfg.models])
        return Recipe(merge=stage)

    def _setting(self, values: np.ndarray):
        """[groups, parts] values -> a mergekit setting: scalar or per-layer list, inside {filter, value} entries if split."""
        per_part = [self._per_layer(values[:, k]) for k in range(len(self.parts))]
        if not self.config.split:
            return per_part[0]
        return [Conditional(filter=f, value=v) for (_, f), v in zip(self.parts, per_part)]

    def _per_layer(self, group_values: np.ndarray):
        if self.groups == 1:
            return rounded(group_values[0])
        if self.config.smooth:  # mergekit spreads a list of k values evenly over the layers, interpolating between them
            return [rounded(v) for v in group_values]
        # A gradient list of num_layers entries: mergekit reads entry i exactly at layer i (t = i / (L - 1)); tensors outside
        # the layers (embeddings, final norm, lm_head) are read at t = 0, so they take layer group 0's value.
        return [rounded(group_values[g]) for g in self.group_of_layer]

    def describe(self) -> str:
        cfg = self.config
        split = f", split {', '.join(cfg.filters)}, rest" if cfg.split else ""
        lines = [f"PS space: {cfg.method}, base {cfg.base_model}, models {', '.join(cfg.models)}; {self.num_layers} layers in "
                 f"{self.groups} {'smooth ' if cfg.smooth else ''}group(s){split}; dim {self.dim}"]
        for p in self.searched:
            low, high = _bounds(p, cfg, self.source)
            lines.append(f"  {p.name}: {'per model' if p.per_model else 'global'}, bounds [{low}, {high}]")
        if cfg.fixed:
            lines.append("  fixed: " + ", ".join(f"{k}={v}" for k, v in cfg.fixed.items()))
        return "\n".join(lines)


def _layer_count(config: PSConfig, num_layers: Mapping[str, int], source: str) -> int:
    counts = {}
    for model in config.referenced_models():
        if model not in num_layers:
            raise EvomergeError(f"no layer count for model {model!r} (a placeholder not overridden?)", source=source,
                                key="base_model" if model == config.base_model else "models")
        counts[model] = num_layers[model]
    if len(set(counts.values())) != 1:
        raise EvomergeError(f"a PS merge needs models with one layer count, got {counts}", source=source, key="models")
    return next(iter(counts.values()))


def _searched_params(spec, config: PSConfig, source: str):
    names = {p.name for p in spec.params}
    for key, given in (("fixed", config.fixed), ("bounds", config.bounds), ("search", config.search or [])):
        for name in given:
            if name not in names:
                raise EvomergeError(f"method {spec.name} has no parameter {name!r}; {did_you_mean(name, names)}",
                                    source=source, key=f"{key}.{name}" if key != "search" else key)
    numeric = [p for p in spec.params if p.kind is float and p.name not in config.fixed]
    if config.search is None:
        searched = [p for p in numeric if p.per_model] or [p for p in numeric if not p.per_model]
    else:
        searched = [spec.param(name) for name in config.search]
    for p in searched:
        if p.kind is not float:
            raise EvomergeError(f"{p.name!r} is {'true/false' if p.kind is bool else 'a whole number'} and cannot be "
                                f"searched; set it under 'fixed'", source=source, key="search")
        if p.name in config.fixed:
            raise EvomergeError(f"{p.name!r} is both searched and fixed", source=source, key=f"fixed.{p.name}")
    for name in config.bounds:
        if name not in [p.name for p in searched]:
            raise EvomergeError(f"bounds for {name!r}, which is not searched", source=source, key=f"bounds.{name}")
    for p in spec.params:
        if p.required and p not in searched and p.name not in config.fixed:
            raise EvomergeError(f"method {spec.name} needs {p.name!r}: search it or set it under 'fixed'", source=source,
                                key="search")
    if not searched:
        raise EvomergeError(f"method {spec.name} has no numeric parameter to search", source=source, key="method")
    return tuple(searched)


def _bounds(p, config: PSConfig, source: str) -> tuple[float, float]:
    if p.name in config.bounds:
        low, high = config.bounds[p.name]
        if (p.low is not None and low < p.low) or (p.high is not None and high > p.high):
            raise EvomergeError(f"[{low}, {high}] leaves the method's range [{p.low}, {p.high}]", source=source,
                                key=f"bounds.{p.name}")
        return float(low), float(high)
    if p.low is None or p.high is None:
        raise EvomergeError(f"method {config.method} gives no range for {p.name!r}; set bounds: {{{p.name}: [low, high]}}",
                            source=source, key=f"bounds.{p.name}")
    return float(p.low), float(p.high)
