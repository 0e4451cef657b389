"""Inference-time Sinkhorn: what k < mhc_sinkhorn_iters Sinkhorn iterations at inference
(GPT.set_inference_sinkhorn_iters) do to a trained mHC model, against the exact model on the same real text: H_res's
row and column sums, the logits, the next-token distributions and the greedy next token, and the forward time.
Writes JSON.

    python -m benchmarks.sinkhorn_inference --model-tag tiny_mhc_sft
    python -m benchmarks.sinkhorn_inference --checkpoint PATH --iters 1,2,5,20 --sequences 16 --repeats 9

Text: the first --sequences rows of the validation split of the checkpoint's training source (the packed rows that
base_eval's bits per byte reads). Sums are reported for the raw Sinkhorn output and for the H_res the model applies,
(1 - g) I + g Sinkhorn (captured with GPT.capture_mhc; the gate scales a sum's error by g). Timing: eager forwards
in fp32 under no_grad, every k and the exact model interleaved in each of --repeats rounds; the ratio is the median
of the per-round ratios, so machine noise hits both sides alike; the Sinkhorn of one forward is also timed alone
(what k can save at most). The recommended k is the smallest whose largest logit change is negligible; the model's
default stays exact.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from benchmarks.bench_utils import write_record
from nanochat.checkpoint import check_tokenizer, load_model, resolve_checkpoint
from nanochat.common import UserError, autodetect_device_type, doc_summary, run_main
from nanochat.dataloader import PackedLoader
from nanochat.dataset import pretokenize, tokenized_dir
from nanochat.mhc import sinkhorn
from nanochat.tokenizer import get_tokenizer

DEFAULT_ITERS = "1,2,3,5,8,10,15,20"
# "negligible": logits are fp32 and softcapped to +-15, so 1e-4 is ~1e-5 relative, far below what moves a sampled
# token, yet above the ~1e-6 that fp32 rounding alone leaves between two code paths
NEGLIGIBLE_LOGIT_DELTA = 1e-4


def val_tokens(meta: dict, tokenizer, sequences: int, seq_len: int, data_source: str, device) -> torch.Tensor:
    """[sequences, seq_len] token ids: the first rows of the validation split of the training source."""
    source = data_source or meta.get("run_config", {}).get("train", {}).get("data_source", "fineweb")
    pretokenize(source, tokenizer)  # checks the pretokenized shards (builds them only when missing)
    loader = PackedLoader(tokenized_dir(source, tokenizer), "val", sequences, seq_len, device=device)
    return loader.next_batch()[0]


@contextmanager
def recording_projections(model, store: list):
    """Appends each connection's raw projection output (Sinkhorn, before the gate) to `store` during the block."""
    originals = [(conn, conn.project) for conn in model.mhc_modules()]
    for conn, project in originals:
        def recording(logits, c, project=project):
            H_res = project(logits, c)
            store.append(H_res.detach())
            return H_res
        conn.project = recording
    try:
        yield
    finally:
        for conn, project in originals:
            conn.project = project


def sum_errors(matrices: list[torch.Tensor]) -> dict:
    """Worst and mean |row sum - 1| and |column sum - 1| over [..., n, n] matrices (summed in float64, so the
    figure is the matrices' own error, not the summation's)."""
    H = torch.cat([m.reshape(-1, *m.shape[-2:]) for m in matrices]).double()
    rows, cols = (H.sum(-1) - 1).abs(), (H.sum(-2) - 1).abs()
    return dict(row_max=rows.max().item(), row_mean=rows.mean().item(),
                col_max=cols.max().item(), col_mean=cols.mean().item())


@torch.no_grad()
def measure(model, idx: torch.Tensor, k: int | None) -> tuple[torch.Tensor, dict, dict]:
    """One forward at k iterations -> (logits [B, T, V] fp32, raw Sinkhorn sum errors, applied H_res sum errors)."""
    model.set_inference_sinkhorn_iters(k)
    raw: list[torch.Tensor] = []
    model.capture_mhc(True)
    try:
        with recording_projections(model, raw):
            logits = model(idx)
        applied = [c["H_res"] for c in model.captured_mhc()]
    finally:
        model.capture_mhc(False)
    return logits, sum_errors(raw), sum_errors(applied)


