"""The quic listener's guard (lu2k.backends.quic_guard) against datagrams from a sender who has
proven nothing, and the backend forgetting every connection that has ended, both directions."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("aioquic")

from aioquic.buffer import Buffer  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.connection import QuicConnection  # noqa: E402
from aioquic.quic.packet import pull_quic_header  # noqa: E402
from conformance import BackendUnderTest, _close, _msg, _recv_n, run_hello  # noqa: E402

from lu2k.backends.quic import QuicBackend  # noqa: E402
from lu2k.backends.quic_guard import initial_opens  # noqa: E402
from lu2k.cli.keys import cert_pem, key_pem, make_certificate, make_key  # noqa: E402
from lu2k.wire import ConnType  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("quic-guard")
    key = make_key()
    (d / "s.key").write_bytes(key_pem(key))
    (d / "s.crt").write_bytes(cert_pem(make_certificate(key, "site", sans=["127.0.0.1"])))
    return {"cert": str(d / "s.crt"), "key": str(d / "s.key"), "ca": str(d / "s.crt"), "_net": "quic"}


def client_initial() -> bytes:
    """The first datagram of a real QUIC client (a ClientHello in an Initial, padded to 1200+)."""
    c = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["lu2k"]))
    c.connect(("127.0.0.1", 9), now=time.monotonic())
    return c.datagrams_to_send(now=time.monotonic())[0][0]


def junk_initial(rnd: random.Random) -> bytes:
    """An Initial long header (version 1, fresh 8-byte connection IDs) over random bytes."""
    return bytes([0xC3]) + (1).to_bytes(4, "big") + b"\x08" + rnd.randbytes(8) + b"\x08" + rnd.randbytes(8) + b"\x00\x44\xd0" + rnd.randbytes(1250)


def _opens(data: bytes) -> bool:
    buf = Buffer(data=data)
    header = pull_quic_header(buf, host_cid_length=8)
    return initial_opens(data, header, buf.tell())


def test_a_real_initial_opens_and_random_or_altered_ones_do_not() -> None:
    rnd = random.Random(5)
    real = client_initial()
    assert _opens(real)
    assert not _opens(junk_initial(rnd))
    packet_length = pull_quic_header(Buffer(data=real), host_cid_length=8).packet_length
    for _ in range(20):  # any bit of the packet after the connection IDs (bytes after it are padding)
        altered = bytearray(real)
        altered[rnd.randrange(30, packet_length)] ^= 1 << rnd.randrange(8)
        assert not _opens(bytes(altered))


HANDSHAKE_TIMEOUT = 3.0  # long enough for a loaded machine to take all 300 Initials first


async def _until(server: QuicBackend, done: Callable[[dict[str, Any]], bool], timeout: float = HANDSHAKE_TIMEOUT) -> dict[str, Any]:
    """The listener's guard counters once ``done`` holds of them (polled: it reads in this
    loop), or as they are at ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done(guard := server.describe()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return guard


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_flood_of_initials_leaves_nothing_behind(site: dict[str, str]) -> None:
    """Random Initials made a connection each, kept for the idle timeout (and by the backend
    for ever); real ones are capped at the half-open limit and end at the handshake deadline."""
    but = BackendUnderTest(QuicBackend, "127.0.0.1", options=dict(site, handshake_timeout=HANDSHAKE_TIMEOUT))
    server, client = but.make(), but.make()
    accepted: asyncio.Queue[Any] = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    assert isinstance(server, QuicBackend)
    rnd = random.Random(13)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(1000):
                s.sendto(junk_initial(rnd), lst.address)
            guard = await _until(server, lambda g: g["initials_dropped"] >= 1000)
            assert guard["initials_dropped"] == 1000 and guard["half_open"] == 0
            assert not server._protocols
            for i in range(300):
                s.sendto(client_initial(), lst.address)
                if i % 50 == 49:  # let the listener read them: the socket buffer is finite
                    guard = await _until(server, lambda g: g["half_open"] + g["half_open_evicted"] > i)
            assert guard["half_open"] == 128 and guard["half_open_evicted"] == 300 - 128, guard
            assert guard["handshakes_timed_out"] == 0 and len(server._protocols) == 128
            guard = await _until(server, lambda g: g["half_open"] == 0, HANDSHAKE_TIMEOUT + 10)  # the deadline
            assert guard["handshakes_timed_out"] == 128, guard
            assert not server._protocols
        # and a real peer still gets in
        out = await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5.0)
        inn = await asyncio.wait_for(accepted.get(), 10)
        assert server.describe()["half_open"] == 0
        await _close(out, inn)
    finally:
        await _close(lst, server, client)


async def test_short_header_junk_makes_nothing_and_breaks_no_connection(site: dict[str, str]) -> None:
    """Short-header datagrams go straight to the connection their destination ID names: with an
    unknown ID they are dropped, with a live connection's ID and a bad payload that connection
    drops them, and its messages keep flowing either way."""
    but = BackendUnderTest(QuicBackend, "127.0.0.1", options=site)
    server, client = but.make(), but.make()
    accepted: asyncio.Queue[Any] = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    assert isinstance(server, QuicBackend) and isinstance(client, QuicBackend)
    out = await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5.0)
    inn = await asyncio.wait_for(accepted.get(), 10)
    rnd = random.Random(5)
    try:
        await run_hello(client, out, inn, client.settings.key)
        cid = inn._quic.host_cid
        protocols = set(map(id, server._protocols))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(400):
                dcid = cid if i % 2 else rnd.randbytes(len(cid))
                first = 0x40 | rnd.randrange(0x40) if i % 4 < 2 else rnd.randrange(0x80)  # fixed bit set or not
                s.sendto(bytes([first]) + dcid + rnd.randbytes(rnd.choice([0, 5, 40, 1200])), lst.address)
                s.sendto(bytes([first]), lst.address)  # too short for any connection ID
        await asyncio.sleep(0.5)
        assert set(map(id, server._protocols)) == protocols and server.describe()["half_open"] == 0
        payloads = [rnd.randbytes(3000) for _ in range(20)]
        await out.send([_msg(i + 1, p) for i, p in enumerate(payloads)])
        assert sorted(bytes(f.payload) for f in await _recv_n(inn, 20)) == sorted(payloads)
    finally:
        await _close(out, inn, lst, server, client)


async def test_ended_connections_are_forgotten_with_their_sockets(site: dict[str, str]) -> None:
    """Every connect kept its protocol and its own UDP socket after the connection ended, and
    the listener every accepted protocol: a daemon grew with every reconnect."""
    but = BackendUnderTest(QuicBackend, "127.0.0.1", options=site)
    server, client = but.make(), but.make()
    accepted: asyncio.Queue[Any] = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    assert isinstance(server, QuicBackend) and isinstance(client, QuicBackend)
    try:
        before = _fds()
        for _ in range(10):
            out = await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5.0)
            inn = await asyncio.wait_for(accepted.get(), 10)
            out.close()
            await asyncio.wait_for(out.wait_closed(), 10)
            await asyncio.wait_for(inn.wait_closed(), 10)
        deadline = time.monotonic() + 10
        while (client._protocols or server._protocols or _fds() > before) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not client._protocols and not server._protocols
        assert len(client._endpoints) == 0 and len(server._endpoints) == 1  # the listener's
        assert _fds() <= before
    finally:
        await _close(lst, server, client)
