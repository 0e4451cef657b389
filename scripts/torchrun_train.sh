#!/usr/bin/env bash
# torchrun launcher shared by train_baseline.sh and train_mhc.sh (which set WRAPPER, DEFAULT_CONFIG, DEFAULT_TAG).
#   bash scripts/train_mhc.sh [extra base_train flags]      (python -m scripts.base_train --help lists those flags)
#
# Environment (every one optional):
#   CONFIG             named config in configs/ (or a .toml path); default: see the wrapper. --config in the flags
#                      overrides it, as base_train's last --config wins
#   MODEL_TAG          checkpoints/<tag> and results/<tag>; default as speedrun.sh: mhc / baseline, with a tiny_
#                      prefix for a tiny_* CONFIG (tiny_mhc, tiny_baseline)
#   NANOCHAT_BASE_DIR  tokenizer, data and checkpoints; default as speedrun.sh: ~/.cache/nanochat-tiny for a tiny_*
#                      CONFIG, else ~/.cache/nanochat
#   NPROC_PER_NODE     processes on this node (default: the GPUs nvidia-smi lists, else 1)
#   NNODES, NODE_RANK  multi-node layout (default 1, 0); MASTER_ADDR, MASTER_PORT (29500), RDZV_ID: rendezvous.
#                      c10d rendezvous ignores NODE_RANK (any node may get rank 0, the one writer): every node
#                      must share NANOCHAT_BASE_DIR and the results dir (checked at startup, one line if not)
# Before launching torchrun it checks, in one line each, what training needs first: the config file and the
# tokenizer (a failure inside torchrun arrives wrapped in a long ChildFailedError traceback).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="${WRAPPER:-torchrun_train}"
for arg in "$@"; do
    case "$arg" in -h|--help)  # the wrapper's own help; base_train's flags: python -m scripts.base_train --help
        sed -n '2,/^set -euo/p' "$repo/scripts/$name.sh" | sed '$d; s/^# \{0,1\}//'
        if [ "$name" != torchrun_train ]; then
            sed -n '2,/^set -euo/p' "$repo/scripts/torchrun_train.sh" | sed '1,2d; $d; s/^# \{0,1\}//'
        fi
        exit 0 ;;
    esac
done
config="${CONFIG:-${DEFAULT_CONFIG:-baseline}}"
prev=
for arg in "$@"; do  # a --config among the flags is the one base_train will use: check that one
    case "$arg" in --config=*) config="${arg#--config=}" ;; esac
    [ "$prev" = --config ] && config="$arg"
    prev="$arg"
done
tiny=; [[ "$(basename "$config" .toml)" == tiny_* ]] && tiny=tiny_   # speedrun.sh's tiny preset uses these
model_tag="${MODEL_TAG:-$tiny${DEFAULT_TAG:-baseline}}"
if [ -n "$tiny" ]; then
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat-tiny}"
else
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
fi
case "$config" in */*|*.toml) config_path="$config" ;; *) config_path="$repo/configs/$config.toml" ;; esac
echo "[$name] NANOCHAT_BASE_DIR=$NANOCHAT_BASE_DIR CONFIG=$config MODEL_TAG=$model_tag"
cd "$repo"  # a relative config path is relative to the repo, as base_train resolves it after this cd
if [ ! -f "$config_path" ]; then
    named="$(cd configs && ls -- *.toml | sed 's/\.toml$//' | paste -sd, - | sed 's/,/, /g')"
    echo "[$name] CONFIG=$config: no such file $config_path (named configs: $named)" >&2
    exit 2
fi
if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.json" ]; then  # nanochat/tokenizer.py's get_tokenizer_dir()
    echo "[$name] no tokenizer in $NANOCHAT_BASE_DIR/tokenizer: point NANOCHAT_BASE_DIR at the folder" \
         "speedrun.sh prepared, or prepare one (data, tokenizer, pretokenize: nanochat/dataset.py's docstring)" >&2
    exit 2
fi
source "$repo/scripts/setup_env.sh"
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
echo "[$name] torchrun: NPROC_PER_NODE=$NPROC_PER_NODE NNODES=$nnodes"
# scripts.launch = torchrun with short endings (SIGTERM: save on every rank, exit 143; a failed rank: one line)
exec python -m scripts.launch "${rdzv[@]}" --nproc_per_node="$NPROC_PER_NODE" -m scripts.base_train -- \
    --config "$config" --model-tag "$model_tag" "$@"
