"""The engine (the asyncio pump around lu2k.core) over the in-process backend, driven through
Engine.send(): failure paths, the LAN driver and hello hooks, routed ping.

(End-to-end delivery through shim endpoints and real sockets is in test_daemon_e2e.py; the
message semantics themselves, on a fake clock, in test_core_node.py and test_simulation.py.)
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from lu2k import wire
from lu2k.backends.inproc import InprocTransport
from lu2k.engine import RX_SLICE, Engine, rx_slice
from lu2k.errors import NetworkError, Status
from lu2k.nid import parse_net, parse_nid
from lu2k.settings import parse_config

_ports = itertools.count(50000)


def config(nid: str | list[str], port: int, key: str = "engine-test-key-0123", routes: list[dict[str, str]] | None = None,
           routing: bool = False, tunables: dict[str, int] | None = None, **glob: Any) -> Any:
    g = {"transaction_timeout": 1, "connect_timeout": 0.5, "reconnect_min": 0.05, "reconnect_max": 0.2}
    g.update(glob)
    nids = [nid] if isinstance(nid, str) else nid
    return parse_config({
        "net": [{"net type": n.rpartition("@")[2], "local NI(s)": [{"nid": n, "tunables": tunables or {"peer_credits": 2, "credits": 4}}],
                 "lu2k": {"backend": "inproc", "port": port, "key": key, "max_message_size": 1 << 20}} for n in nids],
        "route": routes or [], "routing": {"enable": int(routing)},
        "global": g,
    })


class Result:
    """One message's completions.  Every Result of a test is checked for exactly one call once
    the engines have stopped (stop() completes whatever is pending, so none can hide)."""

    made: list["Result"] = []

    def __init__(self) -> None:
        self.calls: list[tuple[Status, str]] = []
        self.event = asyncio.Event()
        Result.made.append(self)

    def __call__(self, status: Status, reason: str) -> None:
        self.calls.append((status, reason))
        self.event.set()

    async def wait(self, timeout: float = 10) -> tuple[Status, str]:
        await asyncio.wait_for(self.event.wait(), timeout)
        return self.calls[0]


@pytest.fixture(autouse=True)
def exactly_once() -> Any:
    Result.made = []
    yield
    assert all(len(r.calls) == 1 for r in Result.made), [r.calls for r in Result.made]


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for ``cond`` (checked each loop turn); fails the test if it never holds."""
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Engine, Engine]]:
    port = next(_ports)
    a, b = Engine(config("10.9.0.1@tcp", port)), Engine(config("10.9.0.2@tcp", port))
    await a.start(with_shim=False)
    await b.start(with_shim=False)
    yield a, b
    await a.stop()
    await b.stop()


async def test_no_receiver_is_reported(pair: tuple[Engine, Engine]) -> None:
    a, b = pair
    r = Result()
    a.send(None, b.primary_nid(), 1, 7, b"hello", r)
    status, reason = await r.wait()
    assert status is Status.NO_RECEIVER and reason == "no endpoint attached on portal 7 at 10.9.0.2@tcp"
    peer = a.describe_peers()[0]
    assert peer["state"] == "up" and peer["failed"] == 1 and peer["in_flight"] == 0 and peer["delivered"] == 0


async def test_many_messages_respect_credits_and_all_complete(pair: tuple[Engine, Engine]) -> None:
    a, b = pair
    results = [Result() for _ in range(50)]
    for r in results:
        a.send(None, b.primary_nid(), 1, 0, b"x" * 100, r)
    p = a.peer(b.primary_nid())
    assert len(p.inflight) == 2 and len(p.queue) == 48  # peer_credits = 2
    for r in results:
        assert (await r.wait())[0] is Status.NO_RECEIVER
    assert p.credits.in_use == 0 and p.credits.min_value == 2 - 2 - 48  # LNet: limit - in use - queued


