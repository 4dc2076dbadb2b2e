"""lu2kctl (lu2k.cli.ctl): lnetctl's spellings and YAML against real daemons, bad input without
tracebacks or hangs, and export/import keeping the running key.

Two lu2kd are started in-process on loopback (TCP backend); lu2kctl's ``main()`` runs in a
thread against their control sockets, exactly as the command line does.
"""

from __future__ import annotations

import argparse

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lu2k.cli import ctl
from lu2k.daemon import Daemon
from lu2k.localpair import free_port
from lu2k.settings import load_config

KEY = "ctl-test-key-0123456789abcdef"

# lnetctl's keys (lnet/utils/lnetconfig/liblnetconfig.c: lustre_lnet_show_net, _peer, _route,
# _stats, infra_ping_nid) at every level; lu2kctl may add only a "lu2k" key beside them.
LNETCTL_NI_KEYS = {"nid", "status", "interfaces", "statistics", "sent_stats", "received_stats", "dropped_stats",
                   "health stats", "tunables", "lnd tunables", "dev cpt", "CPT", "udsp info"}
LNETCTL_PEER_NI_KEYS = {"nid", "udsp info", "state", "max_ni_tx_credits", "available_tx_credits", "min_tx_credits",
                        "tx_q_num_of_buf", "available_rtr_credits", "min_rtr_credits", "refcount", "statistics",
                        "sent_stats", "received_stats", "dropped_stats", "health stats"}
LNETCTL_STATS_KEYS = {"msgs_alloc", "msgs_max", "rst_alloc", "errors", "send_count", "resend_count", "response_timeout_count",
                      "local_interrupt_count", "local_dropped_count", "local_aborted_count", "local_no_route_count",
                      "local_timeout_count", "local_error_count", "remote_dropped_count", "remote_error_count",
                      "remote_timeout_count", "network_timeout_count", "failed_resends", "successful_resends", "recv_count",
                      "route_count", "drop_count", "send_length", "recv_length", "route_length", "drop_length"}


def _doc(tmp_path: Path, name: str, nid: str, port: int, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "net": [{"net type": "tcp", "local NI(s)": [{"nid": nid, "tunables": {"peer_credits": 8, "credits": 64}}],
                 "lu2k": {"backend": "tcp", "port": port, "key": KEY}}],
        "global": {"transaction_timeout": 5, "connect_timeout": 1},
        "lu2k": {"shim": {"path": str(tmp_path / f"{name}.shim")}, "control": {"path": str(tmp_path / f"{name}.ctl")}},
    }
    doc.update(extra)
    return doc


@pytest.fixture
async def pair(tmp_path: Path):  # type: ignore[no-untyped-def]
    import logging

    import structlog

    from lu2k import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("error")  # the daemons run in this process: keep their log lines off lu2kctl's stdout
    port = free_port()
    ds = []
    # a routes net tcp9 through b, which has no such net: a ping to tcp9 reaches only the gateway
    docs = [_doc(tmp_path, "a", "127.0.0.1@tcp", port, route=[{"net": "tcp9", "gateway": "127.0.0.2@tcp"}]),
            _doc(tmp_path, "b", "127.0.0.2@tcp", port)]
    for i, doc in enumerate(docs):
        path = tmp_path / f"d{i}.yaml"
        path.write_text(yaml.safe_dump(doc))
        d = Daemon(load_config(str(path)))
        await d.start()
        ds.append(d)
    yield ds
    for d in ds:
        await d.stop()
    structlog.reset_defaults()
    root.handlers[:], root.level = saved[0], saved[1]
    logging.captureWarnings(False)


async def run(d: Daemon | None, *argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    sock = ["--socket", d.config.control_path] if d is not None else []
    try:
        rc = await asyncio.to_thread(ctl.main, sock + list(argv))
    except SystemExit as e:  # argparse usage errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


# --- pure parts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e308", "0", "-1", "3600.5", "abc", ""])
def test_bad_timeouts_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"timeout {text!r}"):
        ctl.timeout_seconds(text)


def test_good_timeouts() -> None:
    assert ctl.timeout_seconds("0.25") == 0.25 and ctl.timeout_seconds("3600") == 3600


# --- against daemons ------------------------------------------------------------------------------------


