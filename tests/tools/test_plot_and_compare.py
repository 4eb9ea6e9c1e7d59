"""tools/plot_run.py and tools/compare_methods.py on small run directories written here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import compare_methods  # noqa: E402
import plot_run  # noqa: E402


def fake_run(path: Path, decay: float) -> Path:
    """metrics.jsonl of 30 steps: entropy decaying at `decay`, evals every 5 steps on the law."""
    path.mkdir(parents=True)
    rows = [{"step": 0, "eval/acc": 0.3, "eval/pass@4": 0.6, "eval/reward": 0.3, "eval/entropy": 1.0}]
    for s in range(1, 31):
        h = math.exp(-decay * s)
        row = {"step": s, "entropy/mean": h, "reward/acc_generated": 0.3 + 0.01 * s, "reward/acc": 0.5,
               "entropy_dynamics/predicted_change": -0.1 * h, "entropy_dynamics/measured_change": -0.09 * h,
               "entropy_dynamics/pred_vs_measured_corr": 0.9 if s > 2 else "nan"}  # fmt: skip
        rows.append(row)
        if s % 5 == 0:
            rows.append({"step": s, "eval/acc": 0.3 + 0.01 * s, "eval/pass@4": 0.7, "eval/entropy": h,
                         "eval/reward": -0.4 * math.exp(h) + 1.4})  # fmt: skip
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_run_writes_the_three_pngs(tmp_path):
    run = fake_run(tmp_path / "run", 0.05)
    paths = plot_run.plot_runs([run])
    assert [p.name for p in paths] == ["curves.png", "reward_vs_entropy.png", "entropy_change.png"]
    for p in paths:
        assert (
            p.parent == run / "plots"
            and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            and p.stat().st_size > 5000
        )


def test_plot_run_overlays_several_runs_and_refuses_a_non_run(tmp_path):
    runs = [fake_run(tmp_path / "a", 0.01), fake_run(tmp_path / "b", 0.1)]
    assert all(p.exists() for p in plot_run.plot_runs(runs, tmp_path / "out"))
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot_run.plot_runs([tmp_path])


def test_compare_summary_finds_collapse_and_the_last_evaluation(tmp_path):
    slow = compare_methods.summarize("slow", fake_run(tmp_path / "slow", 0.005))
    fast = compare_methods.summarize("fast", fake_run(tmp_path / "fast", 0.1))
    assert slow["steps_to_collapse"] is None
    # 3-step mean below half the first 3 steps' mean: exp(-0.1 s) averaged, first at s = 8
    assert fast["steps_to_collapse"] == 8
    assert (
        fast["final_acc"] == pytest.approx(0.6) and fast["initial_acc"] == 0.3 and fast["eval/pass@4"] == 0.7
    )
    assert fast["entropy_end"] < fast["entropy_start"] and fast["pred_vs_measured_corr"] == 0.9
    text = compare_methods.table([slow, fast])
    assert text.splitlines()[2].startswith("| slow |") and "| 8 |" in text.splitlines()[3]
