"""Supervised fine-tuning on GSM8K-format problems, loss on the answer tokens only.

    python -m scripts.sft_train --model-tag tiny_mhc --data synthetic --synthetic-steps 1 --num-iterations 300
    python -m scripts.sft_train --model-tag mhc --data gsm8k,synthetic               # -> checkpoints of mhc_sft
    torchrun --standalone --nproc_per_node=8 -m scripts.sft_train -- --model-tag mhc --data gsm8k

Rows are `Question: q\\nAnswer: <worked answer>\\n\\n` (the 0-shot format evaluation and the RL env use;
nanochat/sft_data.py); GSM8K's train split and/or generated problems (nanochat/synthetic_gsm8k.py), shuffled
together, with --val-problems held out for the validation answer loss. The optimizers are the base run's
(Muon + AdamW) at --lr-scale times its learning rates, decayed linearly to 0. mHC models are fine-tuned over
the gate range: --mhc-gate-sample-frac 0.25 by default (a quarter of the rows draw every gate from
U[0, 1]), because the RL controller acts on the fine-tuned model over the whole range; pretraining leaves it off
(configs/tiny_cpu_mhc.toml says why).

Checkpoints go to $NANOCHAT_BASE_DIR/checkpoints/<output tag>/ like base_train's (atomic, sha256-checked), with
the base checkpoint recorded; SIGINT/SIGTERM save and exit, --resume continues exactly. Metrics:
<results_dir>/<output tag>/metrics.jsonl (train answer loss per step, val answer loss per evaluation).
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from envs.gsm8k_env import load_problems
from nanochat.checkpoint import check_tokenizer, checkpoint_root, load_checkpoint, read_meta, resolve_checkpoint
from nanochat.common import (UserError, compile_model, compute_init, doc_summary, git_commit, init_wandb,
                             machine_info, print0, resolve_precision, run_main, to_flat_dict)
from nanochat.config import SFTConfig, TrainConfig, build_config, parse_int_list
from nanochat.gpt import GPT, GPTConfig
from nanochat.memory import memory_check
from nanochat.newton_schulz import resolve_ns_coeffs
from nanochat.optim import apply_schedules, setup_optimizers
from nanochat.sft_data import SFTLoader, collate, encode_rows, rows_digest
from nanochat.tokenizer import get_tokenizer
from nanochat.splits import describe
from nanochat.training import Run, restore_training_state, resume_horizon, seed_rank


def fine_tuning_problems(cfg: SFTConfig):
    """The mixture (GSM8K train and/or synthetic), shuffled with the seed; returns (train, val, sources)."""
    problems, sources = [], {}
    if "gsm8k" in cfg.data_sources():  # the SFT part of GSM8K train only: RL trains and selects on the others
        gsm, where = load_problems("gsm8k", split="train", task_data=cfg.task_data, part="sft",
                                   split_seed=cfg.split_seed)
        problems += gsm
        sources["gsm8k"] = dict(source=where, **describe(gsm, "sft", cfg.split_seed))
    if "synthetic" in cfg.data_sources():
        syn, where = load_problems("synthetic", count=cfg.synthetic_count, seed=cfg.synthetic_seed,
                                   synthetic_steps=parse_int_list(cfg.synthetic_steps, "synthetic-steps"),
                                   synthetic_max_value=cfg.synthetic_max_value, synthetic_ops=cfg.synthetic_ops,
                                   synthetic_mix=cfg.synthetic_mix)
        problems += syn
        sources["synthetic"] = dict(source=where, count=len(syn))
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    problems = [problems[i] for i in order]
    n_val = min(cfg.val_problems, len(problems) // 10)  # never more than a tenth of the data
    return problems[n_val:], problems[:n_val], sources


def model_config_for(base: dict, cfg: SFTConfig) -> GPTConfig:
    """The base model's config with fine-tuning's mHC training settings (SFTConfig's mhc_* fields; -1 keeps the
    base model's)."""
    mc = GPTConfig.from_dict(base)
    defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    overrides = {k: getattr(cfg, k) for k in defaults if k.startswith("mhc_") and getattr(cfg, k) != -1.0}
    if not mc.mhc.enabled:  # the default gate-range training has nothing to act on; an explicit request is an error
        explicit = [k for k, v in overrides.items() if v != defaults[k]]
        if explicit:
            flags = ", ".join("--" + k.replace("_", "-") for k in explicit)
            raise UserError(f"{flags} set but the base model has no mHC")
        return mc
    mc = dataclasses.replace(mc, mhc=dataclasses.replace(mc.mhc, **{k[len("mhc_"):]: v for k, v in overrides.items()}))
    mc.validate()
    return mc


@torch.no_grad()
def answer_loss(model, rows, batch_size: int, device, ctx) -> float:
    """Mean loss per answer token over `rows` (nats)."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x, y = collate(rows[i:i + batch_size], device)
        with ctx:
            total += model(x, y, loss_reduction="sum").item()
        count += int((y >= 0).sum())
    return total / max(count, 1)


def main(argv=None):
    cfg, _ = build_config(SFTConfig, argv, description=doc_summary(__doc__))
    device_type, device, is_ddp, rank, _, world_size = compute_init(cfg.device_type, cfg.dist_timeout,
                                                                      shared={"--results-dir": cfg.results_dir})
    master = rank == 0
    dtype, use_compile, ctx = resolve_precision(device_type, cfg.dtype, cfg.compile)

    base_path = cfg.checkpoint or resolve_checkpoint(cfg.model_tag, cfg.step)
    base_meta = read_meta(base_path)
    meta_tag = base_meta.get("run_config", {}).get("model_tag")
    base_tag = cfg.model_tag or meta_tag or os.path.basename(base_path)
    output_tag = cfg.output_tag or f"{base_tag}_sft"
    if output_tag == base_tag:
        raise UserError(f"--output-tag {output_tag!r} is the base model's tag: fine-tuned checkpoints would mix "
                        f"with the base run's")
    # the flags were checked with the config; a tag derived from the checkpoint's meta is checked here, naming it
    derived = not (cfg.output_tag or cfg.model_tag) and meta_tag
    ckpt_root = checkpoint_root(output_tag, f"derived from run_config.model_tag {meta_tag!r} in "
                                            f"{os.path.join(base_path, 'meta.json')}: name the output with "
                                            f"--output-tag" if derived else "")
    tokenizer = get_tokenizer()
    check_tokenizer(base_meta, tokenizer, base_path)
    model_config = model_config_for(base_meta["model_config"], cfg)
    run = Run(f"output tag {output_tag!r}", ckpt_root, os.path.join(cfg.results_dir, output_tag),
              tag_flag="--output-tag", master=master, device=device)
    resume_path = run.resume_path(cfg.resume)

    train_problems, val_problems, sources = fine_tuning_problems(cfg)
    max_len = model_config.sequence_len
    train_rows, dropped = encode_rows(tokenizer, train_problems, max_len)
    val_rows, val_dropped = encode_rows(tokenizer, val_problems, max_len)
    loader = SFTLoader(train_rows, cfg.device_batch_size, rank=rank, world_size=world_size, seed=cfg.seed,
                       device=device)
    derived_iterations = cfg.num_iterations if cfg.num_iterations > 0 else max(1, len(train_rows)
                                                                               // loader.rows_per_step())

    torch.manual_seed(cfg.seed)  # gate sampling draws from torch's RNG: a fresh run with the same seed repeats
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables, mHC constants); every weight is overwritten next
    weights, _, _ = load_checkpoint(base_path, device=device, load_optimizer=False)
    model.load_state_dict(weights)
    seed_rank(cfg.seed, rank)  # each rank draws its own gate samples
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    memory = memory_check(model_config, cfg.device_batch_size, max_len, dtype, cfg.activation_checkpointing,
                          cfg.memory_check, device, use_compile)
    base_train = base_meta.get("run_config", {}).get("train", {})
    train_defaults = TrainConfig()  # a base checkpoint from before a flag existed trained with its default
    lr = {k: base_train.get(k, getattr(train_defaults, k)) * cfg.lr_scale
          for k in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "mhc_lr")}
    optimizers = setup_optimizers(model, weight_decay=0.0, ns_coeffs=resolve_ns_coeffs(
        base_train.get("muon_ns_coeffs", "quintic")), ns_steps=base_train.get("muon_ns_steps") or None,
        ns_dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32, **lr)

    step, meta, changes = 0, None, {}
    if resume_path:
        weights, optim_payload, meta = load_checkpoint(resume_path, device=device)
        changes = run.check_settings(meta.get("sft_config", {}), cfg, resume_path)
        step = restore_training_state(meta, optim_payload, weights, model, optimizers, loader, rank, world_size,
                                      device_type, cfg.seed)
    # the LR decays linearly from step 0, so any extension raises it (the run says so)
    num_iterations = resume_horizon(run, derived_iterations, meta, cfg.extend_to, changes, 0.0, resume_path)
    print0(f"fine-tuning {base_path} -> {output_tag}: {len(train_rows)} train rows ({dropped} longer than "
           f"{max_len} tokens dropped), {len(val_rows)} val rows, {num_iterations} steps of "
           f"{loader.rows_per_step()} rows ({num_iterations * loader.rows_per_step() / len(train_rows):.2f} epochs)")

    train_model = compile_model(model, use_compile, dynamic=True)  # rows vary in length
    if is_ddp:  # constant buffers: no broadcast before every forward; gradients in DDP's buckets (no second copy)
        train_model = DDP(train_model, device_ids=[device.index] if device_type == "cuda" else None,
                          broadcast_buffers=False, gradient_as_bucket_view=True)
    # `train` = the base run's settings: tools that read a checkpoint's data source (base_eval's bpb, mhc_stats,
    # gate_sweep) find the pretraining data there
    run_config = dict(sft=to_flat_dict(cfg), train=base_train, model=model_config.to_dict(), model_tag=output_tag,
                      base_checkpoint=base_path, base_step=base_meta["step"], data=sources,
                      train_rows=len(train_rows), train_rows_sha256=rows_digest(train_rows, cfg.seed),
                      val_rows=len(val_rows), dropped_too_long=dropped + val_dropped,
                      num_iterations=num_iterations, world_size=world_size, dtype=dtype, compile=use_compile,
                      learning_rates=lr, tokenizer=tokenizer.fingerprint, git_commit=git_commit(), seed=cfg.seed,
                      memory_estimate=memory, machine=machine_info())
    run.write_config(run_config)
    wandb_run = init_wandb(cfg.run, "nanochat-mhc-sft", run_config, master)

    stop = run.stop_flag()
    start_step, val_loss, t_start = step, None, time.perf_counter()
    while True:
        last = step == num_iterations
        if (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)) and val_rows:
            model.eval()
            val_loss = answer_loss(model, val_rows, cfg.device_batch_size, device, ctx)
            model.train()
            print0(f"step {step:05d} | val answer loss {val_loss:.4f}")
            run.log({"step": step, "val_answer_loss": val_loss})
            wandb_run.log({"step": step, "val/answer_loss": val_loss})
        signum = stop.synced(device)
        periodic = cfg.save_every > 0 and step % cfg.save_every == 0 and step != start_step
        if last or periodic or signum:
            meta = dict(model_config=model_config.to_dict(), run_config=run_config, sft_config=to_flat_dict(cfg),
                        loader_state=loader.state_dict(), tokenizer=tokenizer.fingerprint, seed=cfg.seed,
                        git_commit=run_config["git_commit"], base_checkpoint=base_path)
            run.save(step, model, optimizers, meta, cfg.keep_checkpoints, device_type)
        if is_ddp:
            dist.barrier()
        if last or signum:
            break
        t0 = time.perf_counter()
        x, y = loader.next_batch()
        model.train()
        # the mean over the answer tokens of the whole global batch: every rank's summed loss over the global token
        # count, times W because DDP averages the ranks' gradients; so W ranks equal one process (tested)
        n_tokens = (y >= 0).sum()
        if is_ddp:
            dist.all_reduce(n_tokens)
        with ctx:
            loss_sum = train_model(x, y, loss_reduction="sum")
        (loss_sum * world_size / n_tokens).backward()
        loss = loss_sum.detach() / n_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        run.check_finite(loss, grad_norm, step, "Lower --lr-scale")  # before the update, never after
        lrm = apply_schedules(optimizers, step, num_iterations, 0.0, 1.0, 0.0)  # linear decay to 0
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if is_ddp:
            dist.all_reduce(loss)  # the ranks' shares of the global mean
        loss = loss.item()
        run.check_loss(step + 1, loss, model_config.vocab_size, cfg.divergence_check)  # no warm-up (linear decay)
        step += 1
        dt = time.perf_counter() - t0
        record = dict(step=step, loss=loss, lrm=lrm, grad_norm=grad_norm.item(), dt=dt, epoch=loader.epoch)
        run.log(record)
        wandb_run.log({"step": step, **{f"train/{k}": v for k, v in record.items() if k != "step"}})
        if step % cfg.log_every == 0 or step == num_iterations:
            eta = (num_iterations - step) * (time.perf_counter() - t_start) / (step - start_step)
            print0(f"step {step:05d}/{num_iterations} | answer loss {loss:.4f} | lrm {lrm:.2f} | grad norm "
                   f"{record['grad_norm']:.3f} | dt {1000 * dt:.0f} ms | epoch {loader.epoch:.2f} | "
                   f"eta {eta / 60:.1f} min")
    if val_loss is not None:
        print0(f"final val answer loss: {val_loss:.4f}")
    wandb_run.finish()
    run.finish(step, signum)


if __name__ == "__main__":
    run_main(main)
