"""lu2k.logs: one format end to end; with JSON every line on stderr is a JSON object, library
lines (aioquic, asyncio, warnings) included, in-process and from a real lu2kd pair over QUIC."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from lu2k import logs
from lu2k.localpair import daemons


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level, sys.excepthook
    yield
    structlog.reset_defaults()
    root.handlers[:], root.level = saved[0], saved[1]
    sys.excepthook = saved[2]
    logging.captureWarnings(False)


def _json_lines(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    return out


def test_every_line_is_json_structlog_stdlib_warnings_and_tracebacks(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("debug", json_output=True)
    structlog.get_logger("lu2k.test").info("from structlog", n=1)
    logging.getLogger("quic").info("[%s] from a library %d", "abcd", 7)
    logging.getLogger("asyncio").error("loop trouble")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library warning", DeprecationWarning, stacklevel=1)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("lu2k.shim").exception("failed")
        structlog.get_logger().exception("failed too")
    sys.excepthook(RuntimeError, RuntimeError("escaped"), None)
    records = _json_lines(capsys.readouterr().err)
    events = {r["event"] for r in records}
    assert {"from structlog", "[abcd] from a library 7", "loop trouble", "failed", "failed too", "uncaught exception"} <= events
    assert any("a library warning" in str(r["event"]) for r in records)
    quic = next(r for r in records if r["event"] == "[abcd] from a library 7")
    assert quic["logger"] == "quic" and quic["level"] == "info" and "timestamp" in quic
    assert any("exception" in r for r in records if r["event"] == "failed")


def test_plain_output_is_key_value(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info")
    structlog.get_logger().info("hello", peer="10.0.0.1@tcp")
    logging.getLogger("quic").debug("hidden below the level")
    err = capsys.readouterr().err
    assert "hello" in err and "peer=10.0.0.1@tcp" in err and "hidden" not in err


def test_bad_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        logs.configure("loud")


@pytest.mark.timeout(120)
def test_lu2kd_over_quic_logs_only_json(tmp_path: Path) -> None:
    pytest.importorskip("aioquic")
    from lu2k.cli.keys import cert_pem, key_pem, make_certificate, make_key

    key = make_key()
    cert = make_certificate(key, "site", sans=["127.0.0.1", "127.0.0.2"])
    (tmp_path / "s.crt").write_bytes(cert_pem(cert))
    (tmp_path / "s.key").write_bytes(key_pem(key))
    site = {"cert": str(tmp_path / "s.crt"), "key": str(tmp_path / "s.key"), "ca": str(tmp_path / "s.crt")}
    with daemons(["127.0.0.1@quic", "127.0.0.2@quic"], backend="quic", workdir=str(tmp_path),
                 extra_net={"options": site}, start=False) as (a, b):
        procs = []
        for d in (a, b):
            err = open(d.log_path, "wb")
            procs.append((subprocess.Popen([sys.executable, "-m", "lu2k.daemon", "--config", str(d.config_path), "--log-json",
                                            "--log-level", "debug"], stdout=err, stderr=err), err, d))
        try:
            for _, _, d in procs:
                deadline = time.monotonic() + 30
                while subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", d.control_path, "net", "show"],
                                     capture_output=True, timeout=30).returncode != 0:
                    assert time.monotonic() < deadline, d.log_path.read_text()
                    time.sleep(0.2)
            ping = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", a.control_path, "ping", b.nid, "--timeout", "20"],
                                  capture_output=True, text=True, timeout=60)
            assert ping.returncode == 0, ping.stderr
        finally:
            for p, err, _ in procs:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
                err.close()
        for _, _, d in procs:
            records = _json_lines(d.log_path.read_text())
            assert any(r.get("logger") == "quic" for r in records), "no aioquic line: the test proves nothing"
            assert any(r["event"] == "lu2kd running" for r in records)


def test_warnings_are_logged_after_an_earlier_capture_was_undone(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    # An earlier configure() whose showwarning hook was later put back by catch_warnings (as
    # pytest does around every test) must not leave warnings unlogged on the next configure().
    with warnings.catch_warnings():
        logs.configure("info", json_output=True)
    logs.configure("info", json_output=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("second capture", UserWarning, stacklevel=1)
    records = _json_lines(capsys.readouterr().err)
    assert any("second capture" in str(r["event"]) for r in records)
