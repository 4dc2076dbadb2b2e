"""Tests for lu2k.kernel_shim.server: the daemon side, with AsyncEndpoints on the same loop.

Misbehaving endpoints are simulated by writing raw descriptors and indices into the
shared region, and raw packets onto the control socket.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from lu2k.errors import ConfigError, LocalProtocolError, ShimError, Status
from lu2k.kernel_shim import abi
from lu2k.kernel_shim.endpoint import AsyncCompletion, AsyncEndpoint
from lu2k.kernel_shim.loopback import LoopbackHandler, serve_loopback
from lu2k.kernel_shim.server import SendRequest, ShimConfig, ShimPort, ShimServer
from lu2k.nid import parse_nid

LO = parse_nid("0@lo").to_bytes()


async def until(cond: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``cond()`` holds (a hang guard, not a timing assertion)."""
    for _ in range(20000):
        if cond():
            return
        await asyncio.sleep(0.0005)
    raise AssertionError(f"never happened: {what}")


class HoldingHandler(LoopbackHandler):
    """Keeps submitted requests so a test decides when and how they complete."""

    def __init__(self) -> None:
        super().__init__("0@lo")
        self.held: list[tuple[ShimPort, SendRequest]] = []
        self.detached: list[int] = []
        self.refuse: ShimError | None = None

    def on_attach(self, port: ShimPort) -> None:
        if self.refuse:
            raise self.refuse

    def on_submit(self, port: ShimPort, reqs: list[SendRequest]) -> None:
        self.held.extend((port, r) for r in reqs)

    def on_detach(self, port: ShimPort) -> None:
        self.detached.append(port.portal)


@pytest.fixture
async def loop_server(tmp_path: object) -> AsyncIterator[ShimServer]:
    server = serve_loopback(os.path.join(str(tmp_path), "s.sock"), config=ShimConfig(max_in_flight=16, tx_pool_bytes=1 << 20, rx_pool_bytes=1 << 20))
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def holding(tmp_path: object) -> AsyncIterator[tuple[ShimServer, HoldingHandler]]:
    handler = HoldingHandler()
    server = ShimServer(os.path.join(str(tmp_path), "h.sock"), handler, config=ShimConfig(max_in_flight=4))
    handler.server = server
    await server.start()
    yield server, handler
    await server.close()


async def test_async_endpoints_exchange_messages(loop_server: ShimServer) -> None:
    async with await AsyncEndpoint.attach(loop_server.path, 1) as a, await AsyncEndpoint.attach(loop_server.path, 2) as b:
        comps = [await a.send(LO, f"m{i}".encode(), portal=2) for i in range(50)]
        got = []
        for _ in range(50):
            m = await b.recv(timeout=10)
            assert m is not None
            got.append(bytes(m.payload))
            m.release()
        assert got == [f"m{i}".encode() for i in range(50)]  # in order
        for c in comps:
            await c  # result(): raises unless delivered
        assert (await b.info())["endpoints"] == 2
        assert (await a.daemon_stats())["completed"] == 50
        assert a.peers()["0@lo"]["delivered"] == 50


async def test_back_pressure_limits_requests_in_flight(holding: tuple[ShimServer, HoldingHandler]) -> None:
    server, handler = holding
    async with await AsyncEndpoint.attach(server.path, 1) as ep:
        comps = [await ep.send(LO, b"x", portal=1) for _ in range(10)]
        port = server.ports[1]
        # max_in_flight holds the rest back: the port stalls with six descriptors left in the ring.
        await until(lambda: port._stalled and port._submit.available() == 6, "port stalled with 6 waiting")
        assert len(handler.held) == 4 and port.in_flight == 4 and port.stats()["stalls"] == 1
        for p, r in handler.held[:2]:
            p.complete(r, Status.DELIVERED)
        await until(lambda: len(handler.held) == 6, "completions resume consumption")
        for p, r in handler.held[2:]:
            p.complete(r, Status.TIMED_OUT, "no ack within 50 s")
        await until(lambda: len(handler.held) == 10, "all handed over")
        for p, r in handler.held[6:]:
            p.complete(r, Status.DELIVERED)
        for c in comps:
            assert await c.wait(10)
        assert [c.status for c in comps].count(Status.TIMED_OUT) == 4
        assert next(c for c in comps if c.status is Status.TIMED_OUT).reason == "no ack within 50 s"


