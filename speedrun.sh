#!/usr/bin/env bash
# The whole pipeline: setup -> (a fresh clone's small data) -> data -> tokenizer -> pretokenize -> baseline and mHC
# training (identical data and token budgets) -> evaluation of both (bpb, GSM8K 0/8-shot, HellaSwag,
# ARC-Easy/Challenge) -> the mHC model through lm-evaluation-harness -> mHC statistics -> fine-tuning of the mHC
# model on GSM8K-format problems and, with the same recipe and tokens, of the baseline -> gate sweep -> the headroom
# of a context-dependent gate (analysis/gate_oracle.py: per-problem oracle, cross-fitted contextual baselines) ->
# the RL gate controller (PPO or RLOO) over the mHC gates of the frozen fine-tuned model, with its black-box
# baselines, model selection on RL-validation problems and held-out evaluation -> the inference benchmark and
# results/report.md (every table and figure; analysis/report.py).
#
#   bash speedrun.sh                 # 8xH100 preset when GPUs are present, the tiny CPU preset otherwise
#   PRESET=tiny bash speedrun.sh     # force a preset: gpu | tiny
#   FORCE=1 bash speedrun.sh         # redo finished stages (each stage is otherwise skipped once done)
#   SKIP=data,tokenizer bash speedrun.sh
#   EXTRA_TRAIN_ARGS="--num-iterations 20" EXTRA_EVAL_ARGS="--eval-tokens 8192" bash speedrun.sh   # extra flags
#   (also EXTRA_SFT_ARGS, EXTRA_LM_EVAL_ARGS, EXTRA_RL_ARGS, EXTRA_BENCH_ARGS, EXTRA_EXPORT_ARGS for those stages,
#   EXTRA_SWEEP_ARGS for the gate sweep, analysis.gate_sweep, and EXTRA_ORACLE_ARGS for analysis.gate_oracle; the
#   memory_* stages take EXTRA_TRAIN_ARGS)
#   RESULTS_DIR=/somewhere bash speedrun.sh   # where metrics/eval JSON go (default: results/)
#   NANOCHAT_BASE_DIR=/cache bash speedrun.sh # tokenizer, shards, checkpoints, stage markers (default:
#                                             # ~/.cache/nanochat, tiny preset ~/.cache/nanochat-tiny)
#   NANOCHAT_DATA_DIR=/data bash speedrun.sh  # local copies of the datasets (default: ../shared/data beside the
#                                             # clone, else the tiny preset fetches the small sets from the hub)
#   RUN_RL_SEEDS=1 bash speedrun.sh           # tiny: also the RLOO run on 5 seeds (~10 min; the GPU preset always)
#   RUN_NS_ABLATION=1 bash speedrun.sh        # also run the Newton–Schulz ablation (tiny: est. 5-10 min on 2 idle cores)
#   RUN_NGPT_CAMPAIGN=1 bash speedrun.sh      # also run the nGPT campaign (configs/sweeps/; tiny: ~3 min, 2 seeds)
#
#   bash speedrun.sh --help          # this text; every setting is an environment variable, no other argument
#
# Each stage leaves a marker in $NANOCHAT_BASE_DIR/speedrun/ that records its settings (command line, config files);
# a stage is skipped only while those settings are unchanged and its outputs exist, else it says why and reruns
# (scripts/stage.sh). Training stages run with --resume, so an interrupted run (Ctrl-C, preemption) picks up from
# its last checkpoint when the script is started again. One speedrun per NANOCHAT_BASE_DIR at a time: a second one is
# refused in one line naming the first one's PID (the lock $NANOCHAT_BASE_DIR/speedrun/.lock).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -eq 0 ] || case "$1" in  # before the set-up below: --help must launch nothing
  -h|--help) sed -n '2,/^set -euo/p' "$repo/speedrun.sh" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "speedrun.sh: unknown argument '$1': settings are environment variables (bash speedrun.sh --help)" >&2
     exit 2 ;;
esac
cd "$repo"
source scripts/setup_env.sh
source scripts/stage.sh

