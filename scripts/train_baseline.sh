#!/usr/bin/env bash
# Train the baseline GPT with torchrun on this node or a cluster (the design card's `bash scripts/train_*.sh`).
#   bash scripts/train_baseline.sh [extra base_train flags]
#   CONFIG=tiny_cpu bash scripts/train_baseline.sh    # the tiny preset's model, in speedrun.sh's tiny base dir
# CONFIG defaults to baseline, MODEL_TAG to baseline (tiny_baseline for a tiny_* CONFIG).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WRAPPER=train_baseline DEFAULT_CONFIG=baseline DEFAULT_TAG=baseline \
    exec bash "$repo/scripts/torchrun_train.sh" "$@"
