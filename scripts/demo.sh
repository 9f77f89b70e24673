#!/usr/bin/env bash
# The main job: the toy-zoo demo end to end on CPU.
#   1. install evomerge;  2. build the toy zoo (once; deterministic by seed);  3. score the base, the experts, the
#   multi-task reference and default merges on the test split;  4. evolve a TIES recipe (CMA-ES) and report it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$PWD/runs/.hf_datasets}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p runs
[ -f zoo/zoo.json ] || evomerge zoo build zoo
# default merges of the three skill experts (the baselines the search must beat)
evomerge eval zoo/base zoo/expert_cipher zoo/expert_reverse zoo/expert_digits zoo/expert_upper zoo/multitask \
  experiments/baselines/*.yaml --tasks toy,toy_gen --split test --output-json runs/baselines.json
[ -f runs/toy_ps/best/recipe.yaml ] || evomerge search experiments/toy_ps.yaml --run-dir runs/toy_ps
evomerge report runs/toy_ps
evomerge eval runs/toy_ps/best/recipe.yaml --tasks toy,toy_gen --split test --output-json runs/toy_ps_test.json
echo "report: runs/toy_ps/report/summary.md"
