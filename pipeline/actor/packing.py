"""Samples into packed micro-batches: balanced over data-parallel ranks, binned under a token budget.

Binning is pure Python on sample lengths:

* `balance(lengths, k)` splits samples over the k data-parallel ranks with near-equal token sums:
  Karmarkar-Karp's largest differencing method (k-way), as verl's `get_seqlen_balanced_partitions`.
* `micro_batches(lengths, budget, ...)` bins one rank's samples into micro-batches whose token sum is
  at most `budget`: first-fit decreasing (a sample longer than the budget gets a micro-batch of its
  own). `count=` splits bins further (and, where a rank has fewer samples than that, adds empty ones)
  so that every data-parallel rank runs the same number of micro-batches.

A micro-batch is one packed row `[1, S]` (`packed_inputs`): with the local layer spec (CPU) a
block-diagonal causal mask and per-sequence positions, built on the tokens' device; with Transformer
Engine, the THD layout with `PackedSeqParams` (`cu_seqlens`), where attention never crosses a sample.
Rows differ in length; a pipeline (PP > 1) sends their shapes ahead (megatron's
`variable_seq_lengths`), except under the interleaved schedule (VPP), whose shape exchange does not
pair up between stages in megatron-core 0.16.1 (a training step deadlocks, measured on gloo): there
every row of a step is padded to the step's longest (`pad_to`).
Megatron's RoPE takes positions 0..S-1 of the row and ignores `position_ids`; `sequence_positions`
makes the local spec's RoPE use each token's position in its own sample, as THD does. The THD path
has not run on a GPU yet: only its construction is tested (on CPU).
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
@dataclass
class PackedInputs:
    input_ids: torch.Tensor  # [1, S]
    position_ids: torch.Tensor  # [1, S] each token's position in its sample
    attention_mask: torch.Tensor | None  # [1, 1, S, S] bool, True = masked (local spec); None = causal
    packed_seq_params: object | None  # megatron PackedSeqParams (THD, Transformer Engine)
    first: torch.Tensor  # [S] bool: a sample's first token (nothing predicts it)
    real: int  # tokens of the samples; the rest of the row is padding


def packed_inputs(
    tokens: torch.Tensor, cu_seqlens: torch.Tensor, *, thd: bool, pad_to: int | None = None
) -> PackedInputs:
    """One packed row of the samples `tokens` [S] with boundaries `cu_seqlens` [n + 1], on their device.

    `pad_to` appends pad tokens as a sequence of their own (attending only to themselves) up to that
    length: fixed shapes for a pipeline schedule that cannot take micro-batches of different lengths.
    """
    dev = tokens.device
    cu = cu_seqlens.to(dev)
    real = tokens.shape[0]
    if pad_to is not None and pad_to > real:
        tokens = torch.cat([tokens, tokens.new_zeros(pad_to - real)])
        cu = torch.cat([cu, cu.new_tensor([pad_to])])
    sizes = cu[1:] - cu[:-1]
    seg = torch.arange(sizes.shape[0], device=dev).repeat_interleave(sizes)
    pos = torch.arange(tokens.shape[0], device=dev) - cu[seg]
    mask, params = None, None
    if thd:
        from megatron.core.packed_seq_params import PackedSeqParams

        cu32, longest = cu.to(torch.int32), int(sizes.max())
        params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu32,
            cu_seqlens_kv=cu32,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
    elif sizes.shape[0] > 1:  # one sample: megatron's own causal mask
        mask = block_causal_mask(seg)
    return PackedInputs(tokens[None], pos[None], mask, params, pos == 0, real)


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[1, 1, S, S] bool, True = masked: token t sees tokens s <= t of its own sample only."""
    s = segments.shape[0]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril_()
    keep = causal & (segments[:, None] == segments[None, :])
    return ~keep[None, None]


def sequence_positions(rotary) -> None:
    """Make a megatron `RotaryEmbedding` use `rotary.packed_positions` ([S], set before each forward)
    instead of the row's positions 0..S-1; unset or with THD it behaves as before.

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
        seq = pos.to(inv.dtype) + offset
        if rotary.seq_len_interpolation_factor is not None:
            seq = seq * (1 / rotary.seq_len_interpolation_factor)
        freqs = torch.outer(seq, inv)
        if rotary.rotary_interleaved:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]

    rotary.packed_positions = None
    rotary.forward = forward
