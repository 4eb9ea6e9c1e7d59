"""PPO-clip / DAPO (arXiv 2503.14476; verl `compute_policy_loss_vanilla`).

    l_t = max(-A r, -A clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)),  min(l_t, -c A) for A < 0

r = exp(clamp(log pi - log pi_old, -20, 20)), c = clip_ratio_c (dual clip; None = off).
DAPO = clip_ratio_high 0.28 (Clip-Higher), c = 10 (the DAPO scripts). No batch statistic: the plan is
the aggregation weights only, so the actor needs no forward before the training forward.
"""

from __future__ import annotations

from pipeline.algorithms.config import LossConfig
from pipeline.algorithms.methods.base import Method, ppo_clip_per_token
from pipeline.algorithms.plan import LossPlan


def ppo_loss(cfg: LossConfig, plan: LossPlan, log_prob, old_log_prob, advantages):
    return ppo_clip_per_token(
        log_prob, old_log_prob, advantages, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c
    )


METHOD = Method(name="ppo", per_token=ppo_loss)
