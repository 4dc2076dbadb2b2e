"""Striped BULK connections of the tcp backend: the pure parts (JOIN records, keys, how a
batch is spread over stripes, the default) and real sockets on loopback (stripes join, every frame arrives
exactly once, a lost stripe ends the connection, a forged JOIN attaches nothing)."""

from __future__ import annotations

import asyncio
import os
import socket
import zlib
from typing import Any

import pytest

from lu2k import wire
from lu2k.backends import tcp_stripes as ts
from lu2k.backends.base import BackendSettings, LinkProfile
from lu2k.backends.tcp import TcpBackend
from lu2k.backends.tcp_bbr import BbrWatch
from lu2k.errors import ConfigError, NetworkError, WriteError
from lu2k.nid import parse_net, parse_nid
from lu2k.wire import ConnType, FrameType

KEY = b"stripe-test-key"
A = parse_nid("127.0.0.1@tcp")
B = parse_nid("127.0.0.2@tcp")


def backend(**options: Any) -> TcpBackend:
    return TcpBackend(BackendSettings(parse_net("tcp"), 0, 4 << 20, key=KEY, options=options))


# --- pure -----------------------------------------------------------------------------------


def test_join_record_round_trip_and_refusals() -> None:
    jid = os.urandom(16)
    assert ts.decode_join(ts.encode_join(3, jid)) == (3, jid)
    assert ts.decode_join(ts.encode_join(3, jid)[:-1]) is None
    assert ts.decode_join(b"LU2K" + ts.encode_join(3, jid)[4:]) is None  # a hello's magic
    assert ts.decode_join(ts.JOIN.pack(ts.JOIN_MAGIC, 9, 1, jid)) is None  # another version
    for index in (0, ts.MAX_STREAMS):
        assert ts.decode_join(ts.JOIN.pack(ts.JOIN_MAGIC, ts.JOIN_VERSION, index, jid)) is None


def test_stripe_keys_differ_per_stripe_and_match_across_ends() -> None:
    c2a, a2c = os.urandom(32), os.urandom(32)
    conn = wire.HelloResult(B, A, ConnType.BULK, 1, 1, tx_key=c2a, rx_key=a2c, sealed=True)
    acc = wire.HelloResult(A, B, ConnType.BULK, 2, 1, tx_key=a2c, rx_key=c2a, sealed=True)
    assert ts.stripe_keys(conn, 0) is conn
    keys = {ts.stripe_keys(conn, i).tx_key for i in range(4)}
    assert len(keys) == 4
    for i in range(1, 4):
        assert ts.stripe_keys(conn, i).tx_key == ts.stripe_keys(acc, i).rx_key
        assert ts.stripe_keys(conn, i).rx_key == ts.stripe_keys(acc, i).tx_key
    assert ts.join_id(conn.tx_key) == ts.join_id(acc.rx_key) != ts.join_id(conn.rx_key)


class _Stripe:
    """A stripe's send side: ``send`` returns once ``gate`` is open (a full socket keeps it shut)."""

    peer_address = "127.0.0.2:988"

    def __init__(self, open_: bool = True, fail: bool = False) -> None:
        self.gate = asyncio.Event()
        if open_:
            self.gate.set()
        self.fail = fail
        self.shares: list[list[tuple[bytes, bytes]]] = []
        self.held = 0
        self.ended = False

    async def send(self, frames: Any) -> None:
        self.shares.append(list(frames))
        self.held += sum(len(h) + len(p) for h, p in frames)
        if self.fail:
            raise WriteError("broken pipe")
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.ended = True
            raise

    def unsent_bytes(self) -> int:
        return self.held

    def close(self) -> None:
        self.gate.set()


def _frames(n: int, size: int = 64 << 10) -> list[tuple[bytes, bytes]]:
    return [(b"h%d" % i, b"x" * size) for i in range(n)]


