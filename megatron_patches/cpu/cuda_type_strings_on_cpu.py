"""cuda_type_strings_on_cpu: accept CPU tensors where the optimizers check ``'torch.cuda.*Tensor'``.

Reason: megatron/core/optimizer/clip_grads.py:167 asserts fp32 grads are
``'torch.cuda.FloatTensor'`` (``clip_grad_by_total_norm_fp32``, also imported by name into
``optimizer/optimizer.py``); megatron/core/optimizer/distrib_optimizer.py:361 and :420
(``DistributedOptimizer._build_model_and_main_param_groups``) and
megatron/core/optimizer/optimizer.py:671 and :690 (``Float16OptimizerWithFloat16Params.__init__``)
dispatch on the same strings. No proxy can change a string literal.

Fix: those functions are re-compiled from their own source (``common.recompile``) with
``torch.cuda.XTensor`` -> ``torch.XTensor`` (zero-argument ``super()`` rewritten to its two-argument
form); line numbers are kept. Raises if the source no longer contains the strings (an upgrade to
review).

Checked on: ``common.TESTED_MEGATRON_VERSIONS`` (0.16.1).

Safe because: the checks are about dtype; the same dtype on CPU has the same meaning. CPU builds
only.

Test: tests/megatron_patches/test_patches.py (distributed Adam with ``clip_grad=1.0`` steps).
"""

from __future__ import annotations

import importlib

from megatron_patches.common import recompile, require_cpu_build

_TYPE_STRINGS = {
    "'torch.cuda.FloatTensor'": "'torch.FloatTensor'",
    "'torch.cuda.HalfTensor'": "'torch.HalfTensor'",
    "'torch.cuda.BFloat16Tensor'": "'torch.BFloat16Tensor'",
}


def cuda_type_strings_on_cpu() -> None:
    """Re-compile the three checking functions with CPU type strings."""
    require_cpu_build("cuda_type_strings_on_cpu")
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")

    recompile(clip_grads, "clip_grad_by_total_norm_fp32", _TYPE_STRINGS)
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    recompile(distrib.DistributedOptimizer, "_build_model_and_main_param_groups", _TYPE_STRINGS)
    cls = optimizer.Float16OptimizerWithFloat16Params
    recompile(
        cls,
        "__init__",
        {**_TYPE_STRINGS, "super().__init__(": "super(Float16OptimizerWithFloat16Params, self).__init__("},
    )
