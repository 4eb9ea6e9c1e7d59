"""Exact batch statistics over an explicit data-parallel group: sums, top-k, random picks.

Everything here is split-invariant: the result depends on the multiset of (value, id) pairs of the
whole mini-batch, never on how rows are spread over ranks or micro-batches.

* `all_reduce_sums` - one all-reduce of a vector of sums (float64).
* `float_order_key` - the monotone int64 key of a float (bit pattern of its float64 value, negatives
  flipped), so that float order == integer order and bisection on integers is exact.
* `topk_mask` - exactly the k largest keys (ties at the k-th value broken by the smallest secondary
  key, which must be unique), found by bisection: 64 scalar all-reduces per stage, no gather.
* `splitmix64` / `token_hash` - a counter-based hash with int64 torch ops: a uniform key per
  (seed, step, sample_id, position), bijective in (sample_id, position) for a fixed (seed, step).
  `token_ids` / `token_hash` take a [B] id per row and number positions by column; `flat_token_ids`
  / `flat_token_hash` take flat token vectors (a sample id and a position per token).
* `segment_quantile` - the q-quantile of the valid entries of each sequence of a flat vector
  (`row_quantile`: of each row of a [B, L] layout).
* `token_covariance` - Cov(log pi, A) per token, centred over the whole mini-batch (Clip-Cov, KL-Cov,
  telemetry).
* `exact_quantiles` - `torch.quantile`'s linear interpolation at any size (it refuses inputs above
  2^24 elements, exactly what a 2048 x 8192-token step produces).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def _device(values) -> torch.device:
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def all_reduce_sums(values: list[torch.Tensor | float], group=None, enabled: bool = True) -> list[float]:
    """Sum each scalar over `group` (one all-reduce, on the inputs' device) and return Python floats."""
    if not values:
        return []
    dev = _device(values)
    vec = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=dev).reshape(()) for v in values])
    if enabled and group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
    return vec.tolist()


def all_reduce_max(value: float, group=None, enabled: bool = True, device=None) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if enabled and group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def _all_reduce_counts(counts: torch.Tensor, group) -> torch.Tensor:
    counts = counts.to(torch.int64).reshape(-1).clone()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts


def float_order_key(x: torch.Tensor) -> torch.Tensor:
    """int64 key with key(a) < key(b) iff a < b (for non-NaN floats; -0.0 sorts just below +0.0)."""
    bits = x.detach().to(torch.float64).contiguous().view(torch.int64)
    return torch.where(bits < 0, bits ^ _I64_MAX, bits)


def key_to_float(key: int) -> float:
    bits = key ^ _I64_MAX if key < 0 else key
    return torch.tensor([bits], dtype=torch.int64).view(torch.float64).item()


