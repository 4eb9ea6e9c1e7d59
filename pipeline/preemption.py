"""Checkpoint-and-requeue requests from Slurm before the time limit (slurm/ray_job.sbatch).

The sbatch script is started with `--signal=B:USR1@S`: S seconds before the limit Slurm sends
SIGUSR1 to the batch shell, which touches `$PIPELINE_PREEMPT_FILE` and forwards SIGUSR1 to the
driver. Either one makes `requested()` true. The loop (`pipeline/train.py`) checks it after each
step, and a running rollout aborts on it:

    preemption.install()                      # once, in the main thread
    ...
    if preemption.requested():
        save(job)
        return "preempted"   # `python -m pipeline train` exits with REQUEUE_EXIT_CODE, which the
                             # sbatch script requeues the job on

The requeued job runs the same command, which resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "checkpointed, run me again"; must match ray_job.sbatch
FILE_ENV = "PIPELINE_PREEMPT_FILE"

_requested = False


def _on_signal(signum, frame) -> None:
    global _requested
    _requested = True


def install(signals: tuple[int, ...] = (signal.SIGUSR1,)) -> None:
    """Make `signals` set the request flag (call from the main thread; replaces previous handlers)."""
    for s in signals:
        signal.signal(s, _on_signal)


def requested() -> bool:
    """True once a handled signal arrived or the file named by $PIPELINE_PREEMPT_FILE exists."""
    if _requested:
        return True
    path = os.environ.get(FILE_ENV)
    return bool(path) and Path(path).exists()


def clear() -> None:
    """Forget a request (tests; a run that decides to continue)."""
    global _requested
    _requested = False
