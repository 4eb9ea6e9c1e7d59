"""dist_checkpointing: save at TP2, resume at TP2 (bit-identical continuation), PP2, TP1xDP2 and TP1."""

from __future__ import annotations

import pytest
import torch

from tests.actor.common import close, dp_rows, setup_actor, training_batch
from tests.actor.tiny_hf import make_tiny_hf
from tests.distributed import run_distributed

BASE = dict(
    lr=1e-3, adam_eps=1e-4, lr_warmup_steps=2, lr_decay_steps=10, lr_decay_style="cosine", weight_decay=0.01
)
LOSS = dict(method="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-10.0, clip_cov_ub=10.0, entropy_coef=0.01)
CONTROLLERS = {"entropy_controller": {"alpha": 0.5, "target": 0.3}, "kl": torch.tensor([1.0, 2.0])}


def _save_and_resume(rank, world_size, hf_dir, ckpt):
    from megatron.core import parallel_state as ps

    from pipeline.actor.config import ActorConfig
    from pipeline.actor.weights import gather_full_state
    from pipeline.algorithms.config import LossConfig

    loss = LossConfig(**LOSS)
    out = {}
    # The run that never stops: step 1, save, steps 2 and 3.
    actor = setup_actor(ActorConfig(tp=2, max_tokens_per_micro_batch=24, **BASE), hf_dir)
    actor.train_step(training_batch(actor, seed=1), loss)
    actor.save_checkpoint(ckpt, extra=CONTROLLERS)
    batches = [training_batch(actor, seed=2)]  # old log-probs of the step-1 policy
    out["cont"] = [actor.train_step(batches[0], loss)]
    out["step2_params"] = gather_full_state(actor.chunks)
    batches.append(training_batch(actor, seed=3))
    out["cont"].append(actor.train_step(batches[1], loss))
    out["cont_params"] = gather_full_state(actor.chunks)
    out["batches"] = batches

    # Resumed at the same layout into a model that starts from different (random) weights.
    resumed = setup_actor(
        ActorConfig(tp=2, max_tokens_per_micro_batch=24, seed=99, **BASE), hf_dir, load_weights=False
    )
    out["extra"] = resumed.load_checkpoint(ckpt)
    out["res"] = [resumed.train_step(b, loss) for b in batches]
    out["res_params"] = gather_full_state(resumed.chunks)

    # Resharded: PP2, and TP1 x DP2 (each rank half of the mini-batch).
    for name, layout in {
        "pp2": dict(pp=2, max_tokens_per_micro_batch=24),
        "dp2": dict(max_tokens_per_micro_batch=12),
    }.items():
        other = setup_actor(ActorConfig(**layout, **BASE), hf_dir, load_weights=False)
        other.load_checkpoint(ckpt)
        rows = dp_rows(rank, world_size, ps.get_data_parallel_world_size())
        batch = batches[0] if rows is None else batches[0].select(rows)
        out[name] = other.train_step(batch, loss)
        out[f"{name}_params"] = gather_full_state(other.chunks)
    out["dropout"] = _dropout_resume(hf_dir, ckpt + "_dropout", loss)
    ps.destroy_model_parallel()
    return out


def _dropout_resume(hf_dir, ckpt, loss):
    """With dropout on, only restoring the RNG states (CPU generator + megatron's tracker) makes a
    resumed step equal the uninterrupted one; a resume whose RNG is re-seeded differs."""
    from pipeline.actor.config import ActorConfig

    cfg = ActorConfig(tp=2, max_tokens_per_micro_batch=24, hidden_dropout=0.2, attention_dropout=0.2, **BASE)
    actor = setup_actor(cfg, hf_dir)
    actor.train_step(training_batch(actor, seed=1), loss)
    actor.save_checkpoint(ckpt)
    batch = training_batch(actor, seed=2)
    cont = actor.train_step(batch, loss)["loss"]
    resumed = setup_actor(cfg, hf_dir, load_weights=False)
    resumed.load_checkpoint(ckpt)
    same = resumed.train_step(batch, loss)["loss"]
    reseeded = setup_actor(cfg, hf_dir, load_weights=False)
    reseeded.load_checkpoint(ckpt)
    torch.manual_seed(12345)
    other = reseeded.train_step(batch, loss)["loss"]
    return cont, same, other


def _resume_tp1(rank, world_size, hf_dir, ckpt, batch):
    from megatron.core import parallel_state as ps

    from pipeline.actor.config import ActorConfig
    from pipeline.actor.weights import gather_full_state
    from pipeline.algorithms.config import LossConfig

    actor = setup_actor(ActorConfig(max_tokens_per_micro_batch=24, **BASE), hf_dir, load_weights=False)
    extra = actor.load_checkpoint(ckpt)
    metrics = actor.train_step(batch, LossConfig(**LOSS))
    params = gather_full_state(actor.chunks)
    ps.destroy_model_parallel()
    return extra, metrics, params


@pytest.mark.multiproc
@pytest.mark.slow
def test_save_at_tp2_resume_bit_identically_and_at_other_layouts(tmp_path):
    hf_dir = str(make_tiny_hf(tmp_path / "qwen2", "qwen2"))
    ckpt = str(tmp_path / "ckpt")
    r = run_distributed(_save_and_resume, 2, hf_dir, ckpt)[0]

    assert r["extra"]["entropy_controller"] == CONTROLLERS["entropy_controller"]
    assert torch.equal(r["extra"]["kl"], CONTROLLERS["kl"])
    # Same layout: the resumed run continues bit for bit (loss, grad norm, lr, parameters).
    assert r["res"] == r["cont"]
    assert all(torch.equal(r["res_params"][k], r["cont_params"][k]) for k in r["cont_params"])
    cont, same, reseeded = r["dropout"]
    assert same == cont and reseeded != cont, r["dropout"]

    extra, tp1, tp1_params = run_distributed(_resume_tp1, 1, hf_dir, ckpt, r["batches"][0])[0]
    assert extra["entropy_controller"] == CONTROLLERS["entropy_controller"]
    step2 = r["cont"][0]
    for name, metrics in {"pp2": r["pp2"], "dp2": r["dp2"], "tp1": tp1}.items():
        params = tp1_params if name == "tp1" else r[f"{name}_params"]
        d_loss = abs(metrics["loss"] - step2["loss"])
        d_param = close(params, r["step2_params"])
        print(
            f"resumed at {name}: |dloss|={d_loss:.1e} lr={metrics['lr']:.2e} |dparam| after the step={d_param:.1e}"
        )
        assert d_loss < 1e-6 and metrics["lr"] == step2["lr"] and d_param < 1e-5, name
