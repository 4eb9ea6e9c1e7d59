"""rng_tracker_on_cpu: let megatron's CUDA RNG tracker fork and restore the CPU generator instead.

Reason: ``_get_cuda_rng_state`` (megatron/core/tensor_parallel/random.py:41) and
``_set_cuda_rng_state`` (megatron/core/tensor_parallel/random.py:72) read and (lazily, so on CPU
*never*) write the CUDA generator. Every attention dropout goes through
``get_cuda_rng_tracker().fork()`` (megatron/core/tensor_parallel/random.py:250 and :255), so the
tracker cannot be skipped; ``CudaRNGStatesTracker.add`` (megatron/core/tensor_parallel/random.py:235)
is covered by ``cuda_calls_to_cpu``.

Fix: the two module functions use ``torch.get_rng_state`` / ``torch.set_rng_state``.

Checked on: ``common.TESTED_MEGATRON_VERSIONS`` (0.16.1).

Safe because: on a CPU build the default (CPU) generator is the one dropout draws from, so the
tracker's fork/restore has the same meaning it has on GPU. CPU builds only. (With dropout > 0,
``fork`` logs "CPU RNG state changed within GPU RNG context": expected here, the forked generator
*is* the CPU one; the state is restored on exit all the same.)

Test: tests/megatron_patches/test_patches.py (the tracker's sites in ``KNOWN_CUDA_SITES``) and
tests/actor/test_checkpoint.py (with dropout, a resumed step equals the uninterrupted one).
"""

from __future__ import annotations

import importlib

import torch

from megatron_patches.common import record, require_cpu_build


def rng_tracker_on_cpu() -> None:
    """Point the tracker's two generator-state functions at the CPU generator."""
    require_cpu_build("rng_tracker_on_cpu")
    random = importlib.import_module("megatron.core.tensor_parallel.random")

    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        record()
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        record()
        torch.set_rng_state(new_state)

    random._get_cuda_rng_state = _get_cuda_rng_state
    random._set_cuda_rng_state = _set_cuda_rng_state
