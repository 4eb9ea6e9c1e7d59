"""Skywork-OR1 (MAGIC, arXiv 2505.22312) adaptive entropy coefficient, `EntController` in their code.

alpha_k = c_k * 1[e_{k-1} < target]; after the update of step k: c += delta if e_k < target else
c -= delta, clipped to [coef_min, coef_max]; enabled = e_k < target (strict: equality switches off).
One `update` per RL step (never per micro-batch), so alpha at step k uses the measurement of step k-1.

The measurement `measure_entropy` is the reference's sampled-token estimate -mean log pi_old(y_t); the
reference takes it from rank 0's shard only, we all-reduce over `dp_group` (global token mean).
The actor checkpoints `state_dict()` and passes `alpha()` as `entropy_coef` to `prepare_loss`.
"""

from __future__ import annotations

import torch

from pipeline.algorithms.config import EntropyControlConfig
from pipeline.algorithms.stats import all_reduce_sums


class AdaptiveEntropyController:
    def __init__(self, cfg: EntropyControlConfig | None = None):
        self.cfg = cfg or EntropyControlConfig()
        self.coef = self.cfg.coef_init
        self.enabled = True

    def alpha(self) -> float:
        """Entropy-bonus coefficient for this step (0 while the last measurement was >= target)."""
        return self.coef if self.enabled else 0.0

    def update(self, measured_entropy: float) -> None:
        below = float(measured_entropy) < self.cfg.target
        step = self.cfg.delta if below else -self.cfg.delta
        self.coef = min(max(self.coef + step, self.cfg.coef_min), self.cfg.coef_max)
        self.enabled = below

    def state_dict(self) -> dict:
        return {"coef": self.coef, "enabled": self.enabled}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])
        self.enabled = bool(state["enabled"])


@torch.no_grad()
def measure_entropy(old_log_prob: torch.Tensor, response_mask: torch.Tensor, dp_group=None) -> float:
    """-mean log pi_old over valid tokens of the whole mini-batch (all-reduced over `dp_group`)."""
    mask = response_mask.bool()
    s, n = all_reduce_sums([torch.where(mask, -old_log_prob, 0).sum(), mask.sum()], dp_group)
    if n == 0:
        raise ValueError("measure_entropy: response_mask has no valid tokens on any rank")
    return s / n
