"""Advantage estimators (spec §A), entropy shaping (§6) and the Skywork-OR1 controller (§2)."""

import math

import pytest
import torch

from pipeline.algorithms import (
    AdaptiveEntropyController,
    AdvantageConfig,
    EntropyControlConfig,
    compute_advantages,
    dr_grpo_advantages,
    entropy_shaped_advantages,
    grpo_advantages,
    measure_entropy,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_baseline_advantages,
    rloo_advantages,
)
from tests.algorithms.common import D

R = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=D)
M = torch.ones(4, 2)


def col(adv):
    return adv[:, 0].tolist()


def test_grpo_dr_grpo_rloo_worked_numbers():
    assert col(grpo_advantages(R, [0] * 4, M)) == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert col(dr_grpo_advantages(R, [0] * 4, M)) == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert col(rloo_advantages(R, [0] * 4, M)) == pytest.approx([1, -1 / 3, -1 / 3, -1 / 3])
    two = grpo_advantages(torch.tensor([1.0, 0.0], dtype=D), ["a", "a"], torch.ones(2, 1))
    assert col(two) == pytest.approx([0.7071, -0.7071], abs=1e-4)


def test_grpo_uses_unbiased_std_and_eps():
    r = torch.tensor([3.0, 1.0], dtype=D)
    assert col(grpo_advantages(r, [0, 0], torch.ones(2, 1)))[0] == pytest.approx(1 / (math.sqrt(2) + 1e-6))


def test_groups_are_separate_and_a_single_response_keeps_its_reward():
    r = torch.tensor([1.0, 5.0, 0.0, 7.0, 2.0], dtype=D)
    ids = ["p", "q", "p", "q", "s"]
    g = col(grpo_advantages(r, ids, torch.ones(5, 1)))
    assert g[0] == pytest.approx(0.7071, abs=1e-4) and g[1] == pytest.approx(-0.7071, abs=1e-4)
    assert (
        g[4] == pytest.approx(2.0 / (1 + 1e-6)) and col(rloo_advantages(r, ids, torch.ones(5, 1)))[4] == 2.0
    )
    assert col(rloo_advantages(r, ids, torch.ones(5, 1)))[:2] == pytest.approx([1.0, -2.0])


def test_all_equal_rewards_give_zero_advantages_for_every_group_estimator():
    r = torch.full((4,), 0.7, dtype=D)
    for fn in (grpo_advantages, dr_grpo_advantages, rloo_advantages):
        assert torch.all(fn(r, [1] * 4, M) == 0)


def test_advantages_are_zero_on_padding():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = grpo_advantages(torch.tensor([1.0, 0.0], dtype=D), [0, 0], mask)
    assert adv[0, 2] == 0 and adv[1, 1] == 0 and adv[1, 0] < 0


def test_reinforce_plus_plus_discounted_returns_whitened_over_the_batch():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]], dtype=D)  # 9.0 sits on padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = reinforce_plus_plus_advantages(rewards, mask, gamma=1.0)
    x = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0], dtype=D)  # returns; padding reward does not leak
    want = (x - 1.4) / math.sqrt(0.3 + 1e-8)  # Bessel: (3*0.16 + 2*0.36)/4 = 0.3
    torch.testing.assert_close(adv[mask.bool()], want)
    assert adv[1, 2] == 0
    half = reinforce_plus_plus_advantages(rewards[:1], mask[:1], gamma=0.5)
    r = torch.tensor([0.25, 0.5, 1.0], dtype=D)
    torch.testing.assert_close(half[0], (r - r.mean()) / torch.sqrt(r.var() + 1e-8))


def test_reinforce_plus_plus_baseline_subtracts_group_mean_then_whitens():
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    adv = reinforce_plus_plus_baseline_advantages(torch.tensor([1.0, 0.0, 5.0], dtype=D), [0, 0, 1], mask)
    x = torch.tensor([0.5, 0.5, -0.5, 5.0, 5.0], dtype=D)  # a group of one has baseline 0
    torch.testing.assert_close(adv[mask.bool()], (x - x.mean()) / torch.sqrt(x.var() + 1e-8))


