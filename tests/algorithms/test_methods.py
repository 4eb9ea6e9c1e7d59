"""Per-method properties and the worked numbers of the entropy-methods spec (sections 1-7)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.algorithms import (
    METHODS,
    LossConfig,
    apply_loss,
    policy_loss,
    prepare_loss,
    row_quantile,
    token_covariance,
)
from tests.algorithms.common import D, make_batch

ONE = torch.ones(1, 1, dtype=torch.int64)


def one_token(cfg: LossConfig, A: float, r: float):
    """Loss and d loss / d log pi of one token with advantage A and ratio r."""
    lp = torch.tensor([[math.log(r)]], dtype=D, requires_grad=True)
    old = torch.zeros(1, 1, dtype=D)
    loss, metrics = policy_loss(cfg, lp, old, torch.tensor([[A]], dtype=D), ONE)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.item(), g.item(), metrics


# --- DAPO / PPO-clip (section 1) ---------------------------------------------------------------


def test_dapo_clip_higher_keeps_gradient_that_symmetric_clip_removes():
    loss, g, _ = one_token(LossConfig(clip_ratio_high=0.28), 1.0, 1.25)
    assert loss == pytest.approx(-1.25) and g == pytest.approx(-1.25)
    loss, g, m = one_token(LossConfig(clip_ratio_high=0.2), 1.0, 1.25)
    assert loss == pytest.approx(-1.2) and g == 0.0 and m["pg_clipfrac"] == 1.0


def test_ppo_negative_advantage_below_lower_bound_is_clipped():
    loss, g, _ = one_token(LossConfig(), -1.0, 0.75)
    assert loss == pytest.approx(0.8) and g == 0.0


def test_dual_clip_caps_negative_advantage_loss_at_c():
    loss, g, m = one_token(LossConfig(clip_ratio_c=3.0), -1.0, 4.0)
    assert loss == pytest.approx(3.0) and g == 0.0 and m["pg_clipfrac_lower"] == 1.0
    loss, g, _ = one_token(LossConfig(clip_ratio_c=None), -1.0, 4.0)
    assert loss == pytest.approx(4.0) and g == pytest.approx(4.0)


def test_equal_clip_offsets_reproduce_symmetric_ppo_formula():
    b = make_batch(4)
    m = b["response_mask"].bool()
    cfg = LossConfig(clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=None)
    loss, _ = policy_loss(cfg, b["log_prob"], b["old_log_prob"], b["advantages"], b["response_mask"])
    r = (b["log_prob"] - b["old_log_prob"])[m].exp()
    A = b["advantages"][m]
    want = torch.maximum(-A * r, -A * r.clamp(0.8, 1.2)).mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)


# --- Skywork-OR1 adaptive entropy (section 2) --------------------------------------------------


def test_entropy_bonus_zero_coef_is_bitwise_the_base_loss():
    b = make_batch(5)
    args = [b[k] for k in ("old_log_prob", "advantages", "response_mask")]
    lp1, lp2 = (b["log_prob"].clone().requires_grad_(True) for _ in range(2))
    base, _ = policy_loss(LossConfig(), lp1, *args)
    with_h, _ = policy_loss(LossConfig(entropy_coef=0.0), lp2, *args, entropy=b["entropy"])
    assert torch.equal(base, with_h)
    assert torch.equal(torch.autograd.grad(base, lp1)[0], torch.autograd.grad(with_h, lp2)[0])


def test_entropy_bonus_gradient_on_logits_is_minus_alpha_over_n_p_times_centred_logits():
    torch.manual_seed(0)
    B, L, V, alpha = 2, 3, 5, 0.01
    z = torch.randn(B, L, V, dtype=D, requires_grad=True)
    tokens = torch.randint(0, V, (B, L))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.randn(B, 1, dtype=D).expand(B, L)

    def loss_of(coef):
        logp = torch.log_softmax(z, -1)
        lp = logp.gather(-1, tokens[..., None])[..., 0]
        H = torch.logsumexp(z, -1) - (logp.exp() * z).sum(-1)
        return policy_loss(LossConfig(), lp, lp.detach(), adv, mask, entropy=H, entropy_coef=coef)[0]

    (g_alpha,) = torch.autograd.grad(loss_of(alpha), z)
    (g_zero,) = torch.autograd.grad(loss_of(0.0), z)
    p = torch.softmax(z.detach(), -1)
    n = mask.to(D).sum()
    want = -alpha / n * p * ((p * z.detach()).sum(-1, keepdim=True) - z.detach()) * mask[..., None].to(D)
    torch.testing.assert_close(g_alpha - g_zero, want, atol=1e-12, rtol=0)


# --- Clip-Cov / KL-Cov (section 3) -------------------------------------------------------------

COV_A = torch.tensor([[1.0, 1, 1], [-1, -1, -1]], dtype=D)
COV_LP = torch.tensor([[-0.1, -2.0, -0.5], [-0.2, -3.0, -1.0]], dtype=D)
MASK6 = torch.ones(2, 3, dtype=torch.int64)


def test_token_covariance_matches_the_worked_vector():
    cov = token_covariance(COV_LP, COV_A, MASK6)
    want = torch.tensor([[1.0333, -0.8667, 0.6333], [-0.9333, 1.8667, -0.1333]], dtype=D)
    torch.testing.assert_close(cov, want, atol=1e-4, rtol=0)


def _clip_cov_on_policy(step, cfg=None):
    cfg = cfg or LossConfig(method="clip_cov", clip_ratio_low=1.0, clip_ratio_high=1.0)
    lp = COV_LP.clone().requires_grad_(True)
    loss, metrics = policy_loss(cfg, lp, COV_LP, COV_A, MASK6, step=step)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.item(), g, metrics


def test_clip_cov_zeroes_only_selected_tokens_which_stay_in_the_denominator():
    seen = set()
    for step in range(12):
        loss, g, m = _clip_cov_on_policy(step)
        zero = (g == 0).nonzero().tolist()
        assert len(zero) == 1 and tuple(zero[0]) in {(0, 0), (1, 1)}
        assert loss == pytest.approx(1 / 6 if zero[0] == [0, 0] else -1 / 6)
        others = torch.ones_like(g, dtype=torch.bool)
        others[zero[0][0], zero[0][1]] = False
        torch.testing.assert_close(g[others], (-COV_A / 6)[others])  # denominator stays 6
        assert m["clip_cov/candidates"] == 2 and m["clip_cov/selected"] == 1
        assert m["pg_clipfrac"] == pytest.approx(1 / 6)
        seen.add(tuple(zero[0]))
    assert seen == {(0, 0), (1, 1)}  # the pick is random over steps ...
    assert _clip_cov_on_policy(3)[0] == _clip_cov_on_policy(3)[0]  # ... and reproducible


def test_clip_cov_without_candidates_equals_ppo_clip():
    b = make_batch(6)
    args = [b[k] for k in ("log_prob", "old_log_prob", "advantages", "response_mask")]
    ppo, _ = policy_loss(LossConfig(clip_ratio_c=None), *args)
    for cfg in (LossConfig(method="clip_cov", clip_cov_lb=5.0, clip_cov_ub=5.0),
                LossConfig(method="clip_cov", clip_cov_lb=1e6, clip_cov_ub=2e6)):  # fmt: skip
        loss, m = policy_loss(cfg, *args)
        assert m["clip_cov/candidates"] == 0 and loss.item() == ppo.item()
    same_adv = b["advantages"].clone()
    same_adv[b["response_mask"].bool()] = 0.7  # all advantages equal -> Cov = 0 everywhere, none in (1, 5)
    loss, m = policy_loss(LossConfig(method="clip_cov"), args[0], args[1], same_adv, args[3])
    want, _ = policy_loss(LossConfig(clip_ratio_c=None), args[0], args[1], same_adv, args[3])
    assert m["clip_cov/candidates"] == 0 and m["clip_cov/selected"] == 0 and loss.item() == want.item()


def test_clip_cov_excludes_tokens_already_clipped_by_ppo():
    lp = COV_LP.clone()
    lp[0, 0] += 0.5  # token (0, 0): A = +1, r = e^0.5 > 1.2 -> clipped by PPO, no longer a candidate
    cfg = LossConfig(method="clip_cov", clip_cov_lb=0.5)
    plan = prepare_loss(cfg, lp, COV_LP, COV_A, MASK6)
    _, metrics = policy_loss(cfg, lp, COV_LP, COV_A, MASK6)  # clip fractions: from the training forward
    assert plan.pg_weight[0, 0] > 0 and metrics["ppo_clipfrac"] == pytest.approx(1 / 6)


def test_clip_cov_pick_follows_sample_ids_not_row_order():
    b = make_batch(7)
    args = [b[k] for k in ("log_prob", "old_log_prob", "advantages", "response_mask")]
    cfg = LossConfig(method="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.05)
    plan = prepare_loss(cfg, *args, sample_ids=b["sample_ids"], step=4)
    perm = torch.randperm(len(b["sample_ids"]))
    shuffled = prepare_loss(cfg, *[a[perm] for a in args], sample_ids=b["sample_ids"][perm], step=4)
    assert torch.equal(shuffled.pg_weight == 0, (plan.pg_weight == 0)[perm])
    other_seed = prepare_loss(LossConfig(method="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.05, seed=1),
                              *args, sample_ids=b["sample_ids"], step=4)  # fmt: skip
    assert plan.metrics["clip_cov/selected"] >= 2
    assert not torch.equal(other_seed.pg_weight == 0, plan.pg_weight == 0)


def test_kl_cov_selects_the_top_covariance_token_and_its_penalty_is_abs_log_ratio():
    cfg = LossConfig(method="kl_cov")  # 2e-3 * 6 -> floor of one token
    lp = COV_LP.clone().requires_grad_(True)
    loss, m = policy_loss(cfg, lp, COV_LP, COV_A, MASK6)
    plan = prepare_loss(cfg, COV_LP, COV_LP, COV_A, MASK6)
    assert plan.tensors["penalty"].nonzero().tolist() == [[1, 1]] and m["kl_cov/selected"] == 1
    (g,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(0.0, abs=1e-15)  # = unclipped PG on-policy
    torch.testing.assert_close(g, -COV_A / 6)  # zero penalty gradient at r = 1
    old = COV_LP.clone()
    lp2 = COV_LP.clone()
    lp2[1, 1] += 0.1  # log r = +0.1 on the selected token (A = -1)
    loss, m = policy_loss(cfg, lp2, old, COV_A, MASK6)
    assert m["kl_cov/selected"] == 1
    assert loss.item() * 6 == pytest.approx(-3 + 2 + math.exp(0.1) + 0.1, abs=1e-12)  # token loss 1.2052


def test_kl_cov_with_zero_beta_is_unclipped_policy_gradient():
    b = make_batch(8)
    m = b["response_mask"].bool()
    args = [b[k] for k in ("log_prob", "old_log_prob", "advantages", "response_mask")]
    loss, _ = policy_loss(LossConfig(method="kl_cov", kl_cov_coef=0.0), *args)
    r = (b["log_prob"] - b["old_log_prob"])[m].exp()
    assert loss.item() == pytest.approx((-b["advantages"][m] * r).mean().item(), abs=1e-12)


def test_kl_cov_picks_exactly_k_tokens_when_covariances_tie():
    A = torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=D)
    lp = torch.tensor([[-1.0] * 4, [-2.0] * 4], dtype=D)  # all eight Cov equal to 0.25
    mask = torch.ones(2, 4)
    plan = prepare_loss(
        LossConfig(method="kl_cov", kl_cov_ratio=3 / 8), lp, lp, A, mask, sample_ids=torch.tensor([9, 4])
    )
    assert plan.metrics["kl_cov/selected"] == 3
    assert plan.tensors["penalty"].nonzero().tolist() == [
        [1, 0],
        [1, 1],
        [1, 2],
    ]  # smallest (sample_id, position)


def test_first_order_entropy_change_matches_minus_covariance():
    z = torch.tensor([2.0, 1.0, 0.0], dtype=D)
    A = torch.tensor([1.0, -1.0, 0.0], dtype=D)
    eta = 0.01

    def H(logits):
        p = torch.softmax(logits, -1)
        return -(p * p.log()).sum()

    p = torch.softmax(z, -1)

    def cov(x, y):
        return (p * (x - (p * x).sum()) * (y - (p * y).sum())).sum()

    assert (H(z + eta * p * A) - H(z)).item() == pytest.approx(-0.002230, abs=1e-6)
    assert (-eta * cov(p.log(), p * A)).item() == pytest.approx(-0.002224, abs=1e-6)
    assert (H(z + eta * A) - H(z)).item() == pytest.approx(-0.004259, abs=1e-6)
    assert (-eta * cov(p.log(), A)).item() == pytest.approx(-0.004234, abs=1e-6)


# --- 80/20 high-entropy tokens (section 4) -----------------------------------------------------

H10 = torch.tensor([[0.1, 2.0, 0.05, 0.7, 1.5, 0.3, 0.0, 0.9, 0.2, 0.4, 9.0, 9.0]], dtype=D)
MASK10 = torch.tensor([[1] * 10 + [0, 0]])  # integer mask; padding has the largest entropies


def test_top_entropy_selects_the_top_fraction_and_never_padding():
    adv = -torch.ones(1, 12, dtype=D)  # on-policy, A = -1: every token loss is 1.0
    lp = torch.zeros(1, 12, dtype=D)
    plan = prepare_loss(LossConfig(top_entropy_ratio=0.2), lp, lp, adv, MASK10, entropy=H10)
    assert (plan.pg_weight > 0).nonzero()[:, 1].tolist() == [1, 4]
    assert plan.metrics["top_entropy/threshold"] == 1.5
    assert plan.metrics["top_entropy/selected_frac"] == pytest.approx(0.2)
    trl = torch.quantile(H10[0, :10], 0.8)  # TRL's quantile threshold selects the same set
    assert trl.item() == pytest.approx(1.02) and (H10[0, :10] >= trl).nonzero()[:, 0].tolist() == [1, 4]


def test_top_entropy_normaliser_is_all_tokens_globally_and_selected_tokens_locally():
    adv = -torch.ones(1, 12, dtype=D)
    lp = torch.zeros(1, 12, dtype=D)
    loss, _ = policy_loss(LossConfig(top_entropy_ratio=0.2), lp, lp, adv, MASK10, entropy=H10)
    assert loss.item() == pytest.approx(0.2)  # paper / TRL: 2 / 10
    local = LossConfig(top_entropy_ratio=0.2, global_stats=False)
    loss, _ = policy_loss(local, lp, lp, adv, MASK10, entropy=H10)
    assert loss.item() == pytest.approx(1.0)  # official repo: 2 / 2


@pytest.mark.parametrize(
    ("mode", "want"),
    [
        ("token-mean", 2 / 2),  # official repo: the 2 selected tokens are the denominator
        ("seq-mean-token-sum", (2 + 0) / 2),  # torch.mean over both rows, not over the row with a pick
        ("seq-mean-token-mean", (2 / 2 + 0) / 2),
        ("seq-mean-token-sum-norm", (2 + 0) / 2 / 4),
    ],
)
def test_local_top_entropy_seq_modes_divide_by_all_responses_of_the_batch(mode, want):
    """`agg_loss(pg, response_mask * top_mask, mode)` of the 80/20 repo: B counts every response."""
    H = torch.tensor([[3.0, 2.0, 0.1, 0.1], [0.2, 0.3, 0.1, 0.0]], dtype=D)  # top 2 of 8 both in row 0
    lp, adv = torch.zeros(2, 4, dtype=D), -torch.ones(2, 4, dtype=D)  # every token loss is 1.0
    cfg = LossConfig(top_entropy_ratio=0.25, global_stats=False, loss_agg_mode=mode)
    loss, m = policy_loss(cfg, lp, lp, adv, torch.ones(2, 4), entropy=H)
    assert m["top_entropy/selected"] == 2 and loss.item() == pytest.approx(want, abs=1e-15)


def _method_cfg(name: str, **kw) -> LossConfig:
    extra = {
        "archer": dict(archer_kl_coef_low_entropy=0.0),
        "clip_cov": dict(clip_cov_lb=0.05, clip_cov_ratio=0.1),
    }
    return LossConfig(method=name, **(extra.get(name, {}) | kw))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_top_entropy_ratio_one_changes_nothing(name):
    b = make_batch(9)
    args = [b[k] for k in ("log_prob", "old_log_prob", "advantages", "response_mask")]
    kw = dict(entropy=b["entropy"], sample_ids=b["sample_ids"])
    a, _ = policy_loss(_method_cfg(name), *args, **kw)
    c, _ = policy_loss(_method_cfg(name, top_entropy_ratio=1.0), *args, **kw)
    assert torch.equal(a, c)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_top_entropy_composes_with_every_method_low_entropy_tokens_get_no_gradient(name):
    b = make_batch(9)
    lp = b["log_prob"].clone().requires_grad_(True)
    cfg = _method_cfg(name, top_entropy_ratio=0.3)
    args = [b[k] for k in ("old_log_prob", "advantages", "response_mask")]
    plan = prepare_loss(cfg, b["log_prob"], *args, entropy=b["entropy"], sample_ids=b["sample_ids"])
    loss, _ = apply_loss(cfg, plan, lp, *args, entropy=b["entropy"])
    (g,) = torch.autograd.grad(loss, lp)
    valid = b["response_mask"].bool()
    selected = valid & (b["entropy"] >= plan.metrics["top_entropy/threshold"])
    assert plan.metrics["top_entropy/selected_frac"] >= 0.3 and selected.sum() < valid.sum()
    assert torch.all(g[~selected] == 0)
    full_lp = b["log_prob"].clone().requires_grad_(True)  # same method on all tokens
    full_cfg = _method_cfg(name)
    full_plan = prepare_loss(full_cfg, b["log_prob"], *args, entropy=b["entropy"], sample_ids=b["sample_ids"])
    (g_full,) = torch.autograd.grad(
        apply_loss(full_cfg, full_plan, full_lp, *args, entropy=b["entropy"])[0], full_lp
    )
    assert (g_full[selected] != 0).any()
    torch.testing.assert_close(g[selected], g_full[selected], atol=1e-15, rtol=0)


# --- CISPO (section 5) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("A", "r", "ppo_grad", "cispo_grad"),
    [(1.0, 1.1, -1.1, -1.1), (1.0, 1.5, 0.0, -1.2), (-1.0, 0.5, 0.0, 0.5)],
)
def test_cispo_clipped_tokens_still_get_gradient_through_log_pi(A, r, ppo_grad, cispo_grad):
    assert one_token(LossConfig(), A, r)[1] == pytest.approx(ppo_grad)
    assert one_token(LossConfig(method="cispo"), A, r)[1] == pytest.approx(cispo_grad)


def test_cispo_sends_no_gradient_to_old_log_prob():
    b = make_batch(10)
    lp = b["log_prob"].clone().requires_grad_(True)
    old = b["old_log_prob"].clone().requires_grad_(True)
    loss, _ = policy_loss(LossConfig(method="cispo"), lp, old, b["advantages"], b["response_mask"])
    loss.backward()
    assert old.grad is None and lp.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("high", "ratios", "weights"),
    [
        (0.28, [1.0, 1.14, 1.56, 0.4], [1.0, 1.14, 1.28, 0.4]),
        (4.0, [1.0, 3.0, 9.0, 0.4], [1.0, 3.0, 5.0, 0.4]),
    ],
)
def test_cispo_weight_is_the_ratio_capped_at_one_plus_eps_high_without_lower_bound(high, ratios, weights):
    lp = torch.tensor([ratios], dtype=D).log().requires_grad_(True)
    loss, _ = policy_loss(LossConfig(method="cispo", cispo_clip_high=high), lp, torch.zeros(1, 4, dtype=D),
                          torch.ones(1, 4, dtype=D), torch.ones(1, 4))  # fmt: skip
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(-4 * g[0], torch.tensor(weights, dtype=D))


def test_cispo_on_policy_gradient_equals_reinforce():
    b = make_batch(11)
    args = [b[k] for k in ("advantages", "response_mask")]
    grads = []
    for method in ("cispo", "ppo"):
        lp = b["log_prob"].clone().requires_grad_(True)
        loss, _ = policy_loss(LossConfig(method=method), lp, b["log_prob"], *args)
        grads.append(torch.autograd.grad(loss, lp)[0])
    m = b["response_mask"]
    torch.testing.assert_close(grads[0], -b["advantages"] * m / m.sum())
    torch.testing.assert_close(grads[0], grads[1])


# --- entropy-shaped advantages (section 6) ------------------------------------------------------


def test_entropy_shaping_in_the_loss_uses_shaped_advantages_and_alpha_zero_recovers_base():
    b = make_batch(12)
    args = [b[k] for k in ("log_prob", "old_log_prob", "advantages", "response_mask")]
    base, _ = policy_loss(LossConfig(), *args)
    zero, _ = policy_loss(
        LossConfig(adv_entropy_shaping=True, adv_shaping_alpha=0.0), *args, entropy=b["entropy"]
    )
    assert torch.equal(base, zero)
    shaped_cfg = LossConfig(adv_entropy_shaping=True)
    plan = prepare_loss(shaped_cfg, *args, entropy=b["entropy"])
    m = b["response_mask"].bool()
    A, H = b["advantages"], b["entropy"]
    want = A + torch.minimum(0.4 * H, A.abs() / 2)
    torch.testing.assert_close(plan.advantages[m], want[m])
    loss, _ = policy_loss(shaped_cfg, *args, entropy=b["entropy"])
    assert loss.item() == pytest.approx(
        policy_loss(LossConfig(), args[0], args[1], plan.advantages, args[3])[0].item()
    )


def test_cap_binding_frac_counts_only_tokens_that_can_get_a_bonus():
    """A = 0 tokens get no bonus (cap 0): they are neither binding nor in the fraction's denominator."""
    A = torch.tensor([[1.0, 1.0], [0.0, 0.0], [-1.0, -1.0]], dtype=D)
    H = torch.tensor([[0.5, 3.0], [2.0, 2.0], [0.5, 3.0]], dtype=D)  # alpha H = 1.2 >= |A| / 2 binds
    lp = torch.zeros(3, 2, dtype=D)
    _, m = policy_loss(LossConfig(adv_entropy_shaping=True), lp, lp, A, torch.ones(3, 2), entropy=H)
    assert m["adv_shaping/cap_binding_frac"] == pytest.approx(2 / 4)


