"""Exact selection primitives: float order keys, bisection top-k with tie-break, splitmix64 hash, quantiles."""

import math

import pytest
import torch

from pipeline.algorithms.stats import (
    exact_quantiles,
    float_order_key,
    key_to_float,
    kth_largest_key,
    splitmix64,
    splitmix64_int,
    token_hash,
    topk_mask,
)


def test_float_order_key_is_monotone_and_invertible():
    x = torch.cat([torch.randn(500, dtype=torch.float64) * 10 ** torch.randint(-30, 30, (500,)),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-310, -1e-310])])  # fmt: skip
    k = float_order_key(x)
    order = torch.argsort(k)
    assert torch.all(x[order][1:] >= x[order][:-1])
    assert all(key_to_float(int(a)) == float(b) for a, b in zip(k, x))


def test_kth_largest_key_matches_sort():
    x = torch.randn(200, dtype=torch.float64)
    valid = torch.rand(200) > 0.3
    for k in (1, 7, int(valid.sum())):
        want = x[valid].sort(descending=True).values[k - 1]
        assert key_to_float(kth_largest_key(float_order_key(x), valid, k)) == want.item()


def test_topk_mask_breaks_ties_by_smallest_tie_key_and_counts_exactly():
    key = float_order_key(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]))
    valid = torch.tensor([True, True, True, True, False])  # the invalid 3.0 must never be picked
    tie = torch.tensor([5, 9, 4, 1, 0])
    mask, _ = topk_mask(key, valid, 1, tie)
    assert mask.tolist() == [False, False, True, False, False]
    mask, _ = topk_mask(key, valid, 2, tie)
    assert mask.tolist() == [False, True, True, False, False]
    mask, _ = topk_mask(key, valid, 1, None)  # no tie key: every tied entry
    assert mask.tolist() == [False, True, True, False, False]
    mask, _ = topk_mask(key, valid, 10, tie)  # k > count: everything valid
    assert mask.tolist() == [True, True, True, True, False]


def test_splitmix64_matches_the_python_reference():
    x = torch.tensor([0, 1, 2**40 + 3, -5, 2**62, -(2**62), 2**63 - 1], dtype=torch.int64)
    want = [splitmix64_int(v & (2**64 - 1)) for v in x.tolist()]
    assert splitmix64(x).tolist() == [w - 2**64 if w >= 2**63 else w for w in want]
    assert splitmix64_int(0) == 0xE220A8397B1DCDAF  # published first output of splitmix64 seeded 0


def test_token_hash_depends_on_seed_step_id_and_position_only():
    ids = torch.tensor([7, 3, 11])
    h = token_hash(ids, 5, seed=1, step=2)
    assert torch.unique(h).numel() == 15
    assert torch.equal(token_hash(ids[[2, 0]], 5, 1, 2), h[[2, 0]])  # row order does not matter
    assert torch.equal(token_hash(ids, 3, 1, 2), h[:, :3])  # padded length does not matter
    assert not torch.equal(token_hash(ids, 5, 2, 2), h)
    assert not torch.equal(token_hash(ids, 5, 1, 3), h)


def test_exact_quantiles_equal_torch_quantile_with_ties_and_any_q():
    g = torch.Generator().manual_seed(0)
    qs = [0.0, 0.1, 0.25, 0.5, 0.8, 0.9, 0.999, 1.0]
    for n in (1, 2, 3, 10, 257):
        x = torch.round(torch.randn(n, generator=g, dtype=torch.float64) * 3) / 3  # ties
        assert exact_quantiles(x, qs) == [torch.quantile(x, q).item() for q in qs]
    assert exact_quantiles(torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]), [0.8]) == [pytest.approx(5.2)]
    nan = exact_quantiles(torch.tensor([1.0, float("nan"), 3.0]), [0.5, 0.9])
    assert all(math.isnan(v) for v in nan)  # as torch.quantile
    with pytest.raises(ValueError, match="no values"):
        exact_quantiles(torch.tensor([]), [0.5])
