"""The batched UDP endpoint: many datagrams per readiness, one deferred transmit per batch."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from lu2k.backends.quic_udp import BATCH, BatchedUdpEndpoint


class Recorder:
    def __init__(self) -> None:
        self.transport: Any = None
        self.datagrams: list[bytes] = []
        self.transmits = 0
        self.errors: list[Exception] = []
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.append(data)
        self.transmit()  # what aioquic's protocol does after every datagram

    def transmit(self) -> None:
        if self.transport.defer_transmit(self):
            return
        self.transmits += 1

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def test_burst_is_read_in_one_batch_with_one_transmit() -> None:
    loop = asyncio.get_running_loop()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    proto = Recorder()
    ep = BatchedUdpEndpoint(loop, rx, proto)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        n = BATCH + 10
        for i in range(n):
            tx.sendto(i.to_bytes(2, "little"), ep.get_extra_info("sockname"))
        while len(proto.datagrams) < n:
            await asyncio.sleep(0.01)
        assert [int.from_bytes(d, "little") for d in proto.datagrams] == list(range(n))
        assert proto.transmits == 2  # two readiness callbacks (BATCH, then the rest), not n
        # Outside a batch, transmit is immediate; sending works both ways.
        proto.transmit()
        assert proto.transmits == 3
        ep.sendto(b"pong", tx.getsockname())
        assert tx.recv(10) == b"pong"
    finally:
        tx.close()
        ep.close()
    assert ep.is_closing()
    assert await asyncio.wait_for(proto.lost, 5) is None
    ep.sendto(b"ignored after close", ("127.0.0.1", 9))


async def test_icmp_refusal_reaches_error_received() -> None:
    loop = asyncio.get_running_loop()
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    dead = probe.getsockname()
    probe.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.connect(dead)
    proto = Recorder()
    ep = BatchedUdpEndpoint(loop, sock, proto)
    try:
        ep.sendto(b"anyone?", dead)
        for _ in range(200):
            if proto.errors:
                break
            await asyncio.sleep(0.01)
        assert proto.errors and isinstance(proto.errors[0], ConnectionRefusedError)
    finally:
        ep.close()
        await asyncio.wait_for(proto.lost, 5)
