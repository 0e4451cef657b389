"""Memory traffic of an eager training step, counted: every aten op of the forward and backward runs on fake tensors
(no storage, so the GPU preset's d12 at 64 x 1024 tokens counts on any machine) and adds the bytes of its inputs
and outputs. The baseline and the mHC model at the same shape; the mHC excess is given in passes over the
n-stream state per sub-layer, and as time at a memory bandwidth (docs/performance.md uses it to predict the mHC
step time before a GPU has run). Eager upper bound: a compiled step fuses elementwise ops and moves less.

    python -m benchmarks.mhc_traffic                       # the GPU preset: d12, 64 x 1024 tokens, bf16
    python -m benchmarks.mhc_traffic --bf16-streams
"""
from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.bench_utils import add_tiny_shape_args, write_record
from nanochat.common import doc_summary, run_main
from nanochat.gpt import GPT, GPTConfig, model_dims_from_depth
from nanochat.mhc import MHCConfig


class ByteCounter(TorchDispatchMode):
    """Sums the bytes of every tensor an aten op reads (inputs) and writes (outputs), views excluded (no data
    moves)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.by_op = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "aten" and not func.is_view and func is not torch.ops.aten._unsafe_view.default:
            # views move no data; prim:: ops (device, dim queries) touch none
            moved = sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs, out))[0]
                        if isinstance(t, torch.Tensor))
            self.bytes += moved
            self.by_op[func.__name__] += moved
        return out


def step_bytes(cfg: GPTConfig, batch: int, seq: int, dtype: str) -> ByteCounter:
    from torch._subclasses.fake_tensor import FakeTensorMode
    counter = ByteCounter()
    with FakeTensorMode():
        model = GPT(cfg)
        idx = torch.zeros(batch, seq, dtype=torch.long)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        with counter:
            with autocast:
                loss = model(idx, idx)
            loss.backward()
    return counter


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    add_tiny_shape_args(p)
    p.set_defaults(depth=12, head_dim=128, seq_len=1024, batch_size=64, vocab_size=32768)  # the GPU preset
    p.add_argument("--num-streams", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--bf16-streams", action="store_true", help="mHC: mhc_bf16_streams")
    p.add_argument("--bandwidth-tbs", type=float, default=2.5, help="achieved memory bandwidth in TB/s (H100 SXM: "
                   "3.35 peak, ~2.5-3 reached)")
    p.add_argument("--out", default="results/bench/mhc_traffic.json")
    args = p.parse_args(argv)
    n_embd, n_head = model_dims_from_depth(args.depth, args.aspect_ratio, args.head_dim)
    base = GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab_size, n_layer=args.depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd)
    mhc = replace(base, mhc=MHCConfig(enabled=True, num_streams=args.num_streams, bf16_streams=args.bf16_streams))
    counts = {name: step_bytes(cfg, args.batch_size, args.seq_len, args.dtype) for name, cfg in
              (("baseline", base), ("mhc", mhc))}
    tokens = args.batch_size * args.seq_len
    stream_bytes = 2 if (args.bf16_streams and args.dtype == "bfloat16") else 4
    one_pass = tokens * args.num_streams * n_embd * stream_bytes  # one read or write of the n-stream state
    excess = counts["mhc"].bytes - counts["baseline"].bytes
    passes = excess / (one_pass * 2 * args.depth)
    ms = {k: 1000 * c.bytes / (args.bandwidth_tbs * 1e12) for k, c in counts.items()}
    excess_ms = 1000 * excess / (args.bandwidth_tbs * 1e12)
    print(f"eager step traffic at {args.batch_size} x {args.seq_len} tokens, depth {args.depth}, width {n_embd}, "
          f"{args.dtype}: baseline {counts['baseline'].bytes / 1e9:.0f} GB, mHC {counts['mhc'].bytes / 1e9:.0f} GB")
    print(f"mHC excess {excess / 1e9:.0f} GB = {passes:.1f} passes over the {args.num_streams}-stream state "
          f"({one_pass / 1e9:.2f} GB each) per sub-layer, forward + backward; {excess_ms:.0f} ms at "
          f"{args.bandwidth_tbs} TB/s")
    top = counts["mhc"].by_op.most_common(8)
    print("mHC step, largest movers: " + ", ".join(f"{op} {b / 1e9:.0f} GB" for op, b in top))
    write_record(args.out, "mhc_traffic", args, "fake",
                 dict(bytes={k: c.bytes for k, c in counts.items()}, excess_bytes=excess, stream_pass_bytes=one_pass,
                      excess_passes_per_sublayer=passes, ms_at_bandwidth=ms, excess_ms_at_bandwidth=excess_ms,
                      by_op={k: dict(c.by_op.most_common(20)) for k, c in counts.items()}))


if __name__ == "__main__":
    run_main(main)
