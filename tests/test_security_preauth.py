"""Before a peer has proven the key it costs at most a small fixed budget.

The finding: one 52-byte frame header announcing a 4-64 MiB payload made the daemon allocate
it before the hello; 200 such connections took lu2kd from 28 MB to 900 MB (quic: 200 streams).
Now a connection in its hello accepts only hello frames, refused at the header, and its
read buffer is 4 KiB.  Measured with tracemalloc (Python's own allocations), no timing.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import Any

import pytest
from conformance import BackendUnderTest

from lu2k import wire
from lu2k.backends.tcp import TcpBackend
from lu2k.errors import FrameError
from lu2k.nid import parse_nid
from lu2k.wire import FrameDecoder, FrameType

A, B = parse_nid("127.0.0.1@tcp"), parse_nid("127.0.0.2@tcp")
BIG = 64 << 20


def _big_msg_header() -> bytes:
    body = wire.MSG_BODY.pack(1, A.to_bytes(), B.to_bytes(), 0, 0, 0)
    return wire.encode_header(FrameType.MSG, body, BIG)


def test_hello_decoder_refuses_a_payload_announcement_without_allocating() -> None:
    d = FrameDecoder(BIG, accept=wire.HELLO_FRAMES)
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="MSG frame before the hello finished"):
            d.feed(_big_msg_header())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10
    assert not d.in_payload


@pytest.mark.parametrize("ftype", [FrameType.ACK, FrameType.NACK, FrameType.PING, FrameType.MSG])
def test_every_non_hello_frame_is_refused_before_the_hello(ftype: FrameType) -> None:
    body = bytes(wire.BODIES[ftype].size)
    with pytest.raises(FrameError, match="before the hello"):
        FrameDecoder(BIG, accept=wire.HELLO_FRAMES).feed(wire.encode_frame(ftype, body))


async def test_200_preauth_connections_announcing_64mib_cost_next_to_nothing() -> None:
    """The issue's scenario against the tcp backend: 200 connections, each sending one MSG
    header announcing 64 MiB before any hello.  Every one is refused at its header."""
    server = BackendUnderTest(TcpBackend, "127.0.0.1", max_message_size=BIG).make()
    refused: list[Any] = []
    done = asyncio.Event()

    async def on_accept(t: Any) -> None:
        try:
            await asyncio.wait_for(t.recv(), 10)
        except FrameError as e:
            refused.append(e)
        finally:
            t.close()
            if len(refused) == 200:
                done.set()

    lst = await server.listen("127.0.0.1", 0, on_accept)
    writers: list[asyncio.StreamWriter] = []
    tracemalloc.start()
    try:
        header = _big_msg_header()
        for _ in range(200):
            _r, w = await asyncio.open_connection(*lst.address)
            w.write(header)
            writers.append(w)
        await asyncio.wait_for(done.wait(), 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        for w in writers:
            w.close()
        lst.close()
        await server.close()
    assert all("before the hello" in str(e) for e in refused)
    assert peak < 8 << 20, f"200 unauthenticated connections peaked at {peak} bytes"
