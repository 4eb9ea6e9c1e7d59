"""Aggregation modes (spec §0.2) and KL estimators (spec §B), by hand-computed values."""

import math

import pytest
import torch

from pipeline.algorithms import LossConfig, kl_estimate, policy_loss, prepare_loss
from tests.algorithms.common import D

# two responses with token losses [1, 1] and [0, 0, 0, 0]: on-policy, loss = -A * r = -A
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
ADV = torch.tensor([[-1.0, -1.0, 0, 0], [0.0, 0, 0, 0]], dtype=D)
LP = torch.zeros(2, 4, dtype=D)


@pytest.mark.parametrize(
    ("mode", "scale", "want"),
    [
        ("token-mean", None, 2 / 6),
        ("seq-mean-token-mean", None, (1 + 0) / 2),
        ("seq-mean-token-sum", None, (2 + 0) / 2),
        ("seq-mean-token-sum-norm", None, (2 + 0) / 2 / 4),  # padded length L = 4, B = 2
        ("seq-mean-token-sum-norm", 8.0, (2 + 0) / 2 / 8),  # Dr.GRPO constant, then 1/B (verl PR #5417)
    ],
)
def test_aggregation_modes_match_hand_computed_values(mode, scale, want):
    loss, _ = policy_loss(LossConfig(loss_agg_mode=mode, loss_scale_factor=scale), LP, LP, ADV, MASK)
    assert loss.item() == pytest.approx(want, abs=1e-15)


def test_seq_mean_counts_only_non_empty_responses():
    mask = torch.cat([MASK, torch.zeros(1, 4, dtype=torch.int64)])
    adv, lp = torch.cat([ADV, torch.zeros(1, 4, dtype=D)]), torch.zeros(3, 4, dtype=D)
    loss, m = policy_loss(LossConfig(loss_agg_mode="seq-mean-token-mean"), lp, lp, adv, mask)
    assert loss.item() == pytest.approx(0.5) and m["n_seqs"] == 2


def test_seq_mean_token_sum_norm_does_not_grow_with_the_number_of_responses():
    """Dr.GRPO keeps 1/G over responses: B copies of a batch give the loss (and gradient) of one copy."""
    cfg = LossConfig(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=8.0)
    one, _ = policy_loss(cfg, LP, LP, ADV, MASK)
    copies = [t.repeat(5, 1) for t in (LP, ADV, MASK)]
    five, _ = policy_loss(cfg, copies[0], copies[0], copies[1], copies[2])
    assert five.item() == pytest.approx(one.item(), abs=1e-15)
    plan = prepare_loss(cfg, LP, LP, ADV, MASK)
    torch.testing.assert_close(plan.weight, MASK.to(D) / (8.0 * 2))


def test_seq_mean_token_mean_weights_are_one_over_length_times_b():
    plan = prepare_loss(LossConfig(loss_agg_mode="seq-mean-token-mean"), LP, LP, ADV, MASK)
    want = torch.tensor([[1 / 4, 1 / 4, 0, 0], [1 / 8] * 4], dtype=D)
    torch.testing.assert_close(plan.weight, want)


def test_kl_estimators_match_worked_numbers():
    lp, ref = torch.tensor([math.log(0.5)], dtype=D), torch.tensor([math.log(0.25)], dtype=D)
    assert kl_estimate("k1", lp, ref).item() == pytest.approx(0.6931, abs=1e-4)
    assert kl_estimate("k2", lp, ref).item() == pytest.approx(0.2402, abs=1e-4)
    assert kl_estimate("k3", lp, ref).item() == pytest.approx(0.1931, abs=1e-4)
    assert kl_estimate("abs", ref, lp).item() == pytest.approx(math.log(2))


def test_k3_is_clamped_like_verl():
    lp = torch.zeros(3, dtype=D)
    ref = torch.tensor([30.0, -30.0, -9.0], dtype=D)  # |delta| = 30 -> clamped to 20 -> value clamped to 10
    assert kl_estimate("k3", lp, ref).tolist() == [10.0, 10.0, pytest.approx(8.0 + math.exp(-9))]
    assert torch.isfinite(kl_estimate("k3", lp, torch.tensor([1e4, -1e4, 0.0], dtype=D))).all()
    assert torch.all(kl_estimate("k3", torch.randn(100, dtype=D), torch.randn(100, dtype=D)) >= 0)


def test_kl_loss_term_is_coef_times_aggregated_estimate():
    ref = torch.tensor([[0.1, -0.2, 5.0, 5.0], [0.3, 0.0, -0.1, 0.2]], dtype=D)
    zero = torch.zeros(2, 4, dtype=D)
    for est in ("k1", "k2", "k3"):
        cfg = LossConfig(kl_coef=0.5, kl_estimator=est)
        loss, m = policy_loss(cfg, zero, zero, zero, MASK, ref_log_prob=ref)
        want = 0.5 * kl_estimate(est, zero, ref)[MASK.bool()].mean()
        assert loss.item() == pytest.approx(want.item(), abs=1e-15) and m["kl_loss"] == pytest.approx(
            want.item()
        )
