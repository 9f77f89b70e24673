"""The compile switch (evomerge/merge/compiled.py) gives the plain path's result: the same masks bit for bit, merged
tensors equal where no sum is reduced in another order, within 4 float32 ulps of the largest |out - base| where the
L1 rescale factors are (inductor sums |delta| in another order); and a new candidate does not recompile."""

import pytest
import torch
from torch._dynamo.utils import counters

from evomerge.merge.compiled import CompiledMethods
from evomerge.merge.materialize import LiveMaterializer
from evomerge.merge.registry import get_method
from evomerge.merge.rng import MaskKey
from evomerge.models.io import ModelDir, load_live_model
from evomerge.models.sources import ResidentSources
from evomerge.recipe import recipe_from_dict
from tiny_models import build_tiny, make_variants


@pytest.fixture(scope="module")
def compiled():
    return CompiledMethods(min_numel=0)  # every tensor compiled, however small


def inputs(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def candidate(i: int, n: int) -> dict:
    """The parameters of the i-th candidate of a search: every number moves."""
    return dict(weight=[0.3 + 0.05 * i + 0.1 * j for j in range(n)], density=[0.2 + 0.03 * i + 0.05 * j for j in range(n)],
                key=[MaskKey(i, "w", str(j)) for j in range(n)])


def test_without_rescale_the_merge_is_bit_identical(compiled):
    """No sum reduced in another order: the merged tensors are equal, so the masks are (DARE's hash and its
    comparison with the density, the sign election)."""
    base, tensors = inputs((64, 48), 2)
    fn, plain = compiled.fn("dare_ties"), get_method("dare_ties").fn
    for i in range(3):
        expected = plain(base, tensors, rescale=False, **candidate(i, 2))
        assert fn(base, tensors, rescale=False, **candidate(i, 2)).equal(expected)
        assert 0 < (expected == base).sum() < base.numel()


def test_rescaled_merges_agree_and_new_candidates_do_not_recompile(compiled):
    base, tensors = inputs((64, 48), 2, seed=1)
    fn, plain = compiled.fn("dare_ties"), get_method("dare_ties").fn
    fn(base, tensors, **candidate(0, 2))
    graphs = counters["stats"]["unique_graphs"]
    for i in range(1, 20):
        expected = plain(base, tensors, **candidate(i, 2))
        bound = 4 * 2**-24 * (expected - base).abs().max().item()  # the rescale factors' last bits
        torch.testing.assert_close(fn(base, tensors, **candidate(i, 2)), expected, rtol=2**-22, atol=bound)
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_switch_reaches_the_materializer(tmp_path):
    """LiveMaterializer(compile=True) computes through CompiledMethods (the toy's small tensors run eagerly)."""
    base = build_tiny("llama", tmp_path / "base", num_layers=1, hidden=16)
    paths = [str(p) for p in [base, *make_variants(base, tmp_path, n=2)]]
    dirs = {m: ModelDir.open(m) for m in paths}
    recipe = recipe_from_dict([{"merge_method": "dare_ties", "base_model": paths[0], "dtype": "float32", "models": [
        {"model": m, "parameters": {"weight": 0.6, "density": 0.5}} for m in paths[1:]]}])
    merged = []
    for compile in (False, True):
        live = LiveMaterializer(load_live_model(paths[0], dtype=torch.float32),
                                ResidentSources(dirs, "cpu", torch.float32), compile=compile)
        assert isinstance(live.compiled, CompiledMethods) == compile
        live.apply(recipe)
        merged.append(live.model.state_dict())
    assert all(merged[0][n].equal(merged[1][n]) for n in merged[0])
