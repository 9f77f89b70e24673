"""Where a worker keeps its sources (`workers.sources`): every mode gives the merged weights of `device` bit for bit,
recomputes only the tensors whose task changed, and runs layer paths from layers on the device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from evomerge.merge.materialize import LiveMaterializer
from evomerge.merge.plan import plan_recipe
from evomerge.models.io import ModelDir, load_live_model
from evomerge.models.sources import HostSources, MappedSources, ResidentSources
from evomerge.recipe import LayerSlot, Recipe, recipe_from_dict
from evomerge.run.worker import TrialRunner

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_tiny, make_variants  # noqa: E402

LAYERS = 3
STORES = {"device": ResidentSources, "host": HostSources, "disk": MappedSources}


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def zoo(request, tmp_path_factory):
    """A base and two variants stored in float32 or bfloat16 (merged in float32: the stores convert)."""
    root = tmp_path_factory.mktemp(f"sources-{request.param}")
    base = build_tiny("llama", root / "base", num_layers=LAYERS, hidden=16, dtype=getattr(torch, request.param))
    a, b = make_variants(base, root, n=2, scale=0.05)
    return str(base), str(a), str(b)


def recipe(zoo, method: str, layer_weights: list[float]) -> Recipe:
    base, a, b = zoo
    density = {"density": 0.6} if method in ("ties", "dare_ties") else {}
    stage = {"base_model": base} if method != "linear" else {}
    return recipe_from_dict([{"merge_method": method, **stage, "dtype": "float32", "models": [
        {"model": a, "parameters": {"weight": layer_weights, **density}},
        {"model": b, "parameters": {"weight": 0.4, **density}}]}])


def materializer(zoo, mode: str) -> LiveMaterializer:
    dirs = {m: ModelDir.open(m) for m in zoo}
    return LiveMaterializer(load_live_model(zoo[0], dtype=torch.float32), STORES[mode](dirs, "cpu", torch.float32))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("mode", ["host", "disk"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "linear"])
def test_every_mode_merges_the_weights_of_device_bit_for_bit(zoo, mode, method):
    candidates = [[0.3, 0.5, 0.7], [0.9, 0.1, 0.4], [0.9, 0.1, 0.4]]
    if method == "linear":
        candidates = [[1.0, 0.0, 0.5], [0.2, 0.0, 0.5]]
    reference, other = materializer(zoo, "device"), materializer(zoo, mode)
    for weights_a in candidates:
        r = recipe(zoo, method, weights_a)
        assert other.apply(r) == reference.apply(r)
        assert_same(weights(other.model), weights(reference.model))


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_every_mode_recomputes_only_the_tensors_whose_task_changed(zoo, mode):
    live = materializer(zoo, mode)
    arch = live.sources.dirs[zoo[0]].arch
    first = live.apply(recipe(zoo, "ties", [0.3, 0.5, 0.7]))
    assert first["computed"] == first["tensors"] > 0
    assert live.apply(recipe(zoo, "ties", [0.3, 0.5, 0.7]))["computed"] == 0
    layer1 = [n for n in live.sources.dirs[zoo[0]].tensor_names if arch.layer_of(n) == 1]
    assert live.apply(recipe(zoo, "ties", [0.3, 0.9, 0.7]))["computed"] == len(layer1)
    fresh = materializer(zoo, "device")
    fresh.apply(recipe(zoo, "ties", [0.3, 0.9, 0.7]))
    assert_same(weights(live.model), weights(fresh.model))


def test_mapped_sources_are_never_written(zoo):
    """A result that is a mapped source tensor itself is copied into the live model, never adopted, so writing the
    live model in place later (the next candidate) leaves the mapping, and every later read, as it was."""
    _, a, b = zoo
    with ModelDir.open(a) as d:
        before = {n: d.get(n).float().clone() for n in d.tensor_names}
    live = LiveMaterializer(load_live_model(zoo[0]), MappedSources({m: ModelDir.open(m) for m in zoo}, "cpu", None))
    def in_a_larger_temporary(t: torch.Tensor) -> torch.Tensor:  # not adoptable: written in place
        return torch.cat([t.reshape(-1), t.reshape(-1)])[: t.numel()].view(t.shape)

    tasks = plan_recipe(recipe(zoo, "ties", [0.3, 0.5, 0.7]), live.sources.dirs).tasks
    for task in tasks:
        live.write(task, live.sources.get(a, task.out_name))  # every output: a's own mapped tensor
    for task in tasks:
        live.write(task, in_a_larger_temporary(live.sources.get(b, task.out_name)))  # b's values, written in place
    for name, value in before.items():
        assert torch.equal(live.sources.get(a, name).float(), value), name
        assert torch.equal(live.target(name), live.sources.get(b, name)), name


def test_host_holds_the_mapping_itself_when_no_conversion_is_needed(zoo):
    """Stored in the compute dtype: host's tensors are the file's mapped pages (one copy per node); stored in another
    dtype: converted once, into the worker's own memory."""
    base = zoo[0]
    dirs = {base: ModelDir.open(base)}
    stored = dirs[base].dtype(dirs[base].tensor_names[0])
    mapped = MappedSources(dirs, "cpu", None)  # the file's mapping (ModelDir opens each file once)
    host = HostSources(dirs, "cpu", torch.float32)
    for name in dirs[base].tensor_names:
        same_memory = host.get(base, name).data_ptr() == mapped.tensors[(base, name)].data_ptr()
        assert same_memory == (stored == torch.float32), name


