"""Rollout engines behind one interface: SGLang servers on a cluster, an in-process engine on a CPU box."""

from pipeline.rollout.base import Engine, Sample, SamplingParams
from pipeline.rollout.local import LocalEngine

__all__ = ["Engine", "LocalEngine", "Sample", "SamplingParams"]
