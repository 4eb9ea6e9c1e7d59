"""save / resume: what a restart needs, written so that a run killed mid-save never uses it.

`save` writes the actor (model, optimizer, LR schedule, RNG, the controller) and the trainer state
(prompt sampler, engine generators, counters, running statistics) into `checkpoints/step_N.partial/`
and commits it (`pipeline/checkpoint.py`). `resume` loads the newest one that passes
`checkpoint.latest_loadable` (a bad newer one is skipped with a warning, never deleted) and drops
the metrics lines after its step; the caller then syncs the resumed weights into the engines.
"""

from __future__ import annotations

import logging
import time

from pipeline import checkpoint
from pipeline.errors import TrainingError

log = logging.getLogger("pipeline.train")


def save(job, m: dict | None = None) -> None:
    t0 = time.perf_counter()
    state = job.state
    root = job.run_dir / "checkpoints"
    path = checkpoint.begin(root, state.step)
    job.actors.save_checkpoint(
        str(path / checkpoint.ACTOR_DIR),
        {"controller": job.controller.state_dict() if job.controller else None},
    )
    trainer_state = {
        "step": state.step,
        "sampler": job.sampler.state_dict(),
        "rollout": job.rollout.state_dict(),
        "nan_streak": state.nan_streak,
        "group_counter": state.group_counter,
        "dynamics": state.dynamics.state_dict(),
        "law_points": state.law_points,
        "warned_long": state.warned_long,
    }
    checkpoint.commit(root, state.step, trainer_state, keep_last=job.cfg.trainer.keep_checkpoints)
    if m is not None:
        m["time/checkpoint"] = time.perf_counter() - t0


def resume(job) -> bool:
    """Continue from the newest loadable checkpoint; False if there is none. The engines still serve
    the start-up weights: the caller syncs step `job.step`'s."""
    found, skipped = checkpoint.latest_loadable(job.run_dir / "checkpoints")
    if skipped:  # never deleted: a later save at that step moves it aside to step_N.bad
        why = checkpoint.describe_skipped(skipped)
        if found is None:
            raise TrainingError(
                f"no checkpoint in {job.run_dir / 'checkpoints'} can be resumed from: {why}; "
                "move them aside to start the run over"
            )
        log.warning("resuming from %s: skipped the newer checkpoint(s) %s", found[1].name, why)
    if found is None:
        return False
    step, path = found
    try:
        extra = job.actors.load_checkpoint(str(path / checkpoint.ACTOR_DIR))
    except Exception as e:  # passed the check, yet its contents are wrong: say which one
        last = str(e).strip().splitlines()[-1][:300] if str(e).strip() else ""
        raise TrainingError(
            f"checkpoint {path} passed the resume check but does not load ({type(e).__name__}: {last}); "
            "move it aside to resume from an older one"
        ) from e
    saved = checkpoint.read_trainer_state(path)
    state = job.state
    job.sampler.load_state_dict(saved["sampler"])
    job.rollout.load_state_dict(saved["rollout"])
    state.nan_streak, state.group_counter = saved["nan_streak"], saved["group_counter"]
    state.dynamics.load_state_dict(saved["dynamics"])
    state.law_points = [tuple(p) for p in saved["law_points"]]
    state.warned_long = saved.get("warned_long", False)
    if job.controller is not None and extra.get("controller"):
        job.controller.load_state_dict(extra["controller"])
    state.step = step
    job.metrics.truncate_after(step)
    log.info("resumed from %s (step %d)", path, step)
    print(f"[pipeline] resumed from {path} (step {step})", flush=True)
    return True
