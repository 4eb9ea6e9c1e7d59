"""Samples into packed micro-batches: balanced over data-parallel ranks, binned under a token budget.

Binning is pure Python on sample lengths:

* `balance(lengths, k)` splits samples over the k data-parallel ranks with near-equal token sums:
  Karmarkar-Karp's largest differencing method (k-way), as verl's `get_seqlen_balanced_partitions`.
* `micro_batches(lengths, budget, ...)` bins one rank's samples into micro-batches whose token sum is
  at most `budget`: first-fit decreasing (a sample longer than the budget gets a micro-batch of its
  own). `count=` splits bins further (and, where a rank has fewer samples than that, adds empty ones)
  so that every data-parallel rank runs the same number of micro-batches.

A micro-batch's model inputs (`packed_inputs`): with Transformer Engine on CUDA one THD row with
`PackedSeqParams` (`cu_seqlens`), where attention never crosses a sample; with the local layer spec
(CPU), which computes every score of a row, packed rows `[k, L]` as long as the micro-batch's longest
sample (`row_layout`: short samples share a row) with a block-diagonal causal mask, built on the
tokens' device. Megatron's RoPE takes the row's positions 0..L-1 and ignores `position_ids`;
`sequence_positions` makes the local spec's RoPE use each token's position in its own sample, as THD
does. Micro-batches differ in shape; a pipeline (PP > 1) sends their shapes ahead (megatron's
`variable_seq_lengths`), except under the interleaved schedule (VPP), whose shape exchange does not
pair up between stages in megatron-core 0.16.1 (a training step deadlocks, measured on gloo): there
every micro-batch of a step is padded to the step's largest shape (`pad_to`). The THD path has not
run on a GPU yet: only its construction is tested (on CPU).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


# ---- binning ---------------------------------------------------------------------------------------
def balance(lengths: list[int], k: int) -> list[list[int]]:
    """k lists of sample indices with near-equal sums of `lengths` (Karmarkar-Karp, k-way).

    Each sample starts as a partial solution of k subsets (itself and k-1 empty ones); the two
    solutions with the largest spread (max - min subset sum) are merged, pairing the largest subset of
    one with the smallest of the other, until one is left. Deterministic; each list is in index order.
    """
    if k < 1:
        raise ValueError(f"balance: k={k} must be >= 1")
    heap = []
    for i, n in enumerate(lengths):
        subsets = [(int(n), [i])] + [(0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-int(n), i, subsets))
    if not heap:
        return [[] for _ in range(k)]
    while len(heap) > 1:
        _, tie_a, a = heapq.heappop(heap)
        _, tie_b, b = heapq.heappop(heap)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b), strict=True)]
        merged.sort(key=lambda s: (-s[0], min(s[1], default=-1)))
        heapq.heappush(heap, (merged[-1][0] - merged[0][0], min(tie_a, tie_b), merged))
    return [sorted(ids) for _, ids in heap[0][2]]


def micro_batches(
    lengths: list[int], budget: int | None, *, rows: int = 1, count: int | None = None
) -> list[list[int]]:
    """Sample indices per micro-batch: the token sum of each is <= `budget` (a longer sample alone).

    `budget=None` keeps fixed rows: `rows` consecutive samples per micro-batch. `count` (>= the
    number of bins the budget needs) splits the bins with most samples in two until there are
    `count`, then adds empty micro-batches if the samples run out.
    """
    order = range(len(lengths))
    if budget is None:
        bins = [list(order[i : i + rows]) for i in range(0, len(lengths), rows)]
    else:
        bins, room = [], []  # first-fit decreasing
        for i in sorted(order, key=lambda i: (-lengths[i], i)):
            j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
            if j is None:
                bins.append([i])
                room.append(budget - lengths[i])
            else:
                bins[j].append(i)
                room[j] -= lengths[i]
    if count is not None:
        if count < len(bins):
            raise ValueError(f"micro_batches: count={count} is fewer than the {len(bins)} bins needed")
        while len(bins) < count:
            j = max(
                range(len(bins)), key=lambda j: (len(bins[j]), sum(lengths[i] for i in bins[j])), default=None
            )
            if j is None or len(bins[j]) < 2:
                bins.append([])
                continue
            halves = balance([lengths[i] for i in bins[j]], 2)
            bins[j : j + 1] = [[bins[j][i] for i in half] for half in halves]
    return bins


# ---- the model inputs of one packed micro-batch ------------------------------------------------------
def row_layout(lengths: list[int], thd: bool) -> list[list[int]]:
    """A micro-batch's samples in rows: one row with THD (attention stays within each sample); with
    the local spec, first-fit decreasing rows as long as the longest sample, so that attention
    computes k x L^2 scores (L = the longest sample) instead of S^2 over the whole micro-batch."""
    if thd or not lengths:
        return [list(range(len(lengths)))]
    return micro_batches(lengths, max(lengths))


@dataclass
class PackedInputs:
    input_ids: torch.Tensor  # [k, L] k packed rows (THD: k = 1)
    position_ids: torch.Tensor  # [k, L] each token's position in its sample
    attention_mask: torch.Tensor | None  # [k, 1, L, L] bool, True = masked (local spec); None = causal
    packed_seq_params: object | None  # megatron PackedSeqParams (THD, Transformer Engine)
    first: torch.Tensor  # [k, L] bool: a sample's first token (nothing predicts it)
    real: torch.Tensor  # [k * L] bool: the slots that hold the samples' tokens, in their order


def packed_inputs(
    tokens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    row_sizes: list[int] | None = None,
    thd: bool,
    pad_to: tuple[int, int] | None = None,
    multiple: int = 1,
) -> PackedInputs:
    """The samples `tokens` [T] (boundaries `cu_seqlens` [n + 1]) as packed rows on their device.

    `row_sizes` gives the number of consecutive samples in each row (default: all in one row); rows are
    as long as the longest and padded at their end. `pad_to=(k, L)` pads to k rows of L tokens: fixed
    shapes for a pipeline schedule that cannot take micro-batches of different shapes. A pad span is a
    sequence of its own (it attends only to itself) and its slots are not `real`. Rows are padded to a
    `multiple` of tokens (sequence parallel splits each row evenly over the tensor-parallel ranks).
    """
    cu = cu_seqlens.tolist()
    sizes = [b - a for a, b in zip(cu, cu[1:], strict=False)]
    row_sizes = row_sizes or [len(sizes)]
    starts = [sum(row_sizes[:r]) for r in range(len(row_sizes))]  # each row's first sample
    k = len(row_sizes)
    length = max(cu[s + n] - cu[s] for s, n in zip(starts, row_sizes, strict=True))
    if pad_to is not None:
        k, length = max(k, pad_to[0]), max(length, pad_to[1])
    length = -(-length // multiple) * multiple
    index, segment, position = [], [], []  # per slot: token index, sample (pad: -(row + 1)), position
    for r in range(k):
        samples = range(starts[r], starts[r] + row_sizes[r]) if r < len(row_sizes) else range(0)
        idx = [t for i in samples for t in range(cu[i], cu[i + 1])]
        pad = length - len(idx)
        index.append(idx + [-1] * pad)
        segment.append([i for i in samples for _ in range(sizes[i])] + [-(r + 1)] * pad)
        position.append([p for i in samples for p in range(sizes[i])] + list(range(pad)))
    index, segment, position = (torch.tensor(v, dtype=torch.long) for v in (index, segment, position))
    dev = tokens.device
    index, segment, position = index.to(dev), segment.to(dev), position.to(dev)
    ids = torch.where(index >= 0, tokens[index.clamp(min=0)], 0)
    mask, params = None, None
    if thd:
        from megatron.core.packed_seq_params import PackedSeqParams

        if k != 1:
            raise ValueError("THD packing takes one row per micro-batch")
        bounds = [0, *cu[1:]] + ([length] if length > cu[-1] else [])
        cu32 = torch.tensor(bounds, dtype=torch.int32, device=dev)
        longest = int((cu32[1:] - cu32[:-1]).max())
        params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu32,
            cu_seqlens_kv=cu32,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
    elif k > 1 or len(sizes) > 1 or length > cu[-1]:  # one sample alone in one row: megatron's causal mask
        mask = block_causal_mask(segment)
    return PackedInputs(ids, position, mask, params, position == 0, (index >= 0).reshape(-1))


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[k, 1, L, L] bool from [k, L] (or [1, 1, S, S] from [S]) segment ids, True = masked: token t
    sees the tokens s <= t of its own sequence only."""
    seg = segments if segments.dim() == 2 else segments[None]
    length = seg.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril_()
    keep = causal & (seg[:, :, None] == seg[:, None, :])
    return ~keep[:, None]


def sequence_positions(rotary) -> None:
    """Make a megatron `RotaryEmbedding` use `rotary.packed_positions` ([S] or [rows, S], set before
    each forward) instead of the row's positions 0..S-1; unset or with THD it behaves as before.

    The same frequencies as megatron's `get_emb` (fp32 outer product, then the two halves), at
    positions that restart at every sample, which is what a one-sample-at-a-time forward computes.
    """
    if getattr(rotary, "packed_positions", "absent") != "absent":
        return
    original = rotary.forward

    def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        pos = rotary.packed_positions
        if pos is None or packed_seq:
            return original(max_seq_len, offset, packed_seq, cp_group)
        inv = rotary.inv_freq.to(pos.device)
        seq = (pos if pos.dim() == 2 else pos[None]).t().to(inv.dtype) + offset  # [S, rows]
        if rotary.seq_len_interpolation_factor is not None:
            seq = seq * (1 / rotary.seq_len_interpolation_factor)
        freqs = seq[..., None] * inv  # [S, rows, dim / 2], each the fp32 product megatron's outer takes
        if rotary.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, :, None, :]  # [S, rows, 1, dim]: broadcast over heads (sbhd)

    rotary.packed_positions = None
    rotary.forward = forward