async def test_net_show_is_lnetctls_structure(pair: list[Daemon], capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = pair
    rc, out, err = await run(a, "net", "show", capsys=capsys)
    assert rc == 0, err
    # exactly what `lnetctl net show` prints on a host with one tcp NI configured by NID
    assert yaml.safe_load(out) == {"net": [{"net type": "lo", "local NI(s)": [{"nid": "0@lo", "status": "up"}]},
                                           {"net type": "tcp", "local NI(s)": [{"nid": "127.0.0.1@tcp", "status": "up"}]}]}
    for level in ("", "1", "2", "3", "4"):
        rc, out, err = await run(a, "net", "show", "--net", "tcp0", "-v", *([level] if level else []), capsys=capsys)
        assert rc == 0, err
        [net] = yaml.safe_load(out)["net"]
        [ni] = net["local NI(s)"]
        assert set(ni) - {"lu2k"} <= LNETCTL_NI_KEYS
        assert ni["tunables"] == {"peer_timeout": 180, "peer_credits": 8, "peer_buffer_credits": 0, "credits": 64}
        assert set(ni["statistics"]) <= {"send_count", "recv_count", "drop_count"}


async def test_json_anywhere_on_the_line(pair: list[Daemon], capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = pair
    outs = []
    for argv in (["--json", "net", "show"], ["net", "--json", "show"], ["net", "show", "--json"]):
        rc, out, err = await run(a, *argv, capsys=capsys)
        assert rc == 0, err
        outs.append(json.loads(out))
    assert outs[0] == outs[1] == outs[2] and outs[0][0]["nid"] == "127.0.0.1@tcp"


async def test_ping_discover_peer_and_stats_show(pair: list[Daemon], capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = pair
    rc, out, err = await run(a, "ping", "127.0.0.2@tcp", "--timeout", "5", capsys=capsys)
    assert rc == 0, err
    [item] = yaml.safe_load(out)["ping"]
    assert item["primary nid"] == "127.0.0.2@tcp" and item["peer ni"] == [{"nid": "127.0.0.2@tcp"}] and 0 < item["lu2k"]["rtt_ms"] < 5000
    rc, out, err = await run(a, "discover", "127.0.0.2@tcp", capsys=capsys)
    assert rc == 0, err
    assert yaml.safe_load(out)["discover"][0]["primary nid"] == "127.0.0.2@tcp"
    rc, out, err = await run(a, "peer", "show", "--nid", "127.0.0.2@tcp", "-v", "3", capsys=capsys)
    assert rc == 0, err
    [peer] = yaml.safe_load(out)["peer"]
    assert peer["primary nid"] == "127.0.0.2@tcp" and peer["Multi-Rail"] is False and peer["peer state"] == 1
    [pni] = peer["peer ni"]
    assert set(pni) - {"lu2k"} <= LNETCTL_PEER_NI_KEYS and pni["state"] == "up" and pni["max_ni_tx_credits"] == 8
    rc, out, err = await run(a, "stats", "show", capsys=capsys)
    stats = yaml.safe_load(out)["statistics"]
    assert rc == 0 and set(stats) - {"lu2k"} <= LNETCTL_STATS_KEYS and stats["send_count"] == 0  # pings and discovery are not counted as messages
    rc, out, err = await run(a, "route", "show", "-v", capsys=capsys)
    assert rc == 0 and yaml.safe_load(out)["route"] == [
        {"net": "tcp9", "gateway": "127.0.0.2@tcp", "hop": -1, "priority": 0, "state": "up", "type": "single-hop", "lu2k": {"health": 1000}}]
    rc, out, err = await run(a, "route", "show", "--net", "tcp9", "--gateway", "127.0.0.2@tcp0", capsys=capsys)
    assert rc == 0 and yaml.safe_load(out) == {"route": [{"net": "tcp9", "gateway": "127.0.0.2@tcp"}]}
    rc, out, err = await run(a, "global", "show", capsys=capsys)
    assert rc == 0 and yaml.safe_load(out)["global"]["transaction_timeout"] == 5
    rc, out, err = await run(a, "route", "show", "--net", "tcp8", capsys=capsys)
    assert rc == 0 and yaml.safe_load(out) == {"route": []}


async def test_a_routed_ping_does_not_report_the_gateways_answer(pair: list[Daemon], capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = pair
    rc, out, err = await run(a, "ping", "10.9.9.9@tcp9", "--timeout", "5", capsys=capsys)
    assert rc == 1 and out == ""
    # The ping goes end to end; the gateway is no router, so the far end never answers.
    assert "no answer from 10.9.9.9@tcp9" in err and "not a router" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["ping", "127.0.0.2@tcp", "--timeout", "nan"], "finite"),
    (["ping", "127.0.0.2@tcp", "--timeout", "1e308"], "at most 3600"),
    (["ping", "127.0.0.2@tcp", "--timeout", "inf"], "finite"),
    (["discover", "127.0.0.2@tcp", "--timeout", "-1"], "above 0"),
    (["ping", "not a nid"], "lu2kctl"),
    (["ping", ","], "no NID"),
    (["net", "show", "--net", "nonet!"], "lu2kctl"),
    (["net", "show", "-v", "9"], "level"),
    (["export", "/"], "it is a directory"),
    (["export", "/nonexistent-dir/x.yaml"], "no directory"),
    (["import", "/"], "cannot read /"),
    (["set", "transaction_timeout", "nan"], "lu2kctl"),
    (["bogus"], "invalid choice"),
    (["net"], "usage"),
])
async def test_bad_input_is_an_error_never_a_traceback(pair: list[Daemon], capsys: pytest.CaptureFixture[str], argv: list[str],
                                                       message: str) -> None:
    rc, out, err = await run(pair[0], *argv, capsys=capsys)
    assert rc in (1, 2) and message in err and "Traceback" not in err


async def test_daemon_refuses_a_nan_timeout_from_any_client(pair: list[Daemon]) -> None:
    from lu2k.control import request
    from lu2k.errors import Lu2kError

    for bad in ("nan", float("inf"), 1e308, -1, "x", None):
        with pytest.raises(Lu2kError, match="timeout"):
            await request(pair[0].config.control_path, "ping", {"nid": "127.0.0.2@tcp", "timeout": bad})


async def test_import_replace_of_a_plain_export_keeps_the_running_key(pair: list[Daemon], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = pair
    exported = tmp_path / "export.yaml"
    rc, out, err = await run(a, "export", "--backup", str(exported), capsys=capsys)
    assert rc == 0, err
    assert KEY not in exported.read_text() and "<hidden:" in exported.read_text()
    rc, out, err = await run(a, "import", "--replace", str(exported), capsys=capsys)
    assert rc == 0, err
    rc, out, err = await run(a, "export", "--secrets", capsys=capsys)
    assert yaml.safe_load(out)["net"][0]["lu2k"]["key"] == KEY
    rc, out, err = await run(a, "ping", "127.0.0.2@tcp", capsys=capsys)  # and the peer still accepts us
    assert rc == 0, err
    # a hidden key for a net the daemon does not run cannot be kept: refused, saying why
    frag = tmp_path / "new.yaml"
    frag.write_text(yaml.safe_dump({"net": [{"net type": "tcp5", "local NI(s)": [{"nid": "127.0.0.1@tcp5"}],
                                             "lu2k": {"backend": "tcp", "port": free_port(), "key": "<hidden: export --secrets to include>"}}]}))
    rc, out, err = await run(a, "import", str(frag), capsys=capsys)
    assert rc == 1 and "placeholder" in err


def test_lnet_check_does_not_print_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "lnet.yaml"
    cfg.write_text(yaml.safe_dump({"net": [{"net type": "tcp", "local NI(s)": [{"nid": "10.0.0.1@tcp"}],
                                            "lu2k": {"backend": "tcp", "key": KEY}}]}))
    out = subprocess.run([sys.executable, "-m", "lu2k.cli.main", "lnet", "check", str(cfg), "--if", "eth0=10.0.0.1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert KEY not in out.stdout and "hidden" in out.stdout


def test_version() -> None:
    from lu2k import __version__

    out = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and __version__ in out.stdout


WORDS = ["net", "peer", "route", "stats", "global", "endpoint", "show", "add", "del", "ping", "discover", "import", "export",
         "set", "-v", "3", "9", "--net", "tcp", "tcp0", "--nid", "127.0.0.1@tcp", "1.2.3@tcp", "--timeout", "nan", "0.01", "1e308",
         "--json", "--table", "--backup", "--secrets", "--replace", "--del", "/", "-", "--gateway", "--prim_nid", "x", "",
         "\x00", "é", "--socket", "--force", "--source", "transaction_timeout", "-1", "inf"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.sampled_from(WORDS), min_size=0, max_size=6))
def test_any_command_line_ends_with_a_status_never_a_traceback(tmp_path: Path, argv: list[str]) -> None:
    # Against a socket nobody listens on: every path through parsing and the request must end in 0/1/2.
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = ctl.main(["--socket", str(tmp_path / "nobody.ctl"), *argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
    assert rc in (0, 1, 2) and "Traceback" not in err.getvalue()
