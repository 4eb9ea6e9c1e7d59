"""The loss library on flat token vectors (how the actor calls it): the same numbers as the padded
[B, L] layout, whatever the order of the tokens; and what each method declares it needs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.algorithms import (
    LossConfig,
    apply_loss,
    finish_metrics,
    loss_needs,
    policy_loss,
    prepare_loss,
    total_sums,
)
from pipeline.algorithms.stats import segment_quantile
from tests.algorithms.common import CONTRACT_CONFIGS, D, make_batch, reference

FIELDS = ("log_prob", "old_log_prob", "advantages", "response_mask", "entropy", "ref_log_prob")


def packed(batch: dict, seed: int = 0):
    """The valid tokens of each row of a [B, L] batch, plus a few "prompt" tokens (mask 0, garbage)
    per row, as flat vectors in a random token order; segments, positions (= the row's column,
    prompt tokens after the row's length) and where each token came from."""
    g = torch.Generator().manual_seed(seed)
    b, length = batch["response_mask"].shape
    rows, cols = [], []
    for i in range(b):
        n = int(batch["response_mask"][i].sum())
        extra = int(torch.randint(1, 4, (1,), generator=g))
        rows += [i] * (n + extra)
        cols += list(range(n)) + [-1] * extra
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    perm = torch.randperm(rows.numel(), generator=g)
    rows, cols = rows[perm], cols[perm]
    flat = {}
    for k in FIELDS:
        v = batch[k][rows, cols.clamp(min=0)]
        flat[k] = torch.where(cols >= 0, v, torch.zeros((), dtype=v.dtype) if k == "response_mask" else v)
    positions = torch.where(cols >= 0, cols, length + torch.arange(rows.numel()))  # unique, never a column
    return flat, rows, positions, cols


@pytest.mark.parametrize("name", sorted(CONTRACT_CONFIGS))
def test_flat_tokens_in_any_order_give_the_padded_layouts_loss_gradients_and_metrics(name):
    cfg = CONTRACT_CONFIGS[name]
    if cfg.loss_agg_mode == "seq-mean-token-sum-norm":  # flat input has no padded length: say it
        cfg = dataclasses.replace(cfg, loss_scale_factor=7.0)
    batch = make_batch(1)
    ref_loss, ref_lp, ref_ent, ref_metrics = reference(cfg, batch)
    flat, rows, positions, cols = packed(batch)
    lp = flat["log_prob"].clone().requires_grad_(True)
    ent = flat["entropy"].clone().requires_grad_(True)
    kw = dict(segments=rows, positions=positions, sample_ids=batch["sample_ids"], step=7)
    plan = prepare_loss(cfg, lp.detach(), flat["old_log_prob"], flat["advantages"], flat["response_mask"],
                        entropy=ent.detach(), ref_log_prob=flat["ref_log_prob"], **kw)  # fmt: skip
    halves = [slice(0, rows.numel() // 3), slice(rows.numel() // 3, None)]  # micro-batches: token slices
    total, sums = torch.zeros((), dtype=D), []
    for t in halves:
        loss, s = apply_loss(cfg, plan.rows(t), lp[t], flat["old_log_prob"][t], flat["advantages"][t],
                             flat["response_mask"][t], entropy=ent[t], ref_log_prob=flat["ref_log_prob"][t])  # fmt: skip
        total, _ = total + loss, sums.append(s)
    g_lp, g_ent = torch.autograd.grad(total, (lp, ent))
    valid = cols >= 0
    assert total.item() == pytest.approx(ref_loss.item(), abs=1e-12)
    torch.testing.assert_close(g_lp[valid], ref_lp[rows, cols][valid], atol=1e-12, rtol=0)
    torch.testing.assert_close(g_ent[valid], ref_ent[rows, cols][valid], atol=1e-12, rtol=0)
    assert torch.all(g_lp[~valid] == 0) and torch.all(g_ent[~valid] == 0)
    metrics = finish_metrics(cfg, plan, total_sums(sums))
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), (name, key)


def test_seq_mean_token_sum_norm_of_flat_input_defaults_to_the_longest_sequence():
    batch = make_batch(1)
    flat, rows, positions, _ = packed(batch)
    cfg = LossConfig(loss_agg_mode="seq-mean-token-sum-norm")
    plan = prepare_loss(
        cfg, None, flat["old_log_prob"], flat["advantages"], flat["response_mask"], segments=rows
    )
    lengths = batch["response_mask"].sum(-1)
    longest, responses = int(lengths.max()), int((lengths > 0).sum())  # Dr.GRPO: 1 / (L_const * B)
    assert plan.weight[flat["response_mask"].bool()].unique().tolist() == [1 / (longest * responses)]


def test_segment_quantile_equals_nanquantile_of_each_ragged_sequence():
    g = torch.Generator().manual_seed(0)
    values = torch.round(torch.rand(200, generator=g, dtype=D) * 6) / 2  # ties
    segments = torch.randint(0, 9, (200,), generator=g)
    valid = torch.rand(200, generator=g) > 0.3
    valid[segments == 4] = False  # a sequence without valid tokens: +inf
    for q in (0.0, 0.2, 0.8, 1.0):
        got = segment_quantile(values, valid, segments, 10, q)  # sequence 9 has no tokens at all
        for s in range(10):
            v = values[(segments == s) & valid]
            want = torch.quantile(v, q).item() if v.numel() else float("inf")
            assert got[s].item() == want, (q, s)


@pytest.mark.parametrize(
    ("cfg", "log_prob", "entropy", "reference"),
    [
        (LossConfig(), False, False, False),  # ppo: token counts only
        (LossConfig(method="cispo"), False, False, False),
        (LossConfig(entropy_coef=0.01), False, False, False),  # the bonus: the training forward's entropy
        (LossConfig(method="clip_cov"), True, False, False),
        (LossConfig(method="kl_cov"), True, False, False),
        (LossConfig(method="archer"), False, True, True),
        (LossConfig(method="archer", archer_kl_coef_low_entropy=0.0), False, True, False),
        (LossConfig(top_entropy_ratio=0.2), False, True, False),
        (LossConfig(method="cispo", adv_entropy_shaping=True), False, True, False),
        (LossConfig(kl_coef=0.1), False, False, True),
    ],
)
def test_each_method_declares_what_it_needs_before_the_training_forward(cfg, log_prob, entropy, reference):
    needs = loss_needs(cfg)
    assert (needs.log_prob, needs.entropy, needs.reference) == (log_prob, entropy, reference)
    assert needs.current_policy == (log_prob or entropy)


def test_ppo_plans_without_the_current_policy_and_selecting_methods_refuse_to():
    b = make_batch(2)
    args = (b["old_log_prob"], b["advantages"], b["response_mask"])
    with_lp = policy_loss(LossConfig(), b["log_prob"], *args)
    plan = prepare_loss(LossConfig(), None, *args)  # no log_prob: token counts are enough
    loss, sums = apply_loss(LossConfig(), plan, b["log_prob"], *args)
    assert loss.item() == with_lp[0].item()
    assert finish_metrics(LossConfig(), plan, total_sums([sums]))["pg_clipfrac"] == with_lp[1]["pg_clipfrac"]
    with pytest.raises(ValueError, match="log_prob .* is required by method=clip_cov"):
        prepare_loss(LossConfig(method="clip_cov"), None, *args)
    with pytest.raises(ValueError, match="entropy .* is required by method=archer"):
        prepare_loss(LossConfig(method="archer"), None, *args, ref_log_prob=b["ref_log_prob"])


def test_flat_input_needs_segments():
    b = make_batch(2)
    with pytest.raises(ValueError, match=r"must be a \[B, L\] tensor, or a flat \[N\] one with segments="):
        policy_loss(LossConfig(), *(b[k].reshape(-1) for k in FIELDS[:4]))
