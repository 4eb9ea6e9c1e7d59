"""RL post-training pipeline for LLMs whose reason to exist is entropy control.

Layers (see docs/architecture.md): `pipeline.ops` (vocab-parallel math), `pipeline.algorithms`
(loss functions, pure), `pipeline.actor` (megatron-core), `pipeline.rollout`, `pipeline.cluster`.
"""

__version__ = "0.1.0"
