"""Shared inputs for the loss-library tests: a float64 batch with padding, ties and off-policy ratios,
the list of configurations every contract test runs, and the split-and-sum checker."""

from __future__ import annotations

import torch

from pipeline.algorithms import LossConfig, apply_loss, finish_metrics, policy_loss, prepare_loss, total_sums

D = torch.float64


def make_batch(seed: int = 0, B: int = 12, L: int = 7) -> dict:
    """Rows of random length (one empty row), quantised entropies/log-probs so ties occur."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[3] = 0
    mask = (torch.arange(L)[None, :] < lengths[:, None]).to(torch.int64)  # integer mask, as verl's
    adv = (torch.randint(-4, 5, (B, 1), generator=g).to(D) / 2).expand(B, L).clone()
    log_prob = -torch.round(torch.rand(B, L, generator=g, dtype=D) * 8) / 2 - 0.05
    old = log_prob + 0.3 * torch.randn(B, L, generator=g, dtype=D)
    entropy = torch.round(torch.rand(B, L, generator=g, dtype=D) * 8) / 4 + 0.01
    ref = log_prob + 0.2 * torch.randn(B, L, generator=g, dtype=D)
    pad = mask == 0  # garbage in padding must not matter
    log_prob[pad], old[pad], entropy[pad], ref[pad] = -1e30, float("nan"), float("inf"), 7.0
    adv = adv * mask
    ids = torch.randperm(1000, generator=g)[:B] + 5  # not the row index
    return dict(log_prob=log_prob, old_log_prob=old, advantages=adv, response_mask=mask,
                entropy=entropy, ref_log_prob=ref, sample_ids=ids)  # fmt: skip


def _cfg(**kw) -> LossConfig:
    base = dict(entropy_coef=0.01, kl_coef=0.05, seed=3)
    return LossConfig(**(base | kw))


CONTRACT_CONFIGS = {
    "dapo_token_mean": _cfg(clip_ratio_high=0.28, clip_ratio_c=10.0),
    "ppo_seq_mean_token_mean": _cfg(loss_agg_mode="seq-mean-token-mean"),
    "ppo_seq_mean_token_sum": _cfg(loss_agg_mode="seq-mean-token-sum"),
    "ppo_seq_mean_token_sum_norm": _cfg(loss_agg_mode="seq-mean-token-sum-norm"),
    "cispo": _cfg(method="cispo"),
    "clip_cov": _cfg(method="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.05, clip_cov_ub=5.0),
    "kl_cov": _cfg(method="kl_cov", kl_cov_ratio=0.15),
    "archer": _cfg(method="archer", archer_kl_coef_high_entropy=0.01, kl_coef=0.0),
    "ppo_top_entropy": _cfg(top_entropy_ratio=0.3),
    "clip_cov_top_entropy_shaped": _cfg(
        method="clip_cov",
        clip_cov_ratio=0.1,
        clip_cov_lb=0.05,
        top_entropy_ratio=0.3,
        adv_entropy_shaping=True,
    ),  # fmt: skip
    "kl_cov_top_entropy_seq_mean": _cfg(
        method="kl_cov", kl_cov_ratio=0.15, top_entropy_ratio=0.4, loss_agg_mode="seq-mean-token-mean"
    ),  # fmt: skip
    "archer_top_entropy": _cfg(method="archer", top_entropy_ratio=0.5),
    "cispo_shaped_k2": _cfg(method="cispo", adv_entropy_shaping=True, kl_estimator="k2"),
}


def leaves(batch: dict, rows=slice(None)):
    lp = batch["log_prob"][rows].clone().requires_grad_(True)
    ent = batch["entropy"][rows].clone().requires_grad_(True)
    return lp, ent


def reference(cfg: LossConfig, batch: dict):
    """Single-process loss and gradients (w.r.t. log_prob and entropy) on the whole batch."""
    lp, ent = leaves(batch)
    loss, metrics = policy_loss(cfg, lp, batch["old_log_prob"], batch["advantages"], batch["response_mask"],
                                entropy=ent, ref_log_prob=batch["ref_log_prob"],
                                sample_ids=batch["sample_ids"], step=7)  # fmt: skip
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent))
    return loss.detach(), g_lp, g_ent, metrics


def split_loss(cfg: LossConfig, batch: dict, rows: torch.Tensor, micro: list[torch.Tensor], group=None):
    """This rank's rows through prepare_loss once, then apply_loss per micro-batch (indices into `rows`).

    Returns the summed loss, the gradients scattered into full-batch-shaped tensors and the
    mini-batch's metrics (the micro-batches' sums added over `group`).
    """
    sub = {k: v[rows] for k, v in batch.items()}
    plan = prepare_loss(cfg, sub["log_prob"], sub["old_log_prob"], sub["advantages"], sub["response_mask"],
                        entropy=sub["entropy"], ref_log_prob=sub["ref_log_prob"],
                        sample_ids=sub["sample_ids"], step=7, dp_group=group)  # fmt: skip
    total = torch.zeros((), dtype=D)
    g_lp = torch.zeros_like(batch["log_prob"])
    g_ent = torch.zeros_like(batch["entropy"])
    sums = []
    for index in micro:
        mb = {k: v[index] for k, v in sub.items()}
        lp, ent = leaves(mb)
        loss, s = apply_loss(cfg, plan.rows(index), lp, mb["old_log_prob"], mb["advantages"],
                             mb["response_mask"], entropy=ent, ref_log_prob=mb["ref_log_prob"])  # fmt: skip
        sums.append(s)
        a, b = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
        total = total + loss.detach()
        g_lp[rows[index]] += a
        if b is not None:
            g_ent[rows[index]] += b
    return (
        total,
        g_lp,
        g_ent,
        finish_metrics(cfg, plan, total_sums(sums, group if cfg.global_stats else None)),
    )
