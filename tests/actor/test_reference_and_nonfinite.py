"""The actor's reference policy (a host copy swapped in for one forward) and its non-finite step skip."""

from __future__ import annotations

import pytest
import torch

from tests.actor.common import close, dp_rows, setup_actor, training_batch
from tests.actor.tiny_hf import make_tiny_hf
from tests.distributed import run_distributed

OPTIM = dict(lr=1e-3, adam_eps=1e-4, clip_grad=1.0)


def _worker(rank, world_size, hf_dir):
    from megatron.core import parallel_state as ps

    from pipeline.actor.config import ActorConfig
    from pipeline.actor.weights import gather_full_state
    from pipeline.algorithms.config import LossConfig

    out = {}
    # TP=2: the reference forward sees the initial weights after a step, and the step's weights return.
    actor = setup_actor(ActorConfig(tp=2, max_tokens_per_micro_batch=24, **OPTIM), hf_dir)
    actor.snapshot_reference()
    batch = training_batch(actor, seed=1)
    initial = actor.compute_log_prob(batch)["log_prob"]
    actor.train_step(batch, LossConfig())
    trained = actor.compute_log_prob(batch)["log_prob"]
    out["reference"] = actor.compute_log_prob(batch, weights="reference")["log_prob"]
    out["after_reference"] = actor.compute_log_prob(batch)["log_prob"]
    out["initial"], out["trained"] = initial, trained

    # DP=2, the NaN on rank 0 only (a loss hook, as the tests' fault injection): both ranks skip,
    # nothing changes, the next step is normal.
    actor = setup_actor(ActorConfig(max_tokens_per_micro_batch=12, **OPTIM), hf_dir)
    dp = ps.get_data_parallel_world_size()
    batch = training_batch(actor, seed=2, rows=dp_rows(rank, world_size, dp))
    before = gather_full_state(actor.chunks)
    lr_before = actor.optimizer.param_groups[0]["lr"]
    if rank == 0:
        actor.loss_hook = lambda step, mini_batch, loss: loss * float("nan")
    out["skipped"] = actor.train_step(batch, LossConfig())
    actor.loss_hook = None
    out["unchanged"] = close(before, gather_full_state(actor.chunks))
    out["lr_unchanged"] = actor.optimizer.param_groups[0]["lr"] == lr_before
    out["next"] = actor.train_step(batch, LossConfig())
    out["moved"] = close(before, gather_full_state(actor.chunks))
    ps.destroy_model_parallel()
    return out


@pytest.mark.multiproc
@pytest.mark.slow
def test_reference_weights_and_a_nan_on_one_rank(tmp_path):
    hf_dir = str(make_tiny_hf(tmp_path / "qwen2", "qwen2"))
    for r in run_distributed(_worker, 2, hf_dir):
        assert (r["trained"] - r["initial"]).abs().max() > 1e-4, "the step must move the policy"
        assert torch.equal(r["reference"], r["initial"])  # the frozen initial policy, bit for bit
        assert torch.equal(r["after_reference"], r["trained"])  # and the trained weights are back
        s = r["skipped"]
        assert s["nonfinite"] == 1 and s["update_successful"] is False and s["loss"] != s["loss"]
        assert r["unchanged"] == 0 and r["lr_unchanged"]
        n = r["next"]
        assert n["nonfinite"] == 0 and n["update_successful"] and torch.isfinite(torch.tensor(n["loss"]))
        assert r["moved"] > 1e-5
