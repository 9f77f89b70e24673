"""Execute a Plan: tensor by tensor into a new HF model dir (streaming, bounded memory), or in place into a live model.

Memory when writing a dir: one output tensor and its inputs at a time (sources are read lazily from safetensors), plus the
writer's current shard. A search worker instead re-materializes the same live model for every candidate, recomputing
only the tensors whose task changed since the last candidate, from its store of source tensors (models/sources.py).
"""

from __future__ import annotations

import os

import torch
import yaml
from tqdm.auto import tqdm

from evomerge.errors import EvomergeError
from evomerge.merge.compiled import CompiledMethods
from evomerge.merge.plan import Layout, Plan, TensorTask, plan_recipe, validate_stage
from evomerge.merge.registry import get_method
from evomerge.merge.rng import MaskKey
from evomerge.models.io import (ModelDir, ModelWriter, check_device, check_finite, common_dtype, hub_repo, live_param,
                                on_hub, parse_dtype, pick_chat_template)
from evomerge.models.lora import split_reference
from evomerge.models.sources import LazySources, MappedSources, ResidentSources, Sources
from evomerge.models.vocab import by_token, write_tokenizer
from evomerge.recipe import Recipe, to_evomerge_yaml


def open_model_dirs(recipe: Recipe, source: str = "<recipe>") -> dict[str, ModelDir]:
    return {m: ModelDir.open(m, source=source) for m in recipe.referenced_models()}


def compute(task: TensorTask, sources: Sources, compiled: CompiledMethods | None = None) -> torch.Tensor:
    """The output tensor of one task, in the dtype of its inputs (with `compiled`, partly by compiled code)."""
    spec = get_method(task.method)
    base = sources.get(*task.base) if task.base else None
    tensors = [sources.get(*ref) for ref in task.inputs]
    if task.vocab:  # embeddings of different vocab sizes: the common block of rows
        rows = min(t.shape[0] for t in tensors + ([base] if base is not None else []))
        tensors = [t[:rows] for t in tensors]
        base = base[:rows] if base is not None else None
    kwargs = task.kwargs
    if spec.randomized:
        # keyed by the model's position among the merged models, not by its path: the same recipe gives the same masks
        # wherever its models are stored (a search freezes them as absolute paths)
        kwargs["key"] = [MaskKey(task.seed, task.out_name, str(i)) for i in range(len(task.inputs))]
    out = (compiled.fn(task.method) if compiled else spec.fn)(base, tensors, **kwargs)
    return out * task.scale if task.scale != 1.0 else out


def model_card(recipe: Recipe, plan: Plan) -> str:
    """The README of a merged model: its recipe, and as metadata the hub repos it was merged from (`base_model`, which
    the Hub draws as the model's family tree)."""
    parts = [part for ref in recipe.referenced_models() for part in split_reference(ref) or (ref,)]
    metadata = {"base_model": list(dict.fromkeys(hub_repo(p)["repo_id"] for p in parts if on_hub(p))) or None,
                "base_model_relation": "merge", "tags": ["merge", "evomerge"], "library_name": "transformers"}
    front = yaml.safe_dump({k: v for k, v in metadata.items() if v is not None}, sort_keys=False)
    return (f"---\n{front}---\n# Merged model\n\nMade by evomerge from this recipe "
            f"(`evomerge merge recipe.yaml OUT` reproduces it):\n\n```yaml\n{to_evomerge_yaml(recipe)}```\n"
            + ("".join(f"\nWarning: {w}\n" for w in plan.warnings)))


