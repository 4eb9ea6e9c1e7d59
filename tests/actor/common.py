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


def training_batch(actor, seed: int, rows: slice | None = None) -> dict:
    """`rl_batch(seed)` plus old log-probs (the actor's current ones, perturbed so ratios != 1) and
    sample ids; `rows` picks this data-parallel rank's part *after* the whole batch is built."""
    batch = rl_batch(250, seed=seed)
    current = actor.compute_log_prob(batch)["log_prob"]
    g = torch.Generator().manual_seed(1000 + seed)
    batch["old_log_prob"] = current + 0.3 * torch.randn(current.shape, generator=g)
    batch["sample_ids"] = torch.arange(B) + 100 * seed
    if rows is not None:
        batch = {k: v[rows] for k, v in batch.items()}
    return batch


def dp_rows(rank: int, world_size: int, dp: int) -> slice | None:
    """This rank's rows when the layout is pure data parallel over `dp` ranks (None = all rows)."""
    if dp == 1:
        return None
    return slice(rank * B // world_size, (rank + 1) * B // world_size)


def close(a: dict, b: dict, skip=("output_layer.weight",)) -> float:
    """max |a - b| over the tensors of two full states (the tied output copy is checked elsewhere)."""
    assert {k for k in a if k not in skip} == {k for k in b if k not in skip}, set(a) ^ set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a if k not in skip)