async def test_a_large_read_is_acknowledged_slice_by_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that holds many small messages goes to the core a slice at a time, and each
    slice's ACK leaves before the next slice is handled: the sender gets credits back while the
    receiver works.  (With one ACK per read, a sender whose whole credit window fits in one read
    waited for all of it to be handled, and each daemon idled half the time.)"""
    port = next(_ports)
    credits = {"peer_credits": 4 * RX_SLICE, "credits": 16 * RX_SLICE}
    a, b = Engine(config("10.9.7.1@tcp", port, tunables=credits)), Engine(config("10.9.7.2@tcp", port, tunables=credits))
    await a.start(with_shim=False)
    await b.start(with_shim=False)
    acks_sent_after: list[int] = []  # messages b had handled when its answers went out (here NACKs: no receiver)
    real_send = InprocTransport.send

    async def logged(self: InprocTransport, frames: Any) -> None:
        if any(inl.transport is self for inl in b._in.values()):
            acks_sent_after.append(b.core.stats["msgs_received"])
        await real_send(self, frames)

    monkeypatch.setattr(InprocTransport, "send", logged)
    try:
        first = Result()
        a.send(None, b.primary_nid(), 1, 0, b"connect", first)
        await first.wait()
        acks_sent_after.clear()
        before = b.core.stats["msgs_received"]
        count = 3 * RX_SLICE + 8
        results = [Result() for _ in range(count)]
        for portal, r in enumerate(results, 1):  # queued together: one batch on the wire, one read at b
            a.send(None, b.primary_nid(), 1, portal, b"x", r)  # a portal each: no destination's cap applies
        for r in results:
            assert (await r.wait())[0] is Status.NO_RECEIVER
        assert [n - before for n in acks_sent_after] == [RX_SLICE, 2 * RX_SLICE, 3 * RX_SLICE, count]
    finally:
        await a.stop()
        await b.stop()


def test_a_slice_is_a_quarter_of_the_peer_credits_up_to_its_cap() -> None:
    # A quarter: the sender gets credits back three times before its window runs dry.
    assert [rx_slice(n) for n in (1, 3, 8, 16, 64, 4 * RX_SLICE, 1 << 14)] == [1, 1, 2, 4, 16, RX_SLICE, RX_SLICE]


async def test_unreachable_peer_fails_after_timeout_with_reason() -> None:
    port = next(_ports)
    a = Engine(config("10.9.1.1@tcp", port))
    await a.start(with_shim=False)
    try:
        r = Result()
        a.send(None, parse_nid("10.9.1.9@tcp"), 1, 0, b"lost", r)
        status, reason = await r.wait(5)
        assert status is Status.NO_ROUTE and reason.startswith("10.9.1.9@tcp unreachable: ") and "refused" in reason
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
        assert status is Status.AUTH_FAILED and "wrong network key" in reason and "10.9.2.2@tcp" in reason
        await until(lambda: b.stats["conns_refused"] == 1)
        assert a.stats["conns_refused"] == 0 and a.core.stats["connect_failures"] == 1
    finally:
        await a.stop()
        await b.stop()


async def test_no_route_and_too_large(pair: tuple[Engine, Engine]) -> None:
    a, b = pair
    r1, r2 = Result(), Result()
    a.send(None, parse_nid("1.2.3.4@tcp7"), 1, 0, b"x", r1)
    a.send(None, b.primary_nid(), 1, 0, bytes((1 << 20) + 1), r2)
    assert r1.calls == [(Status.NO_ROUTE, "no route to net tcp7")]  # decided at once
    assert r2.calls == [(Status.TOO_LARGE, f"{(1 << 20) + 1} bytes exceeds max_message_size {1 << 20} of net tcp")]


async def test_ping_and_describe(pair: tuple[Engine, Engine]) -> None:
    a, b = pair
    res = await a.ping(b.primary_nid(), 5)
    assert res["nid"] == res["via"] == "10.9.0.2@tcp" and res["incarnation"] == f"{b.incarnation:016x}"
    assert isinstance(res["rtt_ms"], float)
    assert await a.ping(a.primary_nid(), 1) == {"nid": "10.9.0.1@tcp", "rtt_ms": 0.0, "local": True}
    nets = a.describe_nets()
    assert nets[0]["nid"] == "10.9.0.1@tcp" and nets[0]["backend"] == "inproc" and nets[0]["credits"]["max_tx"] == 4
    assert nets[0]["derived"] == {}  # no site profile: nothing derived, net show -v shows none
    with pytest.raises(NetworkError, match="no route to net o2ib"):
        await a.ping(parse_nid("1.1.1.1@o2ib"), 1)


async def test_shutdown_cancels_what_is_pending() -> None:
    port = next(_ports)
    a = Engine(config("10.9.3.1@tcp", port, transaction_timeout=60))
    await a.start(with_shim=False)
    r = Result()
    a.send(None, parse_nid("10.9.3.2@tcp"), 1, 0, b"x", r)  # nobody listens: stays waiting
    assert r.calls == []
    await a.stop()
    assert r.calls == [(Status.CANCELLED, "daemon shutting down")]


async def test_dropped_peer_is_forgotten_and_reachable_again(pair: tuple[Engine, Engine]) -> None:
    a, b = pair
    first = Result()
    a.send(None, b.primary_nid(), 1, 0, b"x", first)
    assert (await first.wait())[0] is Status.NO_RECEIVER
    old = a.peer(b.primary_nid())
    queued = [Result() for _ in range(5)]
    for r in queued:
        a.send(None, b.primary_nid(), 1, 0, b"y", r)
    a.drop_peer(b.primary_nid(), "peer deleted")  # before the writer ran: nothing went out
    assert [r.calls for r in queued] == [[(Status.CANCELLED, "peer deleted")]] * 5
    again = Result()
    a.send(None, b.primary_nid(), 1, 0, b"z", again)
    assert (await again.wait())[0] is Status.NO_RECEIVER
    assert a.peer(b.primary_nid()) is not old  # the send went through a fresh peer, not the dropped one
    ni = a.nis[b.primary_nid().net]
    assert ni.credits.in_use == 0 and ni.queued == 0


async def test_remove_and_add_net_at_run_time(pair: tuple[Engine, Engine]) -> None:
    a, b = pair
    nc = a.config.nets[0]
    await a.remove_net(nc.net, "net removed")
    r = Result()
    a.send(None, b.primary_nid(), 1, 0, b"x", r)
    assert r.calls == [(Status.NO_ROUTE, "no route to net tcp")]
    await a.add_net(nc)
    r2 = Result()
    a.send(None, b.primary_nid(), 1, 0, b"x", r2)
    assert (await r2.wait())[0] is Status.NO_RECEIVER


# -- hooks for other layers ------------------------------------------------------------------------


class MemoryLan:
    """A LAN driver kept in memory: records what it is given; the test answers."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes, int, int, bytes, Callable[[Status, str], None]]] = []

    def transmit(self, src_raw: bytes, dst_raw: bytes, src_portal: int, dst_portal: int, payload: memoryview | bytes,
                 on_done: Callable[[Status, str], None]) -> None:
        self.sent.append((src_raw, dst_raw, src_portal, dst_portal, bytes(payload), on_done))


