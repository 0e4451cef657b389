"""Pretrain a base GPT.

    python -m scripts.base_train --config tiny_cpu                     # one process (CPU or one GPU)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --config baseline
    python -m scripts.base_train --config tiny_cpu --resume            # continue exactly where it stopped

Every flag is a TrainConfig field (nanochat/config.py); `--help` lists them with their defaults.
SIGINT/SIGTERM finish the current step, save a checkpoint and exit (130/143); `--resume` picks it up.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint
from nanochat.common import (UserError, compile_model, compute_init, doc_summary, git_commit, init_wandb,
                             machine_info, peak_bf16_flops, print0, rank0_first, resolve_precision, run_main,
                             to_flat_dict)
from nanochat.config import TrainConfig, build_config
from nanochat.dataloader import PackedLoader
from nanochat.dataset import pretokenize, tokenized_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.mhc import MHCConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.memory import memory_check
from nanochat.newton_schulz import resolve_ns_coeffs
from nanochat.optim import apply_schedules
from nanochat.tokenizer import get_tokenizer
from nanochat.training import Run, restore_training_state, resume_horizon, seed_rank

def token_budget_params(model_config: GPTConfig) -> int:
    """The parameter count the derived horizon (--num-iterations -1) scales with: the baseline architecture's,
    mHC or not, so the mHC model trains on exactly the baseline's tokens (its own ~1-4% more parameters would
    otherwise buy it more data); nGPT's scales and eigen learning rates do not count either."""
    with torch.device("meta"):
        return GPT(dataclasses.replace(model_config, mhc=MHCConfig(), arch="gpt")).num_params()


def check_resume_compatible(meta: dict, model_config: GPTConfig, tokenizer_fp: str, path: str):
    saved = GPTConfig.from_dict(meta["model_config"]).to_dict()  # keys added since: their defaults
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in model_config.to_dict().items()
             if saved.get(k) != v]
    if diffs:
        raise UserError(f"cannot resume from {path}: the model config differs ({'; '.join(diffs)})")
    if meta.get("tokenizer") not in (None, tokenizer_fp):
        raise UserError(f"cannot resume from {path}: it was trained with tokenizer {meta['tokenizer']}, "
                        f"the current one is {tokenizer_fp}")


