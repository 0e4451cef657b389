#!/usr/bin/env bash
# Train the Dynamic mHC GPT with torchrun on this node or a cluster: same data and token budget as the baseline.
#   bash scripts/train_mhc.sh [extra base_train flags]
#   CONFIG=tiny_cpu_mhc bash scripts/train_mhc.sh     # the tiny preset's model, in speedrun.sh's tiny base dir
# CONFIG defaults to dynamic_mhc, MODEL_TAG to mhc (tiny_mhc for a tiny_* CONFIG).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WRAPPER=train_mhc DEFAULT_CONFIG=dynamic_mhc DEFAULT_TAG=mhc exec bash "$repo/scripts/torchrun_train.sh" "$@"
