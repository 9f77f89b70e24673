"""The package as a user installs it: the wheel is complete (every subpackage, the bundled lm-eval tasks, which it
finds), and the wheel without extras in a brand-new venv runs an evaluation and a search with no failed trial (a
runtime import that only a test extra provides, e.g. lm-eval's HFLM needing accelerate, fails here and nowhere else)."""

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TORCH_CPU = "torch==2.13.0"  # as scripts/install.sh: the CPU build, installed first when the venv has no torch


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("evomerge", "evals"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True)
    return next((tmp / "dist").glob("evomerge-*.whl"))


def test_wheel_ships_every_package_and_the_toy_tasks(wheel, tmp_path):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "evomerge").rglob("__init__.py")}
    tasks = {"evomerge/evals/" + p.relative_to(ROOT / "evals").as_posix() for p in (ROOT / "evals").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts}
    assert packages <= names and tasks <= names and "evomerge/evals/toy/toy_gen.yaml" in names

    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    found = subprocess.run([sys.executable, "-c", "from evomerge.evaluate.tasks import evals_dir; print(evals_dir())"],
                           env={"PYTHONPATH": str(installed), "PATH": ""}, cwd=tmp_path, capture_output=True, text=True,
                           check=True)
    assert Path(found.stdout.strip()) == installed / "evomerge" / "evals"


def _distribution(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_package_the_runtime_imports_is_declared():
    """Each top-level import of evomerge/ and evals/ (not the standard library's) comes from a distribution that
    pyproject.toml's dependencies name: none is left to whatever another package pulls in."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = {_distribution(re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0])
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for path in [*(ROOT / "evomerge").rglob("*.py"), *(ROOT / "evals").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"evomerge"}:
                if not {_distribution(d) for d in providers.get(top, [])} & declared:
                    undeclared.setdefault(top, path.relative_to(ROOT).as_posix())
    assert not undeclared, f"imported, not in pyproject's dependencies: {undeclared}"


IMPORT_EVERY_MODULE = """
import importlib, pkgutil, evomerge
names = [m.name for m in pkgutil.walk_packages(evomerge.__path__, "evomerge.")]
for name in names:
    importlib.import_module(name)
print(len(names), "modules from", evomerge.__file__)
"""


@pytest.mark.slow  # 1-4 min: pip installs the runtime dependencies into a new venv (from pip's cache when warm)
def test_the_wheel_without_extras_in_a_brand_new_venv_evaluates_and_searches(wheel, tiny_zoo, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}

    def run(*args, **kwargs):
        done = subprocess.run(list(args), env=env, cwd=tmp_path, capture_output=True, text=True, **kwargs)
        assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    # --no-compile: pip byte-compiles every module it installs (torch: 62 s with it, 10 s without, here); Python
    # compiles the few this test imports when it imports them
    run(python, "-m", "pip", "install", "-q", "--no-compile", TORCH_CPU)
    run(python, "-m", "pip", "install", "-q", "--no-compile", str(wheel))  # no extras: what `pip install evomerge` gives
    assert "modules from " + str(venv) in run(python, "-c", IMPORT_EVERY_MODULE)

    table = run("evomerge", "eval", str(tiny_zoo / "base"), "--tasks", "toy_gen", "--split", "test", "--limit", "4")
    assert "cipher_gen" in table and "mean" in table

    experiment = {"name": "fresh", "space": {"kind": "ps", "method": "ties", "base_model": str(tiny_zoo / "base"),
                                             "models": [str(tiny_zoo / "expert_cipher"), str(tiny_zoo / "expert_digits")],
                                             "bounds": {"weight": [0.0, 1.0]}},
                  "optimizer": {"name": "random"}, "budget": {"trials": 2, "max_consecutive_failures": 0},
                  "evaluation": {"tasks": ["toy_gen"], "limit": 3}, "validation": {"top_k": 1}}
    (tmp_path / "fresh.yaml").write_text(yaml.safe_dump(experiment))
    out = run("evomerge", "search", "fresh.yaml", "--run-dir", "run")
    assert "2 trials, 0 failed" in out, out