async def test_a_full_stripe_keeps_one_share_and_the_others_carry_the_batch() -> None:
    slow, fast = _Stripe(open_=False), _Stripe()
    t = ts.StripedTransport(slow)  # type: ignore[arg-type]
    frames = _frames(40)
    sending = asyncio.ensure_future(t._spread([slow, fast], frames))  # type: ignore[list-item]
    for _ in range(50):
        await asyncio.sleep(0)
    assert len(slow.shares) == 1 and not sending.done()  # waits only for the share the full socket has
    carried = [f for share in fast.shares for f in share]
    assert len(carried) == len(frames) - len(slow.shares[0])
    assert all(sum(len(h) + len(p) for h, p in share) <= ts.SHARE_BYTES + 64 for share in fast.shares)
    slow.gate.set()
    await asyncio.wait_for(sending, 5)
    sent = [f for share in slow.shares + fast.shares for f in share]
    assert sorted(h for h, _ in sent) == sorted(h for h, _ in frames)  # each frame once


async def test_shares_go_to_the_stripe_holding_the_fewest_bytes() -> None:
    busy, idle = _Stripe(), _Stripe()
    busy.held = 10 << 20
    t = ts.StripedTransport(busy)  # type: ignore[arg-type]
    await t._spread([busy, idle], _frames(2))  # type: ignore[list-item]
    assert idle.shares and not busy.shares


async def test_a_failing_stripe_fails_the_send_and_no_write_outlives_it() -> None:
    broken, slow = _Stripe(fail=True), _Stripe(open_=False)
    t = ts.StripedTransport(broken)  # type: ignore[arg-type]
    t.stripes = [broken, slow]  # type: ignore[list-item]
    with pytest.raises(WriteError, match="broken pipe"):
        await asyncio.wait_for(t._spread([broken, slow], _frames(20)), 5)  # type: ignore[list-item]
    assert slow.gate.is_set() or slow.ended  # the connection ended: the other write was closed or cancelled


async def test_a_cancelled_send_cancels_the_stripe_writes() -> None:
    slow = _Stripe(open_=False)
    other = _Stripe(open_=False)
    t = ts.StripedTransport(slow)  # type: ignore[arg-type]
    sending = asyncio.ensure_future(t._spread([slow, other], _frames(8)))  # type: ignore[list-item]
    await asyncio.sleep(0.01)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    assert slow.ended and other.ended


def test_one_socket_by_default_and_streams_checked() -> None:
    geo = TcpBackend(BackendSettings(parse_net("tcp"), 0, 4 << 20, key=KEY, profile=LinkProfile(rtt_ms=600, rate_mbit=20, loss=0.01)))
    assert geo.streams == ts.DEFAULT_STREAMS == 1 and geo.describe()["streams"] == 1
    assert backend(streams=2).streams == 2
    for bad in (0, 17, "many"):
        with pytest.raises(ConfigError, match="streams"):
            backend(streams=bad)


# --- real sockets ------------------------------------------------------------------------------


async def _hello(client: TcpBackend, out: Any, inn: Any) -> None:
    """The engine's hello for a BULK connection, ending with on_hello_done on both ends."""
    init = wire.HelloInitiator(key=KEY, backend="tcp", src=A, dst=B, conn_type=ConnType.BULK, incarnation=1,
                               sealed=client.seal_frames, channel_binding=b"")
    resp = wire.HelloResponder(key=KEY, backend="tcp", local_nids=frozenset({B}), incarnation=2, sealed=client.seal_frames,
                               channel_binding=b"")

    async def acceptor() -> None:
        while not resp.done:
            for f in await asyncio.wait_for(inn.recv(), 10):
                await inn.send([(resp.receive(f), b"")])
        assert resp.result is not None
        inn.on_hello_done(resp.result)

    task = asyncio.ensure_future(acceptor())
    await out.send([(init.start(), b"")])
    while not init.done:
        for f in await asyncio.wait_for(out.recv(), 10):
            reply = init.receive(f)
            if reply is not None:
                await out.send([(reply, b"")])
    assert init.result is not None
    out.on_hello_done(init.result)
    await task


async def _striped_pair(streams: int, **options: Any) -> tuple[TcpBackend, TcpBackend, Any, Any, Any]:
    server, client = backend(**options), backend(streams=streams, **options)
    accepted: asyncio.Queue[Any] = asyncio.Queue()

    async def on_accept(t: Any) -> None:
        await accepted.put(t)

    lst = await server.listen("127.0.0.1", 0, on_accept)
    out = await client.connect("127.0.0.1", lst.address[1], ConnType.BULK, 5.0)
    inn = await asyncio.wait_for(accepted.get(), 10)
    await _hello(client, out, inn)
    for _ in range(500):
        if len(inn.stripes) == streams and len(out.stripes) == streams:
            break
        await asyncio.sleep(0.01)
    return server, client, out, inn, lst


