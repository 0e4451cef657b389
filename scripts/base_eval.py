"""Evaluate a base checkpoint: bits per byte, GSM8K 0/8-shot, HellaSwag, ARC-Easy/Challenge.

    python -m scripts.base_eval --model-tag d4 --eval-tokens 65536
    python -m scripts.base_eval --model-tag d4 --tasks all --max-per-task 50
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --model-tag d12 \
        --tasks bpb,gsm8k,gsm8k_8shot,hellaswag,arc_easy,arc_challenge

Writes <results_dir>/<model_tag>/eval.json (per task: score, n, 95% CI, scoring style, malformed/skipped counts;
plus the checkpoint, its step and the git commit) and eval_examples.jsonl (per example: task, id, prediction,
correct and the details), so that two models can be compared example by example. Examples are sharded across
ranks (nanochat/evaluate.py). Both files are rewritten (atomically) as each task finishes: eval.json's `status`,
`finished` and `pending` say how far the run got, so SIGINT (exit 130), SIGTERM (143) or a bad task file keeps the
tasks that finished.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading

import torch.distributed as dist

from nanochat.checkpoint import check_tokenizer, load_model, resolve_checkpoint
from nanochat.common import (UserError, WriteError, atomic_write_text, check_name, check_writable_on_all_ranks,
                             compile_model, compute_cleanup, compute_init, doc_summary, git_commit, machine_info,
                             print0, progress, rank0_first, resolve_precision, run_main)
from nanochat.config import EvalConfig, build_config, policy_mean_gates
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
    if not model.config.mhc.enabled:
        raise UserError("--mhc-gates / --mhc-gates-from given, but the checkpoint has no mHC (no gates to set)")
    source = "--mhc-gates"
    if cfg.mhc_gates_from:
        values = policy_mean_gates(cfg.mhc_gates_from)
        source = f"mean gates of the RL policy in {cfg.mhc_gates_from}"
    else:
        values = cfg.gate_values()
    model.set_mhc_gates_by_count(values, source)
    return dict(source=source, given=list(values), per_sublayer=model.get_mhc_gates())


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during the evaluation (a KeyboardInterrupt, so that no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


def save_progress(out_dir: str, record: dict, examples: list[dict]):
    """eval_examples.jsonl first, then eval.json: eval.json never lists a task whose examples are not on disk."""
    atomic_write_text(os.path.join(out_dir, "eval_examples.jsonl"), "".join(json.dumps(r) + "\n" for r in examples))
    atomic_write_text(os.path.join(out_dir, "eval.json"), json.dumps(record, indent=2))


def main(argv=None):
    """Evaluate; SIGINT/SIGTERM exit 130/143 with the finished tasks saved (the handlers are restored on return, for
    callers in the same process)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set from there
        return evaluate(argv)
    saved = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return evaluate(argv)
    except Interrupted as e:  # still loading: nothing of this run to save
        print0(f"\ninterrupted by {signal.Signals(e.signum).name} before any task ran; nothing written",
               file=sys.stderr)
        sys.exit(128 + e.signum)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def run_bpb(cfg: EvalConfig, model, tokenizer, token_bytes, ctx, device, meta: dict, rank: int, world_size: int):
    """Train and val bits per byte on the training source. Returns (result for eval.json, per-row val records)."""
    run_train = meta.get("run_config", {}).get("train", {})
    data_source = run_train.get("data_source", "fineweb")
    seq_len = model.config.sequence_len
    rank0_first(lambda: pretokenize(data_source, tokenizer), "checking or building the pretokenized data")
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
    return {**bpb, "tokens": num_batches * tokens_per_batch}, val_row_records(val_rows, cfg.device_batch_size,
                                                                              rank, world_size)


