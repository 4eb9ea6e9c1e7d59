#!/usr/bin/env python
"""Draw the module map of `pipeline/` from its imports, into docs/architecture.md.

    python tools/arch_diagram.py           # rewrite the diagram between the markers
    python tools/arch_diagram.py --check   # exit 1 if the diagram is not what the code says

Every module of `pipeline/` (and `megatron_patches/`) belongs to one box of `BOXES`; an arrow
A --> B means some module of box A imports one of box B (at the top of the file or inside a
function); arrows into the config box (everyone reads its section) are left out. A module that no box claims is an error, so the map cannot silently leave code out.
The diagram is a Mermaid graph between `<!-- diagram:begin -->` and `<!-- diagram:end -->`.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
BEGIN, END = "<!-- diagram:begin -->", "<!-- diagram:end -->"

# box -> (label, module prefixes it holds); the first matching box (longest prefix) wins
BOXES: dict[str, tuple[str, tuple[str, ...]]] = {
    "entry": ("train.py · __main__ · submit", ("pipeline.train", "pipeline.__main__", "pipeline.submit")),
    "step": ("step/ (the verbs)", ("pipeline.step",)),
    "cluster": ("cluster/ (Ray, placement, memory phases)", ("pipeline.cluster",)),
    "launch": ("launch/ (plans, memory estimate)", ("pipeline.launch",)),
    "actor": ("actor/ (Megatron)", ("pipeline.actor",)),
    "rollout": ("rollout/ (engines, weight transports)", ("pipeline.rollout",)),
    "algorithms": ("algorithms/ (losses, advantages)", ("pipeline.algorithms",)),
    "ops": ("ops/ (vocab-parallel)", ("pipeline.ops",)),
    "rewards": ("rewards/", ("pipeline.rewards",)),
    "data": ("batch · data · filters", ("pipeline.batch", "pipeline.data", "pipeline.filters")),
    "state": (
        "checkpoint · metrics · telemetry · preemption",
        ("pipeline.checkpoint", "pipeline.metrics", "pipeline.telemetry", "pipeline.preemption"),
    ),
    "config": (
        "config · preflight · errors",
        ("pipeline.config", "pipeline.trainer_config", "pipeline.preflight", "pipeline.errors"),
    ),
    "hf": ("conversion · HF I/O", ("pipeline.conversion", "pipeline.hf_io", "pipeline.hf", "pipeline.tiny")),
    "patches": ("megatron_patches/ · megatron_compat", ("megatron_patches", "pipeline.megatron_compat")),
}
IGNORED = ("pipeline",)  # the package's own __init__ (a docstring and a version)
UNDRAWN = (
    "config",
)  # every box reads its config section and raises its errors: arrows into it are not drawn


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def box_of(module: str) -> str | None:
    best, length = None, -1
    for box, (_, prefixes) in BOXES.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > length:
                best, length = box, len(p)
    return best


def imports_of(path: Path, module: str) -> set[str]:
    """Absolute names of the project modules `path` imports (relative imports resolved)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("pipeline", "megatron_patches")}


def edges() -> tuple[set[tuple[str, str]], list[str]]:
    """(box -> box arrows, modules no box claims)."""
    arrows, unclaimed = set(), []
    for root in ("pipeline", "megatron_patches"):
        for path in sorted((REPO / root).rglob("*.py")):
            src = module_name(path)
            if src in IGNORED:
                continue
            a = box_of(src)
            if a is None:
                unclaimed.append(src)
                continue
            for target in imports_of(path, src):
                b = box_of(target)
                if b is not None and b != a and b not in UNDRAWN:
                    arrows.add((a, b))
    return arrows, unclaimed


def mermaid() -> str:
    arrows, unclaimed = edges()
    if unclaimed:
        raise SystemExit(f"arch_diagram: no box in BOXES holds {', '.join(unclaimed)}; add it to one")
    lines = ["```mermaid", "graph TD"]
    lines += [f'    {box}["{label}"]' for box, (label, _) in BOXES.items()]
    lines += [f"    {a} --> {b}" for a, b in sorted(arrows, key=lambda e: (list(BOXES).index(e[0]), e[1]))]
    lines.append("```")
    return "\n".join(lines)


def render(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"arch_diagram: {DOC} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{mermaid()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/architecture.md is out of date")
    args = ap.parse_args(argv)
    text = DOC.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{DOC.relative_to(REPO)}: the module map is out of date; run python tools/arch_diagram.py")
            return 1
        print(f"{DOC.relative_to(REPO)}: the module map matches the imports")
        return 0
    DOC.write_text(new)
    print(f"wrote the module map into {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
