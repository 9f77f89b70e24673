"""The fast kernels against plain references on tensors large enough to take the fast paths (> 2**15 entries).

radix_select and _row_order_torch are what runs off the CPU (where numpy selects and sorts); they run on CPU here too."""

import gc

import pytest
import torch

from evomerge.merge import fused, host, sparsify
from evomerge.merge.methods import _variance_across_models
from evomerge.merge.registry import get_method
from evomerge.merge.rng import MaskKey
from evomerge.merge.sparsify import (SPARSIFIERS, AbsDelta, Rank, _row_order_torch, abs_delta, kth_largest,
                                     kth_smallest, radix_select, row_order, row_ranks)

magnitude = SPARSIFIERS["magnitude"].mask  # 0/1 mask

N = 3 * 2**15 + 7  # above the radix-select cut-over, not a power of two


def cases():
    g = torch.Generator().manual_seed(0)
    yield "randn", torch.randn(N, generator=g).abs()
    yield "ties", torch.randint(0, 4, (N,), generator=g).float()  # every k lands inside a block of ties
    yield "zeros", torch.zeros(N)
    yield "subnormal", torch.rand(N, generator=g) * 1e-40
    yield "nan_inf", torch.cat([torch.randn(N - 4, generator=g).abs(), torch.tensor([float("inf"), float("nan"), 0.0, 7.0])])
    yield "float64", torch.randn(N, dtype=torch.float64, generator=g).abs()
    yield "bfloat16", torch.randn(N, generator=g).abs().bfloat16()
    yield "2d", torch.randn(300, 400, generator=g).abs()


