"""Does the mHC gate matter? Val bpb and the dense GSM8K-format reward as the gate moves, before any RL runs.

    python -m analysis.gate_sweep --model-tag tiny_mhc_sft --problems synthetic --synthetic-mix mixed
    python -m analysis.gate_sweep --model-tag mhc_sft --problems gsm8k --per-layer-grid 0,0.5,1

- global: every sub-layer's gate set to g for g in --grid (default 0, 0.1, ..., 1): the exact 1-D oracle of the
  controller's `global` action space (the RL's grid baseline searches the same grid with its reward);
- per layer: one layer's two gates moved over --per-layer-grid, every other gate at its learned value;
- the learned gates themselves, as the reference.
Val bpb is measured on the same validation tokens for every point, the dense reward (mean per-token log-probability
of the gold answer, envs/gsm8k_env.py) on the same problems. Output: <results>/<tag>/gate_sweep.json and
gate_sweep.png.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from analysis.plots import pyplot, save_figure
from envs.mhc_env import GateScorer, build_problem_pool, load_frozen_model
from nanochat.common import (doc_summary, UserError, autodetect_device_type, check_name, git_commit, resolve_precision,
                             run_main)
from nanochat.config import check_synthetic_mix, parse_gate_values, parse_int_list
from nanochat.dataloader import PackedLoader
from nanochat.dataset import pretokenize, tokenized_dir
from nanochat.loss_eval import evaluate_bpb

DEFAULT_GRID = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"


def sweep(scorer: GateScorer, batches, token_bytes, problems, grid, per_layer_grid, ctx) -> dict:
    """Every point: (val bpb, mean dense reward). Gate vectors are per sub-layer [2L]."""
    model = scorer.model
    learned = np.asarray(scorer.default_gates("per_sublayer"), dtype=np.float32)
    L = model.config.n_layer

    def point(gates):  # gates: [2L] or None (learned)
        g = None if gates is None else np.tile(np.asarray(gates, np.float32)[None], (len(problems), 1))
        dense = [r["dense"] for r in scorer.score(problems, g, metrics=("dense",), action_space="per_sublayer")]
        if gates is None:
            model.clear_mhc_gates()
        else:
            model.set_mhc_gates_per_sublayer(gates)
        try:
            bpb = evaluate_bpb(scorer.scoring_model, iter(batches), token_bytes, ctx)
        finally:
            model.clear_mhc_gates()
        return dict(val_bpb=bpb, dense=float(np.mean(dense)), dense_std=float(np.std(dense)))

    out = dict(learned=dict(gates=learned.tolist(), **point(None)), global_gate=[], per_layer=[])
    for g in grid:
        out["global_gate"].append(dict(gate=g, **point(np.full(2 * L, g, np.float32))))
        print(f"global g={g:.2f}: val bpb {out['global_gate'][-1]['val_bpb']:.4f}, dense "
              f"{out['global_gate'][-1]['dense']:+.4f}", flush=True)
    for layer in range(L):
        rows = []
        for g in per_layer_grid:
            gates = learned.copy()
            gates[2 * layer:2 * layer + 2] = g
            rows.append(dict(gate=g, **point(gates)))
        out["per_layer"].append(dict(layer=layer, points=rows))
        print(f"layer {layer}: val bpb " + ", ".join(f"{r['gate']:.2f}->{r['val_bpb']:.4f}" for r in rows),
              flush=True)
    return out


def sweep_label(result: dict) -> str:
    """A short name for the swept checkpoint: its model tag (the checkpoint's folder) and step, not its path."""
    ckpt = os.path.normpath(str(result.get("checkpoint", "")))
    tag = result.get("model_tag") or os.path.basename(os.path.dirname(ckpt)) or os.path.basename(ckpt)
    return f"{tag} (step {result['step']})" if result.get("step") is not None else tag


def plot(result: dict, path: str, title: str = ""):
    """Val bpb and dense reward against the gate: the global gate, each layer alone, the learned gates. Returns the
    figure."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")  # no label runs into the title
    layers = result["per_layer"]
    # every series its own colour and marker: black for the global gate, red for the learned gates, the layers
    # from a palette without those two (tab10 has 8 others; a sequential colormap beyond that)
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i not in (3, 7)]  # not red, not grey
    if len(layers) > len(palette):
        palette = [plt.get_cmap("viridis")(x) for x in np.linspace(0, 0.9, len(layers))]
    markers = "s^vDP<>Xhpd*"
    for ax, key, label in ((axes[0], "val_bpb", "val bpb (lower is better)"),
                           (axes[1], "dense", "dense reward: mean log p(gold answer)\n(higher is better)")):
        xs = [p["gate"] for p in result["global_gate"]]
        ax.plot(xs, [p[key] for p in result["global_gate"]], "o-", color="k", lw=2, label="global gate")
        for i, row in enumerate(layers):
            ax.plot([p["gate"] for p in row["points"]], [p[key] for p in row["points"]], ls="--", lw=1, ms=4,
                    marker=markers[i % len(markers)], color=palette[i], label=f"layer {row['layer']} only")
        ax.axhline(result["learned"][key], color="tab:red", ls=":", lw=1.5, label="learned gates")
        ax.set_xlabel("gate g  (0: H_res = I, 1: full learned mixing)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside right upper")  # outside: covers none of the curves
    fig.suptitle(title or f"gate sweep: {sweep_label(result)}", fontsize=10)
    save_figure(fig, path, dpi=120)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    p.add_argument("--model-tag", default="", help="model tag of an mHC checkpoint")
    p.add_argument("--checkpoint", default="", help="checkpoint directory (overrides --model-tag/--step)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1 = the newest)")
    p.add_argument("--grid", default=DEFAULT_GRID, help="global gate values (default: 0, 0.1, ..., 1)")
    p.add_argument("--per-layer-grid", default=DEFAULT_GRID, help="values for one layer's gates at a time "
                   "('none' skips the per-layer sweep)")
    p.add_argument("--tokens", type=int, default=16384, help="validation tokens per point (the same for all)")
    p.add_argument("--problems", default="gsm8k", choices=["gsm8k", "synthetic"], help="dense-reward problems")
    p.add_argument("--num-problems", type=int, default=64, help="problems per point (the same for all)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="GSM8K split")
    p.add_argument("--synthetic-seed", type=int, default=1, help="synthetic: generator seed")
    p.add_argument("--synthetic-steps", default="1,2", help="synthetic: operations per problem, choices")
    p.add_argument("--synthetic-max-value", type=int, default=20, help="synthetic: largest operand")
    p.add_argument("--synthetic-ops", default="+-", help="synthetic: operations, any of + - * /")
    p.add_argument("--synthetic-mix", default="", help="synthetic: a named mixture of difficulty tiers (mixed), "
                   "instead of the three knobs above")
    p.add_argument("--task-data", default="auto", choices=["auto", "hub", "local"], help="GSM8K data source")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (bpb) / 4x for problems")
    p.add_argument("--device-type", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if present")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                   help="torch.compile the scoring forward (bpb and dense reward): auto = on CUDA only")
    p.add_argument("--results-dir", default="results", help="output: <results-dir>/<model-tag>/gate_sweep.*")
    p.add_argument("--out", default="", help="output JSON path (the PNG goes beside it)")
    args = p.parse_args(argv)
    check_name("--model-tag", args.model_tag)  # it names the results folder
    if args.tokens <= 0 or args.num_problems <= 0 or args.batch_size <= 0:
        raise UserError(f"--tokens, --num-problems and --batch-size must be > 0 (got {args.tokens}, "
                        f"{args.num_problems}, {args.batch_size})")
    check_synthetic_mix(args.synthetic_mix)
    grid = parse_gate_values(args.grid, "--grid")
    per_layer_grid = [] if args.per_layer_grid.strip() in ("", "none") else parse_gate_values(args.per_layer_grid,
                                                                                                "--per-layer-grid")
    if args.device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda: no CUDA device is available here (use auto or cpu)")
    device = torch.device(autodetect_device_type() if args.device_type == "auto" else args.device_type)

    t0 = time.perf_counter()
    model, tokenizer, path, meta = load_frozen_model(args.checkpoint, args.model_tag, args.step, device)
    dtype, use_compile, ctx = resolve_precision(device.type, "auto", args.compile)
    scorer = GateScorer(model, tokenizer, action_space="per_sublayer", reward="dense", max_new_tokens=1,
                        batch_size=4 * args.batch_size, dtype=dtype, compile=use_compile)  # dense only: no generation
    train_cfg = meta.get("run_config", {}).get("train", {})
    source = train_cfg.get("data_source") or "fineweb"
    pretokenize(source, tokenizer)
    T = model.config.sequence_len
    loader = PackedLoader(tokenized_dir(source, tokenizer), "val", args.batch_size, T, device=device,
                          seed=train_cfg.get("seed", 0))
    batches = [loader.next_batch() for _ in range(max(1, args.tokens // (args.batch_size * T)))]
    kw = dict(count=args.num_problems, seed=args.synthetic_seed) if args.problems == "synthetic" else \
        dict(split=args.split, count=args.num_problems, seed=0, task_data=args.task_data)
    if args.problems == "synthetic":
        kw.update(synthetic_steps=parse_int_list(args.synthetic_steps, "synthetic-steps"),
                  synthetic_max_value=args.synthetic_max_value, synthetic_ops=args.synthetic_ops,
                  synthetic_mix=args.synthetic_mix)
    problems, pool = build_problem_pool(scorer, args.problems, **kw)

    result = sweep(scorer, batches, tokenizer.token_bytes().to(device), problems, grid, per_layer_grid, ctx)
    result.update(checkpoint=path, step=meta["step"], tokens=len(batches) * args.batch_size * T, problems=pool,
                  git_commit=git_commit(), seconds=time.perf_counter() - t0)
    best = min(result["global_gate"], key=lambda r: r["val_bpb"])
    print(f"learned gates: val bpb {result['learned']['val_bpb']:.4f}, dense {result['learned']['dense']:+.4f}; "
          f"best global gate by bpb: {best['gate']} ({best['val_bpb']:.4f})")
    tag = args.model_tag or os.path.basename(os.path.dirname(path))
    out = args.out or os.path.join(args.results_dir, tag, "gate_sweep.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(out + ".tmp", out)
    plot(result, os.path.splitext(out)[0] + ".png")
    print(f"wrote {out} and {os.path.splitext(out)[0] + '.png'}")
    return result


if __name__ == "__main__":
    run_main(main)
