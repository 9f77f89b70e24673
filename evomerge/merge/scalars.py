"""Scalar math on per-tensor statistics (a norm, a dot product, an L1 sum) without waiting for the device.

On CPU a 0-dim result is read as a Python float: reading it is free there, and Python math is ~20x faster than 0-dim
tensor ops, which dominate the cost of merging small tensors. Elsewhere the statistic stays a 0-dim tensor, as reading
it would wait for the device and stall the queue of kernels. `math_for(x)` is the matching namespace: the few
math functions the methods use, with torch's names, so one formula serves both.
"""

from __future__ import annotations

import math

import torch

READABLE_DEVICES = ("cpu",)  # device types whose 0-dim results are read as Python floats


def scalar(x: torch.Tensor) -> torch.Tensor | float:
    """A 0-dim statistic, as a Python float where reading it is free, else as the tensor."""
    return x.item() if x.device.type in READABLE_DEVICES else x


class HostMath:
    """torch.acos / sin / where / clamp for Python floats."""

    acos, sin = staticmethod(math.acos), staticmethod(math.sin)

    @staticmethod
    def where(condition: bool, x: float, y: float) -> float:
        return x if condition else y

    @staticmethod
    def clamp(x: float, min: float = -math.inf, max: float = math.inf) -> float:  # noqa: A002 (torch's names)
        return x if math.isnan(x) else min if x < min else max if x > max else x


def math_for(x: torch.Tensor | float):
    """The namespace for math on `x`: HostMath for a float, torch for a tensor."""
    return HostMath if isinstance(x, float) else torch
