"""The global-statistics contract: summing apply_loss over micro-batches and ranks == policy_loss on the
whole batch (loss, d/dlog_prob, d/dentropy) to 1e-6 in float64, for every method and aggregation mode."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.algorithms import LossConfig, measure_entropy, policy_loss, prepare_loss
from tests.algorithms.common import CONTRACT_CONFIGS, D, make_batch, reference, split_loss
from tests.distributed import run_distributed


def _assert_same(got, want, name):
    loss, g_lp, g_ent = got
    ref_loss, ref_lp, ref_ent = want
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * max(1.0, abs(ref_loss.item())), name
    torch.testing.assert_close(g_lp, ref_lp, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(g_ent, ref_ent, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("name", sorted(CONTRACT_CONFIGS))
def test_micro_batch_split_equals_whole_batch(name):
    cfg = CONTRACT_CONFIGS[name]
    batch = make_batch(1)
    ref_loss, ref_lp, ref_ent, _ = reference(cfg, batch)
    B = batch["log_prob"].shape[0]
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(B, generator=g)
    micro = [perm[:1], perm[1:6], perm[6:]]
    got = split_loss(cfg, batch, torch.arange(B), micro)
    _assert_same(got[:3], (ref_loss, ref_lp, ref_ent), name)
    assert ref_lp.abs().sum() > 0


def test_plan_rows_accepts_slices_and_bool_masks():
    cfg = CONTRACT_CONFIGS["clip_cov_top_entropy_shaped"]
    batch = make_batch(1)
    ref_loss, ref_lp, ref_ent, _ = reference(cfg, batch)
    B = batch["log_prob"].shape[0]
    first = torch.arange(B) < 5
    for micro in ([slice(0, 5), slice(5, B)], [first, ~first]):
        got = split_loss(cfg, batch, torch.arange(B), micro)
        _assert_same(got[:3], (ref_loss, ref_lp, ref_ent), str(micro))


def test_selections_are_not_trivial_on_the_contract_batch():
    """Guard: the contract batch really exercises Clip-Cov picks, KL-Cov ties, top-entropy ties, Archer."""
    batch = make_batch(1)
    _, _, _, m = reference(CONTRACT_CONFIGS["clip_cov"], batch)
    assert m["clip_cov/candidates"] > m["clip_cov/selected"] >= 2
    _, _, _, m = reference(CONTRACT_CONFIGS["kl_cov"], batch)
    assert m["kl_cov/selected"] >= 3
    _, _, _, m = reference(CONTRACT_CONFIGS["ppo_top_entropy"], batch)
    assert 0 < m["top_entropy/selected_frac"] < 1
    _, _, _, m = reference(CONTRACT_CONFIGS["archer"], batch)
    assert 0 < m["archer/high_frac"] < 0.5


def _rank_rows(rank: int, world: int, B: int) -> torch.Tensor:
    """Uneven, interleaved rows per rank, so no rank holds a contiguous block of global row indices."""
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(11))
    cuts = {2: [0, 5, B], 3: [0, 3, 8, B]}[world]
    return perm[cuts[rank] : cuts[rank + 1]].sort().values


def _contract_worker(rank: int, world: int, names: list[str]):
    torch.set_default_dtype(torch.float32)
    batch = make_batch(1)
    B = batch["log_prob"].shape[0]
    rows = _rank_rows(rank, world, B)
    n = len(rows)
    micro = [torch.arange(0, n // 2), torch.arange(n // 2, n)] if n > 1 else [torch.arange(n)]
    out = {}
    for name in names:
        cfg = CONTRACT_CONFIGS[name]
        loss, g_lp, g_ent, metrics = split_loss(cfg, batch, rows, micro, group=dist.group.WORLD)
        summed = torch.cat([loss.reshape(1), g_lp.flatten(), g_ent.flatten()])
        dist.all_reduce(summed)
        ref_loss, ref_lp, ref_ent, ref_metrics = reference(cfg, batch)
        k = g_lp.numel()
        got = (summed[0], summed[1 : 1 + k].view_as(g_lp), summed[1 + k :].view_as(g_ent))
        _assert_same(got, (ref_loss, ref_lp, ref_ent), name)
        for key, value in ref_metrics.items():
            if not key.endswith("_sum"):
                assert metrics[key] == pytest.approx(value, abs=1e-9), (name, key)
        out[name] = summed[0].item()
    # Skywork's controller measurement: global -mean log pi_old, not rank 0's shard
    e = measure_entropy(batch["old_log_prob"][rows], batch["response_mask"][rows], dist.group.WORLD)
    assert e == pytest.approx(measure_entropy(batch["old_log_prob"], batch["response_mask"]), abs=1e-12)
    # no communication with global_stats=False even when a group is passed
    cfg = LossConfig(method="kl_cov", kl_cov_ratio=0.15, global_stats=False)
    sub = {k: v[rows] for k, v in batch.items()}
    args = (sub["log_prob"], sub["old_log_prob"], sub["advantages"], sub["response_mask"])
    local = prepare_loss(cfg, *args, sample_ids=sub["sample_ids"], dp_group=None)
    with_group = prepare_loss(cfg, *args, sample_ids=sub["sample_ids"], dp_group=dist.group.WORLD)
    assert torch.equal(local.pg_weight, with_group.pg_weight) and local.metrics == with_group.metrics
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 3])
def test_global_stats_contract_over_gloo_ranks_for_every_method(world):
    results = run_distributed(_contract_worker, world, sorted(CONTRACT_CONFIGS))
    assert all(r == results[0] for r in results)


def test_local_stats_reproduce_the_per_micro_batch_token_mean():
    """Spec §0.2 example: token losses [1, 1] and [0, 0, 0, 0] -> 2/6 globally, 0.5 with legacy weighting."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([[-1.0, -1.0, 0, 0], [0.0, 0, 0, 0]], dtype=D)  # loss -A*r = 1 on row 0
    lp = torch.zeros(2, 4, dtype=D)
    cfg_global, cfg_local = LossConfig(), LossConfig(global_stats=False)
    whole, _ = policy_loss(cfg_global, lp, lp, adv, mask)
    assert whole.item() == pytest.approx(2 / 6)
    per_mb = [
        policy_loss(cfg_local, lp[i : i + 1], lp[i : i + 1], adv[i : i + 1], mask[i : i + 1])[0]
        for i in (0, 1)
    ]
    assert (per_mb[0] + per_mb[1]).item() / 2 == pytest.approx(0.5)


def test_local_clip_cov_floors_one_pick_per_call_but_global_once_per_batch():
    batch = make_batch(2, B=8)
    args = [batch[k] for k in ("log_prob", "old_log_prob", "advantages", "response_mask")]
    cfg = LossConfig(method="clip_cov", clip_cov_lb=0.0, clip_cov_ub=100.0, clip_cov_ratio=1e-4)
    whole = prepare_loss(cfg, *args, sample_ids=batch["sample_ids"])
    assert whole.metrics["clip_cov/selected"] == 1
    local = LossConfig(
        method="clip_cov", clip_cov_lb=0.0, clip_cov_ub=100.0, clip_cov_ratio=1e-4, global_stats=False
    )
    picks = 0
    for i in range(0, 8, 2):  # micro-batches of two rows, as the reference code sees them
        part = prepare_loss(local, *[a[i : i + 2] for a in args], sample_ids=batch["sample_ids"][i : i + 2])
        picks += part.metrics["clip_cov/selected"]
    assert picks >= 3
