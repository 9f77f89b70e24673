#!/usr/bin/env bash
# Issue 5's GPU figures, on a CUDA machine (H100/H200):
#   bash scripts/bench_gpu.sh            -> benchmarks/results/<gpu>-llama-3.2-1b-<date>.{json,md}, trial-..., ...
# Steps (STEPS picks some, in this order):
#   bench    per-candidate merge time vs the bandwidth floor for every method, then mergekit's run_merge and
#            mergekit-yaml for linear and ties when the bench extra is installed; the files are rewritten after every
#            method, so a run cut short keeps what it measured
#   trial    one search trial end to end (merge + loglikelihood of 32768 tokens) on the same shape
#   tests    the merge methods on the GPU against the float64 references (gpu-tests.txt, written as the tests run)
# On a machine without network, carry the wheels of scripts/gpu_wheels.sh as .whl/ (installed here into a temp dir).
# SHAPE, DEVICE, METHODS (comma-separated, to split a step across calls) and RESULTS (the output dir) override the
# defaults. On the lent GPU machine (15 minutes of device time, 10 per command; files come back only from $OUT), two
# calls: `RESULTS=$OUT STEPS="bench trial" bash scripts/bench_gpu.sh`, then `RESULTS=$OUT STEPS="tests" ...`
# (SHAPE=tiny DEVICE=cpu RESULTS=/tmp/x is a quick dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}" SHAPE="${SHAPE:-llama-3.2-1b}" DEVICE="${DEVICE:-cuda}" RESULTS="${RESULTS:-benchmarks/results}"
STEPS="${STEPS:-bench trial tests}"
if compgen -G ".whl/*.whl" >/dev/null; then
  site="$(mktemp -d)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$RESULTS"
bench=("$PYTHON" scripts/bench_merge.py --shape "$SHAPE" --device "$DEVICE" --dtype bfloat16 --out "$RESULTS"
       ${METHODS:+--methods "$METHODS"})
for step in $STEPS; do
  case "$step" in
    tests)  # a failure is reported in the file and does not stop the benchmarks
      "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_methods.py tests/test_incremental.py -k "$DEVICE" \
        2>&1 | tee "$RESULTS/gpu-tests.txt" | tail -3 || true ;;
    bench)
      mergekit=()
      "$PYTHON" -c "import mergekit" 2>/dev/null &&
        mergekit=(--mergekit --mergekit-methods linear,ties --cli-methods linear,ties --mergekit-repeats 1)
      "${bench[@]}" "${mergekit[@]}" ;;
    trial) "$PYTHON" scripts/bench_trial.py --shape "$SHAPE" --device "$DEVICE" --dtype bfloat16 --out "$RESULTS" ;;
    *) echo "unknown step $step (tests, bench, trial)" >&2; exit 2 ;;
  esac
done
