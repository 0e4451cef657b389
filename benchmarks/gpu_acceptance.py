"""The GPU acceptance check: one command, one GPU, one JSON (budget: 8 minutes on one H100, compiles included).

    python -m benchmarks.gpu_acceptance                      # results/gpu_acceptance.json
    python -m benchmarks.gpu_acceptance --smoke              # the same sections at a tiny scale on the CPU

Sections (each a key of results):
- train: depth-12 baseline and mHC training steps (bf16 autocast, torch.compile, Muon + AdamW) on random tokens,
  interleaved step by step: tok/s, MFU (the card's bf16 peak, nanochat.common.peak_bf16_flops), peak memory, the
  mHC / baseline step-time ratio, and the first compile's seconds;
- loss_agreement: the eager and the compiled forward's loss on one batch before any step, within `tolerance`
  (bf16 autocast: the two round differently);
- decode: greedy generation through the engine, eager vs compiled (static KV cache, CUDA graphs on GPU) at batch 1
  and 8: tokens/s, the compiled / eager and mHC / baseline ratios, compile seconds;
- rl_env: the vec env's steps/s on a random-init mHC model of the same width and depth, dense and exact rewards,
  eager vs compiled (random weights never emit a stop token, so every exact reward decodes --rl-new-tokens
  tokens: the worst case). Its vocabulary is a small tokenizer trained here on the synthetic problems, so nothing
  has to be downloaded or trained first.
`checks` lists what passed; the exit status is 1 when one failed. The smoke mode (tests/test_benchmarks.py) runs
the same code at depth 1 with torch.compile's aot_eager backend (the graphs without inductor's code generation).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.bench_utils import timed_generate, timed_train_step, time_vec_env, write_record
from nanochat.common import (autocast_ctx, autodetect_device_type, doc_summary, peak_bf16_flops, run_main,
                             use_compile_cache)
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig, model_dims_from_depth
from nanochat.mhc import MHCConfig
from nanochat.optim import setup_optimizers

ARCHS = ("baseline", "mhc")
FULL = dict(depth=12, head_dim=128, seq_len=1024, batch_size=16, vocab_size=32768, dtype="bfloat16",
            train_steps=10, prompt_len=128, new_tokens=64, rl_envs=16, rl_new_tokens=64, rl_seq_len=1024,
            backend="inductor")
SMOKE = dict(depth=1, head_dim=32, seq_len=32, batch_size=2, vocab_size=512, dtype="float32", train_steps=2,
             prompt_len=8, new_tokens=6, rl_envs=2, rl_new_tokens=4, rl_seq_len=256, backend="aot_eager")
LOSS_TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-4}  # relative; bf16 rounds eager and fused kernels differently


def build(depth: int, head_dim: int, seq_len: int, vocab_size: int, mhc: bool, device) -> GPT:
    n_embd, n_head = model_dims_from_depth(depth, 64, head_dim)
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                    n_embd=n_embd, mhc=MHCConfig(enabled=mhc))
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    model.init_weights()
    return model


def sync(device_type: str):
    if device_type == "cuda":
        torch.cuda.synchronize()


def train_section(s: dict, device, ctx, compile_kw: dict) -> tuple[dict, dict, dict]:
    """Interleaved compiled training steps of both models, and the eager vs compiled loss. Returns (train figures,
    loss agreement, the trained models)."""
    device_type = device.type
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, s["vocab_size"], (s["batch_size"], s["seq_len"]), generator=gen).to(device)
    y = torch.roll(x, -1, dims=1)
    models, compiled, opts, out, agreement = {}, {}, {}, {}, {}
    for arch in ARCHS:
        models[arch] = build(s["depth"], s["head_dim"], s["seq_len"], s["vocab_size"], arch == "mhc", device)
        compiled[arch] = torch.compile(models[arch], dynamic=False, **compile_kw)
        opts[arch] = setup_optimizers(models[arch], embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02,
                                      scalar_lr=0.5, weight_decay=0.0,
                                      ns_dtype=torch.bfloat16 if s["dtype"] == "bfloat16" else torch.float32)
        with torch.no_grad(), ctx:
            eager_loss = float(models[arch](x, y))
            t0 = time.perf_counter()
            compiled_loss = float(compiled[arch](x, y))
        rel = abs(compiled_loss - eager_loss) / max(1.0, abs(eager_loss))
        agreement[arch] = dict(eager=eager_loss, compiled=compiled_loss, rel_diff=rel,
                               tolerance=LOSS_TOLERANCE[s["dtype"]], ok=rel <= LOSS_TOLERANCE[s["dtype"]])
        t0 = time.perf_counter()
        timed_train_step(compiled[arch], opts[arch], x, y, ctx, device_type)  # compiles forward and backward
        timed_train_step(compiled[arch], opts[arch], x, y, ctx, device_type)  # optimizer state, allocator
        out[arch] = dict(compile_s=time.perf_counter() - t0)
        print(f"train {arch}: loss eager {eager_loss:.5f}, compiled {compiled_loss:.5f}; compiled and warmed up in "
              f"{out[arch]['compile_s']:.1f} s", flush=True)
    times = {arch: [] for arch in ARCHS}
    peak = {arch: 0.0 for arch in ARCHS}
    for _ in range(s["train_steps"]):
        for arch in ARCHS:
            if device_type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[arch].append(timed_train_step(compiled[arch], opts[arch], x, y, ctx, device_type))
            if device_type == "cuda":
                peak[arch] = max(peak[arch], torch.cuda.max_memory_allocated() / 2**30)
    tokens = s["batch_size"] * s["seq_len"]
    card = peak_bf16_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None
    for arch in ARCHS:
        step_s = statistics.median(times[arch])
        tok_s = tokens / step_s
        flops = models[arch].estimate_flops_per_token()
        out[arch].update(step_s=step_s, tok_per_s=tok_s, mfu=flops * tok_s / card if card else None,
                         peak_memory_gib=peak[arch] if device_type == "cuda" else None,
                         num_params=models[arch].num_params(), step_s_all=times[arch])
    ratios = [m / b for b, m in zip(times["baseline"], times["mhc"])]
    out["mhc_over_baseline_step_time"] = statistics.median(ratios)
    out["tokens_per_step"], out["peak_bf16_flops"] = tokens, card
    return out, agreement, models


def decode_section(s: dict, models: dict, device, ctx, backend) -> dict:
    """Eager vs compiled greedy generation at batch 1 and 8, interleaved over 3 repeats."""
    gen = torch.Generator().manual_seed(1)
    prompts = {B: torch.randint(0, s["vocab_size"], (B, s["prompt_len"]), generator=gen) for B in (1, 8)}
    engines = {(arch, mode): Engine(models[arch].eval(), autocast_ctx=ctx, compile=mode == "compiled",
                                    backend=backend) for arch in ARCHS for mode in ("eager", "compiled")}
    out = dict(tok_per_s={arch: {"eager": {}, "compiled": {}} for arch in ARCHS}, compile_s={a: {} for a in ARCHS})
    for (arch, mode), engine in engines.items():
        for B, p in prompts.items():
            t0 = time.perf_counter()
            timed_generate(engine, p, 4)
            if mode == "compiled":
                out["compile_s"][arch][str(B)] = time.perf_counter() - t0
    per_forward = {(arch, mode, B): [] for arch in ARCHS for mode in ("eager", "compiled") for B in prompts}
    for _ in range(3):
        for (arch, mode), engine in engines.items():
            for B, p in prompts.items():
                per_forward[(arch, mode, B)].append(timed_generate(engine, p, s["new_tokens"])[1])
    for (arch, mode, B), t in per_forward.items():
        out["tok_per_s"][arch][mode][str(B)] = B / statistics.median(t)
    tps = out["tok_per_s"]
    out["compiled_over_eager"] = {a: {b: tps[a]["compiled"][b] / tps[a]["eager"][b] for b in ("1", "8")}
                                  for a in ARCHS}
    out["mhc_over_baseline"] = {m: {b: tps["mhc"][m][b] / tps["baseline"][m][b] for b in ("1", "8")}
                                for m in ("eager", "compiled")}
    out["cuda_graphs"] = device.type == "cuda" and backend == "inductor"
    for arch in ARCHS:
        print(f"decode {arch}: " + ", ".join(f"{mode} b{b} {tps[arch][mode][b]:.0f} tok/s"
                                             for mode in ("eager", "compiled") for b in ("1", "8")), flush=True)
    return out


def rl_section(s: dict, device, dtype: str, backend) -> dict:
    """Vec-env steps/s, dense and exact rewards, eager vs compiled, on a random-init mHC model."""
    from envs.mhc_env import GateScorer, GSM8KMHCVecEnv, build_problem_pool
    from nanochat.synthetic_gsm8k import generate_problems
    from nanochat.tokenizer import Tokenizer
    texts = [p["question"] + " " + p["answer"] for p in generate_problems(2000, seed=0, steps=(1, 2), max_value=20)]
    tokenizer = Tokenizer.train(iter(texts), 512)
    model = build(s["depth"], s["head_dim"], s["rl_seq_len"], tokenizer.vocab_size, True, device).eval()
    out = {}
    for reward in ("dense", "exact"):
        for mode in ("eager", "compiled"):
            scorer = GateScorer(model, tokenizer, action_space="per_layer", reward=reward, dtype=dtype,
                                max_new_tokens=s["rl_new_tokens"], batch_size=s["rl_envs"],
                                compile=mode == "compiled", compile_backend=backend)
            problems, _ = build_problem_pool(scorer, "synthetic", count=64, seed=1, synthetic_steps=[1],
                                             synthetic_max_value=10)
            vec = GSM8KMHCVecEnv(scorer, problems, s["rl_envs"], seed=0)
            rng = np.random.default_rng(0)
            t0 = time.perf_counter()
            time_vec_env(vec, s["rl_envs"], rng)  # warm-up: the compile
            warm = time.perf_counter() - t0
            out.setdefault(reward, {})[mode] = dict(steps_per_s=statistics.median(
                time_vec_env(vec, 2 * s["rl_envs"], rng) for _ in range(3)), warm_up_s=warm)
        r = out[reward]
        r["compiled_over_eager"] = r["compiled"]["steps_per_s"] / r["eager"]["steps_per_s"]
        print(f"rl_env {reward}: eager {r['eager']['steps_per_s']:.1f} steps/s, compiled "
              f"{r['compiled']['steps_per_s']:.1f} (x{r['compiled_over_eager']:.2f})", flush=True)
    out.update(num_envs=s["rl_envs"], new_tokens=s["rl_new_tokens"], vocab_size=tokenizer.vocab_size)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--smoke", action="store_true", help="a tiny scale on any device (the CPU test)")
    p.add_argument("--sections", default="train,decode,rl_env", help="comma-separated subset to run")
    p.add_argument("--out", default="results/gpu_acceptance.json")
    args = p.parse_args(argv)
    device_type = autodetect_device_type()
    if not args.smoke and device_type != "cuda":
        raise SystemExit("gpu_acceptance: no GPU here (--smoke runs the same sections at a tiny scale on the CPU)")
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = set(sections) - {"train", "decode", "rl_env"}
    if unknown:
        raise SystemExit(f"gpu_acceptance: unknown --sections {sorted(unknown)} (train, decode, rl_env)")
    s = SMOKE if args.smoke else FULL
    device = torch.device(device_type)
    ctx = autocast_ctx(device_type, s["dtype"])
    use_compile_cache()
    compile_kw = dict(backend=s["backend"])
    t_start = time.perf_counter()
    results, checks = dict(scale="smoke" if args.smoke else "full", shape=s), {}
    models = None
    if "train" in sections or "decode" in sections:
        results["train"], results["loss_agreement"], models = train_section(s, device, ctx, compile_kw)
        checks.update({f"loss_agreement_{a}": results["loss_agreement"][a]["ok"] for a in ARCHS})
    if "decode" in sections:
        results["decode"] = decode_section(s, models, device, ctx, s["backend"])
    if "rl_env" in sections:
        results["rl_env"] = rl_section(s, device, s["dtype"], s["backend"])
    results["total_s"] = time.perf_counter() - t_start
    results["checks"] = checks
    print(f"gpu_acceptance: {results['total_s']:.0f} s; checks: " + (", ".join(
        f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()) or "none"))
    record = write_record(args.out, "gpu_acceptance", args, device_type, results)
    if not all(checks.values()):
        raise SystemExit(1)
    return record


if __name__ == "__main__":
    run_main(main)
