#!/usr/bin/env bash
# Issue 5's GPU figures in one command, on a CUDA machine (H100/H200; ~10 min, most of it mergekit):
#   bash scripts/bench_gpu.sh            -> benchmarks/results/<gpu>-llama-3.2-1b-<date>.{json,md} and trial-<gpu>-...
# Per-candidate merge time vs the bandwidth floor for every method (and mergekit's run_merge / mergekit-yaml when the
# bench extra is installed), then one search trial end to end (merge + loglikelihood of 32768 tokens) on the same shape.
# On a machine without network, carry the wheels of scripts/gpu_wheels.sh as .whl/ (installed here into a temp dir).
# SHAPE, DEVICE and RESULTS (the output dir) override the defaults; on the lent GPU machine, whose files come back only
# from $OUT: `RESULTS=$OUT bash scripts/bench_gpu.sh` (SHAPE=tiny DEVICE=cpu RESULTS=/tmp/x is a quick dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}" SHAPE="${SHAPE:-llama-3.2-1b}" DEVICE="${DEVICE:-cuda}" RESULTS="${RESULTS:-benchmarks/results}"
if compgen -G ".whl/*.whl" >/dev/null; then
  site="$(mktemp -d)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mergekit=()
"$PYTHON" -c "import mergekit" 2>/dev/null && mergekit=(--mergekit --mergekit-methods linear,slerp,ties,dare_ties --mergekit-repeats 1)
"$PYTHON" scripts/bench_merge.py --shape "$SHAPE" --device "$DEVICE" --dtype bfloat16 --out "$RESULTS" "${mergekit[@]}"
# the same without the fused kernels (merge/fused.py), for comparison: each op one pass over memory
"$PYTHON" scripts/bench_merge.py --shape "$SHAPE" --device "$DEVICE" --dtype bfloat16 --out "$RESULTS" --fuse off
"$PYTHON" scripts/bench_trial.py --shape "$SHAPE" --device "$DEVICE" --dtype bfloat16 --out "$RESULTS"
