"""Recipe -> a list of TensorTasks: for every output tensor, which input tensors and which resolved parameters.

Planning follows mergekit's order: tensors before the layers (embeddings) from the first slice, the layers slice by slice
(t = i / (n - 1) inside a slice, for gradient lists), then the tensors after the layers from the last slice, both with t = 0.
A `models:` stage is one slice over all layers. Everything the user can get wrong is checked here, before any tensor is
read, and reported as one EvomergeError naming the recipe file and the key: the stage's method and parameters once, by
`validate_stage`, the rest (models, layers, shapes) while planning.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.registry import MethodSpec, get_method
from evomerge.models.io import ModelDir, tokenizer_model
from evomerge.recipe import (MERGED, TEXT_MODULE, LayerSlot, MergeStage, Module, OutputSlice, Params, Recipe, SliceSource,
                             evaluate_setting, is_finite_number, iter_settings, resolve)

Ref = tuple[str, str]  # (model, tensor name in that model)


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: `method(base, inputs, **params)`; for a layer-path slot, a copy of `inputs[0]` times `scale`."""

    out_name: str
    method: str
    base: Ref | None
    inputs: tuple[Ref, ...]
    params: tuple[tuple[str, Any], ...]  # per-model params are tuples aligned with inputs
    vocab: bool = False  # rows index the vocabulary: cut to the common block when sizes differ
    scale: float = 1.0  # folded hidden-state scale (layer paths) or passthrough weight scale
    seed: int = 0  # keys the random masks of DARE/DELLA with (seed, out_name, model)

    @property
    def kwargs(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.params}


@dataclass
class Plan:
    tasks: list[TensorTask]
    num_layers: int
    config_from: str  # model whose config.json the output starts from
    tokenizer_from: str | None
    warnings: list[str] = field(default_factory=list)
    source_layers: list[int] | None = None  # for a layer path: the source layer of each output layer


def _check_params(spec: MethodSpec, params: Params, source: str, where: str, *, per_model_ok: bool, global_ok: bool):
    allowed = {p.name for p in spec.params if (p.per_model and per_model_ok) or (not p.per_model and global_ok)}
    for name in params:
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise EvomergeError(f"unknown parameter {name!r} for method {spec.name} (allowed here: {known})",
                                source=source, key=f"{where}.{name}")
    for name, value in iter_settings(params):
        p = spec.param(name)
        if p.kind is bool:
            if not isinstance(value, bool):
                raise EvomergeError(f"expected true/false, got {value!r}", source=source, key=f"{where}.{name}")
            continue
        if not is_finite_number(value) or (p.kind is int and value != int(value)):
            raise EvomergeError(f"expected a {'whole' if p.kind is int else 'finite'} number, got {value!r}",
                                source=source, key=f"{where}.{name}")
        if (p.low is not None and value < p.low) or (p.high is not None and value > p.high):
            raise EvomergeError(f"{value} is outside [{p.low}, {p.high}]", source=source, key=f"{where}.{name}")


def validate_stage(stage: MergeStage, source: str) -> MethodSpec:
    """Method, parameter names, ranges and model counts; raises EvomergeError naming the key."""
    spec = get_method(stage.method, source=source, key="merge.method")
    _check_params(spec, stage.parameters, source, "parameters", per_model_ok=True, global_ok=True)
    for name, part in stage.parts.items():
        at = f"modules.{name}." if stage.modules else ""
        _check_params(spec, part.parameters, source, f"{at}parameters", per_model_ok=True, global_ok=True)
        for i, entry in enumerate(part.models or []):
            _check_params(spec, entry.parameters, source, f"{at}models[{i}].parameters", per_model_ok=True, global_ok=False)
        for i, out in enumerate(part.slices or []):
            _check_params(spec, out.parameters, source, f"{at}slices[{i}].parameters", per_model_ok=True, global_ok=True)
            for j, src in enumerate(out.sources):
                _check_params(spec, src.parameters, source, f"{at}slices[{i}].sources[{j}].parameters", per_model_ok=True,
                              global_ok=False)
        for i, out in enumerate(_slices(part, stage.base_model)):
            base = out.base_model or stage.base_model
            if spec.base == "required" and not base:
                raise EvomergeError(f"method {spec.name} needs a base_model", source=source, key="base_model")
            n = len([s for s in out.sources if spec.base == "none" or s.model != base])
            if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
                want = f"exactly {spec.min_models}" if spec.min_models == spec.max_models else \
                    f"at least {spec.min_models}" if spec.max_models is None else f"{spec.min_models} to {spec.max_models}"
                base_note = " besides the base" if spec.base != "none" else ""
                raise EvomergeError(f"method {spec.name} takes {want} model{'s' * (spec.max_models != 1)}{base_note}, "
                                    f"got {n}", source=source,
                                    key=f"{at}models" if part.models is not None else f"{at}slices[{i}].sources")
    return spec