# --- Archer (section 7) --------------------------------------------------------------------------


def _archer(H, r_last=1.4, **kw):
    cfg = LossConfig(method="archer", archer_kl_coef_low_entropy=0.0, **kw)
    lp = torch.tensor([[0.0, 0, 0, 0, math.log(r_last)]], dtype=D, requires_grad=True)
    loss, m = policy_loss(cfg, lp, torch.zeros(1, 5, dtype=D), torch.ones(1, 5, dtype=D), torch.ones(1, 5),
                          entropy=torch.tensor([H], dtype=D))  # fmt: skip
    (g,) = torch.autograd.grad(loss, lp)
    return loss.item(), g[0, 4].item(), m


def test_archer_clip_range_follows_each_tokens_entropy_group():
    assert torch.nanquantile(torch.tensor([0.1, 0.2, 0.3, 0.4, 2.0]), 0.8).item() == pytest.approx(0.72)
    loss, g, m = _archer([0.1, 0.2, 0.3, 0.4, 2.0])  # last token high-entropy: bound 1.5, r = 1.4 free
    assert m["archer/high_frac"] == pytest.approx(0.2)
    assert loss == pytest.approx((-4 - 1.4) / 5) and g == pytest.approx(-1.4 / 5)
    loss, g, _ = _archer([2.0, 0.2, 0.3, 0.4, 0.1])  # same token low-entropy: clipped at 1.2
    assert loss == pytest.approx((-4 - 1.2) / 5) and g == 0.0


