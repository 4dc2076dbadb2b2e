"""lu2k.sdnotify and lu2kd under a service manager: READY=1 once serving, WATCHDOG=1 from the
event loop, STOPPING=1 on SIGTERM — over a real AF_UNIX datagram socket, as systemd listens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lu2k.localpair import daemon_config, free_port
from lu2k.sdnotify import SystemdNotifier, watchdog_interval


def test_from_environment() -> None:
    assert SystemdNotifier.from_environment({}) is None
    assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": ""}) is None
    assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    n = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "@lu2k-test"})
    assert n is not None and n.address == "\0lu2k-test"
    n.close()


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None


def test_notify_over_a_real_socket_path_and_abstract_name(tmp_path: Path) -> None:
    for address in (str(tmp_path / "notify"), f"@lu2k-op-test-{os.getpid()}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
            srv.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
            n = SystemdNotifier.from_environment({"NOTIFY_SOCKET": address})
            assert n is not None
            assert n.notify("READY=1\nSTATUS=serving")
            assert srv.recv(4096) == b"READY=1\nSTATUS=serving"
            n.close()


def test_a_missing_socket_loses_the_notification_without_raising(tmp_path: Path) -> None:
    n = SystemdNotifier(str(tmp_path / "nobody"))
    assert n.notify("WATCHDOG=1") is False and n.lost == 1
    n.close()


@pytest.mark.timeout(120)
def test_lu2kd_ready_watchdog_stopping(tmp_path: Path) -> None:
    cfg = daemon_config("127.0.0.1@tcp", free_port(), tmp_path)
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(cfg))
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(notify))
        srv.settimeout(60)  # a bound on a broken daemon, not a timing assertion
        env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "100000"}
        log = open(tmp_path / "d.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "lu2k.daemon", "--config", str(tmp_path / "d.yaml")], env=env, stdout=log, stderr=log)
        try:
            first = srv.recv(4096).decode()
            assert first.startswith("READY=1\n") and "STATUS=serving 127.0.0.1@tcp" in first and f"MAINPID={p.pid}" in first
            # READY means serving: the control socket answers now, without any wait
            ok = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", cfg["lu2k"]["control"]["path"], "net", "show"],
                                capture_output=True, timeout=60)
            assert ok.returncode == 0, ok.stderr
            pets = 0
            while pets < 3:
                assert srv.recv(4096) == b"WATCHDOG=1"
                pets += 1
            p.send_signal(signal.SIGTERM)
            while (msg := srv.recv(4096)) == b"WATCHDOG=1":
                pass
            assert msg == b"STOPPING=1"
            assert p.wait(30) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()

