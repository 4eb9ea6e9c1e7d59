"""Policy losses of the entropy-control methods on flat token vectors: a no-grad plan, a differentiable
apply, and the metrics of the whole mini-batch.

    needs = loss_needs(cfg)                # what the plan must see before the training forward
    plan = prepare_loss(cfg, log_prob, old_log_prob, advantages, mask, segments=seg, sample_ids=ids,
                        entropy=H, dp_group=dp)          # no grad, collective; log_prob/H only if needed
    for tokens in micro_batches:           # slices of this rank's flat token vectors
        loss, sums = apply_loss(cfg, plan.rows(tokens), log_prob_mb, old_mb, adv_mb, mask_mb, entropy=H_mb)
        loss.backward()
    metrics = finish_metrics(cfg, plan, sums added over micro-batches and data-parallel ranks)

Inputs are flat token vectors `[N]`: this rank's sequences back to back, how they were packed does not
matter. `segments` `[N]` names each token's sequence (an index into `sample_ids`, the sequences' stable
ids); `positions` `[N]` (optional) its position in its sample. What is per sequence (seq-mean
aggregation, the number of sequences, Archer's per-response quantile, Clip-Cov's hash of (sample id,
position)) is computed from them. A padded `[B, L]` layout (row i = sequence i, position = column) is
accepted too: it is flattened, and the plan it returns has `[B, L]` fields.

`prepare_loss` sees the whole mini-batch held by this rank and computes, collectively over `dp_group`,
every statistic that depends on the whole batch: normalisers, covariance centring, Clip-Cov candidates and
pick, KL-Cov top-k, the top-entropy threshold, Archer's subset counts. Only the methods that select
tokens by the current policy need its log-probs or entropies here (`loss_needs`); ppo and cispo need only
token counts. The statistics end up in a `LossPlan` of per-token weights, so the loss is a sum over tokens
and

    sum over ranks and micro-batches of apply_loss(...) == policy_loss(...) on the whole batch

(value and gradients w.r.t. log_prob and entropy). `apply_loss` also returns additive sums (clipped
tokens, KL, entropy, ...) from the training forward; `finish_metrics` turns their totals into the
mini-batch's metrics. With `global_stats=False` nothing is communicated and every statistic is over the
tensors passed to `prepare_loss` (call it per micro-batch to reproduce the reference repositories; see
`docs/algorithms.md` for the differences).

The total loss is  sum_t pg_weight_t * l_t  +  sum_t kl_weight_t * KL_t  -  entropy_coef * sum_t weight_t * H_t
with l_t the method's per-token loss (registry `METHODS`), `weight` the aggregation weight of
`loss_agg_mode` with global normaliser, `pg_weight` = weight restricted to the tokens the policy gradient
uses (top-entropy selection, Clip-Cov's detached tokens removed). The actor multiplies by dp_size (and
Megatron's num_microbatches) to undo gradient averaging.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline.algorithms.advantages import entropy_shaped_advantages
from pipeline.algorithms.config import LOSS_AGG_MODES, LossConfig
from pipeline.algorithms.kl import kl_estimate
from pipeline.algorithms.stats import (
    all_reduce_max,
    all_reduce_sums,
    flat_token_hash,
    flat_token_ids,
    float_order_key,
    key_to_float,
    segment_quantile,
    topk_mask,
)

Tensor = torch.Tensor


@dataclass(kw_only=True)
class LossPlan:
    """Per-token weights and selections of one mini-batch (this rank's tokens), plus global statistics.

    Tensor fields are per token: [N] for flat input, [B, L] for the padded layout.
    mask        bool         valid tokens (the loss mask)
    weight                   aggregation weight incl. the global normaliser (entropy bonus, kl_coef term)
    pg_weight                weight of the per-token policy loss (top-entropy selection, Clip-Cov zeros)
    kl_weight   |None        weight of the per-token reference KL (kl_coef * weight + Archer's subset terms)
    advantages  |None        entropy-shaped advantages (None: apply_loss uses the advantages passed)
    clip_low/high |None      per-token clip offsets (Archer; None: cfg.clip_ratio_low/high)
    penalty     |None        KL-Cov: beta on selected tokens, 0 elsewhere
    archer_high |None bool   Archer: the high-entropy tokens of each response (for its KL metrics)
    archer_agg  |None        Archer: each token's aggregation weight within its entropy subset
    high_entropy |None bool  the top-20 % entropy tokens of the mini-batch (by_entropy metrics), when
                             entropies were given
    entropy_coef float       coefficient of the entropy bonus (cfg.entropy_coef or the controller's alpha)
    counts      dict         global token counts the metrics are normalised by
    metrics     dict         global metrics of the selections (over dp_group when global_stats)
    """

    mask: Tensor
    weight: Tensor
    pg_weight: Tensor
    kl_weight: Tensor | None = None
    advantages: Tensor | None = None
    clip_low: Tensor | None = None
    clip_high: Tensor | None = None
    penalty: Tensor | None = None
    archer_high: Tensor | None = None
    archer_agg: Tensor | None = None
    high_entropy: Tensor | None = None
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
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Per-token losses, one per method. Each returns (loss, clipped bool, clipped_lower), per token.
# ----------------------------------------------------------------------------------------------


def _ratio(log_prob: Tensor, old_log_prob: Tensor) -> tuple[Tensor, Tensor]:
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
    return log_ratio, log_ratio.exp()


def ppo_clip_per_token(log_prob, old_log_prob, advantages, clip_low, clip_high, clip_c):
    """l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); if A < 0 and c: l = min(l, -c A)."""
    _, ratio = _ratio(log_prob, old_log_prob)
    lo = 1.0 - torch.as_tensor(clip_low, dtype=ratio.dtype)
    hi = 1.0 + torch.as_tensor(clip_high, dtype=ratio.dtype)
    raw = -advantages * ratio
    clp = -advantages * torch.minimum(torch.maximum(ratio, lo), hi)
    per_tok = torch.maximum(raw, clp)
    clipped = clp > raw
    clipped_lower = torch.zeros_like(clipped)
    if clip_c is not None:
        cap = -advantages * clip_c
        clipped_lower = (advantages < 0) & (per_tok > cap)
        per_tok = torch.where(advantages < 0, torch.minimum(per_tok, cap), per_tok)
    return per_tok, clipped, clipped_lower


def ppo_loss(cfg: LossConfig, plan: LossPlan, log_prob, old_log_prob, advantages):
    """PPO-clip / DAPO (arXiv 2503.14476; verl `compute_policy_loss_vanilla`).

    l_t = max(-A r, -A clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)), dual-clip min(l, -c A) for A < 0
    (c = clip_ratio_c). r = exp(clamp(log pi - log pi_old, -20, 20)). DAPO = clip_ratio_high 0.28, c 10.
    """
    return ppo_clip_per_token(
        log_prob, old_log_prob, advantages, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c
    )


def cispo_loss(cfg: LossConfig, plan: LossPlan, log_prob, old_log_prob, advantages):
    """CISPO (MiniMax-M1, arXiv 2506.13585; verl `compute_policy_loss_cispo`, slime `compute_cispo_loss`).

    l_t = -sg(min(r, 1 + cispo_clip_high)) * A * log pi: the clipped IS weight is detached, no lower
    bound, so clipped tokens still get gradient (bound) * A through log pi.
    """
    _, ratio = _ratio(log_prob, old_log_prob)
    weight = ratio.clamp(max=1.0 + cfg.cispo_clip_high).detach()
    clipped = weight != ratio.detach()
    return -weight * advantages * log_prob, clipped, torch.zeros_like(clipped)


def clip_cov_loss(cfg: LossConfig, plan: LossPlan, log_prob, old_log_prob, advantages):
    """Clip-Cov (arXiv 2505.22617; PRIME-RL/Entropy-Mechanism-of-RL, verl `compute_policy_loss_clip_cov`).

    PPO-clip without dual clip; a random floor(clip_cov_ratio * N) (>= 1) of the tokens with
    lb < Cov_t < ub that the PPO clip did not already clip get loss x 0 (they stay in the normaliser).
    Cov_t = (log pi_t - mean log pi)(A_t - mean A). The pick is made in `_prepare_clip_cov` and lives
    in `plan.pg_weight` (zero on the picked tokens).
    """
    return ppo_clip_per_token(
        log_prob, old_log_prob, advantages, cfg.clip_ratio_low, cfg.clip_ratio_high, None
    )


def kl_cov_loss(cfg: LossConfig, plan: LossPlan, log_prob, old_log_prob, advantages):
    """KL-Cov (arXiv 2505.22617; verl `compute_policy_loss_kl_cov`).

    l_t = -A r + kl_cov_coef * |log r| * 1[t in top-k of Cov_t], k = max(1, floor(kl_cov_ratio * N)).
    No PPO clipping at all. |log r| has zero gradient at r = 1 (no-op on the on-policy mini-batch).
    """
    log_ratio, ratio = _ratio(log_prob, old_log_prob)
    per_tok = -advantages * ratio
    if plan.penalty is not None:
        per_tok = per_tok + plan.penalty * log_ratio.abs()
    none = torch.zeros_like(per_tok, dtype=torch.bool)
    return per_tok, none, none


def archer_loss(cfg: LossConfig, plan: LossPlan, log_prob, old_log_prob, advantages):
    """Archer dual-token constraints (arXiv 2507.15778; wizard-III/ArcherCodeR `dp_actor.py`).

    Per response, tokens with H > nanquantile(H, archer_entropy_quantile) are "high entropy": clip
    offset archer_clip_high_entropy and KL weight archer_kl_coef_high_entropy; the others get
    archer_clip_low_entropy / archer_kl_coef_low_entropy. Dual clip (clip_ratio_c) for all A < 0.
    Each KL term is a mean over its own subset (`plan.kl_weight`, built in `_prepare_archer`).
    """
    return ppo_clip_per_token(
        log_prob, old_log_prob, advantages, plan.clip_low, plan.clip_high, cfg.clip_ratio_c
    )


@dataclass(frozen=True)
class Method:
    """A loss method: its per-token loss, its batch statistics, and what it needs to compute them.

    This description is the one place a method declares its inputs: the actor reads `loss_needs(cfg)`
    to decide which forwards to run before the training forward, the trainer to decide whether a
    reference policy is kept.
    """

    per_token: Callable  # (cfg, plan, log_prob, old_log_prob, advantages) -> (loss, clipped, clipped_lower)
    prepare: Callable | None = None  # (ctx) -> (plan fields, local metric sums); no grad, may communicate
    needs_log_prob: bool = False  # prepare reads the current policy's log-probs over the whole mini-batch
    needs_entropy: bool = False  # prepare reads the current policy's entropies over the whole mini-batch
    needs_reference: Callable[[LossConfig], bool] = lambda cfg: False  # its own reference-KL terms


@dataclass(frozen=True)
class Needs:
    """What a loss configuration needs besides old log-probs, advantages and the loss mask."""

    log_prob: bool  # current-policy log-probs of the whole mini-batch before the training forward
    entropy: bool  # current-policy entropies of the whole mini-batch before the training forward
    reference: bool  # ref_log_prob (a frozen reference policy and its forward)

    @property
    def current_policy(self) -> bool:
        """A no-grad forward of the mini-batch before training (or, on-policy, the old forward's values)."""
        return self.log_prob or self.entropy


# ----------------------------------------------------------------------------------------------
# Batch statistics (no grad): everything that must see the whole mini-batch.
# ----------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
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
    n_tokens: float
    n_seqs: float
    length_const: float

    def per_sequence(self, part: Tensor) -> Tensor:
        """[N]: how many tokens of `part` each token's sequence holds."""
        counts = torch.zeros(self.n_seqs_local, dtype=torch.float64, device=part.device)
        return counts.index_add_(0, self.segments, part.double())[self.segments]


@torch.no_grad()
def token_covariance(log_prob: Tensor, advantages: Tensor, response_mask: Tensor, dp_group=None) -> Tensor:
    """Cov_t = (log pi_t - mean log pi)(A_t - mean A) (arXiv 2505.22617 §4), 0 on padding.

    Means over the valid tokens of the whole mini-batch (all-reduced over `dp_group` when given).
    Any layout: the tensors are per token.
    """
    m = response_mask.bool()
    lp, adv = torch.where(m, log_prob, 0), torch.where(m, advantages, 0)
    s_a, s_lp, n = all_reduce_sums([adv.sum(), lp.sum(), m.sum()], dp_group)
    cov = (adv - s_a / n) * (lp - s_lp / n)
    return torch.where(m, cov, torch.zeros_like(cov))


def _centred_cov(ctx: _Ctx) -> Tensor:
    return token_covariance(ctx.log_prob, ctx.advantages, ctx.mask, ctx.group)


def _prepare_clip_cov(ctx: _Ctx):
    cfg, m = ctx.cfg, ctx.mask
    cov = _centred_cov(ctx)
    _, clipped, _ = clip_cov_loss(cfg, None, ctx.log_prob, ctx.old_log_prob, ctx.advantages)
    cand = m & ~clipped & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    clip_num = max(int(cfg.clip_cov_ratio * ctx.n_tokens), 1)
    # smallest hash first: the largest of its bitwise complement; token ids break (impossible) ties
    key = ~flat_token_hash(ctx.token_sample_ids, ctx.positions, cfg.seed, ctx.step)
    picked, _ = topk_mask(key, cand, clip_num, flat_token_ids(ctx.token_sample_ids, ctx.positions), ctx.group)
    sums = {
        "clip_cov/candidates": cand.sum(),
        "clip_cov/selected": picked.sum(),
        "clip_cov/cov_selected_sum": torch.where(picked, cov, 0).sum(),
        "clip_cov/cov_sum": cov.sum(),
    }
    return {"keep": ~picked}, sums


def _prepare_kl_cov(ctx: _Ctx):
    cfg, m = ctx.cfg, ctx.mask
    cov = _centred_cov(ctx)
    k = max(1, int(cfg.kl_cov_ratio * ctx.n_tokens))
    tie = flat_token_ids(ctx.token_sample_ids, ctx.positions)
    sel, _ = topk_mask(float_order_key(cov), m, k, tie, ctx.group)
    penalty = sel.to(ctx.old_log_prob.dtype) * cfg.kl_cov_coef
    sums = {
        "kl_cov/selected": sel.sum(),
        "kl_cov/cov_selected_sum": torch.where(sel, cov, 0).sum(),
        "kl_cov/cov_sum": cov.sum(),
    }
    return {"penalty": penalty}, sums


def row_quantile(values: Tensor, mask: Tensor, q: float) -> Tensor:
    """Per-row q-quantile of the valid entries of a [B, L] layout, [B, 1] (`segment_quantile` per row):
    `torch.nanquantile(dim=-1)` with padding as NaN, without its 16M-element limit. Empty rows: +inf."""
    b, length = values.shape
    rows = torch.arange(b, device=values.device).repeat_interleave(length)
    return segment_quantile(values.reshape(-1), mask.reshape(-1), rows, b, q)[:, None]


def _prepare_archer(ctx: _Ctx):
    cfg, m = ctx.cfg, ctx.mask
    h = ctx.entropy
    # per response: the quantile of its own valid tokens' entropies
    threshold = segment_quantile(h, m, ctx.segments, ctx.n_seqs_local, cfg.archer_entropy_quantile)
    high = m & (h > threshold[ctx.segments])
    low = m & ~high
    dt = ctx.old_log_prob.dtype
    eps_high = torch.tensor(cfg.archer_clip_high_entropy, dtype=dt)
    eps = torch.where(high, eps_high, torch.tensor(cfg.archer_clip_low_entropy, dtype=dt))
    # each KL term is agg(KL, subset, loss_agg_mode) as in the reference (`agg_loss(kld, subset_mask,
    # loss_agg_mode)`): token-mean divides by the subset's size, the seq-mean modes by the batch's B
    n_low, n_high = all_reduce_sums([low.sum(), high.sum()], ctx.group)
    agg = torch.zeros_like(ctx.old_log_prob)  # each token's weight in its own subset's aggregate
    kl_weight = torch.zeros_like(ctx.old_log_prob)
    for part, n, coef in (
        (low, n_low, cfg.archer_kl_coef_low_entropy),
        (high, n_high, cfg.archer_kl_coef_high_entropy),
    ):
        w = aggregation_weights(cfg.loss_agg_mode, part, max(n, 1.0), ctx.n_seqs, ctx.length_const, dt,
                                ctx.per_sequence(part))  # fmt: skip
        agg, kl_weight = agg + w, kl_weight + coef * w
    sums = {"archer/n_high": high.sum()}
    fields = {
        "clip_low": eps,
        "clip_high": eps,
        "archer_kl_weight": kl_weight,
        "archer_high": high,
        "archer_agg": agg,
    }
    return fields, sums


def _archer_needs_ref(cfg: LossConfig) -> bool:
    return cfg.archer_kl_coef_low_entropy > 0 or cfg.archer_kl_coef_high_entropy > 0


METHODS: dict[str, Method] = {
    "ppo": Method(ppo_loss),
    "cispo": Method(cispo_loss),
    "clip_cov": Method(clip_cov_loss, _prepare_clip_cov, needs_log_prob=True),
    "kl_cov": Method(kl_cov_loss, _prepare_kl_cov, needs_log_prob=True),
    "archer": Method(archer_loss, _prepare_archer, needs_entropy=True, needs_reference=_archer_needs_ref),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown loss method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def loss_needs(cfg: LossConfig) -> Needs:
    """What `cfg` needs before the training forward: the method's own needs plus the composable
    options (top-entropy selection and entropy-shaped advantages read entropies; kl_coef a reference).
    The entropy bonus needs only the training forward's entropy, which the actor always computes."""
    method = get_method(cfg.method)
    return Needs(
        log_prob=method.needs_log_prob,
        entropy=method.needs_entropy or cfg.top_entropy_ratio < 1.0 or cfg.adv_entropy_shaping,
        reference=cfg.kl_coef > 0 or method.needs_reference(cfg),
    )


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


# ----------------------------------------------------------------------------------------------
# Input checks and layouts
# ----------------------------------------------------------------------------------------------


def _needs_entropy(cfg: LossConfig, entropy_coef: float) -> list[str]:
    why = []
    if get_method(cfg.method).needs_entropy:
        why.append(f"method={cfg.method}")
    if cfg.top_entropy_ratio < 1.0:
        why.append(f"top_entropy_ratio={cfg.top_entropy_ratio}")
    if cfg.adv_entropy_shaping:
        why.append("adv_entropy_shaping=True")
    if entropy_coef != 0.0:
        why.append(f"entropy_coef={entropy_coef}")
    return why


def _needs_ref(cfg: LossConfig) -> list[str]:
    why = []
    if cfg.kl_coef > 0:
        why.append(f"kl_coef={cfg.kl_coef}")
    if get_method(cfg.method).needs_reference(cfg):
        why.append(f"method={cfg.method} with its KL coefficients > 0")
    return why


def _check_inputs(
    cfg, named: dict, mask_name: str, entropy_coef: float, *, flat: bool, log_prob_needed: bool
):
    """Shapes, required inputs and finiteness on valid tokens; returns the mask as bool.

    `named` maps names to tensors (or None) in the order of the signature; the first given one
    fixes the shape every other must have.
    """
    ref_name = "log_prob" if named.get("log_prob") is not None else "old_log_prob"
    first = named[ref_name]
    dim = 1 if flat else 2
    if not isinstance(first, Tensor) or first.dim() != dim:
        raise ValueError(
            f"{ref_name} must be a [B, L] tensor, or a flat [N] one with segments=; got shape "
            f"{tuple(getattr(first, 'shape', ()))}"
        )
    shape = first.shape
    for name, t in named.items():
        if t is not None and (not isinstance(t, Tensor) or t.shape != shape):
            raise ValueError(
                f"{name} has shape {tuple(getattr(t, 'shape', ()))}, expected {tuple(shape)} like {ref_name}"
            )
    if not first.is_floating_point():
        raise ValueError(f"{ref_name} must be floating point, got {first.dtype}")
    if log_prob_needed and named.get("log_prob") is None:
        raise ValueError(
            f"log_prob (the current policy's, over the whole mini-batch) is required by method={cfg.method}"
        )
    why = _needs_entropy(cfg, entropy_coef)
    if why and named.get("entropy") is None:
        raise ValueError(
            f"entropy (full-vocabulary, per token) is required by {', '.join(why)}; pass entropy="
        )
    why = _needs_ref(cfg)
    if why and named.get("ref_log_prob") is None:
        raise ValueError(
            f"ref_log_prob is required by {', '.join(why)}; pass ref_log_prob= or set the coef to 0"
        )
    mask = named[mask_name].bool()
    for name, t in named.items():
        if name != mask_name and t is not None and not bool(torch.isfinite(t.detach()[mask]).all()):
            raise ValueError(f"{name} contains NaN or inf on valid ({mask_name}=1) tokens")
    return mask


def _clean(t: Tensor | None, mask: Tensor) -> Tensor | None:
    """Zero padding positions (keeps gradient on valid tokens, none through garbage padding)."""
    return None if t is None else torch.where(mask, t, torch.zeros((), dtype=t.dtype))


def _flat_layout(mask: Tensor, segments, positions, sample_ids):
    """(segments, positions, sample_ids, n) of flat input, checked; defaults where not given."""
    if segments is None:
        raise ValueError("flat [N] inputs need segments= (the sequence index of each token)")
    segments = torch.as_tensor(segments, device=mask.device).reshape(-1)
    if segments.shape != mask.shape or segments.is_floating_point():
        raise ValueError(f"segments must be [N] = [{mask.shape[0]}] integers; got {tuple(segments.shape)}")
    n = int(segments.max()) + 1 if segments.numel() else 0
    if sample_ids is None:
        sample_ids = torch.arange(n, dtype=torch.int64, device=mask.device)
    sample_ids = torch.as_tensor(sample_ids, device=mask.device).reshape(-1)
    if sample_ids.shape[0] < n or sample_ids.is_floating_point() or bool((segments < 0).any()):
        raise ValueError(
            f"sample_ids must be one integer per sequence ({n} sequences in segments); got "
            f"{tuple(sample_ids.shape)} {sample_ids.dtype}"
        )
    n = sample_ids.shape[0]
    if positions is None:  # rank of each token within its sequence, in order
        order = torch.argsort(segments, stable=True)
        size = torch.bincount(segments, minlength=n)
        start = size.cumsum(0) - size
        positions = torch.empty_like(segments)
        positions[order] = torch.arange(segments.numel(), device=mask.device) - start[segments[order]]
    return segments, torch.as_tensor(positions, device=mask.device).reshape(-1), sample_ids, n


def _rows_to_flat(mask: Tensor, sample_ids):
    """(segments, positions, sample_ids) of a [B, L] layout: row i = sequence i, position = column."""
    b, length = mask.shape
    if sample_ids is None:
        sample_ids = torch.arange(b, dtype=torch.int64)
    sample_ids = torch.as_tensor(sample_ids).reshape(-1).to(mask.device)
    if sample_ids.shape[0] != b or sample_ids.is_floating_point():
        raise ValueError(
            f"sample_ids must be [B] = [{b}] integers; got {tuple(sample_ids.shape)} {sample_ids.dtype}"
        )
    segments = torch.arange(b, device=mask.device).repeat_interleave(length)
    positions = torch.arange(length, device=mask.device).repeat(b)
    return segments, positions, sample_ids


# ----------------------------------------------------------------------------------------------
# prepare / apply / finish / policy_loss
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def prepare_loss(
    cfg: LossConfig,
    log_prob: Tensor | None,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    segments: Tensor | None = None,
    positions: Tensor | None = None,
    entropy: Tensor | None = None,
    ref_log_prob: Tensor | None = None,
    sample_ids: Tensor | None = None,
    step: int = 0,
    dp_group=None,
    entropy_coef: float | None = None,
) -> LossPlan:
    """Compute the plan of one mini-batch (this rank's tokens); collective over `dp_group` if global_stats.

    Flat input: [N] tensors with `segments` (each token's sequence, an index into `sample_ids`) and
    optionally `positions` (each token's position in its sample; default: its rank within its sequence).
    Padded input: [B, L] tensors, row i = sequence `sample_ids[i]`; the plan's fields are [B, L] then.

    `log_prob` (the current policy's, no grad) is needed only by methods that select tokens by it
    (`loss_needs(cfg).log_prob`), `entropy` only where `loss_needs(cfg).entropy`; given anyway, the
    entropy also splits the by_entropy metrics. `ref_log_prob` is checked for presence only.
    Every rank of `dp_group` must call this together, with the same cfg and step and the same optional
    inputs given: the metric sums are reduced as one vector. `sample_ids` (one int per sequence, unique
    in the mini-batch) make Clip-Cov's pick and tie-breaks independent of the split; None = the
    sequence index, which is split-invariant only if sequences keep their global index (one process).
    `entropy_coef` overrides `cfg.entropy_coef` (pass the adaptive controller's alpha here).
    Seq-mean-token-sum-norm divides by `cfg.loss_scale_factor`, or else by the padded length L (padded
    input) or the longest sequence's valid tokens (flat input), the maximum over the group.
    """
    method = get_method(cfg.method)
    coef = cfg.entropy_coef if entropy_coef is None else float(entropy_coef)
    flat = segments is not None
    named = {"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages,
             "response_mask": response_mask, "entropy": entropy, "ref_log_prob": ref_log_prob}  # fmt: skip
    mask = _check_inputs(cfg, named, "response_mask", 0.0, flat=flat, log_prob_needed=method.needs_log_prob)
    shape = mask.shape
    if flat:
        segments, positions, sample_ids, n = _flat_layout(mask, segments, positions, sample_ids)
    else:
        segments, positions, sample_ids = _rows_to_flat(mask, sample_ids)
        n = shape[0]
        mask, log_prob, old_log_prob, advantages, entropy, ref_log_prob = (
            None if t is None else t.reshape(-1)
            for t in (mask, log_prob, old_log_prob, advantages, entropy, ref_log_prob)
        )
    if torch.unique(sample_ids).numel() != n:
        raise ValueError("sample_ids must be unique within the mini-batch")
    group = dp_group if cfg.global_stats else None
    old, adv = (_clean(t.detach(), mask) for t in (old_log_prob, advantages))
    lp = _clean(None if log_prob is None else log_prob.detach(), mask)
    ent = _clean(None if entropy is None else entropy.detach(), mask)
    dt = (log_prob if log_prob is not None else old_log_prob).dtype

    seq_tokens = torch.zeros(n, dtype=torch.float64, device=mask.device).index_add_(
        0, segments, mask.double()
    )
    n_tok, n_seq = all_reduce_sums([mask.sum(), (seq_tokens > 0).sum()], group)
    if n_tok == 0:
        raise ValueError("response_mask has no valid tokens" + (" on any rank of dp_group" if group else ""))
    longest = float(shape[1]) if not flat else float(seq_tokens.max()) if n else 0.0
    length_const = cfg.loss_scale_factor or all_reduce_max(longest, group, device=mask.device)
    sums: dict[str, Tensor] = {}

    shaped = None
    if cfg.adv_entropy_shaping:
        shaped, bonus, cap = entropy_shaped_advantages(
            adv, ent, mask, cfg.adv_shaping_alpha, cfg.adv_shaping_kappa
        )
        sums |= {"adv_shaping/bonus_sum": bonus.sum(), "adv_shaping/cap_binding": cap.sum(),
                 "adv_shaping/nonzero_adv": (mask & (adv != 0)).sum()}  # fmt: skip
        adv = shaped

    ctx = _Ctx(cfg, lp, old, adv, mask, ent, segments, n, sample_ids[segments], positions, step, group, n_tok,
               n_seq, length_const)  # fmt: skip
    fields, method_sums = method.prepare(ctx) if method.prepare else ({}, {})
    sums |= method_sums

    weight = aggregation_weights(
        cfg.loss_agg_mode, mask, n_tok, n_seq, length_const, dt, seq_tokens[segments]
    )
    pg_weight, threshold_key = weight, None
    # tokens the method treats specially (Clip-Cov's detached, KL-Cov's penalised, top-entropy's kept)
    special = mask & ~fields["keep"] if "keep" in fields else torch.zeros_like(mask)
    if fields.get("penalty") is not None:
        special = special | (mask & (fields["penalty"] > 0))
    if cfg.top_entropy_ratio < 1.0:
        k = max(1, math.ceil(cfg.top_entropy_ratio * n_tok - 1e-9))
        sel, threshold_key = topk_mask(float_order_key(ent), mask, k, None, group)
        special = special | sel
        if cfg.global_stats:  # paper / TRL: normaliser over all tokens
            pg_weight = weight * sel
        else:  # official 80/20 repo: the selected tokens are the aggregation mask of the call
            pg_weight = aggregation_weights(cfg.loss_agg_mode, sel, float(sel.sum()), n_seq, length_const, dt,
                                            ctx.per_sequence(sel))  # fmt: skip
        sums |= {"top_entropy/selected": sel.sum(), "top_entropy/entropy_sum": torch.where(sel, ent, 0).sum()}
    if "keep" in fields:
        pg_weight = pg_weight * fields.pop("keep")

    kl_weight = None
    if cfg.kl_coef > 0:
        kl_weight = cfg.kl_coef * weight
    archer_kl = fields.pop("archer_kl_weight", None)
    if archer_kl is not None and _archer_needs_ref(cfg):
        kl_weight = archer_kl if kl_weight is None else kl_weight + archer_kl

    high = None
    if ent is not None:  # the high-entropy ("forking", top 20 %) tokens and the rest: selection fractions
        high, _ = topk_mask(float_order_key(ent), mask, max(1, math.ceil(0.2 * n_tok - 1e-9)), None, group)
        for name, part in (("high", high), ("low", mask & ~high)):
            sums |= {
                f"by_entropy/{name}_n": part.sum(),
                f"by_entropy/{name}_selected": (part & special).sum(),
            }

    plan = LossPlan(mask=mask, weight=weight, pg_weight=pg_weight, kl_weight=kl_weight, advantages=shaped,
                    high_entropy=high, entropy_coef=coef, **fields)  # fmt: skip
    names = list(sums)
    values = dict(zip(names, all_reduce_sums([sums[k] for k in names], group), strict=True))
    plan.counts, plan.metrics = _plan_metrics(cfg, values, n_tok, n_seq, coef)
    if threshold_key is not None:
        plan.metrics["top_entropy/threshold"] = key_to_float(threshold_key)
    return plan if flat else plan._map(lambda v: v.reshape(shape))


def _plan_metrics(cfg: LossConfig, v: dict[str, float], n_tok: float, n_seq: float, coef: float):
    """(counts that normalise the training forward's sums, global metrics of the selections)."""
    counts = {"n_tokens": n_tok}
    out = {"n_tokens": n_tok, "n_seqs": n_seq, "entropy_coef": coef}
    if cfg.method == "clip_cov":  # reference: pg_clipfrac = fraction of tokens zeroed by Clip-Cov
        out["pg_clipfrac"] = v["clip_cov/selected"] / n_tok
    for prefix in ("clip_cov", "kl_cov"):
        if f"{prefix}/selected" in v:
            sel = v[f"{prefix}/selected"]
            out[f"{prefix}/cov_mean"] = v.pop(f"{prefix}/cov_sum") / n_tok
            out[f"{prefix}/cov_selected_mean"] = v.pop(f"{prefix}/cov_selected_sum") / max(sel, 1.0)
    if "top_entropy/selected" in v:
        sel = v["top_entropy/selected"]
        out["top_entropy/selected_frac"] = sel / n_tok
        out["top_entropy/entropy_selected_mean"] = v.pop("top_entropy/entropy_sum") / max(sel, 1.0)
    if "archer/n_high" in v:
        out["archer/high_frac"] = v.pop("archer/n_high") / n_tok
    if "adv_shaping/bonus_sum" in v:
        out["adv_shaping/bonus_mean"] = v.pop("adv_shaping/bonus_sum") / n_tok
        # of the tokens that can get a bonus (A != 0), the share whose bonus is the cap |A| / kappa
        nonzero = max(v.pop("adv_shaping/nonzero_adv"), 1.0)
        out["adv_shaping/cap_binding_frac"] = v.pop("adv_shaping/cap_binding") / nonzero
    for name in ("high", "low"):
        if f"by_entropy/{name}_n" in v:
            counts[f"by_entropy/{name}_n"] = n = v.pop(f"by_entropy/{name}_n")
            out[f"by_entropy/{name}_selected_frac"] = v.pop(f"by_entropy/{name}_selected") / max(n, 1.0)
    out.update(v)  # remaining raw counts (clip_cov/candidates, clip_cov/selected, kl_cov/selected, ...)
    return counts, out


def apply_loss(
    cfg: LossConfig,
    plan: LossPlan,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    entropy: Tensor | None = None,
    ref_log_prob: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Differentiable loss of the tokens `plan` covers: sum_t pg_weight*l + kl_weight*KL - coef*weight*H.

    Returns (loss, sums): this call's additive parts from its own log-probs (`loss_sum`,
    `pg_loss_sum`, clipped-token counts, KL, entropy, ...). Added over micro-batches and ranks
    (`total_sums`) they give the mini-batch's; `finish_metrics` turns them into metrics.
    """
    method = get_method(cfg.method)
    flat = plan.mask.dim() == 1
    named = {"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages,
             "response_mask": response_mask, "entropy": entropy, "ref_log_prob": ref_log_prob}  # fmt: skip
    mask = _check_inputs(cfg, named, "response_mask", plan.entropy_coef, flat=flat, log_prob_needed=True)
    if plan.mask.shape != mask.shape or not torch.equal(plan.mask, mask):
        raise ValueError(
            f"response_mask {tuple(mask.shape)} does not match the plan's {tuple(plan.mask.shape)}; "
            "pass plan.rows(index) for the same tokens (rows, padded length) as the micro-batch"
        )
    if not flat:
        plan = plan._map(lambda v: v.reshape(-1))
        mask, log_prob, old_log_prob, advantages, entropy, ref_log_prob = (
            None if t is None else t.reshape(-1)
            for t in (mask, log_prob, old_log_prob, advantages, entropy, ref_log_prob)
        )
    lp, old = _clean(log_prob, mask), _clean(old_log_prob.detach(), mask)
    adv = plan.advantages if plan.advantages is not None else _clean(advantages.detach(), mask)
    per_tok, clipped, clipped_lower = method.per_token(cfg, plan, lp, old, adv)
    pg = (plan.pg_weight * torch.where(mask, per_tok, 0)).sum()
    loss = pg
    lp_d = lp.detach()
    ppo_kl = (lp_d - old).abs() if cfg.method == "kl_cov" else old - lp_d  # verl logs mean |log r| for KL-Cov
    parts = {
        "pg_loss_sum": pg,
        "pg_clipped_sum": (mask & clipped).sum(),
        "pg_clipped_lower_sum": (mask & clipped_lower).sum(),
        "ppo_kl_sum": torch.where(mask, ppo_kl, 0).sum(),
    }
    if plan.kl_weight is not None:
        kl = kl_estimate(cfg.kl_estimator, lp, _clean(ref_log_prob.detach(), mask))
        kl_loss = (plan.kl_weight * kl).sum()
        loss = loss + kl_loss
        parts["kl_loss_sum"] = kl_loss
    if entropy is not None:
        ent = _clean(entropy, mask)
        bonus = (plan.weight * ent).sum()
        if plan.entropy_coef != 0.0:
            loss = loss - plan.entropy_coef * bonus
        parts |= {"entropy_bonus_sum": bonus, "entropy_sum": ent.sum()}
    if ref_log_prob is not None:
        kl_d = torch.where(mask, kl_estimate(cfg.kl_estimator, lp_d, _clean(ref_log_prob.detach(), mask)), 0)
        parts["kl_sum"] = kl_d.sum()
        if plan.archer_high is not None:  # each subset's KL aggregated with the loss's mode
            subset_kl = plan.archer_agg * kl_d
            parts["archer/high_entropy_kl"] = torch.where(plan.archer_high, subset_kl, 0).sum()
            parts["archer/low_entropy_kl"] = torch.where(plan.archer_high, 0, subset_kl).sum()
    if plan.penalty is not None:
        log_ratio, _ = _ratio(lp_d, old)
        parts["kl_cov/penalty_sum"] = torch.where(mask, plan.penalty * log_ratio.abs(), 0).sum()
    if plan.high_entropy is not None:
        hit = mask & (clipped | clipped_lower)
        parts["by_entropy/high_clipped_sum"] = (hit & plan.high_entropy).sum()
        parts["by_entropy/low_clipped_sum"] = (hit & ~plan.high_entropy).sum()
    parts["loss_sum"] = loss
    values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in parts.values()]).tolist()
    return loss, dict(zip(parts, values, strict=True))


def total_sums(parts: list[dict[str, float]], group=None) -> dict[str, float]:
    """`apply_loss` sums added over micro-batches (`parts`) and over `group` (one all-reduce).
    Every rank of `group` must call it with the same keys."""
    names = list(parts[0])
    local = [sum(p[k] for p in parts) for k in names]
    return dict(zip(names, all_reduce_sums(local, group), strict=True))


def finish_metrics(cfg: LossConfig, plan: LossPlan, sums: dict[str, float]) -> dict[str, float]:
    """The mini-batch's metrics: the plan's global ones plus `sums` (from `total_sums`) normalised.

    loss, pg_loss, kl_loss, entropy_bonus (totals); pg_clipfrac, pg_clipfrac_lower, ppo_kl (mean old -
    new; KL-Cov: mean |log r|), entropy, kl (token means); Clip-Cov's ppo_clipfrac; KL-Cov's penalty;
    Archer's low/high_entropy_kl (each subset's KL aggregated with the loss's mode); by_entropy/{high,low}_clipfrac.
    """
    v, c = dict(sums), plan.counts
    n = c["n_tokens"]
    out = dict(plan.metrics)
    out["loss"] = v.pop("loss_sum")
    for name in ("pg_loss", "kl_loss", "entropy_bonus"):
        if f"{name}_sum" in v:
            out[name] = v.pop(f"{name}_sum")
    clipfrac = v.pop("pg_clipped_sum") / n
    out["ppo_clipfrac" if cfg.method == "clip_cov" else "pg_clipfrac"] = clipfrac
    out["pg_clipfrac_lower"] = v.pop("pg_clipped_lower_sum") / n
    out["ppo_kl"] = v.pop("ppo_kl_sum") / n
    for name in ("entropy", "kl"):
        if f"{name}_sum" in v:
            out[name] = v.pop(f"{name}_sum") / n
    if "kl_cov/penalty_sum" in v:
        out["kl_cov/penalty"] = v.pop("kl_cov/penalty_sum") / n
    for name in ("high", "low"):
        if f"by_entropy/{name}_clipped_sum" in v:
            out[f"by_entropy/{name}_clipfrac"] = v.pop(f"by_entropy/{name}_clipped_sum") / max(
                c[f"by_entropy/{name}_n"], 1.0
            )
    out.update(v)
    return out


def policy_loss(
    cfg: LossConfig,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    segments: Tensor | None = None,
    positions: Tensor | None = None,
    entropy: Tensor | None = None,
    ref_log_prob: Tensor | None = None,
    sample_ids: Tensor | None = None,
    step: int = 0,
    dp_group=None,
    entropy_coef: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Loss of this rank's whole mini-batch, `apply_loss(cfg, prepare_loss(cfg, ...), ...)`, and the
    mini-batch's metrics (over `dp_group` with global_stats; the loss is this rank's share)."""
    plan = prepare_loss(
        cfg, log_prob, old_log_prob, advantages, response_mask, segments=segments, positions=positions,
        entropy=entropy, ref_log_prob=ref_log_prob, sample_ids=sample_ids, step=step, dp_group=dp_group,
        entropy_coef=entropy_coef,
    )  # fmt: skip
    loss, sums = apply_loss(
        cfg, plan, log_prob, old_log_prob, advantages, response_mask, entropy=entropy, ref_log_prob=ref_log_prob
    )  # fmt: skip
    group = dp_group if cfg.global_stats else None
    return loss, finish_metrics(cfg, plan, total_sums([sums], group))
