"""QUIC backend over loopback: the shared conformance checks, TLS/auth failures, streams, options."""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import zlib
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aioquic")

from conformance import TRANSPORT_CHECKS, BackendUnderTest, _close, _msg, _recv_n, run_hello  # noqa: E402

from lu2k import wire  # noqa: E402
from lu2k.backends import get_backend  # noqa: E402
from lu2k.backends.base import BackendSettings, LinkProfile  # noqa: E402
from lu2k.backends.quic import QuicBackend  # noqa: E402
from lu2k.cli.keys import cert_pem, key_pem, make_certificate, make_key  # noqa: E402
from lu2k.errors import (  # noqa: E402
    AuthenticationError, ConfigError, ConnectError, ConnectionClosed, FrameError, HandshakeError, NetworkError, ReadError,
)
from lu2k.nid import parse_net  # noqa: E402
from lu2k.wire import ConnType, FrameType  # noqa: E402


def _write_site(d: Path, name: str, sans: list[str], **kw: Any) -> tuple[str, str]:
    key = make_key()
    cert = make_certificate(key, name, sans=sans, **kw)
    (d / f"{name}.key").write_bytes(key_pem(key))
    (d / f"{name}.crt").write_bytes(cert_pem(cert))
    return str(d / f"{name}.crt"), str(d / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = make_key()
    ca_cert = make_certificate(ca_key, "test-ca", is_ca=True)
    (d / "ca.crt").write_bytes(cert_pem(ca_cert))
    out: dict[str, str] = {"ca": str(d / "ca.crt")}
    for name in ("site-a", "site-b"):
        k = make_key()
        c = make_certificate(k, name, sans=["127.0.0.1"], issuer_cert=ca_cert, issuer_key=ca_key)
        (d / f"{name}.key").write_bytes(key_pem(k))
        (d / f"{name}.crt").write_bytes(cert_pem(c))
        out[name] = str(d / f"{name}.crt")
        out[name + ".key"] = str(d / f"{name}.key")
    out["self"], out["self.key"] = _write_site(d, "lone", ["127.0.0.1"])
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    k = make_key()
    c = make_certificate(k, "expired", sans=["127.0.0.1"], days=1, issuer_cert=ca_cert, issuer_key=ca_key, not_before=old)
    (d / "expired.key").write_bytes(key_pem(k))
    (d / "expired.crt").write_bytes(cert_pem(c))
    out["expired"], out["expired.key"] = str(d / "expired.crt"), str(d / "expired.key")
    return out


def _opts(pki: dict[str, str], site: str = "site-a", **extra: Any) -> dict[str, Any]:
    return {"cert": pki[site], "key": pki[site + ".key"], "ca": pki["ca"], "_net": "quic", **extra}


@pytest.mark.parametrize("check", TRANSPORT_CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check: Any, pki: dict[str, str]) -> None:
    # QUIC delivers messages as their streams complete (that is the point): the shared checks
    # run on the unordered default, order-insensitive.
    await check(BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki), ordered=False))


async def test_ordered_option_keeps_send_order(pki: dict[str, str]) -> None:
    from conformance import check_messages_arrive_intact

    await check_messages_arrive_intact(BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki, ordered=True)))


async def _pair(but: BackendUnderTest) -> tuple[Any, Any, Any, Any, Any]:
    from conformance import _pair as pair
    return await pair(but)


async def test_registry_gives_quic() -> None:
    assert get_backend("quic") is QuicBackend


async def test_unordered_default_delivers_everything_intact(pki: dict[str, str]) -> None:
    server, client, out, inn, lst = await _pair(BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki)))
    try:
        payloads = [os.urandom(n) for n in [0, 1, 1000, 70_000, 1 << 20] + [333 * i for i in range(300)]]
        sender = asyncio.ensure_future(out.send([_msg(i + 1, p) for i, p in enumerate(payloads)]))
        frames = await _recv_n(inn, len(payloads))
        await sender
        got = {wire.decode_msg(f.header).seq: zlib.crc32(f.payload) for f in frames}
        assert got == {i + 1: zlib.crc32(p) for i, p in enumerate(payloads)}
        assert out.stats()["msgs_sent"] == len(payloads) and inn.stats()["msgs_received"] == len(payloads)
    finally:
        await _close(out, inn, lst, server, client)


async def _listening(pki: dict[str, str]) -> tuple[Any, Any, asyncio.Queue[Any], Any]:
    """A listening server backend, a client backend, and the queue of accepted transports."""
    but = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki))
    server, client = but.make(), but.make()
    accepted: asyncio.Queue[Any] = asyncio.Queue()

    async def on_accept(t: Any) -> None:
        await accepted.put(t)

    lst = await server.listen("127.0.0.1", 0, on_accept)
    return server, client, accepted, lst


