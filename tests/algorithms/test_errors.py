"""Bad input gives a clear error, never a silent NaN loss; configuration errors name the field."""

import pytest
import torch

from pipeline.algorithms import LossConfig, apply_loss, grpo_advantages, policy_loss, prepare_loss
from pipeline.config import Config, ConfigError, load
from tests.algorithms.common import D, make_batch


@pytest.fixture
def batch():
    return make_batch(30, B=4, L=5)


def _args(b):
    return [b[k] for k in ("log_prob", "old_log_prob", "advantages", "response_mask")]


def test_mismatched_shapes_are_rejected(batch):
    lp, old, adv, mask = _args(batch)
    with pytest.raises(ValueError, match="old_log_prob has shape"):
        policy_loss(LossConfig(), lp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(LossConfig(), lp, old, adv[:, 0], mask)
    with pytest.raises(ValueError, match=r"log_prob must be a \[B, L\]"):
        policy_loss(LossConfig(), lp[0], old, adv, mask)
    with pytest.raises(ValueError, match="entropy has shape"):
        policy_loss(
            LossConfig(method="archer", archer_kl_coef_low_entropy=0.0), lp, old, adv, mask, entropy=lp[:2]
        )
    with pytest.raises(ValueError, match="sample_ids must be"):
        policy_loss(LossConfig(), lp, old, adv, mask, sample_ids=torch.arange(3))
    with pytest.raises(ValueError, match="unique"):
        policy_loss(LossConfig(), lp, old, adv, mask, sample_ids=torch.tensor([1, 1, 2, 3]))


def test_all_zero_mask_is_rejected(batch):
    lp, old, adv, mask = _args(batch)
    with pytest.raises(ValueError, match="no valid tokens"):
        policy_loss(LossConfig(), lp, old, adv, torch.zeros_like(mask))


@pytest.mark.parametrize("name", ["log_prob", "old_log_prob", "advantages"])
def test_nan_on_valid_tokens_is_rejected_but_padding_garbage_is_ignored(batch, name):
    args = dict(zip(["log_prob", "old_log_prob", "advantages", "response_mask"], _args(batch), strict=True))
    loss, _ = policy_loss(LossConfig(), *args.values())  # make_batch puts NaN/inf/-1e30 in the padding
    assert torch.isfinite(loss)
    bad = args[name].clone()
    bad[0, 0] = float("nan")
    args[name] = bad
    with pytest.raises(ValueError, match=f"{name} contains NaN"):
        policy_loss(LossConfig(), *args.values())


def test_nan_entropy_is_rejected(batch):
    ent = batch["entropy"].clone()
    ent[0, 0] = float("inf")
    with pytest.raises(ValueError, match="entropy contains NaN or inf"):
        policy_loss(LossConfig(entropy_coef=0.1), *_args(batch), entropy=ent)


def test_unknown_names_are_rejected(batch):
    with pytest.raises(ValueError, match="unknown loss method 'grpo'"):
        policy_loss(LossConfig(method="grpo"), *_args(batch))
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        policy_loss(LossConfig(loss_agg_mode="token-sum"), *_args(batch))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        policy_loss(
            LossConfig(kl_coef=0.1, kl_estimator="k4"), *_args(batch), ref_log_prob=batch["ref_log_prob"]
        )
    with pytest.raises(ConfigError, match="loss.method='grpo'"):
        load(Config, None, ["loss.method=grpo"])
    with pytest.raises(ConfigError, match="advantage.estimator"):
        load(Config, None, ["advantage.estimator=ppo"])


@pytest.mark.parametrize(
    ("cfg", "missing"),
    [
        (LossConfig(method="archer"), "entropy"),
        (LossConfig(top_entropy_ratio=0.2), "entropy"),
        (LossConfig(entropy_coef=1e-3), "entropy"),
        (LossConfig(adv_entropy_shaping=True), "entropy"),
        (LossConfig(kl_coef=0.1), "ref_log_prob"),
    ],
)
def test_inputs_a_config_needs_are_required_with_the_reason(batch, cfg, missing):
    kw = {} if missing == "ref_log_prob" else {"ref_log_prob": batch["ref_log_prob"]}
    with pytest.raises(ValueError, match=f"{missing}.*required by"):
        policy_loss(cfg, *_args(batch), **kw)


def test_archer_needs_ref_log_prob_only_when_its_kl_is_on(batch):
    with pytest.raises(ValueError, match="ref_log_prob is required by method=archer"):
        policy_loss(LossConfig(method="archer"), *_args(batch), entropy=batch["entropy"])
    loss, _ = policy_loss(LossConfig(method="archer", archer_kl_coef_low_entropy=0.0), *_args(batch),
                          entropy=batch["entropy"])  # fmt: skip
    assert torch.isfinite(loss)


def test_plan_rows_must_match_the_micro_batch(batch):
    lp, old, adv, mask = _args(batch)
    plan = prepare_loss(LossConfig(), lp, old, adv, mask)
    with pytest.raises(ValueError, match="does not match the plan"):
        apply_loss(LossConfig(), plan.rows(slice(0, 2)), lp[1:3], old[1:3], adv[1:3], mask[2:4])
    with pytest.raises(ValueError, match="does not match the plan"):
        apply_loss(LossConfig(), plan.rows(slice(0, 2)), lp[:3], old[:3], adv[:3], mask[:3])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("loss.clip_ratio_c=1.0", "loss.clip_ratio_c"),
        ("loss.clip_cov_ratio=0", "loss.clip_cov_ratio"),
        ("loss.kl_cov_ratio=2", "loss.kl_cov_ratio"),
        ("loss.top_entropy_ratio=0", "loss.top_entropy_ratio"),
        ("loss.archer_entropy_quantile=1", "loss.archer_entropy_quantile"),
        ("loss.clip_ratio_low=-0.1", "loss.clip_ratio_low"),
        ("loss.adv_shaping_kappa=1", "loss.adv_shaping_kappa"),
        ("loss.kl_estimator=k4", "loss.kl_estimator"),
        ("loss.loss_agg_mode=sum", "loss.loss_agg_mode"),
        ("entropy_control.coef_init=1", "coef_init"),
    ],
)
def test_config_validation_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load(Config, None, [override])