def test_row_quantile_equals_nanquantile_on_valid_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.round(torch.rand(50, 9, generator=g, dtype=D) * 6) / 2  # ties
    mask = torch.rand(50, 9, generator=g) > 0.3
    mask[0] = False
    mask[1] = False
    mask[1, 4] = True
    for q in (0.0, 0.2, 0.8, 0.95, 1.0):
        got = row_quantile(x, mask, q)[:, 0]
        want = torch.nanquantile(torch.where(mask, x, float("nan")), q, dim=-1)
        assert got[0] == float("inf") and torch.equal(got[1:], want[1:])


def test_archer_kl_weights_are_subset_means_over_valid_tokens_only():
    b = make_batch(13)
    m = b["response_mask"].bool()
    args = [b[k] for k in ("log_prob", "old_log_prob", "advantages", "response_mask")]
    cfg = LossConfig(method="archer", archer_kl_coef_low_entropy=1.0, archer_kl_coef_high_entropy=1.0)
    plan = prepare_loss(cfg, *args, entropy=b["entropy"], ref_log_prob=b["ref_log_prob"])
    assert torch.all(plan.kl_weight[~m] == 0) and torch.all(plan.kl_weight[m] > 0)  # high ∪ low = valid
    high = m & (plan.tensors["clip_low"] == 0.5)
    low = m & ~high
    assert plan.kl_weight.sum().item() == pytest.approx(2.0)  # two subset means
    kl = torch.exp(b["ref_log_prob"] - b["log_prob"]) - (b["ref_log_prob"] - b["log_prob"]) - 1
    want = kl[low].mean() + kl[high].mean()
    assert high.sum() != low.sum() and want != pytest.approx(
        2 * kl[m].mean()
    )  # the subset normaliser matters
    zero_pg = torch.zeros_like(b["advantages"])
    loss, _ = policy_loss(
        cfg, args[0], args[1], zero_pg, args[3], entropy=b["entropy"], ref_log_prob=b["ref_log_prob"]
    )
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)


