"""The one optional acceleration, off by default (`workers.compile`, `compile=True` of the materializers): the
task-arithmetic family's element-wise part (`methods.task_arithmetic_mix`) under torch.compile.

Eager torch makes a pass over memory per op (TIES ~30 per tensor, DARE's hash 28 more per model); compiled, the mix is
a few loops that read each input once and hash DARE/DELLA's draws in registers (the same integer bits, so the same
masks). Selections and sorts stay eager. A candidate's numbers enter as 0-dim tensors, so a new candidate reuses the
code; dynamo compiles once per member, model count, dtype, flags and which models are kept whole or dropped.
"""

from __future__ import annotations

import functools
import warnings

import torch

from evomerge.merge.methods import TASK_ARITHMETIC_FAMILY, task_arithmetic_mix
from evomerge.merge.registry import METHODS

MIN_NUMEL = 2**16  # smaller tensors run eagerly: a compiled call's overhead exceeds their gain (and 1-D ones need graphs)


def _as_tensors(value):
    """Every Python float in `value` (lists, dicts) as a 0-dim float64 CPU tensor: dynamo would specialize a float."""
    if isinstance(value, (list, tuple)):
        return type(value)(_as_tensors(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_tensors(v) for k, v in value.items()}
    return torch.tensor(value, dtype=torch.float64) if isinstance(value, float) else value


class CompiledMethods:
    """The method functions of a materializer with the switch on; a compiler failure warns once and runs eagerly."""

    def __init__(self, min_numel: int = MIN_NUMEL):
        self.min_numel = min_numel
        self.mix = torch.compile(task_arithmetic_mix, dynamic=True, fullgraph=True)

    def fn(self, method: str):
        fn = METHODS[method].fn
        return functools.partial(fn, mix=self._mix) if method in TASK_ARITHMETIC_FAMILY else fn

    def _mix(self, b: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.mix is not None and b.numel() >= self.min_numel:
            try:
                with torch._dynamo.config.patch(recompile_limit=64):  # the variants above, for a few methods
                    return self.mix(b, *_as_tensors(args), **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as err:
                warnings.warn(f"the merge runs eagerly: torch.compile failed ({err})")
                self.mix = None
        return task_arithmetic_mix(b, *args, **kwargs)
