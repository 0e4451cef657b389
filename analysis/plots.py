"""The paper's figures from the files the pipeline writes (phase 4 of the plan, docs/design.md). Each function takes
plain records and writes one PNG, so the report, the notebooks and the tests call them alike.

- plot_training_curves: training loss (smoothed) and val bpb per step, one line per run (baseline vs mHC);
- plot_hres_over_training: each sub-layer's mean |H_res - I| and gate over training (base_train --mhc-log-every);
- plot_rl_gate_distribution: the gate values the RL policy chose on the held-out problems;
- plot_gate_vs_accuracy: per layer, each arm's gate against its accuracy and dense reward (95% CIs), the
  reference arm "default" included;
- the gate sweep: analysis.gate_sweep.plot.
read_jsonl reads a metrics or records file and names the file and line of anything it cannot read.
"""
from __future__ import annotations

import json
import os
import textwrap

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
    # bbox "tight": legends and colour bars placed outside the axes, and descenders of bottom labels, stay inside
    fig.savefig(path + ".tmp.png", dpi=dpi, bbox_inches="tight", pad_inches=0.08)
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


def plot_rl_gate_distribution(gates, path: str, labels=None, title: str = "", default_gates=None):
    """gates: [problems, k] gate vectors the policy chose; one histogram per gate. default_gates: the learned
    defaults [k] (the reference arm "default"), drawn as a line in every panel when given. Returns the figure."""
    g = np.asarray(gates, dtype=np.float64)
    if g.ndim != 2 or not g.size:
        raise UserError(f"expected a [problems, gates] array of chosen gates (got shape {g.shape})")
    plt = pyplot()
    k = g.shape[1]
    fig, axes = plt.subplots(1, k, figsize=(max(min(3 * k, 14) + 1, 5.5), 3), squeeze=False, layout="constrained")
    for i in range(k):
        ax = axes[0, i]
        ax.hist(g[:, i], bins=np.linspace(0, 1, 21), color="tab:blue", alpha=0.8, label="rl_policy (chosen)")
        if default_gates is not None:
            ax.axvline(default_gates[i] if len(default_gates) > 1 else default_gates[0], color="k", ls="--",
                       label="default (learned gates)")
        ax.set_xlim(0, 1)
        ax.set_title(labels[i] if labels else f"gate {i}", fontsize=8)
        ax.set_xlabel("g")
    axes[0, 0].set_ylabel("problems")
    if default_gates is not None:  # outside the axes: inside, it covered the histogram's bars
        fig.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=7, loc="outside right center")
    fig.suptitle(title or "gates the RL policy chose (held-out problems)", fontsize=9)
    save_figure(fig, path)
    return fig


REFERENCE_ARM = "default"  # the learned gates: every RL comparison is against it (scripts/train_rl.py)
ARM_MARKERS = "osD^vPX<>hp*d"


def arm_point(name: str, arm: dict, default_gates=None) -> dict:
    """One arm as {gates (per layer, or None: not one known value), acc, acc_ci, dense, dense_ci}, from either the
    plot's own form {"gates", "acc", "ci95", optional "dense", "dense_ci95"} or an RL eval.json arm
    ({"exact": {acc, ci95}, "dense": {mean, ci95}, fixed_gates / chosen_gates, action_space}). The reference arm's
    gates are `default_gates` (eval.json's default_gates, in the arm's action space) when given."""
    if "exact" in arm:
        gates = per_layer_gates(arm)
        if gates is None and name == REFERENCE_ARM and default_gates is not None:
            gates = per_layer_gates(dict(fixed_gates=list(default_gates), action_space=arm.get("action_space")))
        dense = arm.get("dense") or {}
        return dict(gates=gates, acc=arm["exact"].get("acc"), acc_ci=arm["exact"].get("ci95"),
                    dense=dense.get("mean"), dense_ci=dense.get("ci95"))
    gates = arm.get("gates")
    if gates is None and name == REFERENCE_ARM and default_gates is not None:
        gates = list(default_gates)
    return dict(gates=None if gates is None else [float(x) for x in gates], acc=arm.get("acc"),
                acc_ci=arm.get("ci95"), dense=arm.get("dense"), dense_ci=arm.get("dense_ci95"))


def dodge(xs: list[float], step: float = 0.03, tol: float = 0.02) -> list[float]:
    """Shift points whose x values lie within `tol` of each other apart by `step`, centred on their x, so that
    arms at the same gate (e.g. the grid's best at g = 0 and the gate0 arm) do not hide one another."""
    out = list(xs)
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    group = []
    for i in order + [None]:
        if group and (i is None or xs[i] - xs[group[0]] > tol):
            for r, j in enumerate(group):
                out[j] = xs[j] + (r - (len(group) - 1) / 2) * step
            group = []
        if i is not None:
            group.append(i)
    return out


