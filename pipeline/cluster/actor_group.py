"""One Ray actor per Megatron rank, forming one torch.distributed group; the driver calls verbs on all.

The driver hands every rank the same packed batch (one object in Ray's store); each rank keeps the
samples of its data-parallel shard: `packing.balance` splits them over the ranks by tokens (the same
split on every rank, no communication). Results come back from the ranks that hold them (last
pipeline stage, tensor-parallel rank 0) with their sample indices and are put back in batch order.
"""

from __future__ import annotations

import os
import socket

import ray
import torch

from pipeline.actor import packing
from pipeline.batch import Batch
from pipeline.cluster import placement


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote
class ActorWorker:
    """A Megatron rank: process group, parallel state and `MegatronActor`, inside one Ray actor."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        actor_cfg,
        hf_dir: str,
        backend: str,
        reference: bool,
        planned_gpu: int | None = None,
    ):
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.args = (actor_cfg, hf_dir, reference)
        if planned_gpu is not None and [int(g) for g in ray.get_gpu_ids()] != [planned_gpu]:
            raise RuntimeError(
                f"Megatron rank {rank} was planned on GPU {planned_gpu} but Ray gave it {ray.get_gpu_ids()}"
            )

    def address(self) -> str:
        """Where rank 0 hosts the rendezvous (its node's address and a free port there)."""
        return f"{ray.util.get_node_ip_address()}:{_free_port()}"

    def start(self, master: str) -> dict:
        import torch.distributed as dist

        import megatron_patches

        actor_cfg, hf_dir, reference = self.args
        if self.backend == "nccl":  # Ray made exactly this actor's GPU visible
            torch.cuda.set_device(0)
        self.device = torch.device("cuda", 0) if self.backend == "nccl" else torch.device("cpu")
        dist.init_process_group(
            self.backend, init_method=f"tcp://{master}", rank=self.rank, world_size=self.world_size
        )
        megatron_patches.apply_for_this_machine()
        from megatron.core import parallel_state as ps

        from pipeline.actor.actor import MegatronActor, initialize_parallel
        from pipeline.hf_io import read_config

        self.hf_config = read_config(hf_dir)
        initialize_parallel(actor_cfg, self.hf_config)
        self.actor = MegatronActor(actor_cfg, self.hf_config, hf_dir=hf_dir)
        if reference:  # the initial weights are the frozen reference policy, also after a resume
            self.actor.snapshot_reference()
        self.ps = ps
        return {
            "rank": self.rank,
            "dp_rank": ps.get_data_parallel_rank(),
            "dp_size": ps.get_data_parallel_world_size(),
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "last_stage": ps.is_pipeline_last_stage(ignore_virtual=True),
            "pid": os.getpid(),
        }

    def _shard(self, batch: Batch) -> tuple[list[int], Batch]:
        """(this data-parallel rank's sample indices, its samples on this rank's device)."""
        dp, rank = self.ps.get_data_parallel_world_size(), self.ps.get_data_parallel_rank()
        mine = packing.balance(batch.lengths, dp)[rank]
        return mine, batch.select(mine).to(self.device)

    def _reports(self) -> bool:
        return (
            self.ps.is_pipeline_last_stage(ignore_virtual=True)
            and self.ps.get_tensor_model_parallel_rank() == 0
        )

    def compute_log_prob(self, batch: Batch, entropy: bool, influence: bool, weights: str):
        samples, shard = self._shard(batch)
        with self.actor.resident(needs=("weights",)):
            out = self.actor.compute_log_prob(
                shard, entropy=entropy, influence=influence, broadcast=False, weights=weights
            )
        if not self._reports():
            return None
        return samples, {k: v.cpu() for k, v in out.items()}

    def train_step(self, batch: Batch, loss_cfg, step: int, on_policy: bool, mini_batch: int):
        with self.actor.resident():
            metrics = self.actor.train_step(
                self._shard(batch)[1], loss_cfg, step=step, on_policy=on_policy, mini_batch=mini_batch
            )
        return metrics, self._reports()

    def set_loss_hook(self, hook) -> None:
        self.actor.loss_hook = hook

    def offload(self, parts: tuple[str, ...]) -> dict:
        return self.actor.offload(parts)

    def onload(self, parts) -> dict:
        return self.actor.onload(parts)

    def sync_weights(self, target: dict, version: int, bucket_bytes: int) -> dict:
        """Stream the HF-named weights into the engines; every rank drives the export's collectives."""
        import time

        t0 = time.perf_counter()
        with self.actor.resident(needs=("weights",)):
            self.actor.sync_params()  # a deferred all-gather (overlap_param_gather) must land first
            nbytes = self._sync_weights(target, version, bucket_bytes)
            dt = time.perf_counter() - t0  # the sync, not the hand-back of `resident`
        if self.rank != 0:
            return {}
        return {"sync/seconds": dt, "sync/MB": nbytes / 1e6, "sync/MB_per_s": nbytes / 1e6 / max(dt, 1e-9)}

    def _sync_weights(self, target: dict, version: int, bucket_bytes: int) -> int:
        """Bytes this rank sent (rank 0's count is the one reported)."""
        from pipeline.actor.export import export_hf_buckets

        if (
            target["kind"] == "sglang"
            and target.get("engine_ranks")
            and target["cfg"].sync_method == "tensor"
        ):
            return self._sync_colocated(target, version, bucket_bytes)
        buckets = export_hf_buckets(self.actor, self.hf_config, bucket_bytes=bucket_bytes)
        nbytes = 0
        if self.rank != 0:
            for _ in buckets:  # only rank 0 yields; the others take part in the gathers
                pass
            return 0
        if target["kind"] == "local":
            workers = target["workers"]
            ray.get([w.begin_weight_update.remote() for w in workers])
            for bucket in buckets:
                ref = ray.put(bucket)  # one copy in the object store, read by every engine
                ray.get([w.load_weights.remote(ref) for w in workers])
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            ray.get([w.end_weight_update.remote(version) for w in workers])
        else:
            from dataclasses import replace

            from pipeline.rollout import SGLangEngine

            if not hasattr(self, "_sglang"):  # one client, one weight-update group, for the run
                cfg = replace(target["cfg"], sync_master_addr=ray.util.get_node_ip_address())
                self._sglang = SGLangEngine.attach(cfg, target["urls"], eos_token_ids=[])
            self._sglang.update_weights((kv for bucket in buckets for kv in bucket), version)
            nbytes = int(self._sglang.metrics["sync/mb"] * (1 << 20))
        return nbytes

    def _sync_colocated(self, target: dict, version: int, bucket_bytes: int) -> int:
        """Colocated engines take every bucket from the GPU they share with a rank (CUDA IPC)."""
        from pipeline.actor.export import export_hf_buckets
        from pipeline.rollout.transports.cuda_ipc import ColocatedSync

        if not hasattr(self, "_ipc"):  # its process groups are made once, by every rank
            self._ipc = ColocatedSync(target["engine_ranks"], target["urls"], self.rank)
        self._ipc.begin()
        nbytes = 0
        for bucket in export_hf_buckets(
            self.actor, self.hf_config, bucket_bytes=bucket_bytes, everywhere=True
        ):
            nbytes += self._ipc.push(bucket, version)
        self._ipc.end()
        return nbytes

    def save_checkpoint(self, path: str, extra: dict):
        with self.actor.resident():
            self.actor.save_checkpoint(path, extra)

    def load_checkpoint(self, path: str) -> dict:
        with self.actor.resident():
            return self.actor.load_checkpoint(path)


class ActorGroup:
    def __init__(self, actor_cfg, hf_dir: str, lay: placement.Layout, *, reference: bool = False):
        backend = "nccl" if lay.gpus else "gloo"
        world_size = len(lay.ranks)
        # Rank r on the r-th device in (node, GPU) order: tensor-parallel groups on one node.
        self.workers = [
            ActorWorker.options(**placement.rank_options(lay, r)).remote(
                r, world_size, actor_cfg, hf_dir, backend, reference, d.gpu
            )
            for r, d in enumerate(lay.ranks)
        ]
        master = ray.get(self.workers[0].address.remote())
        self.infos = ray.get([w.start.remote(master) for w in self.workers])
        self.dp_size = self.infos[0]["dp_size"]

    def _all(self, method: str, *args):
        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def compute_log_prob(
        self, batch: Batch, *, entropy: bool = True, influence: bool = False, weights: str = "current"
    ) -> dict:
        """Per-token log-probs (entropies, influences) of `batch`, [T] each, in its order."""
        parts = [p for p in self._all("compute_log_prob", ray.put(batch), entropy, influence, weights) if p]
        out = {}
        for samples, values in parts:
            index = batch.token_index(samples)
            for k, v in values.items():
                out.setdefault(k, torch.zeros(batch.num_tokens, dtype=v.dtype)).index_copy_(0, index, v)
        return out

    def train_step(
        self, batch: Batch, loss_cfg, step: int, *, on_policy: bool = False, mini_batch: int = 0
    ) -> dict:
        """One optimizer step; the metrics of rank 0, with `packing` = each data-parallel rank's
        tokens, token slots and micro-batches."""
        if len(batch) < self.dp_size:
            raise ValueError(
                f"a mini-batch of {len(batch)} samples cannot feed {self.dp_size} data-parallel ranks"
            )
        results = self._all("train_step", ray.put(batch), loss_cfg, step, on_policy, mini_batch)
        metrics = dict(results[0][0])
        metrics["packing"] = [m["packing"] for m, reports in results if reports]
        return metrics

    def set_loss_hook(self, hook) -> None:
        """`hook(step, mini_batch, loss) -> loss` on every rank's micro-batch losses (None: remove)."""
        self._all("set_loss_hook", hook)

    def sync_weights(self, target: dict, version: int, bucket_bytes: int) -> dict:
        return self._all("sync_weights", target, version, bucket_bytes)[0]

    # ---- colocated memory phases (actor.offload) ------------------------------------------------
    def offload(self, parts: tuple[str, ...] = ("weights", "grads", "optimizer")) -> dict:
        """Every rank's `parts` to host memory (the engines' turn on the GPUs); bytes of rank 0."""
        return self._all("offload", tuple(parts))[0]

    def onload(self, parts: tuple[str, ...] | None = None) -> dict:
        """Every rank's offloaded state (or `parts` of it) back on its device, bit for bit."""
        return self._all("onload", parts)[0]

    def save_checkpoint(self, path: str, extra: dict) -> None:
        self._all("save_checkpoint", path, extra)

    def load_checkpoint(self, path: str) -> dict:
        return self._all("load_checkpoint", path)[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