def verl_agg_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """verl's `agg_loss` as the reference repositories call it (torch.mean over all rows), with the
    1/B of seq-mean-token-sum-norm that verl PR #5417 restored; default scale = padded length."""
    row = (loss * mask).sum(-1)
    if mode == "token-mean":
        return row.sum() / mask.sum()
    if mode == "seq-mean-token-sum":
        return row.mean()
    if mode == "seq-mean-token-mean":
        return (row / mask.sum(-1)).mean()
    return row.mean() / mask.shape[-1]


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_archer_kl_terms_use_the_losss_own_aggregation_mode(mode):
    """ArcherCodeR dp_actor.py: `agg_loss(kld, subset_mask, loss_agg_mode)` for each entropy subset."""
    g = torch.Generator().manual_seed(21)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    h = torch.rand(3, 6, generator=g, dtype=D)  # distinct: every row has a high-entropy token
    lp = -torch.rand(3, 6, generator=g, dtype=D)
    ref = lp + 0.3 * torch.randn(3, 6, generator=g, dtype=D)
    cfg = LossConfig(method="archer", loss_agg_mode=mode, archer_kl_coef_low_entropy=1.0,
                     archer_kl_coef_high_entropy=0.5)  # fmt: skip
    zero = torch.zeros(3, 6, dtype=D)  # no policy-gradient term: the loss is the two KL terms
    loss, m = policy_loss(cfg, lp, lp, zero, mask, entropy=h, ref_log_prob=ref)
    thr = torch.nanquantile(torch.where(mask.bool(), h, float("nan")), 0.8, dim=-1, keepdim=True)
    high = mask.bool() & (h > thr)
    low = mask.bool() & ~high
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    want_low, want_high = verl_agg_loss(kl, low, mode), verl_agg_loss(kl, high, mode)
    assert high.any(-1).all()
    assert loss.item() == pytest.approx((want_low + 0.5 * want_high).item(), abs=1e-14)
    assert m["archer/low_entropy_kl"] == pytest.approx(want_low.item(), abs=1e-14)
    assert m["archer/high_entropy_kl"] == pytest.approx(want_high.item(), abs=1e-14)


