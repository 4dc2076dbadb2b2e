"""Plain-text tables for the CLIs: :func:`lu2k.table.render`."""

from __future__ import annotations

from ..table import render

__all__ = ["render"]
