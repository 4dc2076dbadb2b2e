"""udt with an on-path attacker: a UDP relay between two udt backends.

UDT itself has no integrity check on data packets, so a flipped byte reaches the receiver's
UDT message intact-looking; lu2k's per-message AEAD (udt_proto) must catch it.  The capture
must not show payloads; duplicated datagrams (a replay at the packet level) must not deliver
anything twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from lu2k.backends import availability, get_backend
from lu2k.errors import FrameError

pytestmark = pytest.mark.skipif(availability().get("udt") is not None, reason=str(availability().get("udt")))

from conformance import BackendUnderTest, _close, _msg, _recv_n, run_hello  # noqa: E402

from lu2k.wire import ConnType, decode_msg  # noqa: E402

MARKER = b"UDT-SECRET-PAYLOAD-"
Attack = Callable[[str, int, bytes], list[bytes]]  # (direction, datagram index, datagram) -> datagrams to forward


class UdpRelay(asyncio.DatagramProtocol):
    """One client <-> one server, over two UDP sockets; every datagram goes through ``attack``."""

    def __init__(self, server: tuple[str, int], attack: Attack) -> None:
        self.server, self.attack = server, attack
        self.capture: list[bytes] = []
        self.client: tuple[str, int] | None = None
        self.counts = {"c->s": 0, "s->c": 0}
        self.front: Any = None
        self.back: Any = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                relay._forward("s->c", data)

        self.front, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        self.back, _ = await loop.create_datagram_endpoint(Back, local_addr=("127.0.0.1", 0))
        return int(self.front.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client = addr
        self._forward("c->s", data)

    def _forward(self, direction: str, data: bytes) -> None:
        self.capture.append(data)
        index = self.counts[direction]
        self.counts[direction] += 1
        for out in self.attack(direction, index, data):
            if direction == "c->s":
                self.back.sendto(out, self.server)
            elif self.client is not None:
                self.front.sendto(out, self.client)

    def close(self) -> None:
        for t in (self.front, self.back):
            if t is not None:
                t.close()


async def _through_relay(attack: Attack) -> tuple[Any, Any, Any, Any, Any, UdpRelay]:
    but = BackendUnderTest(get_backend("udt"), "127.0.0.1", options={"_net": "udt"})
    server, client = but.make(), but.make()
    accepted: asyncio.Queue[Any] = asyncio.Queue()

    async def on_accept(t: Any) -> None:
        await accepted.put(t)

    lst = await server.listen("127.0.0.1", 0, on_accept)
    relay = UdpRelay(("127.0.0.1", lst.address[1]), attack)
    port = await relay.start()
    out = await client.connect("127.0.0.1", port, ConnType.ANY, 10.0)
    inn = await asyncio.wait_for(accepted.get(), 10)
    await run_hello(client, out, inn, but.key)
    return server, client, out, inn, lst, relay


def _payloads(n: int) -> list[bytes]:
    return [MARKER + bytes([65 + i % 26]) * 3000 for i in range(n)]


async def test_capture_shows_no_payload_and_duplicates_deliver_once() -> None:
    def duplicate(direction: str, index: int, data: bytes) -> list[bytes]:
        return [data, data] if direction == "c->s" and index % 3 == 0 else [data]

    server, client, out, inn, lst, relay = await _through_relay(duplicate)
    try:
        payloads = _payloads(20)
        await out.send([_msg(i + 1, p) for i, p in enumerate(payloads)])
        frames = await _recv_n(inn, len(payloads))
        assert [decode_msg(f.header).seq for f in frames] == list(range(1, 21))
        assert [bytes(f.payload) for f in frames] == payloads
        # A sentinel sent afterwards is the very next frame: nothing was delivered twice.
        await out.send([_msg(21, b"sentinel")])
        (nxt,) = await _recv_n(inn, 1)
        assert decode_msg(nxt.header).seq == 21
        assert relay.counts["c->s"] > 20 and MARKER not in b"".join(relay.capture)
    finally:
        relay.close()
        await _close(out, inn, lst, server, client)


async def test_flipped_byte_in_a_data_packet_is_caught_by_the_aead() -> None:
    flipped: list[int] = []

    def flip(direction: str, index: int, data: bytes) -> list[bytes]:
        # The first big data packet after the hello (control packets have the top bit set).
        if direction == "c->s" and not flipped and len(data) > 1000 and not data[0] & 0x80:
            flipped.append(index)
            data = data[:200] + bytes([data[200] ^ 0x40]) + data[201:]
        return [data]

    server, client, out, inn, lst, relay = await _through_relay(flip)
    try:
        await out.send([_msg(i + 1, p) for i, p in enumerate(_payloads(5))])
        with pytest.raises(FrameError, match="failed authentication"):
            await _recv_n(inn, 5)
        assert flipped
    finally:
        relay.close()
        await _close(out, inn, lst, server, client)
