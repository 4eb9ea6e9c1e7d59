"""The RL job: one step after another until `trainer.steps`.

    python -m pipeline train --config configs/demo_cpu.yaml [section.field=value ...]

A step generates responses and scores them, keeps the informative groups, packs them into one batch
with advantages, computes the old (and reference) log-probs, trains, hands the new weights to the
engines, evaluates and checkpoints. Each verb is a module of `pipeline/step/`; the Megatron actor runs
as one Ray actor per rank (`pipeline/cluster/actor_group.py`), the engines as Ray actors of their own
(`pipeline/cluster/rollout_group.py`). A run directory holds `metrics.jsonl`, TensorBoard events,
`checkpoints/step_N/` and the resolved config; the same command run again resumes.
"""

from __future__ import annotations

import logging
from functools import partial

from tqdm import tqdm

from pipeline import checkpoint, preemption
from pipeline.errors import TrainingError
from pipeline.metrics import timed
from pipeline.rollout import RolloutAborted
from pipeline.step import Job, advantages, evaluate, generate, log_probs, resume, save, sync, train

log = logging.getLogger("pipeline.train")

__all__ = ["TrainingError", "run"]


def run(cfg) -> str:
    """Train until `trainer.steps`; returns "done", or "preempted" after a checkpoint on request."""
    t = cfg.trainer
    job = Job(cfg)  # the run directory, tokenizer, prompts and the checks that need no process
    bar = None
    try:
        job.start()  # Ray, the Megatron ranks, the engines (and the hooks of trainer.hooks)
        job.phases.training()  # colocated: the engines hand the GPUs to the actor
        resume(job)  # the newest loadable checkpoint, else the HF weights the engines loaded too
        # the engines' turn, with the resumed (or their own start-up) weights: the first sync proves the mapping
        job.phases.rollout(partial(sync, job, version=job.step), moved=True)
        preemption.install()
        if job.step == 0:
            m = {
                "data/prompts": job.data_report.kept,
                "data/skipped_rows": sum(job.data_report.skipped.values()),
            }
            if t.eval_every:
                try:
                    evaluate(job, m)
                except RolloutAborted:  # a preemption request during the first evaluation
                    return preempted(job)
            job.metrics.log(0, m)
        bar = tqdm(total=t.steps, initial=job.step, desc="RL steps", unit="step")
        while job.step < t.steps:
            m: dict = {}
            try:
                samples = generate(job, m)  # rollout rounds, each scored, DAPO's dynamic sampling
            except RolloutAborted:  # a preemption request aborted the rollout
                return preempted(job)
            batch = advantages(job, samples, m)  # the packed batch, advantages over whole groups
            if batch is not None:
                with timed(m, "to_training"):
                    job.phases.training()  # colocated: the engines hand the GPUs to the actor
                batch, old = log_probs(job, batch, m)  # the old (and reference) policy's log-probs
                applied = train(job, batch, old, m)  # optimizer steps; True if any was applied
                version = job.step + 1 if applied else job.state.weight_version  # (colocated: refill)
                job.phases.rollout(partial(sync, job, m, version=version), moved=applied)  # the engines' turn
            stop_if_diverged(job, m)
            job.state.step += 1
            if t.eval_every and (job.step % t.eval_every == 0 or job.step == t.steps):
                try:
                    evaluate(job, m)
                except RolloutAborted:  # the evaluation is dropped; the step is checkpointed below
                    log.warning("step %d: evaluation aborted by a preemption request", job.step)
            saved = t.checkpoint_every and (job.step % t.checkpoint_every == 0 or job.step == t.steps)
            if saved:
                save(job, m)
            job.metrics.log(job.step, m)
            bar.set_postfix(
                acc=f"{m.get('reward/acc', float('nan')):.2f}", H=f"{m.get('entropy/mean', float('nan')):.3f}"
            )
            bar.update(1)
            if preemption.requested() and job.step < t.steps:
                return preempted(job)
        return "done"
    finally:
        if bar is not None:
            bar.close()
        job.shutdown()


def preempted(job) -> str:
    """Checkpoint the last complete step (unless it is) and report "preempted"."""
    found = checkpoint.latest_complete(job.run_dir / "checkpoints")
    if found is None or found[0] != job.step:
        save(job)
    log.warning("preemption requested: checkpointed step %d, exiting for requeue", job.step)
    return "preempted"


def stop_if_diverged(job, m: dict) -> None:
    """Warn about a skipped update; stop after more than `trainer.max_nan_steps` in a row."""
    limit, streak = job.cfg.trainer.max_nan_steps, job.state.nan_streak
    if streak > limit:
        raise TrainingError(
            f"{streak} steps in a row with a non-finite loss or gradient (trainer.max_nan_steps={limit}): "
            "the model has diverged; lower actor.lr, check the reward function and the data, or resume "
            "from an earlier checkpoint"
        )
    if m.get("actor/skipped_nonfinite"):
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d of %d mini-batches; %d steps in a row)",
            job.step + 1, m["actor/skipped_mini_batches"], job.cfg.trainer.mini_batches_per_step * job.cfg.trainer.epochs, streak,
        )  # fmt: skip
