"""The modules on the per-message path that ``setup.py`` compiles with mypyc, and the way back to
their pure sources.

The Python sources stay the reference: mypyc compiles the same files (type-annotated, checked
by mypy), and the compiled modules behave the same, only cheaper per call.  ``setup.py`` builds
them when mypyc is importable and ``LU2K_MYPYC`` is not ``0``, and records a SHA-256 of each
source it compiled (the generated ``lu2k/_compiled_from.py``).  :func:`install`, run when
``lu2k`` is imported, loads every one of these modules from its ``.py`` file instead -- all of
them, never a mix, since compiled modules call each other directly -- when

* ``LU2K_PURE=1`` is set (to run or test the reference), or
* a source no longer matches what was compiled (a checkout edited after its build), or
* there is no record of a compiled build (a left-over ``.so`` is never trusted).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any, TypeVar

_T = TypeVar("_T")

# What setup.py compiles (module names; their files are under lu2k/).  Only pure modules whose
# per-message work dominates a daemon's CPU: the message core, framing, sealing, credits,
# dedupe and the shim rings; and the congestion controllers, called for every QUIC packet
# sent and acknowledged.
COMPILED_MODULES = (
    "lu2k.core.node", "lu2k.core.fairq", "lu2k.core.states", "lu2k.core.rails", "lu2k.core.returnpath",
    "lu2k.wire", "lu2k.crypto", "lu2k.credits", "lu2k.dedupe", "lu2k.kernel_shim.ring", "lu2k.kernel_shim.ports",
    "lu2k.cc.base", "lu2k.cc.bbr", "lu2k.cc.rate",
)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
why_pure = ""  # set by install(): why the pure sources are loaded ("" when the compiled ones are)


def mypyc_attr(*attrs: str, **kwattrs: object) -> Any:
    """``mypy_extensions.mypyc_attr`` where that is not installed: the pure modules ignore it."""

    def keep(cls: _T) -> _T:
        return cls

    return keep


def source_path(module: str) -> str:
    """The ``.py`` file of one of :data:`COMPILED_MODULES`."""
    return os.path.join(_PACKAGE_DIR, *module.split(".")[1:]) + ".py"


def source_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class _PureSources(importlib.abc.MetaPathFinder):
    """Finds :data:`COMPILED_MODULES` as their ``.py`` files, ahead of any compiled ``.so``."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


def _reason_for_pure() -> str:
    if os.environ.get("LU2K_PURE") == "1":
        return "LU2K_PURE=1"
    try:
        from ._compiled_from import SOURCES  # type: ignore[import-not-found]  # written by setup.py
    except ImportError:
        return "not compiled"
    if set(SOURCES) != set(COMPILED_MODULES):
        return "compiled from another module list"
    for module, digest in SOURCES.items():
        try:
            if source_digest(source_path(module)) != digest:
                return f"{module} changed since it was compiled"
        except OSError:
            return f"{module}'s source is missing"
    return ""


def install() -> None:
    """Decide once, before any of the modules is imported, which version gets loaded."""
    global why_pure
    why_pure = _reason_for_pure()
    if why_pure and not any(isinstance(f, _PureSources) for f in sys.meta_path):
        sys.meta_path.insert(0, _PureSources())


def compiled() -> bool:
    """True if the compiled hot path is what this process runs."""
    from . import wire

    return not (wire.__file__ or "").endswith(".py")