def plot_gate_vs_accuracy(arms: dict, path: str, title: str = "", default_gates=None, max_layer_panels: int = 6):
    """Each arm's gate against its exact-match accuracy (top row) and its dense reward (bottom row), with 95% CIs,
    one column per layer (a global gate counts for every layer; above max_layer_panels layers, one column against
    the mean gate over layers). arms: name -> an RL eval.json arm or {"gates", "acc", "ci95", optional "dense",
    "dense_ci95"}; see arm_point. The reference arm "default" is also drawn as a dashed line with its CI band in
    every panel (its learned gates are no single value unless default_gates is given). Points at the same gate are
    dodged apart (the caption says by how much). Returns the figure."""
    if not arms:
        raise UserError("no arms to plot")
    pts = {name: arm_point(name, a, default_gates) for name, a in arms.items()}
    names = sorted(pts, key=lambda n: n != REFERENCE_ARM)  # the reference first, the rest in the given order
    k = max([len(p["gates"]) for p in pts.values() if p["gates"]] or [1])
    per_layer = k <= max_layer_panels
    cols = k if per_layer else 1
    plt = pyplot()
    width = min(3.0 * cols, 15) + 2.2 if cols > 1 else 6.0
    fig, axes = plt.subplots(2, cols, figsize=(width, 5.6), squeeze=False, sharey="row", layout="constrained")
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    style = {name: dict(color=cmap(i % cmap.N), marker=ARM_MARKERS[i % len(ARM_MARKERS)])
             for i, name in enumerate(names)}
    step = 0.03
    rows = (("acc", "acc_ci", "exact-match accuracy (95% CI)"), ("dense", "dense_ci", "dense reward (95% CI)\n"
                                                                   "mean log p(gold answer), higher is better"))
    for r, (key, ci_key, ylabel) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            drawn = [n for n in names if pts[n]["gates"] is not None and pts[n][key] is not None]
            if per_layer:
                xs = [pts[n]["gates"][c] if len(pts[n]["gates"]) > 1 else pts[n]["gates"][0] for n in drawn]
            else:
                xs = [float(np.mean(pts[n]["gates"])) for n in drawn]
            for n, x in zip(drawn, dodge(xs, step)):
                p, st = pts[n], style[n]
                lo, hi = p[ci_key] or (p[key], p[key])
                ax.errorbar([x], [p[key]], yerr=[[p[key] - lo], [hi - p[key]]], fmt=st["marker"], color=st["color"],
                            ms=8 if n == REFERENCE_ARM else 6, mfc="none" if n == REFERENCE_ARM else st["color"],
                            mew=1.5, capsize=3, label=n, zorder=3)
            ref = pts.get(REFERENCE_ARM)
            if ref is not None and ref[key] is not None:  # the reference level, whether or not its gates are known
                ax.axhline(ref[key], color=style[REFERENCE_ARM]["color"], ls="--", lw=1, zorder=1,
                           label=f"{REFERENCE_ARM}: level and 95% CI band")
                if ref[ci_key]:
                    ax.axhspan(*ref[ci_key], color=style[REFERENCE_ARM]["color"], alpha=0.12, lw=0, zorder=0)
            if not drawn and ref is None:
                ax.text(0.5, 0.5, f"no {'dense reward' if key == 'dense' else 'accuracy'} in the input",
                        transform=ax.transAxes, ha="center", fontsize=8)
            ax.set_xlim(-0.08, 1.08)
            ax.grid(alpha=0.3)
            if r == 1:
                ax.set_xlabel(f"gate of layer {c}" if per_layer and k > 1 else
                              "gate" if k == 1 else "mean gate over layers")
        axes[r, 0].set_ylabel(ylabel, fontsize=8)
    # one legend for the figure, outside the axes: every arm, the reference first
    seen = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="outside right center", fontsize=7, title="arm",
               title_fontsize=7)
    fig.suptitle(title or "gate vs accuracy and dense reward per arm", fontsize=9)
    ref_note = (f"Dashed line and band: the reference arm '{REFERENCE_ARM}' (learned gates) and its CI."
                if REFERENCE_ARM in pts else f"The reference arm '{REFERENCE_ARM}' was not given.")
    caption = (f"Bars: 95% CI. {ref_note} Arms at the same gate are shifted apart by {step} per arm so none is "
               f"hidden.")
    fig.text(0.01, 0.0, textwrap.fill(caption, int(width * 16)), fontsize=7, ha="left", va="top")  # fits the width
    save_figure(fig, path)
    return fig


def per_layer_gates(arm: dict, n_layer: int | None = None) -> list[float] | None:
    """An RL eval.json arm's gates as one value per layer: per-layer vectors as they are, per-sub-layer ones averaged
    over each layer's two sub-layers, a global gate as one value. None for the learned gates (no fixed value)."""
    g = arm.get("fixed_gates") or (arm.get("chosen_gates") or {}).get("mean")
    if g is None:
        return None
    if arm.get("action_space") == "per_sublayer":
        return [float(np.mean(g[2 * i:2 * i + 2])) for i in range(len(g) // 2)]
    return [float(x) for x in g]