async def test_connection_ids_are_short_on_the_wire(pki: dict[str, str]) -> None:
    # 4-byte connection IDs (aioquic: 8) in both directions, and the listener still routes
    # the datagrams of two concurrent connections from one client by them.
    server, client, accepted, lst = await _listening(pki)
    outs = [await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5.0) for _ in range(2)]
    inns = [await asyncio.wait_for(accepted.get(), 10) for _ in range(2)]
    try:
        for o, i in zip(outs, inns):
            await run_hello(client, o, i, client.settings.key)
        for t in outs + inns:
            assert len(t._quic.host_cid) == 4 and len(t._quic._peer_cid.cid) == 4
        for i, t in enumerate(outs):
            await t.send([_msg(1, f"conn {i}".encode())])
        got = {bytes((await _recv_n(t, 1))[0].payload) for t in inns}
        assert got == {b"conn 0", b"conn 1"}
    finally:
        await _close(*outs, *inns, lst, server, client)


async def test_many_messages_with_bounded_send_buffer(pki: dict[str, str]) -> None:
    # A send buffer far below the total makes send() wait for acknowledgements.
    but = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki, send_buffer=256 << 10))
    server, client, out, inn, lst = await _pair(but)
    try:
        n, size = 400, 20_000
        received: list[int] = []

        async def reader() -> None:
            while len(received) < n:
                for f in await inn.recv():
                    received.append(wire.decode_msg(f.header).seq)

        task = asyncio.ensure_future(reader())
        peak = 0
        for i in range(n):
            await out.send([_msg(i + 1, bytes([i % 256]) * size)])
            peak = max(peak, out.stats()["unacked_bytes"])
        await asyncio.wait_for(task, 60)
        assert sorted(received) == list(range(1, n + 1))
        assert peak <= (256 << 10) + size + 200
    finally:
        await _close(out, inn, lst, server, client)


async def test_bulk_messages_are_fed_alone_and_small_ones_share_packets(pki: dict[str, str]) -> None:
    # aioquic walks every stream it holds for every packet it builds and serves the streams
    # with data in turn: a bulk message is handed over alone (the next joins for its last
    # FEED_BYTES).  Small messages of separate send() calls, a stream each, are handed over
    # together, so that they share packets instead of taking one (and a pacing slot) each.
    from lu2k.backends.quic_stream import FEED_BYTES, FEED_STREAMS, _has_unsent

    server, client, out, inn, lst = await _pair(BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki)))
    try:
        quic = out._quic
        build = quic.datagrams_to_send
        fed: list[tuple[int, int]] = []  # (streams, unsent bytes) of ours inside aioquic, per build
        datagrams = 0

        def counting(*, now: float) -> Any:
            nonlocal datagrams
            ours = [st for sid, st in quic._streams.items() if sid in out._unacked and _has_unsent(st.sender)]
            fed.append((len(ours), sum(r.stop - r.start for st in ours for r in st.sender._pending)))
            sent = build(now=now)
            datagrams += len(sent)
            return sent

        quic.datagrams_to_send = counting
        payloads = [os.urandom(200_000) for _ in range(12)]  # a stream each
        await out.send([_msg(i + 1, p) for i, p in enumerate(payloads)])
        frames = await _recv_n(inn, len(payloads))
        assert {wire.decode_msg(f.header).seq: bytes(f.payload) for f in frames} == {i + 1: p for i, p in enumerate(payloads)}
        assert max(n for n, _ in fed) == 2 and max(b for _, b in fed) < 200_100 + FEED_BYTES  # a message and its header

        fed.clear()
        datagrams = 0
        small = [os.urandom(1000) for _ in range(300)]
        for i, p in enumerate(small):
            await out.send([_msg(100 + i, p)])
        frames = await _recv_n(inn, len(small))
        assert sorted(bytes(f.payload) for f in frames) == sorted(small)
        assert max(n for n, _ in fed) == FEED_STREAMS
        assert datagrams < 0.8 * len(small), datagrams  # one each without sharing
    finally:
        await _close(out, inn, lst, server, client)


