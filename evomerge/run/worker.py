"""A search worker: the source models (where `sources` says), one live merged model, one evaluator; scores one recipe at
a time.

`TrialRunner` is plain Python (used in process, and in tests); `RayWorker` wraps it as a Ray actor, one per GPU or CPU slot.
A parameter-space stage is written in place into the live merged model (only tensors whose task changed are recomputed);
a layer path is a path model over the resident layers (see path_model), built without copying weights.

Sources (`workers.sources`, resolved by run.memory.choose_sources): `device` loads every source model live on the device
(its parameters are the merge's store, and a layer path's layers); `host` and `disk` load on the device only the models
a layer path runs (`path_models`) and read the merge's other inputs from host memory or the mapped files
(models.sources.HostSources, MappedSources).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.materialize import LiveMaterializer
from evomerge.models.io import ModelDir, live_param, load_live_model
from evomerge.models.sources import HostSources, MappedSources, ResidentSources
from evomerge.recipe import MERGED, Recipe
from evomerge.run.path_model import build_path_model, decoder_layers

log = logging.getLogger(__name__)


def keep_freed_host_memory() -> bool:
    """Ask glibc's malloc to reuse freed memory instead of handing it back to the kernel; False where the C library
    has no mallopt (not glibc). A merge on CPU allocates and frees tensors of up to hundreds of MB per candidate, which
    glibc serves above its mmap threshold (at most 32 MB) with fresh mappings: every page is then zeroed and faulted in
    again, and on the 126M-param shape that kernel time was over half of a candidate's merge (benchmarks/README.md)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h; the values are C ints
    kept = mallopt(m_mmap_threshold, 2**30) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1
    if not kept:
        log.info("glibc refused the malloc thresholds: freed host memory goes back to the kernel")
    return kept


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
    notes: tuple[str, ...] = ()  # the evaluator's (e.g. a smaller batch after out of memory): logged by the loop
    t_merge: float = 0.0
    t_eval: float = 0.0
    t_total: float = 0.0


class TrialRunner:
    def __init__(self, models: list[str], base: str, make_evaluator: Callable[[], Any], *, device: str = "cpu",
                 dtype: str | None = None, sources: str = "device", path_models: list[str] = (),
                 name: str = "local", compile: bool = False):
        """`sources`: device, host or disk (see the module doc); `path_models`: the models whose layers a layer path
        may run (with device: every model); `compile`: the merge's element-wise math under torch.compile."""
        from evomerge.models.io import parse_dtype

        if not device.startswith("cuda"):  # the merge runs in host memory (a CUDA device has its caching allocator)
            keep_freed_host_memory()
        torch_dtype = parse_dtype(dtype)
        self.name, self.device, self.sources_mode = name, device, sources
        self.dirs = {m: ModelDir.open(m).drop_unloaded() for m in models}  # what a live model holds: all it merges
        on_device = models if sources == "device" else [m for m in models if m in path_models]
        self.live = {m: load_live_model(self.dirs[m], device, torch_dtype).eval() for m in on_device}
        # The live source models' own parameters are read from where they are: no second copy.
        resident = {(m, n): live_param(self.live[m], n, self.dirs[m].arch).data
                    for m in self.live for n in self.dirs[m].tensor_names}
        if sources == "device":
            self.sources = ResidentSources.from_tensors(self.dirs, resident)
        else:
            store = {"host": HostSources, "disk": MappedSources}[sources]
            self.sources = store(self.dirs, device, torch_dtype, resident)
        self.merged = load_live_model(self.dirs[base], device, torch_dtype).eval()
        self.materializer = LiveMaterializer(self.merged, self.sources, compile=compile)
        self.evaluator = make_evaluator()

    def model_for(self, recipe: Recipe) -> torch.nn.Module:
        if recipe.merge:
            self.materializer.apply(recipe.model_copy(update={"layers": None}))
        if not recipe.layers:
            return self.merged
        models = {**self.live, MERGED: self.merged}
        missing = sorted({s.source for s in recipe.layers} - set(models))
        if missing:  # a caller's mistake, not the candidate's: the search passes every model a layer path may run
            raise ValueError(f"layer path over {missing[0]}, which this worker ({self.sources_mode}) has not on its "
                             "device: name it in path_models")
        template = self.dirs[recipe.template_model]  # a path its written model could not describe fails here, in words
        template.arch.set_num_layers(template.config, len(recipe.layers), source_layers=recipe.source_layers())
        layers = {m: decoder_layers(model) for m, model in models.items()}
        return build_path_model(models[recipe.layers[0].source], layers, [(s.source, s.layer, s.scale) for s in recipe.layers],
                                last=models[recipe.layers[-1].source])

    def preflight(self, split: str) -> None:
        """Score the live base once, on one document per task, before the first trial: an error here (a missing
        package, an unreadable task, a model the evaluator cannot run) would fail every trial alike."""
        try:
            evaluation = self.evaluator.evaluate(self.merged, split=split, limit=1)
            error = None if evaluation.status == "ok" else evaluation.error
        except Exception as err:  # noqa: BLE001 - reported as the one line that stops the search
            error = f"{type(err).__name__}: {err}"
        if error:
            raise EvomergeError(f"scoring the base model on one document per task failed before the first trial "
                                f"({self.name}): {error}", key="evaluation")


    def run(self, candidate: int, recipe: Recipe, split: str = "search", threshold: float | None = None) -> TrialResult:
        """Score one recipe; with a racing `threshold`, the evaluator may stop it early (evaluate.racing)."""
        start = time.perf_counter()
        result = TrialResult(candidate, split, "failed", None, worker=self.name)
        try:
            model = self.model_for(recipe)
            result.t_merge = time.perf_counter() - start
            race = {} if threshold is None else {"threshold": threshold}  # evaluators without racing take no threshold
            evaluation = self.evaluator.evaluate(model, split=split, **race)
            result.t_eval = time.perf_counter() - start - result.t_merge
            result.scores = evaluation.scores
            result.docs, result.estimated = evaluation.docs, evaluation.estimated
            result.notes = tuple(getattr(evaluation, "notes", ()))  # evaluators of tests may have none
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