async def test_complete_exactly_once_and_one_notify_per_iteration(holding: tuple[ShimServer, HoldingHandler]) -> None:
    server, handler = holding
    async with await AsyncEndpoint.attach(server.path, 1) as ep:
        comps = [await ep.send(LO, b"x", portal=1) for _ in range(4)]
        await until(lambda: len(handler.held) == 4, "requests handed over")
        port = server.ports[1]
        assert not await comps[0].wait(0.01)  # arms the endpoint: it now sleeps on its eventfd
        before = port.counters["notifies_out"]
        for p, r in handler.held:
            p.complete(r, Status.DELIVERED)
        for c in comps:
            assert await c.wait(10)
        assert port.counters["notifies_out"] - before == 1  # four completions, one doorbell
        p, r = handler.held[0]
        with pytest.raises(LocalProtocolError, match="twice"):
            p.complete(r, Status.DELIVERED)
        assert payload_view_is_shared_memory(r)


def payload_view_is_shared_memory(req: SendRequest) -> bool:
    return isinstance(req.payload, memoryview) and not req.payload.readonly


async def test_invalid_descriptors_are_completed_invalid(holding: tuple[ShimServer, HoldingHandler]) -> None:
    server, handler = holding
    async with await AsyncEndpoint.attach(server.path, 1) as ep:
        core = ep._core
        slot = await ep.reserve(100)
        offset = slot._offset
        cases = [
            (offset + 1, 10, "not a TX slot"),  # not a slot start
            (core.layout.rx.offset, 10, "not a TX slot"),  # a slot of the other pool
            (offset, core.tx.lookup(offset) + 1, "exceeds slot"),  # longer than the slot  # type: ignore[operator]
        ]
        comps = []
        for i, (desc_off, length, _why) in enumerate(cases):
            cookie = 1000 + i
            comp = AsyncCompletion(cookie, LO, length, -1, ep)
            core.pending[cookie] = comp
            fields = ("sent", "delivered", "failed", "received", "bytes_sent", "bytes_received", "in_flight")
            core.peers.setdefault(LO, dict.fromkeys(fields, 0))["in_flight"] += 1
            assert core.submit.put(cookie, desc_off, length, 1, LO, 0)
            comps.append(comp)
        core.submit.publish()
        core.kick_want |= abi.FLAG_NEED_WAKEUP
        core.kick_if_wanted()
        for comp, (_o, _l, why) in zip(comps, cases):
            assert await comp.wait(10)
            assert comp.status is Status.INVALID and why in comp.reason
        # The same TX slot posted twice while in flight: the second is refused.
        first = slot.post(LO, 1)
        await until(lambda: len(handler.held) == 1, "first post handed over")
        dup = AsyncCompletion(2000, LO, 100, -1, ep)
        core.pending[2000] = dup
        core.peers[LO]["in_flight"] += 1
        core.submit.put(2000, offset, 100, 1, LO, 0)
        core.submit.publish()
        core.kick_want |= abi.FLAG_NEED_WAKEUP
        core.kick_if_wanted()
        assert await dup.wait(10)
        assert dup.status is Status.INVALID and "already in flight" in dup.reason
        assert len(handler.held) == 1
        p, r = handler.held[0]
        p.complete(r, Status.DELIVERED)
        await first
        assert server.ports[1].counters["invalid"] == 4


