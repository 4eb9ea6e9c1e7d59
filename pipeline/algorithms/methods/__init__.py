"""The loss methods: one module per method, each with its formula, its paper and its `Method` record,
and the registry below, THE list of `loss.method` names.

Adding a method: a new module here declaring `METHOD = Method(name=..., per_token=..., ...)` (see
`base.Method` for the hooks), one line in `_MODULES`, and its tests (`tests/algorithms/test_registry.py`
runs every registered method through the prepare/apply contract). `LossConfig.validate` reads the
names from `METHODS`; the shared code in `losses.py` calls only the hooks.
"""

from __future__ import annotations

from pipeline.algorithms.methods import archer, cispo, clip_cov, kl_cov, ppo
from pipeline.algorithms.methods.base import Method, Prepared

_MODULES = (ppo, cispo, clip_cov, kl_cov, archer)

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in _MODULES}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown loss method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "Prepared", "get_method"]
