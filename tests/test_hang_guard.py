"""The suite's hang guard (tests/conftest.py): a test stuck where pytest-timeout cannot reach it
is ended, with its stack, and the run goes on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

STUCK = '''
import ctypes
import signal

import pytest


@pytest.mark.timeout(1)
def test_stuck_in_c_with_the_gil_held() -> None:
    # SIGALRM blocked and the GIL held: pytest-timeout's signal can never be handled.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    ctypes.PyDLL(None).sleep(60)


def test_after() -> None:
    pass
'''


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [[], ["-n", "1"]], ids=["alone", "xdist"])
def test_a_test_stuck_in_c_is_ended_with_its_stack_and_the_run_goes_on(tmp_path: Path, workers: list[str]) -> None:
    (tmp_path / "test_stuck.py").write_text(STUCK)
    env = dict(os.environ, LU2K_TEST_HANG_GRACE="2", PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", *workers,
                          "--rootdir", str(tmp_path), str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    # faulthandler's report: the watchdog fired, and the stuck test is on the stack it printed.
    assert "Timeout (0:00:03)!" in out and 'test_stuck.py", line 12 in test_stuck_in_c_with_the_gil_held' in out, out
    if workers:
        assert "crashed while running" in out and "1 passed" in out, out  # the run went on to test_after
