"""Outcome advantage estimators (verl `core_algos.py::compute_*_outcome_advantage`) and entropy shaping.

All estimators run on the driver over the whole training batch, before it is split over ranks (a group
must never be split before its statistics are computed). Inputs: one scalar reward per response
(`rewards` [B]), a group id per response (`group_ids`: ints, strings or a tensor; equal id = same
prompt) and the `response_mask` [B, L]. Output: per-token advantages [B, L] (zero on padding).
"""

from __future__ import annotations

import torch

from pipeline.algorithms.config import ADVANTAGE_ESTIMATORS, AdvantageConfig


def _group_index(group_ids, n: int) -> torch.Tensor:
    if isinstance(group_ids, torch.Tensor):
        ids = group_ids.reshape(-1).tolist()
    else:
        ids = list(group_ids)
    if len(ids) != n:
        raise ValueError(f"group_ids has {len(ids)} entries but rewards has {n}")
    index: dict = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in ids], dtype=torch.int64)


def _check(rewards: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be one scalar per response, shape [B]; got {tuple(rewards.shape)}")
    if response_mask.dim() != 2 or response_mask.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"response_mask must be [B, L] with B = {rewards.shape[0]}; got {tuple(response_mask.shape)}"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return rewards.to(dtype), response_mask.bool()


def _group_stats(rewards: torch.Tensor, group: torch.Tensor):
    """Per-response group mean, unbiased std and size (size 1: mean 0, std 1 as in verl)."""
    n_groups = int(group.max()) + 1
    size = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, group, torch.ones_like(rewards)
    )
    total = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, group, rewards)
    mean = total / size
    sq = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, group, (rewards - mean[group]) ** 2
    )
    std = torch.sqrt(sq / (size - 1).clamp(min=1))
    single = size == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return mean[group], std[group], size[group]


def grpo_advantages(rewards, group_ids, response_mask, norm_by_std: bool = True, eps: float = 1e-6):
    """GRPO: A_i = (R_i - mean_g R) / (std_g R + eps), std unbiased (N-1); group of 1 -> A = R.

    `norm_by_std=False` is Dr.GRPO (arXiv 2503.20783): A_i = R_i - mean_g R.
    """
    rewards, mask = _check(rewards, response_mask)
    mean, std, _ = _group_stats(rewards, _group_index(group_ids, rewards.numel()).to(rewards.device))
    adv = rewards - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return adv[:, None] * mask


def dr_grpo_advantages(rewards, group_ids, response_mask):
    """Dr.GRPO: A_i = R_i - mean_g R (pair with loss_agg_mode seq-mean-token-sum-norm)."""
    return grpo_advantages(rewards, group_ids, response_mask, norm_by_std=False)


def rloo_advantages(rewards, group_ids, response_mask):
    """RLOO: A_i = R_i - mean_{j != i} R_j = G/(G-1) (R_i - mean_g R); group of 1 -> A = R."""
    rewards, mask = _check(rewards, response_mask)
    mean, _, size = _group_stats(rewards, _group_index(group_ids, rewards.numel()).to(rewards.device))
    adv = torch.where(size > 1, (rewards - mean) * size / (size - 1).clamp(min=1), rewards)
    return adv[:, None] * mask


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """verl `masked_whiten`: (x - mean) / sqrt(var + eps), var Bessel-corrected, over valid tokens."""
    mask = mask.bool()
    n = mask.sum()
    if n < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens, got {int(n)}")
    x = torch.where(mask, values, torch.zeros_like(values))
    mean = x.sum() / n
    var = (torch.where(mask, values - mean, torch.zeros_like(values)) ** 2).sum() / (n - 1)
    return (values - mean) * torch.rsqrt(var + eps)


def reinforce_plus_plus_advantages(
    token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0
):
    """REINFORCE++: G_t = sum_{s>=t} gamma^(s-t) r_s (reset after the response), whitened over the batch."""
    if token_rewards.shape != response_mask.shape or token_rewards.dim() != 2:
        raise ValueError(
            f"token_rewards {tuple(token_rewards.shape)} and response_mask {tuple(response_mask.shape)} "
            "must both be [B, L]"
        )
    mask = response_mask.to(token_rewards.dtype)
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    return masked_whiten(returns, response_mask) * mask


def reinforce_plus_plus_baseline_advantages(rewards, group_ids, response_mask):
    """REINFORCE++-baseline: R_i - mean_g R (group of 1 -> baseline 0), broadcast, whitened over the batch."""
    rewards, mask = _check(rewards, response_mask)
    mean, _, _ = _group_stats(rewards, _group_index(group_ids, rewards.numel()).to(rewards.device))
    adv = (rewards - mean)[:, None] * mask
    return masked_whiten(adv, mask) * mask


def compute_advantages(cfg: AdvantageConfig, rewards, group_ids, response_mask) -> torch.Tensor:
    """Dispatch on `cfg.estimator`; REINFORCE++ puts each response's reward on its last valid token."""
    name = cfg.estimator
    if name == "grpo":
        return grpo_advantages(rewards, group_ids, response_mask, cfg.norm_by_std, cfg.eps)
    if name == "dr_grpo":
        return dr_grpo_advantages(rewards, group_ids, response_mask)
    if name == "rloo":
        return rloo_advantages(rewards, group_ids, response_mask)
    if name == "reinforce_plus_plus_baseline":
        return reinforce_plus_plus_baseline_advantages(rewards, group_ids, response_mask)
    if name == "reinforce_plus_plus":
        rewards, mask = _check(rewards, response_mask)
        last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask
        last = last & (last.cumsum(-1) == 1)
        return reinforce_plus_plus_advantages(rewards[:, None] * last, mask, cfg.gamma)
    raise ValueError(f"unknown advantage estimator {name!r}; expected one of {list(ADVANTAGE_ESTIMATORS)}")


@torch.no_grad()
def entropy_shaped_advantages(advantages, entropy, response_mask, alpha: float = 0.4, kappa: float = 2.0):
    """A + min(alpha * H.detach(), |A| / kappa) (arXiv 2506.14758, "Reasoning with Exploration").

    kappa > 1 keeps sign(A) and |A_shaped - A| <= |A| / kappa; A = 0 gets no bonus. Returns the shaped
    advantages (no grad) and (bonus, cap_binding) tensors for metrics: cap_binding marks the tokens
    whose bonus is the cap |A| / kappa, never an A = 0 token (its cap 0 is no bonus, not a binding cap).
    """
    if kappa <= 1.0 or alpha < 0.0:
        raise ValueError(f"entropy shaping needs alpha >= 0 and kappa > 1; got alpha={alpha}, kappa={kappa}")
    mask = response_mask.bool()
    cap = advantages.abs() / kappa
    bonus = torch.where(mask, torch.minimum(alpha * entropy.detach(), cap), torch.zeros_like(cap))
    cap_binding = mask & (advantages != 0) & (alpha * entropy.detach() >= cap)
    return advantages.detach() + bonus, bonus, cap_binding