async def test_lan_driver_carries_next_hops_on_its_net_end_to_end() -> None:
    """b reaches o2ib through a (routing on); a serves o2ib with a LAN driver."""
    port = next(_ports)
    a = Engine(config("10.9.5.1@tcp", port, routing=True))
    b = Engine(config("10.9.5.2@tcp", port, routes=[{"net": "o2ib", "gateway": "10.9.5.1@tcp"}]))
    await a.start(with_shim=False)
    await b.start(with_shim=False)
    lan = MemoryLan()
    a.attach_lan(parse_net("o2ib"), lan)
    far = parse_nid("192.168.7.5@o2ib")
    try:
        local, routed, lost = Result(), Result(), Result()
        a.send(None, far, 3, 12, b"from a", local)
        b.send(None, far, 4, 12, b"from b", routed)
        await until(lambda: len(lan.sent) == 2)
        src, dst, sport, dport, payload, on_done = lan.sent[0]
        assert (src, dst, sport, dport, payload) == (a.primary_nid().to_bytes(), far.to_bytes(), 3, 12, b"from a")
        on_done(Status.DELIVERED, "")
        src, dst, sport, dport, payload, on_done = lan.sent[1]
        assert (src, dst, sport, dport, payload) == (b.primary_nid().to_bytes(), far.to_bytes(), 4, 12, b"from b")
        assert routed.calls == []  # not before the LAN answered
        on_done(Status.DELIVERED, "")
        assert await local.wait() == (Status.DELIVERED, "delivered")
        assert await routed.wait() == (Status.DELIVERED, "delivered")
        a.send(None, far, 3, 12, b"never answered", lost)  # the transaction timeout still applies
        status, reason = await lost.wait(5)
        assert status is Status.TIMED_OUT and "LAN o2ib" in reason
        a.detach_lan(parse_net("o2ib"))
        gone = Result()
        a.send(None, far, 3, 12, b"x", gone)
        assert gone.calls == [(Status.NO_ROUTE, "no route to net o2ib")]
    finally:
        await a.stop()
        await b.stop()


