#!/usr/bin/env python
"""Run a recipe once per entropy-control method (and seed), same budget; print a table; overlay plots.

    python tools/compare_methods.py [--config configs/collapse_cpu.yaml] [--out runs/compare] \\
        [--methods grpo,clip_cov] [--seeds 0,1,2] [--seeded grpo,clip_cov] [--steps N] \\
        [section.field=value ...]

Every run is `python -m pipeline train --config CONFIG` with the method's overrides (`METHODS`,
each with the settings of its reference recipe) and the same seed, steps and evaluation. The
methods in --seeded (default `SEEDED`) run once per seed of --seeds, the others with the first
seed only. A run that finished is reused (delete its directory, OUT/<method>_s<seed>, to redo it). Writes OUT/results.md,
OUT/results.json and the plots of tools/plot_run.py (seeds of a method as a mean and a band) in
OUT/plots/.

Columns (mean +- standard deviation over seeds): held-out accuracy at the first and last
evaluation and pass@k at the last; the entropy of the sampled responses' tokens (full vocabulary,
old policy) over the first 5 steps, the last 5 and its minimum; steps to half entropy (the first
step whose 3-step mean is at most half the first-5-step mean; how many seeds got there); the fit of
R = -a exp(H) + b of held-out reward against held-out entropy (a, b, R^2 over every evaluation) and
of training accuracy against training entropy (10-step means);
the running correlation of the predicted and measured per-step entropy change; for Clip-Cov and
KL-Cov the tokens they selected per mini-batch and their share of its tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from plot_run import merged, plot_runs, series  # noqa: E402

from pipeline.telemetry import fit_entropy_law  # noqa: E402

# Each preset states the reference's settings that differ from the recipe's GRPO baseline, the dual
# clip c included (`clip_ratio_c`, the cap on -A r for A < 0): the DAPO, 80/20, Archer and
# Entropy-Mechanism recipes use c = 10, Skywork-OR1 has none; CISPO, Clip-Cov and KL-Cov losses
# have no dual clip at all (null says so). See ../shared/docs/entropy-methods.md, section C.
# Clip-Cov / KL-Cov run at the paper's ratios and at "share" ratios (see docs/results.md).
METHODS: dict[str, list[str]] = {
    # PPO-clip, symmetric 0.2: the GRPO baseline (Entropy-Mechanism-of-RL recipe/dapo/7b_baseline.sh)
    "grpo": ["loss.method=ppo", "loss.clip_ratio_high=0.2", "loss.clip_ratio_c=10"],
    "clip_higher": ["loss.method=ppo", "loss.clip_ratio_high=0.28", "loss.clip_ratio_c=10"],  # DAPO
    "clip_cov": [  # arXiv 2505.22617 (7b_clip_cov.sh): ratio 2e-4, band (1, 5), trust region [0, 2]
        "loss.method=clip_cov",
        "loss.clip_cov_ratio=2e-4",
        "loss.clip_ratio_low=1.0",
        "loss.clip_ratio_high=1.0",
        "loss.clip_ratio_c=null",
    ],  # fmt: skip
    "clip_cov_share": [
        "loss.method=clip_cov",
        "loss.clip_cov_ratio=2e-2",
        "loss.clip_ratio_low=1.0",
        "loss.clip_ratio_high=1.0",
        "loss.clip_ratio_c=null",
    ],  # fmt: skip
    "kl_cov": [  # arXiv 2505.22617 (7b_kl_cov.sh): top 0.2 % by covariance, beta 1, no PPO clip
        "loss.method=kl_cov",
        "loss.kl_cov_ratio=2e-3",
        "loss.kl_cov_coef=1.0",
        "loss.clip_ratio_c=null",
    ],  # fmt: skip
    "kl_cov_share": [
        "loss.method=kl_cov",
        "loss.kl_cov_ratio=2e-2",
        "loss.kl_cov_coef=1.0",
        "loss.clip_ratio_c=null",
    ],  # fmt: skip
    "adaptive_entropy": [  # Skywork-OR1 (or1_scripts/train): symmetric 0.2, no dual clip, controller
        "loss.method=ppo",
        "loss.clip_ratio_high=0.2",
        "loss.clip_ratio_c=null",
        "entropy_control.enabled=true",
        "entropy_control.target=0.4",  # the paper's 0.2 is below where GRPO ends here (docs/results.md)
    ],  # fmt: skip
    "top20_entropy": [  # arXiv 2506.01939: DAPO (0.2/0.28, c = 10), gradient on the top 20 % entropy
        "loss.method=ppo",
        "loss.clip_ratio_high=0.28",
        "loss.clip_ratio_c=10",
        "loss.top_entropy_ratio=0.2",
    ],  # fmt: skip
    "cispo": ["loss.method=cispo", "loss.cispo_clip_high=0.2", "loss.clip_ratio_c=null"],  # arXiv 2506.13585
    "entropy_adv": [  # arXiv 2506.14758 on the GRPO baseline: A + min(0.4 H, |A| / 2)
        "loss.method=ppo",
        "loss.clip_ratio_high=0.2",
        "loss.clip_ratio_c=10",
        "loss.adv_entropy_shaping=true",
    ],  # fmt: skip
    "archer": ["loss.method=archer", "loss.clip_ratio_c=10"],  # arXiv 2507.15778 (ArcherCodeR script)
}
SEEDED = ("grpo", "clip_higher", "clip_cov", "clip_cov_share", "kl_cov", "kl_cov_share")
SELECTION = {"clip_cov": "actor/clip_cov/selected", "kl_cov": "actor/kl_cov/selected"}


def run_name(method: str, seed: int) -> str:
    return f"{method}_s{seed}"


def run_method(
    config: Path, method: str, seed: int, out: Path, steps: int | None, extra: list[str], retries: int = 2
) -> Path:
    """Run (or reuse) one method's run; a run that dies (a worker killed for memory on a shared
    machine, a preemption) is started again and resumes from its newest checkpoint."""
    run_dir = out / run_name(method, seed)
    rows = merged(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
    want = steps if steps is not None else recipe_steps(config, extra)
    if rows and max(rows) >= want and "eval/acc" in rows[max(rows)]:
        print(f"[compare] {run_dir.name}: reusing {run_dir}")
        return run_dir
    seeds = [f"trainer.seed={seed}", f"data.seed={seed}", f"loss.seed={seed}"]
    cmd = [sys.executable, "-m", "pipeline", "train", "--config", str(config), f"trainer.run_dir={run_dir}",
           *([f"trainer.steps={steps}"] if steps is not None else []), *seeds, *METHODS[method], *extra]  # fmt: skip
    print(f"[compare] {run_dir.name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    log = out / f"{run_dir.name}.log"
    for attempt in range(retries + 1):
        with open(log, "a" if attempt else "w") as f:
            code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
        if code == 0:
            print(f"[compare] {run_dir.name}: done in {time.time() - t0:.0f} s", flush=True)
            return run_dir
        print(
            f"[compare] {run_dir.name}: exit {code}, attempt {attempt + 1} of {retries + 1}; see {log}",
            flush=True,
        )
    raise SystemExit(f"[compare] {run_dir.name} failed {retries + 1} times; see {log}")


def recipe_steps(config: Path, extra: list[str]) -> int:
    from pipeline.config import Config, load

    return load(Config, config, extra).trainer.steps


def _mean(x: list[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def steps_to_half(steps: list[int], entropy: list[float]) -> int | None:
    """The first step whose 3-step mean entropy is at most half the first 5 steps' mean."""
    if len(entropy) < 8:
        return None
    half = 0.5 * _mean(entropy[:5])
    for i in range(5, len(entropy) - 2):
        if _mean(entropy[i : i + 3]) <= half:
            return steps[i + 2]
    return None


