"""The actor's no-grad forward of packed samples gives Hugging Face transformers' log-probs and
entropies of each sample run alone (float64), 1e-5 in fp32, at every layout."""

from __future__ import annotations

import pytest
import torch

from tests.actor.common import hf_reference, rl_batch, setup_actor
from tests.actor.tiny_hf import FAMILIES, make_tiny_hf
from tests.distributed import run_distributed

LAYOUTS = [dict(tp=1), dict(tp=2), dict(pp=2), dict(pp=2, vpp=2)]
BUDGET = 24  # the 48 tokens of rl_batch in two packed micro-batches, one with a shared row


def _worker(rank, world_size, dirs):
    from megatron.core import parallel_state as ps

    from pipeline.actor.config import ActorConfig

    results = {}
    for arch, hf_dir in dirs.items():
        for layout in LAYOUTS:
            actor = setup_actor(ActorConfig(max_tokens_per_micro_batch=BUDGET, **layout), hf_dir)
            out = actor.compute_log_prob(rl_batch(250))
            results[(arch, tuple(sorted(layout.items())))] = out
    ps.destroy_model_parallel()
    return results


@pytest.mark.multiproc
def test_logprobs_and_entropies_match_transformers_at_every_layout(tmp_path):
    dirs = {arch: str(make_tiny_hf(tmp_path / arch, arch)) for arch in FAMILIES}
    results = run_distributed(_worker, 2, dirs)
    batch = rl_batch(250)
    first = batch.positions() == 0  # nothing predicts a sample's first token: 0
    for arch, hf_dir in dirs.items():
        ref_lp, ref_ent = hf_reference(hf_dir, batch)
        for layout in LAYOUTS:
            key = (arch, tuple(sorted(layout.items())))
            for rank in range(2):  # every rank returns the same values (broadcast over PP)
                out = results[rank][key]
                assert out["log_prob"].dtype == torch.float32 and not out["log_prob"].requires_grad
                assert out["log_prob"].shape == (batch.num_tokens,)
                assert torch.all(out["log_prob"][first] == 0) and torch.all(out["entropy"][first] == 0)
                d_lp = (out["log_prob"].double() - ref_lp)[~first].abs().max().item()
                d_ent = (out["entropy"].double() - ref_ent)[~first].abs().max().item()
                print(f"{arch} {layout} rank{rank}: |dlogp|={d_lp:.2e} |dH|={d_ent:.2e}")
                assert d_lp < 1e-5 and d_ent < 1e-5, (arch, layout, rank, d_lp, d_ent)