def _slices(part: Module, base_model: str | None, num_layers: int | None = None) -> list[OutputSlice]:
    """mergekit's normalisation: `models:` is one slice over every layer, with the base added when not listed."""
    if part.slices is not None:
        return part.slices
    sources = [SliceSource(model=m.model, layer_range=(0, num_layers or 0), parameters=m.parameters) for m in part.models]
    if base_model and base_model not in [m.model for m in part.models]:
        sources.append(SliceSource(model=base_model, layer_range=(0, num_layers or 0)))
    return [OutputSlice(sources=sources)]


def _output_slices(stage: MergeStage, num_layers: int) -> list[tuple[str, OutputSlice, Params]]:
    """(module, output slice, module parameters) in planning order: the text model's slices, then one for each other
    module (mergekit's `modules:`); without modules, the stage's slices."""
    return [(name, out, part.parameters) for name, part in stage.parts.items()
            for out in _slices(part, stage.base_model, num_layers)]


def _resolve_task(spec: MethodSpec, stage: MergeStage, out: OutputSlice, module: Params, slot: "_Slot",
                  source: str) -> TensorTask:
    base_model, out_name, t = out.base_model or stage.base_model, slot.out_name, slot.t
    base_ref, others = None, []
    for (j, name), names in zip(slot.inputs, slot.filter_names[1:]):
        src = out.sources[j]
        if spec.base != "none" and src.model == base_model:
            base_ref = (src.model, name)
        else:
            others.append((src, name, names))
    if spec.base == "required" and base_ref is None:
        raise EvomergeError(f"base model {base_model} is not a source of this slice", source=source, key="base_model")
    params: dict[str, Any] = {}
    for p in spec.global_params:
        value = resolve(p.name, [out.parameters, module, stage.parameters], slot.filter_names[0], t)
        if value is None and p.required:
            raise EvomergeError(f"missing required parameter {p.name!r} (tensor {out_name})", source=source, key=p.name)
        params[p.arg] = p.default if value is None else value
    for p in spec.per_model_params:
        values = []
        for src, name, names in others:
            value = resolve(p.name, [src.parameters, out.parameters, module, stage.parameters], names, t)
            if value is None and p.required:
                raise EvomergeError(f"missing required parameter {p.name!r} for model {src.model} (tensor {name})",
                                    source=source, key=f"{p.name}")
            values.append(p.default if value is None else value)
        params[p.arg] = tuple(values)
    if spec.name.startswith("della"):
        for d, e in zip(params.get("density", ()), params.get("epsilon", ())):
            if 0 < d < 1 and not (0 < d - e and d + e < 1):  # density 0 drops the delta, 1 keeps it (sparsify)
                raise EvomergeError(f"della needs density +- epsilon inside (0, 1), got density={d}, epsilon={e} "
                                    f"at {out_name}", source=source, key="epsilon")
    return TensorTask(out_name, spec.name, base_ref, tuple((s.model, n) for s, n, _ in others),
                      tuple(sorted(params.items())), vocab=slot.vocab, seed=stage.seed)


