#!/usr/bin/env python
"""PNG plots of one RL run (or several, overlaid) from their metrics.jsonl.

    python tools/plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR]

Writes into DIR (default: RUN_DIR/plots for one run, ./plots for several):

    curves.png            entropy, training accuracy, held-out accuracy and pass@k per step
    reward_vs_entropy.png eval reward against eval entropy, with the fitted R = -a exp(H) + b
    entropy_change.png    predicted (first-order, from the per-token influence) vs measured entropy
                          change per step, and their running correlation

Several runs are overlaid, labelled by directory name; runs named ``<label>_s<seed>`` (the seeds
of one method, as tools/compare_methods.py names them) are drawn as one curve, their mean, with a
band from their minimum to their maximum.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.metrics import merged_metrics as merged  # noqa: E402
from pipeline.telemetry import fit_entropy_law  # noqa: E402


def series(rows: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(s, r[key]) for s, r in sorted(rows.items()) if isinstance(r.get(key), int | float)]
    pts = [(s, float(v)) for s, v in pts if math.isfinite(float(v))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def group_name(run_name: str) -> str:
    """`grpo_s1` -> `grpo`: the seeds of one method form one group."""
    return re.sub(r"_s\d+$", "", run_name)


def band(groups: dict[str, list[dict]], key: str, fallback: str | None = None):
    """Per group: (steps, mean, min, max) over its runs, on the steps every run has."""
    for name, runs in groups.items():
        per_run = []
        for rows in runs:
            x, y = series(rows, key)
            if not x and fallback:
                x, y = series(rows, fallback)
            per_run.append(dict(zip(x, y, strict=True)))
        steps = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
        vals = [[r[s] for r in per_run] for s in steps]
        yield name, steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def plot_curves(groups: dict[str, list[dict]], out: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    pass_key = next(
        (k for runs in groups.values() for r in runs[0].values() for k in r if k.startswith("eval/pass@")),
        "eval/pass@k",
    )
    panels = (
        ("entropy/mean", "entropy (response tokens, full vocabulary)"),
        ("reward/acc_generated", "training accuracy (all samples)"),
        ("eval/acc", "held-out accuracy"),
        (pass_key, f"held-out {pass_key.removeprefix('eval/')}"),
    )
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        fallback = "reward/acc" if key == "reward/acc_generated" else None
        for name, x, mean, lo, hi in band(groups, key, fallback):
            n = len(groups[name])
            (line,) = ax.plot(x, mean, marker="o" if key.startswith("eval/") else None, ms=3,
                              label=name if n == 1 else f"{name} (mean of {n} seeds)")  # fmt: skip
            if n > 1:
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    return _save(fig, out / "curves.png")


def plot_reward_vs_entropy(groups: dict[str, list[dict]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, runs in groups.items():  # every evaluation of every seed, one fit per group
        evals = [
            r for rows in runs for _, r in sorted(rows.items()) if "eval/entropy" in r and "eval/reward" in r
        ]
        h = [float(r["eval/entropy"]) for r in evals]
        r = [float(r["eval/reward"]) for r in evals]
        (line,) = ax.plot(h, r, "o", ms=4, label=name)
        fit = fit_entropy_law(h, r)
        if fit is not None:
            lo, hi = min(h), max(h)
            grid = [lo + (hi - lo) * i / 50 for i in range(51)]
            ax.plot(grid, [fit["b"] - fit["a"] * math.exp(x) for x in grid], color=line.get_color(), lw=1,
                    label=f"{name}: a={fit['a']:.3g}, b={fit['b']:.3g}, R2={fit['r2']:.2f}")  # fmt: skip
    ax.set_xlabel("policy entropy on eval responses")
    ax.set_ylabel("eval reward")
    ax.set_title("R = -a exp(H) + b")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "reward_vs_entropy.png")


def plot_entropy_change(groups: dict[str, list[dict]], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in groups.items():
        pairs = [
            (r["entropy_dynamics/predicted_change"], r["entropy_dynamics/measured_change"])
            for rows in runs
            for _, r in sorted(rows.items())
            if isinstance(r.get("entropy_dynamics/predicted_change"), float)
            and isinstance(r.get("entropy_dynamics/measured_change"), float)
        ]
        axes[0].plot([p for p, _ in pairs], [m for _, m in pairs], "o", ms=3, label=name)
        for _, x, mean, _, _ in band({name: runs}, "entropy_dynamics/pred_vs_measured_corr"):
            axes[1].plot(x, mean, label=name)
    axes[0].set_xlabel("predicted dH (first order, plain PG step of size lr)")
    axes[0].set_ylabel("measured dH (same tokens, after the update)")
    axes[0].axhline(0, color="gray", lw=0.5)
    axes[0].axvline(0, color="gray", lw=0.5)
    axes[1].set_xlabel("RL step")
    axes[1].set_ylabel("running correlation")
    axes[1].set_ylim(-1.05, 1.05)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "entropy_change.png")


def plot_runs(run_dirs: list[Path], out: Path | None = None) -> list[Path]:
    groups: dict[str, list[dict]] = {}
    for d in run_dirs:
        if not (d / "metrics.jsonl").exists():
            raise SystemExit(f"{d}: no metrics.jsonl (is this a run directory?)")
        groups.setdefault(group_name(d.name) if len(run_dirs) > 1 else d.name, []).append(merged(d))
    out = out or (run_dirs[0] / "plots" if len(run_dirs) == 1 else Path("plots"))
    out.mkdir(parents=True, exist_ok=True)
    return [plot_curves(groups, out), plot_reward_vs_entropy(groups, out), plot_entropy_change(groups, out)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    for path in plot_runs(args.run_dirs, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
