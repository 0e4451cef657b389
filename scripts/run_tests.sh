#!/usr/bin/env bash
# The test suite, set-up included: bash scripts/run_tests.sh [pytest args]   (slow tests: -m slow)
# Runs offline: local data from $NANOCHAT_DATA_DIR (default ../shared/data), HF hub offline, wandb disabled.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
export NANOCHAT_DATA_DIR="${NANOCHAT_DATA_DIR:-$(cd "$repo/.." && pwd)/shared/data}"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export HF_HOME="$repo/.cache/hf" TIKTOKEN_CACHE_DIR="$repo/.cache/tiktoken"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest "$@"