preset="${PRESET:-auto}"
eval_tasks=bpb,gsm8k,gsm8k_8shot,hellaswag,arc_easy,arc_challenge
if [ "$preset" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then preset=gpu; else preset=tiny; fi
fi
case "$preset" in
  gpu)
    ngpu="${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}"
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
    source_name=fineweb; vocab=32768; base_config=baseline; mhc_config=dynamic_mhc; prefix=
    launch=(python -m scripts.launch --standalone --nproc_per_node="$ngpu" -m)   # torchrun, short endings
    sep=(--)
    data_args=(-n "${NUM_SHARDS:-240}")
    data_out="$NANOCHAT_BASE_DIR/base_data/fineweb"   # the shards (nanochat/dataset.py's layout)
    eval_args=(--eval-tokens 10485760 --device-batch-size 32 --tasks "$eval_tasks")  # every example of every task
    # fine-tune on GSM8K train + synthetic problems; sweep and RL on GSM8K (train for RL, test held out)
    sft_args=(--data gsm8k,synthetic)             # GSM8K: the SFT part of train only (nanochat/splits.py)
    sweep_args=(--problems gsm8k --split test --num-problems 256 --tokens 1048576 --batch-size 32)
    # the headroom on RL's training pool: dense replicates (even/odd answer tokens), then exact match (two
    # sampled decodes), global and per-layer gate sets
    oracle_runs=("gsm8k dense global --num-problems 1024" "gsm8k exact global --num-problems 512"
                 "gsm8k dense per_layer --num-problems 512")
    # learner, problems, action space, then flags of this run only: the plan's PPO on the global gate and per
    # layer, and RLOO (no critic) per layer
    rl_runs=("ppo gsm8k global" "ppo gsm8k per_layer" "rloo gsm8k per_layer")
    rl_args=(--preset gpu)
    rl_reward=exact                               # configs/rl_gpu.toml's reward: part of each RL run's tag
    rl_out=seeds.json                             # configs/rl_gpu.toml runs 5 seeds: <tag>/seeds.json, <tag>-s<seed>/
    rl_column=mhc_sft-gsm8k-per_layer-exact-s0    # the Phase-4 RL-tuned column: this run's per-problem policy
    hres_args=(--tokens 262144 --batch-size 32)
    lm_eval_args=(--tasks gsm8k,hellaswag,arc_easy,arc_challenge --batch-size 32)   # the harness's own settings
    bench_args=(--depth 12 --head-dim 128 --vocab-size 32768 --seq-len 1024 --dtype bfloat16 --batch-sizes 1,8)
    memory_args=(--vocab-size 32768)   # the GPU step in bf16, every --activation-checkpointing mode
    ;;
  tiny)
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat-tiny}"
    if [ -z "${NANOCHAT_DATA_DIR:-}" ]; then  # ../shared/data beside the clone, else fetch the small sets
        if [ -d "$repo/../shared/data/gsm8k" ]; then
            export NANOCHAT_DATA_DIR="$(cd "$repo/../shared/data" && pwd)"
        else
            export NANOCHAT_DATA_DIR="$NANOCHAT_BASE_DIR/hub_small_data"
            fetch_small_data=1
        fi
    fi
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
    source_name=local; vocab=4096; base_config=tiny_cpu; mhc_config=tiny_cpu_mhc; prefix=tiny_
    launch=(python -m)
    sep=()
    data_args=()
    data_out="$NANOCHAT_BASE_DIR/base_data/local/manifest.json"   # written last, once the shards are built
    # a smoke-sized subset (~30 s per model on 2 cores): the tiny models score near chance anyway; the task data is
    # the local copy (the hub is not tried, so an offline box does not wait on it)
    eval_args=(--eval-tokens 32768 --device-batch-size 8 --tasks "$eval_tasks" --max-per-task 16
               --max-new-tokens 48 --task-data local)
    # fine-tune both models on the mixed-difficulty synthetic problems (~1 min each), a coarse global gate sweep
    # (~15 s), the headroom on synthetic and GSM8K problems (~40 s each), then RL: RLOO on held-out synthetic
    # problems (~2 min) and PPO on GSM8K (RL-train part, test held out; ~2 min), with the dense reward. Cut to
    # keep the whole run within 15 min on 2 cores: 80 fine-tuning steps of 12 rows, 96 and 64 problems for the
    # headroom, RL budgets of 768 and 256 problems with the grid as the only black box, 48 and 32 held out
    sft_args=(--data synthetic --synthetic-count 4000 --synthetic-mix mixed
              --num-iterations 80 --device-batch-size 12 --eval-every 40 --log-every 20)
    sweep_args=(--problems synthetic --synthetic-mix mixed --num-problems 24 --tokens 4096 --per-layer-grid none)
    oracle_runs=("synthetic dense global --synthetic-mix mixed --num-problems 96"
                 "gsm8k dense global --num-problems 64 --task-data local")
    rl_runs=("rloo synthetic global" "ppo gsm8k global --total-timesteps 256 --eval-problems 32 --max-new-tokens 64")
    rl_args=(--preset tiny --task-data local --no-progress)
    rl_reward=dense                               # configs/rl_tiny.toml's reward: part of each RL run's tag
    rl_out=eval.json                              # one seed (RUN_RL_SEEDS=1 adds the 5-seed study)
    rl_column=tiny_mhc_sft-gsm8k-global-dense     # the Phase-4 RL-tuned column: this run's per-problem policy
    hres_args=(--tokens 8192)
    # lm-evaluation-harness through the adapter, 0-shot on the first 20 examples of the local copies (~15 s)
    lm_eval_args=(--tasks gsm8k,hellaswag,arc_easy,arc_challenge --num-fewshot 0 --limit 20 --max-gen-toks 48
                  --task-data local)
    bench_args=(--new-tokens 64 --batch-sizes 1 --repeats 3)   # the tiny architecture (the benchmark's default)
    memory_args=(--vocab-size 4096 --dtype float32 --modes off)   # the CPU step (~5 s per model)
    ;;
  *) echo "PRESET must be gpu, tiny or auto (got $preset)" >&2; exit 2 ;;
