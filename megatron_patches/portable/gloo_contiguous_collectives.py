"""gloo_contiguous_collectives: hand gloo collectives contiguous tensors, and copy results back.

Acts: only for a collective on a gloo group that is handed a non-contiguous tensor; NCCL groups and
contiguous tensors take the untouched path.

Reason: torch 2.13's gloo backend silently delivers wrong data for non-contiguous tensors (measured
for ``scatter`` of ``torch.chunk(w, 2, dim=1)`` pieces: megatron-bridge's TP=2 weight load came out
wrong by 0.69 in the logits, no error). NCCL raises instead. Any caller that passes a view (a column
slice, a transposed tensor) is exposed, in every megatron-core version. In megatron-core 0.16.1 the
exposed sites are those that pass caller tensors as given, e.g.
megatron/core/tensor_parallel/mappings.py:150 (``all_gather`` of ``input_``) and
megatron/core/tensor_parallel/mappings.py:193 (``reduce_scatter`` of split pieces); the tested
paths (contiguous activations) reach none, so ``CONTIGUOUS_HITS`` stays empty there. Not covered:
names bound before the patch, e.g. megatron/core/tensor_parallel/mappings.py:12
(``dist_all_gather_func``), which are handed ``.contiguous()`` inputs anyway (mappings.py:142, :182).

Fix: ``torch.distributed.<collective>`` (the public names, not c10d's internal ones) is wrapped: for
a gloo group, non-contiguous tensor arguments are replaced by contiguous copies and, after the call
(run synchronously when ``async_op=True``), copied back in place. Counted in ``CONTIGUOUS_HITS``.

Checked on: ``common.TESTED_MEGATRON_VERSIONS`` (0.16.1) with torch 2.13.

Safe because: contiguous inputs, and non-gloo groups, take the untouched path; for the rest the
result is what the collective promises. It costs one copy only where gloo would be wrong.

Test: tests/megatron_patches/test_patches.py (a gloo scatter of views into a transposed receiver).
"""

from __future__ import annotations

import inspect

import torch

from megatron_patches.common import CONTIGUOUS_HITS, is_gloo, site, wrap_once

_GLOO_COLLECTIVES = (
    "broadcast",
    "all_reduce",
    "reduce",
    "all_gather",
    "gather",
    "scatter",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "all_to_all_single",
)


class _DoneWork:
    """A finished collective (what `async_op=True` returns when we ran it synchronously)."""

    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


def _contiguous_on_gloo(fn):
    signature = inspect.signature(fn)

    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        fixes = []  # (original, contiguous copy) pairs to copy back after the call

        def fix(value):
            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                copy_ = value.contiguous()
                fixes.append((value, copy_))
                return copy_
            if isinstance(value, list) and any(
                isinstance(v, torch.Tensor) and not v.is_contiguous() for v in value
            ):
                return [fix(v) for v in value]
            return value

        if not is_gloo(bound.arguments.get("group")):
            return fn(*args, **kwargs)
        for key, value in list(bound.arguments.items()):
            bound.arguments[key] = fix(value)
        if not fixes:
            return fn(*args, **kwargs)
        CONTIGUOUS_HITS[f"{site(1)} {fn.__name__}"] += 1
        async_op = bound.arguments.get("async_op", False)
        if async_op:
            bound.arguments["async_op"] = False
        result = fn(*bound.args, **bound.kwargs)
        for original, copy_ in fixes:
            if original.data_ptr() != copy_.data_ptr():
                original.copy_(copy_)
        return _DoneWork() if async_op else result

    return wrapper


def gloo_contiguous_collectives() -> None:
    """Wrap each public collective in `_GLOO_COLLECTIVES`."""
    import torch.distributed as dist

    for name in _GLOO_COLLECTIVES:
        wrap_once(dist, name, _contiguous_on_gloo)
