"""The entropy-method loss library: pure tensor math, process groups passed explicitly.

See `docs/algorithms.md` for the prepare/apply contract, the methods and global vs per-call statistics.
"""

from pipeline.algorithms.advantages import (
    compute_advantages,
    dr_grpo_advantages,
    entropy_shaped_advantages,
    grpo_advantages,
    masked_whiten,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_baseline_advantages,
    rloo_advantages,
)
from pipeline.algorithms.config import AdvantageConfig, EntropyControlConfig, LossConfig
from pipeline.algorithms.controller import AdaptiveEntropyController, measure_entropy
from pipeline.algorithms.kl import kl_estimate
from pipeline.algorithms.losses import (
    METHODS,
    LossPlan,
    Needs,
    aggregation_weights,
    apply_loss,
    finish_metrics,
    get_method,
    loss_needs,
    policy_loss,
    prepare_loss,
    row_quantile,
    token_covariance,
    total_sums,
)

__all__ = [
    "METHODS",
    "AdaptiveEntropyController",
    "AdvantageConfig",
    "EntropyControlConfig",
    "LossConfig",
    "LossPlan",
    "Needs",
    "aggregation_weights",
    "apply_loss",
    "compute_advantages",
    "dr_grpo_advantages",
    "entropy_shaped_advantages",
    "finish_metrics",
    "get_method",
    "grpo_advantages",
    "kl_estimate",
    "loss_needs",
    "masked_whiten",
    "measure_entropy",
    "policy_loss",
    "prepare_loss",
    "reinforce_plus_plus_advantages",
    "reinforce_plus_plus_baseline_advantages",
    "rloo_advantages",
    "row_quantile",
    "token_covariance",
    "total_sums",
]
