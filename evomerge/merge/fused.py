"""The methods' element-wise math fused into single kernels by torch.compile (Triton on a GPU, C++ on CPU).

Eager torch runs every op as its own pass over memory, on float32 copies: a linear merge of three bf16 models moves
~64 bytes per element where reading each input once and writing the result (8 bytes) is the floor. A function marked
`@fusible` is pure tensor math (the methods' tails, after their selections); with fusion on, inductor turns it into one
loop per reduction or output that reads every input once. Per-candidate numbers enter as Python floats, which dynamo
passes as kernel arguments, so a new candidate reuses the compiled kernel: one compilation per function, number of
models, dtype and flags; shapes are dynamic. Inside the graph each float becomes a 0-dim tensor first: torch 2.13's
inductor kept the first call's value of `t` in `where(c, t, t * theta)` with a symbolic float t and a 0-dim theta
(tests/test_fused.py calls every kernel again with other numbers). While tracing, `host.on_host` is False, so the
code takes its device paths (no numpy, no sync).

Fusion is on by default for tensors on a GPU, and on CPU for tensors of HOST_MIN_NUMEL entries or more: below that
(the toy zoo) dynamo's cost per call eats the saving (same ms per candidate either way), above it fewer passes win
(126M-param shape, one thread: ties 3.6 -> 1.0 s, dare_ties 2.7 -> 0.6 s). `fuse(True)` / `fuse(False)` force it on or
off everywhere (tests, `bench_merge.py --fuse`).
"""

from __future__ import annotations

import functools
import warnings

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


def _with_tensor_floats(fn):
    """fn with its float arguments (also in lists) as 0-dim float64 tensors on the device of its first tensor."""

    def call(*args, **kwargs):
        device = _first_tensor(args).device

        def as_tensor(v):
            return torch.full((), v, dtype=torch.float64, device=device) if isinstance(v, float) else v

        def convert(v):
            return [as_tensor(x) for x in v] if isinstance(v, list) else as_tensor(v)

        return fn(*map(convert, args), **{k: convert(v) for k, v in kwargs.items()})

    # dynamo keeps compiled variants (and counts them against its limit) per code object: one of its own for each fn
    call.__code__ = call.__code__.replace(co_name=f"fused_{fn.__name__}")
    return call


def fusible(fn):
    """Run `fn` compiled (fullgraph, dynamic shapes) when `fusing` its first tensor argument, else eagerly. A compiler
    failure warns once and leaves `fn` eager: a search must not die for want of a kernel."""
    compiled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        if compiled is False or not fusing(_first_tensor(args)):
            return fn(*args, **kwargs)
        if compiled is None:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)
            compiled = torch.compile(_with_tensor_floats(fn), dynamic=True, fullgraph=True)
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:  # one variant too many: this one runs eagerly
            return fn(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as err:  # compiler errors; errors of fn itself are not caught
            warnings.warn(f"{fn.__name__} runs unfused: torch.compile failed ({type(err).__name__}: {err})")
            compiled = False
            return fn(*args, **kwargs)

    return run
