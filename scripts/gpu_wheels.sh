#!/usr/bin/env bash
# Wheels for a GPU machine without network whose image has torch, transformers, safetensors, numpy, pyyaml and tqdm but
# not evomerge's other needs (pydantic), the bench extra (mergekit and what it adds: datasets, immutables) nor pytest:
#   bash scripts/gpu_wheels.sh        # here, with a package index: Python 3.12 x86-64 wheels into .whl/ (git-ignored)
# then, on the GPU machine, with .whl carried next to the checkout, `bash scripts/bench_gpu.sh` installs them itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.12}"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}" \
  -d .whl pydantic pydantic-core annotated-types typing-inspection mergekit==0.1.5 immutables datasets dill multiprocess \
  pytest pluggy iniconfig pygments
ls .whl
