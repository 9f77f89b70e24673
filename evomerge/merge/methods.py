"""The merge methods of mergekit 0.1.5, as pure tensor functions (names, parameters and defaults as in mergekit).

Every method is `fn(base, tensors, *, <parameters>) -> Tensor` (see `registry.py`): `base` is the base model's tensor or
None, `tensors` the other models' tensors in recipe order, per-model parameters are lists aligned with `tensors`.
Arithmetic runs in float32 (float64 when an input is float64) and the result has the dtype of `base` (of `tensors[0]`
when there is no base). The same code runs on every device; nothing touches the global RNG. A whole tensor's statistics
(norms, dot products, SCE's energies) are read as Python floats (a device sync each: on small tensors 0-dim tensor ops
cost more than the tensor's own). Sums over models add in recipe order (`ordered_sum`). `int8_mask` is accepted for
mergekit compatibility and does nothing (in mergekit it picks the sign mask's dtype).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch

from evomerge.merge.registry import PerModel, merge_method
from evomerge.merge.rng import draws, key_words
from evomerge.merge.sparsify import (SPARSIFIERS, apply_rule, indicator, keep_rule, kth_largest, kth_smallest,
                                      rescale_factor,
                                      work_dtype)

Tensor = torch.Tensor
# meaningful ranges of the family's parameters (DELLA also needs density +/- epsilon inside (0, 1))
RANGES = {"density": (0.0, 1.0), "gamma": (0.0, 1.0), "epsilon": (0.0, 0.5)}


def _guarded(total: float) -> float:
    """A sum of weights to divide by; |total| < 1e-8 divides by 1 (mergekit's guard)."""
    return 1.0 if abs(total) < 1e-8 else total


def _each(value, n: int) -> list:
    """A per-model parameter as a list; a scalar (a default, in a direct call) applies to every model."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def ordered_sum(xs: list[Tensor]) -> Tensor:
    """x_1 + x_2 + ... + x_n, in this order, into one new tensor (x_1 itself when n == 1)."""
    out = xs[0] + xs[1] if len(xs) > 1 else xs[0]
    for x in xs[2:]:
        out += x
    return out


def sign_agreement(deltas: list[Tensor]) -> list[Tensor]:
    """TIES sign election: per delta, 1 where it has the sign of the sum over models (+ on a zero sum), else 0, in the
    deltas' dtype. sign(0) matches nothing, so a zero delta never counts towards the divisor."""
    dtype = deltas[0].dtype
    majority = indicator(torch.ge, ordered_sum(deltas), 0, dtype).mul_(2).sub_(1)  # +-1
    return [indicator(torch.gt, d * majority, 0, dtype) for d in deltas]


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
    normalize: bool, rescale: bool, lambda_: float, int8_mask: bool = False, key: list | None = None,
    mix: Callable | None = None, **extra: list,
) -> Tensor:
    """base + lambda * sum_i w_i r_i m_i (k_i * delta_i) / D,   delta_i = theta_i - base

    (task arithmetic, TIES, DARE, breadcrumbs, DELLA). k_i is the sparsifier's 0/1 mask of delta_i (`extra` holds its
    per-model gamma/epsilon, `key` its per-model MaskKey), r_i its L1 rescale factor with `rescale`; m_i the TIES sign
    agreement of the weighted deltas (all ones without consensus); D = sum_i w_i m_i if normalize, else 1. Guards as
    mergekit: with consensus D == 0 -> 1, without |D| < 1e-8 -> 1. Here the masks' rules (thresholds, ranks); the
    element-wise rest in `task_arithmetic_mix` (or `mix`, its compiled form).
    """
    if not tensors:
        return base.clone()
    work = work_dtype(base, *tensors)
    b = base.to(work)
    rules = [True] * len(tensors)  # all kept
    if member.sparsifier:
        reads_delta = SPARSIFIERS[member.sparsifier].reads_delta
        rules = [keep_rule(x.to(work) - b if reads_delta else None, member.sparsifier, density[i],
                           **{name: values[i] for name, values in extra.items()}) for i, x in enumerate(tensors)]
    words = key_words(key, b.device) if key is not None and member.sparsifier else None
    return (mix or task_arithmetic_mix)(b, tensors, weight, rules, words, _guarded(sum(weight)), lambda_,
                                        member=member, normalize=normalize, rescale=rescale).to(base.dtype)


