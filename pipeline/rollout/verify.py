"""The one check that a weight sync worked: every engine's teacher-forced log-probs of a probe equal
the trainer's, within `trainer.sync_tolerance`. The trainer runs it after every sync
(`pipeline.step.sync`); the tests of every transport run the same function.
"""

from __future__ import annotations

import math

from pipeline.errors import TrainingError

SYNC_TOLERANCE = 1e-4  # trainer.sync_tolerance: fp32 engine vs fp32 actor measure about 1e-5 on CPU


class WeightSyncError(TrainingError):
    """A weight sync that failed or whose result does not match the trainer: the step must stop."""


def check_weight_sync(
    engine,
    sequences: list[list[int]],
    prompt_lens: list[int],
    trainer_logprobs: list[list[float]],
    *,
    tolerance: float = SYNC_TOLERANCE,
    temperature: float = 1.0,
    version: int | None = None,
) -> float:
    """Max |engine - trainer| log-prob over the probe's response tokens and every engine.

    `engine`: anything with `engine_logprobs` (an `Engine`, or the job's `RolloutGroup`, which asks
    each engine across its Ray actors); `trainer_logprobs`: per sequence, its tokens after the prompt.
    Raises WeightSyncError beyond `tolerance`.
    """
    version = engine.weight_version if version is None else version
    worst, where = 0.0, 0
    for e, got in enumerate(engine.engine_logprobs(sequences, prompt_lens, temperature)):
        for a, b in zip(got, trainer_logprobs, strict=True):
            if len(a) != len(b):
                raise WeightSyncError(f"probe lengths differ: engine {e} {len(a)}, trainer {len(b)}")
            diffs = [abs(x - y) for x, y in zip(a, b)]
            diff = math.nan if any(math.isnan(d) for d in diffs) else max(diffs, default=0.0)
            if not math.isnan(worst) and not diff <= worst:  # NaN wins: it never passes
                worst, where = diff, e
    if not worst <= tolerance:
        raise WeightSyncError(
            f"weight sync check failed after syncing weight version {version}: engine {where}'s log-probs "
            f"of the probe differ from the trainer's by {worst:.3g} > trainer.sync_tolerance={tolerance:g}: "
            "names, layouts or dtypes of the exported weights do not match the served model"
        )
    return worst
