"""The fast kernels against plain references on tensors large enough to take the fast paths (> 2**15 entries).

radix_select and _row_order_torch are what runs off the CPU (where numpy selects and sorts); they run on CPU here too."""

import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from evomerge.merge import fused, host, methods, sparsify
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


def test_row_ranks_invert_the_stable_row_order():
    g = torch.Generator().manual_seed(6)
    mag = torch.randint(0, 5, (40, 70), generator=g).float()  # ties in every row: ranked by position
    expected = mag.argsort(dim=1, stable=True).argsort(dim=1)
    assert row_ranks(mag).dtype == torch.int16 and row_ranks(mag).equal(expected.short())
    assert row_ranks(mag[0]).equal(expected[:1].short())  # a 1-D tensor is one row


def test_kept_work_is_found_again_for_a_new_view_of_the_same_rows():
    """The materializer slices embeddings to their common rows anew for every candidate."""
    x, base, entries = torch.randn(8, 3), torch.randn(8, 3), len(sparsify._kept)
    kept = sparsify.kept_with(x[:5], base[:5])
    assert sparsify.kept_with(x[:5], base[:5]) is kept and sparsify.kept_with(x, base) is not kept
    assert sparsify.kept_with(x[:4], base[:4]) is not kept and sparsify.kept_with(x[1:6], base[1:6]) is not kept
    del kept, x
    gc.collect()
    assert len(sparsify._kept) == entries  # each was kept with x: gone with it


