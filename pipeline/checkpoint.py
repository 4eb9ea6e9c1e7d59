"""Checkpoint directories of a run (`step_000012/`), which of them a resume may use, and the config
a run was started with.

A save writes into `step_N.partial/` and renames it to `step_N/` after everything (model shards,
trainer state, then the `COMPLETE` marker) is on disk, so a run killed mid-write leaves only a
`.partial` directory, which is never resumed from and which the next save removes.

A marker is not proof: a disk that filled up, a copy that stopped half-way or a hand-edited file
leave a `step_N/` that would crash every restart. `latest_loadable` walks back from the newest
checkpoint to the newest one that passes `problem()` (every file parses and every shard is as long
as the checkpoint's own index says, checked without loading the model) and reports the ones it
skipped; nothing here deletes a checkpoint that failed the check (a save over one moves it aside
to `step_N.bad`), and pruning keeps the newest `keep_last` checkpoints that pass it.

`config.json` in the run directory is the config the run was started (or last resumed) with. A
resume with a config that differs in more than `RESUME_MAY_CHANGE` is refused before anything
starts (`check_resume_config`), unless `trainer.allow_config_change=true`. `adopt_config` keeps an
old file that differs in any field as `config.step_N.json` beside the new one. Nothing overwrites it
silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

from pipeline.errors import ConfigError

log = logging.getLogger("pipeline.checkpoint")

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
ACTOR_DIR = "actor"  # the Megatron actor's dist checkpoint (megatron-core dist_checkpointing, torch_dist)
# Files megatron-core 0.16.1 writes into a torch_dist checkpoint besides the shards
# (dist_checkpointing/core.py CONFIG_FNAME, strategies/common.py COMMON_STATE_FNAME) and the index
# torch.distributed.checkpoint writes last (FileSystemWriter: `.metadata`, a pickled `Metadata`).
DIST_CONFIG, DIST_COMMON, DIST_INDEX = "metadata.json", "common.pt", ".metadata"
CONFIG = "config.json"

_STEP_DIR = re.compile(r"step_(\d+)")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def partial_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}.partial"


def complete(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint with its marker, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.fullmatch(d.name)
        if m and d.is_dir() and (d / MARKER).exists():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_complete(root: str | Path) -> tuple[int, Path] | None:
    """(step, path) of the newest checkpoint with its marker, or None (not checked: see latest_loadable)."""
    found = complete(root)
    return found[-1] if found else None


def latest_loadable(root: str | Path) -> tuple[tuple[int, Path] | None, list[tuple[Path, str]]]:
    """The newest checkpoint that passes `problem()`, and the newer ones skipped with their reasons."""
    skipped = []
    for step, path in reversed(complete(root)):
        why = problem(path, step)
        if why is None:
            return (step, path), skipped
        skipped.append((path, why))
    return None, skipped


def describe_skipped(skipped: list[tuple[Path, str]]) -> str:
    """One line: `step_000004 (trainer_state.json: not valid JSON ...), step_000003 (...)`."""
    return ", ".join(f"{path.name} ({why})" for path, why in skipped)


def problem(path: str | Path, step: int | None = None) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when every part of it checks out.

    Reads the marker, the trainer state and the actor's small files (index, common state, config),
    and compares each shard file's size with the byte ranges the index assigns to it; the shards
    themselves are not read, so this costs milliseconds even for a model of many gigabytes.
    """
    path = Path(path)
    if step is None:
        m = _STEP_DIR.fullmatch(path.name)
        step = int(m.group(1)) if m else None
    try:
        marker = (path / MARKER).read_text().strip()
    except OSError as e:
        return f"{MARKER}: {e.strerror or e}"
    if step is not None and marker and marker != str(step):
        return f"{MARKER} says step {marker!r}, the directory step {step}"
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except FileNotFoundError:
        return f"{TRAINER_STATE} is missing"
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        return f"{TRAINER_STATE}: not valid JSON ({e})"
    if not isinstance(state, dict) or (step is not None and state.get("step") != step):
        return f"{TRAINER_STATE}: expected a mapping with step {step}, got {str(state)[:80]!r}"
    return dist_checkpoint_problem(path / ACTOR_DIR)


