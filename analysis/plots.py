"""The paper's figures from the files the pipeline writes (seed 002 §4.2). Each function takes plain records and
writes one PNG, so the report, the notebooks and the tests call them alike.

- plot_training_curves: training loss (smoothed) and val bpb per step, one line per run (baseline vs mHC);
- plot_hres_over_training: each sub-layer's mean |H_res - I| and gate over training (base_train --mhc-log-every);
- plot_rl_gate_distribution: the gate values the RL policy chose on the held-out problems;
- plot_gate_vs_accuracy: per layer, each arm's gate against its accuracy (with the 95% CI);
- the gate sweep: analysis.gate_sweep.plot.
read_jsonl reads a metrics or records file and names the file and line of anything it cannot read.
"""
from __future__ import annotations

import json
import os

import numpy as np

from nanochat.common import UserError


def read_jsonl(path: str) -> list[dict]:
    """Every record of a JSON-lines file; a missing, empty or corrupt file is an error that names it."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i} is not valid JSON ({e.msg}); the file is corrupt") from None
    if not records:
        raise UserError(f"{path} is empty")
    return records


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 110):
    """Write a figure as PNG atomically (temp file + rename) and close it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=dpi)
    os.replace(path + ".tmp.png", path)
    pyplot().close(fig)


def _ema(values, alpha: float = 0.1):
    out, m = [], None
    for v in values:
        m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m)
    return out


def plot_training_curves(runs: dict, path: str, title: str = ""):
    """runs: label -> metrics records ({step, loss} per step, {step, val_bpb} per evaluation)."""
    if not runs:
        raise UserError("no runs to plot")
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, recs in runs.items():
        steps = [r for r in recs if "loss" in r]
        a.plot([r["step"] for r in steps], _ema([r["loss"] for r in steps]), label=label)
        vals = [r for r in recs if "val_bpb" in r]
        b.plot([r["step"] for r in vals], [r["val_bpb"] for r in vals], "o-", ms=3, label=label)
    a.set_xlabel("step")
    a.set_ylabel("training loss (EMA 0.1)")
    b.set_xlabel("step")
    b.set_ylabel("val bpb")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "training: baseline vs mHC", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_hres_over_training(records: list[dict], path: str, title: str = ""):
    """records: metrics records; those with an "mhc" list (one dict per sub-layer) are plotted."""
    logged = [r for r in records if "mhc" in r]
    if not logged:
        raise UserError("no mHC statistics in these metrics (train with --mhc-log-every N)")
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    steps = [r["step"] for r in logged]
    S = len(logged[0]["mhc"])
    cmap = plt.get_cmap("viridis", max(S, 2))
    for j in range(S):
        name = f"L{j // 2} {'attn' if j % 2 == 0 else 'mlp'}"
        a.plot(steps, [r["mhc"][j]["h_res_dist_identity"] for r in logged], "o-", ms=2, color=cmap(j), label=name)
        b.plot(steps, [r["mhc"][j]["gate"] for r in logged], "o-", ms=2, color=cmap(j), label=name)
    a.set_ylabel("mean |H_res - I|")
    b.set_ylabel("gate g")
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    a.legend(fontsize=6, ncol=2)
    fig.suptitle(title or "H_res over training, per sub-layer", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_rl_gate_distribution(gates, path: str, labels=None, title: str = ""):
    """gates: [problems, k] gate vectors the policy chose; one histogram per gate."""
    g = np.asarray(gates, dtype=np.float64)
    if g.ndim != 2 or not g.size:
        raise UserError(f"expected a [problems, gates] array of chosen gates (got shape {g.shape})")
    plt = pyplot()
    k = g.shape[1]
    fig, axes = plt.subplots(1, k, figsize=(min(3 * k, 14) + 1, 3), squeeze=False)
    for i in range(k):
        ax = axes[0, i]
        ax.hist(g[:, i], bins=np.linspace(0, 1, 21), color="tab:blue", alpha=0.8)
        ax.set_xlim(0, 1)
        ax.set_title(labels[i] if labels else f"gate {i}", fontsize=8)
        ax.set_xlabel("g")
    axes[0, 0].set_ylabel("problems")
    fig.suptitle(title or "gates the RL policy chose (held-out problems)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_gate_vs_accuracy(arms: dict, path: str, title: str = ""):
    """arms: name -> {"gates": [k] (one value per layer, or one global value), "acc": a, "ci95": [lo, hi]}. One
    panel per layer (a global gate counts for every layer)."""
    if not arms:
        raise UserError("no arms to plot")
    k = max(len(a["gates"]) for a in arms.values())
    plt = pyplot()
    fig, axes = plt.subplots(1, k, figsize=(min(3.2 * k, 14) + 1, 3.2), squeeze=False)
    for i in range(k):
        ax = axes[0, i]
        for name, a in arms.items():
            g = a["gates"][i] if len(a["gates"]) > 1 else a["gates"][0]
            lo, hi = a["ci95"]
            ax.errorbar([g], [a["acc"]], yerr=[[a["acc"] - lo], [hi - a["acc"]]], fmt="o", capsize=3, label=name)
        ax.set_xlim(-0.05, 1.05)
        ax.set_xlabel(f"gate of layer {i}" if k > 1 else "gate")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy (95% CI)")
    axes[0, -1].legend(fontsize=6, loc="best")
    fig.suptitle(title or "gate vs accuracy per arm", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def per_layer_gates(arm: dict, n_layer: int | None = None) -> list[float] | None:
    """An RL eval.json arm's gates as one value per layer: per-layer vectors as they are, per-sub-layer ones averaged
    over each layer's two sub-layers, a global gate as one value. None for the learned gates (no fixed value)."""
    g = arm.get("fixed_gates") or (arm.get("chosen_gates") or {}).get("mean")
    if g is None:
        return None
    if arm.get("action_space") == "per_sublayer":
        return [float(np.mean(g[2 * i:2 * i + 2])) for i in range(len(g) // 2)]
    return [float(x) for x in g]
