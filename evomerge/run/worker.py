"""A search worker: source models resident on its device, one live merged model, one evaluator; scores one recipe at a time.

`TrialRunner` is plain Python (used in process, and in tests); `RayWorker` wraps it as a Ray actor, one per GPU or CPU slot.
A parameter-space stage is written in place into the live merged model (only tensors whose task changed are recomputed);
a layer path is a path model over the resident layers (see path_model), built without copying weights.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from evomerge.merge.materialize import LiveMaterializer, ResidentSources
from evomerge.merge.rng import memoize_draws
from evomerge.merge.sparsify import keep_orders
from evomerge.models.io import ModelDir, live_param, load_live_model
from evomerge.recipe import MERGED, Recipe, recipe_from_dict
from evomerge.run.path_model import build_path_model, decoder_layers

# DARE/DELLA masks are keyed by (seed, tensor, model), not by candidate: a worker draws the same uniforms for every
# candidate, so it keeps them (4 bytes per element and model; past its budget, draws are recomputed).
CPU_DRAW_MEMO_BYTES = 2 << 30


def draw_memo_bytes(device: str) -> int:
    """A worker's budget for kept draws: 2 GiB on CPU; on a GPU half the memory free once the models are resident (a
    1.24B model with two experts needs 10 GB of draws; the evaluation keeps the other half). Only unfused DARE/DELLA
    keep draws: fused kernels (merge/fused.py, the default on a GPU) hash them where they are used. The orders of
    |delta| (TIES/breadcrumbs/SCE thresholds, DELLA's ranks: `sparsify.keep_orders`) have a budget of the same size;
    on a GPU they fill it instead of draws, on CPU unfused DELLA keeps both (6 bytes per element and expert)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return CPU_DRAW_MEMO_BYTES


@dataclass
class TrialResult:
    candidate: int
    split: str
    status: str  # ok or failed
    fitness: float | None
    scores: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    worker: str = ""
    docs: bytes | None = None  # per-document scores, packed (evaluate.docs)
    estimated: bool = False  # racing stopped it early
    t_merge: float = 0.0
    t_eval: float = 0.0
    t_total: float = 0.0


class TrialRunner:
    def __init__(self, models: list[str], base: str, make_evaluator: Callable[[], Any], *, device: str = "cpu",
                 dtype: str | None = None, name: str = "local"):
        from evomerge.merge.materialize import parse_dtype

        torch_dtype = parse_dtype(dtype)
        self.name, self.device = name, device
        self.dirs = {m: ModelDir.open(m) for m in models}
        self.live = {m: load_live_model(self.dirs[m], device, torch_dtype).eval() for m in models}
        # The resident store is the live source models' own parameters: no second copy.
        self.sources = ResidentSources.from_tensors(self.dirs, {
            (m, n): live_param(self.live[m], n, self.dirs[m].arch).data for m in models for n in self.dirs[m].tensor_names})
        self.merged = load_live_model(self.dirs[base], device, torch_dtype).eval()
        self.materializer = LiveMaterializer(self.merged, self.sources)
        budget = draw_memo_bytes(device)
        memoize_draws(budget)
        keep_orders(budget)
        self.evaluator = make_evaluator()

    def model_for(self, recipe: Recipe) -> torch.nn.Module:
        if recipe.merge:
            self.materializer.apply(recipe.model_copy(update={"layers": None}))
        if not recipe.layers:
            return self.merged
        models = {**self.live, MERGED: self.merged}
        layers = {m: decoder_layers(model) for m, model in models.items()}
        return build_path_model(models[recipe.layers[0].source], layers, [(s.source, s.layer, s.scale) for s in recipe.layers],
                                last=models[recipe.layers[-1].source])

    def run(self, candidate: int, recipe_yaml: str, split: str = "search", threshold: float | None = None) -> TrialResult:
        """Score one recipe; with a racing `threshold`, the evaluator may stop it early (evaluate.racing)."""
        import yaml

        start = time.perf_counter()
        result = TrialResult(candidate, split, "failed", None, worker=self.name)
        try:
            recipe = recipe_from_dict([yaml.safe_load(recipe_yaml)])
            model = self.model_for(recipe)
            result.t_merge = time.perf_counter() - start
            race = {} if threshold is None else {"threshold": threshold}  # evaluators without racing take no threshold
            evaluation = self.evaluator.evaluate(model, split=split, **race)
            result.t_eval = time.perf_counter() - start - result.t_merge
            result.scores = evaluation.scores
            result.docs, result.estimated = evaluation.docs, evaluation.estimated
            fitness = evaluation.fitness
            if evaluation.status == "ok" and fitness is not None and math.isfinite(fitness):
                result.status, result.fitness = "ok", float(fitness)
            else:
                result.error = evaluation.error or f"non-finite fitness {fitness}"
        except Exception as err:  # a failed candidate is a value: recorded, never best, and the run goes on
            result.error = f"{type(err).__name__}: {err}"
            if os.environ.get("EVOMERGE_DEBUG"):
                traceback.print_exc()
        result.t_total = time.perf_counter() - start
        return result