@pytest.mark.parametrize("mode", ["device", "host", "disk"])
def test_a_worker_runs_layer_paths_from_layers_on_its_device_in_every_mode(zoo, mode):
    base, a, b = zoo
    runner = TrialRunner([base, a, b], base, lambda: None, dtype="float32", sources=mode, path_models=[a])
    assert set(runner.live) == ({base, a, b} if mode == "device" else {a})
    path = runner.model_for(Recipe(layers=[LayerSlot(source=a, layer=i) for i in (0, 1, 1, 2)]))
    reference = TrialRunner([base, a, b], base, lambda: None, dtype="float32", sources="device")
    expected = reference.model_for(Recipe(layers=[LayerSlot(source=a, layer=i) for i in (0, 1, 1, 2)]))
    ids = torch.tensor([[2, 5, 9, 11, 3]])
    with torch.no_grad():
        assert torch.equal(path(ids).logits, expected(ids).logits)
    merged = runner.model_for(recipe(zoo, "ties", [0.3, 0.5, 0.7]))
    assert_same(weights(merged), weights(reference.model_for(recipe(zoo, "ties", [0.3, 0.5, 0.7]))))


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_without_layer_paths_host_and_disk_load_no_source_model_on_the_device(zoo, mode):
    base, a, b = zoo
    runner = TrialRunner([base, a, b], base, lambda: None, dtype="float32", sources=mode)
    assert runner.live == {}
    reference = TrialRunner([base, a, b], base, lambda: None, dtype="float32", sources="device")
    r = recipe(zoo, "dare_ties", [0.3, 0.5, 0.7])
    assert_same(weights(runner.model_for(r)), weights(reference.model_for(r)))


@pytest.mark.slow  # ~2 min on 2 busy cores: two Ray workers start for each of two modes
def test_two_ray_workers_on_a_node_hold_one_copy_of_disk_and_host_sources(tmp_path):
    """PSS (proportional set size: a page mapped by k processes counts 1/k in each) of the source files' mappings,
    summed over two Ray workers that each merged two candidates reading every tensor: one copy of the sources, not
    two. (host and disk hold nothing else of the sources: see test_host_holds_the_mapping_itself...)"""
    pytest.importorskip("ray")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # importable by the workers too
    import bench_sources

    models = bench_sources.build_models(tmp_path, "small", experts=3)  # 4 x 11 MB
    one_copy = sum(Path(m, "model.safetensors").stat().st_size for m in models)
    for mode in ("disk", "host"):
        row = bench_sources.measure(models, mode, workers=2, candidates=2)
        assert row["workers"] == 2
        assert 0.9 * one_copy <= row["files pss"] <= 1.2 * one_copy, (mode, row["files pss"] / one_copy)


FAULTS_PER_ALLOCATION = """
import resource, sys, torch
from evomerge.run.worker import keep_freed_host_memory
if sys.argv[1] == "kept":
    assert keep_freed_host_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(2**24)
before = faults()
for _ in range(20):
    torch.ones(2**24)  # 64 MiB, freed at once, as a merge's temporaries are
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and getrusage's page-fault count")
def test_a_cpu_worker_reuses_freed_host_memory_instead_of_faulting_it_in_again():
    """With keep_freed_host_memory (a CPU worker calls it when it starts), twenty 64 MiB tensors allocated and freed in
    turn are mostly served from memory the heap kept: the page faults of a few allocations, not of twenty."""
    import subprocess

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_ALLOCATION, mode], capture_output=True, text=True,
                             check=True)
        return int(out.stdout)

    kept, plain = faults("kept"), faults("plain")
    assert kept * 2 < plain, (kept, plain)  # measured here: 1-6 of the 20 allocations faulted in, against all 20
