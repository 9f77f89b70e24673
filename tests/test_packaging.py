"""The wheel is complete: every subpackage, and the bundled lm-eval tasks (evals/ -> evomerge/evals), which it finds."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_package_and_the_toy_tasks(tmp_path):
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("evomerge", "evals"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("evomerge-*.whl"))
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