def compare(exact: torch.Tensor, approx: torch.Tensor) -> dict:
    """Next-token logits of the k-iteration model against the exact one, over every position."""
    log_p = F.log_softmax(exact.double(), dim=-1)
    log_q = F.log_softmax(approx.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)                                 # KL(exact || k) per position
    return dict(max_abs_dlogits=(approx - exact).abs().max().item(), mean_kl=kl.mean().item(),
                greedy_agreement=(approx.argmax(-1) == exact.argmax(-1)).double().mean().item())


@torch.no_grad()
def time_forward(model, idx: torch.Tensor, k: int | None, device_type: str) -> float:
    model.set_inference_sinkhorn_iters(k)
    if device_type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(idx)
    if device_type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_sinkhorn(model, tokens: int, k: int | None, device) -> float:
    """The Sinkhorn of one forward alone: the 2L sub-layers' sinkhorn() on [tokens, n, n] logits (random: with no
    early exit its time does not depend on the values). What k can save at most, free of the forward's noise."""
    cfg = model.config.mhc
    logits = torch.randn(tokens, cfg.num_streams, cfg.num_streams, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(2 * model.config.n_layer):
            sinkhorn(logits, k or cfg.sinkhorn_iters, cfg.sinkhorn_tau)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def parse_iters(text: str, trained: int) -> list[int]:
    try:
        ks = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--iters: comma-separated integers, e.g. {DEFAULT_ITERS} (got {text!r})") from None
    skipped = [k for k in ks if not 1 <= k <= trained]
    if skipped:
        print(f"skipping k = {skipped}: outside [1, {trained}] (the checkpoint's mhc_sinkhorn_iters)")
    ks = [k for k in ks if 1 <= k <= trained]
    if not ks:
        raise UserError(f"--iters {text!r}: no k in [1, {trained}]")
    return ks


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    p.add_argument("--model-tag", default="", help="model tag of a trained mHC checkpoint (sinkhorn constraint)")
    p.add_argument("--checkpoint", default="", help="checkpoint directory (overrides --model-tag)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step of --model-tag (-1: the newest)")
    p.add_argument("--iters", default=DEFAULT_ITERS, help="comma-separated inference Sinkhorn iterations k")
    p.add_argument("--sequences", type=int, default=8, help="validation rows (the batch of every forward)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per row (0: the model's sequence_len)")
    p.add_argument("--data-source", default="", help="text source (default: the checkpoint's training source)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median)")
    p.add_argument("--out", default="results/bench/sinkhorn_inference.json", help="output JSON")
    args = p.parse_args(argv)
    if not args.checkpoint and not args.model_tag:
        raise UserError("pass --model-tag or --checkpoint of a trained mHC model")
    if args.sequences <= 0 or args.seq_len < 0 or args.repeats <= 0:
        raise UserError(f"--sequences and --repeats must be > 0 and --seq-len >= 0 (got {args.sequences}, "
                        f"{args.repeats}, {args.seq_len})")
    device_type = autodetect_device_type()
    device = torch.device(device_type)
    path = args.checkpoint or resolve_checkpoint(args.model_tag, args.step)
    model, meta = load_model(path, device)                                        # in eval mode
    model.set_inference_sinkhorn_iters(None)  # refuses a model without mHC, before any data is read
    trained = model.config.mhc.sinkhorn_iters
    ks = parse_iters(args.iters, trained)
    tokenizer = get_tokenizer()
    check_tokenizer(meta, tokenizer, path)
    seq_len = args.seq_len or model.config.sequence_len
    idx = val_tokens(meta, tokenizer, args.sequences, seq_len, args.data_source, device)

    exact_logits, exact_raw, exact_applied = measure(model, idx, None)
    per_k = {}
    for k in ks:
        logits, raw, applied = measure(model, idx, k)
        per_k[k] = dict(h_res_raw=raw, h_res_applied=applied, **compare(exact_logits, logits))
    del exact_logits

    settings = [None] + ks
    for k in settings:  # warm-up (allocator, caches)
        time_forward(model, idx, k, device_type), time_sinkhorn(model, idx.numel(), k, device)
    times: dict = {k: [] for k in settings}
    sinkhorn_times: dict = {k: [] for k in settings}
    for _ in range(args.repeats):
        for k in settings:
            times[k].append(time_forward(model, idx, k, device_type))
            sinkhorn_times[k].append(time_sinkhorn(model, idx.numel(), k, device))
    model.set_inference_sinkhorn_iters(None)
    for k in ks:
        ratios = [t / e for t, e in zip(times[k], times[None])]
        per_k[k].update(forward_ms=1e3 * statistics.median(times[k]), time_ratio=statistics.median(ratios),
                        time_ratio_range=[min(ratios), max(ratios)],
                        sinkhorn_ms=1e3 * statistics.median(sinkhorn_times[k]))
    exact_ms, exact_sinkhorn_ms = (1e3 * statistics.median(t) for t in (times[None], sinkhorn_times[None]))

    negligible = [k for k in ks if per_k[k]["max_abs_dlogits"] < NEGLIGIBLE_LOGIT_DELTA]
    recommended = negligible[0] if negligible else None
    print(f"{path}: {args.sequences} x {seq_len} validation tokens, trained with {trained} Sinkhorn iterations; "
          f"exact forward {exact_ms:.1f} ms, of which Sinkhorn {exact_sinkhorn_ms:.2f} ms ({device_type}, eager, "
          f"fp32)")
    print(f"{'k':>3} {'raw col err max':>15} {'mean':>9} {'raw row err max':>15} {'H_res col max':>13} "
          f"{'max|dlogit|':>11} {'mean KL':>9} {'greedy':>7} {'fwd time':>8} {'Sinkhorn ms':>11}")
    for k in ks:
        r = per_k[k]
        print(f"{k:>3} {r['h_res_raw']['col_max']:>15.2e} {r['h_res_raw']['col_mean']:>9.2e} "
              f"{r['h_res_raw']['row_max']:>15.2e} {r['h_res_applied']['col_max']:>13.2e} "
              f"{r['max_abs_dlogits']:>11.2e} {r['mean_kl']:>9.2e} {r['greedy_agreement']:>7.4f} "
              f"{r['time_ratio']:>7.3f}x {r['sinkhorn_ms']:>11.2f}")
    if recommended is None or recommended == trained:
        print(f"no k below {trained} keeps max |dlogits| < {NEGLIGIBLE_LOGIT_DELTA:g} (negligible) on this model: "
              f"stay exact (None, the default)")
    else:
        print(f"recommended: k = {recommended}, the smallest with negligible logit changes (max |dlogits| < "
              f"{NEGLIGIBLE_LOGIT_DELTA:g}), forward x{per_k[recommended]['time_ratio']:.3f} of exact. The default "
              f"stays exact (None); opt in with GPT.set_inference_sinkhorn_iters({recommended})")
    results = dict(trained_sinkhorn_iters=trained, sequences=args.sequences, seq_len=seq_len,
                   exact=dict(h_res_raw=exact_raw, h_res_applied=exact_applied, forward_ms=exact_ms,
                              sinkhorn_ms=exact_sinkhorn_ms),
                   per_k={str(k): v for k, v in per_k.items()}, negligible_max_abs_dlogits=NEGLIGIBLE_LOGIT_DELTA,
                   recommended_k=recommended)
    return write_record(args.out, "sinkhorn_inference", args, device_type, results, checkpoint=path)


if __name__ == "__main__":
    run_main(main)
