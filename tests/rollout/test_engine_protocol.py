"""Every rollout engine implements the whole `Engine` protocol with a compatible signature: the
trainer, the step verbs and the rollout group may call any protocol method on any engine."""

from __future__ import annotations

import inspect

import pytest

from pipeline.rollout.base import Engine
from pipeline.rollout.local import LocalEngine
from pipeline.rollout.sglang_engine import SGLangEngine

PROTOCOL_METHODS = sorted(
    name for name, v in vars(Engine).items() if callable(v) and not name.startswith("_")
)


def test_the_protocol_names_every_verb_the_pipeline_calls():
    assert set(PROTOCOL_METHODS) >= {
        "generate", "abort", "logprobs", "engine_logprobs", "update_weights", "pause", "resume",
        "release_memory", "resume_memory", "health", "shutdown",
    }  # fmt: skip


def compatible(protocol: inspect.Signature, impl: inspect.Signature) -> str | None:
    """None if every call the protocol allows also works on `impl`, else why not."""
    params = dict(impl.parameters)
    for name, p in protocol.parameters.items():
        q = params.pop(name, None)
        if q is None:
            return f"no parameter {name!r}"
        if q.kind != p.kind and not (
            q.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.KEYWORD_ONLY)
        ):
            return f"{name!r} is {q.kind.description}, the protocol's {p.kind.description}"
        if p.default is not inspect.Parameter.empty and q.default != p.default:
            return f"{name!r} defaults to {q.default!r}, the protocol's to {p.default!r}"
    extra = [n for n, q in params.items() if q.default is inspect.Parameter.empty and q.kind not in (
        inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]  # fmt: skip
    return f"extra required parameters {extra}" if extra else None


@pytest.mark.parametrize("engine", [LocalEngine, SGLangEngine], ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", PROTOCOL_METHODS)
def test_engine_implements_the_protocol_method(engine, method):
    impl = getattr(engine, method, None)
    assert callable(impl), f"{engine.__name__} has no {method}()"
    problem = compatible(inspect.signature(getattr(Engine, method)), inspect.signature(impl))
    assert problem is None, f"{engine.__name__}.{method}: {problem}"


def test_the_compatibility_check_catches_a_missing_tags_parameter():
    def protocol(self, tags: list[str] | None = None) -> None: ...

    def old(self) -> None: ...

    assert compatible(inspect.signature(protocol), inspect.signature(old)) == "no parameter 'tags'"
