"""Small, named, explicitly applied patches of megatron-core (nothing is patched at import time).

megatron-core 0.16.1 (the newest release for Python 3.11) assumes CUDA in a handful of places and
has a few gaps on gloo and with torch's own Adam; ``../shared/docs/megatron-cpu.md`` has the
measurements. Use

    import megatron_patches
    megatron_patches.apply_for_this_machine()  # after init_process_group, before models

What applies where (``apply_for_this_machine``):

- On a CPU-only machine (tests, CI, the CPU demo): every patch, ``CPU_PATCHES`` = the four in
  ``cpu/`` (CUDA calls, RNG tracker, ``Tensor.cuda``, CUDA type strings) then the four in
  ``portable/``. The ``cpu/`` ones refuse to apply where CUDA is available.
- On a CUDA machine: only ``PORTABLE_PATCHES``, the four in ``portable/``; megatron's real CUDA code
  paths run. Each acts only where upstream would fail or be silently wrong: on gloo process groups
  (``gloo_contiguous_collectives``, ``unbatched_p2p_on_gloo``), with torch's own Adam inside the
  distributed optimizer, i.e. without TE/Apex (``torch_adam_step_in_checkpoints``), and for the
  local spec's torch norms under sequence parallelism, i.e. without TE
  (``torch_norm_sequence_parallel``). With NCCL groups and Transformer Engine they change nothing.

``apply(names)`` applies named patches (each once, in order) and returns ``applied()``. Every CUDA
call a patch intercepts at run time is counted in ``HITS`` under the caller's ``file:line``
(``megatron/core/utils.py:631``), so a test fails when an upgrade adds a call site nobody has
looked at (``tests/megatron_patches``). ``CONTIGUOUS_HITS`` does the same for gloo collectives that
were handed non-contiguous tensors.

Layout: one module per patch, ``cpu/<patch>.py`` or ``portable/<patch>.py``, whose docstring gives
the reason, the megatron-core call sites (file:line), the versions checked
(``TESTED_MEGATRON_VERSIONS``), why it is safe and the test that covers it; the shared machinery
(hit counting, ``wrap_once``, ``recompile``) is ``common.py``. To add a patch: write that module
with a function of the module's name, add the function to ``PATCHES`` below, and add its test
(``tests/megatron_patches/test_layout.py`` checks the module and the registry agree).
"""

from __future__ import annotations

import warnings

import torch

from megatron_patches import common
from megatron_patches.common import (
    CONTIGUOUS_HITS,
    HITS,
    TESTED_MEGATRON_VERSIONS,
    applied,
    reset_hits,
)
from megatron_patches.cpu.cuda_calls_to_cpu import cuda_calls_to_cpu
from megatron_patches.cpu.cuda_type_strings_on_cpu import cuda_type_strings_on_cpu
from megatron_patches.cpu.rng_tracker_on_cpu import rng_tracker_on_cpu
from megatron_patches.cpu.tensor_cuda_is_noop import tensor_cuda_is_noop
from megatron_patches.portable.gloo_contiguous_collectives import gloo_contiguous_collectives
from megatron_patches.portable.torch_adam_step_in_checkpoints import torch_adam_step_in_checkpoints
from megatron_patches.portable.torch_norm_sequence_parallel import torch_norm_sequence_parallel
from megatron_patches.portable.unbatched_p2p_on_gloo import unbatched_p2p_on_gloo

# The registry, in the order `apply` runs them: name -> the function that applies the patch.
PATCHES = {
    f.__name__: f
    for f in (
        cuda_calls_to_cpu,
        rng_tracker_on_cpu,
        tensor_cuda_is_noop,
        cuda_type_strings_on_cpu,
        gloo_contiguous_collectives,
        unbatched_p2p_on_gloo,
        torch_adam_step_in_checkpoints,
        torch_norm_sequence_parallel,
    )
}

# Everything a CPU machine (tests, CI, the CPU demo) needs.
CPU_PATCHES = list(PATCHES)
# Safe on any machine: the ones in portable/ (what a CUDA machine may still need).
PORTABLE_PATCHES = [n for n, f in PATCHES.items() if f.__module__.startswith("megatron_patches.portable.")]

__all__ = [
    "CONTIGUOUS_HITS",
    "CPU_PATCHES",
    "HITS",
    "PATCHES",
    "PORTABLE_PATCHES",
    "TESTED_MEGATRON_VERSIONS",
    "applied",
    "apply",
    "apply_for_this_machine",
    "reset_hits",
    *PATCHES,
]


def apply(names: list[str] | tuple[str, ...]) -> list[str]:
    """Apply the named patches (each once), in the given order; return the names applied so far."""
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        raise ValueError(f"unknown megatron patch(es) {unknown}; known: {sorted(PATCHES)}")
    from megatron.core.package_info import __version__

    if __version__ not in TESTED_MEGATRON_VERSIONS:
        warnings.warn(
            f"megatron_patches were checked against megatron-core {TESTED_MEGATRON_VERSIONS}, "
            f"this is {__version__}: run tests/megatron_patches before trusting results",
            stacklevel=2,
        )
    for name in names:
        if name not in common.APPLIED:
            PATCHES[name]()
            common.APPLIED.append(name)
    return applied()


def apply_for_this_machine() -> list[str]:
    """CPU_PATCHES on a CPU build, PORTABLE_PATCHES where CUDA exists."""
    return apply(CPU_PATCHES if not torch.cuda.is_available() else PORTABLE_PATCHES)
