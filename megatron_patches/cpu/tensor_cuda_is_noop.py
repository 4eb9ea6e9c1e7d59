"""tensor_cuda_is_noop: make ``Tensor.cuda()`` return the tensor itself on a CPU build.

Reason: megatron/core/models/common/language_module/language_module.py:244 moves the tied
embedding weight with ``weight.data.cuda()`` at PP>1; megatron/core/optimizer/optimizer.py:375 and
:380 (``MegatronOptimizer.restore_from_cpu``) and
megatron/core/optimizer/distrib_optimizer.py:1089 (``get_parameter_state_dp_zero``) do the same with
optimizer state. These are method calls on tensors, which no module proxy sees.

Fix: ``torch.Tensor.cuda`` becomes ``lambda self, *a, **k: self`` (counted in ``HITS``).

Checked on: ``common.TESTED_MEGATRON_VERSIONS`` (0.16.1).

Safe because: it is applied only where CUDA does not exist, so no working code path is changed, and
every call is counted in ``HITS``. This is the only process-wide change of the set.

Test: tests/megatron_patches/test_patches.py (language_module.py:244 and distrib_optimizer.py:1089
are in ``KNOWN_CUDA_SITES``).
"""

from __future__ import annotations

import torch

from megatron_patches.common import record, require_cpu_build


def tensor_cuda_is_noop() -> None:
    """Replace ``torch.Tensor.cuda`` by a counted identity."""
    require_cpu_build("tensor_cuda_is_noop")

    def cuda(self, *args, **kwargs):
        record()
        return self

    torch.Tensor.cuda = cuda
