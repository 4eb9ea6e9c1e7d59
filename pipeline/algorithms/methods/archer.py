"""Archer: dual-token constraints (arXiv 2507.15778; wizard-III/ArcherCodeR `dp_actor.py`).

Per response, tokens with H > nanquantile(H of its valid tokens, archer_entropy_quantile) are "high
entropy", the others "low entropy":

    l_t = PPO-clip(r, A) with symmetric offset eps_t (dual clip c = clip_ratio_c for A < 0)
          + beta_high * agg_high(KL) + beta_low * agg_low(KL)
    eps_t = archer_clip_high_entropy (high) | archer_clip_low_entropy (low)
    beta  = archer_kl_coef_high_entropy     | archer_kl_coef_low_entropy

Each KL term is aggregated over its own subset with the loss's `loss_agg_mode`, as the reference's
`agg_loss(kld, subset_mask, loss_agg_mode)` (token-mean: a subset mean; the seq-mean modes divide by
the batch's responses). The split and the subsets' sizes are made in `prepare`; the KL weights join
`plan.kl_weight`, the per-token offsets `plan.tensors["clip_low"/"clip_high"]`. Needs the current
policy's entropies, and a reference policy when a KL coefficient is > 0. Metrics: archer/high_frac,
archer/{low,high}_entropy_kl (each subset's KL aggregated like the loss term).
"""

from __future__ import annotations

import torch

from pipeline.algorithms.config import LossConfig
from pipeline.algorithms.methods.base import Method, Prepared, check_non_negative, ppo_clip_per_token
from pipeline.algorithms.plan import LossPlan, MiniBatch, aggregation_weights
from pipeline.algorithms.stats import all_reduce_sums, segment_quantile
from pipeline.errors import ConfigError


def archer_loss(cfg: LossConfig, plan: LossPlan, log_prob, old_log_prob, advantages):
    clip_low, clip_high = plan.tensors["clip_low"], plan.tensors["clip_high"]
    return ppo_clip_per_token(log_prob, old_log_prob, advantages, clip_low, clip_high, cfg.clip_ratio_c)


def needs_reference(cfg: LossConfig) -> bool:
    return cfg.archer_kl_coef_low_entropy > 0 or cfg.archer_kl_coef_high_entropy > 0


def prepare(b: MiniBatch) -> Prepared:
    cfg, m = b.cfg, b.mask
    h = b.entropy
    # per response: the quantile of its own valid tokens' entropies
    threshold = segment_quantile(h, m, b.segments, b.n_seqs_local, cfg.archer_entropy_quantile)
    high = m & (h > threshold[b.segments])
    low = m & ~high
    dt = b.old_log_prob.dtype
    eps_high = torch.tensor(cfg.archer_clip_high_entropy, dtype=dt)
    eps = torch.where(high, eps_high, torch.tensor(cfg.archer_clip_low_entropy, dtype=dt))
    # each KL term is agg(KL, subset, loss_agg_mode) as in the reference (`agg_loss(kld, subset_mask,
    # loss_agg_mode)`): token-mean divides by the subset's size, the seq-mean modes by the batch's B
    n_low, n_high = all_reduce_sums([low.sum(), high.sum()], b.group)
    agg = torch.zeros_like(b.old_log_prob)  # each token's weight in its own subset's aggregate
    kl_weight = torch.zeros_like(b.old_log_prob)
    for part, n, coef in (
        (low, n_low, cfg.archer_kl_coef_low_entropy),
        (high, n_high, cfg.archer_kl_coef_high_entropy),
    ):
        w = aggregation_weights(cfg.loss_agg_mode, part, max(n, 1.0), b.n_seqs, b.length_const, dt,
                                b.per_sequence(part))  # fmt: skip
        agg, kl_weight = agg + w, kl_weight + coef * w
    return Prepared(
        sums={"archer/n_high": high.sum()},
        kl_weight=kl_weight if needs_reference(cfg) else None,
        tensors={"clip_low": eps, "clip_high": eps, "high": high, "agg": agg},
    )


def plan_metrics(v: dict[str, float], n_tokens: float) -> dict[str, float]:
    return {"archer/high_frac": v.pop("archer/n_high") / n_tokens}


def apply_sums(cfg: LossConfig, plan: LossPlan, log_prob, old_log_prob, mask, kl):
    if kl is None:  # no reference given: no KL metrics
        return {}
    high, subset_kl = plan.tensors["high"], plan.tensors["agg"] * kl  # each subset's KL, loss's aggregation
    return {
        "archer/high_entropy_kl": torch.where(high, subset_kl, 0).sum(),
        "archer/low_entropy_kl": torch.where(high, 0, subset_kl).sum(),
    }


def validate(cfg: LossConfig) -> None:
    check_non_negative(cfg, "archer_clip_low_entropy", "archer_clip_high_entropy", "archer_kl_coef_low_entropy",
                       "archer_kl_coef_high_entropy")  # fmt: skip
    if not 0.0 < cfg.archer_entropy_quantile < 1.0:
        raise ConfigError(f"loss.archer_entropy_quantile={cfg.archer_entropy_quantile}: must be in (0, 1)")


METHOD = Method(name="archer", per_token=archer_loss, prepare=prepare, needs_entropy=True,
                needs_reference=needs_reference, validate=validate, plan_metrics=plan_metrics,
                apply_sums=apply_sums)  # fmt: skip
