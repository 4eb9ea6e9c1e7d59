"""CISPO (MiniMax-M1, arXiv 2506.13585; verl `compute_policy_loss_cispo`, slime `compute_cispo_loss`).

    l_t = -sg(min(r, 1 + cispo_clip_high)) * A * log pi

The clipped importance-sampling weight is detached and has no lower bound, so clipped tokens still get
gradient (bound) * A through log pi (PPO's clip would zero it). Clipped tokens (weight != r) are
counted in pg_clipfrac. No batch statistic.
"""

from __future__ import annotations

import torch

from pipeline.algorithms.config import LossConfig
from pipeline.algorithms.methods.base import Method, check_non_negative, ratio
from pipeline.algorithms.plan import LossPlan


def cispo_loss(cfg: LossConfig, plan: LossPlan, log_prob, old_log_prob, advantages):
    _, r = ratio(log_prob, old_log_prob)
    weight = r.clamp(max=1.0 + cfg.cispo_clip_high).detach()
    clipped = weight != r.detach()
    return -weight * advantages * log_prob, clipped, torch.zeros_like(clipped)


def validate(cfg: LossConfig) -> None:
    check_non_negative(cfg, "cispo_clip_high")


METHOD = Method(name="cispo", per_token=cispo_loss, validate=validate)