async def test_double_release_is_an_error_event(loop_server: ShimServer) -> None:
    async with await AsyncEndpoint.attach(loop_server.path, 1) as ep:
        await (await ep.send(LO, b"self", portal=1))
        m = await ep.recv(10)
        assert m is not None
        offset = m._offset
        m.release()
        core = ep._core
        core.release_ring.put(offset)  # a buggy endpoint releases it again
        core.release_ring.put(12345)  # and something that never was an RX slot
        core.release_ring.publish()
        core.kick_want |= abi.FLAG_NEED_WAKEUP_RELEASE
        core.kick_if_wanted()
        await until(lambda: (ep.poll(), core.counters["events"])[1] == 2, "two error events")
        assert "outside the RX slots" in core.last_event
        assert loop_server.ports[1].counters["bad_releases"] == 2
        # ... and the port still works.
        await (await ep.send(LO, b"again", portal=1))
        m2 = await ep.recv(10)
        assert m2 is not None and bytes(m2.payload) == b"again"
        m2.release()


async def test_ring_overrun_disconnects_only_that_endpoint(loop_server: ShimServer) -> None:
    async with await AsyncEndpoint.attach(loop_server.path, 1) as good, await AsyncEndpoint.attach(loop_server.path, 2) as bad:
        pending = await bad.send(LO, b"lost?", portal=77)
        await pending.wait(10)
        core = bad._core
        ctrl = core.mem[core.layout.rings[abi.RING_SUBMIT].ctrl :][:8].cast("I")
        ctrl[0] = (ctrl[0] + core.submit.entries + 5) & 0xFFFFFFFF  # producer far beyond the ring
        ctrl.release()
        os.eventfd_write(core.kick_fd, 1)
        await until(lambda: not bad.attached, "bad endpoint disconnected")
        assert "overrun" in core.dead or "overrun" in core.last_event  # type: ignore[operator]
        assert 2 not in loop_server.ports and loop_server.counters["disconnected"] == 1
        with pytest.raises(ShimError) as e:
            await bad.send(LO, b"x", portal=1)
        assert e.value.code == errno.ENOTCONN
        await (await good.send(LO, b"still fine", portal=1))
        m = await good.recv(10)
        assert m is not None and bytes(m.payload) == b"still fine"
        m.release()


async def test_releasing_without_consuming_detaches_the_receiver_and_fails_nobody_else(
        loop_server: ShimServer, caplog: pytest.LogCaptureFixture) -> None:
    """A receiver that gives its RX buffers back but never moves its deliver-ring consumer index
    fills the deliver ring while RX slots are free.  That receiver is detached, naming the index;
    the sender's messages end DELIVERED or NO_RECEIVER, never as a daemon error."""
    import logging

    caplog.set_level(logging.WARNING, logger="lu2k.shim")
    async with await AsyncEndpoint.attach(loop_server.path, 1) as sender, await AsyncEndpoint.attach(loop_server.path, 3) as other:
        hostile = await AsyncEndpoint.attach(loop_server.path, 2)
        core = hostile._core
        asyncio.get_running_loop().remove_reader(core.epoll.fileno())  # the library must not consume for it
        entries = core.deliver.entries
        statuses = []
        for i in range(entries + 4):
            comp = await sender.send(LO, f"m{i}".encode(), portal=2)
            assert await comp.wait(10), f"message {i} never completed"
            statuses.append(comp.status)
            for offset, *_rest in core.deliver.take():  # read, never commit()
                core.release_ring.put(offset)
            core.release_ring.publish()
            os.eventfd_write(core.kick_fd, 1)
            await until(lambda: loop_server.ports.get(2) is None or not loop_server.ports[2]._rx_delivered, "releases taken")
        assert set(statuses) <= {Status.DELIVERED, Status.NO_RECEIVER}, statuses
        assert statuses[:entries] == [Status.DELIVERED] * entries and statuses[-1] == Status.NO_RECEIVER
        await until(lambda: 2 not in loop_server.ports, "receiver detached")
        assert "deliver ring consumer index" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        await (await sender.send(LO, b"still fine", portal=3))  # the sender and everyone else carry on
        m = await other.recv(10)
        assert m is not None and bytes(m.payload) == b"still fine"
        m.release()
        core.fail_all("test done")
        core.close()


