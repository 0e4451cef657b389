#!/usr/bin/env bash
# The GPU acceptance check, one command on one GPU (about 15 min on an H100):
#
#   bash scripts/gpu_check.sh                 # results in results/gpu_check/ (RESULTS_DIR to move them)
#   SMOKE=1 bash scripts/gpu_check.sh         # the same stages at a tiny scale on the CPU (checks this script)
#
# 1. the CUDA tests (pytest -m gpu: fp32 GPU == CPU without TF32, bf16 KV cache on the flash kernel, a compiled
#    bf16 step at two lengths, the memory estimate against torch.cuda.max_memory_allocated);
# 2. a tokenizer and pretokenized data from the local corpus ($NANOCHAT_DATA_DIR), in a fresh base dir;
# 3. the memory estimate of the GPU preset (benchmarks.memory_estimate, baseline and dynamic_mhc);
# 4. the GPU preset's first 20 steps on this GPU (d12, 64 x 1024 tokens, bf16, compiled), baseline and mHC, then
#    the mHC model eager: tok/s, MFU, peak memory next to the estimate -> results/gpu_check/summary.json;
# 5. benchmarks.mhc_overhead --compile at d12 (mHC / baseline step time).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source scripts/setup_env.sh
out="${RESULTS_DIR:-$repo/results}/gpu_check"
mkdir -p "$out"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$out/base}"
export NANOCHAT_DATA_DIR="${NANOCHAT_DATA_DIR:-$(cd "$repo/.." && pwd)/shared/data}"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ "${SMOKE:-0}" = 1 ]; then  # the stages at a scale a CPU runs in minutes
    shape=(--depth 2 --aspect-ratio 32 --head-dim 32 --max-seq-len 64 --device-batch-size 2 --total-batch-size 128
           --eval-tokens 256)
    vocab=1024; steps=3; device=(--device-type cpu --dtype float32 --compile false)
    estimate=(--device-batch-size 2)
    bench=(--depth 2 --head-dim 32 --seq-len 64 --batch-size 2 --vocab-size 1024 --steps 2 --warmup 1)
else
    command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null || { echo "gpu_check: no GPU (SMOKE=1 runs the CPU smoke)" >&2; exit 2; }
    shape=(--total-batch-size 65536 --eval-tokens 65536)  # the preset's 64 x 1024 per GPU on one: no accumulation
    vocab=32768; steps=20; device=(); estimate=()
    bench=(--depth 12 --head-dim 128 --seq-len 1024 --batch-size 16 --vocab-size 32768 --dtype bfloat16 --compile)
    python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$out/pytest_gpu.txt"
fi
python -m nanochat.dataset --source local
python -m scripts.tok_train --source local --vocab-size "$vocab"
python -m nanochat.dataset --source local --pretokenize
for config in baseline dynamic_mhc; do
    python -m benchmarks.memory_estimate --config "$config" --vocab-size "$vocab" "${estimate[@]}" \
        --out "$out/memory_estimate_$config.json" | tee "$out/memory_estimate_$config.txt"
done
run() {  # tag config extra-args...
    local tag=$1 config=$2; shift 2
    rm -rf "$NANOCHAT_BASE_DIR/checkpoints/$tag" "$out/$tag"
    python -m scripts.base_train --config "$config" --data-source local --num-iterations "$steps" --eval-every -1 \
        --save-every -1 --memory-check true --model-tag "$tag" --results-dir "$out" "${shape[@]}" "${device[@]}" "$@" \
        2>&1 | tee "$out/$tag.txt"
}
run baseline baseline
run mhc dynamic_mhc
run mhc_eager dynamic_mhc --compile false
python -m benchmarks.mhc_overhead "${bench[@]}" --out "$out/mhc_overhead.json" | tee "$out/mhc_overhead.txt"
python - "$out" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for tag in ("baseline", "mhc", "mhc_eager"):
    rows = [json.loads(l) for l in (out / tag / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    cfg = json.loads((out / tag / "config.json").read_text())
    timed = rows[min(5, len(rows) - 1):]  # the first steps include compilation
    peak = [l for l in (out / f"{tag}.txt").read_text().splitlines() if l.startswith("peak memory:")]
    summary[tag] = dict(steps=len(rows), final_loss=rows[-1]["loss"],
                        tok_per_sec=statistics.median(r["tok_per_sec"] for r in timed),
                        mfu=statistics.median(r["mfu"] for r in timed) if "mfu" in timed[0] else None,
                        peak_memory=peak[-1] if peak else None, estimate=cfg.get("memory_estimate"),
                        compile=cfg["compile"], dtype=cfg["dtype"])
    s = summary[tag]
    mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"
    est = f"{s['estimate']['peak'] / 2**30:.1f} GiB" if s["estimate"] else "n/a"
    print(f"{tag:<10} tok/s {s['tok_per_sec']:>10,.0f} | MFU {mfu:>6} | {s['peak_memory'] or 'peak memory n/a'} "
          f"(estimate {est}) | loss {s['final_loss']:.3f} after {s['steps']} steps")
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(f"wrote {out / 'summary.json'}")
EOF
