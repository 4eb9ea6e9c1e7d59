"""HF <-> Megatron name and layout mappings, one small module per architecture family.

``get_mapping(model_type)`` returns a module with

    hf_to_megatron(hf_state, hf_config, *, padded_vocab, te=False) -> {megatron_name: full tensor}
    megatron_to_hf(megatron_state, hf_config, *, te=False) -> {hf_name: tensor}

Megatron names are global and unsharded; `common.tp_shard`/`tp_unshard` cut and join tensor-parallel
pieces. ``te=True`` uses Transformer Engine's names for the fused pre-norms. The actor's weight
loader, the checkpoint converters and weight sync use these same functions.
"""

from __future__ import annotations

from types import ModuleType

from pipeline.actor.hf_mapping import llama

MAPPINGS: dict[str, ModuleType] = {"llama": llama, "mistral": llama, "qwen2": llama, "qwen3": llama}


def get_mapping(model_type: str) -> ModuleType:
    try:
        return MAPPINGS[model_type]
    except KeyError:
        raise ValueError(f"no HF mapping for model_type={model_type!r}; known: {sorted(MAPPINGS)}") from None
