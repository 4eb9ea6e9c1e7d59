"""Configuration of the loss library: `LossConfig`, `AdvantageConfig`, `EntropyControlConfig`.

Field names and defaults follow the reference code (see `docs/algorithms.md` and the shared
entropy-methods spec). Every `validate()` raises `ConfigError` naming the field and what would work.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")


@dataclass(kw_only=True, slots=True)
class LossConfig:
    method: str = "ppo"  # a name in algorithms/methods' METHODS; ppo = DAPO with clip_ratio_high=0.28
    clip_ratio_low: float = 0.2  # PPO trust region lower offset: ratio >= 1 - this
    clip_ratio_high: float = 0.2  # PPO trust region upper offset (0.28 = DAPO Clip-Higher)
    clip_ratio_c: float | None = 3.0  # dual-clip bound for A < 0 tokens (None = off; DAPO scripts: 10)
    # each method's own fields, validated by its module in pipeline/algorithms/methods/
    cispo_clip_high: float = 0.2  # CISPO: detached IS weight capped at 1 + this, no lower bound
    clip_cov_ratio: float = 2e-4  # Clip-Cov: fraction of valid tokens to detach (at least 1)
    clip_cov_lb: float = 1.0  # Clip-Cov: candidates have lb < Cov < ub
    clip_cov_ub: float = 5.0  # Clip-Cov: candidates have lb < Cov < ub
    kl_cov_ratio: float = 2e-3  # KL-Cov: fraction (not percent) of valid tokens penalised (at least 1)
    kl_cov_coef: float = 1.0  # KL-Cov: beta of the |log r| penalty (paper/scripts 1.0; verl config 0.1)
    archer_entropy_quantile: float = 0.8  # Archer: per-response entropy quantile splitting low/high
    archer_clip_low_entropy: float = 0.2  # Archer: symmetric clip offset of low-entropy tokens
    archer_clip_high_entropy: float = 0.5  # Archer: symmetric clip offset of high-entropy tokens
    archer_kl_coef_low_entropy: float = 1e-3  # Archer: KL weight, mean over low-entropy tokens
    archer_kl_coef_high_entropy: float = 0.0  # Archer: KL weight, mean over high-entropy tokens
    # composable with every method
    top_entropy_ratio: float = 1.0  # policy gradient only on the top fraction of entropy tokens (0.2 = 80/20)
    entropy_coef: float = (
        0.0  # entropy bonus: loss -= coef * agg(H) with gradient (Skywork: controller alpha)
    )
    kl_coef: float = 0.0  # reference-policy KL loss weight (0 = off; needs ref_log_prob)
    kl_estimator: str = "k3"  # k1, k2 or k3 (low_var_kl); also used by Archer's KL terms
    loss_agg_mode: str = "token-mean"  # token-mean, seq-mean-token-mean, seq-mean-token-sum(-norm)
    loss_scale_factor: float | None = None  # seq-mean-token-sum-norm divisor (None = padded length L)
    adv_entropy_shaping: bool = False  # add min(alpha*H, |A|/kappa) to the advantages (arXiv 2506.14758)
    adv_shaping_alpha: float = 0.4  # entropy-shaping alpha
    adv_shaping_kappa: float = 2.0  # entropy-shaping kappa (> 1: the bonus never flips A's sign)
    global_stats: bool = True  # statistics over the whole mini-batch across dp_group (False = per call)
    seed: int = 0  # Clip-Cov's random pick depends on (seed, step, sample_id, position) only

    def validate(self) -> None:
        from pipeline.algorithms.methods import METHODS  # the registry imports this module

        if self.method not in METHODS:
            raise ConfigError(f"loss.method={self.method!r}: expected one of {list(METHODS)}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ConfigError(
                f"loss.loss_agg_mode={self.loss_agg_mode!r}: expected one of {list(LOSS_AGG_MODES)}"
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(
                f"loss.kl_estimator={self.kl_estimator!r}: expected one of {list(KL_ESTIMATORS)}"
            )
        for name in ("clip_ratio_low", "clip_ratio_high", "kl_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name}={getattr(self, name)}: must be >= 0")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ConfigError(
                f"loss.clip_ratio_c={self.clip_ratio_c}: must be > 1 (e.g. 3 or 10), or null (off)"
            )
        if not 0.0 < self.top_entropy_ratio <= 1.0:
            raise ConfigError(f"loss.top_entropy_ratio={self.top_entropy_ratio}: must be in (0, 1] (1 = off)")
        if self.loss_scale_factor is not None and self.loss_scale_factor <= 0:
            raise ConfigError(f"loss.loss_scale_factor={self.loss_scale_factor}: must be > 0 or null")
        if self.adv_shaping_alpha < 0 or self.adv_shaping_kappa <= 1.0:
            raise ConfigError(
                f"loss.adv_shaping_alpha={self.adv_shaping_alpha}, loss.adv_shaping_kappa="
                f"{self.adv_shaping_kappa}: need alpha >= 0 and kappa > 1"
            )
        for method in METHODS.values():  # every method's fields, whichever method is chosen
            method.validate(self)


@dataclass(kw_only=True, slots=True)
class AdvantageConfig:
    estimator: str = "grpo"  # grpo, dr_grpo, rloo, reinforce_plus_plus, reinforce_plus_plus_baseline
    norm_by_std: bool = True  # grpo only: divide by the (unbiased) group std + eps
    eps: float = 1e-6  # grpo std epsilon
    gamma: float = 1.0  # reinforce_plus_plus discount

    def validate(self) -> None:
        if self.estimator not in ADVANTAGE_ESTIMATORS:
            raise ConfigError(
                f"advantage.estimator={self.estimator!r}: expected one of {list(ADVANTAGE_ESTIMATORS)}"
            )
        if self.eps <= 0 or not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(
                f"advantage.eps={self.eps}, advantage.gamma={self.gamma}: need eps > 0, gamma in [0, 1]"
            )


@dataclass(kw_only=True, slots=True)
class EntropyControlConfig:
    enabled: bool = False  # Skywork-OR1 adaptive entropy coefficient (replaces loss.entropy_coef)
    target: float = 0.2  # target entropy; the bonus is on only while the measurement is below it
    delta: float = 1e-4  # coefficient step per RL step
    coef_min: float = 0.0  # lower clip of the coefficient
    coef_max: float = 5e-3  # upper clip of the coefficient
    coef_init: float = 0.0  # starting coefficient

    def validate(self) -> None:
        if not 0.0 <= self.coef_min <= self.coef_init <= self.coef_max:
            raise ConfigError(
                f"entropy_control: need 0 <= coef_min ({self.coef_min}) <= coef_init ({self.coef_init}) "
                f"<= coef_max ({self.coef_max})"
            )
        if self.delta < 0:
            raise ConfigError(f"entropy_control.delta={self.delta}: must be >= 0")
