"""What every patch shares: hit counting, the applied list, and the two ways a patch changes upstream.

- ``record()`` / ``site()``: count an intercepted call in ``HITS`` under the megatron caller's
  ``file:line``; ``CONTIGUOUS_HITS`` is the same for gloo collectives handed non-contiguous tensors.
- ``wrap_once(owner, name, make_wrapper)``: replace a function or method by a wrapper around it,
  once (the idiom of the portable patches).
- ``recompile(owner, name, replacements)``: re-create a function from its own source with textual
  replacements (for string literals no wrapper can reach).

Nothing here patches anything by itself.
"""

from __future__ import annotations

import collections
import functools
import inspect
import sys
import textwrap

import torch

# The megatron-core versions every patch (its call sites, its source replacements) was checked on.
TESTED_MEGATRON_VERSIONS = ("0.16.1",)

HITS: collections.Counter[str] = collections.Counter()
CONTIGUOUS_HITS: collections.Counter[str] = collections.Counter()
APPLIED: list[str] = []  # names of the patches applied in this process, in order (``apply`` adds)


def site(depth: int) -> str:
    """`file:line` of the frame `depth` levels above the caller, shortened to start at megatron/."""
    frame = sys._getframe(depth + 1)
    path = frame.f_code.co_filename
    for marker in ("/megatron/", "/torch/"):
        i = path.rfind(marker)
        if i >= 0:
            path = path[i + 1 :]
            break
    return f"{path}:{frame.f_lineno}"


def record(depth: int = 1) -> None:
    """Count one intercepted call under the `file:line` `depth` frames above the caller."""
    HITS[site(depth + 1)] += 1


def reset_hits() -> None:
    HITS.clear()
    CONTIGUOUS_HITS.clear()


def applied() -> list[str]:
    """Names of the patches applied in this process, in order."""
    return list(APPLIED)


def require_cpu_build(name: str) -> None:
    """Refuse a CPU-only patch where CUDA exists: there the real code paths must run."""
    if torch.cuda.is_available():
        raise RuntimeError(f"megatron_patches.{name} is a CPU-only patch; CUDA is available here")


def is_gloo(group) -> bool:
    """Whether `group` (None: the default group) is a gloo process group."""
    import torch.distributed as dist

    try:
        return dist.get_backend(group) == "gloo"
    except (RuntimeError, ValueError):
        return False


_WRAPPED_BY = "__megatron_patches__"  # on a wrapper: the factories that made it and those beneath it


def wrap_once(owner, name: str, make_wrapper) -> None:
    """Set ``owner.name = make_wrapper(original)``, unless an earlier call with this factory did.

    The wrapper gets the original's name, docstring and ``__wrapped__`` (``functools.wraps``), so
    tracebacks and ``inspect`` still point upstream. It is called directly by upstream code (no
    extra frame), so ``site(1)`` inside it is the megatron caller.
    """
    original = getattr(owner, name)
    key = f"{make_wrapper.__module__}.{make_wrapper.__qualname__}"
    below = getattr(original, _WRAPPED_BY, ())
    if key in below:
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _WRAPPED_BY, (*below, key))
    setattr(owner, name, wrapper)


def recompile(owner, name: str, replacements: dict[str, str]) -> None:
    """Re-create `owner.name` from its source with textual replacements, keeping line numbers."""
    raw = inspect.getattr_static(owner, name)
    func = raw.__func__ if isinstance(raw, classmethod | staticmethod) else raw
    lines, start = inspect.getsourcelines(func)
    source = textwrap.dedent("".join(lines))
    if not any(old in source for old in replacements):
        raise RuntimeError(f"megatron_patches: {owner.__name__}.{name} has none of {list(replacements)}")
    for old, new in replacements.items():
        source = source.replace(old, new)
    if isinstance(raw, classmethod | staticmethod) and not source.lstrip().startswith("@"):
        source = f"@{type(raw).__name__}\n" + source
        start -= 1
    namespace: dict = {}
    module = sys.modules[func.__module__]
    code = compile("\n" * (start - 1) + source, inspect.getsourcefile(func), "exec")
    exec(code, module.__dict__, namespace)
    setattr(owner, name, namespace[name])
