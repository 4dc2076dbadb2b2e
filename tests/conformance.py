"""Backend conformance, transport level: what every backend must do, whatever it runs on.

Each check takes a ``make_backend(settings) -> Backend`` factory and an address to listen on,
so a backend's test module (and the guest tier for RDS/verbs) runs the same checks:

    from conformance import TRANSPORT_CHECKS, BackendUnderTest
    @pytest.mark.parametrize("check", TRANSPORT_CHECKS, ids=lambda c: c.__name__)
    async def test_conformance(check): await check(BackendUnderTest(MyBackend, "127.0.0.1"))

Daemon-level checks (exactly-once completions through two daemons) are in
``tests/test_daemon_e2e.py`` and are parametrized by backend name the same way.
"""

from __future__ import annotations

import asyncio
import os
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from lu2k import wire
from lu2k.backends.base import Backend, BackendSettings, LinkProfile, Transport
from lu2k.errors import ConnectError, NetworkError, ReadError
from lu2k.nid import parse_net, parse_nid
from lu2k.wire import ConnType, FrameType

A = parse_nid("127.0.0.1@tcp").to_bytes()
B = parse_nid("127.0.0.2@tcp").to_bytes()


@dataclass
class BackendUnderTest:
    cls: type[Backend]
    host: str
    port: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    max_message_size: int = 4 << 20
    key: bytes = b"conformance-key"
    # False for backends that deliver messages in the order they complete (QUIC's stream per
    # message): the engine's sequence numbers and dedupe make order a backend's choice.
    ordered: bool = True

    def make(self, profile: LinkProfile | None = None) -> Backend:
        options = {k: v for k, v in self.options.items() if k != "_net"}
        net = parse_net(self.options.get("_net", "tcp"))
        settings = BackendSettings(net, self.port, self.max_message_size, key=self.key, options=options,
                                   profile=profile or LinkProfile())
        return self.cls(settings)


async def run_hello(backend: Backend, out: Transport, inn: Transport, key: bytes) -> tuple[wire.HelloResult, wire.HelloResult]:
    """The engine's hello over a fresh pair, ending with ``on_hello_done`` on both sides."""
    net = backend.settings.net
    src, dst = parse_nid(f"127.0.0.1@{net}"), parse_nid(f"127.0.0.2@{net}")
    init = wire.HelloInitiator(key=key, backend=backend.name, src=src, dst=dst, conn_type=ConnType.ANY, incarnation=1,
                               sealed=backend.seal_frames, channel_binding=out.channel_binding)
    resp = wire.HelloResponder(key=key, backend=backend.name, local_nids=frozenset({dst}), incarnation=2,
                               sealed=backend.seal_frames, channel_binding=inn.channel_binding)

    async def acceptor() -> wire.HelloResult:
        while not resp.done:
            for f in await asyncio.wait_for(inn.recv(), 10):
                await inn.send([(resp.receive(f), b"")])
        assert resp.result is not None
        inn.on_hello_done(resp.result)
        return resp.result

    task = asyncio.ensure_future(acceptor())
    await out.send([(init.start(), b"")])
    while not init.done:
        for f in await asyncio.wait_for(out.recv(), 10):
            reply = init.receive(f)
            if reply is not None:
                await out.send([(reply, b"")])
    assert init.result is not None
    out.on_hello_done(init.result)
    return init.result, await task


async def _pair(but: BackendUnderTest, *, hello: bool = True, conn_type: ConnType = ConnType.ANY,
                profile: LinkProfile | None = None) -> tuple[Backend, Backend, Transport, Transport, Any]:
    server, client = but.make(profile), but.make(profile)
    accepted: asyncio.Queue[Transport] = asyncio.Queue()

    async def on_accept(t: Transport) -> None:
        await accepted.put(t)

    listener = await server.listen(but.host, but.port, on_accept)
    host, port = listener.address
    out = await client.connect(but.host if but.host else host, port, conn_type, 5.0)
    inn = await asyncio.wait_for(accepted.get(), 10)
    if hello:
        try:
            await run_hello(client, out, inn, but.key)
        except BaseException:
            await _close(out, inn, listener, server, client)
            raise
    return server, client, out, inn, listener


async def _close(*things: Any) -> None:
    for t in things:
        if isinstance(t, Transport):
            t.close()
            await t.wait_closed()
        elif isinstance(t, Backend):
            await t.close()
        else:
            t.close()


def _msg(seq: int, payload: bytes) -> tuple[bytes, bytes]:
    return wire.encode_msg_header(seq, A, B, 0, 0, payload, False), payload


async def _recv_n(t: Transport, n: int) -> list[wire.Frame]:
    out: list[wire.Frame] = []
    while len(out) < n:
        out += await asyncio.wait_for(t.recv(), 30)
    return out


