"""HF <-> Megatron: one small module per architecture family, each declaring a `family.Family`.

``get_mapping(model_type)`` returns that `Family`, which has

    rules(hf_config, *, te=False) -> [Rule]         one per Megatron tensor, in checkpoint order
    hf_to_megatron(hf_state, hf_config, *, padded_vocab, te=False) -> {megatron_name: full tensor}
    megatron_to_hf(megatron_state, hf_config, *, te=False) -> {hf_name: tensor}
    megatron_flags(hf_config) -> the TransformerConfig fields the family decides; qk_norm
    unsupported(hf_config) -> what megatron cannot express (None: nothing)

Megatron names are global and unsharded; `common.tp_shard`/`tp_unshard` cut and join tensor-parallel
pieces. ``te=True`` uses Transformer Engine's names for the fused pre-norms. The actor's model
builder and weight loader, the checkpoint converters and live weight sync (pipeline/actor/export.py)
use these same families. A new architecture is one module here declaring ``FAMILY = Family(...)``
(found by `MAPPINGS` on import), plus its test.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.actor.hf_mapping.family import Family


def _families() -> dict[str, Family]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, Family):
            found[family.model_type] = family
    return found


MAPPINGS: dict[str, Family] = _families()
SUPPORTED = tuple(sorted(MAPPINGS))


class UnsupportedArchitecture(ValueError):
    pass


def get_mapping(model_type: str) -> Family:
    try:
        return MAPPINGS[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"no HF mapping for model_type={model_type!r}; supported: {list(SUPPORTED)} "
            "(add a module in pipeline/actor/hf_mapping)"
        ) from None
