"""Samples -> the actor's padded mini-batch (verl layout: left-padded prompt, right-padded response)."""

from __future__ import annotations

import torch

from pipeline.rollout.base import Sample


def make_batch(
    samples: list[Sample],
    advantages: list[float],
    *,
    pad_id: int,
    sample_ids: list[int] | None = None,
    mask_truncated: bool = False,
    pad_to_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Tensors for `MegatronActor.compute_log_prob` / `train_step`.

    input_ids [B, P + R]  prompt right-aligned in the first P columns, response left-aligned after
    attention_mask        1 on real tokens
    response_mask [B, R]  1 on response tokens that count (0 on padding; 0 on the whole response
                          of a truncated sample when `mask_truncated`, DAPO's overlong filtering)
    advantages [B, R]     one scalar per response broadcast over its tokens (x response_mask)
    rollout_log_prob      the engine's log-probs, for the train/rollout mismatch metric
    sample_ids [B]        stable ids (global random choices of the loss depend on them)
    """
    if not samples:
        raise ValueError("make_batch: no samples")
    if len(advantages) != len(samples):
        raise ValueError(f"make_batch: {len(advantages)} advantages for {len(samples)} samples")
    b = len(samples)
    p = max(len(s.prompt_ids) for s in samples)
    r = max(max(len(s.response_ids) for s in samples), 1)
    r = -(-r // pad_to_multiple) * pad_to_multiple
    ids = torch.full((b, p + r), pad_id, dtype=torch.long)
    att = torch.zeros((b, p + r), dtype=torch.long)
    resp_mask = torch.zeros((b, r), dtype=torch.float32)
    rollout_lp = torch.zeros((b, r), dtype=torch.float32)
    for i, s in enumerate(samples):
        n_p, n_r = len(s.prompt_ids), len(s.response_ids)
        ids[i, p - n_p : p] = torch.tensor(s.prompt_ids)
        att[i, p - n_p : p + n_r] = 1
        if n_r:
            ids[i, p : p + n_r] = torch.tensor(s.response_ids)
            rollout_lp[i, :n_r] = torch.tensor(s.logprobs, dtype=torch.float32)
            if not (mask_truncated and s.truncated):
                resp_mask[i, :n_r] = 1.0
    adv = torch.tensor(advantages, dtype=torch.float32)[:, None] * resp_mask
    ids_t = torch.tensor(sample_ids if sample_ids is not None else list(range(b)), dtype=torch.long)
    return {
        "input_ids": ids,
        "attention_mask": att,
        "response_mask": resp_mask,
        "advantages": adv,
        "rollout_log_prob": rollout_lp,
        "sample_ids": ids_t,
    }


def split_rows(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Split a batch into `n` equal row blocks (mini-batches, or data-parallel shards)."""
    b = batch["input_ids"].shape[0]
    if b % n:
        raise ValueError(f"cannot split {b} rows into {n} equal parts")
    size = b // n
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(n)]
