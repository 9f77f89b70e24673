"""Up-front checks: everything a search needs is checked before its run dir is made or its config frozen.

Each problem is one EvomergeError that names the experiment file and the key at fault (the CLI prints it and exits 2),
so a corrected experiment starts cleanly instead of meeting a half-made run dir. What is checked here: every model dir
(exists, readable, one architecture and tensor shapes across sources, layer counts the space can use), the space
itself (layer groups, bounds, fixed values), the device asked for, and that a Ray address answers. The tasks (names,
splits, weights) are the evaluator's to check (`run.evaluation.check_tasks`): a search may bring its own evaluator.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.recipe import MERGED, LayerSlot, Recipe
from evomerge.run.config import Experiment, WorkersConfig

RAY_CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class CheckedSpace:
    """What the checks read, for the search to reuse: the typed space config, its models, the space, the floating
    dtype the sources share (`models.io.common_dtype`: float32 for sources of several dtypes; None: no float tensor),
    the model a worker's live merged model starts from, the models whose layers a layer path may run, the memory
    plan (run.memory) from the headers, and warnings for the search to print."""
    config: object  # spaces.SpaceConfig
    models: list[str]
    space: object  # spaces.SearchSpace
    dtype: object  # torch.dtype | None
    base: str = ""
    path_models: tuple[str, ...] = ()
    memory: object = None  # run.memory.MemoryPlan
    warnings: tuple[str, ...] = ()


def check_space(experiment: Experiment, source: str, *, headers_only: bool = False) -> CheckedSpace:
    """Open every model the space names and build the space from their real layer counts and tensors. `headers_only`:
    a hub model not on disk is read from its config and safetensors headers, not downloaded (`evomerge plan`)."""
    from evomerge.merge.plan import plan_recipe
    from evomerge.models.io import ModelDir, common_dtype, parse_dtype
    from evomerge.run.memory import plan_memory
    from evomerge.spaces import build_space, load_space_config, space_models
    from evomerge.spaces.load import keys_under

    config = load_space_config(experiment.space, source=source, key="space")
    models = space_models(config, source=source, key="space")
    compute_dtype = parse_dtype(experiment.workers.dtype, source=source, key="workers.dtype")
    dirs = {}
    try:
        for model in models:
            try:
                dirs[model] = ModelDir.open(model, headers_only=headers_only).drop_unloaded()  # as a worker's
            except EvomergeError as err:
                detail = f"{model}: {err.message}" if err.source == model else str(err)  # the model named once
                raise EvomergeError(detail, source=source, key=_model_key(config, model)) from None
        if config.kind == "dfs":
            _check_layer_paths(config, dirs[models[0]], source)
        if getattr(config, "split", None):
            _check_split(config, dirs[models[0]], source)
        num_layers = {model: d.num_layers for model, d in dirs.items()}
        space = build_space(config, num_layers=num_layers, source=source, key="space")
        warnings = _start_at(space, dirs[models[0]], experiment.optimizer.name, source) if config.kind == "ps" else []
        candidate = space.decode(space.x0)
        path_models = [m for m in getattr(config, "models", []) if m != MERGED] if config.kind == "dfs" else []
        with keys_under("space", source):
            full = plan_recipe(candidate, dirs, source)  # architectures, tensor shapes, parameters of a candidate
            if len(path_models) > 1:  # a layer path may take any source's layers
                plan_recipe(Recipe(layers=[LayerSlot(source=m, layer=0) for m in path_models]), dirs, source)
            merge = None
            if candidate.merge:  # the merge stage alone (a PS candidate is nothing else)
                merge = full if not candidate.layers else plan_recipe(candidate.model_copy(update={"layers": None}),
                                                                      dirs, source)
        dtype = common_dtype(dirs.values())
        base = _live_base(candidate, models)
        _check_tokenizer(dirs[base], base, source, chat=experiment.evaluation.apply_chat_template)
        warnings += _other_vocabularies(dirs, base, path_models)
        memory = plan_memory(dirs, merge_models=candidate.merge.referenced_models() if merge else [],
                             path_models=path_models, base=base, tasks=merge.tasks if merge else [],
                             dtype=compute_dtype or dtype, device_type=_device_type(experiment.workers.device),
                             batch=_planned_batch(experiment.evaluation.batch_size))
    finally:
        for d in dirs.values():
            d.close()
    return CheckedSpace(config, models, space, dtype, base, tuple(path_models), memory, tuple(warnings))


STARTS_AT_X0 = ("cmaes", "niches")  # the optimizers whose search begins at the space's x0


def _start_at(space, base, optimizer: str, source: str) -> list[str]:
    """`space.start`: x0 moved to the genome of a recipe of the space's method and models (ParameterSpace.started_at,
    over the base's tensor names). Its models are paths relative to the recipe file, or hub ids; the base may also be
    listed among them (mergekit's habit: it adds nothing to a merge that has a base)."""
    from evomerge.paths import model_ref
    from evomerge.recipe import load_recipe

    start, config = space.config.start, space.config
    if start is None:
        return []
    if optimizer not in STARTS_AT_X0:
        raise EvomergeError(f"optimizer {optimizer} does not begin at a genome; start is for {', '.join(STARTS_AT_X0)}",
                            source=source, key="space.start")
    stage = load_recipe(start).merge
    if stage is None or stage.method != config.method:
        found = f"method {stage.method}" if stage else "no merge stage"
        raise EvomergeError(f"{start} has {found}; the space merges by {config.method}", source=source,
                            key="space.start")
    ref = functools.partial(model_ref, base_dir=Path(start).parent)
    base_model = ref(stage.base_model) if stage.base_model else None
    models = [m.model_copy(update={"model": ref(m.model)}) for m in stage.models or [] if ref(m.model) != base_model]
    if base_model != config.base_model or sorted(m.model for m in models) != sorted(config.models):
        raise EvomergeError(f"{start} merges {[m.model for m in models]} into {base_model}; the space merges "
                            f"{config.models} into {config.base_model}", source=source, key="space.start")
    layer_tensors: dict[int, list[tuple[str, ...]]] = {}
    for name in base.tensor_names:
        if (layer := base.arch.layer_of(name)) is not None:
            layer_tensors.setdefault(layer, []).append(base.arch.filter_names(name))
    clipped = space.started_at(stage.model_copy(update={"models": models}), layer_tensors)
    return [f"space.start: {len(clipped)} gene(s) of {start} lie outside the space's bounds and start at the "
            f"nearest one ({', '.join(clipped[:4])}{', ...' if len(clipped) > 4 else ''})"] if clipped else []


def _check_layer_paths(config, model_dir, source: str) -> None:
    """A data-flow search runs its paths on live models of a family whose layers can move, whose written paths its
    config can describe, and searches hidden-state scales only where the written model can hold them (folded into the
    output projections)."""
    arch = model_dir.arch
    if arch.fixed_layers:
        raise EvomergeError(f"a data-flow search moves and repeats layers, which {arch.name} models cannot "
                            f"({arch.fixed_layers})", source=source, key="space.kind")
    # paths a search may try, which a config may have no way to describe: each layer, from the last, before all of them
    # (a dense layer after one of experts; GLM-5 starting with a layer that has no indexer of its own)
    n = model_dir.num_layers
    try:
        for first in reversed(range(n)):
            arch.set_num_layers(model_dir.config, n + 1, source_layers=[first, *range(n)])
    except EvomergeError as err:
        raise EvomergeError(f"a data-flow search would try paths no written {arch.name} model can describe: "
                            f"{err.message}", source=source, key="space.kind") from None
    if config.scale != "none" and not arch.output_projections:
        raise EvomergeError(f"hidden-state scales cannot be folded into {arch.name} weights (the winner would be written "
                            f"without them); use scale: none", source=source, key="space.scale")


def _check_split(config, model_dir, source: str) -> None:
    """`split` gives the tensors each filter matches their own genes (mergekit filters, by substring): a filter that
    matches no tensor, or `attn_mlp` on a family that names its attention otherwise, would leave genes unused."""
    from evomerge.spaces.ps import ATTN_MLP

    arch, names = model_dir.arch, model_dir.tensor_names
    if config.split == "attn_mlp":
        other = [n for n in names if arch.block_of(n) == "attn" and ATTN_MLP[0] not in n]
        if other:
            raise EvomergeError(f"split: attn_mlp finds attention tensors by the name {ATTN_MLP[0]!r}; {arch.name} "
                                f"names them otherwise ({other[0]}), so their genes would go unused", source=source,
                                key="space.split")
    aliases = [arch.filter_names(n) for n in names]  # what a filter matches (Architecture.filter_names)
    for position, name in enumerate(config.filters):
        matched = [tensor for tensor in aliases if any(name in n for n in tensor)]
        if not matched:
            raise EvomergeError(f"filter {name!r} matches no tensor of {model_dir.path} (e.g. {names[0]}), so its "
                                "genes would go unused", source=source, key="space.split")
        if all(any(f in n for f in config.filters[:position] for n in tensor) for tensor in matched):
            raise EvomergeError(f"every tensor filter {name!r} matches is taken by a filter before it (the first that "
                                "matches wins), so its genes would go unused", source=source, key="space.split")


def _planned_batch(batch_size: int | str) -> int:
    """The evaluation batch the memory plan reserves for: the configured one; `auto` finds the largest that fits, and
    the plan assumes the default."""
    from evomerge.run.memory import EVAL_BATCH

    return batch_size if isinstance(batch_size, int) else EVAL_BATCH


def _check_tokenizer(model_dir, model: str, source: str, *, chat: bool) -> None:
    """The search scores with the tokenizer of its live base model, which its winners ship: its tokenizer_config.json
    must read (else every trial fails), and with `chat` (apply_chat_template) it needs a chat template."""
    from evomerge.models.io import chat_template_of, tokenizer_config

    if (model_dir.path / "tokenizer_config.json").is_file():
        tokenizer_config(model_dir.path / "tokenizer_config.json", source)
    if chat and model_dir.has_tokenizer and chat_template_of(model_dir, source) is None:
        raise EvomergeError(f"the tokenizer of {model}, which the search scores with and its winners ship, has no chat "
                            f"template (add one to its tokenizer_config.json or chat_template.jinja)", source=source,
                            key="evaluation.apply_chat_template")


def _other_vocabularies(dirs: dict, base: str, path_models: list[str]) -> list[str]:
    """A search scores every layer path with its live base model's tokenizer, while a winning path ships the tokenizer
    of its first slot's source (as mergekit does): a warning for each path model whose vocabulary differs."""
    from evomerge.models.vocab import vocabulary

    scored = vocabulary(dirs[base])
    return [f"space.models: the vocabulary of {m} differs from that of {base}, whose tokenizer the search scores every "
            f"layer path with; a winner whose path starts in {m} ships {m}'s tokenizer, which its scores did not use"
            for m in path_models if m != base and vocabulary(dirs[m]) != scored]


def _live_base(candidate: Recipe, models: list[str]) -> str:
    """The model a worker's live merged model starts from: the merge stage's base, else the first model."""
    stage = candidate.merge
    return (stage.base_model if stage is not None and stage.base_model else None) or models[0]


def _device_type(device: str) -> str:
    import torch

    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        return device  # check_device names the bad value


def _model_key(config, model: str) -> str:
    if getattr(config, "base_model", None) == model:
        return "space.base_model"
    return "space.models" if model in getattr(config, "models", []) else "space.merge"


def check_workers(workers: WorkersConfig, source: str) -> None:
    """The device exists here (a local pool, or the local Ray cluster a search starts), and a Ray address answers."""
    if workers.backend == "ray" and workers.ray_address:
        check_ray_address(workers.ray_address, source)  # the cluster's devices are checked once it is joined (pool)
    else:
        from evomerge.models.io import check_device

        check_device(workers.device, source=source, key="workers.device")


def check_ray_address(address: str, source: str, key: str = "workers.ray_address") -> None:
    """A TCP connection to the cluster's address, at most a few seconds (Ray itself retries for minutes)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise EvomergeError(f"not a Ray address: {address!r} (HOST:PORT, e.g. 127.0.0.1:6379)", source=source, key=key)
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise EvomergeError(f"nothing answers at {address} ({reason}); is the cluster running (`ray status`)?",
                            source=source, key=key) from None
