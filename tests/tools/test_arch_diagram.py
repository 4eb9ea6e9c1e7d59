"""tools/arch_diagram.py: docs/architecture.md's module map is the one the imports draw."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("arch_diagram", REPO / "tools" / "arch_diagram.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_committed_map_matches_the_imports():
    assert _tool().main(["--check"]) == 0


def _tree(tmp_path: Path) -> Path:
    for rel, text in {
        "pipeline/__init__.py": '"""doc"""\n',
        "pipeline/step/__init__.py": "from pipeline.rollout import engine\n",
        "pipeline/rollout/__init__.py": "",
        "pipeline/rollout/engine.py": "def f():\n    from ..algorithms import losses\n",
        "pipeline/algorithms/__init__.py": "",
        "pipeline/algorithms/losses.py": "import torch\nfrom pipeline.errors import ConfigError\n",
        "pipeline/errors.py": "",
        "megatron_patches/__init__.py": "",
        "docs/architecture.md": "# A\n\n<!-- diagram:begin -->\nold\n<!-- diagram:end -->\n\ntail\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_arrows_follow_top_level_function_level_and_relative_imports(tmp_path, monkeypatch):
    tool = _tool()
    root = _tree(tmp_path)
    monkeypatch.setattr(tool, "REPO", root)
    monkeypatch.setattr(tool, "DOC", root / "docs" / "architecture.md")
    arrows, unclaimed = tool.edges()
    # step -> rollout (top level), rollout -> algorithms (relative, inside a function); the arrow
    # algorithms -> config (errors) is not drawn: every box reads its config
    assert arrows == {("step", "rollout"), ("rollout", "algorithms")} and unclaimed == []
    assert tool.main(["--check"]) == 1  # the stale map is caught
    assert tool.main([]) == 0 and tool.main(["--check"]) == 0
    text = (root / "docs" / "architecture.md").read_text()
    assert "    step --> rollout" in text and text.endswith("<!-- diagram:end -->\n\ntail\n")


def test_a_module_no_box_holds_is_refused(tmp_path, monkeypatch):
    tool = _tool()
    root = _tree(tmp_path)
    (root / "pipeline" / "newthing.py").write_text("")
    monkeypatch.setattr(tool, "REPO", root)
    monkeypatch.setattr(tool, "DOC", root / "docs" / "architecture.md")
    with pytest.raises(SystemExit, match="pipeline.newthing"):
        tool.main(["--check"])
