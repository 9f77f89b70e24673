#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the suite in TEST_WORKERS processes (pytest-xdist; 2 by
# default, 0 for one process). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$(mktemp -d)}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec ${PYTHON:-python3} -m pytest -n "${TEST_WORKERS:-2}" "$@"
