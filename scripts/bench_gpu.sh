#!/usr/bin/env bash
# Issue 5's GPU figures in one command, on a CUDA machine (H100/H200; ~10 min, most of it mergekit):
#   bash scripts/bench_gpu.sh            -> benchmarks/results/<gpu>-llama-3.2-1b-<date>.{json,md} and trial-<gpu>-...
# Per-candidate merge time vs the bandwidth floor for every method (and mergekit's run_merge / mergekit-yaml when the
# bench extra is installed), then one search trial end to end (merge + loglikelihood of 32768 tokens) on the same shape.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mergekit=()
python -c "import mergekit" 2>/dev/null && mergekit=(--mergekit --mergekit-methods linear,slerp,ties,dare_ties --mergekit-repeats 1)
python scripts/bench_merge.py --shape llama-3.2-1b --device cuda --dtype bfloat16 "${mergekit[@]}"
# the DARE/DELLA mask hash fused by torch.compile (rng.compile_rng): draws past the worker's memo budget cost one kernel
python scripts/bench_merge.py --shape llama-3.2-1b --device cuda --dtype bfloat16 --compile
python scripts/bench_trial.py --shape llama-3.2-1b --device cuda --dtype bfloat16
