"""The plan of one mini-batch and what the methods' `prepare` hooks see: `LossPlan` (per-token weights
and selections), `MiniBatch` (the no-grad view of the whole mini-batch) and `aggregation_weights`.

Shared by `losses.py` (which builds both) and the methods in `methods/` (which read a `MiniBatch`
and return their part of the plan); no method is named here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from pipeline.algorithms.config import LOSS_AGG_MODES, LossConfig

Tensor = torch.Tensor


@dataclass(kw_only=True)
class LossPlan:
    """Per-token weights and selections of one mini-batch (this rank's tokens), plus global statistics.

    Tensor fields are per token: [N] for flat input, [B, L] for the padded layout.
    mask        bool         valid tokens (the loss mask)
    weight                   aggregation weight incl. the global normaliser (entropy bonus, kl_coef term)
    pg_weight                weight of the per-token policy loss (top-entropy selection, tokens the
                             method drops: Clip-Cov's)
    kl_weight   |None        weight of the per-token reference KL (kl_coef * weight + the method's terms)
    advantages  |None        entropy-shaped advantages (None: apply_loss uses the advantages passed)
    high_entropy |None bool  the top-20 % entropy tokens of the mini-batch (by_entropy metrics), when
                             entropies were given
    tensors     dict         the method's own per-token tensors, by name, for its per-token loss and
                             apply hooks (KL-Cov's `penalty`, Archer's `clip_low`/`clip_high`, ...)
    entropy_coef float       coefficient of the entropy bonus (cfg.entropy_coef or the controller's alpha)
    counts      dict         global token counts the metrics are normalised by
    metrics     dict         global metrics of the selections (over dp_group when global_stats)
    """

    mask: Tensor
    weight: Tensor
    pg_weight: Tensor
    kl_weight: Tensor | None = None
    advantages: Tensor | None = None
    high_entropy: Tensor | None = None
    tensors: dict[str, Tensor] = field(default_factory=dict)
    entropy_coef: float = 0.0
    counts: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def rows(self, index) -> LossPlan:
        """The plan restricted to `index` (LongTensor, bool tensor or slice) along the first dimension:
        tokens of one micro-batch (flat), or rows (padded layout)."""
        return self._map(lambda v: v[index])

    def _map(self, fn) -> LossPlan:
        changes = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}  # fmt: skip
        changes["tensors"] = {k: fn(v) for k, v in self.tensors.items()}
        return dataclasses.replace(self, **changes)


@dataclass
class MiniBatch:
    """The whole mini-batch held by this rank, flat and no-grad, as a method's `prepare` sees it.

    `log_prob` and `entropy` are the current policy's, given only to a method that declares
    `needs_log_prob` / `needs_entropy` (None otherwise). Padding is zeroed; `advantages` are the
    entropy-shaped ones when shaping is on. Statistics over the mini-batch are over `group`
    (None: this call only).
    """

    cfg: LossConfig
    log_prob: Tensor | None
    old_log_prob: Tensor
    advantages: Tensor
    mask: Tensor
    entropy: Tensor | None
    segments: Tensor  # [N] sequence index of each token
    n_seqs_local: int  # sequences of this rank (segments index [0, n))
    token_sample_ids: Tensor  # [N] the stable id of each token's sample
    positions: Tensor  # [N] each token's position in its sample
    step: int
    group: object
    n_tokens: float  # valid tokens of the mini-batch (over group)
    n_seqs: float  # non-empty sequences of the mini-batch (over group)
    length_const: float  # seq-mean-token-sum-norm's divisor

    def per_sequence(self, part: Tensor) -> Tensor:
        """[N]: how many tokens of `part` each token's sequence holds."""
        counts = torch.zeros(self.n_seqs_local, dtype=torch.float64, device=part.device)
        return counts.index_add_(0, self.segments, part.double())[self.segments]


def aggregation_weights(
    mode: str,
    mask: Tensor,
    n_tokens: float,
    n_seqs: float,
    length_const: float,
    dtype,
    seq_tokens: Tensor | None = None,
):
    """Per-token weights w with  sum_t w_t l_t == agg(l)  over the (global) batch.

    token-mean              m / N                 (N = valid tokens of the mini-batch, all ranks)
    seq-mean-token-mean     m / (|o_i| * B)       (B = non-empty responses of the mini-batch, as verl)
    seq-mean-token-sum      m / B
    seq-mean-token-sum-norm m / (L_const * B)     (Dr.GRPO: 1/G over responses kept; verl PR #5417)

    |o_i| per token: `seq_tokens` (the tokens of `mask` in its sequence; flat input), else the row
    sums of a [B, L] mask. `mask` may be a subset of the response tokens (top-entropy selection,
    Archer's KL subsets): then N and |o_i| count the subset, while B stays the batch's responses, as
    the reference's `agg_loss(loss, subset_mask, mode)` does (`torch.mean` over all rows).
    """
    mf = mask.to(dtype)
    if mode == "token-mean":
        return mf / n_tokens
    if mode == "seq-mean-token-mean":
        row = mf.sum(-1, keepdim=True) if seq_tokens is None else seq_tokens.to(dtype)
        return mf / (row.clamp(min=1) * n_seqs)
    if mode == "seq-mean-token-sum":
        return mf / n_seqs
    if mode == "seq-mean-token-sum-norm":
        return mf / (length_const * n_seqs)
    raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {list(LOSS_AGG_MODES)}")
