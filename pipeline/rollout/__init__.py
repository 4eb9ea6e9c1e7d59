"""Rollout engines behind one interface: SGLang servers on a cluster, an in-process engine on a CPU box."""

from pipeline.rollout.base import Engine, Sample, SamplingParams, logprob_mismatch
from pipeline.rollout.config import RolloutConfig, RolloutConfigError
from pipeline.rollout.local import LocalEngine

__all__ = [
    "Engine",
    "LocalEngine",
    "RolloutConfig",
    "RolloutConfigError",
    "Sample",
    "SamplingParams",
    "logprob_mismatch",
]


def __getattr__(name: str):
    # SGLangEngine needs aiohttp; importing it lazily keeps `pipeline.rollout` light for LocalEngine users.
    if name in ("SGLangEngine", "WeightSyncError", "RolloutError"):
        from pipeline.rollout import sglang_engine

        return getattr(sglang_engine, name)
    raise AttributeError(name)
