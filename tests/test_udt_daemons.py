"""lu2kd over the udt backend, real processes on loopback: exactly-once delivery with every
completion seen, UDT's figures in ``lu2kctl peer show``, and a peer killed and restarted
mid-stream."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from lu2k.backends import availability
from lu2k.errors import Status
from lu2k.kernel_shim.endpoint import Endpoint
from e2e_support import HDR, Receiver, make_message  # noqa: E402
from lu2k.localpair import DaemonProcess, daemons

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(availability().get("udt") is not None, reason=f"udt backend unavailable: {availability().get('udt')}"),
]

NET = {"key": "udt-daemon-test-key", "profile": {"rtt_ms": 1, "rate_mbit": 800}}


def ctl(d: DaemonProcess, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", d.control_path, "--json", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _connection_stats(peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for p in peers for c in p.get("connections", {}).values() if isinstance(c, dict)]


def test_messages_exactly_once_with_udt_figures_in_peer_show() -> None:
    rnd = random.Random(3)
    sizes = [HDR.size, 4 << 20, 65536, 1 << 20] + [int(HDR.size * 2 ** (rnd.random() * 16)) for _ in range(1500)]
    with daemons(["127.0.0.1@udt", "127.0.0.2@udt"], backend="udt", extra_net=NET) as (a, b):
        rx = Receiver(b.shim_path, len(sizes))
        rx.start()
        with Endpoint.attach(a.shim_path, portal=1) as ep:
            completions = [ep.send(b.nid, make_message(i, s, rnd), 0) for i, s in enumerate(sizes)]
            for c in completions:
                assert c.wait(120), "completion never came"
            assert Counter(c.status for c in completions) == Counter({0: len(sizes)})
        rx.join(120)
        assert rx.error is None, rx.error
        assert rx.corrupt == 0 and len(rx.seen) == len(sizes) and set(rx.seen.values()) == {1}
        conns = _connection_stats(ctl(a, "peer", "show"))
        udt = [c for c in conns if "rtt_ms" in c]
        assert udt, conns
        assert udt[0]["cc"] == "lu2k-rate" and udt[0]["packets_sent"] > 0 and "cc_rate_mbit" in udt[0]
        assert {"retransmitted", "bandwidth_estimate_mbit", "lost_sent"} <= set(udt[0])


def test_peer_killed_and_restarted_mid_stream() -> None:
    extra = {"global": {"transaction_timeout": 5, "reconnect_min": 0.05, "reconnect_max": 0.5}}
    with daemons(["127.0.0.1@udt", "127.0.0.2@udt"], backend="udt", extra_net=NET, extra=extra) as (a, b):
        with Endpoint.attach(a.shim_path, portal=1) as ep:
            rx = Receiver(b.shim_path, 90)  # stays attached until the kill
            rx.start()
            rnd = random.Random(5)
            first = [ep.send(b.nid, make_message(i, 20000, rnd), 0) for i in range(50)]
            assert all(c.wait(60) and c.status == 0 for c in first)
            # Mid-stream: more messages are on their way when the peer dies without a word.
            during = [ep.send(b.nid, make_message(100 + i, 200000, rnd), 0) for i in range(40)]
            b.kill()
            for c in during:
                assert c.wait(90), "a message to a dead peer never completed"
            outcomes = Counter(Status(c.status) for c in during)
            # Every message ends exactly once: delivered before the kill, or failed with a reason.
            assert set(outcomes) <= {Status.DELIVERED, Status.NO_ROUTE, Status.TIMED_OUT, Status.PEER_RESTARTED}, outcomes
            assert sum(outcomes.values()) == len(during)
            # The peer comes back (new incarnation, same port).  UDT gets no reset from the new
            # process (its packets for the old socket are ignored), so the old connection ends
            # only when libudt declares it broken (16 expiries and >= 5 s of silence); until
            # then messages may time out.  Each ends exactly once all the same.
            b.start()
            rx2 = Receiver(b.shim_path, 21)
            rx2.start()
            probes = []
            for i in range(30):
                probe = ep.send(b.nid, make_message(200 + i, 1000, rnd), 0)
                assert probe.wait(120), "probe never completed"
                probes.append(probe.status)
                if probe.status == 0:
                    break
            assert probes[-1] == 0, probes
            assert set(probes[:-1]) <= {Status.TIMED_OUT, Status.NO_ROUTE, Status.PEER_RESTARTED}, probes
            again = [ep.send(b.nid, make_message(300 + i, 50000, rnd), 0) for i in range(20)]
            for c in again:
                assert c.wait(120), "message after the restart never completed"
            assert [c.status for c in again] == [0] * 20, [(c.status, c.reason) for c in again]
            rx2.join(60)
            assert rx2.error is None and len(rx2.seen) == 21 and rx2.corrupt == 0