def _check_compatible(dirs: dict[str, ModelDir], source: str) -> None:
    """Same architecture family, layer shapes and names; only vocabulary rows may differ."""
    first_name, first = next(iter(dirs.items()))
    for name, d in dirs.items():
        if d.arch.name != first.arch.name:
            raise EvomergeError(f"architecture {d.arch.name} of {name} differs from {first.arch.name} of {first_name}",
                                source=source, key="models")
        for tensor in first.tensor_names:
            layer = first.arch.layer_of(tensor)
            if layer is not None and layer >= d.num_layers:
                continue
            if tensor not in d.tensor_names:
                raise EvomergeError(f"{name} has no tensor {tensor} (present in {first_name})", source=source, key="models")
            a, b = tuple(first.shape(tensor)), tuple(d.shape(tensor))
            if a != b and not (first.arch.is_vocab_tensor(tensor) and a[1:] == b[1:]):
                raise EvomergeError(f"tensor {tensor} has shape {list(b)} in {name} but {list(a)} in {first_name}",
                                    source=source, key="models")


@dataclass(frozen=True)
class _Slot:
    """One output tensor of a stage before its parameters are resolved: where its inputs come from."""

    out_name: str
    slice: int  # index into the stage's output slices (`_output_slices`)
    inputs: tuple[tuple[int, str], ...]  # (index of the source in the slice, tensor name in that source)
    t: float  # position inside the slice, for gradient parameters
    vocab: bool
    filter_names: tuple[tuple[str, ...], ...] = ()  # what parameter filters match: the output's names, each input's


Layout = tuple[list[_Slot], list[list[_Slot]]]  # (non-layer slots, per-output-layer slots)


def structure(stage: MergeStage) -> tuple:
    """All a stage's layout depends on (with the model dirs): its method, models and layer ranges, not parameter values."""
    def inputs(part: Module) -> tuple:
        if part.slices is None:
            return tuple(m.model for m in part.models)
        return tuple((out.base_model, tuple((s.model, s.layer_range) for s in out.sources)) for out in part.slices)

    return stage.method, stage.base_model, tuple((name, inputs(part)) for name, part in stage.parts.items())


def stage_layout(stage: MergeStage, dirs: dict[str, ModelDir], source: str) -> Layout:
    """Which input tensors make each output tensor: the structural checks and name bookkeeping of `plan_stage`."""
    used = {m: dirs[m] for m in stage.referenced_models()}
    _check_compatible(used, source)
    template = dirs[stage.template_model]
    arch = template.arch
    if stage.modules:
        arch.check_modules(list(stage.modules), source)
    outputs = _output_slices(stage, template.num_layers)
    text = [i for i, (module, _, _) in enumerate(outputs) if module == TEXT_MODULE]  # the text model's slices
    module_slice = {module: i for i, (module, _, _) in enumerate(outputs) if module != TEXT_MODULE}
    slices = [out for _, out, _ in outputs]
    for i in text:
        at = f"modules.{TEXT_MODULE}.slices[{i}]" if stage.modules else f"slices[{i}]"
        lengths = {s.layer_range[1] - s.layer_range[0] for s in slices[i].sources}
        if len(lengths) != 1:
            raise EvomergeError("all sources of a slice need the same number of layers", source=source, key=at)
        for s in slices[i].sources:
            if not 0 <= s.layer_range[0] <= s.layer_range[1] <= dirs[s.model].num_layers:
                raise EvomergeError(f"layer_range {list(s.layer_range)} is outside 0..{dirs[s.model].num_layers} of {s.model}",
                                    source=source, key=f"{at}.layer_range")

    parts = arch.part_positions(template.tensor_names)  # an image-text model's vision layers: t = i / (n - 1) of their own

    def non_layer(names: list[str], i: int) -> list[_Slot]:
        sources = slices[i].sources
        return [_Slot(n, i, tuple((j, n) for j, s in enumerate(sources) if n in dirs[s.model].tensor_names),
                      parts.get(n, 0.0), arch.is_vocab_tensor(n)) for n in names]

    tied = arch.tied_embeddings(template.config)
    outside = [n for n in template.tensor_names if arch.layer_of(n) is None and not (tied and n.startswith("lm_head."))]
    # the text model's tensors before its layers from its first slice, the others from its last (a vision tower too,
    # unless a module of its own gives it)
    last = text[-1]
    pre = [n for n in outside if arch.is_pre_layer(n)]
    after = [n for n in outside if n not in pre]
    head = non_layer(pre, 0) + non_layer([n for n in after if arch.module_of(n) not in module_slice], last)
    for module, i in module_slice.items():
        head += non_layer([n for n in after if arch.module_of(n) == module], i)
    layers: list[list[_Slot]] = []
    for i in text:
        first = slices[i].sources[0]  # an output layer has the tensors of its first source's layer (kinds differ: Qwen3.5)
        n = first.layer_range[1] - first.layer_range[0]
        for idx in range(n):
            t, names = idx / (n - 1) if n > 1 else 1.0, dirs[first.model].layer_tensor_names(first.layer_range[0] + idx)
            layers.append([_Slot(arch.rename_layer(name, len(layers)), i, tuple(
                (j, arch.rename_layer(name, s.layer_range[0] + idx)) for j, s in enumerate(slices[i].sources)), t, False)
                for name in names])
    arch.check_layers_stay([(k, arch.layer_of(name)) for k, layer in enumerate(layers) for _, name in layer[0].inputs],
                           template.num_layers, source, "slices")
    # layers past num_layers (multi-token prediction) follow the last slice's layers, where each of its sources has them
    sources = slices[last].sources
    reference = dirs[sources[0].model]
    past = reference.past_layers
    have = [set(dirs[s.model].tensor_names) for s in sources] if past else []
    for name in past:
        k = arch.layer_of(name) - reference.num_layers
        inputs = tuple((j, arch.rename_layer(name, dirs[s.model].num_layers + k)) for j, s in enumerate(sources))
        if all(n in names for (_, n), names in zip(inputs, have)):
            head.append(_Slot(arch.rename_layer(name, len(layers) + k), last, inputs, 0.0, arch.is_vocab_tensor(name)))

    def named(slot: _Slot) -> _Slot:  # once per layout: a large mixture of experts has tens of thousands of tensors
        return replace(slot, filter_names=tuple(arch.filter_names(n) for n in (slot.out_name, *(n for _, n in slot.inputs))))

    return [named(s) for s in head], [[named(s) for s in layer] for layer in layers]


