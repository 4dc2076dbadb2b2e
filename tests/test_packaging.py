"""The installed package must contain every module: pytest runs from the checkout, which
would hide a directory that setuptools does not see as a package."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_directory_is_a_package() -> None:
    found = set(find_packages(str(ROOT), include=["lu2k", "lu2k.*"]))
    dirs = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "lu2k").rglob("*.py")}
    assert dirs <= found, f"not packaged (missing __init__.py): {sorted(dirs - found)}"


def test_console_scripts_point_at_real_functions() -> None:
    import importlib

    text = (ROOT / "setup.cfg").read_text()
    scripts = text.split("console_scripts =", 1)[1].split("\n\n", 1)[0].split("\n")
    entries = [line.split("=", 1)[1].strip() for line in scripts if "=" in line]
    assert len(entries) == 3
    for entry in entries:
        module, _, func = entry.partition(":")
        assert callable(getattr(importlib.import_module(module), func))
