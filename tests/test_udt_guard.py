"""The socket filter in front of libudt: which UDT handshakes it drops, on a real UDP socket,
and that a listening udt backend no longer sizes a connection from a hostile handshake."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest

from lu2k.backends import udt_guard
from lu2k.errors import LocalProtocolError

# UDT 4 control header (flag|type, info, timestamp, destination socket) and handshake body
# (version, socket type, ISN, MSS, flight window, request type, socket id, cookie, peer IP).
HANDSHAKE = struct.Struct("!IIII iiiiiiii 16s")
LIMIT = 20_000


def handshake(*, window: int = 5000, mss: int = 1500, version: int = 4, request: int = 1, socket_id: int = 77,
              cookie: int = 0, isn: int = 12345) -> bytes:
    return HANDSHAKE.pack(0x80000000, 0, 0, 0, version, 2, isn, mss, window, request, socket_id, cookie,
                          socket.inet_aton("127.0.0.1") + bytes(12))


def _passes(datagram: bytes) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        udt_guard.attach(rx, udt_guard.handshake_filter(LIMIT))
        rx.bind(("127.0.0.1", 0))
        tx.sendto(datagram, rx.getsockname())
        tx.sendto(b"\x00" * 20, rx.getsockname())  # a marker that always passes: what comes first tells
        rx.settimeout(10)
        return rx.recv(2048) == datagram


@pytest.mark.parametrize("datagram", [
    handshake(), handshake(window=LIMIT), handshake(mss=udt_guard.MIN_MSS), handshake(mss=udt_guard.MAX_MSS),
    handshake(request=-1, cookie=-5), handshake() + b"extra",
    struct.pack("!IIII", 12345, 1 << 29, 0, 99) + b"data packet payload",  # data: bit 0 clear
    struct.pack("!IIIII", 0x80020000, 1, 0, 99, 12345),  # an ACK
    bytes(16) + b"\xff" * 48,  # a data packet that happens to look like nothing in particular
], ids=["sound", "window-at-limit", "mss-min", "mss-max", "response", "trailing", "data", "ack", "data-ff"])
def test_everything_but_a_bad_handshake_passes(datagram: bytes) -> None:
    assert _passes(datagram)


@pytest.mark.parametrize("datagram", [
    handshake(window=LIMIT + 1), handshake(window=100_000_000), handshake(window=-5),
    handshake(mss=44), handshake(mss=udt_guard.MIN_MSS - 1), handshake(mss=udt_guard.MAX_MSS + 1), handshake(mss=-100),
    handshake(version=3), handshake()[:40],
], ids=["window-over", "window-1e8", "window-negative", "mss-44", "mss-under", "mss-over", "mss-negative", "version-3",
        "short"])
def test_a_bad_handshake_is_dropped(datagram: bytes) -> None:
    assert not _passes(datagram)


def test_limits_refused_where_they_cannot_be_filtered() -> None:
    with pytest.raises(LocalProtocolError):
        udt_guard.handshake_filter(0)
    with pytest.raises(LocalProtocolError):
        udt_guard.handshake_filter(1 << 31)
    assert udt_guard.max_peer_window(100) == udt_guard.MIN_WINDOW_LIMIT
    assert udt_guard.max_peer_window(10_000) == 40_000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


KEY = b"guard-test-network-key-0123456789"


def _key_holder() -> Any:
    """What seals and opens UDT packets as a daemon of the net does (its packet key)."""
    from lu2k.backends import _udtcore, udt_proto

    return _udtcore.PacketAuth(udt_proto.packet_key(KEY))


async def test_a_handshake_announcing_a_huge_window_gets_no_connection_and_costs_nothing() -> None:
    """One handshake announcing 10^8 packets made the listening side allocate 1.5 GB before
    the preamble or the hello (libudt sizes its loss list from it); the packet key only says
    the sender holds the network key.  Now it is dropped in the kernel: no connection, no
    memory; a sound handshake still gets its answer."""
    from lu2k.backends import availability, get_backend
    from lu2k.backends.base import BackendSettings, LinkProfile
    from lu2k.nid import parse_net

    if availability().get("udt") is not None:
        pytest.skip(f"udt backend unavailable: {availability()['udt']}")
    backend = get_backend("udt")(BackendSettings(parse_net("udt0"), 0, 1 << 20, LinkProfile(), KEY, {}))
    auth = _key_holder()

    async def on_accept(t: object) -> None:  # never reached: no preamble is sent
        raise AssertionError("a raw handshake became a connection")

    listener = await backend.listen("127.0.0.1", 0, on_accept)
    loop = asyncio.get_running_loop()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)

            async def exchange(packet: bytes) -> bytes | None:
                await loop.sock_sendto(s, auth.seal(packet), listener.address)
                try:
                    opened = auth.open(await asyncio.wait_for(loop.sock_recv(s, 2048), 2))
                except asyncio.TimeoutError:
                    return None
                assert opened is not None
                return bytes(opened)

            before = _rss_bytes()
            reply = await exchange(handshake(window=5000))  # the cookie request, sound
            assert reply is not None
            cookie = HANDSHAKE.unpack(reply[: HANDSHAKE.size])[11]
            hostile = await exchange(handshake(window=100_000_000, request=-1, cookie=cookie, socket_id=78))
            await asyncio.sleep(1)
            grown = _rss_bytes() - before
            assert grown < 64 << 20, f"the hostile handshake cost {grown >> 20} MB"
            assert hostile is None  # no connection either
            answer = await exchange(handshake(window=5000, request=-1, cookie=cookie, socket_id=79))
            assert answer is not None and HANDSHAKE.unpack(answer[: HANDSHAKE.size])[9] == -1  # connected
    finally:
        listener.close()
        await backend.close()


async def test_a_flood_of_completed_handshakes_costs_a_bounded_amount() -> None:
    """Handshakes completed with the listener's cookie (by a holder of the network key) each
    made libudt a socket of ~190 KB; the backend took every one and closed those beyond its
    64 preamble slots at once, and libudt keeps a closed socket a second or more: 1 400 such
    handshakes left a listening lu2kd 250 MB bigger.  Now it takes a connection only into a
    free slot, at a bounded rate, and libudt refuses the surplus before making a socket."""
    from lu2k.backends import availability, get_backend
    from lu2k.backends.base import BackendSettings, LinkProfile
    from lu2k.nid import parse_net

    if availability().get("udt") is not None:
        pytest.skip(f"udt backend unavailable: {availability()['udt']}")
    backend = get_backend("udt")(BackendSettings(parse_net("udt0"), 0, 1 << 20, LinkProfile(), KEY, {"handshake_timeout": 1.0}))
    auth = _key_holder()

    async def on_accept(t: object) -> None:  # never reached: no preamble is sent
        raise AssertionError("a raw handshake became a connection")

    listener = await backend.listen("127.0.0.1", 0, on_accept)
    loop = asyncio.get_running_loop()
    made = 0
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)

            async def handshake_reply() -> bytes | None:
                while True:  # the half-open sockets also send keep-alives our way
                    try:
                        data = await asyncio.wait_for(loop.sock_recv(s, 2048), 0.5)
                    except asyncio.TimeoutError:
                        return None
                    opened = auth.open(data)
                    if opened is not None and len(opened) >= HANDSHAKE.size and opened[:2] == b"\x80\x00":
                        return bytes(opened)

            before = _rss_bytes()
            for i in range(800):
                await loop.sock_sendto(s, auth.seal(handshake(window=5000, socket_id=1000 + i, isn=7919 * i)), listener.address)
                reply = await handshake_reply()
                assert reply is not None
                fields = list(HANDSHAKE.unpack(reply[: HANDSHAKE.size]))
                fields[3], fields[9] = 0, -1  # to the listener, as the response
                await loop.sock_sendto(s, auth.seal(HANDSHAKE.pack(*fields)), listener.address)
                made += await handshake_reply() is not None
            await asyncio.sleep(1.5)
            grown = _rss_bytes() - before
            paused = backend.describe().get("accepts_paused", 0)
    finally:
        listener.close()
        await backend.close()
    assert grown < 40 << 20, f"800 completed handshakes cost {grown >> 20} MB"
    assert made > 0 and paused > 0
