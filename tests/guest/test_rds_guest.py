"""rds backend on a real AF_RDS kernel (the QEMU guest): conformance, RDS over TCP, engine.

* the shared transport conformance checks (tests/conformance.py) over RDS's loopback
  transport (both ends in one namespace);
* RDS *over TCP* between two network namespaces: fragmentation of 4 MiB frames, the close
  that keeps the socket until RDS's send queue drained, peer loss, bad datagrams;
* two engines talking over the rds backend: hello/HMAC, credits, exactly-once completions.
"""

from __future__ import annotations

import asyncio
import os
import zlib
from typing import Any

import pytest
from conformance import TRANSPORT_CHECKS, BackendUnderTest, _close, _msg, _recv_n, run_hello

from guestutil import NetnsPair, sh
from lu2k import wire
from lu2k.backends.base import BackendSettings, Transport
from lu2k.backends.rds import Kind, RdsBackend, RdsTransport, encode_envelope
from lu2k.engine import Engine
from lu2k.errors import ConnectionClosed, ConnectTimeout, FrameError, ReadError, Status
from lu2k.nid import parse_net
from lu2k.settings import parse_config
from lu2k.wire import ConnType

MAX = 4 << 20


@pytest.mark.parametrize("check", TRANSPORT_CHECKS, ids=lambda c: c.__name__)
async def test_conformance_rds_loopback(check) -> None:  # type: ignore[no-untyped-def]
    await check(BackendUnderTest(RdsBackend, "127.0.0.1", max_message_size=MAX))


def _backend(ns: str, **options: Any) -> RdsBackend:
    return RdsBackend(BackendSettings(parse_net("tcp"), 0, MAX, options={"netns": ns, **options}))


async def _tcp_pair(ns: NetnsPair, **options: Any) -> tuple[RdsBackend, RdsBackend, RdsTransport, RdsTransport, Any]:
    server, client = _backend(ns.b, **options), _backend(ns.a, **options)
    accepted: asyncio.Queue[Transport] = asyncio.Queue()

    async def on_accept(t: Transport) -> None:
        await accepted.put(t)

    lst = await server.listen(ns.addr_b, 0, on_accept)
    out = await client.connect(ns.addr_b, lst.address[1], ConnType.ANY, 30)
    inn = await asyncio.wait_for(accepted.get(), 30)
    assert isinstance(out, RdsTransport) and isinstance(inn, RdsTransport)
    await run_hello(client, out, inn, b"guest-tier-test-key")  # frames flow only after the hello
    return server, client, out, inn, lst


def _rds_tcp_connections(ns: str) -> str:
    # RDS over TCP runs its own TCP connections to port 16385 (RDS_TCP_PORT).
    return sh("ip", "netns", "exec", ns, "ss", "-tnH", "state", "established", "( sport = :16385 or dport = :16385 )")


async def test_rds_over_tcp_fragments_and_reassembles_4mib_frames(netns_pair: NetnsPair) -> None:
    server, client, out, inn, lst = await _tcp_pair(netns_pair)
    try:
        rnd = os.urandom(1 << 20)
        payloads = [rnd * 4, b"", rnd[:1], rnd * 2 + rnd[:12345], rnd[: 64 << 10]] + [rnd[: 997 * i] for i in range(30)]
        sender = asyncio.ensure_future(out.send([_msg(i + 1, p) for i, p in enumerate(payloads)]))
        frames = await _recv_n(inn, len(payloads))
        await sender
        assert [wire.decode_msg(f.header).seq for f in frames] == list(range(1, len(payloads) + 1))
        assert [zlib.crc32(f.payload) for f in frames] == [zlib.crc32(p) for p in payloads]
        # Frames above RDS's 1 MiB message limit went as several datagrams, each within the limit.
        assert out.stats()["datagrams_sent"] > sum(len(p) for p in payloads) // (1 << 20)
        assert out.stats()["datagram_size"] <= 1 << 20
        assert _rds_tcp_connections(netns_pair.a).strip(), "no RDS-over-TCP connection: the loopback transport was used"
        # And the other way (ACK direction) over the same session.
        await inn.send([(wire.encode_acks([(i, 0) for i in range(1, 101)]), b"")])
        (ack,) = await _recv_n(out, 1)
        assert wire.decode_acks(ack) == [(i, 0) for i in range(1, 101)]
    finally:
        await _close(out, inn, lst, server, client)


