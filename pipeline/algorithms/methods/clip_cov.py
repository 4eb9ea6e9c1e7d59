"""Clip-Cov (arXiv 2505.22617 "The Entropy Mechanism of RL for Reasoning LMs"; PRIME-RL/
Entropy-Mechanism-of-RL `7b_clip_cov.sh`, verl `compute_policy_loss_clip_cov`).

    Cov_t = (log pi_t - mean log pi) (A_t - mean A)          (means over the mini-batch's valid tokens)
    candidates = { t : lb < Cov_t < ub, not already clipped by PPO }
    pick a random max(1, floor(clip_cov_ratio * N)) of the candidates
    l_t = PPO-clip(r, A) without dual clip,  x 0 on the picked tokens (they stay in the normaliser)

The pick is made in `prepare` over the whole mini-batch (over dp_group with global_stats): each
candidate's key is a hash of (seed, step, sample_id, position), the smallest keys win, so the pick
never depends on how tokens were split. It lives in `plan.pg_weight` (zero on the picked tokens).
Metrics: pg_clipfrac = the fraction of tokens zeroed (as the reference logs it), ppo_clipfrac = the
PPO clip's fraction, clip_cov/{candidates, selected, cov_mean, cov_selected_mean}.
"""

from __future__ import annotations

from pipeline.algorithms.config import LossConfig
from pipeline.algorithms.methods.base import (
    Method,
    Prepared,
    check_fraction,
    covariance_metrics,
    covariance_sums,
    ppo_clip_per_token,
)
from pipeline.algorithms.plan import LossPlan, MiniBatch
from pipeline.algorithms.stats import flat_token_hash, flat_token_ids, token_covariance, topk_mask


def clip_cov_loss(cfg: LossConfig, plan: LossPlan | None, log_prob, old_log_prob, advantages):
    return ppo_clip_per_token(
        log_prob, old_log_prob, advantages, cfg.clip_ratio_low, cfg.clip_ratio_high, None
    )


def prepare(b: MiniBatch) -> Prepared:
    cfg, m = b.cfg, b.mask
    cov = token_covariance(b.log_prob, b.advantages, m, b.group)
    _, clipped, _ = clip_cov_loss(cfg, None, b.log_prob, b.old_log_prob, b.advantages)
    cand = m & ~clipped & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    clip_num = max(int(cfg.clip_cov_ratio * b.n_tokens), 1)
    # smallest hash first: the largest of its bitwise complement; token ids break (impossible) ties
    key = ~flat_token_hash(b.token_sample_ids, b.positions, cfg.seed, b.step)
    picked, _ = topk_mask(key, cand, clip_num, flat_token_ids(b.token_sample_ids, b.positions), b.group)
    sums = {"clip_cov/candidates": cand.sum()} | covariance_sums("clip_cov", cov, picked)
    return Prepared(sums=sums, keep=~picked, selected=m & picked)


def plan_metrics(v: dict[str, float], n_tokens: float) -> dict[str, float]:
    # the reference's pg_clipfrac is the fraction of tokens Clip-Cov zeroed
    return {"pg_clipfrac": v["clip_cov/selected"] / n_tokens} | covariance_metrics("clip_cov", v, n_tokens)


def validate(cfg: LossConfig) -> None:
    check_fraction("clip_cov_ratio", cfg.clip_cov_ratio)


# pg_clipfrac is the pick's fraction (plan_metrics), so the PPO clip's fraction is ppo_clipfrac
METHOD = Method(name="clip_cov", per_token=clip_cov_loss, prepare=prepare, needs_log_prob=True,
                validate=validate, plan_metrics=plan_metrics, clipfrac_metric="ppo_clipfrac")  # fmt: skip
