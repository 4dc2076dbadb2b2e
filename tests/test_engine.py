"""Engine failure paths over the in-process backend, driven through Engine.send().

(End-to-end delivery through shim endpoints and real sockets is in test_daemon_e2e.py.)
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from lu2k.engine import Engine
from lu2k.errors import Status
from lu2k.nid import parse_nid
from lu2k.settings import parse_config

_ports = itertools.count(50000)


def config(nid: str, port: int, key: str = "engine-test-key-0123", **glob: Any) -> Any:
    g = {"transaction_timeout": 1, "connect_timeout": 0.5, "reconnect_min": 0.05, "reconnect_max": 0.2}
    g.update(glob)
    net = nid.rpartition("@")[2]
    return parse_config({
        "net": [{"net type": net, "local NI(s)": [{"nid": nid, "tunables": {"peer_credits": 2, "credits": 4}}],
                 "lu2k": {"backend": "inproc", "port": port, "key": key, "max_message_size": 1 << 20}}],
        "global": g,
    })


class Result:
    def __init__(self) -> None:
        self.calls: list[tuple[Status, str]] = []
        self.event = asyncio.Event()

    def __call__(self, status: Status, reason: str) -> None:
        self.calls.append((status, reason))
        self.event.set()

    async def wait(self, timeout: float = 10) -> tuple[Status, str]:
        await asyncio.wait_for(self.event.wait(), timeout)
        await asyncio.sleep(0.05)  # a second completion would show up here
        assert len(self.calls) == 1, f"expected exactly one completion, got {self.calls}"
        return self.calls[0]


@pytest.fixture
async def pair():  # type: ignore[no-untyped-def]
    port = next(_ports)
    a, b = Engine(config("10.9.0.1@tcp", port)), Engine(config("10.9.0.2@tcp", port))
    await a.start(with_shim=False)
    await b.start(with_shim=False)
    yield a, b
    await a.stop()
    await b.stop()


async def test_no_receiver_is_reported(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    r = Result()
    a.send(None, b.primary_nid(), 1, 7, b"hello", r)
    status, reason = await r.wait()
    assert status is Status.NO_RECEIVER and "portal 7" in reason
    peer = a.describe_peers()[0]
    assert peer["state"] == "up" and peer["failed"] == 1 and peer["in_flight"] == 0


async def test_many_messages_respect_credits_and_all_complete(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    results = [Result() for _ in range(50)]
    for r in results:
        a.send(None, b.primary_nid(), 1, 0, b"x" * 100, r)
    p = a.peer(b.primary_nid())
    assert len(p.inflight) <= 2 and len(p.queue) == 48  # peer_credits = 2
    for r in results:
        assert (await r.wait())[0] is Status.NO_RECEIVER
    assert p.credits.in_use == 0 and p.credits.min_value == 2 - 2 - 48  # LNet: limit - in use - queued


async def test_unreachable_peer_fails_after_timeout_with_reason() -> None:
    port = next(_ports)
    a = Engine(config("10.9.1.1@tcp", port))
    await a.start(with_shim=False)
    try:
        r = Result()
        a.send(None, parse_nid("10.9.1.9@tcp"), 1, 0, b"lost", r)
        status, reason = await r.wait(5)
        assert status is Status.NO_ROUTE and "unreachable" in reason and "refused" in reason
    finally:
        await a.stop()


async def test_wrong_key_fails_fast_as_auth_failure() -> None:
    port = next(_ports)
    a = Engine(config("10.9.2.1@tcp", port, key="key-of-site-a-0123"))
    b = Engine(config("10.9.2.2@tcp", port, key="key-of-site-b-0123"))
    await a.start(with_shim=False)
    await b.start(with_shim=False)
    try:
        r = Result()
        a.send(None, b.primary_nid(), 1, 0, b"x", r)
        status, reason = await r.wait(5)
        assert status is Status.AUTH_FAILED and "key" in reason
        assert b.stats["conns_refused"] + a.stats.get("conns_refused", 0) >= 0
    finally:
        await a.stop()
        await b.stop()


async def test_no_route_and_too_large(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    r1, r2 = Result(), Result()
    a.send(None, parse_nid("1.2.3.4@tcp7"), 1, 0, b"x", r1)
    a.send(None, b.primary_nid(), 1, 0, bytes((1 << 20) + 1), r2)
    assert (await r1.wait())[0] is Status.NO_ROUTE
    status, reason = await r2.wait()
    assert status is Status.TOO_LARGE and "max_message_size" in reason


async def test_ping_and_describe(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    res = await a.ping(b.primary_nid(), 5)
    assert res["rtt_ms"] >= 0 and res["nid"] == "10.9.0.2@tcp"
    nets = a.describe_nets()
    assert nets[0]["nid"] == "10.9.0.1@tcp" and nets[0]["backend"] == "inproc"
    with pytest.raises(Exception, match="no route"):
        await a.ping(parse_nid("1.1.1.1@o2ib"), 1)


async def test_shutdown_cancels_what_is_pending() -> None:
    port = next(_ports)
    a = Engine(config("10.9.3.1@tcp", port, transaction_timeout=60))
    await a.start(with_shim=False)
    r = Result()
    a.send(None, parse_nid("10.9.3.2@tcp"), 1, 0, b"x", r)  # nobody listens: stays queued
    await asyncio.sleep(0.1)
    await a.stop()
    status, reason = await r.wait()
    assert status is Status.CANCELLED and "shutting down" in reason


async def test_dropped_peer_is_forgotten_and_reachable_again(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    first = Result()
    a.send(None, b.primary_nid(), 1, 0, b"x", first)
    assert (await first.wait())[0] is Status.NO_RECEIVER
    old = a.peer(b.primary_nid())
    queued = [Result() for _ in range(5)]
    for r in queued:
        a.send(None, b.primary_nid(), 1, 0, b"y", r)
    a.drop_peer(b.primary_nid(), "peer deleted")
    for r in queued:  # whatever the dropped peer held fails once, with the reason
        status, reason = await r.wait()
        assert status in (Status.CANCELLED, Status.NO_RECEIVER)
    assert any(r.calls[0] == (Status.CANCELLED, "peer deleted") for r in queued)
    again = Result()
    a.send(None, b.primary_nid(), 1, 0, b"z", again)
    assert (await again.wait())[0] is Status.NO_RECEIVER
    assert a.peer(b.primary_nid()) is not old  # the send went through a fresh peer, not the dropped one
    ni = a.nis[b.primary_nid().net]
    assert ni.credits.in_use == 0 and ni.queued == 0


async def test_remove_and_add_net_at_run_time(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    nc = a.config.nets[0]
    await a.remove_net(nc.net, "net removed")
    r = Result()
    a.send(None, b.primary_nid(), 1, 0, b"x", r)
    assert (await r.wait())[0] is Status.NO_ROUTE
    await a.add_net(nc)
    r2 = Result()
    a.send(None, b.primary_nid(), 1, 0, b"x", r2)
    assert (await r2.wait())[0] is Status.NO_RECEIVER
