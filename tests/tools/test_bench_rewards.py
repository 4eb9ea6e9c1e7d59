"""Smoke test of tools/bench_rewards.py: a small run prints a table row per mode, and every mode's
scores equal the driver's (the tool asserts it). Not a timed test: no number is checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_prints_every_mode():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench_rewards.py"),
            "--quick",
            "--sizes",
            "24",
            "--workers",
            "1",
            "2",
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "median" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["driver", "pool 1", "pool 2"], proc.stdout
    assert "pool start-up" in proc.stdout