def task_arithmetic_mix(b: Tensor, tensors: list[Tensor], weight: list, rules: list, words: Tensor | None, total,
                        lambda_, *, member: TaskArithmetic, normalize: bool, rescale: bool) -> Tensor:
    """generalized_task_arithmetic's element-wise part, in b's dtype (`total`: the guarded weight sum). No Python branch
    on a number: compiled, the numbers are 0-dim tensors."""
    u = draws(words, b.shape) if words is not None else None  # [n, *shape]
    deltas = []
    for i, x in enumerate(tensors):
        delta = x.to(b.dtype) - b
        mask = apply_rule(delta, member.sparsifier, rules[i], **({"u": u[i]} if u is not None else {}))
        if mask is None:
            deltas.append(delta.mul_(weight[i]))
        else:
            r = rescale_factor(delta, mask) if rescale else 1.0
            deltas.append(delta.mul_(mask).mul_(r * weight[i]))
    if member.consensus:
        agree = sign_agreement(deltas)
        mixed = ordered_sum([d.mul_(m) for d, m in zip(deltas, agree)])
        if normalize:
            divisor = ordered_sum([m.mul_(w) for m, w in zip(agree, weight)])
            mixed /= divisor + (divisor == 0)  # 0 -> 1
    else:
        mixed = ordered_sum(deltas)
        if normalize:
            mixed /= total
    return mixed.mul_(lambda_).add_(b)  # base + lambda * mixed


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
    per_model = [p.name for p in params if p.annotation is PerModel]

    def merge(base, tensors, *, mix=None, **kwargs):  # mix: the compiled element-wise part (compiled.py)
        signature.bind(base, tensors, **kwargs)  # a TypeError for a missing or unknown parameter
        args = {**defaults, **kwargs}
        args.update({name: _each(args[name], len(tensors)) for name in per_model})
        return generalized_task_arithmetic(base, tensors, member=member, mix=mix, **args)

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


def _weighted_sum(xs: list[Tensor], coefs: list[float]) -> Tensor:
    """sum_i c_i x_i in the work dtype, returned in the dtype of xs[0]."""
    work = work_dtype(*xs)
    mixed = xs[0].to(work) * coefs[0]
    for x, c in zip(xs[1:], coefs[1:]):
        mixed.add_(x.to(work), alpha=c)
    return mixed.to(xs[0].dtype)


def _slerp_coefficients(t: float, cos, linear):
    """(c_a, c_b) of slerp(a, b) = c_a a + c_b b:  sin((1-t) theta) / sin(theta) and sin(t theta) / sin(theta),
    theta = acos(cos); (1 - t, t) where `linear`. Of Python floats (a whole tensor) or tensors (per vector)."""
    if isinstance(cos, float):
        theta = math.acos(cos)
        return (1 - t, t) if linear else (math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta))
    theta = torch.acos(torch.where(linear, 0.0, cos))  # acos(0) keeps the unused branch finite
    return (torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / torch.sin(theta)),
            torch.where(linear, t, torch.sin(t * theta) / torch.sin(theta)))


def _clamp(x: float, min: float = -math.inf, max: float = math.inf) -> float:  # noqa: A002 (torch.clamp for a float)
    return x if math.isnan(x) else float(min) if x < min else float(max) if x > max else x


def _norms_and_dot(a: Tensor, b: Tensor) -> tuple[float, float, float]:
    """|a|, |b| and <a, b> of 1-D a and b, as Python floats (one device sync)."""
    return tuple(torch.stack([a.norm(), b.norm(), torch.dot(a, b)]).tolist())


@merge_method("slerp", base="required", min_models=1, max_models=1, ranges={"t": (0.0, 1.0)},
              reference="https://en.wikipedia.org/wiki/Slerp")
