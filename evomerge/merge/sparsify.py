"""Sparsifiers: which entries of a task vector (delta = model - base) survive before the deltas are mixed.

Semantics of mergekit 0.1.5 `sparsify.py`: density >= 1 keeps the delta unchanged (no rescale), density <= 0 drops
it; otherwise a sparsifier picks a 0/1 mask, and with `rescale` the kept entries are scaled to keep the delta's L1
norm (`rescale_factor`). Thresholds come from selection (`kth_smallest`), never from sorting the whole tensor, and
exact ties at a threshold are always kept, so the result is the same on every device. Random masks compare the
delta's uniform draws `u` (`evomerge.merge.rng`, never the torch global RNG) with a keep probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

Tensor = torch.Tensor


def work_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype the methods compute in: float64 if any input is, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def indicator(compare: Callable, a: Tensor, b: Tensor | float, dtype: torch.dtype) -> Tensor:
    """compare(a, b) (torch.ge, torch.lt, ...) as 0/1 of `dtype`, the shape of a: on CPU a bool result costs several
    times as much to write, to convert and to multiply by."""
    return compare(a, b, out=torch.empty(a.shape, dtype=dtype, device=a.device))


def kth_smallest(values: Tensor, k: int) -> Tensor:
    """The k-th smallest (1-based) of `values` (float32/64) over the whole tensor, a 0-dim tensor, by selection: numpy's
    introselect on CPU (much faster there than torch.kthvalue), torch.kthvalue elsewhere. NaN counts as largest.
    `values` may be reordered: the selection runs in place (copying a large tensor costs a third of the selection)."""
    flat = values.reshape(-1)
    if flat.device.type == "cpu":
        flat.numpy().partition(k - 1)
        return flat[k - 1].clone()
    return torch.kthvalue(flat, k).values


def kth_largest(values: Tensor, k: int) -> Tensor:
    return kth_smallest(values, values.numel() - k + 1)


def magnitude(delta: Tensor, density: float) -> dict:
    """TIES: keep the k = max(1, int(density * numel)) largest |delta| over the whole tensor: |delta| >= low.

    Every |delta| >= the k-th largest |delta| is kept: entries tied with it are all kept, so more than k survive only
    when there are exact ties at the threshold (mergekit's argsort keeps an arbitrary k of them).
    """
    mag = delta.abs_()
    return {"low": kth_largest(mag, max(1, int(density * mag.numel())))}


def magnitude_outliers(delta: Tensor, density: float, *, gamma: float) -> dict | bool:
    """Model Breadcrumbs: drop the int(gamma * numel) largest |delta| (outliers), keep the next int(density * numel):
    low <= |delta| <= high.

    Fewer outliers are dropped when both do not fit (mergekit 0.1.5). In ascending order of |delta| the kept entries
    are ranks skip+1 .. skip+keep; both ends are thresholds and ties at either end are kept. With no outlier to drop
    the top `keep` entries survive (older mergekit's `indices[n_bot:-0]` zeroed everything there).
    """
    n = delta.numel()
    keep, top = int(density * n), max(0, int(gamma * n))
    if keep <= 0:
        return False
    skip = max(0, n - keep - top)  # the smallest entries dropped
    mag = delta.abs_()
    return {"low": kth_smallest(mag, skip + 1), "high": kth_smallest(mag, skip + keep)}


def within(delta: Tensor, *, low: Tensor, high: Tensor | None = None) -> Tensor:
    """low <= |delta| (<= high)."""
    mask = indicator(torch.ge, delta.abs(), low, delta.dtype)
    return mask if high is None else mask.mul_(indicator(torch.le, delta.abs(), high, delta.dtype))


def bernoulli(delta: None, density: float) -> dict:
    """DARE: keep each entry independently with probability `density` (by its U[0, 1) draw u): u < density."""
    return {"p": density}


def della_magprune(delta: Tensor, density: float, *, epsilon: float) -> dict:
    """DELLA MagPrune: keep with probability p = density - epsilon + 2 epsilon rank / (n - 1): u < p, rank (from 0) by
    |delta| among the n entries of its row along dim 1 (as mergekit's argsort(dim=1); a 1-D tensor is one row). Ties
    rank by position (a stable sort). A row of one entry gets the middle probability `density` (mergekit divides 0 by 0).
    """
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"DELLA needs density +/- epsilon in (0, 1); got density {density}, epsilon {epsilon}")
    rows = delta.abs_() if delta.ndim >= 2 else delta.abs_().reshape(1, -1)
    n = rows.shape[1]
    rank = row_ranks(rows).to(rows.dtype)
    rank_norm = rank / (n - 1) if n > 1 else torch.full_like(rank, 0.5)
    return {"p": density - epsilon + rank_norm.reshape(delta.shape) * (2 * epsilon)}


def drawn(delta: Tensor, *, p: Tensor | float, u: Tensor) -> Tensor:
    """u < p."""
    return indicator(torch.lt, u, p, delta.dtype)


def row_ranks(mag: Tensor) -> Tensor:
    """Each entry's rank (from 0) by `mag` >= 0 among the entries along dim 1, ties by position (the inverse of
    mag.argsort(dim=1, stable=True))."""
    rows = mag.movedim(1, -1).contiguous()  # [..., n]: each row last
    n = rows.shape[-1]
    position = torch.arange(n, device=mag.device)
    if rows.dtype == torch.float32:  # int64 keys (bits of mag, position): distinct, ordered as (mag, position)
        keys = (rows.view(torch.int32).to(torch.int64) << 32) | position
        order = _sorted_rows(keys).bitwise_and_(0xFFFFFFFF)
    else:
        order = rows.argsort(dim=-1, stable=True)
    return torch.empty_like(order).scatter_(-1, order, position.expand_as(order)).movedim(-1, 1)


def _sorted_rows(keys: Tensor) -> Tensor:
    """keys sorted along the last dim: by numpy on CPU (its SIMD sort is ~10x torch.sort there)."""
    return torch.from_numpy(np.sort(keys.numpy(), axis=-1)) if keys.device.type == "cpu" else keys.sort(dim=-1).values


@dataclass(frozen=True)
class Sparsifier:
    rule: Callable[..., dict | bool]  # (delta, density, **extra) -> mask's arguments: what needs the whole tensor;
    # it may overwrite delta (a temporary of its caller's: a large tensor's copy costs as much as a pass)
    mask: Callable[..., Tensor]  # (delta, **rule, u=draws) -> 0/1 in delta's dtype, element-wise (compiled.py fuses it)
    extra: dict[str, float] = field(default_factory=dict)  # per-model parameters it adds, with mergekit's defaults
    randomized: bool = False  # the mask takes the delta's uniform draws `u`
    reads_delta: bool = True  # False: `rule` gets None for delta (DARE's reads nothing of it)


SPARSIFIERS: dict[str, Sparsifier] = {
    "magnitude": Sparsifier(magnitude, within),
    "random": Sparsifier(bernoulli, drawn, randomized=True, reads_delta=False),
    "magnitude_outliers": Sparsifier(magnitude_outliers, within, {"gamma": 0.01}),
    "della_magprune": Sparsifier(della_magprune, drawn, {"epsilon": 0.15}, randomized=True),
}


def keep_rule(delta: Tensor | None, method: str, density: float, **extra) -> dict | bool:
    """How SPARSIFIERS[method] masks `delta` (None for DARE): True keeps it all (density >= 1), False nothing (density
    <= 0), else the arguments of its mask. `extra`: its own parameters (gamma, epsilon)."""
    if density >= 1 or (delta is not None and delta.numel() == 0):
        return True
    if density <= 0:
        return False
    return SPARSIFIERS[method].rule(delta, density, **extra)


def apply_rule(delta: Tensor, method: str, rule: dict | bool, **draws) -> Tensor | None:
    """The 0/1 mask (in delta's dtype) of `keep_rule`'s answer; None where all is kept."""
    return None if rule is True else torch.zeros_like(delta) if rule is False else SPARSIFIERS[method].mask(delta, **rule, **draws)


def rescale_factor(delta: Tensor, mask: Tensor, eps: float = 1e-7) -> Tensor:
    """|delta|_1 / |mask * delta|_1 (mergekit `rescaled_masked_tensor`), a float64 0-dim tensor; 1 if a norm is < eps."""
    mag = delta.abs().reshape(-1)
    before, after = mag.sum().double(), torch.dot(mag, mask.reshape(-1)).double()  # mask: 0/1
    return torch.where((before >= eps) & (after >= eps), before / after, 1.0)

