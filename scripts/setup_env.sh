#!/usr/bin/env bash
# Create .venv and install the project (pyproject.toml is the one list of dependencies). Sourced by
# speedrun.sh and scripts/run_tests.sh; safe to source repeatedly (reinstalls only when pyproject.toml changes).
#
# torch is pinned to 2.13.0 in pyproject.toml, so pip never resolves a newer (multi-GB CUDA) build on a CPU box.
# On a GPU cluster the same pin installs PyPI's CUDA build of 2.13.0; to use another CUDA build, install it
# into .venv first (pip install torch==2.13.0 --index-url <PyTorch's cuXXX index>) and this script keeps it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NANOCHAT_VENV:-$repo/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
stamp="$venv/.nanochat-installed"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing nanochat-mhc and its dependencies into $venv"
    python -m pip install --quiet -e "$repo[dev,rl,analysis,harness,hf]" 2>&1 | grep -v "is ignored" || true
    python -c "import torch, tiktoken, rustbpe, safetensors, datasets, gymnasium, stable_baselines3, statsmodels, \
papermill, ipykernel, lm_eval, sklearn, tensorboard, transformers, tokenizers, accelerate" \
        || { echo "[setup] install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