def evaluate(argv=None):
    cfg, _ = build_config(EvalConfig, argv, description=doc_summary(__doc__))
    device_type, device, _, rank, _, world_size = compute_init(cfg.device_type, cfg.dist_timeout,
                                                               shared={"--results-dir": cfg.results_dir})
    dtype, use_compile, ctx = resolve_precision(device_type, cfg.dtype, cfg.compile)

    if cfg.hf:  # an exported folder: our model rebuilt from it, with its own tokenizer (nanochat/hf_export.py)
        from nanochat.hf_export import load_export
        model, meta, tokenizer = load_export(cfg.hf, device)
        path = meta["hf_folder"]
        check = meta["hf_cross_check"]
        print0(f"--hf {path}: transformers' logits equal ours within {check['max_abs_logit_diff']:.1e}"
               if check["done"] else f"--hf {path}: not checked against transformers ({check['reason']})")
        model_tag = cfg.output_tag or os.path.basename(path)
    else:
        path = cfg.checkpoint or resolve_checkpoint(cfg.model_tag, cfg.step)
        model, meta = load_model(path, device)
        model_tag = cfg.output_tag or cfg.model_tag or meta.get("run_config", {}).get("model_tag") or \
            os.path.basename(path)
        if not cfg.output_tag and not cfg.model_tag:  # a name from the checkpoint: never a path either
            check_name("the results folder", model_tag, hint=f"derived from {path} (its run_config.model_tag or "
                                                             f"folder name): name it with --output-tag")
        tokenizer = get_tokenizer()
        check_tokenizer(meta, tokenizer, path)
    scoring_model = compile_model(model, use_compile, dynamic=None)  # bpb and choices (generation: the engine's)
    gates = apply_gates(model, cfg)
    if gates:
        print0(f"mHC gates: {gates['source']}: {gates['per_sublayer']}")
    if cfg.inference_sinkhorn_iters:
        model.set_inference_sinkhorn_iters(cfg.inference_sinkhorn_iters)  # checks the value and the model
        print0(f"mHC: {cfg.inference_sinkhorn_iters} Sinkhorn iterations at inference (trained: "
               f"{model.config.mhc.sinkhorn_iters})")
    token_bytes = tokenizer.token_bytes().to(device)
    data_source = meta.get("run_config", {}).get("train", {}).get("data_source", "fineweb")
    print0(f"evaluating {path} (step {meta['step']}) on {data_source} data")

    tasks = cfg.task_list()
    results, examples = {}, []
    out_dir = os.path.join(cfg.results_dir, model_tag)
    check_writable_on_all_ranks(out_dir, rank == 0, device)  # a folder that cannot take eval.json: refused now
    eval_path = os.path.join(out_dir, "eval.json")
    record = dict(checkpoint=path, step=meta["step"], hf_cross_check=meta.get("hf_cross_check"), status="running",
                  finished=[], pending=list(tasks),
                  results=results, eval_config=dataclasses.asdict(cfg), mhc_gates=gates, git_commit=git_commit(),
                  dtype=dtype, compile=use_compile, world_size=world_size, machine=machine_info())

    def save(status: str, **extra):
        """eval.json's status, the finished tasks and the pending ones (the one running included)."""
        error = None
        if rank == 0:  # every rank holds all the results (gathered); one writes
            record.update(status=status, finished=list(results), pending=[t for t in tasks if t not in results],
                          **extra)
            try:
                save_progress(out_dir, record, examples)
            except WriteError as e:  # a full disk: the computed scores go to stdout, nothing is lost
                computed = json.dumps(dict(checkpoint=path, step=meta["step"], results=results))
                print(f"not written to {eval_path}: {computed}", flush=True)
                error = e
        if dist.is_initialized() and world_size > 1 and status in ("running", "complete"):
            # every rank stops alike, not at its next collective (the ranks reach these saves in step)
            failed = [error is not None]
            dist.broadcast_object_list(failed, src=0)
            if failed[0] and error is None:
                compute_cleanup()
                sys.exit(2)  # rank 0 says why, once
        if error is not None:
            compute_cleanup()
            raise error

    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    try:
        save("running")  # replaces an earlier run's files at once, so they cannot pass for this run's
        if "bpb" in tasks:
            bpb, rows = run_bpb(cfg, scoring_model, tokenizer, token_bytes, ctx, device, meta, rank, world_size)
            examples += rows
            results["bpb"] = bpb
            save("running")
        for name in (t for t in tasks if t != "bpb"):
            summary, records = evaluate_task(
                name, model, tokenizer, scoring_model=scoring_model, autocast_ctx=ctx, batch_size=cfg.device_batch_size,
                max_per_task=cfg.max_per_task, max_new_tokens=cfg.max_new_tokens, strict=cfg.strict,
                task_data=cfg.task_data, seed=cfg.seed if cfg.subset == "random" else None, rank=rank,
                world_size=world_size, compile_generation=use_compile)
            examples += records
            results[name] = summary
            save("running")
            lo, hi = summary["ci95"]
            print0(f"{name}: {summary['metric']} {summary['score']:.4f} [{lo:.3f}, {hi:.3f}] n={summary['n']} "
                   f"(malformed {summary['malformed']}, skipped {summary['skipped']}) "
                   f"{summary['examples_per_s']:.2f} examples/s from {summary['data_source']}")
    except KeyboardInterrupt as e:  # Interrupted (our handlers), or a caller's KeyboardInterrupt
        stop(getattr(e, "signum", signal.SIGINT), save, tasks, results, eval_path, rank)
    except WriteError:  # said in one line, the scores on stdout: another write would fail the same way
        raise
    except Exception as e:
        # a bad task file (or a bug) fails the run, but the tasks that finished stay in eval.json
        save("failed", error=f"{type(e).__name__}: {e}")
        raise
    save("complete")
    print0(f"wrote {eval_path}")
    compute_cleanup()


def stop(signum: int, save, tasks: list[str], results: dict, eval_path: str, rank: int):
    """Save the finished tasks and exit 128 + signum (130 SIGINT, 143 SIGTERM) with one line, on every rank (under
    torchrun the terminal's Ctrl-C, or the agent's SIGTERM, reaches each rank)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the last write short
    name = signal.Signals(signum).name
    save(f"interrupted ({name})")
    if rank == 0:
        pending = [t for t in tasks if t not in results]
        print(f"\ninterrupted by {name}: finished {', '.join(results) or 'no task'} (saved in {eval_path}); "
              f"not finished: {', '.join(pending)}", file=sys.stderr, flush=True)
    sys.exit(128 + signum)

if __name__ == "__main__":
    run_main(main)
