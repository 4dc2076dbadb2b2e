"""lu2k.backends.tcp stall detection: ``dead_timeout`` (no ACK with data outstanding, read from
TCP_INFO; keepalive for idle connections).

After an outage TCP's retransmission timer has backed off (up to two minutes), so a connection
with data in flight can stay silent long after the link is back.  One lab test takes the
emulated link down with a transfer under way, longer than ``dead_timeout``, and checks that the
sender's daemon ended the stalled connection itself, reconnected, and that every message then
arrived exactly once.  The other runs a transfer over a link with steady random loss and a
short ``dead_timeout`` and checks that no live connection was ended (TCP_USER_TIMEOUT as the
stall detector ends such connections).  Correctness only; nothing here is timed.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lu2k.backends.tcp import DEAD_TIMEOUT_MIN, TCP_INFO_HEAD, ack_silence, dead_timeout_option, set_keepalive
from lu2k.errors import ConfigError

from e2e_support import check_complete


def test_dead_timeout_defaults_to_eight_rtts_with_a_floor() -> None:
    assert dead_timeout_option({}, None, "net tcp") == DEAD_TIMEOUT_MIN
    assert dead_timeout_option({}, 600.0, "net tcp") == DEAD_TIMEOUT_MIN  # GEO: 8 x 0.6 s < 10 s
    assert dead_timeout_option({}, 2000.0, "net tcp") == 16.0
    assert dead_timeout_option({"dead_timeout": 0}, 600.0, "net tcp") == 0.0
    assert dead_timeout_option({"dead_timeout": 2.5}, None, "net tcp") == 2.5


@pytest.mark.parametrize("bad", ["10s", True, -1, 0.5, 7200])
def test_dead_timeout_bad_values_are_named(bad: Any) -> None:
    with pytest.raises(ConfigError, match="dead_timeout") as e:
        dead_timeout_option({"dead_timeout": bad}, None, "net tcp")
    assert "net tcp" in str(e.value)


@pytest.mark.parametrize("seconds, idle, interval", [(10.0, 5, 1), (60.0, 30, 6), (6.0, 3, 1), (1.0, 1, 1)])
def test_keepalive_gives_up_after_about_dead_timeout(seconds: float, idle: int, interval: int) -> None:
    with socket.socket() as s:
        set_keepalive(s, seconds)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0  # see the lossy-link test below
        assert (s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)) == (idle, interval, 5)  # one lost probe ends nothing


def _tcp_info(unacked: int, last_ack_recv_ms: int) -> bytes:
    fields = [0] * 21
    fields[12], fields[20] = unacked, last_ack_recv_ms
    return TCP_INFO_HEAD.pack(*fields) + bytes(100)  # the kernel's struct goes on


def test_ack_silence_counts_only_with_data_outstanding() -> None:
    assert ack_silence(_tcp_info(0, 60_000)) is None  # idle: keepalive's business
    assert ack_silence(_tcp_info(3, 12_500)) == 12.5
    assert ack_silence(_tcp_info(1, 0)) == 0.0
    assert ack_silence(_tcp_info(3, 12_500)[: TCP_INFO_HEAD.size - 1]) is None


def test_ack_silence_reads_a_real_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_connection(srv.getsockname()) as c:
        peer, _ = srv.accept()
        with peer:
            c.sendall(b"x" * 100_000)
            got = 0
            while got < 100_000:
                got += len(peer.recv(65536))
            deadline = time.monotonic() + 5
            while (silence := ack_silence(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256))) is not None:
                assert time.monotonic() < deadline, f"data still outstanding after the peer read it ({silence} s)"
                time.sleep(0.01)


@pytest.mark.netns
@pytest.mark.timeout(180)
@pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="needs root and TUN for the lab")
def test_outage_longer_than_dead_timeout_reconnects_and_resumes(daemons_dir: Path) -> None:
    from lu2k.lab.bench import LabDaemons, transfer
    from lu2k.lab.netns import Lab
    from lu2k.lab.spec import build_specs

    dead_timeout = 2.0
    outage_s = 3 * dead_timeout  # long enough for the user timeout to fire, short for a test
    specs = build_specs("leo", rate="20mbit", seed=4)
    count = 240
    out: dict[str, Any] = {}
    with Lab(specs, lab_id="ln" + secrets.token_hex(2)) as lab:
        with LabDaemons(lab, "tcp", daemons_dir, extra_options={"dead_timeout": dead_timeout}) as daemons:
            def run() -> None:
                try:
                    out["r"] = transfer(lab, daemons, size=65536, window=32, count=count, verify=True, timeout=150)
                except Exception as e:  # handed to the test thread below
                    out["e"] = e

            t = threading.Thread(target=run, daemon=True)  # a test stopped at its limit does not wait for it
            t.start()
            while lab.stats()["links"]["ab"]["packets_out"] < 300 and t.is_alive():
                time.sleep(0.05)
            lab.set_link(False)  # mid-transfer: the BULK connection has data in flight
            while lab.stats()["links"]["ab"]["drops_down"] < 5 and t.is_alive():
                time.sleep(0.05)
            time.sleep(outage_s)
            lab.set_link(True)
            t.join(160)
            assert not t.is_alive()
    if "e" in out:
        raise out["e"]
    check_complete(out["r"], count)
    log = (daemons_dir / "lu2kd-a.log").read_text(errors="replace")
    # The stalled connection was ended by lu2k (not left to TCP's backed-off retransmissions),
    # and a new one carried the rest.
    assert f"nothing acknowledged for dead_timeout {dead_timeout:g} s" in log, log[-4000:]
    assert log.count("connected") >= 2, log[-4000:]


@pytest.mark.netns
@pytest.mark.timeout(240)
@pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="needs root and TUN for the lab")
def test_steady_random_loss_ends_no_live_connection(daemons_dir: Path) -> None:
    """5 % random loss each way keeps TCP in loss recovery for the whole transfer; with
    TCP_USER_TIMEOUT as the stall detector the first retransmission timeout after
    ``dead_timeout`` seconds of it ends the connection (and keepalive's first lost probe an
    idle one) in a quarter to half of such runs (benchmarks/tcp_stall.py).  An ACK still arrives every round trip, so none may end."""
    from lu2k.lab.bench import LabDaemons, transfer
    from lu2k.lab.netns import Lab
    from lu2k.lab.spec import build_specs

    specs = build_specs("custom", rate="20mbit", rtt="100ms", loss="5%", seed=2)
    count = 900
    with Lab(specs, lab_id="ll" + secrets.token_hex(2)) as lab:
        with LabDaemons(lab, "tcp", daemons_dir, extra_options={"dead_timeout": 3}) as daemons:
            r = transfer(lab, daemons, size=65536, window=64, count=count, verify=True, timeout=200)
            # Read before the daemons stop: stopping one ends the other's connections.
            logs = "".join((daemons_dir / f"lu2kd-{side}.log").read_text(errors="replace") for side in ("a", "b"))
    check_complete(r, count)
    assert "connection lost" not in logs and "stalled" not in logs and "closing connection" not in logs, logs[-4000:]


@pytest.mark.netns
@pytest.mark.timeout(180)
@pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="needs root and TUN for the lab")
def test_the_stall_benchmark_runs_and_reports_json() -> None:
    """``benchmarks/tcp_stall.py``, the measurement behind the lossy-link test, in one short run."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "tcp_stall.py"), "--rtt", "20ms", "--loss", "0%", "--count", "40",
                        "--runs", "1", "--json"], capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = json.loads(r.stdout.strip().splitlines()[-1])["runs"]
    assert run["messages"] == 40 and run["delivered_once"] and run["connections_ended"] == 0, run