async def test_control_frames_keep_order_and_both_directions_work(pki: dict[str, str]) -> None:
    server, client, out, inn, lst = await _pair(BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki)))
    try:
        pings = [(wire.encode_frame(FrameType.PING, wire.PING_BODY.pack(i)), b"") for i in range(50)]
        await out.send(pings)
        frames = await _recv_n(inn, 50)
        assert [wire.PING_BODY.unpack(f.header.body)[0] for f in frames] == list(range(50))
        await inn.send([(wire.encode_acks([(i, 0) for i in range(1, 11)]), b"")])
        (ack,) = await _recv_n(out, 1)
        assert wire.decode_acks(ack) == [(i, 0) for i in range(1, 11)]
    finally:
        await _close(out, inn, lst, server, client)


async def _expect_connect_failure(server_opts: dict[str, Any], client_opts: dict[str, Any], exc: type[BaseException], match: str) -> None:
    server = BackendUnderTest(QuicBackend, "127.0.0.1", options=server_opts).make()
    client = BackendUnderTest(QuicBackend, "127.0.0.1", options=client_opts).make()
    accepted: list[Any] = []

    async def on_accept(t: Any) -> None:
        accepted.append(t)

    lst = await server.listen("127.0.0.1", 0, on_accept)
    try:
        with pytest.raises(exc, match=match):
            t = await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5.0)
            # A refusal after the handshake (mutual TLS) arrives on the first read.
            await asyncio.wait_for(t.recv(), 5.0)
    finally:
        lst.close()
        await server.close()
        await client.close()


async def test_untrusted_server_certificate_is_authentication_error(pki: dict[str, str]) -> None:
    await _expect_connect_failure(_opts(pki, "self"), _opts(pki), AuthenticationError, "certificate")


async def test_expired_server_certificate_is_authentication_error(pki: dict[str, str]) -> None:
    await _expect_connect_failure(_opts(pki, "expired"), _opts(pki), AuthenticationError, "no longer valid|expired")


async def test_wrong_server_name_is_authentication_error(pki: dict[str, str]) -> None:
    await _expect_connect_failure(_opts(pki), _opts(pki, server_name="not-this-site"), AuthenticationError, "doesn't match|certificate")


async def test_mtls_refuses_client_without_certificate(pki: dict[str, str]) -> None:
    client = {"ca": pki["ca"], "_net": "quic"}
    await _expect_connect_failure(_opts(pki, mtls=True), client, AuthenticationError, "no certificate")


async def test_mtls_refuses_client_with_foreign_certificate(pki: dict[str, str]) -> None:
    await _expect_connect_failure(_opts(pki, mtls=True), _opts(pki, "self"), AuthenticationError, "rejected")


async def test_mtls_accepts_client_signed_by_ca(pki: dict[str, str]) -> None:
    but = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki, mtls=True))
    server, client, out, inn, lst = await _pair(but)
    try:
        await out.send([_msg(1, b"hello over mutual TLS")])
        (f,) = await _recv_n(inn, 1)
        assert bytes(f.payload) == b"hello over mutual TLS"
    finally:
        await _close(out, inn, lst, server, client)


async def test_no_server_listening_is_connect_error(pki: dict[str, str]) -> None:
    client = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki)).make()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    try:
        with pytest.raises(ConnectError):
            await client.connect("127.0.0.1", port, ConnType.ANY, 3.0)
    finally:
        await client.close()


async def test_vanished_peer_is_read_error_after_dead_timeout(pki: dict[str, str]) -> None:
    but = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki, dead_timeout=1.0))
    server, client, out, inn, lst = await _pair(but)
    try:
        lst._server._transport.close()  # the server process "dies": no CONNECTION_CLOSE is sent
        await out.send([_msg(1, b"x" * 5000)])
        with pytest.raises(ReadError, match="stopped answering"):
            await asyncio.wait_for(out.recv(), 10)
    finally:
        await _close(out, inn, lst, server, client)


async def test_an_idle_connection_to_a_vanished_peer_fails_without_anything_sent(pki: dict[str, str]) -> None:
    # Nothing is sent after the peer dies: the keepalive PING is what is left unanswered.
    but = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki, dead_timeout=1.0))
    server, client, out, inn, lst = await _pair(but)
    try:
        assert client.describe()["keepalive"] == 1.0  # max(1 s, 2 RTT) without a profile
        lst._server._transport.close()
        with pytest.raises(ReadError, match="stopped answering"):
            await asyncio.wait_for(out.recv(), 10)
    finally:
        await _close(out, inn, lst, server, client)


async def test_silent_peer_is_connect_timeout(pki: dict[str, str]) -> None:
    client = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki)).make()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    s.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(ConnectError, match="within"):
            await client.connect("127.0.0.1", s.getsockname()[1], ConnType.ANY, 0.5)
    finally:
        s.close()
        await client.close()


