"""Recipes out to other tools: mergekit YAML (single or mergekit-multi) and evomerge YAML.

mergekit has no hidden-state scale. For a layer path, slot k's scale s_k is folded into the weights: its output
projections are multiplied by 1 / prod_{i<=k} s_i (see merge.plan.fold_hidden_scales), which gives the same model for
pre-norm architectures up to the norms' epsilon. Where that is not exact (non-positive scales, architectures whose
branches end in a norm, such as Gemma-2, Gemma-3, OLMo-2) the scales are dropped with a warning.
"""

from __future__ import annotations

from evomerge.merge.plan import fold_hidden_scales
from evomerge.models.io import ModelDir
from evomerge.recipe import MERGED, Conditional, Recipe, to_evomerge_yaml, to_mergekit_yaml


def fold_for_mergekit(recipe: Recipe, dirs: dict[str, ModelDir]) -> tuple[Recipe, list[str]]:
    """The recipe with every hidden-state scale moved into per-tensor `weight_scale` filters."""
    if not recipe.layers or all(s.scale == 1.0 for s in recipe.layers):
        return recipe, []
    template = recipe.template_model
    arch = dirs[template].arch
    if any(s.scale <= 0 for s in recipe.layers) or not arch.output_projections:
        return _without_scales(recipe), [f"hidden-state scales cannot be folded exactly into {arch.name} weights; "
                                         "the mergekit export drops them"]
    if any(s.weight_scale is not None for s in recipe.layers if s.scale != 1.0):
        raise ValueError("a slot has both a hidden-state scale and a weight_scale; fold by hand")
    slots = []
    for slot, factor in zip(recipe.layers, fold_hidden_scales(recipe.layers)):
        d = dirs[template if slot.source == MERGED else slot.source]
        suffixes = dict.fromkeys(n.split(f".{slot.layer}.", 1)[1] for name in d.layer_tensor_names(slot.layer)
                                 if d.arch.is_output_projection(name) for n in d.arch.filter_names(name))
        weight_scale = None if factor == 1.0 else [Conditional(filter=s, value=factor) for s in suffixes] + [Conditional(value=1.0)]
        slots.append(slot.model_copy(update={"scale": 1.0, "weight_scale": weight_scale}))
    return recipe.model_copy(update={"layers": slots}), []


def _without_scales(recipe: Recipe) -> Recipe:
    return recipe.model_copy(update={"layers": [s.model_copy(update={"scale": 1.0}) for s in recipe.layers]})


def export_text(recipe: Recipe, fmt: str) -> tuple[str, list[str]]:
    """(YAML text, warnings) for `fmt` in {"evomerge", "mergekit"}."""
    if fmt == "evomerge":
        return to_evomerge_yaml(recipe), []
    dirs = {m: ModelDir.open(m) for m in recipe.referenced_models()}
    folded, warnings = fold_for_mergekit(recipe, dirs)
    warnings += [f"{m}: config.json has no `architectures`, which mergekit needs to read the model (save_pretrained "
                 "writes it, e.g. [\"LlamaForCausalLM\"])" for m, d in dirs.items() if not d.config.get("architectures")]
    if any(m.method in ("dare_ties", "dare_linear", "della", "della_linear") for m in [recipe.merge] if m):
        warnings.append("mergekit draws DARE/DELLA masks from torch's global RNG: its merge matches evomerge's in "
                        "distribution, not element by element")
    modules = tuple(name for name, _ in dirs[recipe.template_model].arch.modules)
    return to_mergekit_yaml(folded, modules), warnings + _layer_types_warnings(recipe, dirs)


def _layer_types_warnings(recipe: Recipe, dirs: dict[str, ModelDir]) -> list[str]:
    """mergekit 0.1.5 copies the config's per-layer `layer_types` unchanged: wrong for a layer path, and transformers
    refuses it when the path's length differs (num_hidden_layers must equal the number of layer_types)."""
    layers = recipe.source_layers()
    if layers is None:
        return []
    return [f"{name}'s config has layer_types, which mergekit does not update for a layer path ({len(types)} entries "
            f"kept for {len(layers)} layers): its output may not load or may differ; `evomerge merge` writes them cut "
            "to the path" for name, d in dirs.items()
            if isinstance(types := d.arch.text_settings(d.config).get("layer_types"), list) and layers != list(range(len(types)))]
