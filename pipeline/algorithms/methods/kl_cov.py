"""KL-Cov (arXiv 2505.22617 "The Entropy Mechanism of RL for Reasoning LMs"; PRIME-RL/
Entropy-Mechanism-of-RL `7b_kl_cov.sh`, verl `compute_policy_loss_kl_cov`).

    Cov_t = (log pi_t - mean log pi) (A_t - mean A)          (means over the mini-batch's valid tokens)
    l_t = -A r + kl_cov_coef * |log r| * 1[t in top-k of Cov],   k = max(1, floor(kl_cov_ratio * N))

No PPO clipping at all. |log r| has zero gradient at r = 1 (a no-op on the on-policy mini-batch).
The top-k is taken in `prepare` over the whole mini-batch (ties: smallest (sample_id, position)); the
selected tokens carry beta in `plan.tensors["penalty"]`. Metrics: ppo_kl = mean |log r| (as verl logs it
for KL-Cov), kl_cov/penalty = mean beta |log r|, kl_cov/{selected, cov_mean, cov_selected_mean}.
"""

from __future__ import annotations

import torch

from pipeline.algorithms.config import LossConfig
from pipeline.algorithms.methods.base import (
    Method,
    Prepared,
    check_fraction,
    check_non_negative,
    covariance_metrics,
    covariance_sums,
    ratio,
)
from pipeline.algorithms.plan import LossPlan, MiniBatch
from pipeline.algorithms.stats import flat_token_ids, float_order_key, token_covariance, topk_mask


def kl_cov_loss(cfg: LossConfig, plan: LossPlan, log_prob, old_log_prob, advantages):
    log_ratio, r = ratio(log_prob, old_log_prob)
    per_tok = -advantages * r
    penalty = plan.tensors.get("penalty")
    if penalty is not None:
        per_tok = per_tok + penalty * log_ratio.abs()
    none = torch.zeros_like(per_tok, dtype=torch.bool)
    return per_tok, none, none


def prepare(b: MiniBatch) -> Prepared:
    cfg, m = b.cfg, b.mask
    cov = token_covariance(b.log_prob, b.advantages, m, b.group)
    k = max(1, int(cfg.kl_cov_ratio * b.n_tokens))
    tie = flat_token_ids(b.token_sample_ids, b.positions)
    sel, _ = topk_mask(float_order_key(cov), m, k, tie, b.group)
    penalty = sel.to(b.old_log_prob.dtype) * cfg.kl_cov_coef
    return Prepared(sums=covariance_sums("kl_cov", cov, sel), selected=m & (penalty > 0),
                    tensors={"penalty": penalty})  # fmt: skip


def plan_metrics(v: dict[str, float], n_tokens: float) -> dict[str, float]:
    return covariance_metrics("kl_cov", v, n_tokens)


def abs_log_ratio(log_prob, old_log_prob):
    """verl logs ppo_kl as mean |log r| for KL-Cov."""
    return (log_prob - old_log_prob).abs()


def apply_sums(cfg: LossConfig, plan: LossPlan, log_prob, old_log_prob, mask, kl):
    log_ratio, _ = ratio(log_prob, old_log_prob)
    return {"kl_cov/penalty_sum": torch.where(mask, plan.tensors["penalty"] * log_ratio.abs(), 0).sum()}


def finish_metrics(v: dict[str, float], n_tokens: float) -> dict[str, float]:
    return {"kl_cov/penalty": v.pop("kl_cov/penalty_sum") / n_tokens} if "kl_cov/penalty_sum" in v else {}


def validate(cfg: LossConfig) -> None:
    check_non_negative(cfg, "kl_cov_coef")
    check_fraction("kl_cov_ratio", cfg.kl_cov_ratio, "a fraction; 0.2 percent = 0.002")


METHOD = Method(name="kl_cov", per_token=kl_cov_loss, prepare=prepare, needs_log_prob=True, validate=validate,
                plan_metrics=plan_metrics, ppo_kl=abs_log_ratio, apply_sums=apply_sums,
                finish_metrics=finish_metrics)  # fmt: skip