def merge_to_dir(recipe: Recipe, out_dir: str | os.PathLike, *, source: str = "<recipe>", device: str = "cpu",
                 dtype: str | None = None, out_shard_bytes: int = 5 * 2**30, force: bool = False,
                 allow_nonfinite: bool = False, progress: bool = True, compile: bool = False) -> Plan:
    """Materialize `recipe` into a Hugging Face model dir; nothing is left at `out_dir` on failure. `compile`: the
    element-wise math under torch.compile (merge/compiled.py)."""
    stage = recipe.merge
    compute_dtype = parse_dtype(dtype or (stage.dtype if stage else None), source=source)
    out_dtype = parse_dtype(dtype or (stage.out_dtype if stage else None), source=source, key="out_dtype") or compute_dtype
    check_device(device)
    if stage:
        validate_stage(stage, source)
    dirs = open_model_dirs(recipe, source)
    out_dtype = out_dtype or common_dtype(dirs.values())  # one dtype out, also from sources of several
    plan = plan_recipe(recipe, dirs, source)
    if not allow_nonfinite:
        for name, d in dirs.items():
            bad = check_finite(d)
            if bad:
                raise EvomergeError(f"{name} has NaN/inf weights in {bad[0]} (and {len(bad) - 1} more); "
                                    f"pass --allow-nonfinite to merge anyway", source=source, key="models")
    chat_template = (pick_chat_template(stage.chat_template, dirs, dirs.get(plan.tokenizer_from), source)
                     if stage and stage.chat_template else None)
    template = dirs[plan.config_from]
    try:
        config = template.arch.set_num_layers(dict(template.config), plan.num_layers,
                                              source_layers=plan.source_layers or recipe.source_layers())
    except EvomergeError as err:
        raise EvomergeError(err.message, source=source, key=err.key) from None
    holding = [name for name, d in dirs.items() if d.past_layers]
    if holding and not any((template.arch.layer_of(t.out_name) or 0) >= plan.num_layers for t in plan.tasks):
        plan.warnings.append(f"the multi-token-prediction layer past the last of {', '.join(holding)} is left out: it "
                             f"follows the last slice's (or slot's) models, which do not all have one")
        if "num_nextn_predict_layers" in config:  # and the config says so (speculative decoding would look for it)
            config = {**config, "num_nextn_predict_layers": 0}
    sources = by_token(LazySources(dirs, device, compute_dtype), stage, plan.tokenizer_from, source)  # models/vocab.py
    rows, compiled = None, CompiledMethods() if compile else None
    with ModelWriter(out_dir, max_shard_bytes=out_shard_bytes, force=force) as writer:
        for task in tqdm(plan.tasks, desc="merging", unit="tensor", disable=not progress):
            tensor = compute(task, sources, compiled)
            if task.vocab:
                rows = tensor.shape[0] if rows is None else min(rows, tensor.shape[0])
            writer.add(task.out_name, tensor.to(out_dtype or tensor.dtype).cpu())
        if rows is not None:  # the embeddings' rows: the common block of differing vocabularies, or tokenizer_source's
            config = template.arch.with_text_settings(config, {**template.arch.text_settings(config), "vocab_size": rows})
        if out_dtype is not None:
            config["torch_dtype"] = config["dtype"] = str(out_dtype).removeprefix("torch.")
        writer.write_config(config)
        if plan.tokenizer_from:
            plan.warnings += write_tokenizer(writer, dirs[plan.tokenizer_from], sources, rows)
        if chat_template:
            writer.set_chat_template(chat_template)
        writer.write_text("README.md", model_card(recipe, plan))
    return plan


class LiveMaterializer:
    """Writes recipes into one live model in place, from a worker's sources; recomputes only tensors whose task changed.

    Recipes come validated (a search space's decode). What it keeps across candidates is its own: the plan's layout
    per recipe structure (so per candidate only the parameters are resolved), the live parameter of each output name,
    and the task each output tensor holds now; with `compile`, the compiled functions (merge/compiled.py).
    """

    def __init__(self, model: torch.nn.Module, sources: ResidentSources | MappedSources, *, compile: bool = False):
        self.model, self.sources = model, sources
        self.compiled = CompiledMethods() if compile else None
        self.applied: dict[str, TensorTask] = {}
        self.layouts: dict[tuple, Layout] = {}  # plan_recipe's cache, keyed by plan.structure(stage)
        self.targets: dict[str, torch.Tensor] = {}  # output name -> live parameter
        self.source_storages = {t.untyped_storage().data_ptr() for t in sources.tensors.values()}

    def target(self, name: str) -> torch.Tensor:
        if name not in self.targets:
            self.targets[name] = live_param(self.model, name)
        return self.targets[name]

    def adoptable(self, value: torch.Tensor, target: torch.Tensor) -> bool:
        """Whether `value` can replace the parameter's storage (not a view's: one expert of fused ones): its shape, dtype,
        device, and exactly the memory of its own (a view into a larger temporary would keep all of it alive; a source
        tensor, or a view of one, is copied, so the live model never aliases a source)."""
        storage = value.untyped_storage()
        return (value.shape == target.shape and value.dtype == target.dtype and value.device == target.device
                and value.is_contiguous() and storage.nbytes() == value.nbytes and target._base is None
                and storage.data_ptr() not in self.source_storages)

    @torch.no_grad()
    def apply(self, recipe: Recipe, source: str = "<recipe>") -> dict[str, int]:
        if recipe.layers:
            raise EvomergeError("layer paths are materialized by evomerge.run's path model, not in place", key="layers")
        plan = plan_recipe(recipe, self.sources.dirs, source, self.layouts)
        changed = [task for task in plan.tasks if self.applied.get(task.out_name) != task]
        for task in changed:
            self.write(task, compute(task, self.sources, self.compiled))
        return {"tensors": len(plan.tasks), "computed": len(changed)}

    @torch.no_grad()
    def write(self, task: TensorTask, value: torch.Tensor) -> None:
        target = self.target(task.out_name)
        if value.shape != target.shape and value.dim() == 3 and value.mT.shape == target.shape:
            value = value.mT  # fused experts stored [experts, in, out] (Qwen3-VL-MoE's hub checkpoints), live transposed
        if self.adoptable(value, target):
            target.data = value  # the fresh result becomes the parameter: no copy (tied weights stay tied)
        else:
            target[: value.shape[0]].copy_(value) if task.vocab else target.copy_(value)
        self.applied[task.out_name] = task