async def test_on_hello_done_runs_on_both_sides_before_any_message_or_ack(monkeypatch: pytest.MonkeyPatch) -> None:
    done: dict[int, wire.HelloResult] = {}
    bad: list[str] = []
    real_send = InprocTransport.send
    real_done = InprocTransport.on_hello_done

    def on_hello_done(self: InprocTransport, result: wire.HelloResult) -> None:
        done[id(self)] = result
        real_done(self, result)  # the transport still switches to sealed frames

    async def send(self: InprocTransport, frames: Any) -> None:
        for header, _payload in frames:
            ftype = wire.FrameType(bytes(header)[5])
            if ftype in (wire.FrameType.MSG, wire.FrameType.ACK, wire.FrameType.NACK) and id(self) not in done:
                bad.append(ftype.name)
        await real_send(self, frames)

    monkeypatch.setattr(InprocTransport, "on_hello_done", on_hello_done)
    monkeypatch.setattr(InprocTransport, "send", send)
    port = next(_ports)
    a, b = Engine(config("10.9.6.1@tcp", port)), Engine(config("10.9.6.2@tcp", port))
    await a.start(with_shim=False)
    await b.start(with_shim=False)
    try:
        r = Result()
        a.send(None, b.primary_nid(), 1, 0, b"x", r)
        assert (await r.wait())[0] is Status.NO_RECEIVER
        peers = {str(res.peer_nid) for res in done.values()}  # a's connection (and b's back to a, opened at once)
        assert peers == {"10.9.6.1@tcp", "10.9.6.2@tcp"} and bad == []
    finally:
        await a.stop()
        await b.stop()


async def test_ping_behind_a_gateway_reports_the_far_end_or_fails() -> None:
    port = next(_ports)
    a = Engine(config("10.9.8.1@tcp", port, routes=[{"net": "tcp1", "gateway": "10.9.8.2@tcp"}]))
    g = Engine(config(["10.9.8.2@tcp", "10.9.9.2@tcp1"], port, routing=True))
    c = Engine(config("10.9.9.3@tcp1", port, routes=[{"net": "tcp", "gateway": "10.9.9.2@tcp1"}]))
    for e in (a, g, c):
        await e.start(with_shim=False)
    try:
        res = await a.ping(c.primary_nid(), 5)
        assert res["nid"] == "10.9.9.3@tcp1" and res["via"] == "10.9.8.2@tcp" and res["end_to_end"] is True
        assert g.core.stats["msgs_forwarded"] == 1 and c.core.stats["msgs_delivered"] == 0  # the daemon answered
        with pytest.raises(NetworkError, match="no answer from 10.9.9.77@tcp1: "):
            await a.ping(parse_nid("10.9.9.77@tcp1"), 0.8)  # nobody there: the gateway's answer is a failure
    finally:
        for e in (a, g, c):
            await e.stop()


