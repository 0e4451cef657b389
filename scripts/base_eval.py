"""Evaluate a base checkpoint: bits per byte, GSM8K 0/8-shot, HellaSwag, ARC-Easy/Challenge.

    python -m scripts.base_eval --model-tag d4 --eval-tokens 65536
    python -m scripts.base_eval --model-tag d4 --tasks all --max-per-task 50
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --model-tag d12 \
        --tasks bpb,gsm8k,gsm8k_8shot,hellaswag,arc_easy,arc_challenge

Writes <results_dir>/<model_tag>/eval.json (per task: score, n, 95% CI, scoring style, malformed/skipped counts;
plus the checkpoint, its step and the git commit) and eval_examples.jsonl (per example: task, id, prediction,
correct and the details), so that two models can be compared example by example. Examples are sharded across
ranks (nanochat/evaluate.py).
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch.distributed as dist

from nanochat.checkpoint import check_tokenizer, load_model, resolve_checkpoint
from nanochat.common import (UserError, compute_cleanup, compute_init, git_commit, print0, progress,
                             resolve_precision, run_main)
from nanochat.config import EvalConfig, build_config
from nanochat.dataloader import PackedLoader
from nanochat.dataset import pretokenize, tokenized_dir
from nanochat.evaluate import evaluate_task
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_tokenizer


def val_row_records(rows: list, batch_size: int, rank: int, world_size: int) -> list[dict]:
    """Per validation row: its nats and bytes, keyed by the row's index in the loader's global row stream (the same
    rows for any model of the same tokenizer, data and context, so two models pair row by row: a paired bootstrap
    of bpb in analysis.compare_results)."""
    mine = [dict(task="bpb", id=f"val-{((i // batch_size) * world_size + rank) * batch_size + i % batch_size}",
                 nats=n, bytes=b) for i, (n, b) in enumerate(rows)]
    if world_size > 1 and dist.is_initialized():
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
        mine = sorted((r for part in parts for r in part), key=lambda r: int(r["id"][4:]))
    return mine


def apply_gates(model, cfg: EvalConfig) -> dict | None:
    """--mhc-gates / --mhc-gates-from: the gates to evaluate the mHC model at (None: its learned gates)."""
    if not cfg.mhc_gates and not cfg.mhc_gates_from:
        return None
    if not model.config.mhc_enabled:
        raise UserError("--mhc-gates / --mhc-gates-from given, but the checkpoint has no mHC (no gates to set)")
    source = "--mhc-gates"
    if cfg.mhc_gates_from:
        try:
            with open(cfg.mhc_gates_from) as f:
                arm = json.load(f)["arms"]["rl_policy"]
            values = arm["chosen_gates"]["mean"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"--mhc-gates-from {cfg.mhc_gates_from}: not an RL eval.json with the rl_policy arm's "
                            f"chosen gates ({type(e).__name__}: {e})") from None
        source = f"mean gates of the RL policy in {cfg.mhc_gates_from}"
    else:
        values = cfg.gate_values()
    model.set_mhc_gates_by_count(values, source)
    return dict(source=source, given=list(values), per_sublayer=model.get_mhc_gates())


def main(argv=None):
    cfg, _ = build_config(EvalConfig, argv, description=__doc__.split("\n")[0])
    device_type, device, is_ddp, rank, _, world_size = compute_init(cfg.device_type)
    dtype, _, ctx = resolve_precision(device_type, cfg.dtype)

    path = cfg.checkpoint or resolve_checkpoint(cfg.model_tag, cfg.step)
    model, meta = load_model(path, device)
    model_tag = cfg.output_tag or cfg.model_tag or meta.get("run_config", {}).get("model_tag") or \
        os.path.basename(path)
    tokenizer = get_tokenizer()
    check_tokenizer(meta, tokenizer, path)
    gates = apply_gates(model, cfg)
    if gates:
        print0(f"mHC gates: {gates['source']}: {gates['per_sublayer']}")
    token_bytes = tokenizer.token_bytes().to(device)
    run_train = meta.get("run_config", {}).get("train", {})
    data_source = run_train.get("data_source", "fineweb")
    seq_len = model.config.sequence_len
    print0(f"evaluating {path} (step {meta['step']}) on {data_source} data")

    results, examples = {}, []
    tasks = cfg.task_list()
    if "bpb" in tasks:
        if rank == 0:
            pretokenize(data_source, tokenizer)
        if is_ddp:
            dist.barrier()
        token_dir = tokenized_dir(data_source, tokenizer)
        tokens_per_batch = cfg.device_batch_size * seq_len * world_size
        num_batches = max(1, cfg.eval_tokens // tokens_per_batch)
        bpb, val_rows = {}, []
        for split in ("train", "val"):
            loader = PackedLoader(token_dir, split, cfg.device_batch_size, seq_len, rank=rank,
                                  world_size=world_size, device=device, seed=run_train.get("seed", 0))
            batches = progress((loader.next_batch() for _ in range(num_batches)), total=num_batches,
                               desc=f"{split} bpb", unit="batch")
            bpb[f"{split}_bpb"] = evaluate_bpb(model, batches, token_bytes, ctx,
                                               rows=val_rows if split == "val" else None)
            print0(f"{split} bpb: {bpb[f'{split}_bpb']:.4f}")
        results["bpb"] = {**bpb, "tokens": num_batches * tokens_per_batch}
        examples += val_row_records(val_rows, cfg.device_batch_size, rank, world_size)

    for name in (t for t in tasks if t != "bpb"):
        summary, records = evaluate_task(
            name, model, tokenizer, autocast_ctx=ctx, batch_size=cfg.device_batch_size,
            max_per_task=cfg.max_per_task, max_new_tokens=cfg.max_new_tokens, strict=cfg.strict,
            task_data=cfg.task_data, seed=cfg.seed if cfg.subset == "random" else None, rank=rank,
            world_size=world_size)
        results[name] = summary
        examples += records
        lo, hi = summary["ci95"] if summary["n"] else (float("nan"), float("nan"))
        score = f"{summary['score']:.4f}" if summary["n"] else "n/a"
        print0(f"{name}: {summary['metric']} {score} [{lo:.3f}, {hi:.3f}] n={summary['n']} "
               f"(malformed {summary['malformed']}, skipped {summary['skipped']}) "
               f"{summary['examples_per_s']:.2f} examples/s from {summary['data_source']}")

    if rank == 0:
        out_dir = os.path.join(cfg.results_dir, model_tag)
        os.makedirs(out_dir, exist_ok=True)
        record = dict(checkpoint=path, step=meta["step"], results=results, eval_config=dataclasses.asdict(cfg),
                      mhc_gates=gates, git_commit=git_commit(), dtype=dtype, world_size=world_size)
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump(record, f, indent=2)
        if examples:
            with open(os.path.join(out_dir, "eval_examples.jsonl"), "w") as f:
                for r in examples:
                    f.write(json.dumps(r) + "\n")
        print0(f"wrote {os.path.join(out_dir, 'eval.json')}")
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
