"""The services lu2kd runs from its config (``lu2k: serve:`` and ``lu2k: forward:``): parsing
with errors that say where, and a real daemon pair whose services take a file and a
forwarded connection without anything started by hand at the receiving site."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from lu2k.apps.services import parse_services
from lu2k.localpair import daemon_config, daemons

pytestmark = pytest.mark.timeout(180)
LU2K = [sys.executable, "-m", "lu2k.cli.main"]


def attached_portals(control_path: str) -> list[int]:
    out = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", control_path, "--json", "endpoint", "show"],
                         capture_output=True, text=True, timeout=30)
    return [e["portal"] for e in json.loads(out.stdout)] if out.returncode == 0 else []


def test_parse_services(tmp_path: Path) -> None:
    errors: list[str] = []
    specs = parse_services({"serve": {"dir": str(tmp_path), "allow_from": ["10.0.0.1@tcp"], "portal": 7},
                            "forward": {"allow": ["10.0.0.5:22", "10.1.0.0/16:*"], "window": "4m"}}, errors)
    assert errors == []
    assert specs[0].argv == ("recv", "--serve", str(tmp_path), "--allow-from", "10.0.0.1@tcp", "--portal", "7")
    assert specs[1].argv == ("forward", "--serve", "--allow", "10.0.0.5:22", "--allow", "10.1.0.0/16:*", "--window", "4m")


def test_parse_services_errors_say_where(tmp_path: Path) -> None:
    errors: list[str] = []
    parse_services({"serve": {"dir": str(tmp_path / "missing"), "allow_from": ["not a nid"], "portal": -1, "mode": 1},
                    "forward": {"allow": ["nohost"]}}, errors)
    text = "\n".join(errors)
    for where in ("lu2k.serve.dir", "lu2k.serve.allow_from[0]", "lu2k.serve.portal", "lu2k.serve: unknown key(s) mode",
                  "lu2k.forward.allow[0]"):
        assert where in text, text
    errors = []
    parse_services({"forward": {}}, errors)
    assert "lu2k.forward.allow: a list of HOST:PORTS targets is required" in errors[0]


def test_lu2kd_check_rejects_a_bad_service_section(tmp_path: Path) -> None:
    cfg = daemon_config("127.0.0.1@tcp", 1, tmp_path)
    cfg["lu2k"]["serve"] = {"dir": str(tmp_path / "nowhere")}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "lu2k.daemon", "--config", str(path), "--check"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "lu2k.serve.dir" in r.stderr and "nowhere does not exist" in r.stderr


def test_services_from_the_daemon_config(tmp_path: Path) -> None:
    dst = tmp_path / "incoming"
    dst.mkdir()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def upper_until_eof() -> None:
        conn, _ = server.accept()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(data.upper())
        conn.close()

    t = threading.Thread(target=upper_until_eof, daemon=True)
    t.start()
    f = tmp_path / "report.txt"
    f.write_bytes(os.urandom(500_000))
    extra = {"lu2k": {"serve": {"dir": str(dst)}, "forward": {"allow": [f"127.0.0.1:{port}"]}}}
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"], extra=extra) as (a, b):
        deadline = time.monotonic() + 60
        while {0, 2} - set(attached_portals(b.control_path)):  # the services attach after the daemon is up
            assert time.monotonic() < deadline, b.log_tail()
            time.sleep(0.1)
        r = subprocess.run([*LU2K, "send", "--socket", a.shim_path, "--retry-for", "30", b.nid, str(f)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr + b.log_tail()
        cli = subprocess.Popen([*LU2K, "forward", "--socket", a.shim_path, "--to", b.nid, "--listen", "127.0.0.1:0",
                                "--target", f"127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True)
        assert cli.stderr is not None
        m = re.search(r":(\d+) ->", cli.stderr.readline())
        assert m
        c = socket.create_connection(("127.0.0.1", int(m.group(1))))
        c.settimeout(60)
        c.sendall(b"hello over lu2k")
        c.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := c.recv(100):
            reply += chunk
        c.close()
        cli.send_signal(signal.SIGTERM)
        cli.communicate(timeout=30)
        log = b.log_tail(200)
    server.close()
    assert (dst / "report.txt").read_bytes() == f.read_bytes()
    assert reply == b"HELLO OVER LU2K"
    assert "received report.txt" in log and "serving on portal 2" in log