def plan_stage(stage: MergeStage, dirs: dict[str, ModelDir], source: str, layouts: dict[tuple, Layout] | None = None
               ) -> tuple[list[TensorTask], list[list[TensorTask]]]:
    """(non-layer tasks, per-output-layer task lists) for a parameter-space stage, validated before (`validate_stage`:
    a search space validates its stages once, `merge_to_dir` the recipe it reads).

    `layouts` memoizes `stage_layout` by `structure(stage)` for a caller that plans many recipes over the same `dirs`
    (a search worker): then only the parameters are resolved per recipe.
    """
    spec = get_method(stage.method, source=source, key="merge.method")
    layouts, key = {} if layouts is None else layouts, structure(stage)
    if key not in layouts:
        layouts[key] = stage_layout(stage, dirs, source)
    outputs = _output_slices(stage, dirs[stage.template_model].num_layers)

    def task(slot: _Slot) -> TensorTask:
        _, out, module = outputs[slot.slice]
        return _resolve_task(spec, stage, out, module, slot, source)

    head, layers = layouts[key]
    return [task(s) for s in head], [[task(s) for s in layer] for layer in layers]


def fold_hidden_scales(layers: list[LayerSlot]) -> list[float]:
    """Per slot, the factor for its output projections that makes a plain model equal the scaled path.

    The path computes x_k <- s_k x_k; x_{k+1} = x_k + f_k(norm(x_k)). With y_k = x_k / prod_{i<k} s_i this is
    y_{k+1} = y_k + f_k(norm(y_k)) / prod_{i<=k} s_i, because norm() is invariant to a positive scale of its input (up to
    its epsilon), and the final norm removes prod s. So slot k's output projections are scaled by 1 / prod_{i<=k} s_i.
    """
    factors, running = [], 1.0
    for slot in layers:
        running *= slot.scale
        factors.append(1.0 / running)
    return factors


