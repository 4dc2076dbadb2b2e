"""The suite's hang guard (tests/conftest.py, tests/hangs.py): a test stuck where pytest-timeout
cannot reach it is ended, with its stack, the run goes on without running it again, and the end
of the run names it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]), **extra)
    # The outer run's, when contrib/run-tests.sh or pytest-xdist runs this test.
    for outer in ("LU2K_TEST_HANG_DIR", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        if outer not in extra:
            env.pop(outer, None)
    return env


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [[], ["-n", "1"]], ids=["alone", "xdist"])
def test_a_test_stuck_in_c_is_ended_with_its_stack_and_the_run_goes_on(tmp_path: Path, workers: list[str]) -> None:
    (tmp_path / "test_stuck.py").write_text(STUCK)
    # Under xdist the stacks go to a temporary hang directory and come back in the summary.
    env = _child_env(LU2K_TEST_HANG_GRACE="2", TMPDIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", *workers,
                          "--rootdir", str(tmp_path), str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    # faulthandler's report: the watchdog fired, and the stuck test is on the stack it printed.
    assert "Timeout (0:00:03)!" in out and 'test_stuck.py", line 12 in test_stuck_in_c_with_the_gil_held' in out, out
    if workers:
        assert "crashed while running" in out and "1 passed" in out, out  # the run went on to test_after
        assert "tests that hung" in out and "hung: test_stuck.py::test_stuck_in_c_with_the_gil_held" in out, out


STUCK_IN_A_GROUP = STUCK.replace("@pytest.mark.timeout(1)\n", "@pytest.mark.timeout(1)\n@pytest.mark.xdist_group('g')\n").replace(
    "def test_after", "@pytest.mark.xdist_group('g')\ndef test_after")


def _print_hangs(hang_dir: Path) -> str:
    run = subprocess.run([sys.executable, str(HERE / "hangs.py"), str(hang_dir)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.timeout(120)
def test_a_hung_test_is_not_run_again_and_is_named_with_its_stack_at_the_end(tmp_path: Path) -> None:
    # ``--dist loadgroup`` gives a crashed worker's unfinished group, the hung test included, to
    # the next worker: without the guard's record the test would hang once per worker.
    (tmp_path / "test_stuck.py").write_text(STUCK_IN_A_GROUP)
    hang_dir = tmp_path / "hangs"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                          "-n", "2", "--dist", "loadgroup", "--rootdir", str(tmp_path), str(tmp_path)],
                         cwd=tmp_path, env=_child_env(LU2K_TEST_HANG_GRACE="2", LU2K_TEST_HANG_DIR=str(hang_dir)),
                         capture_output=True, text=True, timeout=100)
    out = run.stdout + run.stderr
    # One worker crashed: the test is named in the failure and in the summary, but ran only once.
    assert out.count("node down:") == 1 and "1 passed" in out, out
    assert "not run again: this test hung earlier in this run" in out, out
    left = list(hang_dir.glob("*.txt"))  # the workers that ended normally removed their files
    assert len(left) == 1 and left[0].name.startswith("gw"), left
    report = _print_hangs(hang_dir)
    assert "hung: test_stuck.py::test_stuck_in_c_with_the_gil_held" in report, report
    assert 'test_stuck.py", line 13 in test_stuck_in_c_with_the_gil_held' in report, report
    assert "/_pytest/" not in report and "/pluggy/" not in report, report  # the frames every test shares are left out


WAITING_WHILE_CALLBACKS_RUN = '''
import asyncio
import time

import pytest


@pytest.mark.asyncio
@pytest.mark.timeout(1)
async def test_waits_forever_while_callbacks_run() -> None:
    loop = asyncio.get_running_loop()

    def busy() -> None:
        time.sleep(0.2)  # where the alarm comes, nearly always: inside a callback
        loop.call_soon(busy)

    loop.call_soon(busy)
    await loop.create_future()


@pytest.mark.timeout(1)
def test_short_event_loops_one_after_another() -> None:
    async def step() -> None:
        time.sleep(0.05)  # the loop's work ends in the step the alarm comes in: stopping it is lost

    while True:
        asyncio.run(step())


def test_after() -> None:
    pass
'''


@pytest.mark.timeout(120)
def test_a_test_waiting_in_an_event_loop_fails_at_its_limit(tmp_path: Path) -> None:
    # pytest-timeout's exception raised inside a callback would be logged by asyncio and the
    # test would wait on, for the hang guard; the suite's timer stops the loop instead.
    (tmp_path / "test_waiting.py").write_text(WAITING_WHILE_CALLBACKS_RUN)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                          "--rootdir", str(tmp_path), str(tmp_path)],
                         cwd=tmp_path, env=_child_env(LU2K_TEST_HANG_GRACE="60"), capture_output=True, text=True, timeout=110)
    out = run.stdout + run.stderr
    assert "Timeout >1s: pytest-timeout stopped the test's event loop" in out, out
    assert "Failed: Timeout" in out, out  # the short loops: pytest-timeout's own exception, after the stop was lost
    assert "2 failed, 1 passed" in out and "Timeout (0:" not in out, out  # failed at the limit, not by the hang guard


SLOW = '''
import time


def test_fast() -> None:
    pass


def test_slow_to_be_stopped() -> None:
    time.sleep(60)
'''


@pytest.mark.timeout(120)
def test_a_test_stopped_by_the_run_limit_is_named_with_its_stack(tmp_path: Path) -> None:
    (tmp_path / "test_slow.py").write_text(SLOW)
    hang_dir = tmp_path / "hangs"
    child = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                              "--rootdir", str(tmp_path), str(tmp_path)],
                             cwd=tmp_path, env=_child_env(LU2K_TEST_HANG_DIR=str(hang_dir)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            files = list(hang_dir.glob("main-*.txt"))
            if files and "test_slow_to_be_stopped" in files[0].read_text():
                break
            time.sleep(0.1)
        else:
            pytest.fail("the slow test never started")
        # What contrib/run-tests.sh does at its limit: SIGUSR1 to the process named by the file, then stop it.
        os.kill(int(files[0].stem.rsplit("-", 1)[1]), signal.SIGUSR1)
        time.sleep(1)
    finally:
        child.kill()
        child.wait(timeout=30)
    report = _print_hangs(hang_dir)
    assert "stopped while running: test_slow.py::test_slow_to_be_stopped" in report, report
    assert 'test_slow.py", line 10 in test_slow_to_be_stopped' in report, report


def test_the_report_says_nothing_when_every_process_ended_normally(tmp_path: Path) -> None:
    assert _print_hangs(tmp_path) == ""
