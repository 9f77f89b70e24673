"""Merge methods against float64 references written from the formulas, mergekit 0.1.5 where installed, known answers,
and properties every registry entry must have (identity, dtype kept, normalisation). Runs on CPU, and on CUDA too when
torch sees a GPU.

Tolerances: float64 inputs match the float64 references to 1e-10. Low-precision inputs are compared with the float64
result of the same (upcast) inputs: float32 within 1e-5, float16 within 2e-3, bfloat16 within 1.6e-2 (about two ulps
at the output's scale), relative plus absolute.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import reference_methods as ref
from evomerge.merge.methods import TASK_ARITHMETIC_FAMILY, generalized_task_arithmetic, sign_agreement
from evomerge.merge.registry import METHODS, get_method
from evomerge.merge.rng import MaskKey, _mix32_, draws, key_words
from evomerge.merge.sparsify import apply_rule, keep_rule, rescale_factor


def uniforms(keys: list[MaskKey], shape, device="cpu") -> torch.Tensor:
    """[len(keys), *shape]: row i holds the U[0, 1) draws of keys[i]."""
    return draws(key_words(keys, device), shape)


def uniform(key: MaskKey, shape, device="cpu") -> torch.Tensor:
    return uniforms([key], shape, device)[0]


def keep_mask(d, method, density, *, u=None, **extra):  # 0/1 masks; None: all kept
    return apply_rule(d, method, keep_rule(d.clone(), method, density, **extra), **({} if u is None else {"u": u}))


def sparsify(d, method, density, *, rescale, **extra):
    mask = keep_mask(d, method, density, **extra)
    return d.clone() if mask is None else d * mask * (rescale_factor(d, mask) if rescale else 1.0)


def magnitude(d, density):  # 0/1 masks
    return keep_mask(d, "magnitude", density)


def magnitude_outliers(d, density, gamma):
    return keep_mask(d, "magnitude_outliers", density, gamma=gamma)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(37,), (6, 9)]
F64 = torch.float64

# Non-default parameters for every registered method, for up to 3 models (lists are cut to the model count).
TYPICAL = {
    "linear": dict(weight=[0.5, 0.3, 0.4]),
    "task_arithmetic": dict(weight=[0.7, -0.3, 1.2], lambda_=0.8),
    "ties": dict(weight=[0.7, 0.5, 1.2], density=[0.3, 0.6, 0.9]),
    "dare_ties": dict(weight=[0.7, 0.5, 1.2], density=[0.4, 0.7, 0.9]),
    "dare_linear": dict(weight=[0.7, 0.5, 1.2], density=[0.4, 0.7, 0.9]),
    "breadcrumbs": dict(weight=[0.7, 0.5, 1.2], density=[0.3, 0.6, 0.8], gamma=[0.05, 0.1, 0.2]),
    "breadcrumbs_ties": dict(weight=[0.7, 0.5, 1.2], density=[0.3, 0.6, 0.8], gamma=[0.05, 0.1, 0.2]),
    "della": dict(weight=[0.7, 0.5, 1.2], density=[0.4, 0.5, 0.7], epsilon=[0.1, 0.2, 0.25]),
    "della_linear": dict(weight=[0.7, 0.5, 1.2], density=[0.4, 0.5, 0.7], epsilon=[0.1, 0.2, 0.25]),
    "slerp": dict(t=0.3),
    "nuslerp": dict(weight=[0.3, 0.9]),
    "nearswap": dict(t=0.5),
    "model_stock": {},
    "sce": dict(select_topk=0.5),
    "passthrough": dict(scale=[0.7]),
    "multislerp": dict(weight=[0.5, 0.3, 0.4]),
    "karcher": dict(max_iter=20),
    "arcee_fusion": {},
    "ram": dict(epsilon=0.3),
    "ramplus_tl": dict(r=0.5, alpha=0.4, epsilon=0.3),
}

# (method, parameter overrides) compared with the references; base-optional methods run with and without a base.
VARIANTS = [(name, {}) for name in TYPICAL] + [
    ("linear", dict(normalize=False)),
    ("task_arithmetic", dict(normalize=True)),
    ("ties", dict(rescale=True)),
    ("ties", dict(normalize=False, lambda_=1.5)),
    ("dare_linear", dict(rescale=False)),
    ("dare_linear", dict(density=[1.0, 0.0, 0.5])),  # kept whole (still weighted), dropped, sparsified
    ("dare_ties", dict(normalize=True)),
    ("breadcrumbs", dict(rescale=True, gamma=[0.0, 0.01, 0.5])),
    ("della", dict(normalize=False, rescale=False)),
    ("slerp", dict(t=0.0)),
    ("slerp", dict(t=1.0)),
    ("nuslerp", dict(nuslerp_flatten=False)),
    ("nuslerp", dict(nuslerp_flatten=False, nuslerp_row_wise=True)),
    ("nuslerp", dict(weight=[0.5, -0.5])),
    ("model_stock", dict(filter_wise=True)),
    ("sce", dict(select_topk=1.0)),
    ("multislerp", dict(normalize_weights=False)),
    ("multislerp", dict(weight=[0.5, -0.5, 0.2])),  # weights summing to 0 (two models) divide by 1
    ("karcher", dict(max_iter=1, tol=1e-3)),
    ("ram", dict(epsilon=1e-5)),  # every entry changed by every model: the plain mean
    ("ramplus_tl", dict(epsilon=1.0)),  # few changes, many of them unique
]


def model_count(name: str, wanted: int = 3) -> int:
    spec = get_method(name)
    return max(spec.min_models, min(wanted, spec.max_models or wanted))


def keys_for(n: int, tensor: str = "w", seed: int = 0) -> list[MaskKey]:
    return [MaskKey(seed, tensor, f"model{i}") for i in range(n)]


def params_for(name: str, n: int, **overrides) -> dict:
    """TYPICAL parameters (with overrides) cut to n models, plus RNG keys for randomized methods."""
    params = {**TYPICAL[name], **overrides}
    params = {k: v[:n] if isinstance(v, list) else v for k, v in params.items()}
    if get_method(name).randomized:
        params["key"] = keys_for(n)
    return params


def inputs(shape, n: int, *, dtype=F64, device="cpu", seed=0, with_base=True):
    g = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(shape, generator=g, dtype=F64).to(dtype=dtype, device=device)
    base = draw() if with_base else None
    return base, [draw() for _ in range(n)]


def run(name, base, tensors, params):
    return get_method(name).fn(base, tensors, **params)


def reference(name, base, tensors, params):
    """The float64 reference for one call (same arguments, RNG keys turned into their uniform draws)."""
    b = base.double().cpu() if base is not None else None
    xs = [t.double().cpu() for t in tensors]
    p = {k: v for k, v in params.items() if k != "key"}
    if name in TASK_ARITHMETIC_FAMILY:
        member, spec = TASK_ARITHMETIC_FAMILY[name], get_method(name)
        u = [uniform(k, b.shape).double() for k in params["key"]] if "key" in params else None
        return ref.task_arithmetic(
            b, xs, p["weight"], p.get("density", [1.0] * len(xs)), consensus=member.consensus,
            sparsifier=member.sparsifier, normalize=p.get("normalize", spec.param("normalize").default),
            rescale=p.get("rescale", spec.param("rescale").default), lam=p.get("lambda_", 1.0),
            gamma=p.get("gamma"), epsilon=p.get("epsilon"), u=u)
    return {
        "linear": lambda: ref.linear(xs, p["weight"], p.get("normalize", True)),
        "slerp": lambda: ref.slerp(p["t"], b, xs[0]),
        "nuslerp": lambda: ref.nuslerp(b, xs, p["weight"], p.get("nuslerp_row_wise", False),
                                       p.get("nuslerp_flatten", True)),
        "nearswap": lambda: ref.nearswap(p["t"], b, xs[0]),
        "model_stock": lambda: ref.model_stock(b, xs, p.get("filter_wise", False)),
        "sce": lambda: ref.sce(b, xs, p.get("select_topk", 1.0)),
        "passthrough": lambda: xs[0] * p["scale"][0],
        "multislerp": lambda: ref.multislerp(b, xs, p["weight"], p.get("normalize_weights", True)),
        "karcher": lambda: ref.karcher(xs, p.get("max_iter", 10), p.get("tol", 1e-5)),
        "arcee_fusion": lambda: ref.arcee_fusion(b, xs[0]),
        "ram": lambda: ref.ram(b, xs, p.get("epsilon", 1e-5)),
        "ramplus_tl": lambda: ref.ram(b, xs, p.get("epsilon", 1e-5), p.get("r", 0.1), p.get("alpha", 0.2)),
    }[name]()


def assert_close(out, expected, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol)


def _variant_id(v):
    name, over = v
    return name + "".join(f"-{k}={v}" for k, v in over.items())


# ---------------------------------------------------------------------------------------------------------------------
# every method against the float64 reference


def test_every_registered_method_has_cases():
    assert set(TYPICAL) == set(METHODS)
    assert {name for name, _ in VARIANTS} == set(METHODS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_matches_float64_reference(variant, shape, device):
    name, overrides = variant
    spec = get_method(name)
    for n in sorted({model_count(name, 2), model_count(name, 3)}):
        for with_base in [True, False] if spec.base == "optional" else [spec.base == "required"]:
            base, tensors = inputs(shape, n, device=device, seed=n, with_base=with_base)
            params = params_for(name, n, **overrides)
            out = run(name, base, tensors, params)
            assert out.shape == tensors[0].shape and out.device == tensors[0].device
            assert_close(out, reference(name, base, tensors, params), F64)


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_guarded_branches_match_the_reference(variant, dtype):
    """Parallel, anti-parallel and zero inputs (the guarded branches) meet the reference, in float64 and float32."""
    name, overrides = variant
    n = model_count(name)
    base, tensors = inputs((6, 9), n, dtype=dtype, seed=7)
    cases = [tensors, [2 * base for _ in tensors], [-base for _ in tensors], [base.clone() for _ in tensors]]
    if name == "sce":  # equal task vectors: their variances across models are rounding noise, its top-k arbitrary
        cases = cases[:1]
    for xs in cases:
        params = params_for(name, n, **overrides)
        out = run(name, base, xs, params)
        assert out.device.type == "cpu" and torch.isfinite(out).all()
        assert_close(out, reference(name, base, xs, params), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_dtype_kept_and_close_to_float64(name, dtype):
    base, tensors = inputs((6, 9), model_count(name), dtype=dtype, seed=3,
                           with_base=get_method(name).base != "none")
    params = params_for(name, len(tensors))
    out = run(name, base, tensors, params)
    assert out.dtype == dtype and out.shape == tensors[0].shape
    exact = run(name, base.double() if base is not None else None, [t.double() for t in tensors], params)
    assert_close(out, exact, dtype)


@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_identical_inputs_give_that_input(name):
    """Every method merging copies of one tensor returns it (required parameters 1, t 0.5, the rest default)."""
    spec = get_method(name)
    n = model_count(name)
    x = torch.randn(5, 7, dtype=F64, generator=torch.Generator().manual_seed(4))
    params = {p.arg: ([1.0] * n if p.per_model else 0.5) for p in spec.params if p.required}
    if spec.randomized:
        params["key"] = keys_for(n)
    out = run(name, None if spec.base == "none" else x, [x] * n, params)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# mergekit 0.1.5 itself (deterministic methods; masks of DARE/DELLA cannot match by design)


def _mergekit_merge(name, base, tensors, params):
    mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergekit.merge_methods.base import TensorGroup

    spec = get_method(name)
    by_arg = {p.arg: p.name for p in spec.params}
    group = TensorGroup.from_tensors(([base] if base is not None else []) + tensors,
                                     base_index=0 if base is not None else None)
    return mk_registry.get(name)([group], parameters={by_arg[k]: v for k, v in params.items()})[0]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not get_method(v[0]).randomized], ids=_variant_id)
def test_matches_mergekit(variant):
    name, overrides = variant
    spec = get_method(name)
    for shape in SHAPES:
        for with_base in [True, False] if spec.base == "optional" else [spec.base == "required"]:
            base, tensors = inputs(shape, model_count(name), seed=11, with_base=with_base)
            params = params_for(name, len(tensors), **overrides)
            # mergekit's RAM+ factors lambda_i are float32 (torch's default dtype) whatever the inputs' dtype
            assert_close(run(name, base, tensors, params), _mergekit_merge(name, base, tensors, params),
                         torch.float32 if name == "ramplus_tl" else F64)


def test_parameter_schema_matches_mergekit():
    mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergekit.merge_methods.base import MISSING, ParameterScope

    base_policy = {"required": "required", "optional": "optional", "none": ("ignored", "forbidden")}
    for name, spec in METHODS.items():
        theirs = mk_registry.get(name).spec
        assert theirs.contract.base.value in base_policy[spec.base], name
        assert {p.name for p in spec.params} == {p.name for p in theirs.parameters}, name
        for p in theirs.parameters:
            ours = spec.param(p.name)
            assert ours.per_model == (p.scope != ParameterScope.SHARED), (name, p.name)
            if (name, p.name) == ("passthrough", "scale"):
                assert ours.default == 1.0 and p.default is None  # None means "unscaled"
            else:
                assert ours.default == (None if p.default is MISSING else p.default), (name, p.name)


def test_task_arithmetic_family_defaults():
    expected = {  # (normalize, rescale), mergekit 0.1.5 merge_methods/registry.py
        "task_arithmetic": (False, False), "ties": (True, False), "dare_ties": (False, True),
        "dare_linear": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
        "della": (True, True), "della_linear": (False, True),
    }
    assert set(expected) == set(TASK_ARITHMETIC_FAMILY)
    for name, (normalize, rescale) in expected.items():
        spec = get_method(name)
        assert (spec.param("normalize").default, spec.param("rescale").default) == (normalize, rescale), name
        assert spec.param("lambda").default == 1.0 and spec.param("density").default == 1.0
        assert spec.param("weight").required and spec.base == "required"
    assert get_method("breadcrumbs").param("gamma").default == 0.01
    assert get_method("della").param("epsilon").default == 0.15
    randomized = [n for n, s in METHODS.items() if s.randomized]
    assert randomized == ["dare_ties", "dare_linear", "della", "della_linear"]


# ---------------------------------------------------------------------------------------------------------------------
# the task-arithmetic family: known answers


def ta(name, base, tensors, **params):
    n = len(tensors)
    if get_method(name).randomized:
        params.setdefault("key", keys_for(n))
    return run(name, torch.tensor(base, dtype=F64), [torch.tensor(t, dtype=F64) for t in tensors], params)


def test_ties_elects_signs_over_weighted_deltas():
    # deltas +1 and -3; weights 1 and -1 make both weighted deltas positive: both agree (unweighted, -3 would win)
    out = ta("ties", [0.0], [[1.0], [-3.0]], weight=[1.0, -1.0], normalize=False)
    assert out.tolist() == [4.0]


def test_ties_zero_deltas_never_agree():
    # weighted deltas 0, +1, -0.5: majority +, only model 2 agrees, divisor 1 (2 if a zero counted as agreeing)
    out = ta("ties", [0.0], [[0.0], [1.0], [-0.5]], weight=[1.0, 1.0, 1.0])
    assert out.tolist() == [1.0]
    # a zero sum elects +
    assert ta("ties", [0.0], [[1.0], [-1.0]], weight=[1.0, 1.0]).tolist() == [1.0]


def test_divisor_guards():
    # consensus: agreeing weights 1 and -1 sum to 0 -> divide by 1
    assert ta("ties", [0.0], [[1.0], [-1.0]], weight=[1.0, -1.0]).tolist() == [2.0]
    # no consensus: |sum of weights| < 1e-8 -> 1, above it divides
    assert ta("task_arithmetic", [0.0], [[1.0], [3.0]], weight=[0.5, -0.5], normalize=True).tolist() == [-1.0]
    out = ta("task_arithmetic", [0.0], [[1.0], [3.0]], weight=[0.5, -0.5 + 1e-9], normalize=True)
    assert out.tolist() == pytest.approx([-1.0])
    out = ta("task_arithmetic", [0.0], [[1.0], [3.0]], weight=[0.5, -0.5 + 1e-7], normalize=True)
    assert out.tolist() == pytest.approx([(0.5 - 1.5 + 3e-7) / 1e-7])


def test_lambda_scales_the_merged_delta():
    base, tensors = inputs((4, 5), 2, seed=5)
    for name in TASK_ARITHMETIC_FAMILY:
        params = params_for(name, 2)
        one = run(name, base, tensors, {**params, "lambda_": 1.0})
        torch.testing.assert_close(run(name, base, tensors, {**params, "lambda_": 0.3}) - base, 0.3 * (one - base))


@pytest.mark.parametrize("name", sorted(TASK_ARITHMETIC_FAMILY))
def test_normalization(name):
    """normalize=True: scaling every weight leaves the merge unchanged; normalize=False: the delta scales with them."""
    base, tensors = inputs((6, 9), 3, seed=6)
    params = params_for(name, 3)
    scaled = {**params, "weight": [2.5 * w for w in params["weight"]]}
    for_normalize = lambda p, flag: run(name, base, tensors, {**p, "normalize": flag})
    torch.testing.assert_close(for_normalize(scaled, True), for_normalize(params, True))
    torch.testing.assert_close(for_normalize(scaled, False) - base, 2.5 * (for_normalize(params, False) - base))


@pytest.mark.parametrize("name", sorted(TASK_ARITHMETIC_FAMILY))
def test_one_model_with_weight_one_is_that_model(name):
    base, (x,) = inputs((6, 9), 1, seed=7)
    params = {"weight": [1.0], **({"key": keys_for(1)} if get_method(name).randomized else {})}
    torch.testing.assert_close(run(name, base, [x], params), x)
    assert run(name, base, [], {**params, "weight": []}).equal(base)  # mergekit: no other model gives the base


def test_ties_at_density_one_is_task_arithmetic_with_sign_mask():
    base, tensors = inputs((6, 9), 3, seed=8)
    w = [0.7, 0.5, 1.2]
    deltas = torch.stack([w_i * (t - base) for w_i, t in zip(w, tensors)])
    expected = base + (deltas * torch.stack(sign_agreement(deltas))).sum(0)
    torch.testing.assert_close(run("ties", base, tensors, dict(weight=w, normalize=False)), expected)
    # with every delta of one sign, TIES changes nothing
    same_sign = [base + (t - base).abs() for t in tensors]
    for normalize in (True, False):
        p = dict(weight=w, normalize=normalize)
        torch.testing.assert_close(run("ties", base, same_sign, p), run("task_arithmetic", base, same_sign, p))


def test_generalized_function_is_the_registered_one():
    base, tensors = inputs((6, 9), 2, seed=9)
    member = TASK_ARITHMETIC_FAMILY["della"]
    direct = generalized_task_arithmetic(base, tensors, member=member, weight=[0.5, 0.8], density=[0.5, 0.5],
                                         epsilon=[0.1, 0.1], normalize=True, rescale=True, lambda_=1.0,
                                         key=keys_for(2))
    registered = run("della", base, tensors, dict(weight=[0.5, 0.8], density=[0.5, 0.5], epsilon=[0.1, 0.1],
                                                  key=keys_for(2)))
    assert direct.equal(registered)


# ---------------------------------------------------------------------------------------------------------------------
# sparsifiers


def test_magnitude_keeps_top_k_and_all_ties_at_the_threshold():
    d = torch.tensor([0.5, -5.0, 3.0, 1.0, -3.0, 3.0])
    assert magnitude(d, 0.5).dtype == d.dtype and magnitude(d.double(), 0.5).dtype == torch.float64  # 0/1 masks
    assert magnitude(d, 2 / 6).tolist() == [False, True, True, False, True, True]  # k = 2, three tied at 3
    d = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for density in (0.001, 0.0001, 0.25, 0.999):
        k = max(1, int(density * 1000))
        kept = magnitude(d, density).bool()
        assert kept.sum() == k and d.abs()[kept].min() > d.abs()[~kept].max()
    assert sparsify(d, "magnitude", 1.0, rescale=True).equal(d)
    assert sparsify(d, "magnitude", 1.5, rescale=False).equal(d)
    assert not sparsify(d, "magnitude", 0.0, rescale=False).any()
    assert not sparsify(d, "magnitude", -0.1, rescale=True).any()


def test_rescale_keeps_the_l1_norm():
    d = torch.randn(40, 30, dtype=F64, generator=torch.Generator().manual_seed(1))
    u = uniform(MaskKey(0, "w", "a"), d.shape)
    for method, extra in [("magnitude", {}), ("random", {"u": u}), ("magnitude_outliers", {"gamma": 0.05}),
                          ("della_magprune", {"epsilon": 0.1, "u": u})]:
        out = sparsify(d, method, 0.3, rescale=True, **extra)
        assert out.abs().sum().item() == pytest.approx(d.abs().sum().item())
        kept = out != 0
        ratio = d.abs().sum() / d[kept].abs().sum()  # the L1 ratio, not 1 / density
        torch.testing.assert_close(out[kept], d[kept] * ratio)
    assert not sparsify(torch.zeros(5), "magnitude", 0.5, rescale=True).any()  # norm below eps: no rescale


def test_dare_rescale_is_the_l1_ratio_not_one_over_density():
    d = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], dtype=F64)
    key = MaskKey(3, "w", "a")
    keep = uniform(key, d.shape) < 0.5
    out = sparsify(d, "random", 0.5, rescale=True, u=uniform(key, d.shape))
    torch.testing.assert_close(out, d * keep * (36.0 / d[keep].sum()))
    assert 36.0 / d[keep].sum() != 1 / 0.5


def test_breadcrumbs_without_outliers_keeps_the_top_density():
    d = torch.randn(200, generator=torch.Generator().manual_seed(2))
    order = d.abs().argsort(descending=True)
    for gamma in (0.0, 0.004):  # int(gamma * 200) == 0: nothing to drop on top
        kept = magnitude_outliers(d, 0.3, gamma=gamma).bool()
        assert kept.sum() == 60 and kept[order[:60]].all()
    kept = magnitude_outliers(d, 0.3, gamma=0.05).bool()  # drop the 10 largest, keep the next 60
    assert kept.sum() == 60 and kept[order[10:70]].all()
    kept = magnitude_outliers(d, 0.9, gamma=0.2).bool()  # 180 + 40 > 200: only 20 outliers dropped
    assert kept.sum() == 180 and kept[order[20:]].all()
    assert not magnitude_outliers(d, 0.004, gamma=0.1).any()  # int(density * 200) == 0
    ties = torch.tensor([9.0, 4.0, 4.0, 3.0, 2.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    assert magnitude_outliers(ties, 0.4, gamma=0.1).tolist() == [False, True, True, True, True, True] + [False] * 4


def test_della_keep_probability_is_ranked_per_row():
    rows, cols, density, epsilon = 4000, 11, 0.5, 0.2
    d = torch.randn(rows, cols, dtype=F64, generator=torch.Generator().manual_seed(3))
    kept = sparsify(d, "della_magprune", density, rescale=False, epsilon=epsilon, u=uniform(MaskKey(0, "w", "a"), d.shape)) != 0
    rank = d.abs().argsort(dim=1).argsort(dim=1)
    for r in range(cols):
        p = density - epsilon + 2 * epsilon * r / (cols - 1)
        frac = kept[rank == r].double().mean().item()
        assert abs(frac - p) < 5 * (p * (1 - p) / rows) ** 0.5, (r, frac, p)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 6, 3, 2)], ids=str)
@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_ranks_along_dim_1_of_tensors_of_three_or_more_dims(name, shape, dtype):
    base, tensors = inputs(shape, 2, dtype=dtype, seed=12)
    params = params_for(name, 2)
    out = run(name, base, tensors, params)
    assert out.shape == shape and out.dtype == dtype
    assert_close(out, reference(name, base, tensors, params), dtype)


def test_della_checks_epsilon():
    d = torch.randn(4, 4)
    for density, epsilon in [(0.9, 0.1), (0.1, 0.1), (0.5, 0.6)]:
        with pytest.raises(ValueError, match="density"):
            sparsify(d, "della_magprune", density, rescale=True, epsilon=epsilon, u=uniform(MaskKey(0, "w", "a"), d.shape))
    assert sparsify(d, "della_magprune", 1.0, rescale=True, epsilon=0.6, u=uniform(MaskKey(0, "w", "a"), d.shape)).equal(d)
    one = sparsify(torch.ones(3, 1), "della_magprune", 0.5, rescale=False, epsilon=0.1, u=torch.rand(3, 1))
    assert one.isfinite().all()  # rows of one entry get probability `density`


def test_dare_keeps_about_density():
    n, density = 100_000, 0.3
    kept = (sparsify(torch.ones(n), "random", density, rescale=False, u=uniform(MaskKey(0, "w", "a"), (n,))) != 0).sum().item()
    assert abs(kept - density * n) < 5 * (n * density * (1 - density)) ** 0.5


# ---------------------------------------------------------------------------------------------------------------------
# other methods: known answers


def test_interpolation_end_points():
    base, (a, b) = inputs((6, 9), 2, seed=10)
    slerp, nuslerp, nearswap = (get_method(n).fn for n in ("slerp", "nuslerp", "nearswap"))
    torch.testing.assert_close(slerp(base, [a], t=0.0), base)
    torch.testing.assert_close(slerp(base, [a], t=1.0), a)
    torch.testing.assert_close(slerp(base, [2 * base], t=0.25), 1.25 * base)  # parallel: linear
    for b0 in (base, None):
        torch.testing.assert_close(nuslerp(b0, [a, b], weight=[1.0, 0.0]), a)
        torch.testing.assert_close(nuslerp(b0, [a, b], weight=[0.0, 2.0]), b)
    torch.testing.assert_close(nearswap(base, [a], t=0.0), base)
    torch.testing.assert_close(nearswap(base, [a], t=1e6), a)
    lin = get_method("linear").fn
    torch.testing.assert_close(lin(None, [a], weight=[1.0]), a)
    torch.testing.assert_close(lin(None, [a, b], weight=[2.0, 2.0]), lin(None, [a, b], weight=[0.5, 0.5]))
    torch.testing.assert_close(lin(None, [a, b], weight=[1.0, -1.0]), a - b)  # zero weight sum: divide by 1
    assert get_method("passthrough").fn(None, [a], scale=[1.0]).equal(a)


def test_slerp_is_spherical_on_orthogonal_unit_vectors():
    out = get_method("slerp").fn(torch.tensor([1.0, 0.0]), [torch.tensor([0.0, 1.0])], t=1 / 3)
    torch.testing.assert_close(out, torch.tensor([3**0.5 / 2, 0.5]))


def test_model_stock_known_answer_and_singular_guard():
    fn = get_method("model_stock").fn
    w0 = torch.zeros(2, dtype=F64)
    # orthogonal offsets: cos 0 -> t 0 -> the base
    assert fn(w0, [torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)]).tolist() == [0, 0]
    # offsets at 60 degrees: cos 0.5, t = 2 * 0.5 / 1.5
    a, b = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.5, 3**0.5 / 2], dtype=F64)
    torch.testing.assert_close(fn(w0, [a, b]), (2 / 3) * (a + b) / 2)
    # opposite offsets: 1 + cos = 0 -> the base, not inf
    assert fn(w0, [a, -a]).tolist() == [0, 0]


def test_sce_energy_weights_and_selection():
    fn = get_method("sce").fn
    base = torch.zeros(4, dtype=F64)
    t1, t2 = torch.tensor([1.0, 1.0, -2.0, 0.1], dtype=F64), torch.tensor([3.0, -1.5, -2.0, 0.1], dtype=F64)
    e1, e2 = (t1**2).mean(), (t2**2).mean()
    w1, w2 = e1 / (e1 + e2), e2 / (e1 + e2)
    # entry 1: the majority sign is -, t1 is erased
    expected = torch.tensor([(w1 * 1 + w2 * 3) / (w1 + w2), -1.5, -2.0, 0.1], dtype=F64)
    torch.testing.assert_close(fn(base, [t1, t2]), expected)
    # select_topk 0.5 of the 2 nonzero variances (1 and 1.5625) keeps entry 1 only; energies follow the selection
    torch.testing.assert_close(fn(base, [t1, t2], select_topk=0.5), torch.tensor([0, -1.5, 0, 0], dtype=F64))
    # variances tied at the threshold are all kept
    t2[1] = -1.0
    assert (fn(base, [t1, t2], select_topk=0.5)[:2] != 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# counter-based RNG


def _lowbias32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


@pytest.mark.parametrize("device", DEVICES)
def test_mix32_is_lowbias32(device):
    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + list(range(12345, 2**32, 2**32 // 97))
    bits = torch.tensor(xs, dtype=torch.int64, device=device).to(torch.int32)  # the uint32 values as int32 bits
    out = _mix32_(bits, torch.empty_like(bits)).to(torch.int64).bitwise_and_(0xFFFFFFFF).tolist()
    assert out == [_lowbias32(x) for x in xs]


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_is_keyed_and_stateless(device):
    key = MaskKey(0, "model.layers.0.mlp.up_proj.weight", "a")
    # pinned: a change here changes every DARE/DELLA merge ever recorded
    assert (uniform(key, (5,), device) * 2**24).tolist() == [6543035.0, 10773912.0, 3249554.0, 2565012.0, 5285157.0]
    state = torch.get_rng_state()
    torch.manual_seed(123)
    first = uniform(key, (64, 64), device)
    torch.manual_seed(456)
    assert first.equal(uniform(key, (64, 64), device))
    assert first.equal(uniform(key, (4096,), device).reshape(64, 64))  # depends on the element index only
    torch.set_rng_state(state)
    for other in [MaskKey(1, key.tensor, "a"), MaskKey(0, "model.layers.1.mlp.up_proj.weight", "a"),
                  MaskKey(0, key.tensor, "b")]:
        assert (uniform(other, (64, 64), device) == first).float().mean() < 1e-3
    assert first.dtype == torch.float32 and first.device.type == device


def test_no_global_rng_use():
    base, tensors = inputs((10, 10), 2, seed=4)
    state = torch.get_rng_state()
    for name in ("dare_ties", "della"):
        run(name, base, tensors, {"weight": [0.5, 0.5], "density": [0.5, 0.5], "key": keys_for(2)})
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("device", DEVICES)
def test_uniforms_draws_each_key_as_uniform_does(device):
    keys = [MaskKey(0, "w", "a"), MaskKey(0, "w", "b"), MaskKey(5, "v", "a")]
    for shape in [(7,), (33, 65), (2, 3, 4)]:
        rows = uniforms(keys, shape, device)
        assert rows.shape == (3, *shape)
        for row, key in zip(rows, keys):
            assert row.equal(uniform(key, shape, device))


def test_uniform_statistics():
    n = 1 << 18
    u = uniform(MaskKey(7, "w", "a"), (n,)).double()
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(u.var().item() - 1 / 12) < 1e-3
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 5 / n**0.5  # neighbours independent
    bits = (u * 2**24).long()
    for bit in range(24):
        assert abs(((bits >> bit) & 1).double().mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5


def test_mask_key_words_come_from_blake2b():
    key = MaskKey(3, "t", "m")
    digest = int.from_bytes(hashlib.blake2b(b"3\x00t\x00m", digest_size=8).digest(), "little")
    assert key.words() == (digest & 0xFFFFFFFF, digest >> 32)