def training_law(entropy: list[float], acc: list[float], block: int = 10) -> dict | None:
    """R = -a exp(H) + b fitted to training accuracy against training entropy, both as means over
    blocks of `block` steps (one step's 128 samples are too noisy a point)."""
    n = min(len(entropy), len(acc)) // block
    h = [_mean(entropy[i * block : (i + 1) * block]) for i in range(n)]
    r = [_mean(acc[i * block : (i + 1) * block]) for i in range(n)]
    return fit_entropy_law(h, r)


def summarize(name: str, run_dir: Path) -> dict:
    rows = merged(run_dir)
    evals = sorted(s for s, r in rows.items() if "eval/acc" in r)
    first, last = rows[evals[0]], rows[evals[-1]]
    pass_key = next(k for k in last if k.startswith("eval/pass@"))
    steps, ent = series(rows, "entropy/mean")
    _, train_acc = series(rows, "reward/acc_generated")
    train_law = training_law(ent, train_acc) or {}
    out = {
        "method": name,
        "run": run_dir.name,
        "steps": max(rows),
        "minutes": (rows[max(rows)]["time"] - rows[0]["time"]) / 60 if "time" in rows[0] else None,
        "acc_start": first["eval/acc"],
        "acc_end": last["eval/acc"],
        "pass_start": first[pass_key],
        "pass_end": last[pass_key],
        "pass_k": int(pass_key.removeprefix("eval/pass@")),
        "train_acc_start": _mean(train_acc[:5]),
        "train_acc_end": _mean(train_acc[-10:]),
        "entropy_start": _mean(ent[:5]),
        "entropy_end": _mean(ent[-5:]),
        "entropy_min": min(ent),
        "steps_to_half": steps_to_half(steps, ent),
        "law_a": last.get("entropy_law/a"),
        "law_b": last.get("entropy_law/b"),
        "law_r2": last.get("entropy_law/r2"),
        "train_law_a": train_law.get("a"),
        "train_law_b": train_law.get("b"),
        "train_law_r2": train_law.get("r2"),
        "pred_vs_measured_corr": last.get("entropy_dynamics/pred_vs_measured_corr"),
    }
    method = json.loads((run_dir / "config.json").read_text())["loss"]["method"]
    if method in SELECTION:
        _, sel = series(rows, SELECTION[method])
        _, tokens = series(rows, "actor/n_tokens")
        out["selected_per_minibatch"] = _mean(sel)
        out["tokens_per_minibatch"] = _mean(tokens)
        out["selected_share"] = _mean(sel) / _mean(tokens)
    return out