async def test_messages_for_a_gateway_that_is_down_go_through_the_other_one() -> None:
    port = next(_ports)
    routes = [{"net": "tcp1", "gateway": "10.9.11.2@tcp"}, {"net": "tcp1", "gateway": "10.9.11.4@tcp"}]
    a = Engine(config("10.9.11.1@tcp", port, routes=routes, transaction_timeout=20))
    g3 = Engine(config(["10.9.11.4@tcp", "10.9.12.4@tcp1"], port, routing=True))  # 10.9.11.2 is not running
    c = Engine(config("10.9.12.3@tcp1", port, routes=[{"net": "tcp", "gateway": "10.9.12.4@tcp1"}]))
    for e in (a, g3, c):
        await e.start(with_shim=False)
    try:
        results = [Result() for _ in range(6)]
        for r in results:
            a.send(None, c.primary_nid(), 1, 0, b"x", r)
        # NO_RECEIVER is c's own answer (it runs no endpoints): each message reached it, long
        # before the 20-s transaction timeout that the ones given to the dead gateway met before.
        assert [(await r.wait(10))[0] for r in results] == [Status.NO_RECEIVER] * 6
        assert a.core.stats["msgs_rerouted"] >= 1 and g3.core.stats["msgs_forwarded"] == 6
        (dead,) = [p for p in a.describe_peers() if p["nid"] == "10.9.11.2@tcp"]
        assert dead["rerouted_away"] == a.core.stats["msgs_rerouted"] and dead["in_flight"] == 0
    finally:
        for e in (a, g3, c):
            await e.stop()


