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
every statistic that depends on the whole batch: normalisers, the top-entropy threshold, and the method's
own (its `prepare`: Clip-Cov's pick, KL-Cov's top-k, Archer's subset sizes). Only the methods that select
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
with l_t the method's per-token loss (one module per method in `pipeline/algorithms/methods/`, named
by the registry `METHODS` there; this module calls only the hooks of its `Method`), `weight` the
aggregation weight of `loss_agg_mode` with global normaliser, `pg_weight` = weight restricted to the
tokens the policy gradient uses (top-entropy selection, the tokens a method drops removed). The actor
multiplies by dp_size (and Megatron's num_microbatches) to undo gradient averaging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.algorithms.advantages import entropy_shaped_advantages
from pipeline.algorithms.config import LossConfig
from pipeline.algorithms.kl import kl_estimate
from pipeline.algorithms.methods import METHODS, Method, Prepared, get_method
from pipeline.algorithms.plan import LossPlan, MiniBatch, aggregation_weights
from pipeline.algorithms.stats import (
    all_reduce_max,
    all_reduce_sums,
    float_order_key,
    key_to_float,
    row_quantile,
    token_covariance,
    topk_mask,
)

Tensor = torch.Tensor

# re-exported: the loss library's public names live here and in `pipeline.algorithms`
__all__ = [
    "METHODS",
    "LossPlan",
    "Method",
    "Needs",
    "aggregation_weights",
    "apply_loss",
    "finish_metrics",
    "get_method",
    "loss_needs",
    "policy_loss",
    "prepare_loss",
    "row_quantile",
    "token_covariance",
    "total_sums",
]


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


def loss_needs(cfg: LossConfig) -> Needs:
    """What `cfg` needs before the training forward: the method's own needs plus the composable
    options (top-entropy selection and entropy-shaped advantages read entropies; kl_coef a reference).
    The entropy bonus needs only the training forward's entropy, which the actor always computes."""
    why = _requirements(cfg, entropy_coef=0.0)
    return Needs(log_prob=get_method(cfg.method).needs_log_prob, entropy=bool(why["entropy"]),
                 reference=bool(why["ref_log_prob"]))  # fmt: skip


def _requirements(cfg: LossConfig, entropy_coef: float) -> dict[str, list[str]]:
    """Why `entropy` and `ref_log_prob` are required (empty lists: they are not), in the words of the
    error `_check_inputs` raises. With `entropy_coef` != 0 the training forward needs entropies too."""
    method = get_method(cfg.method)
    entropy, ref = [], []
    if method.needs_entropy:
        entropy.append(f"method={cfg.method}")
    if cfg.top_entropy_ratio < 1.0:
        entropy.append(f"top_entropy_ratio={cfg.top_entropy_ratio}")
    if cfg.adv_entropy_shaping:
        entropy.append("adv_entropy_shaping=True")
    if entropy_coef != 0.0:
        entropy.append(f"entropy_coef={entropy_coef}")
    if cfg.kl_coef > 0:
        ref.append(f"kl_coef={cfg.kl_coef}")
    if method.needs_reference(cfg):
        ref.append(f"method={cfg.method} with its KL coefficients > 0")
    return {"entropy": entropy, "ref_log_prob": ref}


# ----------------------------------------------------------------------------------------------
# Input checks and layouts
# ----------------------------------------------------------------------------------------------


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
    why = _requirements(cfg, entropy_coef)
    if why["entropy"] and named.get("entropy") is None:
        raise ValueError(
            f"entropy (full-vocabulary, per token) is required by {', '.join(why['entropy'])}; pass entropy="
        )
    if why["ref_log_prob"] and named.get("ref_log_prob") is None:
        raise ValueError(
            f"ref_log_prob is required by {', '.join(why['ref_log_prob'])}; pass ref_log_prob= or set the coef to 0"
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

    batch = MiniBatch(cfg, lp if method.needs_log_prob else None, old, adv, mask,
                      ent if method.needs_entropy else None, segments, n, sample_ids[segments], positions, step,
                      group, n_tok, n_seq, length_const)  # fmt: skip
    own = method.prepare(batch) if method.prepare else Prepared()
    sums |= own.sums

    weight = aggregation_weights(
        cfg.loss_agg_mode, mask, n_tok, n_seq, length_const, dt, seq_tokens[segments]
    )
    pg_weight, threshold_key = weight, None
    # tokens treated specially: the method's own (dropped, penalised, ...) and top-entropy's kept
    special = own.selected if own.selected is not None else torch.zeros_like(mask)
    if cfg.top_entropy_ratio < 1.0:
        k = max(1, math.ceil(cfg.top_entropy_ratio * n_tok - 1e-9))
        sel, threshold_key = topk_mask(float_order_key(ent), mask, k, None, group)
        special = special | sel
        if cfg.global_stats:  # paper / TRL: normaliser over all tokens
            pg_weight = weight * sel
        else:  # official 80/20 repo: the selected tokens are the aggregation mask of the call
            pg_weight = aggregation_weights(cfg.loss_agg_mode, sel, float(sel.sum()), n_seq, length_const, dt,
                                            batch.per_sequence(sel))  # fmt: skip
        sums |= {"top_entropy/selected": sel.sum(), "top_entropy/entropy_sum": torch.where(sel, ent, 0).sum()}
    if own.keep is not None:
        pg_weight = pg_weight * own.keep

    kl_weight = None
    if cfg.kl_coef > 0:
        kl_weight = cfg.kl_coef * weight
    if own.kl_weight is not None:
        kl_weight = own.kl_weight if kl_weight is None else kl_weight + own.kl_weight

    high = None
    if ent is not None:  # the high-entropy ("forking", top 20 %) tokens and the rest: selection fractions
        high, _ = topk_mask(float_order_key(ent), mask, max(1, math.ceil(0.2 * n_tok - 1e-9)), None, group)
        for name, part in (("high", high), ("low", mask & ~high)):
            sums |= {
                f"by_entropy/{name}_n": part.sum(),
                f"by_entropy/{name}_selected": (part & special).sum(),
            }

    plan = LossPlan(mask=mask, weight=weight, pg_weight=pg_weight, kl_weight=kl_weight, advantages=shaped,
                    high_entropy=high, tensors=own.tensors, entropy_coef=coef)  # fmt: skip
    names = list(sums)
    values = dict(zip(names, all_reduce_sums([sums[k] for k in names], group), strict=True))
    plan.counts, plan.metrics = _plan_metrics(method, values, n_tok, n_seq, coef)
    if threshold_key is not None:
        plan.metrics["top_entropy/threshold"] = key_to_float(threshold_key)
    return plan if flat else plan._map(lambda v: v.reshape(shape))


def _plan_metrics(method: Method, v: dict[str, float], n_tok: float, n_seq: float, coef: float):
    """(counts that normalise the training forward's sums, global metrics of the selections)."""
    counts = {"n_tokens": n_tok}
    out = {"n_tokens": n_tok, "n_seqs": n_seq, "entropy_coef": coef}
    if method.plan_metrics:
        out |= method.plan_metrics(v, n_tok)
    if "top_entropy/selected" in v:
        sel = v["top_entropy/selected"]
        out["top_entropy/selected_frac"] = sel / n_tok
        out["top_entropy/entropy_selected_mean"] = v.pop("top_entropy/entropy_sum") / max(sel, 1.0)
    if "adv_shaping/bonus_sum" in v:
        out["adv_shaping/bonus_mean"] = v.pop("adv_shaping/bonus_sum") / n_tok
        # of the tokens that can get a bonus (A != 0), the share whose bonus is the cap |A| / kappa
        nonzero = max(v.pop("adv_shaping/nonzero_adv"), 1.0)
        out["adv_shaping/cap_binding_frac"] = v.pop("adv_shaping/cap_binding") / nonzero
    for name in ("high", "low"):
        if f"by_entropy/{name}_n" in v:
            counts[f"by_entropy/{name}_n"] = n = v.pop(f"by_entropy/{name}_n")
            out[f"by_entropy/{name}_selected_frac"] = v.pop(f"by_entropy/{name}_selected") / max(n, 1.0)
    out.update(v)  # remaining raw counts (a method's selected tokens, ...)
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
    ppo_kl = method.ppo_kl(lp_d, old)
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
    kl_d = None
    if ref_log_prob is not None:
        kl_d = torch.where(mask, kl_estimate(cfg.kl_estimator, lp_d, _clean(ref_log_prob.detach(), mask)), 0)
        parts["kl_sum"] = kl_d.sum()
    if method.apply_sums:
        parts |= method.apply_sums(cfg, plan, lp_d, old, mask, kl_d)
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
    new, or the method's `ppo_kl`), entropy, kl (token means), by_entropy/{high,low}_clipfrac; the
    clipped fraction under the method's `clipfrac_metric`, and its `finish_metrics`.
    """
    method = get_method(cfg.method)
    v, c = dict(sums), plan.counts
    n = c["n_tokens"]
    out = dict(plan.metrics)
    out["loss"] = v.pop("loss_sum")
    for name in ("pg_loss", "kl_loss", "entropy_bonus"):
        if f"{name}_sum" in v:
            out[name] = v.pop(f"{name}_sum")
    out[method.clipfrac_metric] = v.pop("pg_clipped_sum") / n
    out["pg_clipfrac_lower"] = v.pop("pg_clipped_lower_sum") / n
    out["ppo_kl"] = v.pop("ppo_kl_sum") / n
    for name in ("entropy", "kl"):
        if f"{name}_sum" in v:
            out[name] = v.pop(f"{name}_sum") / n
    if method.finish_metrics:
        out |= method.finish_metrics(v, n)
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
    **batch,
) -> tuple[Tensor, dict[str, float]]:
    """Loss of this rank's whole mini-batch, `apply_loss(cfg, prepare_loss(cfg, ...), ...)`, and the
    mini-batch's metrics (over `dp_group` with global_stats; the loss is this rank's share).

    `batch`: `prepare_loss`'s keywords (segments, positions, entropy, ref_log_prob, sample_ids, step,
    dp_group, entropy_coef), with the same meaning."""
    plan = prepare_loss(cfg, log_prob, old_log_prob, advantages, response_mask, **batch)
    loss, sums = apply_loss(
        cfg, plan, log_prob, old_log_prob, advantages, response_mask,
        entropy=batch.get("entropy"), ref_log_prob=batch.get("ref_log_prob"),
    )  # fmt: skip
    group = batch.get("dp_group") if cfg.global_stats else None
    return loss, finish_metrics(cfg, plan, total_sums([sums], group))
