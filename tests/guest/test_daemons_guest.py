"""Real lu2kd processes over the rds and o2ib backends, driven through shim endpoints.

The guest counterpart of tests/test_daemon_e2e.py (which runs the same path over TCP on the
host): every message checked by checksum and delivered exactly once with every completion
seen, and a peer that goes away abruptly and comes back.
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from lu2k.control import request
from lu2k.errors import Status
from lu2k.kernel_shim.endpoint import Endpoint
from lu2k.localpair import DaemonProcess, daemons

HDR_SIZE = 8
START_TIMEOUT = 120.0  # lu2kd starts slowly under TCG

# backend -> (net type of the NIDs, backend options)
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "rds": ("tcp", {"keepalive": 0.5, "peer_timeout": 3}),  # RDS notices a dead peer only by silence
    # Zero copy from the endpoint's region only carries plaintext: this pair proves the o2ib
    # zero-copy path, so its frames are not sealed (sealed o2ib frames: test_verbs_guest.py).
    "o2ib": ("o2ib", {"encryption": "none"}),
}


@contextmanager
def pair(backend: str, extra: dict[str, Any] | None = None) -> Iterator[list[DaemonProcess]]:
    net, options = BACKENDS[backend]
    with daemons([f"127.0.0.1@{net}", f"127.0.0.2@{net}"], backend=backend, start=False,
                 extra_net={"options": options}, extra=extra) as procs:
        for d in procs:
            d.start(timeout=START_TIMEOUT)
        yield procs


def message(index: int, size: int, rnd: random.Random) -> bytes:
    body = rnd.randbytes(max(0, size - HDR_SIZE))
    return index.to_bytes(4, "little") + zlib.crc32(body).to_bytes(4, "little") + body


def receive(ep: Endpoint, count: int) -> tuple[Counter[int], int]:
    seen: Counter[int] = Counter()
    corrupt = 0
    while sum(seen.values()) < count:
        msg = ep.recv(timeout=120)
        assert msg is not None, f"receiver idle for 120 s after {sum(seen.values())} of {count} messages"
        with msg:
            index = int.from_bytes(msg.payload[:4], "little")
            if zlib.crc32(msg.payload[HDR_SIZE:]) != int.from_bytes(msg.payload[4:8], "little"):
                corrupt += 1
            seen[index] += 1
    return seen, corrupt


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_messages_through_two_daemons_exactly_once(backend: str) -> None:
    rnd = random.Random(11)
    sizes = [HDR_SIZE, HDR_SIZE + 1, 1 << 20, (1 << 20) - 1, 65536, 1023]
    while len(sizes) < 80:
        sizes.append(int(HDR_SIZE * ((256 << 10) / HDR_SIZE) ** (rnd.random() ** 1.6)))
    # Everything is queued at once and the guest CPU is 20-100x slow: a transaction timeout
    # sized for that, so every message must be delivered (none may expire).
    with pair(backend, {"global": {"transaction_timeout": 900}}) as (a, b):
        with Endpoint.attach(b.shim_path, portal=0) as rx, Endpoint.attach(a.shim_path, portal=1) as tx:
            completions = [tx.send(b.nid, message(i, size, rnd), 0) for i, size in enumerate(sizes)]
            seen, corrupt = receive(rx, len(sizes))
            for c in completions:
                assert c.wait(120), "completion never came"
            assert Counter(c.status for c in completions) == Counter({0: len(sizes)})
            assert corrupt == 0 and len(seen) == len(sizes) and set(seen.values()) == {1}
            if backend == "o2ib":
                # The daemon registered the endpoint's shared region, so payloads left from it
                # directly (0 without the registration; batches with more pieces than the QP's
                # scatter-gather limit still take the bounce buffer, hence "most", not "all").
                peers = asyncio.run(request(a.control_path, "peer show"))
                conns = [c for p in peers for c in p["connections"].values()]
                assert sum(c.get("zero_copy_bytes", 0) for c in conns) > sum(sizes) // 2, conns


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_peer_goes_away_and_comes_back(backend: str) -> None:
    extra = {"global": {"transaction_timeout": 10, "reconnect_min": 0.05, "reconnect_max": 0.5}}
    with pair(backend, extra) as (a, b):
        with Endpoint.attach(a.shim_path, portal=1) as tx:
            with Endpoint.attach(b.shim_path, portal=0) as rx:
                first = [tx.send(b.nid, message(i, 3000, random.Random(i)), 0) for i in range(10)]
                receive(rx, 10)
                assert all(c.wait(60) and c.status == 0 for c in first)
            b.kill()  # abrupt: no goodbye on any channel
            lost = [tx.send(b.nid, message(100 + i, 5000, random.Random(i)), 0) for i in range(10)]
            for c in lost:
                assert c.wait(120), "a message to a dead peer never completed"
            assert {c.status for c in lost} <= {Status.NO_ROUTE, Status.TIMED_OUT}, [(c.status, c.reason) for c in lost]
            b.start(timeout=START_TIMEOUT)
            time.sleep(1)  # let the old session's loss be noticed (RDS: peer_timeout 3 s has long passed)
            with Endpoint.attach(b.shim_path, portal=0) as rx:
                again = [tx.send(b.nid, message(200 + i, 2000, random.Random(i)), 0) for i in range(10)]
                seen, corrupt = receive(rx, 10)
                assert all(c.wait(120) for c in again)
                assert [c.status for c in again] == [0] * 10, [(c.status, c.reason) for c in again]
                assert corrupt == 0 and sorted(seen) == list(range(200, 210))
