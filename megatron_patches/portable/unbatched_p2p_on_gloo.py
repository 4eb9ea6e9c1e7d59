"""unbatched_p2p_on_gloo: use non-batched pipeline p2p (``batch_p2p_comm=False``) on gloo groups.

Acts: only when a ``P2PCommunicator`` is built for a gloo pipeline group with
``config.batch_p2p_comm`` set (the default); NCCL pipeline groups are untouched.

Reason: with the interleaved (virtual pipeline) schedule at PP=2, ``_batched_p2p_ops``
(megatron/core/pipeline_parallel/p2p_communication.py:16, chosen at
megatron/core/pipeline_parallel/p2p_communication.py:355) posts send_prev, recv_prev, send_next,
recv_next to the *same* peer; gloo matches them in order with one tag, so activations and gradients
swap and per-micro-batch losses come out silently wrong (4.89404 instead of 4.89699). Non-batched
``_p2p_ops`` orders them by rank parity and is correct. The communicators are built at
megatron/core/pipeline_parallel/schedules.py:861 and :2010.

Fix: ``P2PCommunicator.__init__`` gives the communicator a private copy of the config with
``batch_p2p_comm=False`` when its pipeline group is gloo. The model's config is not changed.

Checked on: ``common.TESTED_MEGATRON_VERSIONS`` (0.16.1).

Safe because: batched vs non-batched p2p move the same tensors; on gloo there is no overlap to lose.

Test: tests/megatron_patches/test_patches.py (PP2xVPP2: identical micro-batches give identical
losses).
"""

from __future__ import annotations

import copy
import importlib

from megatron_patches.common import HITS, is_gloo, site, wrap_once


def _unbatched_on_gloo(original):
    def __init__(self, pp_group, config):
        original(self, pp_group, config)
        if getattr(config, "batch_p2p_comm", False) and is_gloo(pp_group):
            HITS[f"{site(1)} batch_p2p_comm=False"] += 1
            self.config = copy.copy(config)
            self.config.batch_p2p_comm = False

    return __init__


def unbatched_p2p_on_gloo() -> None:
    """Wrap ``P2PCommunicator.__init__``."""
    p2p = importlib.import_module("megatron.core.pipeline_parallel.p2p_communication")
    wrap_once(p2p.P2PCommunicator, "__init__", _unbatched_on_gloo)