esac
export WANDB_MODE="${WANDB_MODE:-disabled}"
read -ra extra_train <<< "${EXTRA_TRAIN_ARGS:-}"
read -ra extra_eval <<< "${EXTRA_EVAL_ARGS:-}"
read -ra extra_sft <<< "${EXTRA_SFT_ARGS:-}"
read -ra extra_sweep <<< "${EXTRA_SWEEP_ARGS:-}"
read -ra extra_oracle <<< "${EXTRA_ORACLE_ARGS:-}"
read -ra extra_rl <<< "${EXTRA_RL_ARGS:-}"
read -ra extra_bench <<< "${EXTRA_BENCH_ARGS:-}"
read -ra extra_lm_eval <<< "${EXTRA_LM_EVAL_ARGS:-}"
read -ra extra_export <<< "${EXTRA_EXPORT_ARGS:-}"
results_dir="${RESULTS_DIR:-$repo/results}"
run_name="${WANDB_RUN:-dummy}"
stage_markers="$NANOCHAT_BASE_DIR/speedrun"      # scripts/stage.sh: the markers and the stage times
stage_times="$results_dir/speedrun_stages.jsonl"
mkdir -p "$stage_markers"
# one speedrun per base dir: a second one would retrain the tokenizer and rewrite the data under the first
stage_lock "$stage_markers" "the speedrun on $NANOCHAT_BASE_DIR"
echo "[speedrun] preset=$preset base_dir=$NANOCHAT_BASE_DIR"
ckpt="$NANOCHAT_BASE_DIR/checkpoints"
tokenizer_json="$NANOCHAT_BASE_DIR/tokenizer/tokenizer.json"  # nanochat/tokenizer.py's get_tokenizer_dir()

# Each stage names its outputs (--out) and the files besides its --config whose content it depends on (--dep): a
# new tokenizer makes pretokenizing and training stale (training then stops with a clear message, not a mix).
if [ "${fetch_small_data:-0}" = 1 ]; then  # a fresh clone: the small public sets from the hub, shared/data's layout
    stage data_fetch --out "$NANOCHAT_DATA_DIR/MANIFEST.json" -- \
        python -m nanochat.dataset --source hub-small --out "$NANOCHAT_DATA_DIR"
fi
stage data --out "$data_out" -- python -m nanochat.dataset --source "$source_name" "${data_args[@]}"
stage tokenizer --out "$tokenizer_json" -- python -m scripts.tok_train --source "$source_name" --vocab-size "$vocab"
stage pretokenize --out "$NANOCHAT_BASE_DIR/tokenized" --dep "$tokenizer_json" -- \
    python -m nanochat.dataset --source "$source_name" --pretokenize
