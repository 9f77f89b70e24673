#!/usr/bin/env bash
# Installs evomerge (editable) with the extras named in $1 (e.g. "test"), into the active Python environment.
# torch is installed first, pinned to the CPU build, only when absent: users with a CUDA build keep theirs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
stamp=".install-stamp${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! $PY -c "import evomerge" 2>/dev/null; then
  $PY -m pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
