"""torch_norm_sequence_parallel: let the local spec's torch norms run under sequence parallelism.

Acts: only when a ``WrappedTorchNorm`` is built with ``config.sequence_parallel`` on, i.e. the local
layer spec (CPU, or a GPU without Transformer Engine) under SP; TE's norms never come here.

Reason: ``WrappedTorchNorm.__new__`` asserts ``not config.sequence_parallel``
(megatron/core/transformer/torch_norm.py:32), so the local spec cannot use sequence parallelism at
all. Nothing in the norm itself depends on it: under SP each TP rank normalises its own slice of the
sequence with the full (replicated) weight, and the weight's gradient is a partial sum that
``finalize_model_grads`` all-reduces over the TP group for every parameter marked
``sequence_parallel`` (``_allreduce_non_tensor_model_parallel_grads``,
megatron/core/distributed/finalize_model_grads.py:354). TE's norms set that mark; torch's do not.

Fix: build the torch norm as upstream does with SP off, then mark its parameters
``sequence_parallel = True``, exactly what ``TENorm`` does. Counted in ``HITS`` (the norm is built at
megatron/core/transformer/spec_utils.py:119).

Checked on: ``common.TESTED_MEGATRON_VERSIONS`` (0.16.1).

Safe because: a norm is per token, so slicing the sequence does not change its output; the one
difference, the gradient reduction, is the one TE relies on. Without SP nothing changes.

Test: tests/actor/test_scale_switches.py (TP2 with sequence parallelism equals the plain run).
"""

from __future__ import annotations

import copy
import importlib

from megatron_patches.common import HITS, site, wrap_once


def _sequence_parallel_norm(original):
    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original(cls, plain, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        HITS[f"{site(1)} sequence_parallel torch norm"] += 1
        return norm

    return __new__


def torch_norm_sequence_parallel() -> None:
    """Wrap ``WrappedTorchNorm.__new__``."""
    torch_norm = importlib.import_module("megatron.core.transformer.torch_norm")
    wrap_once(torch_norm.WrappedTorchNorm, "__new__", _sequence_parallel_norm)
