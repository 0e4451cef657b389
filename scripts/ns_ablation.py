"""Newton–Schulz ablation inside Muon (the NS formula study of docs/design.md, section 1): the same small GPT, data,
steps and learning rates for every variant of the NS iteration; only Muon's orthogonaliser changes.

    python -m scripts.ns_ablation --preset tiny                      # CPU, a few minutes, all variants
    python -m scripts.ns_ablation --preset gpu                       # one GPU
    python -m scripts.ns_ablation --preset tiny --variants baseline,more-iter --steps 50
    python -m scripts.ns_ablation --preset tiny --extra-variant "mine=3.2,-4.4,1.9"   # your own triple/schedule
    python -m scripts.ns_ablation --list                             # the variants and their definitions

Reads the pretokenized data and tokenizer of the current $NANOCHAT_BASE_DIR (`bash speedrun.sh` builds them; the
train split trains, the val split evaluates). Each finished variant is appended to
<out-dir>/runs.jsonl at once, so an interrupted run loses at most the variant in progress; a rerun skips the
variants already recorded with the same settings (--force redoes them). summary.md (ranked table) and
summary.json are rewritten after every variant. Default out-dir: results/ns_ablation/<preset>/.

Recorded per variant: val loss, next-token top-1 accuracy and perplexity on a fixed val slice, training wall time,
diverged (a non-finite train or val loss; training stops at the first one), and the NS quality of the variant: the
singular-value band of its output (i) over input s in [1e-3, 1] (a 256 x 1024 matrix U diag(s) V^T, raw iteration,
fp32) and (ii) on a seeded Gaussian 256 x 1024 matrix through the full normalised call.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from nanochat.common import UserError, autocast_ctx, repo_root, run_main
from nanochat.config import TrainConfig
from nanochat.dataloader import PackedLoader
from nanochat.dataset import tokenized_dir
from nanochat.gpt import GPT, GPTConfig, model_dims_from_depth
from nanochat.newton_schulz import (CUBIC, HANDOVER8, POLAR_EXPRESS5, QUINTIC, ns_schedule, odd_polynomial_iteration,
                                    polynomial_orthogonalize, resolve_ns_coeffs)
from nanochat.optim import apply_schedules, setup_optimizers
from nanochat.run_records import append_record, read_records, rewrite_records
from nanochat.tokenizer import get_tokenizer


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    formula: str             # what one step computes (A = X X^T)
    schedule: tuple          # per-step polynomial coefficients (k0, k1, ...) or callables, see odd_polynomial_iteration
    descending: bool = False  # evaluate the terms from the highest power down (the "reordered" variant)
    per_matrix: bool = False  # coefficients depend on each matrix (adaptive): orthogonalise one matrix at a time


def adaptive_coeffs(A: torch.Tensor) -> tuple[float, float, float]:
    """The NS study's "adaptive" rule: (a, b, c) nudged by the Frobenius norm of A = X X^T, from about (3.1, -4.3, 2.0)
    at ||A|| <= 1 to the quintic (3.4, -4.7, 2.03) for large ||A||. ||A||_F grows with the matrix's rank, so the rule
    is not size-free; it is kept as the study defined it."""
    n = A.float().norm().item()
    sig = lambda t: 1.0 / (1.0 + math.exp(-t))  # noqa: E731
    return 3.0 + 0.4 * sig(n - 2.0), -4.0 - 0.7 * sig(n - 1.5), 2.0 + 0.03 * sig(n - 3.0)


Q = QUINTIC
VARIANTS = {v.name: v for v in [
    Variant("baseline", "a X + (b A + c A^2) X, quintic (3.4445, -4.775, 2.0315), 5 steps", (Q,) * 5),
    Variant("more-iter", "quintic, 8 steps", (Q,) * 8),
    Variant("reordered", "(c A^2 + b A) X + a X, quintic, 5 steps: the same polynomial summed in reverse", (Q,) * 5,
            descending=True),
    Variant("adaptive", "(a, b, c) from ||X X^T||_F at every step (the study's rule, adaptive_coeffs), 5 steps",
            (adaptive_coeffs,) * 5, per_matrix=True),
    Variant("fewer-iter", "quintic, 3 steps", (Q,) * 3),
    Variant("alt-coeffs", "(2.5, -3.0, 1.8), 5 steps", ((2.5, -3.0, 1.8),) * 5),
    Variant("simple-coeffs", "(3, -4, 2), 5 steps", ((3.0, -4.0, 2.0),) * 5),
    Variant("no-cubic", "a X + b A X (A^2 term dropped), quintic a, b, 5 steps", ((Q[0], Q[1]),) * 5),
    Variant("no-quadratic", "a X + c A^2 X (A term dropped), quintic a, c, 5 steps", ((Q[0], 0.0, Q[2]),) * 5),
    Variant("only-linear", "a X (no orthogonalisation: the normalised momentum times 3.4445^5)", ((Q[0],),) * 5),
    Variant("diff-structure", "a X + b A X + c A^2 X + d X, (2.8, -3.5, 1.9, 0.5) = the triple (3.3, -3.5, 1.9), "
            "5 steps", ((2.8 + 0.5, -3.5, 1.9),) * 5),
    Variant("cubic", "preset cubic (3.0, -3.2, 1.2), 5 steps", (CUBIC,) * 5),
    Variant("polar_express5", "preset polar_express5 (5-step Polar Express schedule)", tuple(POLAR_EXPRESS5)),
    Variant("handover8", "preset handover8 (the 8-step schedule of the user's notes)", tuple(HANDOVER8)),
]}

PRESETS = {
    # a 2-core CPU: 2 layers x 128 wide, 4 x 128 tokens per step (the vocab-4096 head dominates the cost);
    # 100 steps (1-5 min per variant measured on this 2-core box while other jobs ran; less when idle)
    "tiny": dict(depth=2, aspect_ratio=64, head_dim=64, seq_len=128, batch_size=4, steps=100, eval_batches=32,
                 device="cpu", dtype="float32"),
    # one GPU: 8 layers x 512 wide (nanochat's aspect ratio), 1024-token rows, ~8 M tokens per variant
    "gpu": dict(depth=8, aspect_ratio=64, head_dim=64, seq_len=1024, batch_size=16, steps=500, eval_batches=40,
                device="cuda", dtype="bfloat16"),
}


def ns_quality(variant: Variant) -> dict:
    """Singular-value band of the variant's output: over s in [1e-3, 1] (raw iteration) and on a Gaussian matrix."""
    g = torch.Generator().manual_seed(0)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # float64 LAPACK is pathologically slow on 2 threads here (tests/test_newton_schulz.py)
    try:
        s = torch.logspace(-3, 0, 256, dtype=torch.float64)
        U, _ = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(1024, 256, generator=g, dtype=torch.float64))
        interval = odd_polynomial_iteration(((U * s) @ V.T).float(), variant.schedule, dtype=torch.float32,
                                            descending=variant.descending)
        gauss = polynomial_orthogonalize(torch.randn(256, 1024, generator=g), variant.schedule,
                                         dtype=torch.float32, descending=variant.descending)
        out = {}
        for key, X in (("band_interval", interval), ("band_gauss", gauss)):
            X = X.double()
            if not torch.isfinite(X).all():
                out[key] = None  # the iteration itself overflowed
                continue
            sv = torch.linalg.eigvalsh(X @ X.mT).clamp_min(0).sqrt()
            out[key] = [sv.min().item(), sv.max().item()]
        return out
    finally:
        torch.set_num_threads(saved)


