"""Helpers shared by the actor's multi-process tests (run inside spawned ranks)."""

from __future__ import annotations

import torch

from pipeline.batch import Batch

# (prompt, response) tokens of each sample: ragged, so that packing and balancing have work to do;
# the last two (8 and 4 tokens) share a packed row (rows are as long as the longest sample, 12)
LENGTHS = [(5, 7), (3, 9), (8, 4), (2, 6), (2, 2)]
B = len(LENGTHS)


def rl_batch(vocab: int, seed: int = 0, lengths=LENGTHS) -> Batch:
    """Samples as the actor gets them: prompt + response tokens, the loss on the responses except a
    masked span in the middle of sample 1 (a tool's output in a multi-turn sample), advantages."""
    g = torch.Generator().manual_seed(seed)
    tokens, mask = [], []
    for i, (p, r) in enumerate(lengths):
        tokens.append(torch.randint(0, vocab, (p + r,), generator=g))
        m = torch.tensor([0.0] * p + [1.0] * r)
        if i == 1:
            m[p + 3 : p + 5] = 0.0
        mask.append(m)
    cu = torch.tensor([0] + [p + r for p, r in lengths]).cumsum(0)
    loss_mask = torch.cat(mask)
    return Batch(
        tokens=torch.cat(tokens),
        cu_seqlens=cu,
        loss_mask=loss_mask,
        sample_ids=torch.arange(len(lengths)),
        advantages=torch.randn(loss_mask.shape, generator=g) * loss_mask,
    )


def setup_actor(cfg, hf_dir, *, load_weights: bool = True):
    """Patches, parallel state and an actor for `hf_dir` (its weights unless `load_weights` is False)."""
    from megatron.core import parallel_state as ps

    import megatron_patches
    from pipeline.actor.actor import MegatronActor, initialize_parallel
    from pipeline.hf_io import read_config

    megatron_patches.apply(megatron_patches.CPU_PATCHES)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    hf_config = read_config(hf_dir)
    initialize_parallel(cfg, hf_config)
    return MegatronActor(cfg, hf_config, hf_dir=hf_dir if load_weights else None)


def training_batch(actor, seed: int, rows: list[int] | None = None) -> Batch:
    """`rl_batch(seed)` plus old log-probs (the actor's current ones, perturbed so ratios != 1) and
    sample ids; `rows` picks this data-parallel rank's samples *after* the whole batch is built."""
    batch = rl_batch(250, seed=seed)
    current = actor.compute_log_prob(batch)["log_prob"]
    g = torch.Generator().manual_seed(1000 + seed)
    old = current + 0.3 * torch.randn(current.shape, generator=g) * batch.loss_mask
    batch = batch.replace(old_log_prob=old, sample_ids=torch.arange(B) + 100 * seed)
    return batch if rows is None else batch.select(rows)


def dp_rows(rank: int, world_size: int, dp: int) -> list[int] | None:
    """This rank's samples when the layout is pure data parallel over `dp` ranks (None = all)."""
    if dp == 1:
        return None
    return list(range(rank * B // world_size, (rank + 1) * B // world_size))


def hf_reference(hf_dir, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of `batch` from transformers in float64, one sample at a time
    (flat, aligned like the actor's: token t from the logits at t - 1, 0 at each sample's first)."""
    from tests.actor.tiny_hf import hf_token_logprobs

    lp, ent = (
        torch.zeros(batch.num_tokens, dtype=torch.float64),
        torch.zeros(batch.num_tokens, dtype=torch.float64),
    )
    for i in range(len(batch)):
        a, b = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
        tok, h = hf_token_logprobs(hf_dir, batch.tokens[a:b][None])
        lp[a + 1 : b], ent[a + 1 : b] = tok[0], h[0]
    return lp, ent


def close(a: dict, b: dict, skip=("output_layer.weight",)) -> float:
    """max |a - b| over the tensors of two full states (the tied output copy is checked elsewhere)."""
    assert {k for k in a if k not in skip} == {k for k in b if k not in skip}, set(a) ^ set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a if k not in skip)
