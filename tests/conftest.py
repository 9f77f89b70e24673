"""Shared fixtures. Keep this file small and generic: fixtures used by one test file belong in that file."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_per_xdist_worker():
    """Under pytest-xdist (scripts/test.sh runs 2 workers) each worker computes on one torch thread: two workers with
    torch's default threads would put twice as many threads as cores to work, and OpenMP threads waiting on each other
    are much slower than one thread."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache_in_tmp(tmp_path_factory):
    """The datasets cache in a temp dir: tests never write under ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        yield


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A tiny toy zoo (evomerge.zoo, --size tiny, seed 0), built once per test session: base/, expert_*/, multitask/."""
    from evomerge.zoo.build import build_zoo

    out = tmp_path_factory.mktemp("zoo") / "tiny"
    build_zoo(out, seed=0, size="tiny", log=None)
    return out


@pytest.fixture(scope="session")
def load_script():
    """Import scripts/<name>.py as a module (the benchmark scripts are not part of the package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def one_thread():
    """A benchmark script's `--threads 1` (a shared CPU); torch's thread count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)