class EagerOps(TorchDispatchMode):
    """The ops that run eagerly (each a kernel launch on a GPU), views and allocations left out; compiled calls run
    with it suspended (`outside_compiled_calls`)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in ("empty", "empty_strided", "detach", "alias")):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))

    @staticmethod
    def outside_compiled_calls(monkeypatch):
        compiled = fused._Compiled.__call__

        def suspended(*args):
            with _disable_current_modes():
                return compiled(*args)

        monkeypatch.setattr(fused._Compiled, "__call__", suspended)


# two candidates of each method whose selections run inside the fused sums off the host
OFF_HOST_CANDIDATES = {
    "ties": [{"weight": [0.7, 0.5, 1.2], "density": [0.3, 0.6, 0.9]},
             {"weight": [0.2, 1.1, 0.6], "density": [0.8, 0.2, 0.5]}],
    "breadcrumbs_ties": [{"weight": [0.7, 0.5, 1.2], "density": [0.3, 0.6, 0.8], "gamma": [0.05, 0.1, 0.2]},
                         {"weight": [0.4, 0.9, 0.3], "density": [0.7, 0.4, 0.5], "gamma": [0.2, 0.02, 0.1]}],
    "della": [{"weight": [0.7, 0.5, 1.2], "density": [0.4, 0.5, 0.7], "epsilon": [0.1, 0.2, 0.25]},
              {"weight": [0.3, 0.9, 0.6], "density": [0.6, 0.3, 0.5], "epsilon": [0.2, 0.1, 0.15]}],
    "sce": [{"select_topk": 0.3}, {"select_topk": 0.7}],
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.filterwarnings("error:.*runs unfused")
@pytest.mark.parametrize("budget", [2**30, 0], ids=["orders_kept", "no_budget"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(OFF_HOST_CANDIDATES))
def test_selections_off_the_host_give_the_host_merge(name, device, budget, monkeypatch):
    """ties, breadcrumbs, DELLA and SCE as on a GPU (thresholds looked up in kept sorted values, or without a budget
    selected inside the fused sums; DELLA's probabilities from kept ranks; two tensors' sums in one batched call)
    against the host path (numpy select and sort on the materialized magnitudes or variances, eager sums), on tensors
    past the kthvalue cut-over. What does not depend on the candidate (the sorts, else radix select's first pass, SCE's
    count: a device sync) runs for the first only, and a later candidate runs no op eagerly per tensor."""
    g = torch.Generator().manual_seed(5)
    inputs = []
    for _ in range(2):
        base = torch.randn(300, 200, generator=g)
        inputs.append((base, [base + 0.02 * torch.randint(-3, 4, (300, 200), generator=g) for _ in range(3)]))  # ties
    method = get_method(name)
    key = {"key": [MaskKey(0, "w", f"m{i}") for i in range(3)]} if method.randomized else {}
    expected = [[method.fn(base, xs, **params, **key) for base, xs in inputs] for params in OFF_HOST_CANDIDATES[name]]
    on_device = [(base.to(device), [x.to(device) for x in xs]) for base, xs in inputs]
    monkeypatch.setattr(host, "HOST_DEVICE_TYPES", ())  # as on a GPU (for CPU tensors)
    monkeypatch.setattr(fused, "_forced", True)
    monkeypatch.setattr(fused, "MAX_BATCH", 2)
    kept_work = []
    watched = [(sparsify, "top_digit_counts"), (methods, "top_digit_counts"), (torch, "count_nonzero")]
    if budget:  # without one, DELLA sorts every candidate
        watched += [(sparsify, "row_order"), (sparsify._Budget, "keep")]
    for owner, function in watched:
        original = getattr(owner, function)
        monkeypatch.setattr(owner, function, lambda *a, f=original, name=function: kept_work.append(name) or f(*a))
    sparsify.keep_orders(budget)
    sparsify._rank_probabilities.cache_clear()  # the host path above made DELLA's tables on the CPU
    EagerOps.outside_compiled_calls(monkeypatch)
    try:
        for candidate, params in enumerate(OFF_HOST_CANDIDATES[name]):
            with EagerOps() as eager, fused.batched():
                outs = [method.fn(base, xs, **params, **key) for base, xs in on_device]
                assert all(isinstance(out, fused.Deferred) for out in outs)
            if candidate == 0:
                work_of_first = len(kept_work)
            elif budget or name != "della":  # no kernel launch per tensor beside the batches (DELLA: a table a model)
                assert eager.ops == (["arange", "div", "mul", "add"] * 3 if name == "della" else [])
            assert len(kept_work) == work_of_first
            for out, value in zip(outs, expected[candidate]):  # float32 sums in another order; a flipped mask: ~1e-2
                torch.testing.assert_close(fused.resolved(out).cpu(), value, rtol=1e-5, atol=1e-5)
        assert (sparsify.kept_order_bytes() > 0) == bool(budget)
        assert (work_of_first > 0) == (bool(budget) or name != "della")  # della without a budget keeps nothing
        assert ("top_digit_counts" in kept_work) == (not budget and name != "della")  # radix: only past the budget
    finally:
        sparsify.keep_orders(0)
    assert sparsify.kept_order_bytes() == 0  # keep_orders(0) frees them


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "della"])
def test_kept_orders_on_the_host_give_its_merge_without_selecting_again(name, monkeypatch):
    """On the host's eager path (CPU tensors below the fusion cut-over) a search's worker keeps orders too: the rules
    rank |x - base| in its kept order, bit for bit the merge that selects (numpy) in |delta| every candidate, and no
    selection or sort runs after the first candidate."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 200, generator=g)
    xs = [base + 0.02 * torch.randint(-3, 4, (300, 200), generator=g) for _ in range(3)]  # ties at the thresholds
    method = get_method(name)
    key = {"key": [MaskKey(0, "w", f"m{i}") for i in range(3)]} if method.randomized else {}
    selections = []
    partition, sort_rows = sparsify.np.partition, sparsify._row_order_numpy
    monkeypatch.setattr(sparsify.np, "partition", lambda *a, **k: selections.append("partition") or partition(*a, **k))
    monkeypatch.setattr(sparsify, "_row_order_numpy", lambda *a: selections.append("sort") or sort_rows(*a))
    sparsify.keep_orders(0)  # (a TrialRunner of an earlier test may have left its budget)
    expected = [method.fn(base, xs, **params, **key) for params in OFF_HOST_CANDIDATES[name]]  # no budget
    assert len(selections) >= 2 * 3  # every candidate selects (or sorts rows) for every model
    selections.clear()
    sparsify.keep_orders(2**30)
    try:
        for candidate, params in enumerate(OFF_HOST_CANDIDATES[name]):
            assert torch.equal(method.fn(base, xs, **params, **key), expected[candidate])
            if candidate == 0:
                first = list(selections)
        assert selections == first == (["sort"] * 3 if name == "della" else [])  # DELLA's ranks: once per model
        assert sparsify.kept_order_bytes() > 0
    finally:
        sparsify.keep_orders(0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_kept_orders_make_thresholds_lookups_within_the_budget(dtype, monkeypatch):
    """With a budget, |x - base| is sorted once and every k-th smallest is a 0-dim view of it (exact, ties and all);
    a tensor past the budget gets a Rank instead; the bytes are given back when a tensor goes."""
    monkeypatch.setattr(host, "HOST_DEVICE_TYPES", ())  # as on a GPU
    g = torch.Generator().manual_seed(7)
    pairs = []
    for _ in range(2):
        base = torch.randn(300, 200, generator=g, dtype=torch.float64).to(dtype)
        pairs.append(((base.double() + 0.01 * torch.randn(300, 200, generator=g, dtype=torch.float64)).to(dtype), base))
    n, itemsize = 300 * 200, (8 if dtype == torch.float64 else 4)
    sparsify.keep_orders(n * itemsize)  # room for one
    try:
        for i, (x, base) in enumerate(pairs):
            flat = abs_delta(x, base).reshape(-1)
            for k in (1, 2, n // 3, n // 2 + 1, n - 1, n):
                got = AbsDelta.of(x, base).kth_smallest(k)
                if i == 0:
                    assert isinstance(got, torch.Tensor) and got.shape == () and got.dtype == flat.dtype
                else:
                    assert isinstance(got, Rank)
                    got = got.select(x, base)
                assert got.item() == torch.kthvalue(flat, k).values.item(), (i, k)
        assert sparsify.kept_order_bytes() == n * itemsize
        del x, base, pairs[0], flat
        gc.collect()
        assert sparsify.kept_order_bytes() == 0  # gone with the first pair
    finally:
        sparsify.keep_orders(0)


def test_a_sort_the_device_has_no_room_for_closes_the_budget(monkeypatch):
    """Out of memory while sorting (values, indices and scratch: ~4x the bytes kept) is no error: that selection and
    every later one use radix select instead, and the results stay exact."""
    monkeypatch.setattr(host, "HOST_DEVICE_TYPES", ())  # as on a GPU
    g = torch.Generator().manual_seed(8)
    base = torch.randn(300, 200, generator=g)
    xs = [base + 0.01 * torch.randn(300, 200, generator=g) for _ in range(2)]
    sorts = []

    def no_room(*args):
        sorts.append(1)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (as a test)")

    monkeypatch.setattr(torch.Tensor, "sort", no_room)
    sparsify.keep_orders(2**30)
    try:
        for x in xs:
            rank = AbsDelta(x, base).kth_smallest(1000)
            assert isinstance(rank, Rank)
            assert rank.select(x, base).item() == torch.kthvalue((x - base).abs().reshape(-1), 1000).values.item()
        assert len(sorts) == 1 and sparsify.kept_order_bytes() == 0
    finally:
        sparsify.keep_orders(0)