def _number(x) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(float(x)) else None


def aggregate(method: str, runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every number; steps to half over the seeds that got there."""
    out: dict = {"method": method, "seeds": len(runs)}
    for key in runs[0]:
        vals = [v for v in (_number(r.get(key)) for r in runs) if v is not None]
        if key in ("method", "run") or not vals:
            continue
        out[key] = statistics.fmean(vals)
        out[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
    halves = [r["steps_to_half"] for r in runs if r["steps_to_half"] is not None]
    out["steps_to_half_reached"] = len(halves)
    return out


def _cell(r: dict, key: str, fmt: str = ".3f") -> str:
    if r.get(key) is None:
        return "-"
    sd = r.get(key + "_sd")
    return f"{r[key]:{fmt}}" + (f" ± {sd:{fmt}}" if sd is not None else "")


def table(results: list[dict]) -> str:
    k = int(results[0]["pass_k"])  # a mean over seeds: a float
    head = ["method", "seeds", "acc start", "acc end", f"pass@{k} start", f"pass@{k} end", "train acc end",
            "H start", "H end", "H min", "steps to H/2", "law held-out a, b, R²", "law training a, b, R²",
            "dH pred~meas r", "selected / mini-batch (share)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in results:
        half = "-" if not r["steps_to_half_reached"] else _cell(r, "steps_to_half", ".0f")
        if r["steps_to_half_reached"] and r["steps_to_half_reached"] < r["seeds"]:
            half += f" ({r['steps_to_half_reached']}/{r['seeds']})"
        law, train_law = (
            "-" if r.get(f"{p}r2") is None else f"{r[p + 'a']:.2f}, {r[p + 'b']:.2f}, {r[p + 'r2']:.2f}"
            for p in ("law_", "train_law_")
        )
        sel = "-"
        if r.get("selected_per_minibatch") is not None:
            sel = f"{r['selected_per_minibatch']:.1f} of {r['tokens_per_minibatch']:.0f} ({100 * r['selected_share']:.2f} %)"
        cells = [r["method"], str(r["seeds"]), _cell(r, "acc_start"), _cell(r, "acc_end"), _cell(r, "pass_start"),
                 _cell(r, "pass_end"), _cell(r, "train_acc_end"), _cell(r, "entropy_start"), _cell(r, "entropy_end"),
                 _cell(r, "entropy_min"), half, law, train_law, _cell(r, "pred_vs_measured_corr", ".2f"), sel]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "collapse_cpu.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the recipe's)")
    ap.add_argument(
        "--seeds", default="0,1,2", help="seeds of the --seeded methods; the others run the first"
    )
    ap.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)
    )
    ap.add_argument(
        "--seeded", default=",".join(SEEDED), help="the methods that run every seed (default: %(default)s)"
    )
    ap.add_argument("--retries", type=int, default=2, help="restarts (resuming) of a run that dies")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args(argv)
    names = [m for m in args.methods.split(",") if m]
    seeded = [m for m in args.seeded.split(",") if m]
    unknown = [m for m in names + seeded if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    if not seeds:
        ap.error("--seeds: give at least one seed")
    if not args.config.exists():
        ap.error(f"--config {args.config}: no such file")
    args.out.mkdir(parents=True, exist_ok=True)
    # every method's first seed first: a comparison stopped half-way still covers every method
    plan = [(m, s) for i, s in enumerate(seeds) for m in names if i == 0 or m in seeded]
    dirs = {
        (m, s): run_method(args.config, m, s, args.out, args.steps, args.overrides, args.retries)
        for m, s in plan
    }
    per_run = [summarize(m, d) for (m, _), d in dirs.items()]
    results = [aggregate(m, [r for r in per_run if r["method"] == m]) for m in names]
    text = table(results)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"runs": per_run, "methods": results}, indent=1))
    for p in plot_runs(list(dirs.values()), args.out / "plots"):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
