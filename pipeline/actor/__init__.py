"""The Megatron-core actor (see pipeline/actor/actor.py for the batch layout and the loss scaling).

Import `pipeline.actor.config` alone to validate a configuration without importing megatron-core.
"""

from pipeline.actor.config import ActorConfig, check_layout

__all__ = ["ActorConfig", "check_layout"]
