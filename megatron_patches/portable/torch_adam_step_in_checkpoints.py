"""torch_adam_step_in_checkpoints: let the distributed optimizer checkpoint torch's own Adam.

Acts: only with torch's ``Adam``/``AdamW`` inside ``DistributedOptimizer`` (megatron-core without
Transformer Engine or Apex), and only where upstream would raise or share one ``step`` tensor.

Reason: ``DistributedOptimizer.state_dict`` asserts that every parameter's Adam state has one common
``step`` (megatron/core/optimizer/distrib_optimizer.py:642), which fails on a fresh optimizer, the
one a run resumes into; and ``_set_main_param_and_optimizer_states`` copies every key of the live
state (megatron/core/optimizer/distrib_optimizer.py:940), including the ``step`` that
``load_state_dict`` just set (megatron/core/optimizer/distrib_optimizer.py:825), from the
checkpoint's ``fully_reshardable`` tensors, which do not hold it (``KeyError: 'step'``). Worse,
:825 gives every parameter the *same* ``step`` tensor, which torch's Adam increments in place once
per parameter, so bias correction is wrong from the second step after a resume (silent).

Fix: a fresh optimizer gets zero Adam state at step 0 before ``state_dict`` (what
``load_state_dict`` allocates anyway, and the load overwrites); the per-parameter copy keeps the live
``step`` when the checkpoint tensors have none (it was already set from the checkpoint's param
groups at :825); after ``load_state_dict`` every parameter gets its own ``step`` tensor.

Checked on: ``common.TESTED_MEGATRON_VERSIONS`` (0.16.1).

Safe because: it acts only where upstream would raise; TE/Apex optimizers keep ``step`` in the param
groups and never reach either path.

Test: tests/actor/test_checkpoint.py (save at TP2, resume bit-identically) and
tests/megatron_patches/test_patches.py (a distributed-optimizer checkpoint save).
"""

from __future__ import annotations

import importlib

import torch

from megatron_patches.common import wrap_once


def _fresh_state_at_step_zero(original):
    def state_dict(self):
        inner = self.optimizer
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state[p]
                    if "step" not in state:
                        state["step"] = torch.tensor(0.0)
                        state.setdefault("exp_avg", torch.zeros_like(p.data))
                        state.setdefault("exp_avg_sq", torch.zeros_like(p.data))
        return original(self)

    return state_dict


def _keep_live_step(original):
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}  # copying it onto itself keeps it
        return original(self, model_param, tensors)

    return _set_main_param_and_optimizer_states


def _one_step_per_parameter(original):
    def load_state_dict(self, state_dict):
        original(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()  # one counter per parameter, as torch expects

    return load_state_dict


def torch_adam_step_in_checkpoints() -> None:
    """Wrap ``state_dict``, ``_set_main_param_and_optimizer_states`` and ``load_state_dict``."""
    cls = importlib.import_module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    wrap_once(cls, "state_dict", _fresh_state_at_step_zero)
    wrap_once(cls, "_set_main_param_and_optimizer_states", _keep_live_step)
    wrap_once(cls, "load_state_dict", _one_step_per_parameter)
