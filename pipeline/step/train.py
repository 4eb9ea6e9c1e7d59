"""train: the optimizer steps of one RL step, then what they did to the policy's entropy.

The batch is split into `trainer.mini_batches_per_step` consecutive mini-batches, each one optimizer
step of the actor, for `trainer.epochs` passes. Until the first update is applied the weights are those
of the old forward, so those mini-batches reuse its log-probs as the current policy's (no extra
forward, `on_policy`). A mini-batch whose loss or gradient is not finite is skipped on every rank; the
step reports whether any was applied (then the engines must get the new weights, `sync`).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from pipeline import telemetry
from pipeline.algorithms.controller import measure_entropy
from pipeline.batch import Batch
from pipeline.metrics import timed

log = logging.getLogger("pipeline.train")


def train(job, batch: Batch, old: dict, m: dict) -> bool:
    """Optimizer steps on `batch`; True if any was applied. `old` is the old forward (telemetry)."""
    t, state = job.cfg.trainer, job.state
    loss_cfg = loss_config(job)
    parts = batch.split(min(t.mini_batches_per_step, len(batch) // job.actors.dp_size))
    updates, applied = [], 0
    t0 = time.perf_counter()
    with timed(m, "update"):
        for _epoch in range(t.epochs):
            for i, mb in enumerate(parts):
                u = job.actors.train_step(mb, loss_cfg, state.step, on_policy=applied == 0, mini_batch=i)
                updates.append(u)
                applied += bool(u.get("update_successful")) and not u.get("nonfinite")
    seconds = time.perf_counter() - t0
    skipped = sum(bool(u.get("nonfinite")) for u in updates)
    state.nan_streak = state.nan_streak + 1 if skipped else 0
    m.update(_mean_metrics(updates, prefix="actor/"))
    m.update(packing_metrics([u["packing"] for u in updates], seconds))
    m["actor/skipped_nonfinite"] = int(skipped > 0)
    m["actor/skipped_mini_batches"] = skipped
    if job.controller is not None:
        if applied:  # one update per RL step, from the old policy's log-probs
            job.controller.update(measure_entropy(batch.old_log_prob, batch.loss_mask))
        m.update({f"entropy_control/{k}": float(v) for k, v in job.controller.state_dict().items()})
        m["entropy_control/alpha_used"] = loss_cfg.entropy_coef
    if t.entropy_telemetry:
        m.update(entropy_dynamics(job, batch, old, applied > 0))
    return applied > 0


def loss_config(job):
    """`loss` with this step's entropy coefficient (Skywork-OR1's controller) and the Dr.GRPO
    constant of seq-mean-token-sum-norm (the generation budget, when `loss_scale_factor` is unset)."""
    cfg = job.cfg
    loss_cfg = cfg.loss
    if job.controller is not None:
        loss_cfg = dataclasses.replace(loss_cfg, entropy_coef=job.controller.alpha())
    if loss_cfg.loss_agg_mode == "seq-mean-token-sum-norm" and loss_cfg.loss_scale_factor is None:
        loss_cfg = dataclasses.replace(loss_cfg, loss_scale_factor=float(cfg.trainer.max_response_tokens))
    return loss_cfg


def packing_metrics(per_update: list[list[dict]], seconds: float) -> dict:
    """perf/*: real tokens / token slots computed, micro-batches and tokens per data-parallel rank,
    and the actor's training throughput (real tokens through forward + backward per second)."""
    ranks = [r for ranks in per_update for r in ranks]
    tokens, slots = sum(r["tokens"] for r in ranks), sum(r["slots"] for r in ranks)
    n = len(per_update)
    return {
        "perf/padding_efficiency": tokens / max(slots, 1),
        "perf/actor_tokens_per_s": tokens / max(seconds, 1e-9),
        "perf/micro_batches_per_rank": sum(r["micro_batches"] for r in ranks) / max(len(ranks), 1),
        "perf/max_tokens_per_rank": sum(max(r["tokens"] for r in rs) for rs in per_update) / n,
        "perf/min_tokens_per_rank": sum(min(r["tokens"] for r in rs) for rs in per_update) / n,
    }


def entropy_dynamics(job, batch: Batch, old: dict, applied: bool) -> dict:
    """Covariance of log-prob and advantage, predicted vs measured entropy change (telemetry)."""
    mask, state = batch.loss_mask, job.state
    out = {
        f"entropy_dynamics/cov_{k}": v
        for k, v in telemetry.covariance_stats(old["log_prob"], batch.advantages, mask).items()
    }
    predicted = telemetry.predicted_entropy_change(batch.advantages, old["influence"], mask, job.cfg.actor.lr)
    out["entropy_dynamics/predicted_change"] = predicted
    if applied:  # the same tokens under the updated policy: the entropy change that happened
        with timed(out, "entropy_telemetry"):
            new = job.actors.compute_log_prob(batch, entropy=True)
        measured = telemetry.masked_mean(new["entropy"], mask) - telemetry.masked_mean(old["entropy"], mask)
        state.dynamics.add(predicted, measured)
        out["entropy_dynamics/measured_change"] = measured
        out["entropy_dynamics/pred_vs_measured_corr"] = state.dynamics.value()
    high = telemetry.entropy_groups(old["entropy"], mask)
    out["entropy_dynamics/high_entropy_share"] = telemetry.masked_mean(old["entropy"] * high, mask) / max(
        telemetry.masked_mean(old["entropy"], mask), 1e-12
    )  # the top fifth of tokens carries this share of the entropy
    return out


def _mean_metrics(rows: list[dict], prefix: str) -> dict:
    """Mean over the step's optimizer steps of every numeric metric the actor returned: over the
    applied ones (a skipped step's loss is NaN), except whether they applied, over all."""
    applied = [r for r in rows if r.get("update_successful") and not r.get("nonfinite")] or rows
    out = {}
    for k in dict.fromkeys(k for r in rows for k in r):
        use = rows if k in ("update_successful", "nonfinite") else applied
        vals = [float(r[k]) for r in use if isinstance(r.get(k), int | float)]
        if vals:
            out[prefix + k] = sum(vals) / len(vals)
    return out
