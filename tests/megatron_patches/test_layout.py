"""megatron_patches layout: one module per patch under cpu/ or portable/, each registered in PATCHES,
each documenting a megatron-core call site that exists and a test file that exists."""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import re

import pytest

import megatron_patches
from megatron_patches import common, cpu, portable

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULES = {
    f"{package.__name__}.{info.name}": package
    for package in (cpu, portable)
    for info in pkgutil.iter_modules(package.__path__)
}


def test_every_patch_module_is_registered_under_its_name_and_every_registered_patch_has_a_module():
    registered = {f.__module__: name for name, f in megatron_patches.PATCHES.items()}
    assert set(registered) == set(MODULES)
    for module, name in registered.items():
        assert module.rsplit(".", 1)[1] == name
        assert getattr(importlib.import_module(module), name) is megatron_patches.PATCHES[name]


def test_portable_patches_are_the_portable_modules_and_cpu_patches_are_all_of_them():
    portable_names = {m.rsplit(".", 1)[1] for m, package in MODULES.items() if package is portable}
    assert set(megatron_patches.PORTABLE_PATCHES) == portable_names
    assert list(megatron_patches.PATCHES) == megatron_patches.CPU_PATCHES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_patch_docstring_names_a_megatron_call_site_the_versions_and_an_existing_test(module):
    import megatron.core

    doc = importlib.import_module(module).__doc__ or ""
    site_packages = pathlib.Path(megatron.core.__file__).parents[2]  # .../megatron/core/__init__.py
    sites = re.findall(r"(megatron/core/[\w/]+\.py):(\d+)", doc)
    assert sites, f"{module}: no megatron/core/<file>.py:<line> call site in its docstring"
    for path, line in sites:
        source = site_packages / path
        assert source.is_file(), f"{module}: {path} is not in the installed megatron-core"
        assert int(line) <= len(source.read_text().splitlines()), f"{module}: {path}:{line} past the end"
    assert "TESTED_MEGATRON_VERSIONS" in doc, f"{module}: does not say which versions were checked"
    tests = re.findall(r"\btests/[\w/]+\.py\b", doc)
    assert tests, f"{module}: names no test file"
    for test in tests:
        assert (ROOT / test).is_file(), f"{module}: {test} does not exist"


def test_wrap_once_wraps_once_and_keeps_the_callers_frame():
    class Upstream:
        def f(self, x):
            return x + 1

    def plus_ten(original):
        def f(self, x):
            return original(self, x) + 10 + (100 if common.site(1).startswith(__file__) else 0)

        return f

    common.wrap_once(Upstream, "f", plus_ten)
    common.wrap_once(Upstream, "f", plus_ten)
    assert Upstream().f(1) == 112  # wrapped once; site(1) inside the wrapper is this test
    assert Upstream.f.__name__ == "f" and Upstream.f.__wrapped__.__qualname__.endswith("Upstream.f")