def dist_checkpoint_problem(path: str | Path) -> str | None:
    """Why megatron-core's torch_dist checkpoint at `path` is incomplete, or None."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    name = path.name
    if not path.is_dir():
        return f"{name}/ is missing"
    try:
        backend = json.loads((path / DIST_CONFIG).read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as e:
        return f"{name}/{DIST_CONFIG}: {e}"
    if backend != "torch_dist":
        return f"{name}/{DIST_CONFIG}: sharded_backend {backend!r}, expected 'torch_dist'"
    try:
        with zipfile.ZipFile(path / DIST_COMMON) as z:  # torch.save's format; testzip checks every CRC
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile) as e:
        return f"{name}/{DIST_COMMON}: unreadable ({e})"
    if bad is not None:
        return f"{name}/{DIST_COMMON}: member {bad} is corrupt"
    try:
        index = FileSystemReader(str(path)).read_metadata()
    except FileNotFoundError:
        return f"{name}/{DIST_INDEX} is missing (the save did not finish)"
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as e:
        return f"{name}/{DIST_INDEX}: unreadable ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    if not needed:
        return f"{name}/{DIST_INDEX}: lists no shard"
    for rel, size in sorted(needed.items()):
        try:
            have = (path / rel).stat().st_size
        except OSError:
            return f"{name}/{rel} is missing"
        if have < size:
            return f"{name}/{rel} is truncated: {have} of {size} bytes"
    return None


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
    """Write the trainer state and the marker, fsync, rename `.partial` -> final; prune old ones.

    A `step_N/` already there is one a resume skipped as unloadable: it is moved aside, not deleted.
    """
    p = partial_dir(root, step)
    (p / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
    with open(p / MARKER, "w") as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    final = step_dir(root, step)
    if final.exists():
        aside = _free_name(final.with_name(final.name + ".bad"))
        os.replace(final, aside)
        log.warning("kept the checkpoint this save replaces as %s", aside)
    os.replace(p, final)
    why = problem(final, step)
    if why is not None:
        log.error("the checkpoint just written fails its check: %s (%s)", final, why)
    prune(root, keep_last)
    return final


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete the checkpoints older than the newest `keep_last` that pass `problem()` (0 = keep all).

    So the only loadable checkpoint is never deleted, however many newer broken ones there are;
    broken ones newer than the oldest kept one stay for a person to look at.
    """
    if keep_last <= 0:
        return []
    found, kept = complete(root), 0
    for i in range(len(found) - 1, -1, -1):
        kept += problem(found[i][1], found[i][0]) is None
        if kept == keep_last:
            old = [d for _, d in found[:i]]
            for d in old:
                shutil.rmtree(d, ignore_errors=True)
            return old
    return []


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}.{n}"), n + 1
    return candidate


def read_trainer_state(path: str | Path) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


