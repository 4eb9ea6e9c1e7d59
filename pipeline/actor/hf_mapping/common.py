"""Layout helpers shared by the per-architecture mappings (fused QKV, fused gate/up, vocab padding).

Megatron-core layouts (both the local and the Transformer Engine spec):

* ``linear_qkv`` rows are grouped per query group: for each of the ``ng`` KV groups,
  ``heads/ng`` query heads, then that group's key head, then its value head (``head_dim`` rows
  each). Tensor parallelism splits the rows into ``tp`` contiguous blocks of whole groups.
* a gated MLP's ``linear_fc1`` is ``[gate; up]`` on one rank; under TP each rank holds
  ``[gate_r; up_r]``, so the full tensor is *not* the concatenation of the ranks' shards.
* embeddings and the output layer have ``padded_vocab`` rows; padding rows are zero.
"""

from __future__ import annotations

import torch


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """HF q/k/v projections (weights ``[out, in]`` or biases ``[out]``) -> Megatron fused QKV."""
    tail = q.shape[1:]
    qg = q.reshape(num_groups, -1, *tail)
    kg = k.reshape(num_groups, -1, *tail)
    vg = v.reshape(num_groups, -1, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *tail).contiguous()


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of `interleave_qkv`: Megatron fused QKV -> (q, k, v)."""
    tail = qkv.shape[1:]
    per_group = (num_heads // num_groups) * head_dim
    g = qkv.reshape(num_groups, per_group + 2 * head_dim, *tail)
    q, k, v = torch.split(g, [per_group, head_dim, head_dim], dim=1)
    return (
        q.reshape(-1, *tail).contiguous(),
        k.reshape(-1, *tail).contiguous(),
        v.reshape(-1, *tail).contiguous(),
    )


def pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Append zero rows up to `padded_vocab` (embedding / output layer)."""
    extra = padded_vocab - weight.shape[0]
    if extra < 0:
        raise ValueError(f"vocab {weight.shape[0]} is larger than the padded vocab {padded_vocab}")
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])], dim=0)


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's rule: the vocab padded to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def tp_shard(full: torch.Tensor, name: str, partition_dim: int | None, rank: int, size: int, gated: bool):
    """This TP rank's piece of a full Megatron tensor (`partition_dim` None = replicated)."""
    if partition_dim is None or size == 1:
        return full
    if gated and is_gated_fc1(name):
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat(
            [torch.chunk(gate, size, dim=0)[rank], torch.chunk(up, size, dim=0)[rank]], dim=0
        ).contiguous()
    return torch.chunk(full, size, dim=partition_dim)[rank].contiguous()


def tp_unshard(shards: list[torch.Tensor], name: str, partition_dim: int | None, gated: bool):
    """Inverse of `tp_shard` over all TP ranks' pieces (rank order)."""
    if partition_dim is None or len(shards) == 1:
        return shards[0]
    if gated and is_gated_fc1(name):
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=partition_dim)
