#!/usr/bin/env bash
# torchrun launcher shared by train_baseline.sh and train_mhc.sh: reads the node layout from the environment.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NPROC_PER_NODE="$(nvidia-smi -L | wc -l)"
    else
        NPROC_PER_NODE=1
    fi
fi
nnodes="${NNODES:-1}"
if [ "$nnodes" -gt 1 ]; then
    : "${MASTER_ADDR:?set MASTER_ADDR (the rendezvous host) for a multi-node run}"
    rdzv=(--nnodes="$nnodes" --node-rank="${NODE_RANK:-0}" --rdzv-backend=c10d
          --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id="${RDZV_ID:-nanochat}")
else
    rdzv=(--standalone)
fi
exec torchrun "${rdzv[@]}" --nproc_per_node="$NPROC_PER_NODE" -m scripts.base_train -- "$@"