# ---- the run's config -----------------------------------------------------------------------------
# Fields a resume may change: the step budget, when to evaluate/checkpoint, where metrics go, and
# where and how the processes run (a requeued Slurm job gets another head node address). Every
# other field changes what the run computes.
RESUME_MAY_CHANGE = frozenset(
    {
        "trainer.steps",
        "trainer.eval_every",
        "trainer.checkpoint_every",
        "trainer.keep_checkpoints",
        "trainer.tensorboard",
        "trainer.wandb_project",
        "trainer.run_dir",
        "trainer.make_tiny_model_dir",
        "trainer.make_tiny_model_args",
        "trainer.ray_address",
        "trainer.ray_num_cpus",
        "trainer.sync_tolerance",  # a check of the sync, not what it computes
        "trainer.allow_config_change",
        "actor.max_tokens_per_micro_batch",  # how samples are packed, not what is computed
        # memory and overlap switches: the same numbers (tests/actor/test_scale_switches.py), what a
        # requeue after an out-of-memory error changes
        "actor.sequence_parallel",
        "actor.recompute_granularity",
        "actor.recompute_method",
        "actor.recompute_num_layers",
        "actor.recompute_modules",
        "actor.overlap_grad_reduce",
        "actor.overlap_param_gather",
        "actor.offload",
        "rollout.max_inflight",
        "reward.workers",
        "rollout.host",
        "rollout.base_port",
        "rollout.router_port",
        "rollout.python",
        "rollout.pythonpath",
        "rollout.log_dir",
        "rollout.startup_timeout_s",
        "rollout.request_timeout_s",
        "rollout.max_retries",
        "rollout.retry_backoff_s",
        "rollout.restart_dead_engines",
        "rollout.max_restarts",
        "rollout.sync_master_addr",
        "rollout.sync_master_port",
        "rollout.bucket_bytes",  # how the weights travel, not their values
    }
)


_ABSENT = object()


def _leaves(cfg, prefix: str = "") -> dict[str, object]:
    """Dotted name -> value (as JSON has it) of every field of a config tree."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_leaves(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = json.loads(json.dumps(v))
    return out


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def config_changes(saved: dict, cfg) -> list[str]:
    """`field (old -> new)` for every field outside RESUME_MAY_CHANGE whose value differs.

    A field the saved config does not have (added to the code since) counts only when its new value
    differs from the code's default, which is how the saved run behaved.
    """
    defaults = _leaves(type(cfg)())
    out = []
    for key, value in _leaves(cfg).items():
        if key in RESUME_MAY_CHANGE:
            continue
        old = _lookup(saved, key)
        if old is _ABSENT:
            if key in defaults and defaults[key] != value:
                out.append(f"{key} (default {defaults[key]!r} -> {value!r})")
        elif old != value:
            out.append(f"{key} ({old!r} -> {value!r})")
    return out


def _saved_config(run_dir: Path) -> dict | None:
    path = run_dir / CONFIG
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: the run's saved config is unreadable ({e}); move it aside to resume"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: the run's saved config is not a mapping; move it aside to resume")
    return saved


def check_resume_config(cfg) -> None:
    """Refuse (ConfigError, one line) to resume `cfg.trainer.run_dir` with a config that changes what
    the run computes, unless `trainer.allow_config_change`. A run dir without a complete checkpoint
    is a fresh start and may take any config."""
    run_dir = Path(cfg.trainer.run_dir)
    resumed = latest_complete(run_dir / "checkpoints")
    saved = _saved_config(run_dir) if resumed else None
    if saved is None or cfg.trainer.allow_config_change:
        return
    changes = config_changes(saved, cfg)
    if changes:
        raise ConfigError(
            f"trainer.run_dir={run_dir} resumes from {resumed[1].name} a run started with another config: "
            f"{', '.join(changes)}; use a new trainer.run_dir, or set trainer.allow_config_change=true "
            f"to continue with the new values (the old {CONFIG} is kept as config.step_N.json)"
        )


def adopt_config(cfg) -> Path | None:
    """Check (as `check_resume_config`), then write `cfg` as the run's config.json; an old one that
    differs is first kept as `config.step_N.json` (N: the step it was in force until). Returns that."""
    check_resume_config(cfg)
    run_dir = Path(cfg.trainer.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    new = dataclasses.asdict(cfg)
    saved, kept = _saved_config(run_dir), None
    if saved is not None and saved != json.loads(json.dumps(new)):
        resumed = latest_complete(run_dir / "checkpoints")
        kept = _free_name(run_dir / f"config.step_{resumed[0] if resumed else 0:06d}.json")
        os.replace(run_dir / CONFIG, kept)
        log.info("the run's previous config is kept as %s", kept)
    tmp = run_dir / f".{CONFIG}.tmp"
    tmp.write_text(json.dumps(new, indent=1))
    os.replace(tmp, run_dir / CONFIG)
    return kept
