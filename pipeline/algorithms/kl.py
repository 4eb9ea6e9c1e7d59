"""Sampled-token KL estimators (Schulman, "Approximating KL divergence"; verl `kl_penalty_forward`).

delta = log_prob - ref_log_prob.  k1 = delta; k2 = delta^2 / 2; k3 = exp(-delta) - 1 + delta with
delta clamped to [-20, 20] and the value to [-10, 10] (verl `low_var_kl`); abs = |delta| (KL-Cov).
"""

from __future__ import annotations

import torch


def k1(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Unbiased, can be negative; as a loss its expected on-policy gradient is 0 (use it as a reward)."""
    return log_prob - ref_log_prob


def k2(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Biased value; gradient delta * grad log pi estimates grad KL(pi || ref) on-policy."""
    return 0.5 * (log_prob - ref_log_prob).square()


def k3(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Unbiased, >= 0 (verl `low_var_kl`): delta clamped to [-20, 20], value clamped to [-10, 10]."""
    delta = (log_prob - ref_log_prob).clamp(-20.0, 20.0)
    return (torch.exp(-delta) - 1.0 + delta).clamp(-10.0, 10.0)


def abs_kl(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """|delta|; KL-Cov's penalty against pi_old (gradient 0 at delta = 0)."""
    return (log_prob - ref_log_prob).abs()


KL_ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3, "abs": abs_kl}


def kl_estimate(name: str, log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; expected one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name](log_prob, ref_log_prob)
