"""Helpers shared by the actor's multi-process tests (run inside spawned ranks)."""

from __future__ import annotations

import torch

B, S, R = 4, 12, 6  # rows, sequence length, response length


def rl_batch(vocab: int, seed: int = 0) -> dict:
    """A mini-batch in the actor's layout: left-padded prompts, right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :2] = 0  # prompt left padding
    mask[2, :3] = 0
    mask[3, -2:] = 0  # response right padding
    mask[0, -1] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "response_mask": mask[:, S - R :].clone().float(),
        "advantages": torch.randn(B, R, generator=g),
    }


def reference_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def setup_actor(cfg, hf_dir, *, load_weights: bool = True):
    """Patches, parallel state and an actor for `hf_dir` (its weights unless `load_weights` is False)."""
    from megatron.core import parallel_state as ps

    import megatron_patches
    from pipeline.actor.actor import MegatronActor, initialize_parallel
    from pipeline.actor.model import read_hf_config

    megatron_patches.apply(megatron_patches.CPU_PATCHES)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    hf_config = read_hf_config(hf_dir)
    initialize_parallel(cfg, hf_config)
    return MegatronActor(cfg, hf_config, hf_dir=hf_dir if load_weights else None)
