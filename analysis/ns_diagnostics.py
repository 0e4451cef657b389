"""Newton–Schulz diagnostics (the NS side study, docs/design.md section 1): how each coefficient preset moves
singular values, step by step.

    python -m analysis.ns_diagnostics                          # -> results/ns_diagnostics/*.png + ns_diagnostics.json
    python -m analysis.ns_diagnostics --out-dir /tmp/ns --presets quintic,handover8

Figures (matplotlib, Agg):
  ns_sv_trajectories.png   one panel per preset: singular values of the iterate X_k against the step k, for an
                           input with singular values log-spaced over [1e-3, 1] (fp32); the grey band is [0.7, 1.3]
  ns_spectral_distance.png ||X_k X_k^T - I||_2 = max_i |s_i^2 - 1| against k, fp32 (solid) and bf16 (dashed)
  ns_polynomial_maps.png   the composed scalar map s -> p_K(...p_1(s)) over s in [1e-4, 1] (float64): the band each
                           preset reaches, and why a sliced schedule (handover8 cut to 5) is bad
The numbers behind them (final band and distance per preset) go to ns_diagnostics.json.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from nanochat.common import UserError, repo_root, run_main
from nanochat.newton_schulz import HANDOVER8, PRESETS, ns_schedule, odd_polynomial_iteration


def test_matrix(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """A wide [m, n] matrix U diag(s) V^T with s log-spaced in [1e-3, 1]: the whole range a normalised input spans."""
    rng = np.random.default_rng(seed)
    s = np.logspace(-3, 0, m)
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    V, _ = np.linalg.qr(rng.standard_normal((n, m)))
    return torch.from_numpy((U * s) @ V.T).float(), s


def singular_values(X: torch.Tensor) -> np.ndarray:
    X = X.double().numpy()
    return np.sqrt(np.clip(np.linalg.eigvalsh(X @ X.T), 0, None))[::-1]  # descending


def trajectory(X0: torch.Tensor, schedule, dtype) -> list[np.ndarray]:
    """Singular values of X_0 (the input), X_1, ..., X_K."""
    iterates = []
    odd_polynomial_iteration(X0, schedule, dtype=dtype, iterates=iterates)
    return [singular_values(X0)] + [singular_values(X) for X in iterates]


def scalar_map(s: np.ndarray, schedule) -> np.ndarray:
    for a, b, c in schedule:
        s = a * s + b * s**3 + c * s**5
    return s


def main(argv=None):
    p = argparse.ArgumentParser(description="Newton–Schulz singular-value diagnostics -> PNG figures",
                                allow_abbrev=False)
    p.add_argument("--out-dir", default=os.path.join(repo_root(), "results", "ns_diagnostics"))
    p.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated, from {', '.join(PRESETS)}")
    p.add_argument("--size", default="128x512", help="test matrix rows x cols (wide)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise UserError(f"--presets: unknown {', '.join(unknown) or '(none)'} (known: {', '.join(PRESETS)})")
    try:
        m, n = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must look like 128x512 (got {args.size!r})") from None
    if not 2 <= m <= n:
        raise UserError(f"--size needs 2 <= rows <= cols (got {m}x{n})")

    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    torch.set_num_threads(1)  # small float64 linear algebra: one thread is much faster on this 2-core box
    os.makedirs(args.out_dir, exist_ok=True)
    X0, _ = test_matrix(m, n)
    schedules = {name: ns_schedule(PRESETS[name]) for name in names}
    traj = {name: trajectory(X0, sched, torch.float32) for name, sched in schedules.items()}
    traj_bf16 = {name: trajectory(X0, sched, torch.bfloat16) for name, sched in schedules.items()}
    colors = dict(zip(names, plt.cm.tab10.colors))

    # 1. singular-value trajectories
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), sharey=True, squeeze=False)
    picks = np.unique(np.linspace(0, m - 1, 12).round().astype(int))  # 12 singular values spread over the range
    for ax, name in zip(axes[0], names):
        S = np.stack(traj[name])  # [K + 1, m]
        ax.axhspan(0.7, 1.3, color="0.9")
        ax.axhline(1.0, ls="--", c="k", lw=0.8)
        for i in picks:
            ax.plot(range(len(S)), S[:, i], marker="o", ms=3, lw=1, color=plt.cm.viridis(i / (m - 1)))
        ax.set_yscale("log")
        ax.set_ylim(5e-4, 3)
        ax.set_xticks(range(len(S)))
        ax.set_xlabel("NS step k")
        ax.set_title(f"{name}: final [{S[-1].min():.3f}, {S[-1].max():.3f}]", fontsize=10)
    axes[0][0].set_ylabel("singular values of $X_k$ (input: $10^{-3}$ … 1)")
    fig.suptitle(f"Singular-value trajectories, fp32, {m}x{n} input (colour: input s, dark = large, yellow = small)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "ns_sv_trajectories.png"), dpi=110)
    plt.close(fig)

    # 2. spectral distance ||X_k X_k^T - I||_2 per step
    fig, ax = plt.subplots(figsize=(7, 4.5))
    summary = {}
    for name in names:
        d32 = [np.abs(S**2 - 1).max() for S in traj[name]]
        d16 = [np.abs(S**2 - 1).max() for S in traj_bf16[name]]
        ax.plot(range(len(d32)), d32, "o-", color=colors[name], label=f"{name} (fp32)")
        ax.plot(range(len(d16)), d16, "x--", color=colors[name], alpha=0.7, label=f"{name} (bf16)")
        summary[name] = dict(steps=len(schedules[name]), band_fp32=[traj[name][-1].min(), traj[name][-1].max()],
                             band_bf16=[traj_bf16[name][-1].min(), traj_bf16[name][-1].max()],
                             distance_fp32=d32[1:], distance_bf16=d16[1:])
    ax.set_yscale("log")
    ax.set_xlabel("NS step k")
    ax.set_ylabel(r"$\|X_k X_k^T - I\|_2 = \max_i |s_i^2 - 1|$")
    ax.set_title("Distance from orthogonality per step")
    ax.grid(True, ls=":", alpha=0.6)
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "ns_spectral_distance.png"), dpi=110)
    plt.close(fig)

    # 3. the composed scalar maps
    fig, ax = plt.subplots(figsize=(7, 4.5))
    s = np.logspace(-4, 0, 4000)
    maps = {name: schedules[name] for name in names}
    maps["handover8 cut to 5 (refused)"] = HANDOVER8[:5]
    for name, sched in maps.items():
        style = dict(color=colors.get(name, "0.5"), ls="-" if name in colors else ":")
        ax.plot(s, scalar_map(s, sched), label=f"{name} ({len(sched)} steps)", **style)
    ax.axhline(1.0, ls="--", c="k", lw=0.8)
    ax.axvline(1e-3, ls=":", c="0.5", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(0, 2)
    ax.set_xlabel("input singular value s (after Frobenius normalisation)")
    ax.set_ylabel("output singular value")
    ax.set_title("Composed NS map per preset (float64)")
    ax.grid(True, ls=":", alpha=0.6)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "ns_polynomial_maps.png"), dpi=110)
    plt.close(fig)

    def clean(v):
        return [clean(x) for x in v] if isinstance(v, (list, tuple)) else {k: clean(x) for k, x in v.items()} \
            if isinstance(v, dict) else float(v)
    with open(os.path.join(args.out_dir, "ns_diagnostics.json"), "w") as f:
        json.dump(dict(size=[m, n], presets={k: {kk: (vv if kk == "steps" else clean(vv)) for kk, vv in v.items()}
                                             for k, v in summary.items()}), f, indent=2)
    for name, v in summary.items():
        print(f"{name:15s} steps {v['steps']}: fp32 band [{v['band_fp32'][0]:.4f}, {v['band_fp32'][1]:.4f}], "
              f"bf16 band [{v['band_bf16'][0]:.4f}, {v['band_bf16'][1]:.4f}]")
    print(f"figures -> {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
