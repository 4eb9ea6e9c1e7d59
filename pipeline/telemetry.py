"""Entropy dynamics of a run (arXiv 2505.22617 §3-4): covariance, predicted vs measured entropy change,
and the empirical law R = -a exp(H) + b between validation reward and policy entropy.

Pure functions over the driver's whole step batch (all data-parallel ranks' rows): tensors in,
plain floats out.

Predicted entropy change. For a softmax policy whose logits are the parameters, a plain
policy-gradient step of size eta on the token-mean loss L = -(1/N) sum_t A_t log p(y_t) moves
each token's logits by (eta/N) A_t (e_y - p) and changes that token's entropy by
-(eta/N) A_t influence_t to first order (`pipeline.ops`: influence = p_y (log p_y + H) -
sum_a p_a^2 (log p_a + H)). The mean entropy over the batch therefore changes by

    dH_pred = -(eta / N^2) * sum_t A_t influence_t.

This is exact to first order for the tabular policy; a transformer couples tokens through shared
parameters and Adam rescales steps, so there dH_pred is a direction and a scale to compare with the
measured change (`RunningCorrelation` reports how well the two agree over a run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pipeline.algorithms import token_covariance
from pipeline.algorithms.stats import exact_quantiles


@torch.no_grad()
def covariance_stats(
    log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Token covariance Cov_t = (log p_t - mean)(A_t - mean) over the batch: mean and upper tail."""
    m = mask.bool()
    cov = token_covariance(log_prob.double(), advantages.double(), m)[m]
    if cov.numel() == 0:
        return {}
    out = {"mean": float(cov.mean())}
    qs = (0.9, 0.99, 0.999)
    out |= {f"p{q * 100:g}": v for q, v in zip(qs, exact_quantiles(cov, qs), strict=True)}
    out["max"] = float(cov.max())
    return out


@torch.no_grad()
def token_quantiles(x: torch.Tensor, mask: torch.Tensor, qs=(0.1, 0.5, 0.9)) -> dict[str, float]:
    """Mean and exact quantiles (`p10`, `p50`, ...) of `x` over the valid tokens, at any token count."""
    v = x[mask.bool()].double()
    if v.numel() == 0:
        return {}
    quantiles = exact_quantiles(v, qs)
    return {"mean": float(v.mean()), **{f"p{int(q * 100)}": p for q, p in zip(qs, quantiles, strict=True)}}


@torch.no_grad()
def predicted_entropy_change(
    advantages: torch.Tensor, influence: torch.Tensor, mask: torch.Tensor, lr: float
) -> float:
    """dH_pred = -(lr / N^2) sum_t A_t influence_t over the N valid tokens (see the module docstring)."""
    m = mask.bool()
    n = int(m.sum())
    if n == 0:
        return 0.0
    s = (advantages.double()[m] * influence.double()[m]).sum()
    return float(-lr * s / (n * n))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    return float(x.double()[m].mean()) if bool(m.any()) else float("nan")


@torch.no_grad()
def entropy_groups(entropy: torch.Tensor, mask: torch.Tensor, top: float = 0.2) -> torch.Tensor:
    """Bool, shaped like `entropy`: the top `top` fraction of valid tokens by entropy (the "forking" tokens)."""
    m = mask.bool()
    vals = entropy[m]
    if vals.numel() == 0:
        return torch.zeros_like(m)
    k = max(1, math.ceil(top * vals.numel() - 1e-9))
    threshold = vals.topk(k).values.min()
    return m & (entropy >= threshold)


class RunningCorrelation:
    """Pearson correlation of pairs (x, y) seen so far; checkpointable (plain sums)."""

    def __init__(self) -> None:
        self.n = 0
        self.sx = self.sy = self.sxx = self.syy = self.sxy = 0.0

    def add(self, x: float, y: float) -> None:
        if not (math.isfinite(x) and math.isfinite(y)):
            return
        self.n += 1
        self.sx += x
        self.sy += y
        self.sxx += x * x
        self.syy += y * y
        self.sxy += x * y

    def value(self) -> float:
        if self.n < 3:
            return float("nan")
        cov = self.sxy - self.sx * self.sy / self.n
        vx = self.sxx - self.sx * self.sx / self.n
        vy = self.syy - self.sy * self.sy / self.n
        return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("n", "sx", "sy", "sxx", "syy", "sxy")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def fit_entropy_law(entropy: Sequence[float], reward: Sequence[float]) -> dict[str, float] | None:
    """Least-squares fit of R = -a exp(H) + b (linear in a, b with x = exp(H)).

    Returns {"a", "b", "r2", "ceiling" (= b - a, the predicted reward at H = 0), "n"}, or None with
    fewer than 3 points or when every exp(H) is the same (nothing to fit).
    """
    pts = [
        (math.exp(h), r)
        for h, r in zip(entropy, reward, strict=True)
        if math.isfinite(h) and math.isfinite(r)
    ]
    n = len(pts)
    if n < 3:
        return None
    x = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float((xc * xc).sum())
    if sxx <= 1e-24 * max(1.0, float((x * x).sum())):
        return None
    slope = float((xc * yc).sum()) / sxx  # = -a
    a = -slope
    b = float(y.mean()) - slope * float(x.mean())
    resid = y - (b - a * x)
    sst = float((yc * yc).sum())
    r2 = 1.0 - float((resid * resid).sum()) / sst if sst > 0 else float("nan")
    return {"a": a, "b": b, "r2": r2, "ceiling": b - a, "n": float(n)}
