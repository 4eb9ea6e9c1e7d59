"""Weight transports: how the export generator's `(hf_name, tensor)` stream reaches the SGLang servers.

One module per way, each a class with `send(named, version) -> Sent` and `close()` (`common.Transport`):

    broadcast.py  sync_method "distributed": a process group with the servers, one broadcast per tensor
    tensor.py     sync_method "tensor": tensors by value in `update_weights_from_tensor` (same machine)
    disk.py       sync_method "disk": safetensors shards in a directory, `update_weights_from_disk`
    cuda_ipc.py   colocated GPUs: every Megatron rank hands its engine CUDA IPC handles (driven by the
                  actor ranks, not by `SGLangEngine`)

`common.bucketed` groups the stream by `rollout.bucket_bytes`, for the transports and for
`pipeline.actor.export.export_hf_buckets` alike. Modules are imported on first use (torch, c10d).
"""

from __future__ import annotations

import importlib

_CLASSES = {
    "distributed": ("broadcast", "BroadcastTransport"),
    "tensor": ("tensor", "TensorTransport"),
    "disk": ("disk", "DiskTransport"),
}


def make_transport(method: str, client, cfg, workdir):
    """The transport for `rollout.sync_method` `method`, sending through `client` (`EngineClient`)."""
    module, name = _CLASSES[method]
    cls = getattr(importlib.import_module(f"pipeline.rollout.transports.{module}"), name)
    return cls(client, cfg, workdir)
