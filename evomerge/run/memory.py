"""The memory plan of a search: what one worker needs on its device, and a node in host memory, for each `workers.sources`.

Every figure comes from the models' safetensors headers (dtype x shape of each tensor; no weight is read) and the base
model's config.json, in the compute dtype (`workers.dtype`, else the sources' own):

- sources: every tensor of every source model the merge reads; as stored (`stored`) and in the compute dtype.
- path sources: the models whose layers a layer path runs (DFS). Whole on the device in every mode.
- live model: the one merged model a worker writes each candidate into (the base's tensors).
- evaluation reserve (per worker), for a batch of B sequences (`evaluation.batch_size`; EVAL_BATCH when `auto`) of T
  tokens (EVAL_TOKENS), e bytes per value:
      KV cache      B T x 2 (K, V) x layers x kv_heads x head_dim x e
    + activations   max(B T x intermediate x 3 e  (one MLP: gate, up, their product),
                        B T x vocab x 2 e         (the logits and their log-softmax, as lm-eval's loglikelihood scores))
    + hidden        B T x hidden x 2 e            (the residual stream and its normed copy)
- merge: the largest tensor task's inputs (one output tensor is computed at a time): the method's temporaries are
  estimated at that size (all modes), and `host`/`disk` hold the inputs' device copies too (twice that).
- moved per candidate: what `host`/`disk` copy to the device when every tensor is recomputed (incremental
  materialization moves only the inputs of the tensors whose task changed); `device` copies nothing.

Host memory per node, all `workers` on one node: `disk` maps the files (one copy in the page cache, shared); `host` the
same for tensors stored in the compute dtype and a private converted copy per worker for the others; `device` holds
nothing in host memory after loading. On a CPU worker the device is host memory: its device total counts per worker
(an upper bound for `device`: transformers' from_pretrained maps tensors stored in the compute dtype instead of copying
them, so there the workers of a node share those too; benchmarks/README.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from evomerge.errors import EvomergeError
from evomerge.sizes import format_size as fmt

MODES = ("device", "host", "disk")
EVAL_BATCH = 64  # the batch planned for when `evaluation.batch_size` is auto (its default when a number)
EVAL_TOKENS = 1024  # prompt + generated tokens per sequence (lm-eval stops generating at 256 new tokens by default)


@dataclass(frozen=True)
class Reserve:
    """The evaluation reserve's terms, in bytes, and the model shape they come from."""
    kv_cache: int
    layer: int  # one MLP's intermediates
    head: int  # the logits and their log-softmax
    hidden: int
    shape: str  # "32 layers x 8 kv heads x 128 head_dim, hidden 4096, intermediate 14336, vocab 32000, 2 bytes"
    batch: int = EVAL_BATCH  # sequences per evaluation batch

    @property
    def total(self) -> int:
        return self.kv_cache + max(self.layer, self.head) + self.hidden

    def formula(self) -> str:
        return (f"KV cache {fmt(self.kv_cache)} + activations max(MLP {fmt(self.layer)}, logits {fmt(self.head)}) + "
                f"hidden states {fmt(self.hidden)}, for {self.batch} sequences x {EVAL_TOKENS} tokens ({self.shape})")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes, from the headers (see the module doc). Frozen and small: it travels to Ray workers with their spec."""
    stored: int  # the merge's sources off the device in host/disk (not layer-path sources), as stored
    sources: int  # the same in the compute dtype
    host_shared: int  # `host`: the tensors kept as views of the mapping (stored in the compute dtype)
    host_private: int  # `host`: the tensors converted into a worker's own memory
    path_sources: int  # layer-path sources, compute dtype
    all_sources: int  # every model a worker opens (merge and path sources), compute dtype: `device` holds them all
    live: int
    merge: int  # the largest task's inputs, compute dtype
    moved_host: int  # per candidate, every tensor recomputed: inputs in the compute dtype
    moved_disk: int  # the same as stored (converted on the device)
    reserve: Reserve
    device_type: str  # cpu, cuda, ...
    dtype: str  # the compute dtype ("stored": each tensor's own)

    def device(self, mode: str) -> dict[str, int]:
        """One worker's device memory by component."""
        if mode == "device":
            return {"sources": self.all_sources, "live model": self.live, "evaluation reserve": self.reserve.total,
                    "merge": self.merge}
        return {"sources": self.path_sources, "live model": self.live, "evaluation reserve": self.reserve.total,
                "merge": 2 * self.merge}

    def device_total(self, mode: str) -> int:
        return sum(self.device(mode).values())

    def host(self, mode: str, workers: int) -> int:
        """Host memory of a node running `workers` workers: the sources' host copies (and, on CPU, the device's)."""
        shared, private = {"device": (0, 0), "host": (self.host_shared, self.host_private), "disk": (self.stored, 0)}[mode]
        if self.device_type == "cpu":
            private += self.device_total(mode)
        return shared + workers * private

    def moved(self, mode: str) -> int:
        return {"device": 0, "host": self.moved_host, "disk": self.moved_disk}[mode]


