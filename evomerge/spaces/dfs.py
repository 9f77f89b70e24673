"""Data-flow-space (DFS) search, after Sakana's evolutionary model merge (arXiv 2403.13187, Sec. 3.2): a layer path.

Layout: the layers of the M models, model after model, repeated r times -- T = (layers of all models) x r slots, in that
order (repetition, then model, then layer). An indicator gene I_t in [-1, 1] per slot includes slot t when I_t > 0 (unit
genome > 0.5); the included slots keep their order. The hidden state passed from one included layer to the next is scaled:
  - `scale: matrix` (the paper): W in R^{N x N}, N the number of distinct layers of all models (repetitions share
    entries); W[i, j] scales the input of layer j when the layer before it in the path is layer i. N^2 genes.
  - `scale: slot`: one scale per slot, applied to the input of that slot (T genes; cheaper when N is large).
  - `scale: none`: no scaling genes.
The first layer of a path reads the embeddings, not a layer, and is never scaled.

PS+DFS: with `merge`, a fixed merge stage (the PS winner) is computed first and the source `merged` names its layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from evomerge.errors import EvomergeError
from evomerge.recipe import MERGED, LayerSlot, MergeStage, Recipe, load_recipe, recipe_from_dict
from evomerge.spaces.base import DECIMALS, Gene, Schema, SearchSpace, rounded

MAX_SLOTS = 2**16  # a path's longest: each slot is a gene and may be a layer of the merged model
INCLUDE_START = 0.5  # raw indicator of the start path's slots (the others start at -0.5): a quarter-range from the threshold


class DFSConfig(Schema):
    kind: Literal["dfs"] = "dfs"
    models: list[str] = Field(min_length=1)  # the M models laid out; `merged` is the result of `merge`
    repeats: int = Field(3, ge=1)  # r (the paper: 3)
    scale: Literal["matrix", "slot", "none"] = "matrix"
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    pin: str | None = None  # this model's first layer (first repetition) and last layer (last repetition) are always in
    merge: str | dict[str, Any] | None = None  # PS+DFS: a recipe with the fixed merge stage (file, or inline document)

    @model_validator(mode="after")
    def _consistent(self):
        low, high = self.scale_bounds
        if not (10**-DECIMALS <= low < high < np.inf):  # recipes hold scales rounded to DECIMALS: none may round to 0
            raise ValueError(f"scale_bounds: need {10**-DECIMALS:g} <= low < high, got [{low}, {high}] (a scale <= 0 "
                             "cannot be folded into weights)")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: a model is listed twice")
        if self.pin is not None and self.pin not in self.models:
            raise ValueError(f"pin: {self.pin!r} is not one of the models")
        if (self.merge is None) == (MERGED in self.models):
            raise ValueError(f"merge: give a merge recipe exactly when {MERGED!r} is one of the models")
        return self


def merge_stage(config: DFSConfig, source: str) -> MergeStage | None:
    """The fixed PS stage of a PS+DFS space (a recipe file, or an inline evomerge/mergekit document)."""
    if config.merge is None:
        return None
    recipe = load_recipe(config.merge) if isinstance(config.merge, str) else recipe_from_dict([config.merge], source)
    if recipe.merge is None or recipe.layers:
        raise EvomergeError("the merge recipe must have a merge stage and no layer path", source=source, key="merge")
    return recipe.merge


class DataFlowSpace(SearchSpace):
    def __init__(self, config: DFSConfig, *, num_layers: Mapping[str, int], source: str = "<space>"):
        self.config, self.source = config, source
        self.merge = merge_stage(config, source)
        if self.merge is not None:
            from evomerge.merge.plan import validate_stage  # loads the method registry (torch) only when needed

            validate_stage(self.merge, source)
        self.layer_counts = [self._layer_count(m, num_layers) for m in config.models]
        if config.repeats * sum(self.layer_counts) > MAX_SLOTS:
            raise EvomergeError(f"{config.repeats} repeats of {sum(self.layer_counts)} layers make "
                                f"{config.repeats * sum(self.layer_counts):,} slots; at most {MAX_SLOTS:,}",
                                source=source, key="repeats")
        first_layer = np.cumsum([0] + self.layer_counts)  # distinct-layer index of each model's layer 0
        # slots[t] = (repetition, model index, layer); layer_ids[t] indexes W
        self.slots = [(rep, m, layer) for rep in range(config.repeats) for m in range(len(config.models))
                      for layer in range(self.layer_counts[m])]
        self.layer_ids = np.array([first_layer[m] + layer for _, m, layer in self.slots])
        self.n_layers = int(first_layer[-1])
        self.pinned = self._pinned()
        self.free = np.array([t for t in range(len(self.slots)) if t not in self.pinned], dtype=int)
        self.genes = tuple(self._genes())

    def _layer_count(self, model: str, num_layers: Mapping[str, int]) -> int:
        if model in num_layers:
            return num_layers[model]
        if model == MERGED:  # the merge stage has the layers of its base (or first) model
            return self._layer_count(self.merge.template_model, num_layers)
        raise EvomergeError(f"no layer count for model {model!r} (a placeholder not overridden?)", source=self.source,
                            key="models")

    def _pinned(self) -> set[int]:
        if self.config.pin is None:
            return set()
        m = self.config.models.index(self.config.pin)
        ends = [(0, m, 0), (self.config.repeats - 1, m, self.layer_counts[m] - 1)]
        return {self.slots.index(end) for end in ends}

    def _genes(self):
        models, (low, high) = self.config.models, self.config.scale_bounds
        # start: one model as it is -- its layers in the first repetition (a pinned last layer is the last repetition's)
        start_model = models.index(self.config.pin or models[0])
        for t in self.free:
            rep, m, layer = self.slots[t]
            on = rep == 0 and m == start_model and not (self.pinned and layer == self.layer_counts[m] - 1)
            yield Gene(f"include[r{rep}.{models[m]}.{layer}]", -1.0, 1.0, INCLUDE_START if on else -INCLUDE_START)
        start = float(np.clip(1.0, low, high))
        if self.config.scale == "matrix":
            names = [f"{models[m]}.{layer}" for m in range(len(models)) for layer in range(self.layer_counts[m])]
            yield from (Gene(f"W[{a}->{b}]", low, high, start) for a in names for b in names)
        elif self.config.scale == "slot":
            yield from (Gene(f"scale[r{rep}.{models[m]}.{layer}]", low, high, start) for rep, m, layer in self.slots)

    @property
    def anchors(self) -> list[np.ndarray]:
        """Each model as it is (its layers in the first repetition, scales at 1 or nearest); with `pin`, x0 only."""
        if self.config.pin is not None:
            return [self.x0]
        out = []
        for m in range(len(self.config.models)):
            raw = self.raw(self.x0)
            raw[:len(self.free)] = [INCLUDE_START if rep == 0 and mm == m else -INCLUDE_START
                                    for rep, mm, _ in (self.slots[t] for t in self.free)]
            out.append(self.unit(raw))
        return out

    def _decode(self, raw: np.ndarray) -> Recipe:
        indicator, scales = raw[:len(self.free)], raw[len(self.free):]
        included = np.zeros(len(self.slots), dtype=bool)
        included[self.free] = indicator > 0
        included[list(self.pinned)] = True
        if not included.any():  # never an empty path: keep the slot whose indicator is highest
            included[self.free[np.argmax(indicator)]] = True
        path, prev = [], None
        for t in np.flatnonzero(included):
            _, m, layer = self.slots[t]
            path.append(LayerSlot(source=self.config.models[m], layer=layer, scale=1.0 if prev is None else
                                  rounded(self._scale(scales, prev, t))))
            prev = t
        return Recipe(merge=self.merge, layers=path)

    def _scale(self, scales: np.ndarray, prev: int, t: int) -> float:
        if self.config.scale == "matrix":
            return scales[self.layer_ids[prev] * self.n_layers + self.layer_ids[t]]  # W[layer before, this layer]
        return scales[t] if self.config.scale == "slot" else 1.0

    def describe(self) -> str:
        cfg = self.config
        layers = ", ".join(f"{m} ({n})" for m, n in zip(cfg.models, self.layer_counts))
        pin = f", pinned ends of {cfg.pin}" if cfg.pin else ""
        merged = f"; {MERGED} = {self.merge.method} of {', '.join(self.merge.referenced_models())}" if self.merge else ""
        return (f"DFS space: layers of {layers} x {cfg.repeats} repeats = {len(self.slots)} slots{pin}; scale "
                f"{cfg.scale} in {list(cfg.scale_bounds)}{merged}; dim {self.dim}")
