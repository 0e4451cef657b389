"""Inference speed and memory, baseline vs mHC, eager vs compiled: prefill latency and decode tokens/s at batch 1
and 8 through the engine (nanochat/engine.py), decode with vs without the KV cache, and peak memory of generation.
Writes JSON.

    python -m benchmarks.inference --compile both        # the tiny CPU config: depth 4, width 256, vocab 4096
    python -m benchmarks.inference --depth 12 --head-dim 128 --vocab-size 32768 --seq-len 1024 --dtype bfloat16

JSON: decode[arch][mode][batch] = tokens/s and prefill[arch][mode][batch] = milliseconds (arch baseline|mhc, mode
eager|compiled, batch "1"|"8"), compile_s[arch][batch] = the first compiled call (cold or warm compile: the inductor
cache, nanochat.common.use_compile_cache), ratios; results[arch]["batch"] keeps the eager figures in detail.
"compiled" is Engine(compile=True, compile_prefill=True): the decode step through torch.compile (CUDA graphs on
GPU) and the prefill bucketed and compiled. Decode tokens/s counts the forwards after the prefill (new_tokens - 1
per row: the last token needs none) over the loop's time, the engine's per-token bookkeeping included.

Models are randomly initialised (speed does not depend on the weights) and decode greedily with no stop token, so
every run generates exactly --new-tokens tokens. Timings are medians over --repeats, with the models, the modes
and the two cache modes interleaved in one process, so machine noise hits both sides of each ratio alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_utils import child_peak_memory_mib, own_peak_memory_mib, timed_generate, write_record
from nanochat.common import doc_summary, autocast_ctx, autodetect_device_type, run_main
from nanochat.engine import Engine
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


COMPILE_MODES = {"false": ("eager",), "true": ("compiled",), "both": ("eager", "compiled")}


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
    p.add_argument("--compile", default="auto", choices=["auto", *COMPILE_MODES],
                   help="which engine paths to time: false (eager), true (compiled), both; auto = both on CUDA, "
                        "eager on the CPU (compiling the tiny models takes minutes there)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled path (aot_eager: the graphs without inductor's code "
                        "generation, for a quick check)")
    p.add_argument("--skip-no-cache", action="store_true", help="skip the slow generation without the KV cache")
    p.add_argument("--out", default="results/bench/inference.json")
    p.add_argument("--_memory-child", dest="memory_child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device_type = autodetect_device_type()
    device = torch.device(device_type)
    ctx = autocast_ctx(device_type, args.dtype)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    compile_flag = args.compile if args.compile != "auto" else ("both" if device_type == "cuda" else "false")
    modes = COMPILE_MODES[compile_flag]
    gen = torch.Generator().manual_seed(0)

    def prompts(B):
        return torch.randint(0, args.vocab_size, (B, args.prompt_len), generator=gen)

    if args.memory_child:  # child: one eager generation at one batch size, print the peak memory in MiB
        name, B = args.memory_child.split(":")
        timed_generate(Engine(build(args, name == "mhc", device), autocast_ctx=ctx), prompts(int(B)),
                       args.new_tokens)
        print(own_peak_memory_mib(device_type))
        return

    models = {name: build(args, name == "mhc", device) for name in MODELS}
    engines = {(name, mode): Engine(model, autocast_ctx=ctx, compile=mode == "compiled",
                                    compile_prefill=mode == "compiled", backend=args.compile_backend)
               for name, model in models.items() for mode in modes}
    inputs = {B: prompts(B) for B in batch_sizes}
    compile_s = {name: {} for name in MODELS}
    for (name, mode), engine in engines.items():  # warm-up: compiles, first-call allocations, kernel selection
        for B in batch_sizes:
            t0 = time.perf_counter()
            timed_generate(engine, inputs[B], min(4, args.new_tokens))
            if mode == "compiled":
                compile_s[name][str(B)] = time.perf_counter() - t0
                print(f"{name:8s} batch {B}: compiled in {compile_s[name][str(B)]:.1f} s", flush=True)
    times = {(n, m, B): ([], []) for n in MODELS for m in modes for B in batch_sizes}
    cache_cmp = {(n, c): [] for n in MODELS for c in ("cache", "no_cache")}
    single = inputs[1][0].tolist() if 1 in inputs else prompts(1)[0].tolist()
    for _ in range(args.repeats):
        for name, model in models.items():
            for mode in modes:
                for B in batch_sizes:
                    pre, dec = timed_generate(engines[(name, mode)], inputs[B], args.new_tokens)
                    times[(name, mode, B)][0].append(pre)
                    times[(name, mode, B)][1].append(dec)
            engine = Engine(model, autocast_ctx=ctx)  # eager, end to end, batch 1, greedy
            for cache_mode in ("cache",) if args.skip_no_cache else ("cache", "no_cache"):
                t0 = time.perf_counter()
                engine.generate([single], args.new_tokens, use_cache=cache_mode == "cache")
                cache_cmp[(name, cache_mode)].append(time.perf_counter() - t0)

    results = dict(decode={}, prefill={}, compile_s=compile_s if "compiled" in modes else {})
    for name in MODELS:
        results["decode"][name], results["prefill"][name] = {}, {}
        for mode in modes:
            dec = {str(B): B / statistics.median(times[(name, mode, B)][1]) for B in batch_sizes}
            pre = {str(B): 1000 * statistics.median(times[(name, mode, B)][0]) for B in batch_sizes}
            results["decode"][name][mode], results["prefill"][name][mode] = dec, pre
        r = results[name] = {"batch": {}, "num_params": models[name].num_params()}
        detail_mode = "eager" if "eager" in modes else "compiled"
        for B in batch_sizes:
            pre_all, dec_all = times[(name, detail_mode, B)]
            pre, dec = statistics.median(pre_all), statistics.median(dec_all)
            r["batch"][str(B)] = dict(mode=detail_mode, prefill_ms=1000 * pre,
                                      prefill_tok_per_s=B * args.prompt_len / pre, decode_tok_per_s=B / dec,
                                      decode_ms_per_step=1000 * dec, prefill_s_all=pre_all,
                                      decode_s_per_forward_all=dec_all)
        tps = {m: args.new_tokens / statistics.median(cache_cmp[(name, m)]) if cache_cmp[(name, m)] else None
               for m in ("cache", "no_cache")}
        r["generate_batch1"] = dict(tok_per_s_cache=tps["cache"], tok_per_s_no_cache=tps["no_cache"],
                                    cache_speedup=tps["cache"] / tps["no_cache"] if tps["no_cache"] else None,
                                    seconds_cache=cache_cmp[(name, "cache")],
                                    seconds_no_cache=cache_cmp[(name, "no_cache")])
    del models, engines
    for name in MODELS:
        results[name]["peak_memory_mib"] = {
            str(B): child_peak_memory_mib("benchmarks.inference", f"{name}:{B}", args,
                                         exclude=("out", "batch_sizes", "skip_no_cache", "compile",
                                                  "compile_backend"))
            for B in batch_sizes}
    dec = results["decode"]
    ratios = {f"decode_mhc_over_baseline_{mode}_b{B}": dec["mhc"][mode][str(B)] / dec["baseline"][mode][str(B)]
              for mode in modes for B in batch_sizes}
    if len(modes) == 2:
        ratios.update({f"decode_compiled_over_eager_{name}_b{B}": dec[name]["compiled"][str(B)]
                       / dec[name]["eager"][str(B)] for name in MODELS for B in batch_sizes})
    ratios.update({f"peak_memory_mhc_over_baseline_b{B}": results["mhc"]["peak_memory_mib"][str(B)]
                   / results["baseline"]["peak_memory_mib"][str(B)] for B in batch_sizes})
    results["ratios"] = ratios
    for name in MODELS:
        for mode in modes:
            for B in batch_sizes:
                print(f"{name:8s} {mode:8s} batch {B}: prefill {results['prefill'][name][mode][str(B)]:.1f} ms "
                      f"({args.prompt_len} tokens), decode {dec[name][mode][str(B)]:.0f} tok/s")
        print(f"{name:8s} peak memory (eager): " + ", ".join(
            f"batch {B} {results[name]['peak_memory_mib'][str(B)]:.0f} MiB" for B in batch_sizes))
        g = results[name]["generate_batch1"]
        without = "" if g["tok_per_s_no_cache"] is None else \
            f", {g['tok_per_s_no_cache']:.1f} without -> {g['cache_speedup']:.1f}x"
        print(f"{name:8s} {args.new_tokens} new tokens, batch 1, eager: {g['tok_per_s_cache']:.0f} tok/s with the "
              f"KV cache{without}")
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    write_record(args.out, "inference", args, device_type, results)


if __name__ == "__main__":
    run_main(main)
