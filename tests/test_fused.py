"""Fused kernels (evomerge.merge.fused): a compiled kernel is reused for every candidate, so it must read the
candidate's numbers on every call, not bake in the first call's (torch 2.13's inductor did that for a symbolic float
in `where(c, t, t * theta)`). The values against the float64 references: tests/test_methods.py (path "fused")."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import fused, host
from evomerge.merge.registry import get_method
from evomerge.merge.rng import MaskKey
from evomerge.merge.sparsify import radix_select

# two candidates of the same structure (same models, flags and densities above/below 0 and 1), other numbers
CANDIDATES = {
    "linear": [dict(weight=[0.5, 0.3, 0.4]), dict(weight=[1.2, -0.4, 0.1])],
    "task_arithmetic": [dict(weight=[0.7, -0.3, 1.2], lambda_=0.8), dict(weight=[0.2, 0.9, 0.4], lambda_=1.3)],
    "ties": [dict(weight=[0.7, 0.5, 1.2], density=[0.3, 0.6, 0.9]),
             dict(weight=[0.2, 1.1, 0.6], density=[0.8, 0.2, 0.5])],
    "dare_ties": [dict(weight=[0.7, 0.5, 1.2], density=[0.4, 0.7, 0.9]),
                  dict(weight=[0.3, 0.8, 0.5], density=[0.9, 0.2, 0.6])],
    "dare_linear": [dict(weight=[0.7, 0.5, 1.2], density=[0.4, 0.7, 0.9]),
                    dict(weight=[0.3, 0.8, 0.5], density=[0.9, 0.2, 0.6])],
    "breadcrumbs_ties": [dict(weight=[0.7, 0.5, 1.2], density=[0.3, 0.6, 0.8], gamma=[0.05, 0.1, 0.2]),
                         dict(weight=[0.4, 0.9, 0.3], density=[0.7, 0.4, 0.5], gamma=[0.2, 0.02, 0.1])],
    "della": [dict(weight=[0.7, 0.5, 1.2], density=[0.4, 0.5, 0.7], epsilon=[0.1, 0.2, 0.25]),
              dict(weight=[0.3, 0.9, 0.6], density=[0.6, 0.3, 0.5], epsilon=[0.2, 0.1, 0.15])],
    "sce": [dict(select_topk=0.5), dict(select_topk=0.3)],
    "slerp": [dict(t=0.3), dict(t=0.8)],
    "nuslerp": [dict(weight=[0.3, 0.9]), dict(weight=[0.8, 0.1])],
    "nearswap": [dict(t=0.5), dict(t=0.05)],
    "passthrough": [dict(scale=[0.7]), dict(scale=[1.9])],
}
N_MODELS = {"slerp": 1, "nearswap": 1, "passthrough": 1, "nuslerp": 2}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.filterwarnings("error:.*runs unfused")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_compiled_kernels_read_each_candidates_numbers(name, device, monkeypatch):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 9, generator=g, dtype=torch.float64).to(device)
    # parallel inputs take the guarded branches (slerp's linear fallback), where the numbers were baked in
    n = N_MODELS.get(name, 3)
    for tensors in ([torch.randn(6, 9, generator=g, dtype=torch.float64).to(device) for _ in range(n)],
                    [base * (2 + i) for i in range(n)]):
        for params in CANDIDATES[name]:
            if get_method(name).randomized:
                params = params | {"key": [MaskKey(0, "w", f"m{i}") for i in range(len(tensors))]}
            monkeypatch.setattr(fused, "_forced", True)
            out = get_method(name).fn(base, tensors, **params)
            monkeypatch.setattr(fused, "_forced", False)
            torch.testing.assert_close(out, get_method(name).fn(base, tensors, **params), rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("error:.*runs unfused")
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_radix_select_is_kthvalue(device, monkeypatch):
    monkeypatch.setattr(fused, "_forced", True)
    g = torch.Generator().manual_seed(4)
    for values in (torch.randn(40_000, generator=g).abs(), torch.randint(0, 5, (40_001,), generator=g).float()):
        values = values.to(device)
        for k in (1, 777, values.numel() // 2, values.numel()):
            assert radix_select(values, k).item() == torch.kthvalue(values, k).values.item()


def test_fusion_is_on_for_gpus_and_large_host_tensors_by_default(monkeypatch):
    x = torch.zeros(3)
    monkeypatch.setattr(fused, "_forced", None)
    assert not fused.fusing(x) and fused.fusing(torch.zeros(fused.HOST_MIN_NUMEL))
    fused.fuse(True)
    assert fused.fusing(x)
    monkeypatch.setattr(host, "HOST_DEVICE_TYPES", ())  # x as if on a GPU
    fused.fuse(False)
    assert not fused.fusing(x)
    fused.fuse(None)
    assert fused.fusing(x)


def test_a_compiler_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    @fused.fusible
    def needs_the_host(x: torch.Tensor, c: float) -> torch.Tensor:
        return x * c if x.sum() > 0 else x  # control flow on a tensor's value cannot be one graph

    monkeypatch.setattr(fused, "_forced", True)
    x = torch.arange(4.0)
    with pytest.warns(UserWarning, match="needs_the_host runs unfused"):
        assert needs_the_host(x, 2.0).tolist() == [0.0, 2.0, 4.0, 6.0]
    assert needs_the_host(x, 3.0).tolist() == [0.0, 3.0, 6.0, 9.0]  # eager from now on, no new warning


BATCHED = ["linear", "dare_ties", "ties", "slerp", "sce"]


@pytest.mark.filterwarnings("error:.*runs unfused")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BATCHED)
def test_batched_tails_give_each_calls_own_result(name, device, monkeypatch):
    """Inside `batched()` (as on a GPU) the fused tails of calls of one shape run as one compiled call: each call still
    gets its own numbers (two candidates), shapes batch apart, and every result is what the eager method gives."""
    monkeypatch.setattr(host, "HOST_DEVICE_TYPES", ())  # CPU tensors as if on a GPU
    monkeypatch.setattr(fused, "MAX_BATCH", 2)
    g = torch.Generator().manual_seed(5)
    n = N_MODELS.get(name, 3)
    shapes = [(6, 9), (6, 9), (6, 9), (4,)]  # a batch of two, then one call of each shape
    inputs = [(torch.randn(s, generator=g, dtype=torch.float64).to(device),
               [torch.randn(s, generator=g, dtype=torch.float64).to(device) for _ in range(n)]) for s in shapes]
    method = get_method(name)
    for params in CANDIDATES[name]:
        calls = [params | ({"key": [MaskKey(0, f"w{j}", f"m{i}") for i in range(n)]} if method.randomized else {})
                 for j in range(len(inputs))]
        monkeypatch.setattr(fused, "_forced", True)
        with fused.batched():
            outs = [method.fn(base, tensors, **kw) for (base, tensors), kw in zip(inputs, calls)]
            assert all(isinstance(out, fused.Deferred) and out.value is None for out in outs)
        monkeypatch.setattr(fused, "_forced", False)
        for out, (base, tensors), kw in zip(outs, inputs, calls):
            torch.testing.assert_close(fused.resolved(out), method.fn(base, tensors, **kw), rtol=1e-10, atol=1e-10)


def test_tails_on_the_host_are_not_deferred(monkeypatch):
    """On CPU a batch saves nothing (the kernels take longer than the call) and would compile slowly."""
    monkeypatch.setattr(fused, "_forced", True)
    x = torch.ones(3)
    with fused.batched():
        out = get_method("linear").fn(None, [x, 2 * x], weight=[0.5, 0.5])
    assert isinstance(out, torch.Tensor) and out.tolist() == [1.5, 1.5, 1.5]
