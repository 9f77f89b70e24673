"""The merge methods of mergekit 0.1.5, as pure tensor functions (names, parameters and defaults as in mergekit).

Every method is `fn(base, tensors, *, <parameters>) -> Tensor` (see `registry.py`): `base` is the base model's tensor or
None, `tensors` the other models' tensors in recipe order, per-model parameters are lists aligned with `tensors`.
Arithmetic runs in float32 (float64 when an input is float64) and the result has the dtype of `base` (of `tensors[0]`
when there is no base). Nothing here syncs with the device except SCE's top-k count (once per tensor off the host,
where it is kept across candidates), nor touches the global RNG:
per-tensor statistics (norms, dot products, L1 sums) feed their scalar math through `host.scalar`, Python floats on
CPU only. On a GPU the element-wise tails run as fused kernels (`fused.py`): `@fusible` functions, and the
task-arithmetic family's `_task_sum_fused`. A method's last step, `@fusible(tail=True)`, returns the method's result
untouched (no reshape or cast after it): inside the live materializer's `fused.batched()` such calls are deferred and
run many tensors at a time, so a method may return a `fused.Deferred` there. Off the host a selection is a lookup in
an order kept across candidates, or runs inside those tails (`sparsify.AbsDelta`, `Rank`).

`int8_mask` is accepted for mergekit compatibility and does nothing: in mergekit it only picks the dtype of the sign
mask to save memory, and our masks are 0/1 in the work dtype.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from evomerge.merge.fused import fusible, fusing
from evomerge.merge.host import math_for, on_host, scalar
from evomerge.merge.registry import PerModel, merge_method
from evomerge.merge.rng import draws_at, key_words, uniforms
from evomerge.merge.sparsify import (SPARSIFIERS, AbsDelta, ByRank, Rank, abs_delta, keep_order, kept_with,
                                      kth_largest, kth_smallest_kept, sparsify_, top_digit_counts, work_dtype)

Tensor = torch.Tensor
# meaningful ranges of the family's parameters (DELLA also needs density +/- epsilon inside (0, 1))
RANGES = {"density": (0.0, 1.0), "gamma": (0.0, 1.0), "epsilon": (0.0, 0.5)}


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _stack(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack([t.to(dtype) for t in tensors])  # [n, *shape]


def _guarded(total: float) -> float:
    """A sum of weights to divide by; |total| < 1e-8 divides by 1 (mergekit's guard)."""
    return 1.0 if abs(total) < 1e-8 else total


def _each(value, n: int) -> list:
    """A per-model parameter as a list; a scalar (a default, in a direct call) applies to every model."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _sum0(x: Tensor | list[Tensor]) -> Tensor:
    """x.sum(0) for a stack (or list) of a few models, as sequential adds: torch's reduction over dim 0 is ~5x slower
    on CPU, and a list fuses into one loop."""
    return functools.reduce(torch.add, x.unbind(0) if isinstance(x, Tensor) else x)


def _slerp_coefficients(t: float, cos, linear) -> tuple:
    """(c_a, c_b) of slerp(a, b) = c_a a + c_b b:  sin((1-t) theta) / sin(theta) and sin(t theta) / sin(theta),
    theta = acos(cos); (1 - t, t) where `linear`. Works on `scalar` values and on tensors of per-vector values."""
    xp = math_for(cos)
    theta = xp.acos(xp.where(linear, 0.0, cos))  # acos(0) keeps the unused branch finite
    return (xp.where(linear, 1 - t, xp.sin((1 - t) * theta) / xp.sin(theta)),
            xp.where(linear, t, xp.sin(t * theta) / xp.sin(theta)))


def sign_agreement(deltas: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
    """TIES sign election: 1 where a delta has the sign of the sum over models (+ on a zero sum), else 0, in the
    deltas' dtype; sign(0) matches nothing, so a zero delta never counts towards the divisor. Takes a stack [n, *shape]
    or a list of n tensors, and answers in kind."""
    majority = torch.ge(_sum0(deltas), 0, out=torch.empty_like(deltas[0])).mul_(2).sub_(1)  # +-1 (torch.where is slow)
    # sign(d) == majority  <=>  d * majority > 0 (also for 0 and NaN); torch.sign is slow, and a bool result too
    if isinstance(deltas, list):
        return [torch.gt(d * majority, 0, out=torch.empty_like(d)) for d in deltas]
    agree = deltas * majority
    return torch.gt(agree, 0, out=agree)


# ---------------------------------------------------------------------------------------------------------------------
# the task-arithmetic family: one function, members as data (mergekit GeneralizedTaskArithmeticMerge)


@dataclass(frozen=True)
class TaskArithmetic:
    consensus: bool  # TIES sign election before the sum
    sparsifier: str | None  # a key of SPARSIFIERS
    normalize: bool  # default of `normalize`: divide by the (agreeing) weights' sum
    rescale: bool  # default of `rescale`: sparsified deltas keep their L1 norm
    reference: str


TASK_ARITHMETIC_FAMILY = {
    "task_arithmetic": TaskArithmetic(False, None, False, False, "https://arxiv.org/abs/2212.04089"),
    "ties": TaskArithmetic(True, "magnitude", True, False, "https://arxiv.org/abs/2306.01708"),
    "dare_ties": TaskArithmetic(True, "random", False, True, "https://arxiv.org/abs/2311.03099"),
    "dare_linear": TaskArithmetic(False, "random", False, True, "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": TaskArithmetic(False, "magnitude_outliers", False, False, "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": TaskArithmetic(True, "magnitude_outliers", False, False, "https://arxiv.org/abs/2312.06795"),
    "della": TaskArithmetic(True, "della_magprune", True, True, "https://arxiv.org/abs/2406.11617"),
    "della_linear": TaskArithmetic(False, "della_magprune", False, True, "https://arxiv.org/abs/2406.11617"),
}


def generalized_task_arithmetic(
    base: Tensor, tensors: list[Tensor], *, member: TaskArithmetic, weight: list[float], density: list[float],
    normalize: bool, rescale: bool, lambda_: float, int8_mask: bool = False, key: list | None = None, **extra: list,
) -> Tensor:
    """base + lambda * sum_i w_i m_i s(theta_i - base) / D   (task arithmetic, TIES, DARE, breadcrumbs, DELLA).

    s sparsifies each delta (`extra` holds its per-model gamma/epsilon, `key` its per-model MaskKey); m_i is the TIES
    sign agreement of the *weighted* deltas (all ones without consensus); D = sum_i w_i m_i if normalize, else 1.
    Guards as mergekit: with consensus D == 0 -> 1, without |D| < 1e-8 -> 1.
    """
    if not tensors:
        return base.clone()
    if fusing(base) and 0 < base.numel() < 2**31:  # int32 element indices for the in-kernel draws
        return _task_arithmetic_fused(base, tensors, member, weight, density, normalize, rescale, lambda_, key, extra)
    work = work_dtype(base, *tensors)
    b = base.to(work)
    deltas = _stack(tensors, work).sub_(b)  # [n, *shape]; updated in place below (fewer passes over memory)
    randomized = member.sparsifier and SPARSIFIERS[member.sparsifier].randomized
    draws = uniforms(key, b.shape, b.device) if randomized else None  # [n, *shape]
    for i, delta in enumerate(deltas):  # weights as Python scalars: no host-to-device copy, no sync
        if member.sparsifier:
            own = {name: values[i] for name, values in extra.items()} | ({"u": draws[i]} if randomized else {})
            sparsify_(delta, member.sparsifier, density[i], rescale=rescale, scale=weight[i],
                      source=(tensors[i], base), **own)
        else:
            delta.mul_(weight[i])
    if member.consensus:
        agree = sign_agreement(deltas)  # [n, *shape] of 0/1
        mixed = _sum0(deltas.mul_(agree))
        if normalize:
            for m, w in zip(agree, weight):
                m.mul_(w)
            divisor = _sum0(agree)
            mixed /= divisor.add_(torch.eq(divisor, 0, out=torch.empty_like(divisor)))  # 0 -> 1
    else:
        mixed = _sum0(deltas)
        if normalize:
            mixed /= _guarded(sum(weight))
    return mixed.mul_(lambda_).add_(b).to(base.dtype)


def _task_arithmetic_fused(base, tensors, member, weight, density, normalize, rescale, lambda_, key, extra) -> Tensor:
    """generalized_task_arithmetic with each sparsifier reduced to its bounds first (`Keep`: the selections), then
    masks, draws, rescale, sign election and sum in one fused `_task_sum_fused`. A model at density <= 0 is left out
    (its zero delta adds nothing and never agrees in sign); the divisor without consensus still counts its weight."""
    sparsifier = SPARSIFIERS.get(member.sparsifier)
    words = key_words(tuple(key), str(base.device)) if sparsifier and sparsifier.randomized else None
    kept = []  # (model's tensor, weight, Keep or None, key words or None)
    for i, x in enumerate(tensors):
        keep = None
        if sparsifier and density[i] < 1:
            mag = None
            if sparsifier.magnitudes:  # off the host, a rule that only ranks |delta| gets it unmaterialized
                mag = AbsDelta.of(x, base) if sparsifier.ranks else abs_delta(x, base)
            keep = None if density[i] <= 0 else sparsifier.rule(mag, density[i], **{k: v[i] for k, v in extra.items()})
            if keep is None:
                continue
        kept.append((x, weight[i], keep, words[i] if words is not None else None))
    if not kept:
        return base.clone()
    xs, ws, keeps, ks = (list(column) for column in zip(*kept))
    divisor = _guarded(sum(weight)) if normalize and not member.consensus else 1.0
    return _task_sum_fused(base, xs, ws, [k and k.lo for k in keeps], [k and k.hi for k in keeps],
                           [k and k.p for k in keeps], ks, rescale=rescale, consensus=member.consensus,
                           normalize=normalize, divisor=divisor, lambda_=lambda_)


@fusible(tail=True)
def _task_sum_fused(base, xs, weight, lo, hi, p, words, *, rescale, consensus, normalize, divisor, lambda_) -> Tensor:
    """base + lambda * sum_i w_i r_i m_i k_i (x_i - base) / D, as generalized_task_arithmetic: k_i
    the 0/1 keep mask of model i (lo_i <= |delta| <= hi_i, draw < p_i; None: no such bound; a `Rank` is selected
    here), r_i its L1 rescale factor (`sparsify.rescale_l1_`), m_i the TIES sign agreement, D the agreeing weights' sum
    with consensus and normalize, else `divisor`. Two passes: the L1 sums (with rescale), then the rest (and a radix
    pass per Rank before them)."""
    work = work_dtype(base, *xs)
    b = base.to(work).reshape(-1)  # flat: the draws are hashed from the element index
    xs = [x.reshape(-1) for x in xs]
    p = [q.values().reshape(-1) if isinstance(q, ByRank) else q.reshape(-1) if isinstance(q, Tensor) else q
         for q in p]  # DELLA's per-entry probabilities
    index = torch.arange(b.numel(), dtype=torch.int32, device=b.device) if any(k is not None for k in words) else None
    terms = []
    for x, w, low, high, prob, key in zip(xs, weight, lo, hi, p, words):
        low, high = (bound.select(x, b) if isinstance(bound, Rank) else bound for bound in (low, high))
        delta = x.to(work) - b
        mag = delta.abs()
        bounds = [mag >= low if low is not None else None, mag <= high if high is not None else None,
                  draws_at(index, key) < prob if prob is not None else None]
        bounds = [c for c in bounds if c is not None]
        if bounds:
            keep = functools.reduce(torch.logical_and, bounds)
            if rescale:
                before, after = mag.sum(), torch.where(keep, mag, 0).sum()
                w = w * torch.where((before >= 1e-7) & (after >= 1e-7), before / after.clamp(min=1e-7), 1.0)
            delta = torch.where(keep, delta, 0)
        terms.append(delta * w)
    if consensus:
        majority = torch.where(functools.reduce(torch.add, terms) >= 0, 1.0, -1.0)
        agree = [t * majority > 0 for t in terms]  # sign_agreement
        mixed = functools.reduce(torch.add, [torch.where(a, t, 0) for a, t in zip(agree, terms)])
        if normalize:
            agreeing = functools.reduce(torch.add, [a.to(work) * w for a, w in zip(agree, weight)])
            mixed = mixed / torch.where(agreeing == 0, 1.0, agreeing)
    else:
        mixed = functools.reduce(torch.add, terms) / divisor
    return (b + lambda_ * mixed).to(base.dtype).reshape(base.shape)


def _register_family_member(name: str, member: TaskArithmetic) -> None:
    """Register `name` with the parameter schema mergekit gives it: the common ones, the sparsifier's own, and `key`."""
    sparsifier = SPARSIFIERS.get(member.sparsifier)
    kw = inspect.Parameter.KEYWORD_ONLY
    own = sparsifier.extra if sparsifier else {}
    params = [
        inspect.Parameter("weight", kw, annotation=PerModel),
        inspect.Parameter("density", kw, default=1.0, annotation=PerModel),
        *(inspect.Parameter(p, kw, default=v, annotation=PerModel) for p, v in own.items()),
        inspect.Parameter("normalize", kw, default=member.normalize, annotation=bool),
        inspect.Parameter("rescale", kw, default=member.rescale, annotation=bool),
        inspect.Parameter("lambda_", kw, default=1.0, annotation=float),
        inspect.Parameter("int8_mask", kw, default=False, annotation=bool),
    ]
    if sparsifier and sparsifier.randomized:
        params.append(inspect.Parameter("key", kw, annotation=list))  # one MaskKey per entry of `tensors`
    positional = [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in ("base", "tensors")]
    signature = inspect.Signature(positional + params)

    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    allowed, required = {p.name for p in params}, {p.name for p in params if p.name not in defaults}
    per_model = [p.name for p in params if p.annotation is PerModel]

    def merge(base, tensors, **kwargs):
        if not required <= kwargs.keys() <= allowed:
            signature.bind(base, tensors, **kwargs)  # raises the TypeError (binding every call costs ~10 us)
        args = {**defaults, **kwargs}
        args.update({name: _each(args[name], len(tensors)) for name in per_model})
        return generalized_task_arithmetic(base, tensors, member=member, **args)

    merge.__signature__ = signature
    merge.__annotations__ = {p.name: p.annotation for p in params}
    merge.__name__ = merge.__qualname__ = name
    merge.__doc__ = f"{name}: {member} preset of generalized_task_arithmetic."
    ranges = {p: r for p, r in RANGES.items() if p in signature.parameters}
    merge_method(name, base="required", min_models=0, ranges=ranges, reference=member.reference)(merge)


for _name, _member in TASK_ARITHMETIC_FAMILY.items():
    _register_family_member(_name, _member)


# ---------------------------------------------------------------------------------------------------------------------
# the other methods


@merge_method("linear", base="none", reference="https://arxiv.org/abs/2203.05482")
def linear(base: None, tensors: list[Tensor], *, weight: PerModel, normalize: bool = True) -> Tensor:
    """Model soups: sum_i w_i theta_i, divided by sum_i w_i if normalize.

    A weight sum with |sum| < 1e-8 divides by 1 (mergekit divides by it and returns inf/NaN).
    """
    total = _guarded(sum(weight)) if normalize else 1.0
    return _weighted_sum(tensors, [w / total for w in weight])


@fusible(tail=True)
def _weighted_sum(xs: list[Tensor], coefs: list[float]) -> Tensor:
    """sum_i c_i x_i in the work dtype, returned in the dtype of xs[0]."""
    work = work_dtype(*xs)
    mixed = xs[0].to(work) * coefs[0]
    for x, c in zip(xs[1:], coefs[1:]):
        mixed.add_(x.to(work), alpha=c)  # one pass per model, no temporaries
    return mixed.to(xs[0].dtype)


@merge_method("slerp", base="required", min_models=1, max_models=1, ranges={"t": (0.0, 1.0)},
              reference="https://en.wikipedia.org/wiki/Slerp")
@fusible(tail=True)
def slerp(base: Tensor, tensors: list[Tensor], *, t: float) -> Tensor:
    """Spherical interpolation from base (t=0) to the other model (t=1) over the whole flattened tensor:

        out = sin((1-t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b,   cos(theta) = <a/|a|, b/|b|>
    Norms below 1e-8 count as 1; (anti)parallel tensors (|cos| > 0.9995) interpolate linearly (mergekit 0.1.5).
    """
    work = work_dtype(base, tensors[0])
    a, b = base.to(work).reshape(-1), tensors[0].to(work).reshape(-1)
    na, nb, dot = (scalar(x) for x in (a.norm(), b.norm(), torch.dot(a, b)))
    xp = math_for(dot)
    cos = xp.clamp(dot / (xp.where(na > 1e-8, na, 1.0) * xp.where(nb > 1e-8, nb, 1.0)), min=-1, max=1)
    coef_a, coef_b = _slerp_coefficients(t, cos, linear=abs(cos) > 0.9995)
    return (a * coef_a).add_(b * coef_b).reshape(base.shape).to(base.dtype)


def _nuslerp(t: float, a: Tensor, b: Tensor, *, row_wise: bool, flatten: bool) -> Tensor:
    """Slerp of the vectors along the last dim (dim 0 if row_wise, the whole tensor if flatten); colinear -> linear."""
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise and a.ndim > 1:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    if a.ndim == 1:  # one vector: scalar statistics
        na, nb, dot = (scalar(x) for x in (a.norm(), b.norm(), torch.dot(a, b)))
    else:
        na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
        dot = torch.linalg.vecdot(a, b).unsqueeze(-1)
    xp = math_for(dot)
    cos = xp.clamp(dot / (xp.clamp(na, min=1e-7) * xp.clamp(nb, min=1e-7)), min=-1, max=1)
    coef_a, coef_b = _slerp_coefficients(t, cos, linear=1 - cos * cos <= 1e-16)
    out = (a * coef_a).add_(b * coef_b)
    if row_wise and not flatten and a.ndim > 1:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@merge_method("nuslerp", base="optional", min_models=2, max_models=2)
def nuslerp(base: Tensor | None, tensors: list[Tensor], *, weight: PerModel, nuslerp_row_wise: bool = False,
            nuslerp_flatten: bool = True) -> Tensor:
    """Slerp between two models at t = w_1 / (w_0 + w_1) (0.5 if |w_0 + w_1| < 1e-6); with a base, between their
    task vectors, added back to the base. With nuslerp_flatten=False each vector along the last dim is slerped on its
    own, or with `nuslerp_row_wise` each along dim 0 (mergekit 0.1.5 moves dim 0 last: the columns of a 2-D weight).
    """
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    return _nuslerp_merge(base, tensors, t, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)


@fusible(tail=True)
def _nuslerp_merge(base: Tensor | None, tensors: list[Tensor], t: float, *, row_wise: bool, flatten: bool) -> Tensor:
    work = work_dtype(base, *tensors)
    a, b = (x.to(work) for x in tensors)
    origin = base.to(work) if base is not None else torch.zeros((), dtype=work, device=a.device)
    out = origin + _nuslerp(t, a - origin, b - origin, row_wise=row_wise, flatten=flatten)
    return out.to((base if base is not None else tensors[0]).dtype)


@merge_method("nearswap", base="required", min_models=1, max_models=1,
              reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001")
@fusible(tail=True)
def nearswap(base: Tensor, tensors: list[Tensor], *, t: float) -> Tensor:
    """Move base a towards the other model b where they are close:

        w = clamp(t / max(|a - b|, 1e-6), 0, 1),   out = w b + (1 - w) a
    """
    work = work_dtype(base, tensors[0])
    a, b = base.to(work), tensors[0].to(work)
    w = (t / (a - b).abs().clamp_min(1e-6)).clamp(0, 1)
    return (w * b + (1 - w) * a).to(base.dtype)


@merge_method("model_stock", base="required", min_models=2, reference="https://arxiv.org/abs/2403.19522")
@fusible(tail=True)
def model_stock(base: Tensor, tensors: list[Tensor], *, filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al. 2024, eq. 6): out = t * mean_i(w_i) + (1 - t) * w_0,  t = k cos / (1 + (k - 1) cos),

    cos the mean pairwise cosine of the offsets w_i - w_0 over the whole tensor, or per vector along the last dim with
    `filter_wise` (a 1-D tensor is one vector). Where |1 + (k - 1) cos| < 1e-6 the base is kept (t = 0).
    """
    work = work_dtype(base, *tensors)
    w0 = base.to(work)
    offsets = [x.to(work) - w0 for x in tensors]
    if filter_wise and base.ndim > 1:  # statistics per vector, as [..., 1] tensors
        inner = lambda x, y: torch.linalg.vecdot(x, y).unsqueeze(-1)  # noqa: E731
    else:  # statistics of the whole tensor, as `scalar` values
        inner = lambda x, y: scalar(torch.dot(x.reshape(-1), y.reshape(-1)))  # noqa: E731
    k = len(offsets)
    norms = [inner(o, o) ** 0.5 for o in offsets]
    xp = math_for(norms[0])
    cos = sum(xp.clamp(inner(offsets[i], offsets[j]) / xp.clamp(norms[i] * norms[j], min=1e-6), min=-1, max=1)
              for i in range(k) for j in range(i + 1, k)) / (k * (k - 1) / 2)
    denominator = 1 + (k - 1) * cos
    singular = abs(denominator) < 1e-6
    t = xp.where(singular, 0.0, k * cos / xp.where(singular, 1.0, denominator))
    mixed = functools.reduce(torch.Tensor.add_, offsets)  # in place into offsets[0]
    return mixed.mul_(t / k).add_(w0).to(base.dtype)  # w0 + t (mean_i(w_i) - w0)


@merge_method("sce", base="required", min_models=0, ranges={"select_topk": (0.0, 1.0)},
              reference="https://arxiv.org/abs/2408.07990")
def sce(base: Tensor, tensors: list[Tensor], *, select_topk: float = 1.0, int8_mask: bool = False) -> Tensor:
    """SCE (FuseChat-2.0): Select the fraction `select_topk` of entries whose task vectors vary most across models,
    Calculate energy weights e_i = mean(tau_i^2) / sum_j mean(tau_j^2) (uniform if that sum < 1e-6), Erase entries
    against the TIES majority sign, then average: base + sum_i e_i m_i tau_i / max(sum_i e_i m_i, 1e-6).

    Selection keeps the k = int(select_topk * #nonzero variances) largest variances, ties at the k-th all kept.
    """
    if not tensors:
        return base.clone()
    var = threshold = None
    if select_topk < 1:
        if not on_host(base):  # selected in _sce_sum, from what is kept across candidates
            kept = _variance_order(base, tensors)
            nonzero = kept["nonzero"]
        else:
            var = _variance_across_models(base, tensors)
            nonzero = int(torch.count_nonzero(var))  # a device sync: the count sizes the selection
        k = int(nonzero * select_topk)
        if k <= 0:  # nothing selected: every task vector is erased
            return base.clone()
        threshold = kth_largest(var, k) if var is not None else kth_smallest_kept(kept, base.numel() - k + 1)
    return _sce_sum(base, tensors, var, threshold)


def _variance_order(base: Tensor, tensors: list[Tensor]) -> dict:
    """How many variances across models are nonzero, and their order (`sparsify.keep_order`): the same for every
    candidate, so computed once (and the device synced once) while the sources live."""
    variance = lambda: _variance_across_models(base, tensors)  # noqa: E731
    kept = kept_with(base, *tensors)
    if "nonzero" not in kept:
        kept["nonzero"] = int(torch.count_nonzero(variance()))
    nbytes = base.numel() * work_dtype(base, *tensors).itemsize
    return keep_order(kept, variance, nbytes, top=lambda: top_digit_counts(variance()))


@fusible
def _variance_across_models(base: Tensor, tensors: list[Tensor]) -> Tensor:
    """Population variance of the task vectors across models, per entry (as lists: one fused loop; tau.var(0) on a
    stack is ~50x slower on CPU)."""
    work = work_dtype(base, *tensors)
    b = base.to(work)
    tau = [x.to(work) - b for x in tensors]
    mean = _sum0(tau) / len(tau)
    return _sum0([(t - mean).square() for t in tau]) / len(tau)


@fusible(tail=True)
def _sce_sum(base: Tensor, tensors: list[Tensor], var: Tensor | None, threshold: Tensor | None) -> Tensor:
    """SCE's Calculate and Erase steps and the average, after erasing the entries with var < threshold (if given;
    without var, the variances are recomputed here, and a Rank is selected from them)."""
    work = work_dtype(base, *tensors)
    b = base.to(work)
    tau = [x.to(work) - b for x in tensors]
    if var is None and threshold is not None:  # a threshold from kept variances: recomputed here, never written
        var = _variance_across_models(base, tensors)
    if isinstance(threshold, Rank):
        threshold = threshold.select(var)
    if threshold is not None:
        selected = torch.ge(var, threshold, out=torch.empty_like(var))  # 0/1 (torch.where is slow on CPU)
        tau = [t.mul_(selected) for t in tau]
    energy = [scalar(t.square().mean()) for t in tau]
    total = sum(energy)
    xp = math_for(total)
    energy = [xp.where(abs(total) < 1e-6, 1.0 / len(tau), e / xp.clamp(total, min=1e-6)) for e in energy]
    weights = [agree.mul_(e) for agree, e in zip(sign_agreement(tau), energy)]  # energy where the sign agrees
    mixed = _sum0([t * w for t, w in zip(tau, weights)])
    return (b + mixed / _sum0(weights).clamp_min(1e-6)).to(base.dtype)


@merge_method("passthrough", base="none", max_models=1)
def passthrough(base: None, tensors: list[Tensor], *, scale: PerModel = 1.0) -> Tensor:
    """The one model's tensor times its `scale` (mergekit's default None is scale 1)."""
    return _weighted_sum(tensors[:1], _each(scale, 1))