def test_root_config_defaults_match_the_issue():
    cfg = load(Config, None, [])
    loss = cfg.loss
    assert (loss.method, loss.clip_ratio_low, loss.clip_ratio_high, loss.clip_ratio_c) == (
        "ppo",
        0.2,
        0.2,
        3.0,
    )
    assert (loss.cispo_clip_high, loss.clip_cov_ratio, loss.clip_cov_lb, loss.clip_cov_ub) == (
        0.2,
        2e-4,
        1.0,
        5.0,
    )
    assert (loss.kl_cov_ratio, loss.kl_cov_coef, loss.archer_entropy_quantile) == (2e-3, 1.0, 0.8)
    assert (loss.archer_clip_low_entropy, loss.archer_clip_high_entropy) == (0.2, 0.5)
    assert (loss.archer_kl_coef_low_entropy, loss.archer_kl_coef_high_entropy) == (1e-3, 0.0)
    assert (loss.top_entropy_ratio, loss.entropy_coef, loss.kl_coef) == (1.0, 0.0, 0.0)
    assert (loss.loss_agg_mode, loss.global_stats, loss.seed) == ("token-mean", True, 0)
    dapo = load(Config, None, ["loss.clip_ratio_high=0.28", "loss.clip_ratio_c=null"])
    assert dapo.loss.clip_ratio_high == 0.28 and dapo.loss.clip_ratio_c is None


def test_bad_advantage_inputs_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        grpo_advantages(torch.tensor([1.0, float("nan")], dtype=D), [0, 0], torch.ones(2, 1))
    with pytest.raises(ValueError, match="group_ids has 3 entries"):
        grpo_advantages(torch.tensor([1.0, 0.0], dtype=D), [0, 0, 1], torch.ones(2, 1))
    with pytest.raises(ValueError, match="one scalar per response"):
        grpo_advantages(torch.ones(2, 3, dtype=D), [0, 0], torch.ones(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["ppo", "clip_cov", "kl_cov", "archer", "cispo"])
def test_low_precision_inputs_give_a_finite_loss_of_their_dtype(batch, dtype, method):
    cfg = LossConfig(method=method, top_entropy_ratio=0.5, entropy_coef=0.01, kl_coef=0.1, clip_cov_lb=0.05)
    lp = batch["log_prob"].to(dtype).requires_grad_(True)
    low = {k: batch[k].to(dtype) for k in ("old_log_prob", "advantages", "entropy", "ref_log_prob")}
    loss, m = policy_loss(cfg, lp, low["old_log_prob"], low["advantages"], batch["response_mask"],
                          entropy=low["entropy"], ref_log_prob=low["ref_log_prob"])  # fmt: skip
    loss.backward()
    assert loss.dtype == dtype and torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert 0 < m["top_entropy/selected_frac"] <= 1