def plan_memory(dirs: dict, *, merge_models: list[str], path_models: list[str], base: str, tasks: list, dtype,
                device_type: str, batch: int = EVAL_BATCH) -> MemoryPlan:
    """The plan over open ModelDirs (headers only): `tasks` are a candidate's merge tasks (merge.plan.TensorTask),
    `dtype` the compute dtype (None: each tensor's own), `base` the live merged model's source."""

    def nbytes(model: str, name: str, stored: bool = False) -> int:
        own = dirs[model].dtype(name)
        return math.prod(dirs[model].shape(name)) * (own if stored or dtype is None or not own.is_floating_point else dtype).itemsize

    def model_bytes(model: str, stored: bool = False) -> int:
        return sum(nbytes(model, n, stored) for n in dirs[model].tensor_names)

    def converted(model: str, name: str) -> bool:
        own = dirs[model].dtype(name)
        return dtype is not None and own.is_floating_point and own != dtype

    refs = [((t.base,) if t.base else ()) + t.inputs for t in tasks]  # what each task reads
    opened = list(dict.fromkeys(merge_models + path_models))
    # a merge source whose layers a layer path runs is on the device anyway: host and disk read it from there
    off_device = [m for m in merge_models if m not in path_models]
    host_names = [(m, n) for m in off_device for n in dirs[m].tensor_names]
    moved = [ref for r in refs for ref in r if ref[0] in off_device]
    return MemoryPlan(
        stored=sum(model_bytes(m, stored=True) for m in off_device),
        sources=sum(model_bytes(m) for m in off_device),
        host_shared=sum(nbytes(m, n, stored=True) for m, n in host_names if not converted(m, n)),
        host_private=sum(nbytes(m, n) for m, n in host_names if converted(m, n)),
        path_sources=sum(model_bytes(m) for m in path_models),
        all_sources=sum(model_bytes(m) for m in opened),
        live=model_bytes(base),
        merge=max((sum(nbytes(*ref) for ref in r) for r in refs), default=0),
        moved_host=sum(nbytes(*ref) for ref in moved),
        moved_disk=sum(nbytes(*ref, stored=True) for ref in moved),
        reserve=evaluation_reserve(dirs[base], dtype, batch),
        device_type=device_type,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else "stored",
    )


