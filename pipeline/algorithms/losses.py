"""Policy losses of the entropy-control methods, split into a no-grad plan and a differentiable apply.

    plan = prepare_loss(cfg, log_prob, old_log_prob, advantages, mask, entropy=..., dp_group=dp)
    for index in micro_batches:                      # rows of this rank's mini-batch
        loss, m = apply_loss(cfg, plan.rows(index), log_prob_mb, old_mb, adv_mb, mask_mb, entropy=H_mb)
        loss.backward()

`prepare_loss` sees the whole mini-batch held by this rank (no grad; parameters do not change within a
mini-batch, so its log-probs/entropies equal those of the training forward) and computes, collectively
over `dp_group`, every statistic that depends on the whole batch: normalisers, covariance centring,
Clip-Cov candidates and pick, KL-Cov top-k, the top-entropy threshold, Archer's subset counts. They end
up in a `LossPlan` of per-token weights, so the loss is a sum over tokens and

    sum over ranks and micro-batches of apply_loss(...) == policy_loss(...) on the whole batch

(value and gradients w.r.t. log_prob and entropy). With `global_stats=False` nothing is communicated
and every statistic is over the tensors passed to `prepare_loss` (call it per micro-batch to
reproduce the reference repositories; see `docs/algorithms.md` for the differences).

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
    float_order_key,
    key_to_float,
    token_hash,
    token_ids,
    topk_mask,
)

Tensor = torch.Tensor


@dataclass(kw_only=True)
class LossPlan:
    """Per-token weights and selections of one mini-batch (rows = this rank's rows), plus global metrics.

    mask        [B, L] bool  valid response tokens
    weight      [B, L]       aggregation weight incl. the global normaliser (entropy bonus, kl_coef term)
    pg_weight   [B, L]       weight of the per-token policy loss (top-entropy selection, Clip-Cov zeros)
    kl_weight   [B, L]|None  weight of the per-token reference KL (kl_coef * weight + Archer's subset terms)
    advantages  [B, L]|None  entropy-shaped advantages (None: apply_loss uses the advantages passed)
    clip_low/high [B,L]|None per-token clip offsets (Archer; None: cfg.clip_ratio_low/high)
    penalty     [B, L]|None  KL-Cov: beta on selected tokens, 0 elsewhere
    entropy_coef float       coefficient of the entropy bonus (cfg.entropy_coef or the controller's alpha)
    metrics     dict         global metrics of the mini-batch (over dp_group when global_stats)
    """

    mask: Tensor
    weight: Tensor
    pg_weight: Tensor
    kl_weight: Tensor | None = None
    advantages: Tensor | None = None
    clip_low: Tensor | None = None
    clip_high: Tensor | None = None
    penalty: Tensor | None = None
    entropy_coef: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    def rows(self, index) -> LossPlan:
        """The plan restricted to the rows `index` (LongTensor, bool tensor or slice) of one micro-batch."""
        changes = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                changes[f.name] = v[index]
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Per-token losses, one per method. Each returns (loss [B, L], clipped [B, L] bool, clipped_lower).
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
    Each KL term is aggregated over its own subset with loss_agg_mode (token-mean: the subset's mean;
    `plan.kl_weight`, built in `_prepare_archer`), as the reference's `agg_loss(kld, subset, mode)`.
    """
    return ppo_clip_per_token(
        log_prob, old_log_prob, advantages, plan.clip_low, plan.clip_high, cfg.clip_ratio_c
    )


@dataclass(frozen=True)
class Method:
    per_token: Callable  # (cfg, plan, log_prob, old_log_prob, advantages) -> (loss, clipped, clipped_lower)
    prepare: Callable | None = None  # (ctx) -> (plan fields, local metric sums); no grad, may communicate
    needs_entropy: bool = False


# ----------------------------------------------------------------------------------------------
# Batch statistics (no grad): everything that must see the whole mini-batch.
# ----------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    cfg: LossConfig
    log_prob: Tensor
    old_log_prob: Tensor
    advantages: Tensor
    mask: Tensor
    entropy: Tensor | None
    ref_log_prob: Tensor | None
    sample_ids: Tensor
    step: int
    group: object
    n_tokens: float
    n_seqs: float
    length_const: float


@torch.no_grad()
def token_covariance(log_prob: Tensor, advantages: Tensor, response_mask: Tensor, dp_group=None) -> Tensor:
    """Cov_t = (log pi_t - mean log pi)(A_t - mean A) (arXiv 2505.22617 §4), 0 on padding.

    Means over the valid tokens of the whole mini-batch (all-reduced over `dp_group` when given).
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
    L = m.shape[1]
    # smallest hash first: the largest of its bitwise complement; token ids break (impossible) ties
    key = ~token_hash(ctx.sample_ids, L, cfg.seed, ctx.step)
    picked, _ = topk_mask(key, cand, clip_num, token_ids(ctx.sample_ids, L), ctx.group)
    sums = {
        "clip_cov/candidates": cand.sum(),
        "clip_cov/selected": picked.sum(),
        "clip_cov/cov_selected_sum": torch.where(picked, cov, 0).sum(),
        "clip_cov/cov_sum": cov.sum(),
        "ppo_clipped_sum": (m & clipped).sum(),
    }
    return {"keep": ~picked}, sums


def _prepare_kl_cov(ctx: _Ctx):
    cfg, m = ctx.cfg, ctx.mask
    cov = _centred_cov(ctx)
    k = max(1, int(cfg.kl_cov_ratio * ctx.n_tokens))
    L = m.shape[1]
    sel, _ = topk_mask(float_order_key(cov), m, k, token_ids(ctx.sample_ids, L), ctx.group)
    penalty = sel.to(ctx.log_prob.dtype) * cfg.kl_cov_coef
    abs_lr = (ctx.log_prob - ctx.old_log_prob).clamp(-20, 20).abs()
    sums = {
        "kl_cov/selected": sel.sum(),
        "kl_cov/cov_selected_sum": torch.where(sel, cov, 0).sum(),
        "kl_cov/cov_sum": cov.sum(),
        "kl_cov/penalty_sum": torch.where(sel, abs_lr * cfg.kl_cov_coef, 0).sum(),
    }
    return {"penalty": penalty}, sums


def row_quantile(values: Tensor, mask: Tensor, q: float) -> Tensor:
    """Per-row q-quantile of the valid entries with linear interpolation, = `torch.nanquantile(dim=-1)`
    with padding as NaN, but without its 16M-element input limit. Rows without valid entries: +inf."""
    mask = mask.bool()
    vals = torch.where(mask, values, torch.full_like(values, float("inf"))).sort(dim=-1).values
    pos = q * (mask.sum(-1, keepdim=True) - 1).clamp(min=0).to(values.dtype)
    lo, hi = pos.floor().long(), pos.ceil().long()
    v_lo, v_hi = vals.gather(-1, lo), vals.gather(-1, hi)
    return torch.where(v_lo == v_hi, v_lo, torch.lerp(v_lo, v_hi, pos - lo))


def _prepare_archer(ctx: _Ctx):
    cfg, m = ctx.cfg, ctx.mask
    h = ctx.entropy
    threshold = row_quantile(h, m, cfg.archer_entropy_quantile)  # per response, [B, 1]
    high = m & (h > threshold)
    low = m & ~high
    dt = ctx.log_prob.dtype
    eps_high = torch.tensor(cfg.archer_clip_high_entropy, dtype=dt)
    eps = torch.where(high, eps_high, torch.tensor(cfg.archer_clip_low_entropy, dtype=dt))
    # each KL term is agg(KL, subset, loss_agg_mode) as in the reference (`agg_loss(kld, subset_mask,
    # loss_agg_mode)`): token-mean divides by the subset's size, the seq-mean modes by the batch's B
    n_low, n_high = all_reduce_sums([low.sum(), high.sum()], ctx.group)
    kl_weight = torch.zeros_like(ctx.log_prob)
    sums = {"archer/n_high": high.sum()}
    kl = None if ctx.ref_log_prob is None else kl_estimate(cfg.kl_estimator, ctx.log_prob, ctx.ref_log_prob)
    for name, part, n, coef in (("low", low, n_low, cfg.archer_kl_coef_low_entropy),
                                ("high", high, n_high, cfg.archer_kl_coef_high_entropy)):  # fmt: skip
        w = aggregation_weights(cfg.loss_agg_mode, part, max(n, 1.0), ctx.n_seqs, ctx.length_const, dt)
        kl_weight = kl_weight + coef * w
        if kl is not None:
            sums[f"archer/{name}_entropy_kl"] = (w * kl).sum()
    return {"clip_low": eps, "clip_high": eps, "archer_kl_weight": kl_weight}, sums


def _archer_needs_ref(cfg: LossConfig) -> bool:
    return cfg.archer_kl_coef_low_entropy > 0 or cfg.archer_kl_coef_high_entropy > 0


METHODS: dict[str, Method] = {
    "ppo": Method(ppo_loss),
    "cispo": Method(cispo_loss),
    "clip_cov": Method(clip_cov_loss, _prepare_clip_cov),
    "kl_cov": Method(kl_cov_loss, _prepare_kl_cov),
    "archer": Method(archer_loss, _prepare_archer, needs_entropy=True),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown loss method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def aggregation_weights(mode: str, mask: Tensor, n_tokens: float, n_seqs: float, length_const: float, dtype):
    """Per-token weights w with  sum_t w_t l_t == agg(l)  over the (global) batch.

    token-mean              m / N                 (N = valid tokens of the mini-batch, all ranks)
    seq-mean-token-mean     m / (|o_i| * B)       (B = non-empty responses of the mini-batch, as verl)
    seq-mean-token-sum      m / B
    seq-mean-token-sum-norm m / (L_const * B)     (Dr.GRPO: 1/G over responses kept; verl PR #5417)

    `mask` may be a subset of the response tokens (top-entropy selection, Archer's KL subsets): then
    N and |o_i| count the subset, while B stays the batch's responses, as the reference's
    `agg_loss(loss, subset_mask, mode)` does (`torch.mean` over all rows).
    """
    mf = mask.to(dtype)
    if mode == "token-mean":
        return mf / n_tokens
    if mode == "seq-mean-token-mean":
        row = mf.sum(-1, keepdim=True)
        return mf / (row.clamp(min=1) * n_seqs)
    if mode == "seq-mean-token-sum":
        return mf / n_seqs
    if mode == "seq-mean-token-sum-norm":
        return mf / (length_const * n_seqs)
    raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {list(LOSS_AGG_MODES)}")


# ----------------------------------------------------------------------------------------------
# Input checks
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
    if cfg.method == "archer" and _archer_needs_ref(cfg):
        why.append("method=archer with archer_kl_coef_*_entropy > 0")
    return why


def _check_inputs(
    cfg, log_prob, old_log_prob, advantages, response_mask, entropy, ref_log_prob, entropy_coef
):
    """Shapes, required inputs and finiteness on valid tokens; returns the mask as bool."""
    if not isinstance(log_prob, Tensor) or log_prob.dim() != 2:
        raise ValueError(f"log_prob must be a [B, L] tensor; got shape {getattr(log_prob, 'shape', None)}")
    shape = log_prob.shape
    named = {"old_log_prob": old_log_prob, "advantages": advantages, "response_mask": response_mask}
    named |= {"entropy": entropy, "ref_log_prob": ref_log_prob}
    for name, t in named.items():
        if t is not None and (not isinstance(t, Tensor) or t.shape != shape):
            raise ValueError(
                f"{name} has shape {tuple(getattr(t, 'shape', ()))}, expected {tuple(shape)} like log_prob"
            )
    if not log_prob.is_floating_point():
        raise ValueError(f"log_prob must be floating point, got {log_prob.dtype}")
    why = _needs_entropy(cfg, entropy_coef)
    if why and entropy is None:
        raise ValueError(f"entropy (full-vocabulary, [B, L]) is required by {', '.join(why)}; pass entropy=")
    why = _needs_ref(cfg)
    if why and ref_log_prob is None:
        raise ValueError(
            f"ref_log_prob is required by {', '.join(why)}; pass ref_log_prob= or set the coef to 0"
        )
    mask = response_mask.bool()
    checked = {"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages}
    checked |= {"entropy": entropy, "ref_log_prob": ref_log_prob}
    for name, t in checked.items():
        if t is not None and not bool(torch.isfinite(t.detach()[mask]).all()):
            raise ValueError(f"{name} contains NaN or inf on valid (response_mask=1) tokens")
    return mask


def _clean(t: Tensor | None, mask: Tensor) -> Tensor | None:
    """Zero padding positions (keeps gradient on valid tokens, none through garbage padding)."""
    return None if t is None else torch.where(mask, t, torch.zeros((), dtype=t.dtype))


# ----------------------------------------------------------------------------------------------
# prepare / apply / policy_loss
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def prepare_loss(
    cfg: LossConfig,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    entropy: Tensor | None = None,
    ref_log_prob: Tensor | None = None,
    sample_ids: Tensor | None = None,
    step: int = 0,
    dp_group=None,
    entropy_coef: float | None = None,
) -> LossPlan:
    """Compute the plan of one mini-batch (this rank's rows); collective over `dp_group` if global_stats.

    Every rank of `dp_group` must call this together, with the same cfg and step and the same optional
    inputs given (entropy, ref_log_prob): the metric sums are reduced as one vector. `sample_ids` ([B] ints, unique
    in the mini-batch) make Clip-Cov's pick and tie-breaks independent of the split; None = the row
    index, which is split-invariant only if rows keep their global index (single process).
    `entropy_coef` overrides `cfg.entropy_coef` (pass the adaptive controller's alpha here).
    """
    method = get_method(cfg.method)
    coef = cfg.entropy_coef if entropy_coef is None else float(entropy_coef)
    mask = _check_inputs(cfg, log_prob, old_log_prob, advantages, response_mask, entropy, ref_log_prob, coef)
    B, L = mask.shape
    if sample_ids is None:
        sample_ids = torch.arange(B, dtype=torch.int64)
    sample_ids = torch.as_tensor(sample_ids).reshape(-1).to(mask.device)
    if sample_ids.shape[0] != B or sample_ids.is_floating_point():
        raise ValueError(
            f"sample_ids must be [B] = [{B}] integers; got {tuple(sample_ids.shape)} {sample_ids.dtype}"
        )
    if torch.unique(sample_ids).numel() != B:
        raise ValueError("sample_ids must be unique within the mini-batch")
    group = dp_group if cfg.global_stats else None
    lp, old, adv = (_clean(t.detach(), mask) for t in (log_prob, old_log_prob, advantages))
    ent, ref = _clean(None if entropy is None else entropy.detach(), mask), _clean(ref_log_prob, mask)
    dt = lp.dtype

    n_tok, n_seq = all_reduce_sums([mask.sum(), (mask.sum(-1) > 0).sum()], group)
    if n_tok == 0:
        raise ValueError("response_mask has no valid tokens" + (" on any rank of dp_group" if group else ""))
    length_const = cfg.loss_scale_factor or all_reduce_max(float(L), group, device=mask.device)
    sums: dict[str, Tensor] = {}

    shaped = None
    if cfg.adv_entropy_shaping:
        shaped, bonus, cap = entropy_shaped_advantages(
            adv, ent, mask, cfg.adv_shaping_alpha, cfg.adv_shaping_kappa
        )
        sums |= {"adv_shaping/bonus_sum": bonus.sum(), "adv_shaping/cap_binding": cap.sum(),
                 "adv_shaping/nonzero_adv": (mask & (adv != 0)).sum()}  # fmt: skip
        adv = shaped

    ctx = _Ctx(cfg, lp, old, adv, mask, ent, ref, sample_ids, step, group, n_tok, n_seq, length_const)
    fields, method_sums = method.prepare(ctx) if method.prepare else ({}, {})
    sums |= method_sums

    weight = aggregation_weights(cfg.loss_agg_mode, mask, n_tok, n_seq, length_const, dt)
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
            pg_weight = aggregation_weights(cfg.loss_agg_mode, sel, float(sel.sum()), n_seq, length_const, dt)
        sums |= {"top_entropy/selected": sel.sum(), "top_entropy/entropy_sum": torch.where(sel, ent, 0).sum()}
    if "keep" in fields:
        pg_weight = pg_weight * fields.pop("keep")

    kl_weight = None
    if cfg.kl_coef > 0:
        kl_weight = cfg.kl_coef * weight
    archer_kl = fields.pop("archer_kl_weight", None)
    if archer_kl is not None and _archer_needs_ref(cfg):
        kl_weight = archer_kl if kl_weight is None else kl_weight + archer_kl

    plan = LossPlan(mask=mask, weight=weight, pg_weight=pg_weight, kl_weight=kl_weight, advantages=shaped,
                    entropy_coef=coef, **fields)  # fmt: skip

    # metrics: the loss terms and the usual PPO statistics, from the same (no-grad) log-probs
    per_tok, clipped, clipped_lower = method.per_token(cfg, plan, lp, old, adv)
    sums |= {
        "pg_loss": (pg_weight * torch.where(mask, per_tok, 0)).sum(),
        "pg_clipfrac": (mask & clipped).sum(),
        "pg_clipfrac_lower": (mask & clipped_lower).sum(),
        "ppo_kl": torch.where(mask, old - lp, 0).sum(),
    }
    if cfg.method == "kl_cov":  # verl logs mean |log r| for KL-Cov
        sums["ppo_kl"] = torch.where(mask, (lp - old).abs(), 0).sum()
    if ent is not None:
        sums["entropy"] = ent.sum()
        sums["entropy_bonus"] = (weight * ent).sum()
        # clip and selection fractions of the high-entropy ("forking", top 20 %) and the other tokens
        high, _ = topk_mask(float_order_key(ent), mask, max(1, math.ceil(0.2 * n_tok - 1e-9)), None, group)
        for name, part in (("high", high), ("low", mask & ~high)):
            sums |= {
                f"by_entropy/{name}_n": part.sum(),
                f"by_entropy/{name}_clipped": (part & (clipped | clipped_lower)).sum(),
                f"by_entropy/{name}_selected": (part & special).sum(),
            }
    if ref is not None:
        kl = kl_estimate(cfg.kl_estimator, lp, ref)
        sums["kl"] = torch.where(mask, kl, 0).sum()
        if kl_weight is not None:
            sums["kl_loss"] = (kl_weight * kl).sum()
    names = list(sums)
    values = dict(zip(names, all_reduce_sums([sums[n] for n in names], group), strict=True))
    plan.metrics = _finish_metrics(cfg, values, n_tok, n_seq, coef)
    if threshold_key is not None:
        plan.metrics["top_entropy/threshold"] = key_to_float(threshold_key)
    return plan


def _finish_metrics(cfg: LossConfig, v: dict[str, float], n_tok: float, n_seq: float, coef: float) -> dict:
    out = {"n_tokens": n_tok, "n_seqs": n_seq, "entropy_coef": coef}
    for name in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "entropy", "kl"):
        if name in v:
            out[name] = v.pop(name) / n_tok
    for name in ("pg_loss", "entropy_bonus", "kl_loss"):
        if name in v:
            out[name] = v.pop(name)
    if cfg.method == "clip_cov":  # reference: pg_clipfrac = fraction of tokens zeroed by Clip-Cov
        out["ppo_clipfrac"] = v.pop("ppo_clipped_sum") / n_tok
        out["pg_clipfrac"] = v["clip_cov/selected"] / n_tok
    for prefix in ("clip_cov", "kl_cov"):
        if f"{prefix}/selected" in v:
            sel = v[f"{prefix}/selected"]
            out[f"{prefix}/cov_mean"] = v.pop(f"{prefix}/cov_sum") / n_tok
            out[f"{prefix}/cov_selected_mean"] = v.pop(f"{prefix}/cov_selected_sum") / max(sel, 1.0)
    if "kl_cov/penalty_sum" in v:
        out["kl_cov/penalty"] = v.pop("kl_cov/penalty_sum") / n_tok
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
            n = max(v.pop(f"by_entropy/{name}_n"), 1.0)
            out[f"by_entropy/{name}_clipfrac"] = v.pop(f"by_entropy/{name}_clipped") / n
            out[f"by_entropy/{name}_selected_frac"] = v.pop(f"by_entropy/{name}_selected") / n
    out.update(v)  # remaining raw counts (clip_cov/candidates, clip_cov/selected, kl_cov/selected, ...)
    return out


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
    """Differentiable loss of the rows `plan` covers: sum_t pg_weight*l + kl_weight*KL - coef*weight*H.

    Returns (loss, metrics) where metrics are this call's additive parts (`loss_sum`, `pg_loss_sum`,
    `kl_loss_sum`, `entropy_bonus_sum`): summed over micro-batches and ranks they give the mini-batch
    values. The global metrics are in `plan.metrics`.
    """
    method = get_method(cfg.method)
    mask = _check_inputs(
        cfg, log_prob, old_log_prob, advantages, response_mask, entropy, ref_log_prob, plan.entropy_coef
    )
    if plan.mask.shape != mask.shape or not torch.equal(plan.mask, mask):
        raise ValueError(
            f"response_mask {tuple(mask.shape)} does not match the plan's rows {tuple(plan.mask.shape)}; "
            "pass plan.rows(index) for the same rows (and padded length) as the micro-batch"
        )
    lp, old = _clean(log_prob, mask), _clean(old_log_prob.detach(), mask)
    adv = plan.advantages if plan.advantages is not None else _clean(advantages.detach(), mask)
    per_tok, _, _ = method.per_token(cfg, plan, lp, old, adv)
    pg = (plan.pg_weight * torch.where(mask, per_tok, 0)).sum()
    loss = pg
    metrics = {"pg_loss_sum": pg.item()}
    if plan.kl_weight is not None:
        kl = kl_estimate(cfg.kl_estimator, lp, _clean(ref_log_prob.detach(), mask))
        kl_loss = (plan.kl_weight * kl).sum()
        loss = loss + kl_loss
        metrics["kl_loss_sum"] = kl_loss.item()
    if plan.entropy_coef != 0.0:
        bonus = (plan.weight * _clean(entropy, mask)).sum()
        loss = loss - plan.entropy_coef * bonus
        metrics["entropy_bonus_sum"] = bonus.item()
    metrics["loss_sum"] = loss.item()
    return loss, metrics


def policy_loss(
    cfg: LossConfig,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    entropy: Tensor | None = None,
    ref_log_prob: Tensor | None = None,
    sample_ids: Tensor | None = None,
    step: int = 0,
    dp_group=None,
    entropy_coef: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Loss of this rank's whole mini-batch: apply_loss(cfg, prepare_loss(cfg, ...), ...).

    Metrics: the global ones of `prepare_loss` plus this rank's additive parts (`*_sum`).
    """
    plan = prepare_loss(
        cfg, log_prob, old_log_prob, advantages, response_mask, entropy=entropy, ref_log_prob=ref_log_prob,
        sample_ids=sample_ids, step=step, dp_group=dp_group, entropy_coef=entropy_coef,
    )  # fmt: skip
    loss, metrics = apply_loss(
        cfg,
        plan,
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        entropy=entropy,
        ref_log_prob=ref_log_prob,
    )
    return loss, {**plan.metrics, **metrics}