def test_archer_zero_high_entropy_kl_coef_gives_no_kl_gradient_to_high_tokens():
    b = make_batch(14)
    m = b["response_mask"].bool()
    lp = b["log_prob"].clone().requires_grad_(True)
    cfg = LossConfig(method="archer")
    zero_pg = torch.zeros_like(b["advantages"])
    loss, _ = policy_loss(cfg, lp, b["old_log_prob"], zero_pg, b["response_mask"], entropy=b["entropy"],
                          ref_log_prob=b["ref_log_prob"])  # fmt: skip
    (g,) = torch.autograd.grad(loss, lp)
    plan = prepare_loss(cfg, b["log_prob"], b["old_log_prob"], zero_pg, b["response_mask"], entropy=b["entropy"],
                        ref_log_prob=b["ref_log_prob"])  # fmt: skip
    high = m & (plan.tensors["clip_low"] == 0.5)
    assert high.any() and torch.all(g[high] == 0) and torch.all(g[m & ~high] != 0)


def test_clip_and_selection_fractions_by_entropy_group_add_up():
    """by_entropy/{high,low}_*: the top-20 % entropy tokens vs the rest, counted on the same tokens."""
    b = make_batch(seed=4, B=16, L=9)
    b["entropy"] = b["entropy"] + 1e-3 * torch.arange(b["entropy"].numel(), dtype=b["entropy"].dtype).view_as(
        b["entropy"]
    )  # no ties: the high group is exactly the top fifth
    n = int(b["response_mask"].sum())
    n_high = math.ceil(0.2 * n)
    _, m = policy_loss(LossConfig(top_entropy_ratio=0.2), **b)
    assert m["by_entropy/high_selected_frac"] == 1.0 and m["by_entropy/low_selected_frac"] == 0.0
    _, m = policy_loss(
        LossConfig(method="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-1e9, clip_cov_ub=1e9), **b
    )
    picked = m["by_entropy/high_selected_frac"] * n_high + m["by_entropy/low_selected_frac"] * (n - n_high)
    assert picked == pytest.approx(m["clip_cov/selected"])
    _, m = policy_loss(LossConfig(clip_ratio_low=0.05, clip_ratio_high=0.05, clip_ratio_c=None), **b)
    clipped = m["by_entropy/high_clipfrac"] * n_high + m["by_entropy/low_clipfrac"] * (n - n_high)
    assert clipped == pytest.approx(m["pg_clipfrac"] * n) and m["pg_clipfrac"] > 0
