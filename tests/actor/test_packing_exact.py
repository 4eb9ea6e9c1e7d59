"""Packed micro-batches are exact: the same samples give the same log-probs and entropies as a
one-sample-at-a-time forward (<= 1e-6, fp32) at TP1, TP2, PP2 (and PP2 x VPP2, padded rows) and DP2,
and a train step under two token budgets gives the same loss, gradient norm and parameters
(<= 1e-6 relative). The on-policy mini-batch reuses the old forward, and only the methods that
select tokens by the current policy run a forward before the training forward."""

from __future__ import annotations

import pytest

from tests.actor.common import close, dp_rows, setup_actor, training_batch
from tests.actor.tiny_hf import make_tiny_hf
from tests.distributed import run_distributed

ONE_AT_A_TIME = dict(max_tokens_per_micro_batch=None, micro_batch_size=1)
BUDGETS = {"budget 16": dict(max_tokens_per_micro_batch=16), "budget 48": dict(max_tokens_per_micro_batch=48)}
LOSS = dict(method="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-10.0, clip_cov_ub=10.0, entropy_coef=0.01)
OPTIM = dict(lr=1e-3, adam_eps=1e-4, clip_grad=1.0)


def _worker(rank, world_size, hf_dir, layouts):
    from megatron.core import parallel_state as ps

    from pipeline.actor.config import ActorConfig
    from pipeline.actor.weights import gather_full_state
    from pipeline.algorithms.config import LossConfig
    from tests.actor.common import rl_batch

    out = {}
    for name, layout in layouts.items():
        logprobs = {}
        for packing, kw in {"one at a time": ONE_AT_A_TIME, **BUDGETS}.items():
            actor = setup_actor(ActorConfig(**layout, **kw, **OPTIM), hf_dir)
            rows = dp_rows(rank, world_size, ps.get_data_parallel_world_size())
            batch = rl_batch(250, seed=3)
            batch = batch if rows is None else batch.select(rows)
            logprobs[packing] = actor.compute_log_prob(batch)
            if packing in BUDGETS:  # one training step from the same weights, under each budget
                train = training_batch(actor, seed=1, rows=rows)
                metrics = actor.train_step(train, LossConfig(**LOSS))
                out[(name, packing)] = metrics, gather_full_state(actor.chunks)
        out[(name, "logprobs")] = logprobs
    if world_size == 1:
        out["forwards"] = _forwards_before_training(hf_dir)
    ps.destroy_model_parallel()
    return out


def _forwards_before_training(hf_dir):
    """How many no-grad forwards each train_step runs before its training forward, and whether the
    on-policy reuse of old_log_prob gives the pre-forward's loss and parameters."""
    from pipeline.actor.config import ActorConfig
    from pipeline.actor.weights import gather_full_state
    from pipeline.algorithms.config import LossConfig

    counts, results = {}, {}
    for method in ("ppo", "cispo", "clip_cov"):
        for on_policy in (False, True):
            actor = setup_actor(ActorConfig(max_tokens_per_micro_batch=24, **OPTIM), hf_dir)
            batch = training_batch(actor, seed=2)
            old = actor.compute_log_prob(batch)  # exactly the current policy: an on-policy batch
            batch = batch.replace(old_log_prob=old["log_prob"], old_entropy=old["entropy"])
            calls, forward = [], actor._forward_stats
            actor._forward_stats = lambda *a, _c=calls, _f=forward, **k: _c.append(1) or _f(*a, **k)
            cfg = LossConfig(**LOSS) if method == "clip_cov" else LossConfig(method=method)
            metrics = actor.train_step(batch, cfg, on_policy=on_policy)
            counts[(method, on_policy)] = len(calls)
            results[(method, on_policy)] = metrics, gather_full_state(actor.chunks)
    return counts, results


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _check(runs, names):
    for name in names:
        for r in runs:
            lp = r[(name, "logprobs")]
            ref = lp["one at a time"]
            for packing in BUDGETS:
                for k in ("log_prob", "entropy"):
                    d = (lp[packing][k] - ref[k]).abs().max().item()
                    print(f"{name} {packing} {k}: max |packed - one at a time| = {d:.1e}")
                    assert d <= 1e-6, (name, packing, k, d)
            (m16, p16), (m48, p48) = (r[(name, p)] for p in BUDGETS)
            scale = max(v.abs().max().item() for v in p16.values())
            d_loss, d_norm, d_param = _rel(m48["loss"], m16["loss"]), _rel(m48["grad_norm"], m16["grad_norm"]), close(p48, p16) / scale  # fmt: skip
            print(
                f"{name} budgets 16 vs 48: rel |dloss|={d_loss:.1e} |dgradnorm|={d_norm:.1e} |dparam|={d_param:.1e}"
            )
            assert d_loss <= 1e-6 and d_norm <= 1e-6 and d_param <= 1e-6, name
            assert m16["packing"]["micro_batches"] > m48["packing"]["micro_batches"]  # the budgets differ


@pytest.mark.multiproc
@pytest.mark.slow
def test_packed_equals_one_at_a_time_and_two_budgets_train_alike(tmp_path):
    hf_dir = str(make_tiny_hf(tmp_path / "qwen2", "qwen2"))
    one = run_distributed(_worker, 1, hf_dir, {"tp1": {}})
    _check(one, ["tp1"])
    two = run_distributed(_worker, 2, hf_dir, {"tp2": dict(tp=2), "pp2": dict(pp=2), "pp2vpp2": dict(pp=2, vpp=2), "dp2": {}})  # fmt: skip
    _check(two, ["tp2", "pp2", "pp2vpp2", "dp2"])

    counts, results = one[0]["forwards"]
    assert counts == {("ppo", False): 0, ("ppo", True): 0, ("cispo", False): 0, ("cispo", True): 0,
                      ("clip_cov", False): 1, ("clip_cov", True): 0}  # fmt: skip
    for method in ("ppo", "cispo", "clip_cov"):  # reusing old_log_prob on-policy changes nothing
        (m_fwd, p_fwd), (m_reuse, p_reuse) = results[(method, False)], results[(method, True)]
        assert _rel(m_reuse["loss"], m_fwd["loss"]) <= 1e-6 and close(p_reuse, p_fwd) <= 1e-6, method
    assert results[("clip_cov", True)][0]["clip_cov/selected"] >= 1
