"""Sparsifiers: which entries of a task vector (delta = model - base) survive before the deltas are mixed.

Semantics of mergekit 0.1.5 `sparsify.py`: density >= 1 returns the delta unchanged (no rescale), density <= 0 zeros
it; otherwise a mask is chosen and, with `rescale`, the kept entries are scaled to keep the delta's L1 norm. Each
sparsifier is a rule that returns the bounds of what survives (`Keep`: magnitude thresholds, a keep probability);
thresholds come from selection (`kth_smallest`), never from sorting the whole tensor per candidate, and exact ties at a
threshold are always kept, so the result is the same on every device. Masks are 0/1 in the delta's dtype (`_mask`).
Random masks compare the delta's uniform draws `u` (from `evomerge.merge.rng`, never the torch global RNG) with the keep
probability.

Off the host (a GPU) the fused path hands the rules an `AbsDelta` instead of |delta|, and what does not change between
candidates is kept while the source tensors live: |delta| sorted, so that a threshold is a lookup, and DELLA's ranks
within rows (`ByRank`), up to `keep_orders`' budget; past it a threshold is a `Rank`, which the fused sum resolves by
radix select in its own compiled call, and only radix select's first pass is kept. On the host the rules get an
`AbsDelta` while a search's worker keeps orders (`sparsify_`'s `source`); past the budget they select in |delta|.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch

from evomerge.merge.fused import fusible
from evomerge.merge.host import math_for, on_host, scalar


def kth_smallest(values: torch.Tensor | AbsDelta, k: int) -> torch.Tensor | Rank:
    """The k-th smallest (1-based) of nonnegative `values` over the whole tensor, a 0-dim tensor: exact, no device sync
    (of an AbsDelta, the Rank that the fused sum selects).

    NaN counts as largest, as in torch.kthvalue. On CPU numpy's introselect (SIMD) is 20x faster than the radix select
    at 2**16 entries and 3x at 2**22; elsewhere `radix_select`, or torch.kthvalue up to 2**15 entries.
    """
    if isinstance(values, AbsDelta):
        return values.kth_smallest(k)
    flat = values.reshape(-1) if values.element_size() >= 4 else values.reshape(-1).float()
    if on_host(flat):
        return torch.as_tensor(np.partition(flat.detach().numpy(), k - 1)[k - 1])
    return torch.kthvalue(flat, k).values if flat.numel() <= KTHVALUE_MAX else radix_select(flat, k)


KTHVALUE_MAX = 2**15  # off the host, torch.kthvalue selects up to this many entries, radix_select beyond


@fusible  # on a GPU: each pass one kernel (keys, digit and histogram fused), not five over int32 copies
def radix_select(x: torch.Tensor, k: int, base: torch.Tensor | None = None,
                 top: torch.Tensor | None = None) -> torch.Tensor:
    """kth_smallest of a 1-D float32/float64 x >= 0, or of |x - base| recomputed in every pass (x and base of any
    shape), by radix select on the float bits, which order like integers for values >= 0: 16 bits at a time, count
    the next digit of the keys that share the digits chosen so far, take the digit where the running count reaches k
    and go on with k less the keys below that digit. Two passes over float32 keys (one when `top`, the counts of the
    top digit, is given), no sort, no sync; on CUDA no single-block select over the whole tensor.
    """
    keys = _keys(x, base)
    prefix = None  # the digits chosen so far, as an integer
    for shift in range(8 * keys.element_size() - 16, -1, -16):
        counts = top if prefix is None and top is not None else _digit_counts(keys, shift, prefix)
        below = counts.cumsum(0) < k  # the digits whose keys all rank below the k-th
        digit = below.sum()  # the first digit whose running count reaches k
        k = k - torch.where(below, counts, 0).sum()
        prefix = digit if prefix is None else (prefix << 16) | digit
    return prefix.to(keys.dtype).reshape(1).view(torch.float32 if keys.element_size() == 4 else torch.float64)[0]


def _keys(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """The float bits of x (or of |x - base|, in the methods' work dtype) as flat integers."""
    if base is None:
        values = x if x.element_size() >= 4 else x.float()
    else:
        values = abs_delta(x, base)
    return values.reshape(-1).view(torch.int32 if values.element_size() == 4 else torch.int64)


def _digit_counts(keys: torch.Tensor, shift: int, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """How many keys have each value of the 16-bit digit at `shift` (int32), among those whose higher bits equal
    `prefix` (all keys when None). The other keys are counted apart in 2**12 bins by their own digit: a single bin for
    all of them would serialize a GPU's atomic adds."""
    digit = (keys >> shift) & 0xFFFF
    others = 0
    if prefix is not None:
        others = 2**12
        digit = torch.where((keys >> (shift + 16)) == prefix, digit, 2**16 + (digit & (others - 1)))
    ones = torch.ones((), dtype=torch.int32, device=keys.device).expand(keys.numel())
    return torch.zeros(2**16 + others, dtype=torch.int32, device=keys.device).index_add_(0, digit, ones)[: 2**16]


@fusible
def top_digit_counts(x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """radix_select's first pass, which does not depend on k: the counts of the top digit of the keys."""
    keys = _keys(x, base)
    return _digit_counts(keys, 8 * keys.element_size() - 16)


class Rank(NamedTuple):
    """The k-th smallest of what a fused sum computes anyway (|x - base| of a model's tensor, SCE's variances) whose
    order is not kept, left to it to select: inside its compiled call, so on a GPU the selections of many tensors run
    in one call with their sums (`fused.batched`)."""

    k: float  # an integer, as a float: a kernel argument, not a constant compiled in
    top: torch.Tensor  # the counts of the keys' top digit (radix select's first pass)

    def select(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The k-th smallest |x - base| (of x >= 0 without base)."""
        return radix_select(x, self.k, base, self.top)


class AbsDelta:
    """|x - base| of a model's tensor as the rules see it off the host (and on it while orders are kept), where they
    only rank it: never materialized per candidate. A search ranks the same resident tensors for every candidate, so
    its order is kept while x and base live (sources are read-only): `kth_smallest` is a lookup in |x - base| sorted,
    past `keep_orders`' budget a `Rank` (on the host: a selection in |x - base|), and DELLA's `row_ranks` are sorted
    once."""

    def __init__(self, x: torch.Tensor, base: torch.Tensor):
        self.x, self.base = x, base
        self.shape, self.ndim, self.device, self.dtype = x.shape, x.ndim, x.device, work_dtype(x, base)

    @staticmethod
    def of(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor | AbsDelta:
        """An AbsDelta off the host (small tensors too: their selections then need no call of their own either) and
        on it while orders are kept (a search's worker), else |x - base| itself."""
        return AbsDelta(x, base) if not on_host(x) or keeping_orders() else abs_delta(x, base)

    def numel(self) -> int:
        return self.x.numel()

    def kth_smallest(self, k: int) -> torch.Tensor | Rank:
        host = on_host(self.x)  # where a Rank costs more than selecting in |x - base| itself
        top = None if host else lambda: top_digit_counts(self.x, self.base)
        kept = keep_order(kept_with(self.x, self.base), lambda: abs_delta(self.x, self.base),
                          self.numel() * self.dtype.itemsize, top=top)
        if host and "sorted" not in kept:  # past the budget
            return kth_smallest(abs_delta(self.x, self.base), k)
        return kth_smallest_kept(kept, k)

    def row_ranks(self) -> torch.Tensor:
        kept = kept_with(self.x, self.base)
        if "ranks" in kept:
            return kept["ranks"]
        ranks = row_ranks(abs_delta(self.x, self.base))
        _orders.keep(kept, "ranks", ranks)
        return ranks


def keep_order(kept: dict, values: Callable[[], torch.Tensor], nbytes: int,
               top: Callable[[], torch.Tensor] | None) -> dict:
    """What the selections of `values` (computed from read-only sources, `nbytes` long) need, kept in `kept` once:
    the values sorted if the budget allows (any k-th smallest is then a lookup), else the counts of their top digit
    (radix select's first pass; every selection then costs one more pass; nothing without `top`). A sort needs about
    4x its values' bytes while it runs: when the device has not got them, the budget closes and radix select takes
    over."""
    if "sorted" not in kept and "top" not in kept:
        if _orders.fits(nbytes):
            try:
                _orders.keep(kept, "sorted", _sorted(values().reshape(-1)))
                return kept
            except torch.cuda.OutOfMemoryError:
                _orders.max_bytes = _orders.used
        if top is not None:
            kept["top"] = top()
    return kept


def _sorted(values: torch.Tensor) -> torch.Tensor:
    """values sorted ascending (NaN last); on CPU by numpy (its SIMD sort is much faster than torch.sort there)."""
    return torch.from_numpy(np.sort(values.numpy())) if on_host(values) else values.sort().values


def kth_smallest_kept(kept: dict, k: int) -> torch.Tensor | Rank:
    """The k-th smallest of what `keep_order` kept: a 0-dim view of the sorted values (no kernel), or a `Rank`."""
    return kept["sorted"][k - 1] if "sorted" in kept else Rank(float(k), kept["top"])


@dataclass
class _Budget:
    """Bytes of kept orders, first come first kept: see `keep_orders`."""

    max_bytes: int = 0
    used: int = 0

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.max_bytes

    def keep(self, kept: dict, name: str, value: torch.Tensor) -> None:
        """Keep `value` as kept[name] if it fits."""
        if self.fits(value.nbytes):
            kept[name], self.used = value, self.used + value.nbytes


_orders = _Budget()
ORDERS = ("sorted", "ranks")  # what counts against the budget
_kept: dict[tuple, dict] = {}  # the tensors' identities -> {"refs": weakrefs to their roots, what is kept}


def kept_with(*tensors: torch.Tensor) -> dict:
    """A dict for what is computed from `tensors` (sources: read-only) and does not depend on the candidate, kept as
    long as they all live. A view (an embedding's common rows) is a new tensor every candidate: it is known by the
    tensor it views, its offset, shape and strides."""
    roots = [t if t._base is None else t._base for t in tensors]
    key = tuple(id(t) if root is t else (id(root), t.storage_offset(), t.shape, t.stride())
                for root, t in zip(roots, tensors))
    kept = _kept.get(key)
    if kept is None or any(ref() is not root for ref, root in zip(kept["refs"], roots)):

        def forget(_ref):  # a tensor is gone: so is what was kept of it
            gone = _kept.pop(key, None) or {}
            _orders.used -= sum(gone[name].nbytes for name in ORDERS if name in gone)

        kept = _kept[key] = {"refs": [weakref.ref(root, forget) for root in roots]}
    return kept


def keep_orders(max_bytes: int) -> None:
    """Keep up to `max_bytes` of orders, as a search worker does (its candidates rank the same tensors):
    |x - base| sorted for the thresholds of TIES and breadcrumbs (4 bytes per element and model; SCE's variances: per
    element), DELLA's ranks within rows (2 bytes per element and model where rows have at most 2**15 entries, else 4).
    Frees those kept so far."""
    global _orders
    _orders = _Budget(max_bytes)
    for kept in _kept.values():
        for name in ORDERS:
            kept.pop(name, None)


def kept_order_bytes() -> int:
    return _orders.used


def keeping_orders() -> bool:
    return _orders.max_bytes > 0


@fusible
def abs_delta(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - base| in the methods' work dtype."""
    work = work_dtype(x, base)
    return (x.to(work) - base.to(work)).abs()


def work_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the methods compute in: float64 if any input is, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    return kth_smallest(values, values.numel() - k + 1)


def _mask(compare, a, b, like: torch.Tensor) -> torch.Tensor:
    """compare(a, b) as 0/1 in the dtype of `like`: on CPU writing a bool result and multiplying by it each cost ~4x
    a float op (the product converts the bool tensor first)."""
    return compare(a, b, out=torch.empty_like(like))


@dataclass(frozen=True)
class Keep:
    """The entries of a delta that survive: lo <= |delta| <= hi and u < p (a bound that is None does not apply).

    A sparsifier's rule turns |delta| and its parameters into these bounds (selection happens there); applying them is
    element-wise, so fused kernels (`evomerge.merge.fused`) apply them in the same pass as the sum."""

    lo: torch.Tensor | Rank | None = None
    hi: torch.Tensor | Rank | None = None
    p: float | torch.Tensor | ByRank | None = None  # keep probability, per tensor or per entry (DELLA)

    def mask(self, mag: torch.Tensor | None, u: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """0/1 mask in the dtype of `like` (mag = |delta|, u = the delta's uniform draws)."""
        p = self.p.values().reshape(like.shape) if isinstance(self.p, ByRank) else self.p
        conditions = [(torch.ge, mag, self.lo), (torch.le, mag, self.hi), (torch.lt, u, p)]
        masks = [_mask(compare, x, bound, like) for compare, x, bound in conditions if bound is not None]
        return functools.reduce(torch.Tensor.mul_, masks)


def magnitude(mag: torch.Tensor, density: float) -> Keep:
    """TIES: keep the k = max(1, int(density * numel)) largest |delta| over the whole tensor.

    Every |delta| >= the k-th largest |delta| is kept: entries tied with it are all kept, so more than k survive only
    when there are exact ties at the threshold (mergekit's argsort keeps an arbitrary k of them).
    """
    return Keep(lo=kth_largest(mag, max(1, int(density * mag.numel()))))


def magnitude_outliers(mag: torch.Tensor, density: float, *, gamma: float) -> Keep | None:
    """Model Breadcrumbs: drop the int(gamma * numel) largest |delta| (outliers), keep the next int(density * numel).

    Fewer outliers are dropped when both do not fit (mergekit 0.1.5). In ascending order of |delta| the kept entries
    are ranks skip+1 .. skip+keep; both ends are kthvalue thresholds and ties at either end are kept. With no outlier
    to drop the top `keep` entries survive (older mergekit's `indices[n_bot:-0]` zeroed everything there). None when
    nothing is kept.
    """
    n = mag.numel()
    keep, top = int(density * n), max(0, int(gamma * n))
    if keep <= 0:
        return None
    skip = max(0, n - keep - top)  # the smallest entries dropped
    return Keep(lo=kth_smallest(mag, skip + 1), hi=kth_smallest(mag, skip + keep))


def bernoulli(mag: None, density: float) -> Keep:
    """DARE: keep each entry independently with probability `density` (by its U[0, 1) draw, see rng.uniform)."""
    return Keep(p=density)


def row_order(mag: torch.Tensor) -> torch.Tensor:
    """mag.argsort(dim=1, stable=True) of a 2-D mag >= 0 (ties by column). float32 sorts the int64 keys (bits of mag,
    column) instead: distinct, and ordered like (mag, column), so any sort is stable. On CPU numpy builds and sorts
    them in place (its SIMD sort is ~50x faster than torch.sort there)."""
    if mag.dtype != torch.float32:
        return mag.argsort(dim=1, stable=True)
    return _row_order_numpy(mag) if on_host(mag) else _row_order_torch(mag)


def _row_order_numpy(mag: torch.Tensor) -> torch.Tensor:
    keys = mag.detach().numpy().view(np.int32).astype(np.int64)
    keys <<= 32
    keys |= np.arange(mag.shape[1])
    keys.sort(axis=-1)
    return torch.from_numpy(keys).bitwise_and_(0xFFFFFFFF)


def _row_order_torch(mag: torch.Tensor) -> torch.Tensor:
    keys = (mag.view(torch.int32).to(torch.int64) << 32) | torch.arange(mag.shape[1], device=mag.device)
    return keys.sort(dim=-1).values.bitwise_and_(0xFFFFFFFF)


def della_magprune(mag: torch.Tensor, density: float, *, epsilon: float) -> Keep:
    """DELLA MagPrune: keep with probability density - epsilon + 2 * epsilon * rank / (n - 1), rank by |delta| within
    each row (along dim 1 as in mergekit; a 1-D tensor is one row). Ties rank by position (stable sort).

    A row of one entry gets the middle probability `density` (mergekit divides 0 by 0 there and fails).
    """
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"DELLA needs density +/- epsilon in (0, 1); got density {density}, epsilon {epsilon}")
    n = mag.shape[1] if mag.ndim >= 2 else mag.numel()  # row length
    prob = _rank_probabilities(n, density, epsilon, mag.dtype, mag.device)
    if isinstance(mag, AbsDelta):
        return Keep(p=ByRank(prob, mag.row_ranks()))
    rows = mag if mag.ndim >= 2 else mag.reshape(1, -1)
    keep_prob = torch.empty_like(rows).scatter_(1, row_order(rows), prob.expand_as(rows))  # at each entry's rank
    return Keep(p=keep_prob.reshape(mag.shape))


@functools.lru_cache(maxsize=256)  # many tensors of a candidate share n and parameters: not 4 kernels each
def _rank_probabilities(n: int, density: float, epsilon: float, dtype: torch.dtype, device) -> torch.Tensor:
    """[n]: DELLA's keep probability of each rank in a row of n (read-only: shared)."""
    rank = torch.arange(n, dtype=dtype, device=device)
    rank_norm = rank / (n - 1) if n > 1 else torch.full_like(rank, 0.5)
    return density - epsilon + rank_norm * (2 * epsilon)


def row_ranks(mag: torch.Tensor) -> torch.Tensor:
    """Each entry's rank (from 0) by `mag` within its row as della_magprune ranks it, int16 where rows allow."""
    rows = mag if mag.ndim >= 2 else mag.reshape(1, -1)
    dtype = torch.int16 if rows.shape[1] <= 2**15 else torch.int32
    rank = torch.arange(rows.shape[1], dtype=dtype, device=mag.device)
    return torch.empty(rows.shape, dtype=dtype, device=mag.device).scatter_(1, row_order(rows), rank.expand_as(rows))


class ByRank(NamedTuple):
    """Per-entry keep probabilities as the probability of each rank (`table`) and each entry's rank in its row: the
    fused sum reads 2 bytes an entry where it would read 4, and the ranks are kept across candidates."""

    table: torch.Tensor
    ranks: torch.Tensor

    def values(self) -> torch.Tensor:
        return self.table[self.ranks.long()]


@dataclass(frozen=True)
class Sparsifier:
    rule: Callable[..., Keep | None]  # (|delta| or None, density, **extra) -> what survives (None: nothing)
    extra: dict[str, float] = field(default_factory=dict)  # per-model parameters it adds, with mergekit's defaults
    randomized: bool = False  # compares the delta's uniform draws `u`
    magnitudes: bool = True  # its rule reads |delta|
    ranks: bool = False  # ... only to rank it (kth_smallest, row_ranks): an AbsDelta will do

    def mask(self, delta: torch.Tensor, density: float, u: torch.Tensor | None = None,
             mag: torch.Tensor | None = None, ranked: AbsDelta | None = None, **extra) -> torch.Tensor:
        """0/1 mask of the entries of `delta` that survive, in delta's dtype (`mag`: |delta|, if the caller has it;
        `ranked`: the same |delta| as an AbsDelta, whose order may be kept, for a rule that only ranks it)."""
        if mag is None and self.magnitudes:
            mag = delta.abs()
        keep = self.rule(mag if ranked is None else ranked, density, **extra)
        return torch.zeros_like(delta) if keep is None else keep.mask(mag, u, delta)


SPARSIFIERS: dict[str, Sparsifier] = {
    "magnitude": Sparsifier(magnitude, ranks=True),
    "random": Sparsifier(bernoulli, randomized=True, magnitudes=False),
    "magnitude_outliers": Sparsifier(magnitude_outliers, {"gamma": 0.01}, ranks=True),
    "della_magprune": Sparsifier(della_magprune, {"epsilon": 0.15}, randomized=True, ranks=True),
}


def rescale_l1_(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7, *, scale: float = 1.0,
                mag: torch.Tensor | None = None) -> torch.Tensor:
    """delta *= mask, then scaled back to delta's L1 norm before masking (mergekit `rescaled_masked_tensor`); unscaled
    if either norm is < eps. In place; `scale` multiplies the result in the same pass; `mag` is |delta| if known."""
    mag = (delta.abs() if mag is None else mag).reshape(-1)
    before, after = scalar(mag.sum()), scalar(torch.dot(mag, mask.reshape(-1)))  # |delta * mask|, the mask being 0/1
    xp = math_for(before)
    factor = xp.where((before >= eps) & (after >= eps), before / xp.clamp(after, min=eps), 1.0)
    return delta.mul_(mask).mul_(factor * scale)


def sparsify_(delta: torch.Tensor, method: str, density: float, *, rescale: bool, scale: float = 1.0,
              source: tuple[torch.Tensor, torch.Tensor] | None = None, **extra) -> torch.Tensor:
    """Apply SPARSIFIERS[method] to one delta and multiply it by `scale` (a model's weight; with `rescale` in the
    same pass), in place; `extra` holds the sparsifier's own parameters (gamma, epsilon, u). `source`: the resident
    (x, base) that delta = x - base came from; while orders are kept (a search's worker), a rule that only ranks
    |delta| ranks their kept order instead of selecting in |delta| every candidate."""
    if density <= 0:
        return delta.zero_()
    if density < 1 and delta.numel():
        sparsifier = SPARSIFIERS[method]
        mag = delta.abs() if sparsifier.magnitudes or rescale else None  # once, for the rule and the rescale
        ranked = AbsDelta(*source) if source and sparsifier.ranks and keeping_orders() else None
        if ranked is not None and (ranked.dtype != delta.dtype or ranked.shape != delta.shape):
            ranked = None  # |x - base| in another precision (mixed dtypes) or of other rows: not delta's order
        mask = sparsifier.mask(delta, density, mag=mag, ranked=ranked, **extra)
        if rescale:
            return rescale_l1_(delta, mask, scale=scale, mag=mag)
        delta.mul_(mask)
    return delta.mul_(scale) if scale != 1 else delta


def sparsify(delta: torch.Tensor, method: str, density: float, *, rescale: bool, **extra) -> torch.Tensor:
    """`sparsify_` on a copy of `delta`."""
    return sparsify_(delta.clone(), method, density, rescale=rescale, **extra)