def make_orthogonalizer(variant: Variant, dtype: torch.dtype):
    def ortho(update: torch.Tensor) -> torch.Tensor:
        if variant.per_matrix:
            return torch.stack([ortho_one(u) for u in update])
        return ortho_one(update)

    def ortho_one(u: torch.Tensor) -> torch.Tensor:
        return polynomial_orthogonalize(u, variant.schedule, dtype=dtype, descending=variant.descending)
    return ortho


def finite_or_none(x: float | None):
    return x if x is not None and math.isfinite(x) else None


def train_variant(variant: Variant, settings: dict, token_dir: str, vocab_size: int) -> dict:
    """Train the preset's model with Muon using `variant`; return the record (metrics, timing, status)."""
    defaults = TrainConfig()  # the learning rates and schedule of the main training script
    device = torch.device(settings["device"])
    ctx = autocast_ctx(device.type, settings["dtype"])
    ns_dtype = torch.bfloat16 if settings["dtype"] == "bfloat16" else torch.float32
    n_embd, n_head = model_dims_from_depth(settings["depth"], settings["aspect_ratio"], settings["head_dim"])
    config = GPTConfig(sequence_len=settings["seq_len"], vocab_size=vocab_size, n_layer=settings["depth"],
                       n_head=n_head, n_kv_head=n_head, n_embd=n_embd)
    torch.manual_seed(settings["seed"])  # the same initial weights for every variant
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    optimizers = setup_optimizers(
        model, embedding_lr=defaults.embedding_lr, unembedding_lr=defaults.unembedding_lr,
        matrix_lr=settings["matrix_lr"], scalar_lr=defaults.scalar_lr, weight_decay=defaults.weight_decay,
        orthogonalizer=make_orthogonalizer(variant, ns_dtype))
    train = PackedLoader(token_dir, "train", settings["batch_size"], settings["seq_len"], device=device,
                         seed=settings["seed"])
    steps = settings["steps"]
    losses, diverged_at = [], None
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = train.next_batch()
        with ctx:
            loss = model(x, y)
        loss.backward()
        apply_schedules(optimizers, step, steps, defaults.warmup_ratio, defaults.warmdown_ratio,
                        defaults.final_lr_frac)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss = loss.item()
        losses.append(loss)
        if not math.isfinite(loss):
            diverged_at = step
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.perf_counter() - t0

    val_loss = accuracy = None
    if diverged_at is None:
        val = PackedLoader(token_dir, "val", settings["batch_size"], settings["seq_len"], device=device,
                           seed=settings["seed"])
        loss_sum, correct, count = 0.0, 0, 0
        model.eval()
        with torch.no_grad():
            for _ in range(settings["eval_batches"]):
                x, y = val.next_batch()
                with ctx:
                    logits = model(x).float()
                mask = y >= 0  # -1 marks positions without a target
                loss_sum += F.cross_entropy(logits[mask], y[mask], reduction="sum").item()
                correct += (logits.argmax(-1)[mask] == y[mask]).sum().item()
                count += mask.sum().item()
        val_loss, accuracy = loss_sum / count, correct / count
        if not math.isfinite(val_loss):
            diverged_at = steps
    ok = diverged_at is None
    return dict(
        variant=variant.name, formula=variant.formula, ns_steps=len(variant.schedule),
        status="ok" if ok else "diverged", diverged=not ok, diverged_at_step=diverged_at,
        val_loss=finite_or_none(val_loss) if ok else None, val_accuracy=accuracy if ok else None,
        val_perplexity=finite_or_none(math.exp(val_loss)) if ok and val_loss < 700 else None,
        final_train_loss=finite_or_none(losses[-1]) if losses else None, steps_done=len(losses),
        train_time_s=train_time, time_per_step_ms=1000 * train_time / max(1, len(losses)), **ns_quality(variant))


