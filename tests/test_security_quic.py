"""quic under attack: an active relay with its own certificate, streams before the hello.

* The finding: on quic without ``ca``, a relay terminating TLS with its own certificate passed
  the PSK hello through and read every payload.  The hello now covers the TLS server
  certificate's hash (``tls-server-end-point``); the relay's two TLS sessions have different
  ones, so the acceptor refuses the connector's proof.  The same relay with the binding left
  out completes the hello -- proof the relay is a real one.
* The finding: 200 message streams announcing payloads before the hello cost 800 MB.  Now
  no stream but the control stream may open before the hello, refused at its first byte.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import Any

import pytest

pytest.importorskip("aioquic")

from conformance import BackendUnderTest, _close  # noqa: E402
import test_quic_backend as _quic_tests  # noqa: E402
from test_quic_backend import _RawClient, _opts  # noqa: E402

from lu2k import wire  # noqa: E402
from lu2k.backends.base import Transport  # noqa: E402
from lu2k.backends.quic import QuicBackend  # noqa: E402
from lu2k.errors import AuthenticationError, FrameError  # noqa: E402
from lu2k.nid import parse_nid  # noqa: E402
from lu2k.wire import ConnType, FrameType  # noqa: E402

pki = _quic_tests.pki  # the module-scoped CA and site certificates fixture
KEY = b"quic-relay-test-network-key-0123"
C_NID, S_NID = parse_nid("127.0.0.1@quic"), parse_nid("127.0.0.2@quic")


def _encode(f: wire.Frame) -> bytes:
    h = f.header
    return wire.encode_header(h.type, h.body, h.payload_len, h.flags, h.version) + bytes(f.payload)


async def _accepting(backend: Any) -> tuple[Any, asyncio.Queue[Transport]]:
    q: asyncio.Queue[Transport] = asyncio.Queue()

    async def on_accept(t: Transport) -> None:
        await q.put(t)

    return await backend.listen("127.0.0.1", 0, on_accept), q


async def _relayed_hello(pki: dict[str, str], bind: bool) -> tuple[BaseException | None, BaseException | None]:
    """Connector -> relay (own certificate) -> acceptor, frames copied both ways by the relay."""
    server = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki, "site-a")).make()
    relay_side = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki, "self")).make()  # the relay's own certificate
    no_ca = {k: v for k, v in _opts(pki, "site-b").items() if k != "ca"}  # the case: no ca on the connector
    client = BackendUnderTest(QuicBackend, "127.0.0.1", options=no_ca).make()
    relay_out_backend = BackendUnderTest(QuicBackend, "127.0.0.1", options=no_ca).make()
    s_lst, s_q = await _accepting(server)
    r_lst, r_q = await _accepting(relay_side)
    c_out = await client.connect("127.0.0.1", r_lst.address[1], ConnType.ANY, 5.0)
    r_in = await asyncio.wait_for(r_q.get(), 5)
    r_out = await relay_out_backend.connect("127.0.0.1", s_lst.address[1], ConnType.ANY, 5.0)
    s_in = await asyncio.wait_for(s_q.get(), 5)

    async def pump(src: Transport, dst: Transport) -> None:
        while True:
            for f in await src.recv():
                await dst.send([(_encode(f), b"")])

    pumps = [asyncio.ensure_future(pump(r_in, r_out)), asyncio.ensure_future(pump(r_out, r_in))]
    init = wire.HelloInitiator(key=KEY, backend="quic", src=C_NID, dst=S_NID, conn_type=ConnType.ANY, incarnation=1,
                               sealed=False, channel_binding=c_out.channel_binding if bind else b"")
    resp = wire.HelloResponder(key=KEY, backend="quic", local_nids=frozenset({S_NID}), incarnation=2,
                               sealed=False, channel_binding=s_in.channel_binding if bind else b"")

    async def acceptor() -> None:
        try:
            while not resp.done:
                for f in await asyncio.wait_for(s_in.recv(), 5):
                    await s_in.send([(resp.receive(f), b"")])
        except AuthenticationError:
            await s_in.send([(resp.reject_frame or b"", b"")])
            raise

    async def connector() -> None:
        await c_out.send([(init.start(), b"")])
        while not init.done:
            for f in await asyncio.wait_for(c_out.recv(), 5):
                reply = init.receive(f)
                if reply is not None:
                    await c_out.send([(reply, b"")])

    try:
        outcomes = await asyncio.gather(connector(), acceptor(), return_exceptions=True)
        return outcomes[0], outcomes[1]  # type: ignore[return-value]
    finally:
        for p in pumps:
            p.cancel()
        await _close(c_out, r_in, r_out, s_in, s_lst, r_lst, server, relay_side, client, relay_out_backend)


async def test_relay_with_its_own_certificate_cannot_pass_the_hello(pki: dict[str, str]) -> None:
    connector_outcome, acceptor_outcome = await _relayed_hello(pki, bind=True)
    assert isinstance(acceptor_outcome, AuthenticationError)
    assert isinstance(connector_outcome, AuthenticationError) and "wrong network key" in str(connector_outcome)


async def test_the_same_relay_passes_an_unbound_hello(pki: dict[str, str]) -> None:
    """Control experiment: without the binding the relay gets through (the pre-fix state)."""
    assert await _relayed_hello(pki, bind=False) == (None, None)


async def test_message_streams_before_the_hello_are_refused_without_allocating(pki: dict[str, str]) -> None:
    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration

    server = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki), max_message_size=64 << 20).make()
    lst, q = await _accepting(server)
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["lu2k"])
    cfg.load_verify_locations(cafile=pki["ca"])
    body = wire.MSG_BODY.pack(1, C_NID.to_bytes(), S_NID.to_bytes(), 0, 0, 0)
    announce = b"\x02" + wire.encode_header(FrameType.MSG, body, 64 << 20)
    tracemalloc.start()
    try:
        async with connect("127.0.0.1", lst.address[1], configuration=cfg, create_protocol=_RawClient.factory) as proto:
            inn = await asyncio.wait_for(q.get(), 5)
            for _ in range(50):
                sid = proto._quic.get_next_available_stream_id(is_unidirectional=True)
                proto._quic.send_stream_data(sid, announce)
            proto.transmit()
            with pytest.raises(FrameError, match="before the hello finished"):
                await asyncio.wait_for(inn.recv(), 5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        lst.close()
        await server.close()
    assert peak < 16 << 20, f"streams before the hello peaked at {peak} bytes"


async def test_authenticated_peer_cannot_reserve_more_than_the_connection_budget(pki: dict[str, str]) -> None:
    """After the hello too: many message streams announcing big payloads and then stalling
    reserve at most ``private_budget`` bytes; the next one closes the connection."""
    from conformance import _pair

    but = BackendUnderTest(QuicBackend, "127.0.0.1", options=_opts(pki))
    server, client, out, inn, lst = await _pair(but)
    try:
        size = but.max_message_size
        body = wire.MSG_BODY.pack(1, C_NID.to_bytes(), S_NID.to_bytes(), 0, 0, 0)
        announce = b"\x02" + wire.encode_header(FrameType.MSG, body, size) + b"x" * 100
        streams = inn.private_budget // size + 1
        for _ in range(streams):
            sid = out._quic.get_next_available_stream_id(is_unidirectional=True)
            out._quic.send_stream_data(sid, announce)
        out._protocol.transmit()
        with pytest.raises(FrameError, match="budget"):
            await asyncio.wait_for(inn.recv(), 10)
        assert inn.private_bytes <= inn.private_budget
    finally:
        await _close(out, inn, lst, server, client)
