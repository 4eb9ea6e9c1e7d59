"""Weight sync into colocated SGLang engines through CUDA IPC handles (slime's colocated path).

A colocated engine's TP rank j runs on the same GPU as one Megatron rank. Every Megatron rank
builds each bucket of full HF-named tensors itself (`export_hf_weights(..., everywhere=True)`), so
the bytes are already on the engine's GPU: the rank packs the bucket into one fresh uint8 buffer
(SGLang's "flattened_bucket" layout: one handle per bucket, not per tensor), pickles a CUDA IPC
handle to it, the ranks of engine e gather their handles at the engine's leader (the rank on its TP
rank 0's GPU), and the leader posts `/update_weights_from_tensor` with one payload per TP rank. The
server maps the memory, loads the weights, answers; then the buffers may be freed (a fresh buffer
per bucket: reusing one would race with the server's copy, as slime notes).

The handle names its GPU by UUID instead of by index (the rank sees its GPU as cuda:0, the server
sees the engine's GPUs as cuda:0..T-1): the same rewrite SGLang applies on both sides
(`sglang.srt.utils.patch_torch`, which the server always applies before loading), done here without
importing SGLang. With CPU tensors (tests, the CPU demo) the same payload carries the bytes
themselves (a shared-memory handle would start torch's shm manager, which lives on as long as the
server holds the memory), so everything but the CUDA handle itself runs on CPU.

Never run on a GPU yet: the CUDA handles, the UUID rewrite's effect and the NCCL side are untested.
"""

from __future__ import annotations

import base64
import io
import pickle
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

import torch
from torch.multiprocessing import reductions

DEVICE_ARG = 6  # position of the device index in torch's CUDA tensor reduction (since torch 1.x)


def with_device_uuid(args: tuple, uuid_of=None) -> tuple:
    """`reduce_tensor`'s arguments for a CUDA tensor with the device index replaced by its UUID."""
    uuid_of = uuid_of or (lambda index: str(torch.cuda.get_device_properties(index).uuid))
    return (*args[:DEVICE_ARG], uuid_of(args[DEVICE_ARG]), *args[DEVICE_ARG + 1 :])


def _reduce(tensor: torch.Tensor):
    fn, args = reductions.reduce_tensor(tensor)
    return (fn, with_device_uuid(args)) if tensor.is_cuda else (fn, args)


class _Pickler(ForkingPickler):
    """torch's multiprocessing pickler, with CUDA devices named by UUID."""

    _extra_reducers = {**ForkingPickler._extra_reducers, torch.Tensor: _reduce}


def flatten(bucket: list[tuple[str, torch.Tensor]]) -> dict:
    """SGLang's flattened bucket: one fresh uint8 buffer and each tensor's byte range in it."""
    views, metadata, start = [], [], 0
    for name, t in bucket:
        flat = t.detach().contiguous().view(-1).view(torch.uint8)
        views.append(flat)
        metadata.append(
            SimpleNamespace(
                name=name,
                shape=t.shape,
                dtype=t.dtype,
                start_idx=start,
                end_idx=start + flat.numel(),
                numel=flat.numel(),
            )  # fmt: skip
        )
        start += flat.numel()
    return {"flattened_tensor": torch.cat(views), "metadata": metadata}


def serialize(obj) -> str:
    """base64 of the pickle SGLang's `MultiprocessingSerializer.deserialize` reads: CUDA tensors as IPC
    handles (named by GPU UUID), CPU tensors by value."""
    buf = io.BytesIO()
    if obj["flattened_tensor"].is_cuda:
        _Pickler(buf).dump(obj)
    else:
        pickle.Pickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode()


def engine_of(rank: int, engine_ranks: list[list[int]]) -> tuple[int, int] | None:
    """(engine, TP rank inside it) of a Megatron rank colocated with an engine, else None."""
    for e, ranks in enumerate(engine_ranks):
        if rank in ranks:
            return e, ranks.index(rank)
    return None


class ColocatedSync:
    """One Megatron rank's side of the CUDA IPC sync (every rank makes one, in the same order)."""

    def __init__(self, engine_ranks: list[list[int]], urls: list[str], rank: int, *, timeout: float = 600.0):
        import torch.distributed as dist

        if len(engine_ranks) != len(urls):
            raise ValueError(f"{len(engine_ranks)} engines' ranks for {len(urls)} engine URLs")
        self.rank, self.timeout = rank, timeout
        self.where = engine_of(rank, engine_ranks)
        # Handles are small Python objects: a gloo group per engine gathers them at its leader.
        # new_group is collective over the whole world: every rank makes every group.
        self.groups = [dist.new_group(ranks, backend="gloo") for ranks in engine_ranks]
        self.engine_ranks, self.urls = engine_ranks, urls

    @property
    def leader(self) -> bool:
        return self.where is not None and self.where[1] == 0

    def _control(self, endpoint: str, payload: dict):
        from pipeline.rollout.server import post_checked

        post_checked(self.urls[self.where[0]], endpoint, payload, timeout=self.timeout)

    def begin(self) -> None:
        if self.leader:
            self._control("begin_weight_update", {})

    def push(self, bucket: list[tuple[str, torch.Tensor]], version: int) -> int:
        """Hand one bucket (the same on every rank) to this rank's engine; returns bytes pushed."""
        import torch.distributed as dist

        if self.where is None:
            return 0
        e, _ = self.where
        packed = flatten(bucket)
        payloads = [None] * len(self.engine_ranks[e]) if self.leader else None
        dist.gather_object(serialize(packed), payloads, dst=self.engine_ranks[e][0], group=self.groups[e])
        if self.leader:
            self._control(
                "update_weights_from_tensor",
                {
                    "serialized_named_tensors": payloads,  # entry j: the handle on TP rank j's GPU
                    "load_format": "flattened_bucket",
                    "flush_cache": True,
                    "weight_version": str(int(version)),
                },
            )
        dist.barrier(group=self.groups[e])  # the engine has copied the bucket: the buffers may go
        nbytes = packed["flattened_tensor"].numel()
        del packed
        return nbytes

    def end(self) -> None:
        if self.leader:
            self._control("end_weight_update", {})