async def test_an_endpoint_that_corrupts_its_completion_ring_is_detached_alone(tmp_path: Any) -> None:
    """Issue 13 item 1: completions that fail on one endpoint's broken ring neither stop the
    timer nor keep peer credits; the other endpoint's messages complete as usual."""
    from lu2k.kernel_shim import abi
    from lu2k.kernel_shim.endpoint import AsyncEndpoint

    port = next(_ports)
    cfg = config("10.9.10.1@tcp", port)
    cfg.shim.path = str(tmp_path / "a.shim")
    a, b = Engine(cfg), Engine(config("10.9.10.2@tcp", port))
    await a.start()
    await b.start(with_shim=False)
    try:
        async with await AsyncEndpoint.attach(cfg.shim.path, 1) as good, await AsyncEndpoint.attach(cfg.shim.path, 2) as bad:
            core = bad._core
            ctrl = core.mem[core.layout.rings[abi.RING_COMPLETE].ctrl :][: abi.RING_CTRL_SIZE].cast("I")
            ctrl[abi.RING_CONSUMER_OFF // 4] = (ctrl[abi.RING_PRODUCER_OFF // 4] + 12345) & 0xFFFFFFFF  # consumer ahead of producer
            ctrl.release()
            ring = a.shim.ports[2]._complete
            ring._cached_consumer = ring.head - ring.entries  # as after a full ring: the next put re-reads the index
            doomed = [await bad.send(b.primary_nid().to_bytes(), b"x", portal=9) for _ in range(8)]  # ACK path
            lost = await bad.send(parse_nid("10.9.10.9@tcp").to_bytes(), b"x", portal=9)  # timer path
            await until(lambda: not bad.attached)
            assert 2 not in a.shim.ports and a.shim.counters["disconnected"] == 1
            for c in doomed + [lost]:  # the endpoint learns from the disconnect, not from its broken ring
                assert await c.wait(10) and c.status is not Status.DELIVERED
            # The peer's credits came back and the timer still runs: the good endpoint is served.
            fine = [await good.send(b.primary_nid().to_bytes(), b"y", portal=9) for _ in range(8)]
            late = await good.send(parse_nid("10.9.10.9@tcp").to_bytes(), b"y", portal=9)
            for c in fine:
                assert await c.wait(10) and c.status is Status.NO_RECEIVER
            assert await late.wait(10) and late.status is Status.NO_ROUTE
            peer = a.peer(b.primary_nid())
            assert peer.credits.in_use == 0 and a.stats["action_errors"] == 0
    finally:
        await a.stop()
        await b.stop()


async def test_one_endpoint_not_releasing_does_not_hold_up_another(tmp_path: Any) -> None:
    """Issue 13 item 6: messages for an endpoint whose RX pool is full wait for it alone;
    the connection goes on carrying other endpoints' messages."""
    from lu2k.kernel_shim.endpoint import AsyncEndpoint

    port = next(_ports)
    cfg_b = config("10.9.11.2@tcp", port, transaction_timeout=60)
    cfg_b.shim.path = str(tmp_path / "b.shim")
    cfg_a = config("10.9.11.1@tcp", port, transaction_timeout=60)
    cfg_a.nets[0].peer_credits = cfg_a.nets[0].credits = 32
    a, b = Engine(cfg_a), Engine(cfg_b)
    await a.start(with_shim=False)
    await b.start()
    try:
        async with await AsyncEndpoint.attach(cfg_b.shim.path, 1, rx_pool_bytes=64 << 10) as stuck, \
                await AsyncEndpoint.attach(cfg_b.shim.path, 2) as live:
            big = [Result() for _ in range(10)]
            for r in big:  # 10 x 40 KiB: portal 1's RX pool has 6 slots that size, and nobody releases
                a.send(None, b.primary_nid(), 3, 1, bytes(40 << 10), r)
            small = [Result() for _ in range(3)]
            for i, r in enumerate(small):
                a.send(None, b.primary_nid(), 3, 2, b"hello %d" % i, r)
            for r in small:
                assert await r.wait(10) == (Status.DELIVERED, "delivered")
            got = [await live.recv(10) for _ in small]
            assert [bytes(m.payload) for m in got if m is not None] == [b"hello 0", b"hello 1", b"hello 2"]
            for m in got:
                assert m is not None
                m.release()
            assert sum(1 for r in big if r.calls) == 6 and len(b._rx_queues) == 1
            assert stuck.attached
        for r in big:  # the stuck endpoint went away: the four that waited for it fail, once
            await r.wait(10)
        assert [r.calls[0] for r in big[6:]] == [(Status.NO_RECEIVER, "endpoint on portal 1 detached")] * 4
    finally:
        await a.stop()
        await b.stop()


async def test_a_send_cancelled_under_the_writer_still_completes_its_messages(pair: tuple[Engine, Engine],
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A transport send that ends in CancelledError (its connection closed under it) gives its
    batch back: the messages are resent or failed, each completing once -- not left owed."""
    a, b = pair
    real_send = InprocTransport.send
    cancelled: list[int] = []

    async def send_once_cancelled(self: InprocTransport, frames: Any) -> None:
        if not cancelled and any(len(payload) == 7 for _, payload in frames):
            cancelled.append(1)
            raise asyncio.CancelledError
        await real_send(self, frames)

    monkeypatch.setattr(InprocTransport, "send", send_once_cancelled)
    r = Result()
    a.send(None, b.primary_nid(), 1, 0, b"payload", r)
    status, _ = await r.wait(5)
    assert cancelled and status is Status.NO_RECEIVER  # resent on a fresh connection and answered
