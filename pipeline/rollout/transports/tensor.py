"""sync_method "tensor": `update_weights_from_tensor` for servers on the trainer's machine.

Each bucket travels pickled by torch's multiprocessing pickler (CPU tensors as shared-memory files),
the same payload once per TP rank. This process switches torch to the `file_system` sharing
strategy, without which a CPU server dies deserialising them. Colocated GPUs use `cuda_ipc.py`.
"""

from __future__ import annotations

import base64
import io

import torch

from pipeline.rollout.transports.common import Sent, bucketed, nbytes


class TensorTransport:
    def __init__(self, client, cfg, workdir=None):
        self.client, self.cfg = client, cfg

    def send(self, named, version: str) -> Sent:
        from multiprocessing.reduction import ForkingPickler

        # CPU tensors cross to the server as shared-memory files; the default file_descriptor strategy
        # kills the receiving server (cpu-recipes.md). Process-wide, as torch allows no other scope.
        torch.multiprocessing.set_sharing_strategy("file_system")
        sent = Sent(0, 0)
        for bucket in bucketed(named, self.cfg.bucket_bytes):
            tensors = [(n, t.detach().cpu().contiguous()) for n, t in bucket]
            buf = io.BytesIO()
            ForkingPickler(buf).dump(tensors)
            payload = base64.b64encode(buf.getvalue()).decode()
            self.client.control(
                "update_weights_from_tensor",
                {
                    "serialized_named_tensors": [payload] * self.cfg.tp_size,
                    "weight_version": version,
                    "flush_cache": True,
                },  # fmt: skip
            )
            del tensors  # the servers copied them during the call
            sent.nbytes += sum(nbytes(t) for _, t in bucket)
            sent.ntensors += len(bucket)
        return sent

    def close(self) -> None:
        pass