def evaluation_reserve(model_dir, dtype, batch: int = EVAL_BATCH) -> Reserve:
    """The reserve's terms (module doc) from the model's config.json, as transformers reads it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir.path)).get_text_config()  # an image-text model's text model
    layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    e = (dtype or model_dir.dtype(model_dir.tensor_names[0])).itemsize
    tokens = batch * EVAL_TOKENS
    if heads := getattr(config, "num_attention_heads", None):
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        cache, cache_shape = tokens * 2 * layers * kv_heads * head_dim * e, f"{kv_heads} kv heads x {head_dim} head_dim"
    else:  # a state-space model (Mamba): per layer and sequence a state of fixed size, whatever the tokens
        state = config.state_size + config.conv_kernel
        cache, cache_shape = batch * layers * intermediate * state * e, f"a state of {intermediate} x {state}"
    return Reserve(kv_cache=cache, layer=tokens * intermediate * 3 * e, head=tokens * vocab * 2 * e,
                   hidden=tokens * hidden * 2 * e, shape=f"{layers} layers x {cache_shape}, hidden {hidden}, "
                                                        f"intermediate {intermediate}, vocab {vocab}, {e} bytes", batch=batch)


def device_capacity(workers) -> int | None:
    """The memory of one worker's device as the search sees it from here (a WorkersConfig): `device_memory` when
    given; CUDA: the device's total memory (None on a cluster joined by address: each worker measures its own); CPU:
    this machine's RAM shared equally by the workers."""
    if workers.device_memory is not None:
        return workers.device_memory
    import torch

    kind = torch.device(workers.device)
    if kind.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // workers.num
    if kind.type == "cuda" and not (workers.backend == "ray" and workers.ray_address):
        return measured_capacity(workers.device)
    return None


def measured_capacity(device: str) -> int | None:
    """A CUDA device's total memory (None for other kinds)."""
    import torch

    kind = torch.device(device)
    if kind.type != "cuda":
        return None
    return torch.cuda.get_device_properties(kind.index or 0).total_memory


def choose_sources(requested: str, plan: MemoryPlan, capacity: int | None, *, source: str | None = None) -> str:
    """The sources mode a worker uses: `auto` is device when the plan fits `capacity`, else host (on CPU, host: the
    device is host memory, so host merges alike with one copy per node; unknown capacity: host). `device` that does
    not fit is an error with the numbers."""
    fits = capacity is not None and plan.device_total("device") <= capacity
    if requested == "device" and capacity is not None and not fits:
        raise EvomergeError(f"device needs {_breakdown(plan, 'device')} per worker, more than the {fmt(capacity)} of its "
                            f"{plan.device_type} device; use host or disk ({fmt(plan.device_total('host'))} per worker), "
                            "or auto", source=source, key="workers.sources")
    if requested != "auto":
        return requested
    return "device" if fits and plan.device_type != "cpu" else "host"


def _breakdown(plan: MemoryPlan, mode: str) -> str:
    parts = plan.device(mode)
    return f"{fmt(sum(parts.values()))} (" + " + ".join(f"{name} {fmt(v)}" for name, v in parts.items()) + ")"


def describe(plan: MemoryPlan, workers, capacity: int | None) -> str:
    """The plan as `evomerge plan` prints it: the inputs, then a Markdown table with one row per sources mode."""
    n = workers.num
    lines = [f"workers: {n} {workers.backend} worker(s) on {workers.device}, device memory per worker "
             + (fmt(capacity) if capacity is not None else "unknown here (each worker measures its own)"),
             f"sources off the device (host, disk): {fmt(plan.stored)} as stored, {fmt(plan.sources)} in the compute "
             f"dtype ({plan.dtype}); layer-path sources {fmt(plan.path_sources)}; live model {fmt(plan.live)}; the "
             f"largest tensor task's inputs {fmt(plan.merge)}",
             f"evaluation reserve {fmt(plan.reserve.total)} = {plan.reserve.formula()}",
             "",
             f"| sources | on the device: sources | live model | evaluation reserve | merge | total per worker | fits | "
             f"host memory per node ({n} workers) | moved per candidate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        total = plan.device_total(mode)
        fits = "?" if capacity is None else ("yes" if total <= capacity else "no")
        lines.append(f"| {mode} | " + " | ".join(fmt(v) for v in plan.device(mode).values())
                     + f" | {fmt(total)} | {fits} | {fmt(plan.host(mode, n))} | {fmt(plan.moved(mode))} |")
    auto = ""
    if workers.sources == "auto":
        auto = (f" -> {choose_sources('auto', plan, capacity)} here" if capacity is not None
                else " (each worker picks by its device's memory)")
    return "\n".join(lines + ["", f"workers.sources: {workers.sources}{auto}"])
