"""Layout equivalence of the RL training step: the global normalisers survive the schedule.

The same mini-batch (Clip-Cov and KL-Cov losses with an entropy bonus, packed micro-batches under a
token budget) gives the same loss, gradient norm and, after one optimizer step, the same parameters at
TP1 (one process), TP2, PP2, PP2xVPP2 and DP2 (tolerance 1e-5, fp32). Clipping is on and Adam's epsilon is large so
that a wrong gradient scale would show in the gradient norm and in the parameters.
"""

from __future__ import annotations

import pytest
import torch

from tests.actor.common import close, dp_rows, setup_actor, training_batch
from tests.actor.tiny_hf import make_tiny_hf
from tests.distributed import run_distributed

LOSSES = {
    "clip_cov": dict(
        method="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-10.0, clip_cov_ub=10.0, entropy_coef=0.01
    ),
    "kl_cov": dict(method="kl_cov", kl_cov_ratio=0.2, entropy_coef=0.01),
}
BUDGET = dict(max_tokens_per_micro_batch=24)  # the 48 tokens in two micro-batches
LAYOUTS_2 = {
    "tp2": dict(tp=2, **BUDGET),
    "pp2": dict(pp=2, **BUDGET),
    "pp2vpp2": dict(pp=2, vpp=2, **BUDGET),
    "dp2": dict(max_tokens_per_micro_batch=14),  # two samples per rank: two micro-batches each
}
OPTIM = dict(lr=1e-3, adam_eps=1e-4, clip_grad=1.0, weight_decay=0.01)


def _worker(rank, world_size, hf_dir, layouts):
    from megatron.core import parallel_state as ps

    from pipeline.actor.config import ActorConfig
    from pipeline.actor.weights import gather_full_state
    from pipeline.algorithms.config import LossConfig

    results = {}
    for loss_name, loss_kwargs in LOSSES.items():
        for name, layout in layouts.items():
            actor = setup_actor(ActorConfig(**OPTIM, **layout), hf_dir)
            before = gather_full_state(actor.chunks)
            dp = ps.get_data_parallel_world_size()
            batch = training_batch(actor, seed=1, rows=dp_rows(rank, world_size, dp))
            metrics = actor.train_step(batch, LossConfig(**loss_kwargs))
            after = gather_full_state(actor.chunks)
            if "output_layer.weight" in after:  # PP>1 with tied embeddings: the last stage's copy
                assert (
                    close(
                        {"w": after["output_layer.weight"]}, {"w": after["embedding.word_embeddings.weight"]}
                    )
                    == 0
                )
            results[(loss_name, name)] = (metrics, after, close(before, after))
    if world_size == 2:
        results["bf16"] = _bf16_logits_reach_the_op_unconverted(hf_dir)
    ps.destroy_model_parallel()
    return results


def _bf16_logits_reach_the_op_unconverted(hf_dir):
    """At dtype=bfloat16 (Float16Module) the op gets the bf16 logits shard, not an fp32 copy."""
    import pipeline.actor.actor as actor_module
    from pipeline.actor.config import ActorConfig
    from pipeline.algorithms.config import LossConfig

    seen = []
    op = actor_module.vocab_parallel_logprob_entropy

    def spy(logits, target, **kwargs):
        seen.append((logits.dtype, tuple(logits.shape)))
        return op(logits, target, **kwargs)

    actor_module.vocab_parallel_logprob_entropy = spy
    try:
        actor = setup_actor(ActorConfig(tp=2, dtype="bfloat16", **BUDGET, **OPTIM), hf_dir)
        metrics = actor.train_step(training_batch(actor, seed=1), LossConfig(**LOSSES["clip_cov"]))
    finally:
        actor_module.vocab_parallel_logprob_entropy = op
    return seen, metrics


@pytest.mark.multiproc
@pytest.mark.slow
def test_same_loss_and_parameters_at_tp1_tp2_pp2_vpp_and_dp2(tmp_path):
    hf_dir = str(make_tiny_hf(tmp_path / "qwen2", "qwen2"))  # tied embeddings, qkv biases
    ref = run_distributed(_worker, 1, hf_dir, {"tp1": BUDGET})[0]
    runs = run_distributed(_worker, 2, hf_dir, LAYOUTS_2)
    for rank in range(2):
        seen, metrics = runs[rank]["bf16"]
        assert seen and all(dtype == torch.bfloat16 and shape[-1] == 128 for dtype, shape in seen), seen
        assert abs(metrics["loss"] - ref[("clip_cov", "tp1")][0]["loss"]) < 2e-2
    for loss_name in LOSSES:
        ref_metrics, ref_params, moved = ref[(loss_name, "tp1")]
        assert moved > 1e-4, "the step must move the parameters for the comparison to mean anything"
        selected = ref_metrics[f"{loss_name}/selected"]
        assert selected >= 2, f"{loss_name} must select tokens for the test to cover its global top-k"
        for name in LAYOUTS_2:
            for rank in range(2):
                metrics, params, _ = runs[rank][(loss_name, name)]
                d_loss = abs(metrics["loss"] - ref_metrics["loss"])
                d_norm = abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) / ref_metrics["grad_norm"]
                d_param = close(params, ref_params)
                print(f"{loss_name} {name} rank{rank}: |dloss|={d_loss:.1e} |dgradnorm|/gn={d_norm:.1e} "
                      f"|dparam|={d_param:.1e} (step moved {moved:.1e}, selected {selected:.0f})")  # fmt: skip
                assert d_loss < 1e-5 and d_norm < 1e-5 and d_param < 1e-5, (loss_name, name, rank)
                assert metrics[f"{loss_name}/selected"] == selected
