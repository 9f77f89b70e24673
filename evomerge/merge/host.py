"""Steps that run on the host when the tensors are there, and as device ops everywhere else.

On CPU a few steps are much faster in numpy or plain Python than as torch ops: selecting a k-th value, sorting, the
mask hash, and the scalar math on per-tensor statistics (a norm, a dot product, an L1 sum), where 0-dim tensor ops
dominate the cost of merging small tensors. On any other device those steps stay torch ops on the device: reading a
result there would wait for the device and stall its queue of kernels. `on_host` is the one switch (tests turn it off
to run the device paths on CPU); `scalar` reads a statistic where that is free, and `math_for(x)` is the matching
namespace (the few math functions the methods use, with torch's names, so one formula serves floats and tensors).
"""

from __future__ import annotations

import math

import torch

HOST_DEVICE_TYPES = ("cpu",)


def on_host(x: torch.Tensor | torch.device | str) -> bool:
    """Whether `x` (a tensor, or a device) lives where numpy and Python can read it for free (never while torch.compile
    traces: a fused kernel takes the device path)."""
    if torch.compiler.is_compiling():
        return False
    device = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    return device.type in HOST_DEVICE_TYPES


def scalar(x: torch.Tensor) -> torch.Tensor | float:
    """A 0-dim statistic, as a Python float on the host, else as the tensor."""
    return x.item() if on_host(x) else x


class HostMath:
    """torch.acos / sin / where / clamp for Python floats."""

    acos, sin = staticmethod(math.acos), staticmethod(math.sin)

    @staticmethod
    def where(condition: bool, x: float, y: float) -> float:
        return x if condition else y

    @staticmethod
    def clamp(x: float, min: float = -math.inf, max: float = math.inf) -> float:  # noqa: A002 (torch's names)
        return x if math.isnan(x) else float(min) if x < min else float(max) if x > max else x


def math_for(x: torch.Tensor | float):
    """The namespace for math on `x`: torch for a tensor, HostMath for a number."""
    return torch if isinstance(x, torch.Tensor) else HostMath
