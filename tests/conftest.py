"""Fixtures shared across test modules."""

from __future__ import annotations

import asyncio
import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import IO, Any

import hangs
import pytest
import pytest_timeout

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
# that swallows its exception (an asyncio callback logs it and carries on; a ``finally`` that
# hangs in turn).  Past its timeout plus this grace, faulthandler's watchdog -- a C thread,
# needing neither the GIL nor the main thread -- writes every thread's stack and ends the
# process.  Under pytest-xdist the controller then reports "worker crashed while running <test>"
# and carries on with a new worker, so one hung test costs minutes and names itself instead of
# holding the whole run.
#
# Where the stacks go: each test process keeps a file in the run's hang directory (tests/hangs.py)
# naming the test it is running, and the watchdog writes into it.  The directory is
# LU2K_TEST_HANG_DIR (contrib/run-tests.sh sets it) or, under pytest-xdist, a fresh temporary
# one.  A process that ends normally removes its file; the controller's summary reports the
# files left.  Two more uses of them:
# - ``--dist loadgroup`` puts a crashed worker's unfinished group back in the queue, the hung
#   test included, so a new worker would run it again and hang again; a test that hung once in
#   this run fails at once instead.
# - contrib/run-tests.sh sends SIGUSR1 to every test process still running when its own limit
#   strikes; the stacks that writes name what was running.
# A run without pytest-xdist and without LU2K_TEST_HANG_DIR writes the stacks to stderr.
HANG_GRACE = float(os.environ.get("LU2K_TEST_HANG_GRACE", "120"))
_stack_out: IO[str] | None = None
_hang_dir: Path | None = None
_hang_file: Path | None = None
_temporary_hang_dir = False


def pytest_configure(config: pytest.Config) -> None:
    global _stack_out, _hang_dir, _hang_file, _temporary_hang_dir
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    xdist_controller = bool(config.getoption("numprocesses", None)) and worker is None
    if xdist_controller and not os.environ.get("LU2K_TEST_HANG_DIR"):
        os.environ["LU2K_TEST_HANG_DIR"] = tempfile.mkdtemp(prefix="lu2k-test-hangs-")  # the workers inherit it
        _temporary_hang_dir = True
    if os.environ.get("LU2K_TEST_HANG_DIR"):
        _hang_dir = Path(os.environ["LU2K_TEST_HANG_DIR"])
        try:
            _hang_dir.mkdir(parents=True, exist_ok=True)
            if not xdist_controller:
                _hang_file = _hang_dir / f"{worker or 'main'}-{os.getpid()}.txt"
                _stack_out = open(_hang_file, "w")  # noqa: SIM115 -- held for the process's life
        except OSError:  # not writable here (a guest's read-only view of the checkout): stderr
            _hang_dir = _hang_file = None
    if _stack_out is not None:
        faulthandler.register(signal.SIGUSR1, file=_stack_out, all_threads=True)
    elif not xdist_controller:
        _stack_out = os.fdopen(os.dup(2), "w")  # the stderr the run started with, not a capture


def pytest_unconfigure(config: pytest.Config) -> None:
    if _hang_file is not None:
        faulthandler.unregister(signal.SIGUSR1)  # before its file is closed (and the fd reused)
    if _stack_out is not None:
        _stack_out.close()
    if _hang_file is not None:
        _hang_file.unlink(missing_ok=True)
    if _temporary_hang_dir and _hang_dir is not None and not hangs.left_behind(_hang_dir):
        shutil.rmtree(_hang_dir, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _hang_dir is not None and _hang_file is None:  # the xdist controller
        lines = hangs.report_all(_hang_dir)
        if lines:
            terminalreporter.section("tests that hung")
            for line in lines:
                terminalreporter.write_line(line)


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
    if _hang_file is not None and _stack_out is not None:
        _stack_out.seek(0)
        _stack_out.truncate()
        _stack_out.write(hangs.header(item.nodeid, f"{time.strftime('%H:%M:%S')}, timeout {timeout:g} s + {HANG_GRACE:g} s"))
        _stack_out.flush()
    if timeout > 0 and _stack_out is not None:
        faulthandler.dump_traceback_later(timeout + HANG_GRACE, exit=True, file=_stack_out)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# pytest-timeout's signal handler raises in whatever code runs when the alarm comes.  With an
# event loop running, that is most often a callback (a protocol's datagram_received, a timer) or
# a background task; asyncio logs the exception there and carries on, and the test goes on
# waiting -- until the hang guard above.  So with a loop running in the main thread the alarm
# stops that loop instead: run_until_complete then raises and the test fails at its limit, with
# a report that says so.  Without a running loop pytest-timeout's own handler runs.
_TIMED_OUT_IN_LOOP = pytest.StashKey[float]()
_ALARM_PHASE = pytest.StashKey[str]()
REARM_S = 30.0  # longer than the clean-up after a stopped loop takes, as a rule


def _current_phase() -> str:
    """setup, call or teardown: pytest keeps it in PYTEST_CURRENT_TEST ("<nodeid> (call)")."""
    return os.environ.get("PYTEST_CURRENT_TEST", "").rpartition("(")[2].rstrip(")")


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None

    def on_alarm(signum: int, frame: Any) -> None:
        phase = _current_phase()
        earlier = item.stash.get(_ALARM_PHASE, None)
        if earlier is not None and earlier != phase:
            return  # the phase that timed out has ended; its clean-up runs undisturbed
        item.stash[_ALARM_PHASE] = phase
        loop = asyncio.events._get_running_loop()
        if loop is None or earlier is not None:
            __tracebackhide__ = True
            pytest_timeout.timeout_sigalrm(item, settings)
            return
        item.stash[_TIMED_OUT_IN_LOOP] = settings.timeout
        loop.call_soon_threadsafe(loop.stop)
        # A loop whose work ends in this very step returns normally all the same (a short
        # asyncio.run inside a synchronous test).  If the same phase still runs a while later,
        # pytest-timeout's own exception is raised once, as it would have been.
        signal.setitimer(signal.ITIMER_REAL, REARM_S)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # what pytest-timeout's cancel hook calls
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    timeout = item.stash.get(_TIMED_OUT_IN_LOOP, None)
    if timeout is not None and report.failed and call.when == "call":
        report.longrepr = (f"Timeout >{timeout:g}s: pytest-timeout stopped the test's event loop "
                           f"(what the test was waiting for had not come)\n\n{report.longrepr}")
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    earlier = hangs.hung_before(_hang_dir, item.nodeid) if _hang_dir is not None else None
    if earlier is not None:
        pytest.fail(f"not run again: this test hung earlier in this run (its stacks: {earlier})", pytrace=False)


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