class _RawClient:
    """aioquic's plain client protocol, minus its StreamReader plumbing (we read nothing)."""

    @staticmethod
    def factory(*args: Any, **kw: Any) -> Any:
        from aioquic.asyncio.protocol import QuicConnectionProtocol
        from aioquic.quic import events

        class Proto(QuicConnectionProtocol):
            def quic_event_received(self, event: Any) -> None:
                if not isinstance(event, events.StreamDataReceived):
                    super().quic_event_received(event)

        return Proto(*args, **kw)


async def test_alpn_mismatch_is_handshake_error(pki: dict[str, str]) -> None:
    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration

    server = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki)).make()
    lst = await server.listen("127.0.0.1", 0, lambda t: asyncio.sleep(0))
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["h3"])
    cfg.load_verify_locations(cafile=pki["ca"])
    try:
        with pytest.raises(ConnectionError):
            async with connect("127.0.0.1", lst.address[1], configuration=cfg, create_protocol=_RawClient.factory):
                pass
    finally:
        lst.close()
        await server.close()


async def test_quic_version_mismatch_is_handshake_error(pki: dict[str, str]) -> None:
    class OddVersionBackend(QuicBackend):
        def _configuration(self, **kw: Any) -> Any:
            config = super()._configuration(**kw)
            config.supported_versions = [0x0A0A0A0A]  # a version no server speaks
            return config

    server = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki)).make()
    client = BackendUnderTest(OddVersionBackend, "127.0.0.1", options=_opts(pki)).make()
    lst = await server.listen("127.0.0.1", 0, lambda t: asyncio.sleep(0))
    try:
        with pytest.raises(HandshakeError, match="version mismatch"):
            await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5.0)
    finally:
        lst.close()
        await server.close()
        await client.close()


async def test_garbage_stream_from_peer_closes_with_frame_error(pki: dict[str, str]) -> None:
    """A peer that speaks QUIC and ALPN lu2k but sends a non-lu2k stream is cut off."""
    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration

    server = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki)).make()
    accepted: asyncio.Queue[Any] = asyncio.Queue()

    async def on_accept(t: Any) -> None:
        await accepted.put(t)

    lst = await server.listen("127.0.0.1", 0, on_accept)
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["lu2k"])
    cfg.load_verify_locations(cafile=pki["ca"])
    try:
        async with connect("127.0.0.1", lst.address[1], configuration=cfg, create_protocol=_RawClient.factory) as proto:
            inn = await asyncio.wait_for(accepted.get(), 5)
            sid = proto._quic.get_next_available_stream_id(is_unidirectional=True)
            proto._quic.send_stream_data(sid, b"\x01GET / HTTP/1.0\r\n\r\n", end_stream=True)
            proto.transmit()
            with pytest.raises(FrameError, match="bad magic"):
                await asyncio.wait_for(inn.recv(), 5)
            await asyncio.wait_for(proto.wait_closed(), 5)
    finally:
        lst.close()
        await server.close()


async def test_peer_close_is_connection_closed(pki: dict[str, str]) -> None:
    server, client, out, inn, lst = await _pair(BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki)))
    try:
        out.close()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(inn.recv(), 10)
    finally:
        await _close(out, inn, lst, server, client)


async def test_reconnect_resumes_session_with_0rtt(pki: dict[str, str]) -> None:
    server, client, accepted, lst = await _listening(pki)
    port = lst.address[1]
    try:
        first = await client.connect("127.0.0.1", port, ConnType.ANY, 5.0)
        inn1 = await asyncio.wait_for(accepted.get(), 5)
        await run_hello(client, first, inn1, client.settings.key)
        await first.send([_msg(1, b"one")])
        await _recv_n(inn1, 1)
        # The server sends its session ticket after the handshake; wait for it to arrive.
        for _ in range(500):
            if ("127.0.0.1", port) in client._client_tickets:
                break
            await asyncio.sleep(0.01)
        assert ("127.0.0.1", port) in client._client_tickets
        first.close()
        second = await client.connect("127.0.0.1", port, ConnType.ANY, 5.0)
        assert not second._protocol.handshake_done  # returned at once: 0-RTT
        inn2 = await asyncio.wait_for(accepted.get(), 5)
        # The resumed session carries no certificate: the hello binds to the one remembered
        # with the ticket, which is the server's own -- so it completes.
        assert second.channel_binding == inn2.channel_binding != b""
        await run_hello(client, second, inn2, client.settings.key)
        await second.send([(wire.encode_frame(FrameType.PING, wire.PING_BODY.pack(7)), b""), _msg(2, b"two")])
        frames = await _recv_n(inn2, 2)
        assert {f.header.type for f in frames} == {FrameType.PING, FrameType.MSG}
        assert second._protocol._quic.tls.session_resumed
        second.close()
        for t in (inn1, inn2):
            t.close()
    finally:
        lst.close()
        await server.close()
        await client.close()


