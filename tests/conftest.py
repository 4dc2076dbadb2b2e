"""Fixtures shared across test modules."""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from lu2k import hotpath


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n``, ``--dist loadgroup``) the tests that run emulated links in
    network namespaces go to one worker, one after another: each runs a link forwarder and
    daemons whose pacing needs the CPU, and two such tests at once on a small machine would
    measure each other.  The other tests spread over the workers beside them."""
    for item in items:
        if item.get_closest_marker("netns"):
            item.add_marker(pytest.mark.xdist_group("netns"))


# pytest-timeout (signal method) cannot end a test whose main thread is stuck in C code, or one
# that swallows its exception (a callback, a ``finally`` that hangs in turn).  Past its timeout
# plus this grace, faulthandler's watchdog -- a C thread, needing neither the GIL nor the main
# thread -- prints every thread's stack and ends the process.  Under pytest-xdist the controller
# then reports "worker crashed while running <test>" and carries on with a new worker, so one
# hung test costs minutes and names itself instead of holding the whole run.
HANG_GRACE = float(os.environ.get("LU2K_TEST_HANG_GRACE", "120"))
_stack_out: IO[str] | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _stack_out
    _stack_out = os.fdopen(os.dup(2), "w")  # the stderr the run started with, not a capture


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    value = None
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout")
    # The order pytest-timeout reads them in; an explicit 0 (``--timeout=0``) means no limit.
    for source in (lambda: item.config.getvalue("timeout"), lambda: os.environ.get("PYTEST_TIMEOUT"),
                   lambda: item.config.getini("timeout")):
        if value is None or value == "":
            value = source()
    return float(value or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    timeout = _timeout_of(item)
    if timeout > 0 and _stack_out is not None:
        faulthandler.dump_traceback_later(timeout + HANG_GRACE, exit=True, file=_stack_out)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


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


@pytest.fixture
def in_pure_child(request: pytest.FixtureRequest) -> bool:
    """For a test that monkeypatches a module or class of the hot path (``lu2k.hotpath``).

    Compiled code calls its functions and methods directly, so a patch would change nothing it
    sees.  With the compiled modules loaded, this runs the same test in a child pytest on the
    pure sources (``LU2K_PURE=1``), fails if that fails, and returns True: the test then returns
    at once.  Otherwise it returns False and the test runs here.
    """
    if not hotpath.compiled():
        return False
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                           cwd=request.config.rootpath, env=dict(os.environ, LU2K_PURE="1"), capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, f"{request.node.nodeid} on the pure modules:\n{child.stdout[-4000:]}{child.stderr[-2000:]}"
    return True