def test_compute_advantages_dispatches_and_puts_reinforce_reward_on_last_token():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    r = torch.tensor([1.0, 0.0], dtype=D)
    grpo = compute_advantages(AdvantageConfig(), r, [0, 0], mask)
    torch.testing.assert_close(grpo, grpo_advantages(r, [0, 0], mask))
    rpp = compute_advantages(AdvantageConfig(estimator="reinforce_plus_plus"), r, [0, 0], mask)
    token = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(rpp, reinforce_plus_plus_advantages(token, mask))
    dr = compute_advantages(AdvantageConfig(estimator="grpo", norm_by_std=False), r, [0, 0], mask)
    torch.testing.assert_close(dr, dr_grpo_advantages(r, [0, 0], mask))


def test_entropy_shaping_worked_numbers_and_sign_preservation():
    A = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0], dtype=D)
    H = torch.tensor([0.5, 3.0, 0.5, 3.0, 2.0], dtype=D, requires_grad=True)
    shaped, bonus, cap = entropy_shaped_advantages(A, H, torch.ones(5))
    assert shaped.tolist() == pytest.approx([1.2, 1.5, -0.8, -0.5, 0.0])
    assert not shaped.requires_grad and cap.tolist() == [False, True, False, True, False]  # A = 0: no cap
    A = torch.randn(1000, dtype=D)
    shaped, _, _ = entropy_shaped_advantages(A, torch.rand(1000, dtype=D) * 10, torch.ones(1000), 0.4, 1.5)
    assert torch.all(torch.sign(shaped) == torch.sign(A)) and torch.all(
        (shaped - A).abs() <= A.abs() / 1.5 + 1e-15
    )
    zero, _, _ = entropy_shaped_advantages(A, torch.rand(1000, dtype=D), torch.ones(1000), alpha=0.0)
    assert torch.equal(zero, A)


def test_skywork_controller_trace():
    ctrl = AdaptiveEntropyController()
    alphas, coefs = [ctrl.alpha()], []
    for e in (0.25, 0.18, 0.15, 0.22, 0.19):
        ctrl.update(e)
        coefs.append(ctrl.coef)
        alphas.append(ctrl.alpha())
    assert alphas == pytest.approx([0, 0, 1e-4, 2e-4, 0, 2e-4], abs=1e-12)
    assert coefs == pytest.approx([0, 1e-4, 2e-4, 1e-4, 2e-4], abs=1e-12)


def test_skywork_controller_stays_in_bounds_and_is_off_at_or_above_target():
    ctrl = AdaptiveEntropyController(EntropyControlConfig(delta=1e-3))
    g = torch.Generator().manual_seed(0)
    for e in torch.rand(200, generator=g).tolist():
        ctrl.update(e * 0.4)
        assert 0.0 <= ctrl.coef <= 5e-3
        assert (ctrl.alpha() == 0.0) == (e * 0.4 >= 0.2)
    for _ in range(10):
        ctrl.update(0.1)
    assert ctrl.coef == 5e-3 and ctrl.alpha() == 5e-3  # saturates at coef_max
    ctrl.update(0.2)
    assert ctrl.alpha() == 0.0  # equality switches the bonus off


def test_skywork_controller_state_round_trips():
    a = AdaptiveEntropyController()
    for e in (0.1, 0.1, 0.1):
        a.update(e)
    b = AdaptiveEntropyController()
    b.load_state_dict(a.state_dict())
    assert b.alpha() == a.alpha() == pytest.approx(3e-4)
    b.update(0.1)
    a.update(0.1)
    assert a.state_dict() == b.state_dict()


def test_measure_entropy_is_minus_mean_old_log_prob_over_valid_tokens():
    old = torch.tensor([[-0.1, -0.3, -50.0], [-0.2, float("nan"), 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert measure_entropy(old, mask) == pytest.approx(0.2)
