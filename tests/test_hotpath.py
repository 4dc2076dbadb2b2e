"""lu2k.hotpath: which version of the hot-path modules a process loads."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from lu2k import hotpath


def _record(sources: dict[str, str]) -> types.ModuleType:
    module = types.ModuleType("lu2k._compiled_from")
    module.SOURCES = sources  # type: ignore[attr-defined]
    return module


def test_every_compiled_module_has_its_source() -> None:
    for module in hotpath.COMPILED_MODULES:
        assert os.path.isfile(hotpath.source_path(module)), module


def test_a_matching_record_selects_the_compiled_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LU2K_PURE", raising=False)
    sources = {m: hotpath.source_digest(hotpath.source_path(m)) for m in hotpath.COMPILED_MODULES}
    monkeypatch.setitem(sys.modules, "lu2k._compiled_from", _record(sources))
    assert hotpath._reason_for_pure() == ""


def test_a_source_edited_after_the_build_selects_the_pure_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LU2K_PURE", raising=False)
    sources = {m: hotpath.source_digest(hotpath.source_path(m)) for m in hotpath.COMPILED_MODULES}
    sources["lu2k.wire"] = "0" * 64
    monkeypatch.setitem(sys.modules, "lu2k._compiled_from", _record(sources))
    assert hotpath._reason_for_pure() == "lu2k.wire changed since it was compiled"


def test_a_record_of_another_module_list_selects_the_pure_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LU2K_PURE", raising=False)
    sources = {m: hotpath.source_digest(hotpath.source_path(m)) for m in hotpath.COMPILED_MODULES[1:]}
    monkeypatch.setitem(sys.modules, "lu2k._compiled_from", _record(sources))
    assert hotpath._reason_for_pure() == "compiled from another module list"


def test_lu2k_pure_wins_over_a_valid_record(monkeypatch: pytest.MonkeyPatch) -> None:
    sources = {m: hotpath.source_digest(hotpath.source_path(m)) for m in hotpath.COMPILED_MODULES}
    monkeypatch.setitem(sys.modules, "lu2k._compiled_from", _record(sources))
    monkeypatch.setenv("LU2K_PURE", "1")
    assert hotpath._reason_for_pure() == "LU2K_PURE=1"


def test_a_pure_process_loads_every_module_from_its_source() -> None:
    names = ", ".join(hotpath.COMPILED_MODULES)
    code = f"import importlib, lu2k.hotpath as h; print(h.why_pure); print(*(importlib.import_module(m).__file__ for m in '{names}'.split(', ')))"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, LU2K_PURE="1"), capture_output=True, text=True, check=True).stdout
    why, files = out.splitlines()
    assert why == "LU2K_PURE=1"
    assert files.split() == [hotpath.source_path(m) for m in hotpath.COMPILED_MODULES]
