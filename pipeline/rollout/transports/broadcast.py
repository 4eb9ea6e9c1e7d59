"""sync_method "distributed": a process group with the servers, the trainer as rank 0, one broadcast per
tensor (gloo on CPU, NCCL on GPU); `update_weights_from_distributed` announces each bucket's names,
dtypes and shapes, and the servers post one receive per name in that order.

The group is made at the first sync (`init_weights_update_group` on every server while this process
joins through `init_custom_group`) and kept for the run; `reset()` forgets it when an engine
restarted (the group lost a member), so the next sync makes a new one.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.rollout.server import ServerError, free_port
from pipeline.rollout.transports.common import Sent, bucketed, nbytes

log = logging.getLogger(__name__)

GROUP_NAME = "pipeline_weight_sync"


class BroadcastTransport:
    def __init__(self, client, cfg, workdir=None):
        self.client, self.cfg = client, cfg
        self.group = None

    def _ensure_group(self) -> None:
        if self.group is not None:
            return
        cfg, tp, urls = self.cfg, self.cfg.tp_size, self.client.urls
        port = cfg.sync_master_port or free_port(cfg.sync_master_addr)
        world = 1 + tp * len(urls)
        with ThreadPoolExecutor(len(urls)) as pool:
            futures = [
                pool.submit(
                    self.client.control,
                    "init_weights_update_group",
                    {
                        "master_address": cfg.sync_master_addr,
                        "master_port": port,
                        "rank_offset": 1 + i * tp,
                        "world_size": world,
                        "group_name": GROUP_NAME,
                        "backend": cfg.backend,
                    },  # fmt: skip
                    urls=[url],
                )
                for i, url in enumerate(urls)
            ]
            self.group = init_custom_group(
                cfg.backend, f"tcp://{cfg.sync_master_addr}:{port}", world, 0, GROUP_NAME
            )
            for f in futures:
                f.result()

    def send(self, named, version: str) -> Sent:
        self._ensure_group()
        device = "cpu" if self.cfg.backend == "gloo" else f"cuda:{torch.cuda.current_device()}"
        sent = Sent(0, 0)
        with ThreadPoolExecutor(1) as pool:
            for bucket in bucketed(named, self.cfg.bucket_bytes):
                tensors = [t.detach().to(device).contiguous() for _, t in bucket]  # gloo: contiguous only
                meta = {
                    "names": [n for n, _ in bucket],
                    "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
                    "shapes": [list(t.shape) for t in tensors],
                    "group_name": GROUP_NAME,
                    "weight_version": version,
                    "flush_cache": True,
                }
                announced = pool.submit(self.client.control, "update_weights_from_distributed", meta)
                for t in tensors:  # same order as announced: the servers post one receive per name
                    dist.broadcast(t, group_src=0, group=self.group)
                announced.result()
                sent.nbytes += sum(nbytes(t) for t in tensors)
                sent.ntensors += len(tensors)
        return sent

    def reset(self) -> None:
        """An engine restarted: the group lost a member; make a new one at the next sync."""
        self.group = None

    def close(self) -> None:
        """Leave the weight-update group: the servers first (another trainer process may sync them
        later, as an attached client), then this process."""
        if self.group is None:
            return
        try:
            self.client.control("destroy_weights_update_group", {"group_name": GROUP_NAME}, timeout=60)
        except (ServerError, OSError) as e:
            log.warning("servers did not leave the weight-update group: %r", e)
        try:
            dist.destroy_process_group(self.group)
        except (RuntimeError, ValueError) as e:  # a custom group unknown to the default world
            log.warning("destroying the weight-update group: %r", e)
        self.group = None


def init_custom_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str):
    """A process group outside the default one, joined by ranks of other programs (the SGLang servers).

    The mirror image of SGLang's `init_custom_process_group`: the servers build the group the same way
    (a rendezvous store prefixed with the group name, identity rank mapping), so both sides agree.
    Works whether or not this process already has a default group (a Megatron trainer does).

    Private c10d internals, checked against torch 2.13.0 (`_new_process_group_helper`, `_world`,
    `rendezvous`): no public API makes a group whose members are not all ranks of this process's default
    world. `dist.new_group` needs the default group and takes its ranks from it; `init_process_group`
    would make the servers' group this process's default one (a Megatron trainer already has one).
    SGLang's own `init_custom_process_group` (sglang/srt/utils/common.py) calls the same helper.
    A torch upgrade that changes these names breaks only this function.
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(minutes=10)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
