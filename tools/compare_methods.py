#!/usr/bin/env python
"""Run the CPU demo once per entropy-control method, same seed and budget; print a table; overlay plots.

    python tools/compare_methods.py [--out runs/compare] [--steps 60] [--methods grpo,clip_cov] \\
        [section.field=value ...]

Every run is `python -m pipeline train --config configs/demo_cpu.yaml` with the method's overrides
(below) plus the shared ones: two mini-batches per step (so that the trust-region and KL-Cov terms
act: with one on-policy mini-batch every ratio is 1), the same seed, steps and evaluation. A run
that exists and finished is reused (delete its directory to redo it). Writes OUT/results.md,
OUT/results.json and the overlaid plots of tools/plot_run.py in OUT/plots/.

Columns: final held-out accuracy and pass@k (last evaluation), entropy at the end (mean of the last 5
steps), the lowest entropy, and steps to collapse: the first step whose 3-step mean entropy falls
below half of the first 3 steps' mean ("-": never).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from plot_run import merged, plot_runs, series  # noqa: E402

METHODS: dict[str, list[str]] = {
    # PPO-clip, symmetric 0.2: the GRPO baseline of the papers
    "grpo": ["loss.method=ppo", "loss.clip_ratio_high=0.2"],
    "clip_higher": ["loss.method=ppo", "loss.clip_ratio_high=0.28"],  # DAPO
    "clip_cov": [  # arXiv 2505.22617 settings: trust region [0, 2]
        "loss.method=clip_cov",
        "loss.clip_ratio_low=1.0",
        "loss.clip_ratio_high=1.0",
        "loss.clip_ratio_c=null",
    ],  # fmt: skip
    "kl_cov": ["loss.method=kl_cov", "loss.kl_cov_ratio=2e-3", "loss.kl_cov_coef=1.0"],
    "adaptive_entropy": ["loss.clip_ratio_high=0.2", "entropy_control.enabled=true"],  # Skywork-OR1
    "top20_entropy": ["loss.clip_ratio_high=0.28", "loss.top_entropy_ratio=0.2"],  # 80/20
    "cispo": ["loss.method=cispo", "loss.cispo_clip_high=0.2"],
    "entropy_adv": ["loss.clip_ratio_high=0.2", "loss.adv_entropy_shaping=true"],
    "archer": ["loss.method=archer"],
}
SHARED = ["trainer.mini_batches_per_step=2", "trainer.eval_every=10", "trainer.checkpoint_every=0"]


def run_method(name: str, out: Path, steps: int, extra: list[str]) -> Path:
    run_dir = out / name
    rows = merged(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
    if rows and max(rows) >= steps and "eval/acc" in rows[max(rows)]:
        print(f"[compare] {name}: reusing {run_dir}")
        return run_dir
    cmd = [sys.executable, "-m", "pipeline", "train", "--config", str(REPO / "configs" / "demo_cpu.yaml"),
           f"trainer.run_dir={run_dir}", f"trainer.steps={steps}", *SHARED, *METHODS[name], *extra]  # fmt: skip
    print(f"[compare] {name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    log = out / f"{name}.log"
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"[compare] {name} failed (exit {code}); see {log}")
    print(f"[compare] {name}: done in {time.time() - t0:.0f} s", flush=True)
    return run_dir


def _mean(x: list[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def steps_to_collapse(steps: list[int], entropy: list[float]) -> int | None:
    if len(entropy) < 6:
        return None
    start = _mean(entropy[:3])
    for i in range(3, len(entropy) - 2):
        if sum(entropy[i : i + 3]) / 3 < 0.5 * start:
            return steps[i]
    return None


def summarize(name: str, run_dir: Path) -> dict:
    rows = merged(run_dir)
    last_eval = max(s for s, r in rows.items() if "eval/acc" in r)
    ev = rows[last_eval]
    pass_key = next(k for k in ev if k.startswith("eval/pass@"))
    steps, ent = series(rows, "entropy/mean")
    _, first_eval = min((s, r) for s, r in rows.items() if "eval/acc" in r)
    return {
        "method": name,
        "initial_acc": first_eval["eval/acc"],
        "final_acc": ev["eval/acc"],
        pass_key: ev[pass_key],
        "entropy_start": _mean(ent[:3]),
        "entropy_end": _mean(ent[-5:]),
        "entropy_min": min(ent),
        "steps_to_collapse": steps_to_collapse(steps, ent),
        "law_r2": ev.get("entropy_law/r2"),
        "pred_vs_measured_corr": ev.get("entropy_dynamics/pred_vs_measured_corr"),
    }


def table(results: list[dict]) -> str:
    pass_key = next(k for k in results[0] if k.startswith("eval/pass@"))
    head = ["method", "acc start", "acc end", pass_key.removeprefix("eval/"), "H start", "H end", "H min",
            "steps to collapse", "dH pred~meas r"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in results:
        corr = r["pred_vs_measured_corr"]
        cells = [r["method"], f"{r['initial_acc']:.3f}", f"{r['final_acc']:.3f}", f"{r[pass_key]:.3f}",
                 f"{r['entropy_start']:.4f}", f"{r['entropy_end']:.4f}", f"{r['entropy_min']:.4f}",
                 str(r["steps_to_collapse"] or "-"),
                 f"{corr:.2f}" if isinstance(corr, float) and math.isfinite(corr) else "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)
    )
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args(argv)
    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = [run_method(m, args.out, args.steps, args.overrides) for m in names]
    results = [summarize(m, d) for m, d in zip(names, dirs, strict=True)]
    text = table(results)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    for p in plot_runs(dirs, args.out / "plots"):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
