"""Stream the live actor's weights out in Hugging Face names and layout: one path for weight sync
and for checkpoint export.

    export_hf_weights(actor_or_chunks, hf_config) -> iterator of (hf_name, tensor)
    export_hf_buckets(actor_or_chunks, hf_config, bucket_bytes=512 MiB) -> iterator of lists of them
    export_hf_weights(..., everywhere=True)   every rank yields every tensor (colocated CUDA IPC)

Walks the family's rule table (pipeline/actor/hf_mapping) one Megatron tensor at a time: the pipeline
stage that owns it all-gathers its tensor-parallel pieces (fc1 re-joined as [gate; up]), sends the
full tensor to global rank 0, and rank 0 maps it to HF tensors (QKV split per query group, vocab
padding trimmed, a tied output layer skipped). Memory on rank 0: one full tensor at a time plus the
current bucket.

Which ranks do what: **every rank must iterate the generator to the end** (it drives collectives);
only global rank 0 yields anything. Ranks of data-parallel replica 0 take part in the collectives
(TP all-gathers on the owning stage, a point-to-point send from the owning stage to rank 0 over the
pipeline group); other data-parallel replicas hold identical weights and do nothing. Every tensor is
made contiguous before a collective (gloo is silently wrong on non-contiguous tensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from pipeline.actor.hf_mapping import get_mapping
from pipeline.actor.hf_mapping.common import tp_unshard
from pipeline.actor.hf_mapping.family import Dims
from pipeline.actor.weights import global_name, is_te_naming, unwrap
from pipeline.rollout.transports.common import DEFAULT_BUCKET_BYTES, bucketed


def _chunks(actor_or_chunks) -> list:
    chunks = getattr(actor_or_chunks, "chunks", actor_or_chunks)
    return list(chunks) if isinstance(chunks, list | tuple) else [chunks]


def _local_params(chunks) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters by global Megatron name."""
    out = {}
    for chunk in chunks:
        model = unwrap(chunk)
        for name, param in model.named_parameters():
            out[global_name(model, name)] = param
    return out


def _owners(local: dict, pp_group, pp_size: int) -> dict[str, tuple[int, torch.Size, torch.dtype]]:
    """name -> (owning pipeline stage, full shape, dtype), agreed by the pipeline group."""
    tp = ps.get_tensor_model_parallel_world_size()
    mine = {}
    for name, p in local.items():
        shape = list(p.shape)
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            shape[p.partition_dim] *= tp
        mine[name] = (torch.Size(shape), p.dtype)
    stages = [None] * pp_size
    if pp_size > 1:
        dist.all_gather_object(stages, mine, group=pp_group)
    else:
        stages = [mine]
    owners = {}
    for stage, names in enumerate(stages):
        for name, (shape, dtype) in names.items():
            owners.setdefault(name, (stage, shape, dtype))  # a tied output copy: the first stage wins
    return owners


def _gather_tp(param: torch.Tensor, name: str) -> torch.Tensor:
    local = param.detach().contiguous()
    tp = ps.get_tensor_model_parallel_world_size()
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return local.clone()  # never hand out (or later overwrite) the live parameter
    pieces = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(pieces, local, group=ps.get_tensor_model_parallel_group())
    return tp_unshard(pieces, name, param.partition_dim, gated=True).contiguous()


def megatron_to_hf_stream(named: Iterable, hf_config: dict, *, te: bool = False, dtype=None) -> Iterator:
    """`(global megatron name, full tensor)` pairs -> `(hf_name, tensor)` pairs, by the family's rules.

    The one mapping step of every export: live weight sync (`export_hf_weights`) and the checkpoint
    converter (`pipeline.conversion.read_torch_dist`) both feed it. Tied output layers are dropped.
    """
    mapping = get_mapping(hf_config["model_type"])
    rules = {r.megatron: r for r in mapping.rules(hf_config, te=te)}
    dims = Dims.of(hf_config)
    for name, full in named:
        rule = rules.get(name)
        if rule is None:
            raise KeyError(f"megatron tensor {name} has no HF mapping for {hf_config['model_type']!r}")
        if rule.export:
            for hf_name, tensor in rule.to_hf(full, dims):
                yield hf_name, tensor if dtype is None else tensor.to(dtype)


