"""HF <-> Megatron name and layout mappings, one small module per architecture family.

``get_mapping(model_type)`` returns a module with

    FAMILY                                          the `family.Family` (its `rules` table)
    rules(hf_config, *, te=False) -> [Rule]         one per Megatron tensor, in checkpoint order
    hf_to_megatron(hf_state, hf_config, *, padded_vocab, te=False) -> {megatron_name: full tensor}
    megatron_to_hf(megatron_state, hf_config, *, te=False) -> {hf_name: tensor}

Megatron names are global and unsharded; `common.tp_shard`/`tp_unshard` cut and join tensor-parallel
pieces. ``te=True`` uses Transformer Engine's names for the fused pre-norms. The actor's weight
loader, the checkpoint converters and live weight sync (pipeline/actor/export.py) use these same
rules. A new family is a module declaring a `Family` plus one line in `MAPPINGS`.
"""

from __future__ import annotations

from types import ModuleType

from pipeline.actor.hf_mapping import llama, mistral, qwen2, qwen3

MAPPINGS: dict[str, ModuleType] = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "qwen3": qwen3}
SUPPORTED = tuple(sorted(MAPPINGS))


class UnsupportedArchitecture(ValueError):
    pass


def get_mapping(model_type: str) -> ModuleType:
    try:
        return MAPPINGS[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"no HF mapping for model_type={model_type!r}; supported: {list(SUPPORTED)} "
            "(add a module in pipeline/actor/hf_mapping)"
        ) from None
