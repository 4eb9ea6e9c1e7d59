"""advantages: the step's samples as one packed batch, with advantages computed over whole groups.

The estimator (`advantage.estimator`) sees one row per sample (`Batch.to_rows`); a group is never
split before its statistics are computed. The batch is what every later verb works on.
"""

from __future__ import annotations

import logging

import torch

from pipeline.algorithms import compute_advantages
from pipeline.batch import Batch
from pipeline.rollout import Sample

log = logging.getLogger("pipeline.train")


def advantages(job, samples: list[Sample], m: dict) -> Batch | None:
    """The batch to train on, or None (and the reason in `m`) when the step has nothing to train."""
    cfg = job.cfg
    if not samples:
        log.warning("step %d: nothing to train on (no informative group)", job.step + 1)
        m["skipped"] = 1
        return None
    scores = torch.tensor([s.meta["reward"].score for s in samples], dtype=torch.float32)
    if not bool(torch.isfinite(scores).all()):  # a reward function returned NaN/inf: skip the step
        m.update(skipped=1, **{"reward/nonfinite": int((~torch.isfinite(scores)).sum())})
        log.warning("step %d: non-finite rewards, step skipped", job.step + 1)
        return None
    if len(samples) < job.actors.dp_size:
        m.update(skipped=1, **{"sampling/too_few_samples": len(samples)})
        log.warning(
            "step %d: %d samples for %d data-parallel ranks", job.step + 1, len(samples), job.actors.dp_size
        )
        return None
    batch = Batch.from_samples(
        samples,
        sample_ids=[job.step * 1_000_000 + i for i in range(len(samples))],
        mask_truncated=cfg.reward.overlong_filter,
    )
    rows = compute_advantages(
        cfg.advantage, scores, [s.meta["group"] for s in samples], batch.to_rows(batch.loss_mask)
    )
    _warn_once_if_longer_than_budget(job, batch)
    return batch.replace(advantages=batch.from_rows(rows) * batch.loss_mask)


def _warn_once_if_longer_than_budget(job, batch: Batch) -> None:
    budget, longest = job.cfg.actor.max_tokens_per_micro_batch, max(batch.lengths)
    if budget is not None and longest > budget and not job.state.warned_long:
        job.state.warned_long = True
        over = sum(n > budget for n in batch.lengths)
        log.warning(
            "step %d: %d of %d samples are longer than actor.max_tokens_per_micro_batch=%d (the longest "
            "has %d tokens); each gets a micro-batch of its own, which sets the peak memory (shown once)",
            job.step + 1, over, len(batch), budget, longest,
        )  # fmt: skip