def _gather_live(chunks, rules) -> Iterator:
    """Full Megatron tensors of the live model on global rank 0, in rule order (see module docstring)."""
    if ps.get_data_parallel_rank() != 0:
        return  # identical replica: rank 0's collectives never involve it
    local = _local_params(chunks)
    pp_group, pp_size = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size()
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    owners = _owners(local, pp_group, pp_size) if tp_rank == 0 else None
    if tp_rank == 0 and pp_size > 1:
        missing = [r.megatron for r in rules if r.export and r.megatron not in owners]
        if missing:
            raise KeyError(f"no pipeline stage holds {missing[:5]} (model and hf_config disagree?)")
    is_root = dist.get_rank() == 0
    for rule in rules:
        if not rule.export:
            continue
        name = rule.megatron
        full = _gather_tp(local[name], name) if name in local else None  # the owning stage's TP group
        if tp_rank != 0:
            continue
        if pp_size > 1:
            stage, shape, param_dtype = owners[name]
            if stage != 0:
                if pp_rank == stage:
                    dist.send(full, dist.get_global_rank(pp_group, 0), group=pp_group)
                elif pp_rank == 0:
                    full = torch.empty(shape, dtype=param_dtype)
                    dist.recv(full, dist.get_global_rank(pp_group, stage), group=pp_group)
        if is_root:
            yield name, full


def _gather_live_everywhere(chunks, rules) -> Iterator:
    """Full Megatron tensors on *every* rank, in rule order: the owning stage's TP group all-gathers,
    then the owning stage broadcasts over each pipeline group. Every data-parallel replica does the
    same with its own copy, so no rank waits on another replica and the collectives stay in step."""
    local = _local_params(chunks)
    pp_group, pp_size = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    owners = _owners(local, pp_group, pp_size)
    missing = [r.megatron for r in rules if r.export and r.megatron not in owners]
    if missing:
        raise KeyError(f"no pipeline stage holds {missing[:5]} (model and hf_config disagree?)")
    device = next(iter(local.values())).device
    for rule in rules:
        if not rule.export:
            continue
        name = rule.megatron
        full = _gather_tp(local[name], name) if name in local else None
        if pp_size > 1:
            stage, shape, param_dtype = owners[name]
            if pp_rank != stage:
                full = torch.empty(shape, dtype=param_dtype, device=device)
            dist.broadcast(full, dist.get_global_rank(pp_group, stage), group=pp_group)
        yield name, full


def export_hf_weights(
    actor_or_chunks, hf_config: dict, *, dtype: torch.dtype | None = None, everywhere: bool = False
) -> Iterator:
    """Yield `(hf_name, tensor)` for the whole model on global rank 0 (see the module docstring).

    `actor_or_chunks`: a `MegatronActor` or this rank's model chunks (DDP/Float16Module wrapped or
    not). Tensors are in the parameters' dtype unless `dtype` is given; they are fresh (safe to keep).
    `everywhere`: every rank yields the same stream (each holds one full tensor at a time), for
    colocated engines that take the weights from the GPU they share with a rank (CUDA IPC).
    """
    chunks = _chunks(actor_or_chunks)
    te = is_te_naming(chunks)
    rules = get_mapping(hf_config["model_type"]).rules(hf_config, te=te)
    gather = _gather_live_everywhere if everywhere else _gather_live
    yield from megatron_to_hf_stream(gather(chunks, rules), hf_config, te=te, dtype=dtype)


def export_hf_buckets(
    actor_or_chunks,
    hf_config: dict,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype=None,
    everywhere=False,
) -> Iterator[list]:
    """`export_hf_weights` grouped into lists of at most `bucket_bytes` (rank 0 yields, or every rank
    with `everywhere`: the same buckets, as the stream is the same; all ranks iterate)."""
    yield from bucketed(
        export_hf_weights(actor_or_chunks, hf_config, dtype=dtype, everywhere=everywhere), bucket_bytes
    )
