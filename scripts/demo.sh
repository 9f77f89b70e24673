#!/usr/bin/env bash
# The main job: the toy-zoo demo end to end on CPU (~7-11 minutes on 2 cores, the install included).
#   1. install evomerge;  2. build the toy zoo (once; deterministic by seed; committed, so usually skipped);
#   3. run the searches of experiments/ (PS with CMA-ES, the same space with random search, PS with DARE-TIES, the
#      distraction test, DFS, PS+DFS, NSGA-II over the three skills, natural niches with racing) and report each;  4. score every model, default
#      merge and search winner on the test split and print the results table (runs/results.md; other tasks in
#      runs/results_extra.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$PWD/runs/.hf_datasets}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p runs
[ -f zoo/zoo.json ] || evomerge zoo build zoo
runs=()
for experiment in toy_random toy_ps toy_ps_dare toy_distractor toy_dfs toy_psdfs toy_nsga2 toy_niches; do  # toy_psdfs builds on toy_ps
  [ -f "experiments/$experiment.yaml" ] || continue
  [ -f "runs/$experiment/best/recipe.yaml" ] || evomerge search "experiments/$experiment.yaml" --run-dir "runs/$experiment"
  evomerge report "runs/$experiment" > /dev/null
  runs+=("runs/$experiment/best/recipe.yaml")
done
targets=(zoo/base zoo/expert_cipher zoo/expert_reverse zoo/expert_digits zoo/expert_upper zoo/multitask
         experiments/baselines/{linear,task_arithmetic,ties,dare_ties}.yaml "${runs[@]}")
evomerge eval "${targets[@]}" --tasks toy,toy_extra --split test --output-json runs/results_extra.json \
  --output-md runs/results_extra.md > /dev/null
evomerge eval "${targets[@]}" --tasks toy_gen --split test --output-json runs/results.json --output-md runs/results.md
echo "results: runs/results.md (exact match), runs/results_extra.md (multiple choice, distractor skill, composition)"
echo "reports: runs/*/report/summary.md"