def main(argv=None):
    cfg, _ = build_config(TrainConfig, argv, description=doc_summary(__doc__))
    device_type, device, is_ddp, rank, _, world_size = compute_init(cfg.device_type, cfg.dist_timeout,
                                                                      shared={"--results-dir": cfg.results_dir})
    master = rank == 0
    dtype, use_compile, ctx = resolve_precision(device_type, cfg.dtype, cfg.compile)

    # batch arithmetic: micro-batches of device_batch_size x max_seq_len on every rank, accumulated
    tokens_per_micro = cfg.device_batch_size * cfg.max_seq_len * world_size
    if cfg.total_batch_size % tokens_per_micro:
        raise UserError(f"--total-batch-size {cfg.total_batch_size} is not divisible by --device-batch-size "
                        f"{cfg.device_batch_size} x --max-seq-len {cfg.max_seq_len} x world size {world_size} "
                        f"= {tokens_per_micro}")
    grad_accum = cfg.total_batch_size // tokens_per_micro

    tokenizer = get_tokenizer()
    token_bytes = tokenizer.token_bytes().to(device)
    model_config = cfg.model_config(tokenizer.vocab_size)
    model_tag = cfg.model_tag or (cfg.run if cfg.run != "dummy" else f"d{cfg.depth}")
    ckpt_root = checkpoint_root(model_tag)
    run = Run(f"model tag {model_tag!r}", ckpt_root, os.path.join(cfg.results_dir, model_tag), tag_flag="--model-tag",
              master=master, device=device)
    resume_path = run.resume_path(cfg.resume)

    torch.manual_seed(cfg.seed)
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    seed_rank(cfg.seed, rank)  # identical weights everywhere; from here on each rank draws its own randomness
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    memory = memory_check(model_config, cfg.device_batch_size, cfg.max_seq_len, dtype, cfg.activation_checkpointing,
                          cfg.memory_check, device, use_compile)
    num_params = model.num_params()
    flops_per_token = model.estimate_flops_per_token()
    budget_params = token_budget_params(model_config)
    derived_iterations = cfg.num_iterations
    if derived_iterations == -1:
        derived_iterations = max(1, round(cfg.target_param_data_ratio * budget_params / cfg.total_batch_size))

    ns = dict(ns_coeffs=resolve_ns_coeffs(cfg.muon_ns_coeffs), ns_steps=cfg.muon_ns_steps or None,
              ns_dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    architecture = model.architecture
    optimizers = architecture.optimizers(model, cfg, ns)

    # data: rank 0 pretokenizes once (a no-op when the cache is complete), the others wait for it
    rank0_first(lambda: pretokenize(cfg.data_source, tokenizer), "checking or building the pretokenized data; "
                "`python -m nanochat.dataset --pretokenize` beforehand makes this a quick check")
    token_dir = tokenized_dir(cfg.data_source, tokenizer)
    train_loader = PackedLoader(token_dir, "train", cfg.device_batch_size, cfg.max_seq_len, rank=rank,
                                world_size=world_size, device=device, seed=cfg.seed)
    if train_loader.vocab_size != tokenizer.vocab_size:  # the loader checks ids against its own meta.json
        raise UserError(f"pretokenized data in {token_dir} records vocab size {train_loader.vocab_size}, the "
                        f"tokenizer has {tokenizer.vocab_size}: delete that folder and rerun `python -m "
                        f"nanochat.dataset --source {cfg.data_source} --pretokenize`")

    step, meta, changes = 0, None, {}
    if resume_path:
        weights, optim_payload, meta = load_checkpoint(resume_path, device=device)
        check_resume_compatible(meta, model_config, tokenizer.fingerprint, resume_path)
        changes = run.check_settings(meta.get("run_config", {}).get("train", {}), cfg, resume_path)
        step = restore_training_state(meta, optim_payload, weights, model, optimizers, train_loader, rank, world_size,
                                      device_type, cfg.seed)
    num_iterations = resume_horizon(run, derived_iterations, meta, cfg.extend_to, changes, 1 - cfg.warmdown_ratio,
                                    resume_path)

    train_model = compile_model(model, use_compile, dynamic=False)  # every batch is [device_batch_size, max_seq_len]
    if is_ddp:  # the buffers (rotary tables, mHC constants) never change: no broadcast before every forward; the
        # gradients live in DDP's buckets (no second copy)
        train_model = DDP(train_model, device_ids=[device.index] if device_type == "cuda" else None,
                          broadcast_buffers=False, gradient_as_bucket_view=True)

    run_config = dict(train=to_flat_dict(cfg), model=model_config.to_dict(), model_tag=model_tag,
                      num_iterations=num_iterations, grad_accum=grad_accum, world_size=world_size, dtype=dtype,
                      compile=use_compile, device_type=device_type, num_params=num_params,
                      budget_params=budget_params, tokens=num_iterations * cfg.total_batch_size,
                      flops_per_token=flops_per_token, tokenizer=tokenizer.fingerprint, git_commit=git_commit(),
                      seed=cfg.seed, memory_estimate=memory, machine=machine_info())
    run.write_config(run_config)
    wandb_run = init_wandb(cfg.run, "nanochat-mhc", run_config, master)

    print0(f"model: {num_params:,} params | {model_config.n_layer} layers, width {model_config.n_embd}, "
           f"{model_config.n_head} heads | {flops_per_token:.3e} FLOPs/token")
    print0(f"batch: {cfg.total_batch_size:,} tokens/step = {cfg.device_batch_size} seqs x {cfg.max_seq_len} "
           f"x {world_size} ranks x {grad_accum} accumulation | {num_iterations} steps | {dtype} on {device_type}"
           f"{' (compiled)' if use_compile else ''}")

    def eval_val_bpb() -> float:
        val_loader = PackedLoader(token_dir, "val", cfg.device_batch_size, cfg.max_seq_len, rank=rank,
                                  world_size=world_size, device=device, seed=cfg.seed)
        num_batches = max(1, cfg.eval_tokens // tokens_per_micro)
        model.eval()
        bpb = evaluate_bpb(model, (val_loader.next_batch() for _ in range(num_batches)), token_bytes, ctx)
        model.train()
        return bpb

    # H_res over training (--mhc-log-every): one eval-mode forward of a fixed val batch on rank 0, off by default
    mhc_probe = None
    if master and model_config.mhc.enabled and cfg.mhc_log_every > 0:
        mhc_probe = PackedLoader(token_dir, "val", cfg.device_batch_size, cfg.max_seq_len, device=device,
                                 seed=cfg.seed).next_batch()[0]
    stop = run.stop_flag()
    peak = (cfg.peak_flops or peak_bf16_flops(torch.cuda.get_device_name(device))) if device_type == "cuda" else None
    if device_type == "cuda" and peak is None:
        print0(f"note: no bf16 peak known for {torch.cuda.get_device_name(device)}: no MFU (pass --peak-flops)")
    # the next micro-batch is loaded while the device still works on the current one (nothing waits for it at the
    # step's sync); loader_state is the loader's position before it, which is what a checkpoint must record
    loader_state = train_loader.state_dict()
    pending = train_loader.next_batch()
    step_times = []
    start_step = step
    val_bpb = None
    while True:
        last_step = step == num_iterations
        if last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
            val_bpb = eval_val_bpb()
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            if not math.isfinite(val_bpb):
                raise UserError(f"val bpb is {val_bpb} at step {step}: the model diverged; not saving. The last "
                                f"good checkpoint is {latest_checkpoint(ckpt_root) or '(none)'}")
            run.log({"step": step, "val_bpb": val_bpb})
            wandb_run.log({"step": step, "val/bpb": val_bpb})
        if mhc_probe is not None and (last_step or step % cfg.mhc_log_every == 0):
            with ctx:
                stats = model.mhc_connection_stats(mhc_probe)
            run.log({"step": step, "mhc": stats})
        signum = stop.synced(device)
        periodic = cfg.save_every > 0 and step % cfg.save_every == 0 and step != start_step
        if last_step or periodic or signum:
            meta = dict(model_config=model_config.to_dict(), run_config=run_config, loader_state=loader_state,
                        tokenizer=tokenizer.fingerprint, seed=cfg.seed, git_commit=run_config["git_commit"])
            run.save(step, model, optimizers, meta, cfg.keep_checkpoints, device_type)
        if is_ddp:
            dist.barrier()  # nobody exits or trains on while rank 0 is still writing
        if last_step or signum:
            break

        # one optimizer step: grad_accum micro-batches per rank
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = pending
            sync = not is_ddp or micro == grad_accum - 1
            with nullcontext() if sync else train_model.no_sync():
                with ctx:
                    loss = train_model(x, y)
                (loss / grad_accum).backward()  # DDP all-reduces the gradients on the last micro-batch only
            loss_sum += loss.detach()
            loader_state = train_loader.state_dict()
            pending = train_loader.next_batch()  # while the device runs the backward
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        # never step on (or later save) a diverged model: checked before the update
        run.check_finite(loss_sum / grad_accum, grad_norm, step, "Lower the learning rates")
        lrm = apply_schedules(optimizers, step, num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio,
                              cfg.final_lr_frac)
        for opt in optimizers:
            opt.step()
        extra = architecture.after_step(model, step, cfg)  # nGPT: the weights back onto the sphere
        model.zero_grad(set_to_none=True)
        train_loss = loss_sum / grad_accum
        if is_ddp:
            dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        train_loss = train_loss.item()  # also synchronises the device, so dt below is real
        run.check_loss(step + 1, train_loss, model_config.vocab_size, cfg.divergence_check,
                       warmup_steps=round(cfg.warmup_ratio * num_iterations))  # as lr_multiplier's warm-up
        dt = time.perf_counter() - t0
        step += 1

        step_times.append(dt)
        tok_per_sec = cfg.total_batch_size / dt
        timed = step_times[min(5, len(step_times) - 1):]  # the first steps include compilation and warm-up
        eta = (num_iterations - step) * sum(timed) / len(timed)
        record = {"step": step, "loss": train_loss, "lrm": lrm, "grad_norm": grad_norm.item(), "dt": dt,
                  "tok_per_sec": tok_per_sec, **extra}
        mfu = ""
        if peak:
            record["mfu"] = flops_per_token * tok_per_sec / (peak * world_size)
            mfu = f" | mfu {100 * record['mfu']:.1f}%"
        run.log(record)
        wandb_run.log({"step": step, **{f"train/{k}": v for k, v in record.items() if k != "step"}})
        if step % cfg.log_every == 0 or step == num_iterations:
            print0(f"step {step:05d}/{num_iterations} | loss {train_loss:.4f} | lrm {lrm:.2f} | "
                   f"grad norm {record['grad_norm']:.3f} | dt {1000 * dt:.0f} ms | tok/s {tok_per_sec:,.0f}{mfu} | "
                   f"eta {eta / 60:.1f} min")

    if device_type == "cuda":
        print0(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if val_bpb is not None:
        print0(f"final val bpb: {val_bpb:.4f}")
    wandb_run.finish()
    run.finish(step, signum)


if __name__ == "__main__":
    run_main(main)
