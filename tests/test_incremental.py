"""LiveMaterializer: a worker recomputes only the tensors whose task changed, and the result is the full merge, bit for bit."""

import pytest
import torch

from evomerge.merge.materialize import LiveMaterializer, merge_to_dir
from evomerge.merge.plan import plan_recipe
from evomerge.models.io import ModelDir, live_param, load_live_model
from evomerge.models.sources import ResidentSources
from evomerge.recipe import recipe_from_dict
from tiny_models import EXPERTS_UNDER, FAMILIES, MOE, build_tiny, expert_layers, make_variants

LAYERS = 3


class RecordingSources(ResidentSources):
    """Resident sources that remember the name of every tensor read (one read per input of each computed task)."""

    def get(self, model: str, name: str) -> torch.Tensor:
        self.read.add(name)
        return super().get(model, name)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    base = build_tiny("llama", root / "base", num_layers=LAYERS, hidden=16)
    a, b = make_variants(base, root, n=2, scale=0.05)
    return str(base), str(a), str(b)


def recipe(zoo, method: str, layer_weights: list[float]):
    """`weight` of the first model is a per-layer list (a gradient with one value per layer: layer i gets entry i)."""
    base, a, b = zoo
    density = {"density": 0.6} if method != "task_arithmetic" else {}
    return recipe_from_dict([{"merge_method": method, "base_model": base, "dtype": "float32", "models": [
        {"model": a, "parameters": {"weight": layer_weights, **density}},
        {"model": b, "parameters": {"weight": 0.4, **density}}]}])


def materializer(zoo) -> LiveMaterializer:
    dirs = {m: ModelDir.open(m) for m in zoo}
    sources = RecordingSources(dirs, "cpu", torch.float32)
    sources.read = set()
    return LiveMaterializer(load_live_model(zoo[0], dtype=torch.float32), sources)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_only_changed_tensors_are_recomputed_and_the_result_is_the_full_merge(zoo, method):
    live = materializer(zoo)
    arch = live.sources.dirs[zoo[0]].arch
    first = live.apply(recipe(zoo, method, [0.3, 0.5, 0.7]))
    assert first["computed"] == first["tensors"] > 0

    live.sources.read.clear()
    assert live.apply(recipe(zoo, method, [0.3, 0.5, 0.7])) == {"tensors": first["tensors"], "computed": 0}
    assert live.sources.read == set()  # nothing read, nothing written

    changed = recipe(zoo, method, [0.3, 0.9, 0.7])  # only layer 1's weight moves
    stats = live.apply(changed)
    layer1 = {n for n in live.sources.dirs[zoo[0]].tensor_names if arch.layer_of(n) == 1}
    assert stats["computed"] == len(layer1) and live.sources.read == layer1

    fresh = materializer(zoo)
    assert fresh.apply(changed)["computed"] == first["tensors"]
    got, expected = live.model.state_dict(), fresh.model.state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_a_changed_global_parameter_recomputes_everything(zoo):
    live = materializer(zoo)
    base, a, b = zoo
    doc = {"merge_method": "ties", "base_model": base, "models": [{"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
                                                                   {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}]}
    total = live.apply(recipe_from_dict([doc]))["tensors"]
    assert live.apply(recipe_from_dict([{**doc, "parameters": {"normalize": False}}]))["computed"] == total
    assert live.apply(recipe_from_dict([{**doc, "parameters": {"normalize": False}}]))["computed"] == 0


def test_the_cached_layout_plans_what_a_fresh_plan_does(zoo):
    base, a, b = zoo
    dirs = {m: ModelDir.open(m) for m in zoo}
    layouts = {}
    for method, weights in [("ties", [0.3, 0.5, 0.7]), ("ties", [0.9, 0.1, 0.2]), ("dare_ties", [0.3, 0.5, 0.7])]:
        r = recipe(zoo, method, weights)
        assert plan_recipe(r, dirs, layouts=layouts).tasks == plan_recipe(r, dirs).tasks
    assert len(layouts) == 2  # one per structure: new values reuse it, a new method does not
    sliced = recipe_from_dict([{"merge_method": "linear", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [1, 3]}]},
        {"sources": [{"model": a, "layer_range": [2, 3]}, {"model": b, "layer_range": [0, 1]}]}],
        "parameters": {"weight": 0.5}}])
    moved = recipe_from_dict([{"merge_method": "linear", "slices": [
        {"sources": [{"model": a, "layer_range": [1, 3]}, {"model": b, "layer_range": [0, 2]}]},
        {"sources": [{"model": a, "layer_range": [0, 1]}, {"model": b, "layer_range": [2, 3]}]}],
        "parameters": {"weight": 0.5}}])
    for r in (sliced, moved, sliced):  # a changed layer range is a new structure, not a stale layout
        assert plan_recipe(r, dirs, layouts=layouts).tasks == plan_recipe(r, dirs).tasks
    assert len(layouts) == 4