@pytest.mark.parametrize("name,values", list(cases()))
def test_kth_smallest_is_kthvalue(name, values):
    flat = values.reshape(-1).float() if values.dtype == torch.bfloat16 else values.reshape(-1)
    for k in (1, 2, values.numel() // 3, values.numel() // 2 + 1, values.numel() - 1, values.numel()):
        got, expected = kth_smallest(values, k), torch.kthvalue(flat, k).values
        assert got.shape == () and got.dtype == flat.dtype
        assert (got.isnan() and expected.isnan()) or got.item() == expected.item(), (name, k)
        radix = radix_select(flat, k)
        assert radix.dtype == flat.dtype and ((radix.isnan() and expected.isnan()) or radix.item() == expected.item())
    torch.testing.assert_close(kth_largest(values, 1), kth_smallest(values, values.numel()), rtol=0, atol=0, equal_nan=True)


def test_magnitude_keeps_every_tie_at_the_threshold_on_large_tensors():
    d = torch.randint(-3, 4, (N,), generator=torch.Generator().manual_seed(1)).float()
    kept = magnitude(d, 0.5)
    threshold = d.abs().sort(descending=True).values[int(0.5 * N) - 1]  # the k-th largest |d|
    assert kept.equal((d.abs() >= threshold).float()) and kept.sum() > int(0.5 * N)


def test_sce_variance_is_the_population_variance_of_the_task_vectors():
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(3, 200, 300, dtype=torch.float64, generator=g)
    base = torch.randn(200, 300, dtype=torch.float64, generator=g)
    var = _variance_across_models(base, list(tau + base))
    torch.testing.assert_close(var, tau.var(0, unbiased=False), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_order_is_a_stable_argsort(dtype):
    g = torch.Generator().manual_seed(3)
    mag = torch.randint(0, 5, (300, 70), generator=g).to(dtype)  # many ties in every row
    mag[0, :3] = torch.tensor([float("nan"), float("inf"), 0.0], dtype=dtype)
    mag[1] = torch.rand(70, generator=g, dtype=dtype)
    expected = mag.argsort(dim=1, stable=True)
    assert row_order(mag).equal(expected)
    if dtype == torch.float32:  # the int64-key sort off the CPU, run here on CPU
        assert _row_order_torch(mag).equal(expected)


@pytest.mark.filterwarnings("error:.*runs unfused")
@pytest.mark.parametrize("fuse", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_selection_from_abs_delta_counts_the_top_digit_once(dtype, fuse, monkeypatch):
    """Off the host |x - base| is selected from without being materialized; the first radix pass (the top digit's
    counts) is kept while x and base live, so every later k costs one pass, and the values are still exact (eager and
    compiled)."""
    monkeypatch.setattr(host, "HOST_DEVICE_TYPES", ())  # as on a GPU
    monkeypatch.setattr(fused, "_forced", fuse)
    first_passes, top = [], sparsify.top_digit_counts
    monkeypatch.setattr(sparsify, "top_digit_counts", lambda x, base: first_passes.append(1) or top(x, base))
    g = torch.Generator().manual_seed(4)
    base = torch.randn(300, 200, generator=g, dtype=torch.float64).to(dtype)
    x = (base.double() + 0.01 * torch.randn(300, 200, generator=g, dtype=torch.float64)).to(dtype)  # bf16: many ties
    flat = abs_delta(x, base).reshape(-1)
    n = flat.numel()
    for k in (1, 2, n // 3, n // 2 + 1, n - 1, n):
        mag = AbsDelta.of(x, base)
        assert isinstance(mag, AbsDelta) and mag.numel() == n
        rank = kth_smallest(mag, k)  # selected where the fused sum applies it
        assert isinstance(rank, Rank) and rank.k == k
        got = rank.select(x, base)
        assert got.dtype == flat.dtype and got.item() == torch.kthvalue(flat, k).values.item(), k
    assert len(first_passes) == 1
    entries = len(sparsify._kept)
    del x, mag
    gc.collect()
    assert len(sparsify._kept) == entries - 1  # gone with its tensor


@pytest.mark.filterwarnings("error:.*runs unfused")
@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties"])
def test_fused_magnitude_selection_off_the_host_is_the_host_merge(name, monkeypatch):
    """ties and breadcrumbs as on a GPU (ranks of AbsDeltas selected in the fused sums, two tensors' in one batched
    call) against the host path (numpy introselect on the materialized |delta|, eager sum), on tensors past the
    kthvalue cut-over."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(300, 200, generator=g)
    inputs = [[base + 0.02 * torch.randint(-3, 4, (300, 200), generator=g) for _ in range(3)]  # ties at thresholds
              for _ in range(2)]
    candidates = [{"weight": [0.7, 0.5, 1.2], "density": [0.3, 0.6, 0.9]},
                  {"weight": [0.2, 1.1, 0.6], "density": [0.8, 0.2, 0.5]}]
    if name == "breadcrumbs_ties":
        candidates = [c | {"gamma": gamma} for c, gamma in zip(candidates, ([0.05, 0.1, 0.2], [0.2, 0.02, 0.1]))]
    method = get_method(name)
    expected = [method.fn(base, tensors, **params) for tensors, params in zip(inputs, candidates)]
    monkeypatch.setattr(host, "HOST_DEVICE_TYPES", ())
    monkeypatch.setattr(fused, "_forced", True)
    monkeypatch.setattr(fused, "MAX_BATCH", 2)
    selections, select = [], AbsDelta.kth_smallest
    monkeypatch.setattr(AbsDelta, "kth_smallest", lambda self, k: selections.append(k) or select(self, k))
    with fused.batched():
        outs = [method.fn(base, tensors, **params) for tensors, params in zip(inputs, candidates)]
        assert all(isinstance(out, fused.Deferred) for out in outs)
    for out, value in zip(outs, expected):
        torch.testing.assert_close(fused.resolved(out), value, rtol=1e-6, atol=1e-6)
    assert len(selections) == 2 * 3 * (2 if name == "breadcrumbs_ties" else 1)


def test_row_ranks_invert_the_stable_row_order():
    g = torch.Generator().manual_seed(6)
    mag = torch.randint(0, 5, (40, 70), generator=g).float()  # ties in every row: ranked by position
    expected = mag.argsort(dim=1, stable=True).argsort(dim=1)
    assert row_ranks(mag).dtype == torch.int16 and row_ranks(mag).equal(expected.short())
    assert row_ranks(mag[0]).equal(expected[:1].short())  # a 1-D tensor is one row


@pytest.mark.filterwarnings("error:.*runs unfused")
@pytest.mark.parametrize("budget", [0, 2**30], ids=["sorted-each-time", "ranks-kept"])
def test_fused_della_off_the_host_is_the_host_merge(budget, monkeypatch):
    """DELLA as on a GPU (each entry's keep probability from its rank in its row, ranks kept across candidates within
    the budget, sums batched) against the host path (probabilities scattered by the row sort, eager sum)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(300, 200, generator=g)
    tensors = [base + 0.02 * torch.randint(-3, 4, (300, 200), generator=g) for _ in range(3)]
    candidates = [{"weight": [0.7, 0.5, 1.2], "density": [0.4, 0.5, 0.7], "epsilon": [0.1, 0.2, 0.25]},
                  {"weight": [0.3, 0.9, 0.6], "density": [0.6, 0.3, 0.5], "epsilon": [0.2, 0.1, 0.15]}]
    method = get_method("della")
    key = {"key": [MaskKey(0, "w", f"m{i}") for i in range(3)]}
    expected = [method.fn(base, tensors, **params, **key) for params in candidates]
    monkeypatch.setattr(host, "HOST_DEVICE_TYPES", ())
    monkeypatch.setattr(fused, "_forced", True)
    monkeypatch.setattr(fused, "MAX_BATCH", 2)
    sparsify.keep_ranks(budget)
    sorts, row_order = [], sparsify.row_order
    monkeypatch.setattr(sparsify, "row_order", lambda mag: sorts.append(1) or row_order(mag))
    try:
        with fused.batched():
            outs = [method.fn(base, tensors, **params, **key) for params in candidates]
    finally:
        sparsify.keep_ranks(0)
    for out, value in zip(outs, expected):  # float32 L1 sums in another order; a flipped mask would miss by ~1e-2
        torch.testing.assert_close(fused.resolved(out), value, rtol=1e-5, atol=1e-5)
    assert len(sorts) == (3 if budget else 6)
    assert AbsDelta.rank_bytes == 0  # keep_ranks(0) frees them


@pytest.mark.filterwarnings("error:.*runs unfused")
def test_fused_sce_off_the_host_is_the_host_merge(monkeypatch):
    """SCE as on a GPU (the variances' count and first radix pass kept across candidates, the threshold selected in
    the batched fused sum: no device sync per candidate) against the host path (materialized variances, numpy select)."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(300, 200, generator=g)
    tensors = [base + 0.02 * torch.randint(-3, 4, (300, 200), generator=g) for _ in range(3)]  # ties in the variances
    candidates = [{"select_topk": 0.3}, {"select_topk": 0.7}]
    method = get_method("sce")
    expected = [method.fn(base, tensors, **params) for params in candidates]
    monkeypatch.setattr(host, "HOST_DEVICE_TYPES", ())
    monkeypatch.setattr(fused, "_forced", True)
    monkeypatch.setattr(fused, "MAX_BATCH", 2)
    counted, count_nonzero = [], torch.count_nonzero
    monkeypatch.setattr(torch, "count_nonzero", lambda x: counted.append(1) or count_nonzero(x))
    with fused.batched():
        outs = [method.fn(base, tensors, **params) for params in candidates]
        assert all(isinstance(out, fused.Deferred) for out in outs)
    for out, value in zip(outs, expected):
        torch.testing.assert_close(fused.resolved(out), value, rtol=1e-6, atol=1e-6)
    assert len(counted) == 1  # the one sync, for the first candidate