def raw_call(path: str, packet: bytes) -> tuple[int, int, int, str, bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    try:
        s.connect(path)
        s.send(packet)
        return abi.decode_reply(s.recv(abi.MAX_CTL_PACKET))
    finally:
        s.close()


async def test_bad_control_packets_get_errno_replies(loop_server: ShimServer) -> None:
    path = loop_server.path
    loop = asyncio.get_running_loop()

    async def call(packet: bytes) -> tuple[int, int, int, str, bytes]:
        return await loop.run_in_executor(None, raw_call, path, packet)

    _c, seq, err, reason, _a = await call(abi.CTL_HDR.pack(abi.ior(0x7F, 8), 9) + bytes(8))
    assert (seq, err) == (9, errno.ENOTTY) and "unknown command" in reason
    _c, _s, err, reason, _a = await call(abi.CTL_HDR.pack(abi.ior(3, 12), 1) + bytes(12))
    assert err == errno.EINVAL and "wrong size" in reason
    _c, _s, err, _r, _a = await call(abi.CTL_HDR.pack(abi.CMD_INFO, 1) + bytes(3))
    assert err == errno.EINVAL
    _c, _s, err, _r, _a = await call(b"abc")
    assert err == errno.EINVAL
    _c, _s, err, _r, _a = await call(abi.encode_request(abi.CMD_DETACH, 1))
    assert err == errno.ENOTCONN
    _c, _s, err, _r, _a = await call(abi.encode_request(abi.CMD_STATS, 1, bytes(abi.STATS.size)))
    assert err == errno.ENOTCONN
    bad_version = abi.ATTACH.pack(abi.ATTACH_IN.pack(99, 0, 0, 0, 0, 0), bytes(20), 0, bytes(abi.LAYOUT.size))
    _c, _s, err, reason, _a = await call(abi.encode_request(abi.CMD_ATTACH, 1, bad_version))
    assert err == errno.EPROTO and "ABI 99" in reason
    huge = abi.ATTACH.pack(abi.ATTACH_IN.pack(abi.ABI_VERSION, 0, 0, 0, 1 << 40, 0), bytes(20), 0, bytes(abi.LAYOUT.size))
    _c, _s, err, reason, _a = await call(abi.encode_request(abi.CMD_ATTACH, 1, huge))
    assert err == errno.EINVAL and "tx_pool_bytes" in reason
    flags = abi.ATTACH.pack(abi.ATTACH_IN.pack(abi.ABI_VERSION, 0, 8, 0, 0, 0), bytes(20), 0, bytes(abi.LAYOUT.size))
    _c, _s, err, _r, _a = await call(abi.encode_request(abi.CMD_ATTACH, 1, flags))
    assert err == errno.EINVAL
    # The reserved field is 0 in this ABI; a later revision may give it a meaning, so a daemon
    # that does not know it refuses rather than attach with it ignored.
    reserved = abi.ATTACH.pack(abi.ATTACH_IN.pack(abi.ABI_VERSION, 0, 0, 1, 0, 0), bytes(20), 0, bytes(abi.LAYOUT.size))
    _c, _s, err, reason, _a = await call(abi.encode_request(abi.CMD_ATTACH, 1, reserved))
    assert err == errno.EINVAL and "reserved" in reason
    _c, _s, err, _r, arg = await call(abi.encode_request(abi.CMD_INFO, 1, bytes(abi.INFO.size)))
    assert err == 0 and abi.INFO.unpack(arg)[4] == LO
    assert loop_server.counters["rejected"] == 10
    async with await AsyncEndpoint.attach(path, 3) as ep:  # the daemon carries on
        await (await ep.send(LO, b"ok", portal=3))


async def test_attach_twice_on_one_connection_is_eisconn(loop_server: ShimServer) -> None:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.setblocking(False)
    await loop.sock_connect(s, loop_server.path)
    req = abi.ATTACH.pack(abi.ATTACH_IN.pack(abi.ABI_VERSION, 4, 0, 0, 0, 0), bytes(20), 0, bytes(abi.LAYOUT.size))
    for expect in (0, errno.EISCONN):
        await loop.sock_sendall(s, abi.encode_request(abi.CMD_ATTACH, 1, req))
        await until(lambda: _readable(s), "reply")
        packet, anc, _f, _a = s.recvmsg(abi.MAX_CTL_PACKET, socket.CMSG_SPACE(12))
        for _lvl, _typ, data in anc:
            for i in range(0, len(data) - len(data) % 4, 4):
                os.close(int.from_bytes(data[i : i + 4], "little"))
        assert abi.decode_reply(packet)[2] == expect
    assert 4 in loop_server.ports and loop_server.ports[4].pid == os.getpid() and loop_server.ports[4].uid == os.getuid()
    s.close()
    await until(lambda: 4 not in loop_server.ports, "EOF detaches the port")


def _readable(s: socket.socket) -> bool:
    import select

    return bool(select.select([s], [], [], 0)[0])


async def test_handler_can_refuse_attach(holding: tuple[ShimServer, HoldingHandler]) -> None:
    server, handler = holding
    handler.refuse = ShimError(errno.EPERM, "uid 1234 may not bind portal 1")
    with pytest.raises(ShimError) as e:
        await AsyncEndpoint.attach(server.path, 1)
    assert e.value.code == errno.EPERM and "may not bind" in str(e.value)
    assert server.ports == {}


async def test_server_close_cancels_pending_and_rx_wait(holding: tuple[ShimServer, HoldingHandler]) -> None:
    server, handler = holding
    ep = await AsyncEndpoint.attach(server.path, 1)
    comp = await ep.send(LO, b"x", portal=1)
    await until(lambda: len(handler.held) == 1, "handed over")
    port = server.ports[1]
    bufs = []
    while (b := port.rx_alloc(1 << 20)) is not None:
        bufs.append(b)
    assert bufs and port.rx_alloc(1 << 20) is None
    waiter = asyncio.ensure_future(port.rx_wait())
    await asyncio.sleep(0)
    await server.close()
    with pytest.raises(ShimError) as e:
        await waiter
    assert e.value.code == errno.ENOTCONN
    assert handler.detached == [1] and not port.attached
    assert await comp.wait(10)
    assert comp.status is Status.CANCELLED
    port.complete(handler.held[0][1], Status.CANCELLED, "engine fails it after detach")  # accepted, not written
    with pytest.raises(ShimError):
        await port.rx_wait()
    await ep.detach()


async def test_rx_buffers_deliver_and_abort(holding: tuple[ShimServer, HoldingHandler]) -> None:
    server, _handler = holding
    async with await AsyncEndpoint.attach(server.path, 1) as ep:
        port = server.ports[1]
        buf = port.rx_alloc(5)
        assert buf is not None and len(buf.view) == 5
        buf.view[:] = b"hello"
        port.deliver(buf, LO, 9, 5)
        with pytest.raises(LocalProtocolError):
            port.deliver(buf, LO, 9, 5)
        m = await ep.recv(10)
        assert m is not None and (bytes(m.payload), m.src_portal, m.dst_portal) == (b"hello", 9, 1)
        m.release()
        spare = port.rx_alloc(100)
        assert spare is not None
        port.rx_abort(spare)
        with pytest.raises(LocalProtocolError):
            port.rx_abort(spare)
        too_big = port.rx_alloc(port.max_message_size + 1)
        assert too_big is None
        with pytest.raises(LocalProtocolError, match="exceeds"):
            b2 = port.rx_alloc(4)
            assert b2 is not None
            port.deliver(b2, LO, 0, 5)


async def test_stale_socket_replaced_live_socket_refused(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(path)
    dead.close()  # leaves the file, nobody listening
    first = serve_loopback(path)
    await first.start()
    second = serve_loopback(path)
    with pytest.raises(ShimError) as e:
        await second.start()
    assert e.value.code == errno.EADDRINUSE
    await first.close()
    assert not os.path.exists(path)
    with open(path, "w"):
        pass
    with pytest.raises(ShimError) as e:
        await serve_loopback(path).start()
    assert e.value.code == errno.EEXIST


def test_shim_config_validation() -> None:
    cfg = ShimConfig(max_in_flight=8, batch=32, socket_mode=0o660)
    assert cfg.max_in_flight == 8 and cfg.batch == 32
    with pytest.raises(ConfigError, match="unknown shim option"):
        ShimConfig(colour="blue")
    with pytest.raises(ConfigError, match="lu2k.shim.max_in_flight"):
        ShimConfig(max_in_flight=0)
    with pytest.raises(ConfigError, match="integer"):
        ShimConfig(batch="many")


async def test_killed_endpoint_process_is_detached(loop_server: ShimServer) -> None:
    # An application that dies without DETACH (kill -9): EOF on its control socket detaches
    # its port and frees the portal; the daemon is unaffected.
    code = (
        "import sys, time\n"
        "from lu2k.kernel_shim.endpoint import Endpoint\n"
        f"ep = Endpoint.attach({loop_server.path!r}, 9)\n"
        "ep.send('0@lo', b'x' * 1000, portal=9)\n"
        "print('attached', flush=True)\n"
        "time.sleep(600)\n"
    )
    import sys

    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"attached"
    await until(lambda: 9 in loop_server.ports and loop_server.ports[9].counters["delivered"] == 1, "message looped back")
    port = loop_server.ports[9]
    proc.kill()
    await proc.wait()
    await until(lambda: 9 not in loop_server.ports, "port detached after the process died")
    assert not port.attached and "closed the control socket" in port.detach_reason
    async with await AsyncEndpoint.attach(loop_server.path, 9) as ep:  # the portal is free again
        await (await ep.send(LO, b"y", portal=9))


async def test_daemon_side_bug_is_an_eio_reply(tmp_path: object) -> None:
    class BadNid(HoldingHandler):
        def local_nid(self) -> bytes:
            return b"short"  # a broken handler: not a 20-byte packed NID

    handler = BadNid()
    server = ShimServer(os.path.join(str(tmp_path), "bad.sock"), handler)
    handler.server = server
    await server.start()
    try:
        with pytest.raises(ShimError) as e:
            await AsyncEndpoint.attach(server.path, 1)
        assert e.value.code == errno.EIO and "20 packed bytes" in str(e.value)
        assert server.ports == {}
    finally:
        await server.close()


async def test_async_completion_wakes_after_recv_took_other_events(holding: tuple[ShimServer, HoldingHandler]) -> None:
    # recv() processing a delivery clears the endpoint's NEED_WAKEUP bit (it is busy); a
    # completion awaited afterwards must still be woken: awaiting re-arms the doorbell.
    server, handler = holding
    async with await AsyncEndpoint.attach(server.path, 1) as ep:
        comp = await ep.send(LO, b"held", portal=1)
        await until(lambda: len(handler.held) == 1, "held")
        port = server.ports[1]
        buf = port.rx_alloc(3)
        assert buf is not None
        buf.view[:] = b"abc"
        port.deliver(buf, LO, 5, 3)
        port._flush()  # publish now (and notify) ...
        ep._core.drain_notify()  # ... and swallow the notify, so recv() itself finds the delivery
        m = await ep.recv(10)
        assert m is not None and bytes(m.payload) == b"abc"
        m.release()
        asyncio.get_running_loop().call_later(0.01, lambda: port.complete(handler.held[0][1], Status.DELIVERED))
        assert await comp.wait(10)
