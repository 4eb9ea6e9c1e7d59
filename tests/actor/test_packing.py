"""Binning samples into micro-batches (pure Python) and the model inputs of a packed row."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.actor.packing import (
    balance,
    block_causal_mask,
    micro_batches,
    packed_inputs,
    row_layout,
    sequence_positions,
)


def long_tailed(n: int, seed: int) -> list[int]:
    """Prompts of 50-300 tokens plus log-normal responses (median 300, p99 about 4000)."""
    rng = random.Random(seed)
    return [rng.randint(50, 300) + int(min(16000, rng.lognormvariate(5.7, 1.1))) for _ in range(n)]


def test_balance_karmarkar_karp_small_example_and_properties():
    # differencing 8-7, 6-5, 4-1, 3-1: sums 16 and 14 (the optimum is 15/15; LPT also gives 16/14)
    assert balance([8, 7, 6, 5, 4], 2) == [[1, 3, 4], [0, 2]]
    assert balance([], 3) == [[], [], []] and balance([5], 3) == [[0], [], []]
    for seed in range(5):
        lengths = long_tailed(64, seed)
        for k in (2, 3, 4, 8):
            parts = balance(lengths, k)
            assert sorted(i for p in parts for i in p) == list(range(64))  # every sample once
            sums = [sum(lengths[i] for i in p) for p in parts]
            spread, mean = max(sums) - min(sums), sum(lengths) / k
            naive = [sum(lengths[i] for i in range(r, 64, k)) for r in range(k)]  # round robin
            assert spread <= max(lengths) and max(sums) <= mean + max(lengths)
            assert spread <= max(naive) - min(naive)
            assert balance(lengths, k) == parts  # deterministic: every rank computes the same split


def test_balance_on_the_benchmark_distribution_is_within_two_percent_at_dp_2():
    lengths = long_tailed(64, 0)
    sums = [sum(lengths[i] for i in p) for p in balance(lengths, 2)]
    assert max(sums) / (sum(lengths) / 2) < 1.02, sums


def test_micro_batches_respect_the_budget_and_give_a_long_sample_its_own():
    lengths = [30, 70, 20, 90, 50, 10, 150]
    bins = micro_batches(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert [6] in bins  # 150 > 100: alone
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins if b != [6])
    # first-fit decreasing: 150 | 90+10 | 70+30 | 50+20
    assert bins == [[6], [3, 5], [1, 0], [4, 2]]
    assert micro_batches(lengths, None, rows=3) == [[0, 1, 2], [3, 4, 5], [6]]  # fixed rows


def test_micro_batches_split_to_a_common_count_and_pad_with_empty_ones():
    lengths = [30, 70, 20, 90, 50, 10, 150]
    bins = micro_batches(lengths, 100, count=6)
    assert len(bins) == 6 and sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins if b != [6])
    bins = micro_batches([40, 40], 100, count=3)  # one bin of two samples -> two, then one empty
    assert sorted(map(sorted, bins)) == [[], [0], [1]]
    with pytest.raises(ValueError, match="fewer than the 2 bins"):
        micro_batches([90, 90], 100, count=1)


def test_packed_row_has_a_block_diagonal_causal_mask_and_per_sample_positions():
    tokens = torch.arange(10, 17)
    x = packed_inputs(tokens, torch.tensor([0, 3, 7]), thd=False)
    assert x.input_ids.tolist() == [list(range(10, 17))] and x.real.all()
    assert x.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]] and x.first.tolist() == [[1, 0, 0, 1, 0, 0, 0]]
    seg = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    want = torch.zeros(7, 7, dtype=torch.bool)
    for q in range(7):
        for k in range(7):
            want[q, k] = not (k <= q and seg[q] == seg[k])  # True = masked
    assert torch.equal(x.attention_mask[0, 0], want) and torch.equal(block_causal_mask(seg)[0, 0], want)
    assert packed_inputs(tokens[:3], torch.tensor([0, 3]), thd=False).attention_mask is None  # causal
    padded = packed_inputs(tokens, torch.tensor([0, 3, 7]), thd=False, pad_to=(2, 10))
    assert padded.input_ids.shape == (2, 10) and padded.real.tolist() == [True] * 7 + [False] * 13
    assert padded.position_ids[0, 7:].tolist() == [0, 1, 2] and padded.position_ids[1].tolist() == list(
        range(10)
    )
    m = padded.attention_mask
    assert m[0, 0, 8, :7].all() and not m[0, 0, 8, 7] and not m[1, 0, 9, 0]  # pad sees only pad


def test_rows_of_a_micro_batch_are_as_long_as_its_longest_sample():
    assert row_layout([5, 2, 3, 4], thd=False) == [[0], [3], [2, 1]]  # first-fit decreasing, capacity 5
    assert row_layout([5, 2, 3, 4], thd=True) == [[0, 1, 2, 3]]  # THD: one row
    tokens = torch.arange(100, 107)  # samples of 3, 2, 2 tokens: rows [s0] and [s1, s2]
    x = packed_inputs(tokens, torch.tensor([0, 3, 5, 7]), row_sizes=[1, 2], thd=False)
    assert x.input_ids.tolist() == [[100, 101, 102, 0], [103, 104, 105, 106]]
    assert x.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert x.real.tolist() == [True, True, True, False] + [True] * 4  # the samples' tokens, in order
    assert x.attention_mask.shape == (2, 1, 4, 4)
    assert x.attention_mask[1, 0, 2].tolist() == [True, True, False, True]  # s2's first token sees itself


def test_thd_packed_seq_params_construction():
    """Transformer Engine's THD layout (never run here: no GPU, no TE): one row, cu_seqlens as int32
    on the tokens' device, the longest sample, no dense mask; padding is a sequence of its own."""
    x = packed_inputs(torch.arange(9), torch.tensor([0, 2, 7, 9]), thd=True)
    p = x.packed_seq_params
    assert x.attention_mask is None and p.qkv_format == "thd" and x.input_ids.shape == (1, 9)
    assert p.cu_seqlens_q.dtype == torch.int32 and p.cu_seqlens_q.tolist() == [0, 2, 7, 9]
    assert torch.equal(p.cu_seqlens_kv, p.cu_seqlens_q) and p.max_seqlen_q == p.max_seqlen_kv == 5
    assert x.position_ids.tolist() == [[0, 1, 0, 1, 2, 3, 4, 0, 1]]
    padded = packed_inputs(torch.arange(9), torch.tensor([0, 2, 7, 9]), thd=True, pad_to=(1, 12))
    assert padded.packed_seq_params.cu_seqlens_q.tolist() == [0, 2, 7, 9, 12]
    with pytest.raises(ValueError, match="one row"):
        packed_inputs(torch.arange(9), torch.tensor([0, 2, 7, 9]), row_sizes=[1, 2], thd=True)


def test_sequence_positions_rope_equals_megatrons_per_sample():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)
    freqs = torch.cat([rope.get_freqs_non_repeated(3), rope.get_freqs_non_repeated(4)])  # each from 0
    want = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # megatron's get_emb layout
    sequence_positions(rope)
    rope.packed_positions = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    assert torch.equal(rope(7), want)
    rope.packed_positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]])  # two rows
    rows = rope(7)
    assert rows.shape == (7, 2, 1, 16) and torch.equal(rows[:, :1], want)
    freqs = rope.get_freqs_non_repeated(7)
    assert torch.equal(rows[:, 1, 0], torch.cat((freqs, freqs), dim=-1))