async def test_large_payload_is_received_in_place_over_tcp(netns_pair: NetnsPair) -> None:
    server, client, out, inn, lst = await _tcp_pair(netns_pair)
    try:
        payload = os.urandom(3 << 20)
        target = bytearray(len(payload))
        inn.set_buffer_for(lambda h: memoryview(target) if h.type is wire.FrameType.MSG else None)
        await asyncio.gather(out.send([_msg(1, payload)]), _recv_n(inn, 1))
        assert target == payload
    finally:
        await _close(out, inn, lst, server, client)


async def test_close_keeps_the_socket_until_rds_drained(netns_pair: NetnsPair) -> None:
    # A slow, long link (netem on the connector's side) keeps messages in RDS's send queue
    # after send() returned, as a satellite hop does.
    sh("ip", "netns", "exec", netns_pair.a, "tc", "qdisc", "add", "dev", netns_pair.dev_a, "root",
       "netem", "delay", "20ms", "rate", "40mbit", "limit", "10000")
    server, client, out, inn, lst = await _tcp_pair(netns_pair)
    try:
        chunk = os.urandom(1 << 20)
        count = 10
        receiver = asyncio.ensure_future(_recv_n(inn, count))
        await out.send([_msg(i + 1, chunk) for i in range(count)])
        # send() returned once the last datagram was queued in the kernel, not delivered:
        # closing the RDS socket now would drop it.  close() must wait for the queue to drain.
        pending = out.pending_messages()
        out.close()
        assert out.stats()["bytes_sent"] >= count << 20
        assert pending > 0, "nothing was left queued: this test would not show a drop on close"
        frames = await asyncio.wait_for(receiver, 120)
        assert len(frames) == count and all(zlib.crc32(f.payload) == zlib.crc32(chunk) for f in frames)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(inn.recv(), 60)
        await out.wait_closed()
        assert out.stats()["close"] == "drained"
    finally:
        await _close(out, inn, lst, server, client)


async def test_peer_loss_is_detected_by_keepalive(netns_pair: NetnsPair) -> None:
    server, client, out, inn, lst = await _tcp_pair(netns_pair, keepalive=0.5, peer_timeout=4)
    try:
        await out.send([_msg(1, b"before the crash")])
        await _recv_n(inn, 1)
        inn._sock.close()  # what a crash does: the kernel closes the socket, no CLOSE is sent
        with pytest.raises(ReadError, match="lost"):
            await asyncio.wait_for(out.recv(), 60)
        assert out.stats()["probes_sent"] >= 1
    finally:
        await _close(out, inn, lst, server, client)


async def test_idle_session_survives_keepalives(netns_pair: NetnsPair) -> None:
    server, client, out, inn, lst = await _tcp_pair(netns_pair, keepalive=0.3, peer_timeout=2)
    try:
        # Both ends read (as the engine always does); probes keep the idle session alive.
        reader = asyncio.ensure_future(inn.recv())
        other = asyncio.ensure_future(out.recv())
        await asyncio.sleep(4)
        assert not reader.done() and not other.done()
        await out.send([_msg(1, b"still here")])
        (f,) = await asyncio.wait_for(reader, 30)
        assert bytes(f.payload) == b"still here"
        assert out.stats()["probes_sent"] + inn.stats()["probes_sent"] >= 2
        other.cancel()
    finally:
        await _close(out, inn, lst, server, client)


async def test_bad_datagrams_are_frame_errors(netns_pair: NetnsPair) -> None:
    server, client, out, inn, lst = await _tcp_pair(netns_pair)
    try:
        await out._send_datagram(Kind.DATA, [b"GET / HTTP/1.0\r\n\r\n"], value=out._tx_seq)  # in sequence, not a sealed frame
        with pytest.raises(FrameError, match="sealed"):
            await asyncio.wait_for(inn.recv(), 30)
    finally:
        await _close(out, inn, lst, server, client)
    server, client, out, inn, lst = await _tcp_pair(netns_pair)
    try:
        due = out._tx_seq  # the hello used the first datagrams
        await out._send_datagram(Kind.DATA, [b"x"], value=due + 5)
        with pytest.raises(FrameError, match=rf"{due + 5} from .* where {due} was due"):
            await asyncio.wait_for(inn.recv(), 30)
    finally:
        await _close(out, inn, lst, server, client)


