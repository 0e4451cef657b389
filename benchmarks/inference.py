"""Inference speed and memory, baseline vs mHC: prefill latency and decode tokens/s at batch 1 and 8 (KV cache),
decode with vs without the KV cache, and peak memory of generation. Writes JSON.

    python -m benchmarks.inference                       # the tiny CPU config: depth 4, width 256, vocab 4096
    python -m benchmarks.inference --depth 12 --head-dim 128 --vocab-size 32768 --seq-len 1024 --dtype bfloat16

Models are randomly initialised (speed does not depend on the weights) and decode greedily with no stop token, so
every run generates exactly --new-tokens tokens. Timings are medians over --repeats, with the models and the two
cache modes interleaved in one process, so machine noise hits both sides of each ratio alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_utils import child_peak_memory_mib, own_peak_memory_mib, write_record
from nanochat.common import doc_summary, autocast_ctx, autodetect_device_type, run_main
from nanochat.engine import Engine, KVCache
from nanochat.gpt import GPT, GPTConfig, model_dims_from_depth
from nanochat.mhc import MHCConfig

MODELS = ("baseline", "mhc")


def build(args, mhc: bool, device) -> GPT:
    n_embd, n_head = model_dims_from_depth(args.depth, args.aspect_ratio, args.head_dim)
    cfg = GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab_size, n_layer=args.depth, n_head=n_head,
                    n_kv_head=n_head, n_embd=n_embd,
                    mhc=MHCConfig(enabled=mhc, num_streams=args.num_streams))
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    model.init_weights()
    return model.eval()


def sync(device_type: str):
    if device_type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_and_decode(model, prompts: torch.Tensor, new_tokens: int, ctx, device_type: str) -> tuple[float, float]:
    """One prefill of [B, P] prompt tokens, then new_tokens single-token steps against the cache (the engine's
    path, without its Python bookkeeping). Returns (prefill seconds, decode seconds)."""
    B, P = prompts.shape
    cache = KVCache(B, model.config.n_layer, P + new_tokens)
    sync(device_type)
    t0 = time.perf_counter()
    with ctx:
        logits = model(prompts, kv_cache=cache)[:, -1]
    sync(device_type)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        with ctx:
            logits = model(nxt, kv_cache=cache)[:, -1]
    sync(device_type)
    return t1 - t0, time.perf_counter() - t1


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256, help="training context (rotary tables cover 4x)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--num-streams", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256, help="decode steps (also for the no-cache comparison)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-no-cache", action="store_true", help="skip the slow generation without the KV cache")
    p.add_argument("--out", default="results/bench/inference.json")
    p.add_argument("--_memory-child", dest="memory_child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device_type = autodetect_device_type()
    device = torch.device(device_type)
    ctx = autocast_ctx(device_type, args.dtype)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    gen = torch.Generator().manual_seed(0)

    def prompts(B):
        return torch.randint(0, args.vocab_size, (B, args.prompt_len), generator=gen).to(device)

    if args.memory_child:  # child: one generation at one batch size, print the peak memory in MiB
        name, B = args.memory_child.split(":")
        model = build(args, name == "mhc", device)
        prefill_and_decode(model, prompts(int(B)), args.new_tokens, ctx, device_type)
        print(own_peak_memory_mib(device_type))
        return

    models = {name: build(args, name == "mhc", device) for name in MODELS}
    inputs = {B: prompts(B) for B in batch_sizes}
    for model in models.values():  # warm-up: first-call allocations and kernel selection
        prefill_and_decode(model, inputs[batch_sizes[0]], 4, ctx, device_type)
    times = {(n, B): ([], []) for n in MODELS for B in batch_sizes}
    cache_cmp = {(n, c): [] for n in MODELS for c in ("cache", "no_cache")}
    single = inputs[1][0].tolist() if 1 in inputs else prompts(1)[0].tolist()
    for _ in range(args.repeats):
        for name, model in models.items():
            for B in batch_sizes:
                pre, dec = prefill_and_decode(model, inputs[B], args.new_tokens, ctx, device_type)
                times[(name, B)][0].append(pre)
                times[(name, B)][1].append(dec)
            engine = Engine(model, autocast_ctx=ctx)  # end to end through the engine, batch 1, greedy
            for mode in ("cache",) if args.skip_no_cache else ("cache", "no_cache"):
                sync(device_type)
                t0 = time.perf_counter()
                engine.generate([single], args.new_tokens, use_cache=mode == "cache")
                sync(device_type)
                cache_cmp[(name, mode)].append(time.perf_counter() - t0)

    results = {}
    for name in MODELS:
        r = results[name] = {"batch": {}, "num_params": models[name].num_params()}
        for B in batch_sizes:
            pre, dec = (statistics.median(t) for t in times[(name, B)])
            r["batch"][str(B)] = dict(prefill_ms=1000 * pre, prefill_tok_per_s=B * args.prompt_len / pre,
                                      decode_tok_per_s=B * args.new_tokens / dec, decode_ms_per_step=1000 * dec /
                                      args.new_tokens, prefill_s_all=times[(name, B)][0],
                                      decode_s_all=times[(name, B)][1])
        tps = {m: args.new_tokens / statistics.median(cache_cmp[(name, m)]) if cache_cmp[(name, m)] else None
               for m in ("cache", "no_cache")}
        r["generate_batch1"] = dict(tok_per_s_cache=tps["cache"], tok_per_s_no_cache=tps["no_cache"],
                                    cache_speedup=tps["cache"] / tps["no_cache"] if tps["no_cache"] else None,
                                    seconds_cache=cache_cmp[(name, "cache")],
                                    seconds_no_cache=cache_cmp[(name, "no_cache")])
    del models
    for name in MODELS:
        results[name]["peak_memory_mib"] = {
            str(B): child_peak_memory_mib("benchmarks.inference", f"{name}:{B}", args,
                                         exclude=("out", "batch_sizes", "skip_no_cache"))
            for B in batch_sizes}
    ratios = {f"decode_tok_per_s_mhc_over_baseline_b{B}": results["mhc"]["batch"][str(B)]["decode_tok_per_s"]
              / results["baseline"]["batch"][str(B)]["decode_tok_per_s"] for B in batch_sizes}
    ratios.update({f"peak_memory_mhc_over_baseline_b{B}": results["mhc"]["peak_memory_mib"][str(B)]
                   / results["baseline"]["peak_memory_mib"][str(B)] for B in batch_sizes})
    results["ratios"] = ratios
    for name in MODELS:
        for B in batch_sizes:
            b = results[name]["batch"][str(B)]
            print(f"{name:8s} batch {B}: prefill {b['prefill_ms']:.1f} ms ({args.prompt_len} tokens), decode "
                  f"{b['decode_tok_per_s']:.0f} tok/s, peak memory {results[name]['peak_memory_mib'][str(B)]:.0f} MiB")
        g = results[name]["generate_batch1"]
        without = "" if g["tok_per_s_no_cache"] is None else \
            f", {g['tok_per_s_no_cache']:.1f} without -> {g['cache_speedup']:.1f}x"
        print(f"{name:8s} {args.new_tokens} new tokens, batch 1: {g['tok_per_s_cache']:.0f} tok/s with the KV cache"
              f"{without}")
    write_record(args.out, "inference", args, device_type, results)


if __name__ == "__main__":
    run_main(main)
