"""Metrics of a run: one JSON line per step (the source of truth), TensorBoard, and W&B when configured."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def timed(metrics: dict, name: str):
    """Put the wall time of the block into `metrics["time/<name>"]`."""
    t = time.perf_counter()
    yield
    metrics[f"time/{name}"] = time.perf_counter() - t


class MetricsLogger:
    """`log(step, metrics)` appends `{"step": s, "time": t, **metrics}` to metrics.jsonl and mirrors
    the numbers to TensorBoard (and W&B if `wandb_project` is set). Resuming appends to the same
    file after dropping the lines of steps that will be recomputed."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: dict | None = None,
    ):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        self._wandb = None
        if wandb_project:
            import wandb  # optional dependency: only when configured

            self._wandb = wandb.init(
                project=wandb_project, dir=str(self.dir), config=config or {}, resume="allow"
            )

    def truncate_after(self, step: int) -> None:
        """Drop lines with step > `step` (a resumed run recomputes them)."""
        if not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if isinstance(v, bool):
                v = int(v)
            if isinstance(v, int | float):
                row[k] = v if math.isfinite(v) else str(v)
            elif isinstance(v, str):
                row[k] = v
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, int | float) and k not in ("step", "time")}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def merged_metrics(run_dir: str | Path) -> dict[int, dict]:
    """metrics.jsonl merged per step (the loop writes one line per step; older runs wrote several)."""
    out: dict[int, dict] = {}
    for row in read_metrics(run_dir):
        out.setdefault(row["step"], {}).update(row)
    return out


def curve_table(run_dir: str | Path, keys: tuple[str, ...] | None = None) -> str:
    """A Markdown table of the evaluated steps: what the run printed at its end (and the README shows)."""
    rows = [
        (s, r) for s, r in sorted(merged_metrics(run_dir).items()) if any(k.startswith("eval/") for k in r)
    ]
    if not rows:
        return ""
    keys = keys or tuple(
        k
        for k in (
            "eval/acc",
            *sorted(k for k in rows[-1][1] if k.startswith("eval/pass@")),
            "reward/acc_generated",
            "entropy/mean",
        )
        if any(k in r for _, r in rows)
    )
    lines = ["| step | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    for step, r in rows:
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), int | float) else "" for k in keys]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
