"""Load a HF safetensors directory into this rank's (TP/PP/VPP-sharded) Megatron model chunks.

Each rank reads only the tensors its chunks need (its own pipeline stages' layers), maps them to
Megatron's layout with the rules of `pipeline.actor.hf_mapping`, cuts its tensor-parallel piece and copies it
into the parameter. Every parameter must be loaded exactly once; anything else is an error.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from pipeline.actor.hf_mapping import get_mapping
from pipeline.actor.hf_mapping.common import tp_shard
from pipeline.actor.hf_mapping.family import Dims, check_hf_names, read_hf
from pipeline.hf_io import HFWeights

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def global_name(model: torch.nn.Module, name: str) -> str:
    """`decoder.layers.{local}.x` of one chunk -> `decoder.layers.{global}.x` (others unchanged)."""
    m = _LAYER.match(name)
    if not m:
        return name
    layer = model.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"


def is_te_naming(chunks) -> bool:
    return any(n.endswith("layer_norm_weight") for c in chunks for n, _ in unwrap(c).named_parameters())


def load_hf_weights(chunks, hf_dir: str | Path, hf_config: dict) -> int:
    """Copy the HF weights of `hf_dir` into `chunks` (this rank's pieces); returns tensors loaded.

    Only the rules of this rank's parameters are converted, so a pipeline stage reads only its own
    layers from the (memory-mapped) safetensors; every HF name is still checked against config.json.
    """
    models = [unwrap(c) for c in chunks]
    hf = HFWeights(hf_dir)
    mapping = get_mapping(hf_config["model_type"])
    rules = {r.megatron: r for r in mapping.rules(hf_config, te=is_te_naming(chunks))}
    check_hf_names(hf.keys(), list(rules.values()), hf_config["model_type"])
    dims, padded_vocab = Dims.of(hf_config), models[0].vocab_size
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    loaded = 0
    for model in models:
        for name, param in model.named_parameters():
            key = global_name(model, name)
            if key not in rules:
                raise KeyError(f"no HF tensor maps to megatron parameter {key} ({hf_dir})")
            full = rules[key].to_megatron(read_hf(hf, rules[key]), dims, padded_vocab)
            dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            piece = tp_shard(full, key, dim, tp_rank, tp_size, gated=True)
            if piece.shape != param.shape:
                raise ValueError(f"{key}: HF gives {tuple(piece.shape)}, model has {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(piece.to(param.dtype))
            loaded += 1
    return loaded


def gather_full_state(chunks) -> dict[str, torch.Tensor]:
    """Every parameter of the whole model as one full tensor by global Megatron name, on every rank.

    TP pieces are all-gathered over the tensor-parallel group (contiguous, for gloo) and joined
    with `tp_unshard`; pipeline stages are merged with an object all-gather over the pipeline group.
    Meant for small models, exports and tests (it holds the whole model on every rank).
    """
    import torch.distributed as dist

    from pipeline.actor.hf_mapping.common import tp_unshard

    tp_group, tp_size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    stage: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        model = unwrap(chunk)
        for name, param in model.named_parameters():
            key = global_name(model, name)
            local = param.detach().float().contiguous()
            dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            if dim is not None and tp_size > 1:
                pieces = [torch.empty_like(local) for _ in range(tp_size)]
                dist.all_gather(pieces, local, group=tp_group)
                local = tp_unshard(pieces, key, dim, gated=True)
            stage[key] = local.clone()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return stage
    stages = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, stage, group=ps.get_pipeline_model_parallel_group())
    full: dict[str, torch.Tensor] = {}
    for s in stages:
        full.update(s)
    return full
