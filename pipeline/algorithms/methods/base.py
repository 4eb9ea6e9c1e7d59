"""What a loss method is: the `Method` record each module of this package declares (its per-token loss,
its batch statistics, what it needs and its metrics), and the per-token pieces several methods share.

The shared code (`pipeline/algorithms/losses.py`) calls only these hooks, so it names no method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline.algorithms.config import LossConfig
from pipeline.algorithms.plan import MiniBatch
from pipeline.errors import ConfigError

Tensor = torch.Tensor


@dataclass(kw_only=True)
class Prepared:
    """A method's part of the plan, from its `prepare` (no grad, over the whole mini-batch).

    sums       local metric sums, all-reduced with the plan's (the method's `plan_metrics` reads them)
    keep       bool: tokens whose policy-gradient term stays (None: all; Clip-Cov drops its picks)
    selected   bool: the tokens the method treats specially (by_entropy/{high,low}_selected_frac)
    kl_weight  per-token weight of the reference KL added to kl_coef's (None: no KL term of its own)
    tensors    its own per-token tensors, handed back as `plan.tensors` to `per_token` and `apply_sums`
    """

    sums: dict[str, Tensor] = field(default_factory=dict)
    keep: Tensor | None = None
    selected: Tensor | None = None
    kl_weight: Tensor | None = None
    tensors: dict[str, Tensor] = field(default_factory=dict)


def _never(cfg: LossConfig) -> bool:
    return False


def _no_fields(cfg: LossConfig) -> None:
    return None


def old_minus_new(log_prob: Tensor, old_log_prob: Tensor) -> Tensor:
    """The ppo_kl metric's per-token value: log pi_old - log pi (verl's `ppo_kl`)."""
    return old_log_prob - log_prob


@dataclass(frozen=True, kw_only=True)
class Method:
    """A loss method: everything the shared prepare/apply/finish code needs to know about it.

    This record is the one place a method declares its inputs: the actor reads `loss_needs(cfg)` to
    decide which forwards to run before the training forward, the trainer to decide whether a
    reference policy is kept. The hooks run in this order:

        validate(cfg)                                   LossConfig.validate: the method's own fields
        prepare(MiniBatch) -> Prepared                  prepare_loss: no grad, may communicate
        plan_metrics(sums, n_tokens) -> metrics         prepare_loss: from the all-reduced sums
        per_token(cfg, plan, log_prob, old_log_prob, advantages) -> (loss, clipped, clipped_lower)
        ppo_kl(log_prob, old_log_prob) -> per token     apply_loss: the ppo_kl metric (detached)
        apply_sums(cfg, plan, log_prob, old_log_prob, mask, kl) -> sums
                                                        apply_loss: detached; kl is None without a reference
        finish_metrics(sums, n_tokens) -> metrics       finish_metrics: from the totals

    `plan_metrics` and `finish_metrics` pop the sums they turn into metrics; the rest are reported raw.
    """

    name: str  # the `loss.method` value
    per_token: Callable[..., tuple[Tensor, Tensor, Tensor]]
    prepare: Callable[[MiniBatch], Prepared] | None = None
    needs_log_prob: bool = False  # prepare reads the current policy's log-probs over the whole mini-batch
    needs_entropy: bool = False  # prepare reads the current policy's entropies over the whole mini-batch
    needs_reference: Callable[[LossConfig], bool] = _never  # its own reference-KL terms are on
    validate: Callable[[LossConfig], None] = _no_fields  # raises ConfigError on its own fields
    plan_metrics: Callable[[dict[str, float], float], dict[str, float]] | None = None
    ppo_kl: Callable[[Tensor, Tensor], Tensor] = old_minus_new
    apply_sums: Callable[..., dict[str, Tensor]] | None = None
    finish_metrics: Callable[[dict[str, float], float], dict[str, float]] | None = None
    clipfrac_metric: str = "pg_clipfrac"  # the name of the clipped-token fraction in finish_metrics


# ----------------------------------------------------------------------------------------------
# Per-token pieces several methods share
# ----------------------------------------------------------------------------------------------


def ratio(log_prob: Tensor, old_log_prob: Tensor) -> tuple[Tensor, Tensor]:
    """(log r, r) with log r = clamp(log pi - log pi_old, -20, 20)."""
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
    return log_ratio, log_ratio.exp()


def ppo_clip_per_token(log_prob, old_log_prob, advantages, clip_low, clip_high, clip_c):
    """l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); if A < 0 and c: l = min(l, -c A).

    Returns (loss, clipped, clipped_lower) per token; the offsets may be floats or per-token tensors."""
    _, r = ratio(log_prob, old_log_prob)
    lo = 1.0 - torch.as_tensor(clip_low, dtype=r.dtype)
    hi = 1.0 + torch.as_tensor(clip_high, dtype=r.dtype)
    raw = -advantages * r
    clp = -advantages * torch.minimum(torch.maximum(r, lo), hi)
    per_tok = torch.maximum(raw, clp)
    clipped = clp > raw
    clipped_lower = torch.zeros_like(clipped)
    if clip_c is not None:
        cap = -advantages * clip_c
        clipped_lower = (advantages < 0) & (per_tok > cap)
        per_tok = torch.where(advantages < 0, torch.minimum(per_tok, cap), per_tok)
    return per_tok, clipped, clipped_lower


def covariance_sums(prefix: str, cov: Tensor, selected: Tensor) -> dict[str, Tensor]:
    """The metric sums of a covariance selection (Clip-Cov, KL-Cov): how many, and Cov's sums."""
    return {
        f"{prefix}/selected": selected.sum(),
        f"{prefix}/cov_selected_sum": torch.where(selected, cov, 0).sum(),
        f"{prefix}/cov_sum": cov.sum(),
    }


def covariance_metrics(prefix: str, v: dict[str, float], n_tokens: float) -> dict[str, float]:
    """`{prefix}/cov_mean` (all tokens) and `{prefix}/cov_selected_mean` from `covariance_sums`."""
    sel = v[f"{prefix}/selected"]
    return {
        f"{prefix}/cov_mean": v.pop(f"{prefix}/cov_sum") / n_tokens,
        f"{prefix}/cov_selected_mean": v.pop(f"{prefix}/cov_selected_sum") / max(sel, 1.0),
    }


def check_fraction(name: str, value: float, hint: str = "a fraction") -> None:
    """ConfigError unless 0 < value <= 1."""
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"loss.{name}={value}: must be in (0, 1] ({hint})")


def check_non_negative(cfg: LossConfig, *names: str) -> None:
    """ConfigError naming the first of `names` that is negative."""
    for name in names:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"loss.{name}={getattr(cfg, name)}: must be >= 0")
