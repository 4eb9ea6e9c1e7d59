"""The megatron-core internals this project relies on, in one place, each with why no public API does it.

Checked against megatron-core 0.16.1. If an upgrade moves or renames one of these, only this module
changes (tests/conversion/test_convert.py exercises every function here).

`pipeline.conversion.hf_to_torch_dist` writes a torch_dist checkpoint without ever holding the model:
it hands torch.distributed.checkpoint meta tensors and computes each chunk when the writer asks for it
(a planner overriding `resolve_data`). The public `megatron.core.dist_checkpointing.save` offers no such
hook: it writes the tensors the sharded state dict already holds. So the converter does what megatron's
torch_dist save strategy (`TorchDistSaveShardedStrategy.async_save`) does inside, with its own planner:
group the sharded entries by key (`_replace_state_dict_keys_with_sharded_keys`, private), translate
them to torch's sharded tensors (`mcore_to_pyt_state_dict`) and save with a subclass of
`MCoreSavePlanner`, so the files are exactly what `dist_checkpointing.load` reads.
"""

from __future__ import annotations

MEGATRON_CORE_VERSION = "0.16.1"  # the version these were checked against


def to_torch_dcp_state(sharded: dict) -> dict:
    """A flat `{name: ShardedTensor | ShardedObject}` as the state dict megatron's torch_dist strategy
    hands `torch.distributed.checkpoint.save` (every replica kept: one process writes everything)."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=False)
    return mcore_to_pyt_state_dict(flat, False)


def torch_dist_save_planner() -> type:
    """The save planner class of megatron's torch_dist strategy (subclass it to override `resolve_data`)."""
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    return MCoreSavePlanner
