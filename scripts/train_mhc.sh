#!/usr/bin/env bash
# Train the Dynamic mHC GPT with torchrun on this node or a cluster: same data and token budget as the baseline.
#   bash scripts/train_mhc.sh [extra base_train flags]
# Environment: as scripts/train_baseline.sh; CONFIG defaults to dynamic_mhc, MODEL_TAG to mhc.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec bash "$repo/scripts/torchrun_train.sh" --config "${CONFIG:-dynamic_mhc}" --model-tag "${MODEL_TAG:-mhc}" "$@"