def slerp(base: Tensor, tensors: list[Tensor], *, t: float) -> Tensor:
    """Spherical interpolation from base (t=0) to the other model (t=1) over the whole flattened tensor:

        out = sin((1-t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b,   cos(theta) = <a/|a|, b/|b|>
    Norms below 1e-8 count as 1; (anti)parallel tensors (|cos| > 0.9995) interpolate linearly (mergekit 0.1.5).
    """
    work = work_dtype(base, tensors[0])
    a, b = base.to(work).reshape(-1), tensors[0].to(work).reshape(-1)
    na, nb, dot = _norms_and_dot(a, b)
    cos = _clamp(dot / ((na if na > 1e-8 else 1.0) * (nb if nb > 1e-8 else 1.0)), min=-1, max=1)
    coef_a, coef_b = _slerp_coefficients(t, cos, linear=abs(cos) > 0.9995)
    return (a * coef_a).add_(b * coef_b).reshape(base.shape).to(base.dtype)


def _nuslerp(t: float, a: Tensor, b: Tensor, *, row_wise: bool, flatten: bool) -> Tensor:
    """Slerp of the vectors along the last dim (dim 0 if row_wise, the whole tensor if flatten); colinear -> linear."""
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise and a.ndim > 1:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    if a.ndim == 1:  # one vector: Python floats
        na, nb, dot = _norms_and_dot(a, b)
        cos = _clamp(dot / (_clamp(na, min=1e-7) * _clamp(nb, min=1e-7)), min=-1, max=1)
    else:  # [..., 1]: one value per vector
        na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
        cos = (torch.linalg.vecdot(a, b).unsqueeze(-1) / (na.clamp(min=1e-7) * nb.clamp(min=1e-7))).clamp(-1, 1)
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
    work = work_dtype(base, *tensors)
    a, b = (x.to(work) for x in tensors)
    origin = base.to(work) if base is not None else torch.zeros((), dtype=work, device=a.device)
    out = origin + _nuslerp(t, a - origin, b - origin, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    return out.to((base if base is not None else tensors[0]).dtype)


@merge_method("nearswap", base="required", min_models=1, max_models=1,
              reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001")
def nearswap(base: Tensor, tensors: list[Tensor], *, t: float) -> Tensor:
    """Move base a towards the other model b where they are close:

        w = clamp(t / max(|a - b|, 1e-6), 0, 1),   out = w b + (1 - w) a
    """
    work = work_dtype(base, tensors[0])
    a, b = base.to(work), tensors[0].to(work)
    w = (t / (a - b).abs().clamp_min(1e-6)).clamp(0, 1)
    return (w * b + (1 - w) * a).to(base.dtype)


@merge_method("model_stock", base="required", min_models=2, reference="https://arxiv.org/abs/2403.19522")
def model_stock(base: Tensor, tensors: list[Tensor], *, filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al. 2024, eq. 6): out = t * mean_i(w_i) + (1 - t) * w_0,  t = k cos / (1 + (k - 1) cos),

    cos the mean pairwise cosine of the offsets w_i - w_0 over the whole tensor, or per vector along the last dim with
    `filter_wise` (a 1-D tensor is one vector). Where |1 + (k - 1) cos| < 1e-6 the base is kept (t = 0).
    """
    work = work_dtype(base, *tensors)
    w0 = base.to(work)
    offsets = [x.to(work) - w0 for x in tensors]
    if filter_wise and base.ndim > 1:  # [..., 1]: one value per vector
        inner, clamp = (lambda x, y: torch.linalg.vecdot(x, y).unsqueeze(-1)), torch.clamp
    else:  # the whole tensor: Python floats
        inner, clamp = (lambda x, y: torch.dot(x.reshape(-1), y.reshape(-1)).item()), _clamp
    k = len(offsets)
    norms = [inner(o, o) ** 0.5 for o in offsets]
    cos = sum(clamp(inner(offsets[i], offsets[j]) / clamp(norms[i] * norms[j], min=1e-6), min=-1, max=1)
              for i in range(k) for j in range(i + 1, k)) / (k * (k - 1) / 2)
    denominator = 1 + (k - 1) * cos
    singular = abs(denominator) < 1e-6
    if isinstance(cos, float):
        t = 0.0 if singular else k * cos / denominator
    else:
        t = torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, denominator))
    return ordered_sum(offsets).mul_(t / k).add_(w0).to(base.dtype)  # w0 + t (mean_i(w_i) - w0)


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
    work = work_dtype(base, *tensors)
    b = base.to(work)
    tau = [x.to(work) - b for x in tensors]
    if select_topk < 1:
        mean = ordered_sum(tau) / len(tau)
        var = ordered_sum([(t - mean).square() for t in tau]) / len(tau)  # population variance across models
        k = int(int(torch.count_nonzero(var)) * select_topk)  # a device sync: the count sizes the selection
        if k <= 0:  # nothing selected: every task vector is erased
            return base.clone()
        selected = indicator(torch.ge, var, kth_largest(var.clone(), k), work)
        tau = [t.mul_(selected) for t in tau]
    energy = [t.square().mean().item() for t in tau]  # Python floats (a device sync per tensor)
    total = sum(energy)
    energy = [1.0 / len(tau) if abs(total) < 1e-6 else e / max(total, 1e-6) for e in energy]
    weights = [m * e for m, e in zip(sign_agreement(tau), energy)]  # energy where the sign agrees
    mixed = ordered_sum([t * w for t, w in zip(tau, weights)])
    return (b + mixed / ordered_sum(weights).clamp_min(1e-6)).to(base.dtype)


@merge_method("multislerp", base="optional", min_models=1,
              reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea")
def multislerp(base: Tensor | None, tensors: list[Tensor], *, weight: PerModel, normalize_weights: bool = True,
               eps: float = 1e-8) -> Tensor:
    """Barycentric slerp of the models (of their task vectors x_i with a base, added back to it), weights normalized:

        out = (sum_i w_i |x_i|) m,   m = s / |s|,   s = sum_i w_i x_i / (|x_i| + eps)
    mergekit 0.1.5 also adds the weighted tangent at m, sum_i w_i (u_i - <u_i, m> m) = s - |s| m = 0 (rounding only).
    Where |s| < eps (antipodal inputs) the models mix linearly, sum_i w_i x_i (mergekit raises for more than two).
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    work = work_dtype(base, *tensors)
    origin = base.to(work) if base is not None else torch.zeros((), dtype=work, device=tensors[0].device)
    xs = [x.to(work) - origin for x in tensors]
    w = [wi / _guarded(sum(weight)) for wi in weight] if normalize_weights else weight
    norms = [x.norm().item() for x in xs]
    s = ordered_sum([x * (wi / (n + eps)) for x, wi, n in zip(xs, w, norms)])
    s_norm = s.norm().item()
    out = s.mul_(sum(wi * n for wi, n in zip(w, norms)) / s_norm) if s_norm >= eps else _weighted_sum(xs, w)
    return (origin + out).to((base if base is not None else tensors[0]).dtype)


@merge_method("karcher", base="none", reference="https://arxiv.org/abs/2603.04972")
def karcher(base: None, tensors: list[Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """The Karcher mean of the models' directions u_i = x_i / |x_i| on the unit sphere, times their mean norm:
    m minimizes sum_i theta_i^2, theta_i = acos <m, u_i>, by Riemannian gradient steps from the normalized mean of
    the u_i: v = (1/n) sum_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),  m <- cos|v| m + sin|v| v / |v|, until
    |v| < tol or max_iter steps. Models of norm <= tol have no direction (their norms still count in the mean norm).
    """
    work = work_dtype(*tensors)
    xs = [x.to(work).reshape(-1) for x in tensors]
    norms = [x.norm().item() for x in xs]
    units = [x / n for x, n in zip(xs, norms) if n > tol]
    if len(tensors) == 1 or not units:  # nothing to average, or no direction
        return tensors[0].clone() if len(tensors) == 1 else torch.zeros_like(tensors[0])
    m = ordered_sum(units) / len(units)
    size = m.norm().item()
    m = units[0] if size < tol else m / size
    for _ in range(int(max_iter)):
        v = torch.zeros_like(m)
        for u in units:
            theta = math.acos(_clamp(torch.dot(m, u).item(), -1, 1))
            if theta >= tol:
                v.add_(u - math.cos(theta) * m, alpha=theta / math.sin(theta) / len(units))
        size = v.norm().item()
        if size < tol:
            break
        m = m * math.cos(size) + v * (math.sin(size) / size)
        m /= m.norm()
    return (m * (sum(norms) / len(norms))).reshape(tensors[0].shape).to(tensors[0].dtype)


@merge_method("arcee_fusion", base="required", min_models=1, max_models=1, reference="https://arcee.ai")
def arcee_fusion(base: Tensor, tensors: list[Tensor]) -> Tensor:
    """Take the other model's changes where they matter most: importance s = |x - b| KL(softmax(x) || softmax(b)),
    the KL per vector along the last dim, and out = b + (x - b) [s >= q50 + 1.5 (q75 - q25)], the quantile q of s
    the entry at rank floor(q (n - 1)) of n (all of them: past 10^6 entries mergekit ranks a random sample).
    """
    work = work_dtype(base, tensors[0])
    b, x = base.to(work), tensors[0].to(work)
    delta = x - b
    p, q = torch.softmax(x, -1) + 1e-8, torch.softmax(b, -1) + 1e-8
    s = delta.abs().mul_((p * (p / q).log()).sum(-1, keepdim=True))
    ranked = s.clone()  # selection reorders it
    q25, q50, q75 = (kth_smallest(ranked, int(f * (s.numel() - 1)) + 1) for f in (0.25, 0.5, 0.75))
    return delta.mul_(indicator(torch.ge, s, q50 + 1.5 * (q75 - q25), work)).add_(b).to(base.dtype)


@merge_method("ramplus_tl", base="required", min_models=0, reference="https://arxiv.org/abs/2601.13572")
def ramplus_tl(base: Tensor, tensors: list[Tensor], *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> Tensor:
    """RAM+ (tensor-local). Model i changes the entries m_i = [|tau_i| > epsilon]; where it alone does (c = sum_i m_i
    = 1) it keeps its change times lambda_i, where several do (c > 1) they take the mean of their changes:

        out = base + sum_i m_i tau_i (lambda_i [c = 1] + [c > 1] / c),
        lambda_i = 1 + r clamp(shared_i / max(unique_i, epsilon), 0, alpha)
    with unique_i and shared_i the counts of model i's changed entries where c = 1 and c > 1. RAM is r = 0.
    """
    if not tensors:
        return base.clone()
    work = work_dtype(base, *tensors)
    out = base.to(work)
    taus = [x.to(work) - out for x in tensors]
    changed = [indicator(torch.gt, tau.abs(), epsilon, work) for tau in taus]
    c = ordered_sum(changed)
    alone = indicator(torch.eq, c, 1, work)
    shared_mean = indicator(torch.gt, c, 1, work).div_(c.clamp_min(1))
    for tau, m in zip(taus, changed):
        unique = torch.dot(m.reshape(-1), alone.reshape(-1)).item()
        lam = 1 + r * _clamp((m.sum().item() - unique) / max(unique, epsilon), 0, alpha)
        out = out + tau.mul_(m).mul_(alone * lam + shared_mean)
    return out.to(base.dtype)


@merge_method("ram", base="required", min_models=0, reference="https://arxiv.org/abs/2601.13572")
def ram(base: Tensor, tensors: list[Tensor], *, epsilon: float = 1e-5) -> Tensor:
    """RAM: each entry takes the mean of the changes |tau_i| > epsilon the models make there (RAM+ with r = 0)."""
    return ramplus_tl(base, tensors, r=0.0, alpha=0.0, epsilon=epsilon)


@merge_method("passthrough", base="none", max_models=1)
def passthrough(base: None, tensors: list[Tensor], *, scale: PerModel = 1.0) -> Tensor:
    """The one model's tensor times its `scale` (mergekit's default None is scale 1)."""
    return _weighted_sum(tensors[:1], _each(scale, 1))