for model in baseline mhc; do
    config=$base_config; [ "$model" = mhc ] && config=$mhc_config
    tag="${prefix}${model}"
    # the step's peak memory before it trains (docs/performance.md); training checks it again on the GPU
    stage "memory_$model" --out "$results_dir/bench/memory_estimate_$model.json" -- \
        python -m benchmarks.memory_estimate --config "$config" "${memory_args[@]}" "${extra_train[@]}" \
        --out "$results_dir/bench/memory_estimate_$model.json"
    stage "train_$model" --out "$results_dir/$tag/config.json" --out "$ckpt/$tag" --dep "$tokenizer_json" -- \
        "${launch[@]}" scripts.base_train "${sep[@]}" --config "$config" --model-tag "$tag" \
        --run "$run_name" --resume --results-dir "$results_dir" "${extra_train[@]}"
    stage "eval_$model" --out "$results_dir/$tag/eval.json" -- \
        "${launch[@]}" scripts.base_eval "${sep[@]}" --model-tag "$tag" --results-dir "$results_dir" \
        "${eval_args[@]}" "${extra_eval[@]}"
done
# the same mHC model through lm-evaluation-harness itself (nanochat/lm_eval_adapter.py): results/<tag>/lm_eval.json
stage lm_eval_mhc --out "$results_dir/${prefix}mhc/lm_eval.json" -- \
    python -m scripts.lm_eval --model-tag "${prefix}mhc" --results-dir "$results_dir" \
    "${lm_eval_args[@]}" "${extra_lm_eval[@]}"
# what the mHC connections learned, per sub-layer (gates, H_res vs I and vs init, Sinkhorn error): mhc_stats.json;
# and its routing as figures (H_res heatmaps, the composite across depth and its Amax gain, H_pre/H_post, routing)
stage stats_mhc --out "$results_dir/${prefix}mhc/mhc_stats.json" -- \
    python -m analysis.mhc_stats --model-tag "${prefix}mhc" --results-dir "$results_dir"
stage hres_mhc --out "$results_dir/${prefix}mhc/hres/hres.json" -- \
    python -m analysis.visualize_hres --model-tag "${prefix}mhc" --results-dir "$results_dir" "${hres_args[@]}"
# the RL half (scripts/train_rl.py): fine-tune the mHC model on GSM8K-format problems (tiny models score 0 on GSM8K
# otherwise) and the baseline with the same recipe and tokens (the Phase-4 columns compare the two fine-tuned
# models), check that the gate matters (gate sweep) and whether a context-dependent gate can win at all (gate
# oracle), then the RL controller over its gates with the baselines it must beat
for model in baseline mhc; do
    stage "sft_$model" --out "$results_dir/${prefix}${model}_sft/config.json" --out "$ckpt/${prefix}${model}_sft" -- \
        "${launch[@]}" scripts.sft_train "${sep[@]}" --model-tag "${prefix}${model}" \
        --output-tag "${prefix}${model}_sft" --run "$run_name" --resume --results-dir "$results_dir" \
        "${sft_args[@]}" "${extra_sft[@]}"
    stage "eval_${model}_sft" --out "$results_dir/${prefix}${model}_sft/eval.json" -- \
        "${launch[@]}" scripts.base_eval "${sep[@]}" --model-tag "${prefix}${model}_sft" \
        --results-dir "$results_dir" "${eval_args[@]}" "${extra_eval[@]}"
done
stage gate_sweep --out "$results_dir/${prefix}mhc_sft/gate_sweep.json" -- \
    python -m analysis.gate_sweep --model-tag "${prefix}mhc_sft" --results-dir "$results_dir" \
    "${sweep_args[@]}" "${extra_sweep[@]}"
for oracle_run in "${oracle_runs[@]}"; do
    read -ra run <<< "$oracle_run"   # problems, replicates, gate set, then flags of this run only
    name="gate_oracle_${run[0]}_${run[1]}_${run[2]}"
    stage "oracle_${run[0]}_${run[1]}_${run[2]}" --out "$results_dir/${prefix}mhc_sft/$name.json" -- \
        python -m analysis.gate_oracle --model-tag "${prefix}mhc_sft" --problems "${run[0]}" \
        --replicates "${run[1]}" --gate-set "${run[2]}" --out "$results_dir/${prefix}mhc_sft/$name.json" \
        "${run[@]:3}" "${extra_oracle[@]}"
done
for rl_run in "${rl_runs[@]}"; do
    read -ra run <<< "$rl_run"   # learner, problems, action space, then flags of this run only
    suffix=""; [ "${run[0]}" = ppo ] || suffix="-${run[0]}"
    rl_tag="${prefix}mhc_sft-${run[1]}-${run[2]}-$rl_reward$suffix"   # scripts/train_rl.py's default --tag
    # --preset NAME reads configs/rl_NAME.toml (not a --config the stage runner can see)
    stage "rl_${run[1]}_${run[2]}$suffix" --out "$results_dir/rl/$rl_tag/$rl_out" --dep "configs/rl_$preset.toml" -- \
        python scripts/train_rl.py --model-tag "${prefix}mhc_sft" --algo "${run[0]}" --problems "${run[1]}" \
        --action-space "${run[2]}" --run "$run_name" --resume --results-dir "$results_dir" "${rl_args[@]}" \
        "${run[@]:3}" "${extra_rl[@]}"
