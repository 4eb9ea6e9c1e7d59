"""The CPU demo for the end-to-end tests: its model (made once, where the demo recipe expects it) and
`python -m pipeline train` runs on it, in their own process group, stopped by a marker variable.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import uuid
from pathlib import Path

from pipeline.metrics import merged_metrics
from tests.processes import stop_marked

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
TINY = REPO / "runs" / "tiny"  # trainer.make_tiny_model_dir of the demo recipe
MARKER = "PIPELINE_TEST_RUN"


def ensure_demo_model() -> Path:
    """runs/tiny/{model,train.jsonl,eval.jsonl}: made by tools/make_tiny_model.py (about 2.5 min) once."""
    TINY.parent.mkdir(parents=True, exist_ok=True)
    with open(TINY.parent / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (TINY / "model" / "config.json").exists():
            subprocess.run(
                [sys.executable, str(REPO / "tools" / "make_tiny_model.py"), "--out-dir", str(TINY)],
                check=True,
                cwd=REPO,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.DEVNULL,
            )
    return TINY


def train_command(config: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "pipeline", "train", "--config", str(config),
        f"trainer.run_dir={run_dir}", *overrides,
    ]  # fmt: skip


class Run:
    """One `python -m pipeline train` process (and the Ray daemons it starts) that a test owns."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.marker = uuid.uuid4().hex
        self.log = log
        env = {
            **os.environ,
            **(env or {}),
            MARKER: self.marker,
            "OMP_NUM_THREADS": "1",
            "TQDM_MININTERVAL": "5",
        }
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        stop_marked(MARKER, self.marker, grace_s=1.0)

    @property
    def output(self) -> str:
        return self.log.read_text()


def train(
    config: Path, run_dir: Path, *overrides: str, timeout: float = 600, env: dict | None = None
) -> tuple[int, str]:
    """Run to the end (with `env` added to the environment); (exit code, output)."""
    run = Run(train_command(config, run_dir, *overrides), run_dir.parent / f"{run_dir.name}.log", env)
    code = run.wait(timeout)
    return code, run.output


def metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl merged per step; the run must have written it."""
    assert (run_dir / "metrics.jsonl").exists(), f"{run_dir}: no metrics.jsonl"
    return merged_metrics(run_dir)


def deterministic(row: dict) -> dict:
    """A metrics row without what depends on the clock (times, throughputs)."""
    return {
        k: v
        for k, v in row.items()
        if k != "time" and not k.startswith("time/") and k != "sync/seconds" and not k.endswith("_per_s")
    }