def test_a_structural_change_is_materialized_in_full(zoo):
    live = materializer(zoo)
    base, a, b = zoo
    live.apply(recipe(zoo, "ties", [0.3, 0.5, 0.7]))
    swapped = recipe_from_dict([{"merge_method": "ties", "base_model": a, "dtype": "float32", "models": [
        {"model": base, "parameters": {"weight": 0.5, "density": 0.6}},
        {"model": b, "parameters": {"weight": 0.4, "density": 0.6}}]}])
    stats = live.apply(swapped)
    assert stats["computed"] == stats["tensors"]  # a new base changes every task
    fresh = materializer(zoo)
    fresh.apply(swapped)
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(live.model.state_dict()[name], value), name


def test_results_become_the_parameters_and_never_alias_a_source(zoo, tmp_path):
    """A fresh result replaces the parameter's storage (no copy); the Parameter objects stay, tied weights stay tied, and
    a result that is a source tensor itself is copied instead, so no parameter shares memory with a source."""
    m = materializer(zoo)
    params = dict(m.model.named_parameters())
    storages = {n: p.untyped_storage().data_ptr() for n, p in params.items()}
    m.apply(recipe(zoo, "ties", [0.2, 0.5, 0.8]))
    assert all(p is params[n] for n, p in m.model.named_parameters())
    assert all(p.untyped_storage().data_ptr() != storages[n] for n, p in m.model.named_parameters())  # adopted
    assert not any(p.untyped_storage().data_ptr() in m.source_storages for p in m.model.parameters())

    for task in plan_recipe(recipe(zoo, "ties", [0.2, 0.5, 0.8]), m.sources.dirs).tasks:
        m.write(task, m.sources.get(zoo[1], task.out_name))  # a result that is a source tensor itself
    a = m.sources.dirs[zoo[1]]
    for name in a.tensor_names:
        live = m.target(name)
        assert live.equal(m.sources.get(zoo[1], name))
        assert live.untyped_storage().data_ptr() not in m.source_storages

    base = build_tiny("llama", tmp_path / "tied", num_layers=1, hidden=16, tie_word_embeddings=True)
    expert = make_variants(base, tmp_path, n=1, scale=0.05)[0]
    dirs = {str(p): ModelDir.open(p) for p in (base, expert)}
    tied = LiveMaterializer(load_live_model(str(base), dtype=torch.float32), ResidentSources(dirs, "cpu", torch.float32))
    tied.apply(recipe_from_dict([{"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(expert), "parameters": {"weight": 0.5}}]}]))
    model = tied.model
    assert model.lm_head.weight is model.get_input_embeddings().weight
    expected = (dirs[str(base)].get("model.embed_tokens.weight") + dirs[str(expert)].get("model.embed_tokens.weight")) / 2
    torch.testing.assert_close(model.lm_head.weight.data, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_live_model_of_every_family_is_the_model_merge_writes(family, tmp_path):
    """A worker's in-place merge lands every tensor in the live parameter that loading the written model fills (checkpoint
    names are mapped to live ones per family: GPT-2 without prefix, GPT-NeoX's head, Gemma-3's image-text parts)."""
    base = build_tiny(family, tmp_path / "base", num_layers=LAYERS, hidden=32)
    models = (str(base), *map(str, make_variants(base, tmp_path, n=2, scale=0.05)))
    r = recipe(models, "ties", [0.3, 0.9, 0.5])
    live = LiveMaterializer(load_live_model(models[0], dtype=torch.float32),
                            ResidentSources({m: ModelDir.open(m) for m in models}, "cpu", torch.float32))
    live.apply(r)
    merge_to_dir(r, tmp_path / "out", progress=False)
    got, expected = live.model.state_dict(), load_live_model(tmp_path / "out", dtype=torch.float32).state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    before = load_live_model(models[0], dtype=torch.float32).state_dict()
    merged = {live_param(live.model, n).untyped_storage().data_ptr() for n in ModelDir.open(models[0]).tensor_names}
    assert sum(not torch.equal(got[n], before[n]) for n in expected) >= len(merged)  # every live tensor written moved
    if family in MOE:  # per-expert checkpoint tensors in the live model's fused experts
        layers = "model.language_model.layers" if family == "qwen3_5_moe" else "model.layers"
        mlp = EXPERTS_UNDER.get(family, "mlp")
        assert {n for n in expected if ".experts." in n} == {f"{layers}.{i}.{mlp}.experts.{kind}" for kind in ("gate_up_proj", "down_proj")
                                                             for i in expert_layers(family, LAYERS)}
