"""Rollout engines behind one interface: SGLang servers on a cluster, an in-process engine on a CPU box.

Names are imported on first use: `pipeline.rollout.server` and `.config` stay free of torch, so the
per-engine server owners on a cluster (`pipeline.cluster.engine_actor`) start in a blink.
"""

import importlib

_WHERE = {
    "Engine": "base",
    "Sample": "base",
    "SamplingParams": "base",
    "logprob_mismatch": "base",
    "RolloutConfig": "config",
    "RolloutConfigError": "config",
    "LocalEngine": "local",
    # SGLangEngine needs aiohttp.
    "SGLangEngine": "sglang_engine",
    "WeightSyncError": "verify",
    "check_weight_sync": "verify",
    "RolloutError": "base",
    "RolloutAborted": "base",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"pipeline.rollout.{_WHERE[name]}"), name)
    raise AttributeError(name)
