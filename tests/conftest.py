"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def lab_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own lab state directory: a developer's labs in /run/lu2k-lab are never touched."""
    monkeypatch.setenv("LU2K_LAB_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def daemons_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory for lab daemons' configs, sockets and logs, with the lab's state kept apart
    in a subdirectory of it (so a test can read the daemons' files without lab clutter)."""
    monkeypatch.setenv("LU2K_LAB_DIR", str(tmp_path / "labs"))
    return tmp_path