async def check_messages_arrive_intact(but: BackendUnderTest) -> None:
    """Every frame arrives intact, exactly once -- and in send order for ordered backends."""
    server, client, out, inn, lst = await _pair(but)
    try:
        rnd = os.urandom(1 << 20)
        sizes = [0, 1, 63, 64, 4096, 65537, 1 << 20, but.max_message_size] + [17 * i for i in range(200)]
        payloads = [(rnd * 5)[: s] if s else b"" for s in sizes]
        sender = asyncio.ensure_future(out.send([_msg(i + 1, p) for i, p in enumerate(payloads)]))
        frames = await _recv_n(inn, len(payloads))
        await sender
        got = [(wire.decode_msg(f.header).seq, zlib.crc32(f.payload)) for f in frames]
        want = [(i + 1, zlib.crc32(p)) for i, p in enumerate(payloads)]
        assert (got if but.ordered else sorted(got)) == want
    finally:
        await _close(out, inn, lst, server, client)


async def check_reverse_direction_carries_acks(but: BackendUnderTest) -> None:
    server, client, out, inn, lst = await _pair(but)
    try:
        await out.send([_msg(1, b"ping")])
        await _recv_n(inn, 1)
        await inn.send([(wire.encode_acks([(1, 0)]), b"")])
        (ack,) = await _recv_n(out, 1)
        assert ack.header.type is FrameType.ACK and wire.decode_acks(ack) == [(1, 0)]
    finally:
        await _close(out, inn, lst, server, client)


async def check_payload_lands_in_supplied_buffer(but: BackendUnderTest) -> None:
    server, client, out, inn, lst = await _pair(but)
    try:
        size = 300_000
        target = bytearray(size)
        inn.set_buffer_for(lambda h: memoryview(target) if h.type is FrameType.MSG else None)
        payload = os.urandom(size)
        await asyncio.gather(out.send([_msg(1, payload)]), _recv_n(inn, 1))
        assert bytes(target) == payload
    finally:
        await _close(out, inn, lst, server, client)


async def check_close_is_seen_by_peer(but: BackendUnderTest) -> None:
    server, client, out, inn, lst = await _pair(but)
    try:
        await out.send([_msg(1, b"last words")])
        (f,) = await _recv_n(inn, 1)
        assert bytes(f.payload) == b"last words"
        out.close()
        with pytest.raises(ReadError):
            while True:
                await asyncio.wait_for(inn.recv(), 30)
    finally:
        await _close(out, inn, lst, server, client)


async def check_connect_refused_is_connect_error(but: BackendUnderTest) -> None:
    client = but.make()
    server = but.make()
    lst = await server.listen(but.host, 0, lambda t: asyncio.sleep(0))
    port = lst.address[1]
    lst.close()
    await server.close()
    try:
        with pytest.raises((ConnectError, NetworkError)):
            await client.connect(but.host, port, ConnType.ANY, 3.0)
    finally:
        await client.close()


async def check_send_after_close_fails_cleanly(but: BackendUnderTest) -> None:
    server, client, out, inn, lst = await _pair(but)
    try:
        inn.close()
        with pytest.raises(NetworkError):
            for _ in range(200):  # the failure may surface after a few sends
                await asyncio.wait_for(out.send([_msg(1, b"x" * 65536)]), 10)
                await asyncio.sleep(0.01)
    finally:
        await _close(out, inn, lst, server, client)


async def check_close_under_queued_sends_fails_each_cleanly(but: BackendUnderTest) -> None:
    """Sends queued behind each other when the connection closes: each one ends, sent or with a
    NetworkError -- never a CancelledError the caller did not ask for, which would leave its
    messages' payloads marked as being read and their completions owed for ever."""
    server, client, out, inn, lst = await _pair(but)
    try:
        sends = [asyncio.ensure_future(out.send([_msg(i + 1, b"q" * (1 << 20))])) for i in range(48)]
        await asyncio.sleep(0.05)  # the first are on the wire, the rest wait behind them
        out.close()
        done, pending = await asyncio.wait(sends, timeout=30)
        assert not pending, f"{len(pending)} sends still pending 30 s after close()"
        outcomes = ["cancelled" if s.cancelled() else type(s.exception()).__name__ if s.exception() else "sent" for s in sends]
        assert not any(s.cancelled() for s in sends), outcomes
        assert all(s.exception() is None or isinstance(s.exception(), NetworkError) for s in sends), outcomes
    finally:
        await _close(out, inn, lst, server, client)


TRANSPORT_CHECKS: list[Callable[[BackendUnderTest], Awaitable[None]]] = [
    check_messages_arrive_intact,
    check_reverse_direction_carries_acks,
    check_payload_lands_in_supplied_buffer,
    check_close_is_seen_by_peer,
    check_connect_refused_is_connect_error,
    check_send_after_close_fails_cleanly,
    check_close_under_queued_sends_fails_each_cleanly,
]
