#!/usr/bin/env bash
# Train the baseline GPT with torchrun on this node or a cluster (the design card's `bash scripts/train_*.sh`).
#   bash scripts/train_baseline.sh [extra base_train flags]
# Environment: NPROC_PER_NODE (default: the GPUs nvidia-smi lists, else 1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR / MASTER_PORT (rendezvous for NNODES > 1), CONFIG (baseline), MODEL_TAG (baseline).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec bash "$repo/scripts/torchrun_train.sh" --config "${CONFIG:-baseline}" --model-tag "${MODEL_TAG:-baseline}" "$@"
