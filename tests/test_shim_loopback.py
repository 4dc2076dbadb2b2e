"""Tests for lu2k.kernel_shim.loopback: local delivery between portals, parking when RX is full."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from lu2k.errors import Status
from lu2k.kernel_shim.endpoint import AsyncEndpoint
from lu2k.kernel_shim.loopback import LoopbackHandler, LoopbackThread, serve_loopback
from lu2k.kernel_shim.server import ShimConfig, ShimServer
from lu2k.nid import parse_nid

LO = parse_nid("0@lo").to_bytes()


@pytest.fixture
async def server(tmp_path: object) -> AsyncIterator[ShimServer]:
    s = serve_loopback(os.path.join(str(tmp_path), "lo.sock"), config=ShimConfig(rx_pool_bytes=64 << 10, max_in_flight=64))
    await s.start()
    yield s
    await s.close()


def handler_of(s: ShimServer) -> LoopbackHandler:
    assert isinstance(s.handler, LoopbackHandler)
    return s.handler


async def settle(cond: object, what: str) -> None:
    for _ in range(20000):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.0005)
    raise AssertionError(f"never happened: {what}")


async def test_full_receiver_parks_messages_in_order(server: ShimServer) -> None:
    async with await AsyncEndpoint.attach(server.path, 1) as tx, await AsyncEndpoint.attach(server.path, 2, rx_pool_bytes=64 << 10) as rx:
        size = 200_000  # a 64 KiB RX pool still has 2 + 2 slots (2 MiB and 4 MiB classes) for this
        comps = [await tx.send(LO, bytes([i]) * size, portal=2) for i in range(6)]
        await settle(lambda: handler_of(server).parked() == 2, "two messages parked")
        await settle(lambda: tx.poll() >= 0 and sum(c.done for c in comps) == 4, "four delivered")
        seen = []
        for _ in range(6):
            m = await rx.recv(10)
            assert m is not None and len(m) == size
            seen.append(m.payload[0])
            m.release()
        assert seen == list(range(6))  # parking keeps the order
        for c in comps:
            await c
        assert handler_of(server).parked() == 0


async def test_receiver_detach_fails_parked_with_no_receiver(server: ShimServer) -> None:
    async with await AsyncEndpoint.attach(server.path, 1) as tx:
        rx = await AsyncEndpoint.attach(server.path, 2, rx_pool_bytes=64 << 10)
        comps = [await tx.send(LO, b"z" * 200_000, portal=2) for _ in range(6)]
        await settle(lambda: handler_of(server).parked() == 2, "two parked")
        await rx.detach()
        for c in comps:
            assert await c.wait(10)
        assert [c.status for c in comps] == [Status.DELIVERED] * 4 + [Status.NO_RECEIVER] * 2
        assert "detached" in comps[-1].reason


async def test_sender_detach_drops_its_parked_messages(server: ShimServer) -> None:
    async with await AsyncEndpoint.attach(server.path, 2, rx_pool_bytes=64 << 10) as rx:
        tx = await AsyncEndpoint.attach(server.path, 1)
        for _ in range(6):
            await tx.send(LO, b"q" * 200_000, portal=2)
        await settle(lambda: handler_of(server).parked() == 2, "two parked")
        await tx.detach()
        await settle(lambda: handler_of(server).parked() == 0, "parked messages of the sender dropped")
        for _ in range(4):
            m = await rx.recv(10)
            assert m is not None
            m.release()
        assert await rx.recv(0.05) is None


async def test_wrong_nid_and_too_large(server: ShimServer) -> None:
    async with await AsyncEndpoint.attach(server.path, 1) as ep:
        c = await ep.send("192.168.0.1@tcp", b"x", portal=1)
        assert await c.wait(10) and c.status is Status.NO_ROUTE


def test_loopback_thread_reports_start_errors(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "notasocket")
    with open(path, "w"):
        pass
    with pytest.raises(Exception, match="not a socket"):
        LoopbackThread(path).start()
