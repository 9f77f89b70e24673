"""Plain float64 reference implementations of the merge methods, written from the formulas (papers and mergekit 0.1.5
semantics) with sorts and loops instead of selection tricks. Used only by tests/test_methods.py.

All inputs are float64 tensors; random masks take the uniform draws `u` (one tensor per model) instead of a key.
"""

from __future__ import annotations

import math

import torch


def _order_desc(x: torch.Tensor) -> list[int]:
    """Flat indices of x by decreasing |x| (inputs in the tests have no ties)."""
    values = x.abs().reshape(-1).tolist()
    return sorted(range(len(values)), key=lambda i: -values[i])


def _mask_from(indices, like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(like.numel(), dtype=torch.float64)
    mask[list(indices)] = 1.0
    return mask.reshape(like.shape)


def magnitude_mask(d, density):
    k = max(1, int(density * d.numel()))
    return _mask_from(_order_desc(d)[:k], d)


def outlier_mask(d, density, gamma):
    n = d.numel()
    keep, top = int(density * n), int(gamma * n)
    dropped_top = min(top, n - keep)  # fewer outliers when both do not fit
    return _mask_from(_order_desc(d)[dropped_top:dropped_top + keep], d)


def della_mask(d, density, epsilon, u):
    """Ranks within the rows along dim 1 (mergekit's argsort(dim=1)); a 1-D tensor is one row."""
    x = d.reshape(1, -1) if d.ndim < 2 else d
    moved = x.movedim(1, -1).shape  # the rows along dim 1, each last
    rows, u = x.movedim(1, -1).reshape(-1, x.shape[1]), u.reshape(x.shape).movedim(1, -1).reshape(-1, x.shape[1])
    mask = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        row = rows[r].abs().tolist()
        n = len(row)
        for rank, j in enumerate(sorted(range(n), key=lambda j: row[j])):
            p = density - epsilon + 2 * epsilon * (rank / (n - 1) if n > 1 else 0.5)
            mask[r, j] = float(u[r, j] < p)
    return mask.reshape(moved).movedim(-1, 1).reshape(d.shape)


def sparsify(d, method, density, rescale, gamma=None, epsilon=None, u=None):
    if density >= 1:
        return d
    if density <= 0:
        return torch.zeros_like(d)
    mask = {
        "magnitude": lambda: magnitude_mask(d, density),
        "random": lambda: (u < density).double(),
        "magnitude_outliers": lambda: outlier_mask(d, density, gamma),
        "della_magprune": lambda: della_mask(d, density, epsilon, u),
    }[method]()
    kept = d * mask
    l1, l1_kept = d.abs().sum().item(), kept.abs().sum().item()
    if rescale and l1 >= 1e-7 and l1_kept >= 1e-7:
        kept = kept * (l1 / l1_kept)
    return kept


def task_arithmetic(base, tensors, weight, density, *, consensus, sparsifier, normalize, rescale, lam=1.0,
                    gamma=None, epsilon=None, u=None):
    """base + lam * sum_i w_i m_i d_i / D, d_i sparsified deltas, m_i TIES sign agreement of w_i d_i."""
    n = len(tensors)
    d = []
    for i, t in enumerate(tensors):
        delta = t - base
        if sparsifier:
            delta = sparsify(delta, sparsifier, density[i], rescale, gamma and gamma[i], epsilon and epsilon[i],
                             u and u[i])
        d.append(weight[i] * delta)
    if consensus:
        total = sum(d)
        majority = torch.where(total >= 0, 1.0, -1.0).double()
        m = [(di.sign() == majority).double() for di in d]  # sign(0) = 0 agrees with nothing
    else:
        m = [torch.ones_like(base) for _ in range(n)]
    mixed = sum(m[i] * d[i] for i in range(n))
    if normalize:
        divisor = sum(weight[i] * m[i] for i in range(n))
        if consensus:
            divisor = torch.where(divisor == 0, 1.0, divisor).double()
        else:
            divisor = torch.where(divisor.abs() < 1e-8, 1.0, divisor).double()
        mixed = mixed / divisor
    return base + lam * mixed


def linear(tensors, weight, normalize=True):
    mixed = sum(w * t for w, t in zip(weight, tensors))
    total = sum(weight)
    return mixed / (total if abs(total) >= 1e-8 else 1.0) if normalize else mixed


def slerp(t, a, b):
    """Slerp of the flattened tensors, coefficients on the unnormalized vectors."""
    na, nb = a.norm().item(), b.norm().item()
    na, nb = na if na > 1e-8 else 1.0, nb if nb > 1e-8 else 1.0
    cos = max(-1.0, min(1.0, (a * b).sum().item() / (na * nb)))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def _slerp_vectors(t, a, b):
    """nuslerp on one pair of vectors."""
    ua, ub = a / max(a.norm().item(), 1e-7), b / max(b.norm().item(), 1e-7)
    cos = max(-1.0, min(1.0, (ua * ub).sum().item()))
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def nuslerp(base, tensors, weight, row_wise=False, flatten=True):
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    origin = base if base is not None else torch.zeros_like(tensors[0])
    a, b = tensors[0] - origin, tensors[1] - origin
    if flatten or a.ndim == 1:
        out = _slerp_vectors(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    elif row_wise:  # vectors along dim 0 (columns of a 2-D tensor)
        out = torch.stack([_slerp_vectors(t, a[:, j], b[:, j]) for j in range(a.shape[1])], dim=1)
    else:  # vectors along the last dim (rows)
        out = torch.stack([_slerp_vectors(t, a[i], b[i]) for i in range(a.shape[0])])
    return origin + out


def nearswap(t, a, b):
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


def _model_stock_vectors(w0, ws):
    k = len(ws)
    off = [w - w0 for w in ws]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            c = (off[i] * off[j]).sum().item() / max(off[i].norm().item() * off[j].norm().item(), 1e-6)
            cosines.append(max(-1.0, min(1.0, c)))
    cos = sum(cosines) / len(cosines)
    denom = 1 + (k - 1) * cos
    t = 0.0 if abs(denom) < 1e-6 else k * cos / denom
    return t * sum(ws) / k + (1 - t) * w0


def model_stock(base, tensors, filter_wise=False):
    if not filter_wise or base.ndim == 1:
        return _model_stock_vectors(base.reshape(-1), [w.reshape(-1) for w in tensors]).reshape(base.shape)
    return torch.stack([_model_stock_vectors(base[r], [w[r] for w in tensors]) for r in range(base.shape[0])])


def sce(base, tensors, select_topk=1.0):
    n = len(tensors)
    tau = [t - base for t in tensors]
    if select_topk < 1:
        mean = sum(tau) / n
        var = sum((x - mean) ** 2 for x in tau) / n
        k = int(int((var != 0).sum()) * select_topk)
        mask = _mask_from(_order_desc(var)[:k], var) if k > 0 else torch.zeros_like(var)
        tau = [x * mask for x in tau]
    energy = [x.pow(2).mean().item() for x in tau]
    total = sum(energy)
    energy = [1.0 / n] * n if abs(total) < 1e-6 else [e / total for e in energy]
    majority = torch.where(sum(tau) >= 0, 1.0, -1.0).double()
    weights = [energy[i] * (tau[i].sign() == majority).double() for i in range(n)]
    return base + sum(w * x for w, x in zip(weights, tau)) / sum(weights).clamp(min=1e-6)


def multislerp(base, tensors, weight, normalize_weights=True, eps=1e-8):
    """Barycentric slerp as the blog describes it: the unit vectors' weighted mean direction, the weighted tangent
    there, the exponential map back to the sphere, times the weighted mean norm."""
    origin = base if base is not None else torch.zeros_like(tensors[0])
    xs = [(t - origin).reshape(-1) for t in tensors]
    if len(xs) == 1:
        return tensors[0]
    total = sum(weight)
    w = [x / (total if abs(total) >= 1e-8 else 1.0) for x in weight] if normalize_weights else list(weight)
    units = [x / (x.norm().item() + eps) for x in xs]
    mean = sum(wi * u for wi, u in zip(w, units))
    if mean.norm().item() < eps:  # antipodal inputs: linear
        return origin + sum(wi * x for wi, x in zip(w, xs)).reshape(origin.shape)
    m = mean / mean.norm().item()
    tangent = sum(wi * (u - (u * m).sum().item() * m) for wi, u in zip(w, units))
    tn = tangent.norm().item() + eps
    out = (math.cos(tn) * m + math.sin(tn) / tn * tangent) * sum(wi * x.norm().item() for wi, x in zip(w, xs))
    return origin + out.reshape(origin.shape)


def karcher(tensors, max_iter=10, tol=1e-5):
    """Weighted-equally Karcher mean on the unit sphere by Riemannian gradient steps, times the mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    xs = [t.reshape(-1) for t in tensors]
    norms = [x.norm().item() for x in xs]
    units = [x / n for x, n in zip(xs, norms) if n > tol]
    if not units:
        return torch.zeros_like(tensors[0])
    m = sum(units) / len(units)
    m = units[0] if m.norm().item() < tol else m / m.norm().item()
    for _ in range(max_iter):
        step = torch.zeros_like(m)
        for u in units:
            theta = math.acos(max(-1.0, min(1.0, (m * u).sum().item())))
            if theta >= tol:  # log map of u at m
                step += theta / math.sin(theta) * (u - math.cos(theta) * m) / len(units)
        size = step.norm().item()
        if size < tol:
            break
        m = math.cos(size) * m + math.sin(size) * step / size  # exp map
        m = m / m.norm().item()
    return (sum(norms) / len(norms) * m).reshape(tensors[0].shape)


def arcee_fusion(base, x):
    """base + (x - base) where importance |x - base| * KL(softmax(x) || softmax(base)) (per row) >= q50 + 1.5 IQR, the
    quantiles read off the sorted importances at index floor(q (n - 1))."""
    p, q = torch.softmax(x, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance = (x - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    ordered = importance.reshape(-1).sort().values
    q25, q50, q75 = (ordered[int(f * (ordered.numel() - 1))] for f in (0.25, 0.5, 0.75))
    return base + (x - base) * (importance >= q50 + 1.5 * (q75 - q25)).double()


def ram(base, tensors, epsilon=1e-5, r=0.0, alpha=0.0):
    """Per entry: the changes |tau_i| > epsilon; one model's change is kept whole (times lambda_i), several models'
    averaged. lambda_i = 1 + r min(max(shared_i / max(unique_i, epsilon), 0), alpha) (RAM+; r = 0 is RAM)."""
    taus = [(t - base).reshape(-1) for t in tensors]
    changed = [(tau.abs() > epsilon).double() for tau in taus]
    count = sum(changed)
    out = torch.zeros_like(taus[0])
    for tau, c in zip(taus, changed):
        shared, unique = (c * (count > 1)).sum().item(), (c * (count == 1)).sum().item()
        lam = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
        for j in range(tau.numel()):
            if c[j]:
                out[j] += tau[j] * lam if count[j] == 1 else tau[j] / count[j]
    return base + out.reshape(base.shape)
