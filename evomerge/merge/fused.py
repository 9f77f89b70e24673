"""The methods' element-wise math fused into single kernels by torch.compile (Triton on a GPU, C++ on CPU).

Eager torch runs every op as its own pass over memory, on float32 copies: a linear merge of three bf16 models moves ~64
bytes per element where reading each input once and writing the result (8 bytes) is the floor. A function marked
`@fusible` is pure tensor math (the methods' tails, with their selections off the host); with fusion on, inductor turns
it into one loop per reduction or output that reads every input once. Per-candidate numbers enter as Python floats,
which dynamo passes as kernel arguments, so a new candidate reuses the compiled kernel: one compilation per function,
number of models, dtype and flags; shapes are dynamic. Inside the graph each float becomes a 0-dim tensor first: torch
2.13's inductor kept the first call's value of `t` in `where(c, t, t * theta)` with a symbolic float t and a 0-dim theta
(tests/test_fused.py calls every kernel again with other numbers). While tracing, `host.on_host` is False, so the code
takes its device paths (no numpy, no sync).

Fusion is on by default for tensors on a GPU, and on CPU for tensors of HOST_MIN_NUMEL entries or more: below that
(the toy zoo) dynamo's cost per call eats the saving (same ms per candidate either way), above it fewer passes win
(126M-param shape, one thread: ties 3.6 -> 1.0 s, dare_ties 2.7 -> 0.6 s). `fuse(True)` / `fuse(False)` force it on or
off everywhere (tests, `bench_merge.py --fuse`).

Batches: a compiled call costs the host tens of microseconds (dynamo's guards, the wrapper, our Python), more than a
GPU needs for a typical tensor of a 1B model at the bandwidth floor (~17 us), so a candidate of one call per tensor
would be host-bound. Inside `batched()` (the live materializer wraps each window of tensors in it) a method's last
fused step, a `tail`, is deferred on a GPU; at the end the calls of one function and argument structure (shapes
included) run MAX_BATCH at a time as one compiled call, and each `Deferred` gets its value. Batches come in powers of
two, so a kind of call has a few variants; each compiles once per process (slowly: the graph holds every call).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch

from evomerge.merge.host import on_host

_forced: bool | None = None  # None: the default below
HOST_MIN_NUMEL = 2**20
# variants of one function: models x dtypes x flags x which models have bounds (a density clipped to 0 or 1 drops them);
# past dynamo's default of 8 a new variant would not compile
RECOMPILE_LIMIT = 256


def fuse(enabled: bool | None = True) -> None:
    """Force fusion on (True) or off (False) on every device; None restores the default."""
    global _forced
    _forced = enabled


def fusing(x: torch.Tensor) -> bool:
    """Whether math on `x` runs fused (never while already tracing: the caller's graph holds it)."""
    if torch.compiler.is_compiling():
        return False
    if _forced is None:
        return not on_host(x) or x.numel() >= HOST_MIN_NUMEL
    return _forced


def _first_tensor(args) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    raise TypeError("a fusible function takes a tensor or a list of tensors")


def _tensor_floats(v, device: torch.device):
    """`v` (arguments, nested in lists, tuples and dicts) with every Python float as a 0-dim float64 tensor on
    `device`. Called inside the compiled graph: the floats are its inputs (kernel arguments, nothing to copy), and the
    math on them is tensor math (works around the miscompile above)."""
    if isinstance(v, float):
        return torch.full((), v, dtype=torch.float64, device=device)
    if isinstance(v, tuple) and hasattr(v, "_fields"):  # a NamedTuple
        return type(v)(*(_tensor_floats(x, device) for x in v))
    if isinstance(v, (list, tuple)):
        return type(v)(_tensor_floats(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _tensor_floats(x, device) for k, x in v.items()}
    return v


def _own_code(fn, name: str):
    """fn with a code object of its own: dynamo keeps compiled variants, and counts them against its limit, per code
    object."""
    fn.__code__ = fn.__code__.replace(co_name=name)
    return fn


class _Compiled:
    """`fn` compiled on first use (fullgraph, dynamic shapes), called with its floats as tensors. A compiler failure
    warns once and leaves it to `fallback` (default: `fn` eagerly): a search must not die for want of a kernel."""

    def __init__(self, fn, name: str, fallback=None):
        self.fn, self.name, self.compiled = fn, name, None
        self.fallback = fallback or (lambda device, *args: fn(*args))

    def __call__(self, device: torch.device, *args):
        if self.compiled is False:
            return self.fallback(device, *args)
        if self.compiled is None:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)
            traced = lambda device, *args: self.fn(*_tensor_floats(args, device))  # noqa: E731
            self.compiled = torch.compile(_own_code(traced, f"fused_{self.name}"), dynamic=True, fullgraph=True)
        try:
            return self.compiled(device, *args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:  # one variant too many: this one runs the fallback
            return self.fallback(device, *args)
        except torch._dynamo.exc.TorchDynamoException as err:  # compiler errors; errors of fn itself are not caught
            warnings.warn(f"{self.name} runs unfused: torch.compile failed ({type(err).__name__}: {err})")
            self.compiled = False
            return self.fallback(device, *args)


def fusible(fn=None, *, tail: bool = False):
    """Run `fn` compiled when `fusing` its first tensor argument, else eagerly. A `tail` (a method's last step: its
    result is the method's result, untouched) called inside `batched()` on a device other than the host is deferred
    and batched with its kind (on CPU the kernels take longer than the call, and batches compile slowly)."""
    if fn is None:
        return functools.partial(fusible, tail=tail)
    one = _Compiled(lambda args, kwargs: fn(*args, **kwargs), fn.__name__)
    batch = _Compiled(lambda calls: [fn(*args, **kwargs) for args, kwargs in calls], f"{fn.__name__}_batch",
                      fallback=lambda device, calls: [one(device, *call) for call in calls])  # one by one

    @functools.wraps(fn)
    def run(*args, **kwargs):
        x = _first_tensor(args)
        if not fusing(x):
            return fn(*args, **kwargs)
        if tail and _deferred is not None and not on_host(x) and MAX_BATCH > 1:
            _deferred.append(call := Deferred(one, batch, args, kwargs, x.device))
            return call
        return one(x.device, args, kwargs)

    return run


# ---------------------------------------------------------------------------------------------------------------------
# batches (see the module's docstring)


@dataclass
class Deferred:
    """A tail's call inside `batched()`; `value` is its result once the batch has run."""

    one: _Compiled  # the tail, compiled for one call
    batch: _Compiled  # ... for a list of calls
    args: tuple
    kwargs: dict
    device: torch.device
    value: torch.Tensor | None = None


_deferred: list[Deferred] | None = None  # inside `batched()`: the tail calls waiting
MAX_BATCH = 8  # calls per compiled batch; batches run in powers of two, so a kind has at most 4 variants


@contextlib.contextmanager
def batched():
    """Defer the fused tails called inside; at the end run the calls of one function and argument structure (shapes,
    dtypes, list lengths, flags) in compiled batches, and set each `Deferred.value`."""
    global _deferred
    outer, _deferred = _deferred, []
    try:
        yield
        calls = _deferred
    finally:
        _deferred = outer
    kinds: dict[tuple, list[Deferred]] = {}
    for call in calls:
        kinds.setdefault((call.batch, call.device, _structure(call.args, call.kwargs)), []).append(call)
    for group in kinds.values():
        one, batch, device = group[0].one, group[0].batch, group[0].device
        while group:
            size = min(MAX_BATCH, 1 << (len(group).bit_length() - 1))
            part, group = group[:size], group[size:]
            calls = [(c.args, c.kwargs) for c in part]
            values = batch(device, calls) if size > 1 else [one(device, *calls[0])]  # one: a variant less
            for call, value in zip(part, values):
                call.value = value


def _structure(args: tuple, kwargs: dict) -> tuple:
    """What a batch shares: its tensors' shapes and dtypes (exact shapes: every batch of a kind then has the same
    pattern of equal sizes, which dynamo's guards specialize on), list and tuple lengths, and the values of non-floats.
    Arguments are tensors, numbers, flags or lists and tuples of them."""

    def structure(v):  # runs for every argument of every deferred call: exact types first (~1.5x faster)
        kind = type(v)
        if kind is torch.Tensor:
            return v.shape, v.dtype
        if kind is float:
            return float
        if kind is list or kind is tuple:
            return kind, tuple([structure(x) for x in v])
        if isinstance(v, torch.Tensor):
            return v.shape, v.dtype
        if isinstance(v, tuple):  # NamedTuples (sparsify.Rank)
            return kind, tuple([structure(x) for x in v])
        return v

    return tuple([structure(a) for a in args]), tuple([(k, structure(v)) for k, v in kwargs.items()])


def resolved(value):
    """A method's result: the tensor, also for a tail that was deferred inside `batched()` (after the batch)."""
    return value.value if isinstance(value, Deferred) else value