def kth_largest_key(key: torch.Tensor, valid: torch.Tensor, k: int, group=None, fanout: int = 255) -> int:
    """The k-th largest of `key[valid]` over the group (1 <= k <= global count), exactly.

    A `fanout + 1`-ary search: each round counts `key >= t` for `fanout` thresholds at once (one
    all-reduce of a small vector), so 64-bit keys take 8 rounds instead of 64 scalar all-reduces.
    """
    local = key[valid].sort().values
    lo, hi = _I64_MIN, 2**63  # invariant: count(key >= lo) >= k > count(key >= hi)
    while hi - lo > 1:
        span = hi - lo
        ts = sorted({lo + span * j // (fanout + 1) for j in range(1, fanout + 1)} - {lo})
        t = torch.tensor(ts, dtype=torch.int64, device=key.device)
        counts = _all_reduce_counts(local.numel() - torch.searchsorted(local, t, side="left"), group)
        ok = (counts >= k).nonzero()  # counts are non-increasing in t
        idx = int(ok[-1]) if len(ok) else -1
        if idx >= 0:
            lo = ts[idx]
        hi = ts[idx + 1] if idx + 1 < len(ts) else hi
    return lo


def topk_mask(key: torch.Tensor, valid: torch.Tensor, k: int, tie_key: torch.Tensor | None, group=None):
    """Mask of exactly min(k, #valid) entries with the largest `key` over the group.

    Ties at the k-th value are broken by the smallest `tie_key` (must be unique over the group for the
    count to be exact); with `tie_key=None` every tied entry is kept (the count may exceed k).
    Returns (mask, threshold_key).
    """
    n = int(_all_reduce_counts(valid.sum(), group))
    k = min(k, n)
    if k <= 0:
        return torch.zeros_like(valid), None
    thr = kth_largest_key(key, valid, k, group)
    above = valid & (key > thr)
    tied = valid & (key == thr)
    if tie_key is None:
        return above | tied, thr
    n_above, n_tied = _all_reduce_counts(torch.stack([above.sum(), tied.sum()]), group).tolist()
    need = k - n_above
    if n_tied == need:
        return above | tied, thr
    # the need-th smallest tie key == the need-th largest of its bitwise complement (~x = -x - 1)
    s = kth_largest_key(~tie_key, tied, need, group)
    return above | (tied & (~tie_key >= s)), thr


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrap-around arithmetic, logical shifts)."""

    def shr(z, s):
        return (z >> s) & ((1 << (64 - s)) - 1)

    def signed(c):
        return c - 2**64 if c >= 2**63 else c

    z = x + signed(0x9E3779B97F4A7C15)
    z = (z ^ shr(z, 30)) * signed(0xBF58476D1CE4E5B9)
    z = (z ^ shr(z, 27)) * signed(0x94D049BB133111EB)
    return z ^ shr(z, 31)


def splitmix64_int(x: int) -> int:
    """Python reference of `splitmix64` on one unsigned 64-bit integer."""
    m = 2**64 - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def flat_token_ids(token_sample_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Unique int64 id per token: sample_id * 2^32 + position (its position in its sample)."""
    return (token_sample_ids.to(torch.int64) << 32) | positions.to(torch.int64)


def token_ids(sample_ids: torch.Tensor, length: int) -> torch.Tensor:
    """`flat_token_ids` of a [B, length] layout: row i is sample `sample_ids[i]`, position = column."""
    pos = torch.arange(length, dtype=torch.int64, device=sample_ids.device)
    return flat_token_ids(sample_ids[:, None], pos[None, :])


def _salt(seed: int, step: int) -> int:
    salt = splitmix64_int(splitmix64_int(seed & (2**64 - 1)) ^ (step & (2**64 - 1)))
    return salt - 2**64 if salt >= 2**63 else salt


def flat_token_hash(token_sample_ids: torch.Tensor, positions: torch.Tensor, seed: int, step: int):
    """Uniform int64 key per token depending only on (seed, step, sample_id, position)."""
    return splitmix64(flat_token_ids(token_sample_ids, positions) ^ _salt(seed, step))


def token_hash(sample_ids: torch.Tensor, length: int, seed: int, step: int) -> torch.Tensor:
    """`flat_token_hash` of a [B, length] layout (position = column index)."""
    return splitmix64(token_ids(sample_ids, length) ^ _salt(seed, step))


def segment_quantile(values: torch.Tensor, valid: torch.Tensor, segments: torch.Tensor, n: int, q: float):
    """Per sequence: the q-quantile (linear interpolation) of `values[valid]` of its tokens, [n].

    `segments` [N] gives each token's sequence in [0, n). Equals `torch.nanquantile` of each sequence
    with invalid tokens as NaN, without its 16M-element limit; a sequence without valid tokens: +inf.
    """
    valid = valid.bool()
    vals = torch.where(valid, values, torch.full_like(values, float("inf")))
    order = torch.argsort(vals, stable=True)
    order = order[torch.argsort(segments[order], stable=True)]  # by sequence, then by value
    ordered = vals[order]
    size = torch.bincount(segments, minlength=n)
    count = torch.bincount(segments[valid], minlength=n)
    start = size.cumsum(0) - size
    pos = q * (count - 1).clamp(min=0).to(values.dtype)
    lo, hi = pos.floor().long(), pos.ceil().long()
    last = max(ordered.numel() - 1, 0)
    v_lo = ordered[(start + lo).clamp(max=last)] if ordered.numel() else pos
    v_hi = ordered[(start + hi).clamp(max=last)] if ordered.numel() else pos
    out = torch.where(v_lo == v_hi, v_lo, torch.lerp(v_lo, v_hi, pos - lo))
    return torch.where(count > 0, out, torch.full_like(out, float("inf")))


def row_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile of the valid entries of a [B, L] layout, [B, 1] (`segment_quantile` per row):
    `torch.nanquantile(dim=-1)` with padding as NaN, without its 16M-element limit. Empty rows: +inf."""
    b, length = values.shape
    rows = torch.arange(b, device=values.device).repeat_interleave(length)
    return segment_quantile(values.reshape(-1), mask.reshape(-1), rows, b, q)[:, None]


@torch.no_grad()
def token_covariance(
    log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, dp_group=None
) -> torch.Tensor:
    """Cov_t = (log pi_t - mean log pi)(A_t - mean A) (arXiv 2505.22617 §4), 0 on padding.

    Means over the valid tokens of the whole mini-batch (all-reduced over `dp_group` when given).
    Any layout: the tensors are per token.
    """
    m = response_mask.bool()
    lp, adv = torch.where(m, log_prob, 0), torch.where(m, advantages, 0)
    s_a, s_lp, n = all_reduce_sums([adv.sum(), lp.sum(), m.sum()], dp_group)
    cov = (adv - s_a / n) * (lp - s_lp / n)
    return torch.where(m, cov, torch.zeros_like(cov))


@torch.no_grad()
def exact_quantiles(values: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """The q-quantiles of all elements of `values` with linear interpolation, as `torch.quantile`
    (NaN if any element is NaN), at any size: two `torch.kthvalue` selections per q (O(n) each)
    instead of `torch.quantile`'s sort, which refuses more than 2^24 elements. The position
    q (n - 1) is taken in float64 (`torch.quantile` uses the input's dtype): equal for float64
    inputs, within an ulp for float32 ones, and exact ranks where float32 could not count."""
    x = values.detach().reshape(-1)
    n = x.numel()
    if n == 0:
        raise ValueError("exact_quantiles: no values")
    if not all(0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"exact_quantiles: every q must be in [0, 1], got {list(qs)}")
    if bool(torch.isnan(x).any()):
        return [float("nan")] * len(qs)
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = math.floor(pos)
        v_lo = torch.kthvalue(x, lo + 1).values
        if pos == lo:
            out.append(float(v_lo))
            continue
        v_hi = torch.kthvalue(x, lo + 2).values
        out.append(float(torch.lerp(v_lo, v_hi, torch.tensor(pos - lo, dtype=v_lo.dtype))))
    return out