async def test_listener_ignores_junk_and_unanswered_connect_times_out(netns_pair: NetnsPair) -> None:
    import socket

    from lu2k.backends.rds import in_netns

    server, client, out, inn, lst = await _tcp_pair(netns_pair)
    try:
        with in_netns(netns_pair.a):
            raw = socket.socket(socket.AF_RDS, socket.SOCK_SEQPACKET)
        try:
            raw.bind((netns_pair.addr_a, 0))
            raw.sendto(b"junk that is not an envelope", (netns_pair.addr_b, lst.address[1]))
            raw.sendto(encode_envelope(Kind.DATA, 99), (netns_pair.addr_b, lst.address[1]))
        finally:
            raw.close()
        second = await client.connect(netns_pair.addr_b, lst.address[1], ConnType.ANY, 30)
        # The listener survived the junk and accepted again: a second session of its own.
        (server_side,) = [t for t in server.transports if t is not inn]
        await run_hello(client, second, server_side, b"guest-tier-test-key")  # a session of its own: its own hello
        await second.send([_msg(1, b"through the second session")])
        (f,) = await _recv_n(server_side, 1)
        assert bytes(f.payload) == b"through the second session"
        await _close(second, server_side)
        with pytest.raises(ConnectTimeout, match="no listener"):
            await client.connect(netns_pair.addr_b, lst.address[1] + 1, ConnType.ANY, 2)
    finally:
        await _close(out, inn, lst, server, client)


# --- engine over rds: hello/HMAC, credits, exactly-once completions -----------------------------


def _config(nid: str, port: int, key: str) -> Any:
    return parse_config({
        "net": [{"net type": "tcp", "local NI(s)": [{"nid": nid, "tunables": {"peer_credits": 2, "credits": 4}}],
                 "lu2k": {"backend": "rds", "port": port, "key": key, "max_message_size": 1 << 20}}],
        "global": {"transaction_timeout": 60, "connect_timeout": 10, "reconnect_min": 0.05, "reconnect_max": 0.5},
    })


async def test_engines_over_rds_complete_each_message_exactly_once() -> None:
    a = Engine(_config("127.0.0.1@tcp", 7990, "rds-site-key-0123"))
    b = Engine(_config("127.0.0.2@tcp", 7990, "rds-site-key-0123"))
    await a.start(with_shim=False)
    await b.start(with_shim=False)
    try:
        calls: list[list[tuple[Status, str]]] = [[] for _ in range(40)]
        done = asyncio.Event()

        def finisher(i: int):  # type: ignore[no-untyped-def]
            def finish(status: Status, reason: str) -> None:
                calls[i].append((status, reason))
                if all(calls):
                    done.set()
            return finish

        for i in range(40):
            a.send(None, b.primary_nid(), 1, 9, os.urandom(100 + 20_000 * (i % 3)), finisher(i))
        await asyncio.wait_for(done.wait(), 120)
        # Nobody is attached to portal 9 on b: every message reached b and was refused there.
        assert {c[0][0] for c in calls} == {Status.NO_RECEIVER}
        peer = a.describe_peers()[0]
        assert peer["state"] == "up" and peer["in_flight"] == 0
        res = await a.ping(b.primary_nid(), 30)
        assert 0 < res["rtt_ms"] < 60000
    finally:
        await a.stop()
        await b.stop()
    # Both engines stopped: no completion can come any more, so these counts are final.
    assert all(len(c) == 1 for c in calls), calls


async def test_engines_over_rds_refuse_a_wrong_key() -> None:
    a = Engine(_config("127.0.0.1@tcp", 7991, "key-of-site-a-0123"))
    b = Engine(_config("127.0.0.2@tcp", 7991, "key-of-site-b-0123"))
    await a.start(with_shim=False)
    await b.start(with_shim=False)
    try:
        got: list[tuple[Status, str]] = []
        event = asyncio.Event()

        def finish(status: Status, reason: str) -> None:
            got.append((status, reason))
            event.set()

        a.send(None, b.primary_nid(), 1, 0, b"x", finish)
        await asyncio.wait_for(event.wait(), 60)
        assert got[0][0] is Status.AUTH_FAILED
    finally:
        await a.stop()
        await b.stop()