def _settings(**opts: Any) -> BackendSettings:
    profile = opts.pop("profile", LinkProfile())
    return BackendSettings(parse_net("quic"), 0, 1 << 20, profile=profile, options=opts)


def test_default_congestion_follows_profile() -> None:
    assert QuicBackend(_settings(profile=LinkProfile(rtt_ms=600, rate_mbit=20))).congestion == "bbr"
    assert QuicBackend(_settings(profile=LinkProfile(rtt_ms=40, rate_mbit=50, loss=0.01))).congestion == "bbr"
    assert QuicBackend(_settings(profile=LinkProfile(rtt_ms=1))).congestion == "cubic"
    assert QuicBackend(_settings(congestion="reno")).congestion == "reno"
    b = QuicBackend(_settings(congestion="rate", rate="20mbit", rate_cap=22))
    assert b.congestion == "rate" and b.algorithm.startswith("lu2k-rate-")


@pytest.mark.parametrize("opts, match", [
    ({"congestion": "vegas"}, "unknown congestion"),
    ({"congestion": "rate"}, "needs a rate"),
    ({"congestion": "rate", "rate": "fast"}, "bad rate"),
    ({"colour": "blue"}, "unknown quic option"),
    ({"cert": "/nonexistent.crt", "key": "/nonexistent.key"}, "does not exist"),
    ({"mtls": True}, "mtls needs ca"),
    ({"max_datagram_size": 900}, "1200..65000"),
    ({"cid_length": 2}, "cid_length must be 4..20"),
    ({"idle_timeout": "soon"}, "must be a number"),
    ({"ordered": "maybe"}, "true/false"),
])
def test_bad_options_are_config_errors(opts: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        QuicBackend(_settings(**opts))


def test_mismatched_cert_and_key_is_config_error(pki: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="cannot load"):
        QuicBackend(_settings(cert=pki["site-a"], key=pki["site-b.key"]))


async def test_listen_without_cert_is_config_error() -> None:
    with pytest.raises(ConfigError, match="needs cert and key"):
        await QuicBackend(_settings()).listen("127.0.0.1", 0, lambda t: asyncio.sleep(0))


def test_describe_reports_effective_settings(pki: dict[str, str]) -> None:
    d = QuicBackend(_settings(cert=pki["site-a"], key=pki["site-a.key"], profile=LinkProfile(rtt_ms=600, rate_mbit=20))).describe()
    assert d["congestion"] == "bbr" and d["alpn"] == "lu2k" and d["zero_rtt"] is True


def test_translate_close_maps_alerts() -> None:
    from aioquic.quic.events import ConnectionTerminated

    from lu2k.backends.quic import translate_close

    assert isinstance(translate_close(ConnectionTerminated(0x100 + 42, 0x6, "bad"), True), AuthenticationError)
    assert "ALPN" in str(translate_close(ConnectionTerminated(0x100 + 120, 0x6, ""), True))
    assert isinstance(translate_close(ConnectionTerminated(0x11, 0, "Could not find a common protocol version"), True), HandshakeError)
    assert "version mismatch" in str(translate_close(ConnectionTerminated(0x11, 0, "Could not find a common protocol version"), True))
    assert isinstance(translate_close(ConnectionTerminated(0, None, ""), False), ConnectionClosed)
    e = translate_close(ConnectionTerminated(0x1, 0, "Idle timeout"), False)
    assert isinstance(e, ReadError) and not isinstance(e, ConnectionClosed)
    assert isinstance(translate_close(ConnectionTerminated(0x1, 0, "Idle timeout"), True), NetworkError)


def test_app_limited_probe_walks_the_streams_at_most_once_a_millisecond() -> None:
    from types import SimpleNamespace

    from lu2k.backends.quic import _AppLimitedProbe

    sender = SimpleNamespace(buffer_is_empty=False)
    quic = SimpleNamespace(_streams={4: SimpleNamespace(sender=sender)})
    probe = _AppLimitedProbe(quic)  # type: ignore[arg-type]
    assert probe(10.0) is False
    sender.buffer_is_empty = True
    assert probe(10.0005) is False  # within the millisecond: the last answer
    assert probe(10.0011) is True
    quic._streams[8] = SimpleNamespace(sender=SimpleNamespace(buffer_is_empty=False))
    assert probe(10.0015) is True and probe(10.0022) is False