# ---------------------------------------------------------------------------------------------------------------
# records, resume, summary

def fmt_band(band) -> str:
    if band is None:
        return "overflow"
    return "[" + ", ".join(f"{v:.3f}" if v < 1e3 else f"{v:.1e}" for v in band) + "]"


CHANCE_MARGIN = 0.01  # nats: a val loss this close to ln V is the uniform prediction, up to rounding


def write_summary(out_dir: str, records: list[dict], settings: dict, chance_loss: float):
    """Ranked by val loss, diverged last. A finite val loss no better than chance_loss = ln(vocab) (the uniform
    prediction) is marked "no learning": the update destroyed the model without producing NaNs."""
    ranked = sorted(records, key=lambda r: (r["diverged"], r["val_loss"] if r["val_loss"] is not None else 0.0))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(dict(settings=settings, chance_loss=chance_loss, ranked=ranked), f, indent=2)
    base = next((r for r in records if r["variant"] == "baseline" and not r["diverged"]), None)
    lines = [f"# Newton–Schulz ablation, preset `{settings['preset']}`", "",
             f"{settings['steps']} steps, depth {settings['depth']}, seq {settings['seq_len']}, batch "
             f"{settings['batch_size']}, Muon LR {settings['matrix_lr']}, {settings['dtype']} on {settings['device']}, "
             f"val on {settings['eval_batches']} batches; NS band: output singular values for input s in [1e-3, 1] "
             f"and on a Gaussian 256x1024 matrix (fp32). Settings hash `{settings['hash']}`.", "",
             "| rank | variant | steps | val loss | Δ vs baseline | val acc | val ppl | NS band s∈[1e-3,1] | "
             "NS band Gaussian | train s | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(ranked, 1):
        ok = not r["diverged"]
        delta = f"{r['val_loss'] - base['val_loss']:+.4f}" if ok and base else "—"
        status = f"diverged at step {r['diverged_at_step']}" if not ok else \
            f"no learning (val loss >= ln V = {chance_loss:.2f})" if r["val_loss"] >= chance_loss - CHANCE_MARGIN \
            else "ok"
        lines.append(f"| {i} | {r['variant']} | {r['ns_steps']} | {r['val_loss']:.4f} | {delta} | "
                     f"{r['val_accuracy']:.4f} | {r['val_perplexity']:.2f} | " if ok else
                     f"| {i} | {r['variant']} | {r['ns_steps']} | — | — | — | — | ")
        lines[-1] += (f"{fmt_band(r['band_interval'])} | {fmt_band(r['band_gauss'])} | {r['train_time_s']:.1f} | "
                      f"{status} |")
    lines += ["", "Variants:", ""] + [f"- `{r['variant']}`: {r['formula']}" for r in ranked]
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def parse_extra_variant(spec: str) -> Variant:
    name, sep, literal = spec.partition("=")
    name = name.strip()
    if not sep or not name or not literal.strip():
        raise UserError(f"--extra-variant wants NAME=COEFFS (e.g. mine=3.2,-4.4,1.9), got {spec!r}")
    if name in VARIANTS:
        raise UserError(f"--extra-variant name {name!r} is a built-in variant; choose another name")
    try:
        schedule = ns_schedule(resolve_ns_coeffs(literal))
    except UserError as e:
        raise UserError(f"--extra-variant {spec!r}: {e}") from e
    return Variant(name, f"user coefficients {literal.strip()} ({len(schedule)} steps)", tuple(schedule))


def main(argv=None):
    p = argparse.ArgumentParser(description="Newton–Schulz ablation inside Muon (see the module docstring)",
                                allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--variants", default="all", help="comma-separated variant names, or 'all' (see --list)")
    p.add_argument("--extra-variant", action="append", default=[], metavar="NAME=COEFFS",
                   help="also run a triple or schedule of your own (a preset name, 'a,b,c' or JSON); repeatable")
    for name in ("steps", "depth", "seq_len", "batch_size", "eval_batches"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"override the preset's {name}")
    p.add_argument("--matrix-lr", type=float, default=None, help="Muon LR (default: TrainConfig's matrix_lr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="override the preset's device (cpu | cuda)")
    p.add_argument("--out-dir", default=None, help="default: results/ns_ablation/<preset>")
    p.add_argument("--force", action="store_true", help="redo the selected variants even if recorded")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    args = p.parse_args(argv)

    variants = dict(VARIANTS)
    for spec in args.extra_variant:
        v = parse_extra_variant(spec)
        variants[v.name] = v
    if args.list:
        for v in variants.values():
            print(f"{v.name:16s} {v.formula}")
        return
    if args.variants == "all":
        selected = list(variants)
    else:
        selected = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in selected if v not in variants]
        if unknown or not selected:
            raise UserError(f"--variants: unknown {', '.join(unknown) or '(none given)'} "
                            f"(known: {', '.join(variants)})")
        selected += [v.name for v in map(parse_extra_variant, args.extra_variant) if v.name not in selected]

    settings = dict(PRESETS[args.preset], preset=args.preset, seed=args.seed,
                    matrix_lr=args.matrix_lr if args.matrix_lr is not None else TrainConfig().matrix_lr)
    for name in ("steps", "depth", "seq_len", "batch_size", "eval_batches"):
        if getattr(args, name) is not None:
            if getattr(args, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
            settings[name] = getattr(args, name)
    if args.device:
        settings["device"] = args.device
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        raise UserError("--preset gpu needs CUDA; use --preset tiny (or --device cpu) on this machine")
    tokenizer = get_tokenizer()
    token_dir = tokenized_dir("local" if args.preset == "tiny" else "fineweb", tokenizer)
    if not os.path.isdir(token_dir):  # the GPU preset falls back to the local corpus when FineWeb is absent
        token_dir = tokenized_dir("local", tokenizer)
    settings["data"] = os.path.basename(os.path.dirname(token_dir.rstrip("/"))) + "/" + os.path.basename(token_dir)
    settings["tokenizer"] = tokenizer.fingerprint
    settings["hash"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]

    out_dir = args.out_dir or os.path.join(repo_root(), "results", "ns_ablation", args.preset)
    os.makedirs(out_dir, exist_ok=True)
    runs_path = os.path.join(out_dir, "runs.jsonl")
    records = read_records(runs_path, repair=True)
    stale = sorted({r.get("settings_hash") for r in records} - {settings["hash"]})
    if stale:
        raise UserError(f"{runs_path} holds runs with other settings (hash {', '.join(map(str, stale))}, now "
                        f"{settings['hash']}); pass another --out-dir, or delete the file to start over")
    if args.force:
        records = [r for r in records if r["variant"] not in selected]
        rewrite_records(runs_path, records)
    done = {r["variant"] for r in records}
    chance_loss = math.log(tokenizer.vocab_size)
    print(f"NS ablation, preset {args.preset} (hash {settings['hash']}): {len(selected)} variants, "
          f"{len(done & set(selected))} already done -> {out_dir}")
    for name in selected:
        if name in done:
            print(f"  {name}: already recorded, skipped (--force redoes it)")
            continue
        record = train_variant(variants[name], settings, token_dir, tokenizer.vocab_size)
        record["settings_hash"] = settings["hash"]
        append_record(runs_path, record)  # on disk at once: a crash later loses nothing recorded here
        records.append(record)
        write_summary(out_dir, records, settings, chance_loss)
        val = f"val loss {record['val_loss']:.4f}" if record["val_loss"] is not None else "no val loss"
        print(f"  {name}: {record['status']}, {val}, {record['train_time_s']:.1f} s")
    write_summary(out_dir, records, settings, chance_loss)
    print(f"summary: {os.path.join(out_dir, 'summary.md')}")


if __name__ == "__main__":
    run_main(main)