done
# share the models: both fine-tuned models as Hugging Face folders (scripts/export_hf.py: the baseline as
# transformers' own NanoChat, mHC with its modeling code; each is checked against transformers' logits before it is
# kept), and the mHC folder read back as a downloader would check it (base_eval --hf, its val bpb)
for model in baseline mhc; do
    stage "export_$model" --out "$results_dir/hf/${prefix}${model}_sft/config.json" -- \
        python -m scripts.export_hf --model-tag "${prefix}${model}_sft" --out "$results_dir/hf/${prefix}${model}_sft" \
        --results-dir "$results_dir" --force "${extra_export[@]}"
done
stage eval_hf_mhc --out "$results_dir/hf_check_${prefix}mhc_sft/eval.json" -- \
    python -m scripts.base_eval --hf "$results_dir/hf/${prefix}mhc_sft" --output-tag "hf_check_${prefix}mhc_sft" \
    --results-dir "$results_dir" "${eval_args[@]}" --tasks bpb "${extra_eval[@]}"
# Phase 4: inference cost and the report (its RL-tuned column: the per-problem policy of the $rl_column run)
stage bench_inference --out "$results_dir/bench/inference.json" -- \
    python -m benchmarks.inference "${bench_args[@]}" --skip-no-cache \
    --out "$results_dir/bench/inference.json" "${extra_bench[@]}"
stage report --out "$results_dir/report.md" -- python -m analysis.report --results-dir "$results_dir" \
    --prefix "$prefix" --rl-tag "$rl_column"
if [ "${RUN_RL_SEEDS:-0}" = 1 ] && [ "$preset" = tiny ]; then  # optional: the tiny RL study over 5 seeds
    stage rl_seeds --out "$results_dir/rl/${prefix}mhc_sft-seeds-rloo/seeds.json" --dep "configs/rl_$preset.toml" -- \
        python scripts/train_rl.py --model-tag "${prefix}mhc_sft" --algo rloo --tag "${prefix}mhc_sft-seeds-rloo" \
        --seeds 0,1,2,3,4 --run "$run_name" --resume --results-dir "$results_dir" "${rl_args[@]}" "${extra_rl[@]}"
fi
if [ "${RUN_NS_ABLATION:-0}" = 1 ]; then  # optional: the Newton–Schulz ablation inside Muon (scripts/ns_ablation.py)
    stage ns_ablation --out "$results_dir/ns_ablation/$preset/summary.json" -- \
        python -m scripts.ns_ablation --preset "$preset" --out-dir "$results_dir/ns_ablation/$preset"
fi
if [ "${RUN_NGPT_CAMPAIGN:-0}" = 1 ]; then  # optional: the nGPT hyperparameter campaign (scripts/sweep.py)
    if [ "$preset" = tiny ]; then campaign=(ngpt_campaign_tiny --seeds 0,1); else campaign=(ngpt_campaign); fi
    # the sweep file is a setting of the stage; finished runs are skipped by the runner itself on a rerun
    stage ngpt_campaign --out "$results_dir/sweeps/${campaign[0]}/summary.md" \
        --dep "configs/sweeps/${campaign[0]}.toml" -- \
        python -m scripts.sweep "configs/sweeps/${campaign[0]}.toml" "${campaign[@]:1}" --drop-checkpoints \
        --out "$results_dir/sweeps/${campaign[0]}"
fi
made=()  # point only at what exists (SKIP, or a failed optional output, can leave any of these out)
for path in "$results_dir/report.md" "$results_dir/${prefix}"{baseline,mhc,baseline_sft,mhc_sft} "$results_dir/rl" \
            "$results_dir/bench" "$results_dir/ns_ablation" "$results_dir/sweeps"; do
    [ -e "$path" ] && made+=("${path#"$repo"/}")
done
if [ ${#made[@]} -gt 0 ]; then
    echo "[speedrun] finished: ${made[*]}"
else
    echo "[speedrun] finished: nothing was written under $results_dir (every stage skipped?)"
fi
