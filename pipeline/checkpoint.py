"""Checkpoint directories of a run: `step_000012/`, complete only once a marker is written last.

A save writes into `step_N.partial/` and renames it to `step_N/` after everything (model shards,
trainer state, then the `COMPLETE` marker) is on disk, so a run killed mid-write leaves only a
`.partial` directory, which `latest_complete` never returns and the next save removes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = "COMPLETE"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def partial_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}.partial"


def latest_complete(root: str | Path) -> tuple[int, Path] | None:
    """(step, path) of the newest checkpoint with its marker, or None."""
    root = Path(root)
    if not root.exists():
        return None
    found = []
    for d in root.iterdir():
        if (
            d.is_dir()
            and d.name.startswith("step_")
            and not d.name.endswith(".partial")
            and (d / MARKER).exists()
        ):
            try:
                found.append((int(d.name.split("_")[1]), d))
            except ValueError:
                continue
    return max(found) if found else None


def begin(root: str | Path, step: int) -> Path:
    """Fresh `.partial` directory for step `step` (removing leftovers of an interrupted save)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for d in root.glob("step_*.partial"):
        shutil.rmtree(d, ignore_errors=True)
    p = partial_dir(root, step)
    p.mkdir()
    return p


def commit(root: str | Path, step: int, trainer_state: dict, keep_last: int = 2) -> Path:
    """Write the trainer state and the marker, fsync, rename `.partial` -> final; prune old ones."""
    p = partial_dir(root, step)
    (p / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    with open(p / MARKER, "w") as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    final = step_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(p, final)
    complete = sorted(
        (int(d.name.split("_")[1]), d)
        for d in Path(root).glob("step_*")
        if d.is_dir() and not d.name.endswith(".partial") and (d / MARKER).exists()
    )
    for _, d in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
    return final


def read_trainer_state(path: str | Path) -> dict:
    return json.loads((Path(path) / "trainer_state.json").read_text())