async def _close(server: TcpBackend, client: TcpBackend, out: Any, inn: Any, lst: Any) -> None:
    out.close()
    inn.close()
    lst.close()
    await server.close()
    await client.close()


def _msg(seq: int, payload: bytes) -> tuple[bytes, bytes]:
    return wire.encode_msg_header(seq, A.to_bytes(), B.to_bytes(), 0, 0, payload, False), payload


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
async def test_stripes_join_and_every_frame_arrives_once(encryption: str) -> None:
    server, client, out, inn, lst = await _striped_pair(4, encryption=encryption)
    try:
        assert len(out.stripes) == 4 and len(inn.stripes) == 4
        rnd = os.urandom(1 << 20)
        payloads = [rnd[: (i * 7919) % (1 << 20)] for i in range(300)]
        sender = asyncio.ensure_future(asyncio.gather(*(out.send([_msg(i + 1, p) for i, p in enumerate(payloads)][k::10])
                                                        for k in range(10))))
        got: dict[int, int] = {}
        while len(got) < len(payloads):
            for f in await asyncio.wait_for(inn.recv(), 30):
                seq = wire.decode_msg(f.header).seq
                assert seq not in got
                got[seq] = zlib.crc32(f.payload)
        await sender
        assert got == {i + 1: zlib.crc32(p) for i, p in enumerate(payloads)}
        assert sum(s.bytes_received for s in inn.stripes[1:]) > 0  # the data did use the other stripes
        await inn.send([(wire.encode_acks([(1, 0), (2, 0)]), b"")])
        (ack,) = await asyncio.wait_for(out.recv(), 10)
        assert ack.header.type is FrameType.ACK
        assert out.stats()["streams"] == 4
        assert "bbr_restarts" not in out.stats()
        for stripe in out.stripes:  # each socket's BBR watch counts its own restarts; the connection sums them
            stripe._bbr = BbrWatch(0.0, 0, 0, "skip")
            stripe._bbr.restarts = 2
        assert out.stats()["bbr_restarts"] == 8
    finally:
        await _close(server, client, out, inn, lst)


async def test_a_lost_stripe_ends_the_whole_connection() -> None:
    server, client, out, inn, lst = await _striped_pair(3)
    try:
        assert len(inn.stripes) == 3
        inn.stripes[2]._sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(NetworkError):
            for _ in range(10):
                await asyncio.wait_for(out.recv(), 10)
        with pytest.raises(NetworkError):
            await out.send([_msg(1, b"x")])
    finally:
        await _close(server, client, out, inn, lst)


async def test_a_join_with_an_unknown_id_attaches_nothing() -> None:
    server, client, out, inn, lst = await _striped_pair(2)
    try:
        assert len(inn.stripes) == 2
        raw = socket.create_connection(lst.address)
        raw.sendall(ts.encode_join(1, os.urandom(16)))
        raw.settimeout(10)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, raw.recv, 1) == b""  # closed by the acceptor
        raw.close()
        raw = socket.create_connection(lst.address)
        raw.sendall(ts.encode_join(1, out._jid))  # the right id, a stripe index already taken
        raw.settimeout(10)
        assert await loop.run_in_executor(None, raw.recv, 1) == b""
        raw.close()
        assert len(inn.stripes) == 2 and inn.joins_refused == 1
    finally:
        await _close(server, client, out, inn, lst)


async def test_control_connections_are_never_striped() -> None:
    client = backend(streams=4)
    server = backend()

    async def on_accept(t: Any) -> None:
        t.close()

    lst = await server.listen("127.0.0.1", 0, on_accept)
    try:
        t = await client.connect("127.0.0.1", lst.address[1], ConnType.CONTROL, 5.0)
        assert not isinstance(t, ts.StripedTransport)
        t.close()
    finally:
        lst.close()
        await server.close()
        await client.close()