def plan_recipe(recipe: Recipe, dirs: dict[str, ModelDir], source: str = "<recipe>",
                layouts: dict[tuple, Layout] | None = None) -> Plan:
    """The tasks of `recipe` over `dirs`; `layouts` caches the merge stage's layout (see `plan_stage`)."""
    warnings: list[str] = []
    head, merged_layers = plan_stage(recipe.merge, dirs, source, layouts) if recipe.merge else ([], [])
    if recipe.merge:
        config_from = recipe.merge.template_model
    if not recipe.layers:
        return Plan(head + [t for layer in merged_layers for t in layer], len(merged_layers), config_from,
                    tokenizer_model(recipe, config_from, dirs, source), warnings)

    # Layer path: slot k is layer `slot.layer` of its source, renamed to k. As in mergekit, the tensors before the layers
    # come from the first slot's source and those after from the last slot's (the merge stage's when that is `merged`).
    if not recipe.merge:
        config_from = recipe.layers[0].source
        _check_compatible({m: dirs[m] for m in recipe.referenced_models()}, source)
    arch = dirs[config_from].arch
    arch.check_layers_stay(list(enumerate(s.layer for s in recipe.layers)), dirs[config_from].num_layers, source, "layers")
    merged_head = {t.out_name: t for t in head}

    def outside(slot: LayerSlot, names: list[str]) -> list[TensorTask]:
        if slot.source == MERGED:
            return [merged_head[n] for n in names if n in merged_head]
        return [TensorTask(n, "passthrough", None, ((slot.source, n),), (("scale", (1.0,)),), arch.is_vocab_tensor(n))
                for n in names if n in dirs[slot.source].tensor_names]

    def past_layers(slot: LayerSlot) -> list[TensorTask]:
        """The layers past its source's last (multi-token prediction), renumbered after the path's."""
        if slot.source == MERGED:
            found, first = outside(slot, list(merged_head)), len(merged_layers)
        else:
            found, first = outside(slot, dirs[slot.source].past_layers), dirs[slot.source].num_layers
        return [replace(t, out_name=arch.rename_layer(t.out_name, len(recipe.layers) + arch.layer_of(t.out_name) - first))
                for t in found if arch.layer_of(t.out_name) is not None]

    names = [n for n in dirs[config_from].tensor_names if arch.layer_of(n) is None]
    head = outside(recipe.layers[0], [n for n in names if arch.is_pre_layer(n)]) + \
        outside(recipe.layers[-1], [n for n in names if not arch.is_pre_layer(n)]) + past_layers(recipe.layers[-1])
    factors = fold_hidden_scales(recipe.layers)
    if any(f != 1 for f in factors) and not arch.output_projections:
        warnings.append(f"hidden-state scales cannot be folded exactly into {arch.name} weights; written unscaled")
        factors = [1.0] * len(factors)
    tasks = list(head)
    for k, (slot, factor) in enumerate(zip(recipe.layers, factors)):
        if slot.source == MERGED:
            if slot.layer >= len(merged_layers):
                raise EvomergeError(f"layer {slot.layer} is past the {len(merged_layers)} merged layers", source=source,
                                    key=f"layers[{k}].layer")
            slot_tasks = merged_layers[slot.layer]
            renamed = [replace(t, out_name=arch.rename_layer(t.out_name, k)) for t in slot_tasks]
        else:
            d = dirs[slot.source]
            if slot.layer >= d.num_layers:
                raise EvomergeError(f"layer {slot.layer} is past the {d.num_layers} layers of {slot.source}", source=source,
                                    key=f"layers[{k}].layer")
            renamed = [TensorTask(arch.rename_layer(n, k), "passthrough", None, ((slot.source, n),), (("scale", (1.0,)),))
                       for n in d.layer_tensor_names(slot.layer)]
        for t in renamed:
            scale = factor if arch.is_output_projection(t.out_name) else 1.0
            if slot.weight_scale is not None:
                scale *= float(evaluate_setting(slot.weight_scale, arch.filter_names(t.out_name), 0.0) or 1.0)
            tasks.append(replace(t, scale=t.scale * scale))
    return Plan(tasks, len(recipe.layers), config_from, tokenizer_model(recipe, config_from, dirs, source), warnings,
                [slot.layer for slot in recipe.layers])
