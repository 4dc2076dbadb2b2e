"""o2ib (verbs) backend on soft-RoCE (rdma_rxe on lo) in the QEMU guest.

* the shared transport conformance checks (tests/conformance.py);
* zero-copy sends from a registered buffer, peer loss, bad frames on the RC path;
* two engines talking over o2ib: hello/HMAC, credits, exactly-once completions.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import zlib
from typing import Any

import pytest
from conformance import TRANSPORT_CHECKS, BackendUnderTest, _close, _msg, _recv_n, run_hello

from lu2k.backends.base import BackendSettings, Transport
from lu2k.backends.verbs import VerbsBackend, VerbsTransport
from lu2k.engine import Engine
from lu2k.errors import FrameError, ReadError, Status, WriteError
from lu2k.nid import parse_net
from lu2k.settings import parse_config
from lu2k.wire import ConnType

MAX = 4 << 20


@pytest.mark.parametrize("check", TRANSPORT_CHECKS, ids=lambda c: c.__name__)
async def test_conformance_o2ib(check) -> None:  # type: ignore[no-untyped-def]
    await check(BackendUnderTest(VerbsBackend, "127.0.0.1", max_message_size=MAX))


async def _pair(**options: Any) -> tuple[VerbsBackend, VerbsBackend, VerbsTransport, VerbsTransport, Any]:
    server = VerbsBackend(BackendSettings(parse_net("o2ib"), 0, MAX, options=options))
    client = VerbsBackend(BackendSettings(parse_net("o2ib"), 0, MAX, options=options))
    accepted: asyncio.Queue[Transport] = asyncio.Queue()

    async def on_accept(t: Transport) -> None:
        await accepted.put(t)

    lst = await server.listen("127.0.0.1", 0, on_accept)
    out = await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 30)
    inn = await asyncio.wait_for(accepted.get(), 30)
    assert isinstance(out, VerbsTransport) and isinstance(inn, VerbsTransport)
    await run_hello(client, out, inn, b"guest-tier-test-key")  # frames flow only after the hello
    return server, client, out, inn, lst


async def test_payload_in_registered_memory_is_sent_without_copy() -> None:
    # Zero copy sends the application's bytes as they are: only with the net's encryption off
    # (a sealed frame is ciphertext, which has to be written somewhere first).
    server, client, out, inn, lst = await _pair(encryption="none")
    try:
        region = mmap.mmap(-1, 8 << 20)  # stands in for the shim's shared buffers
        client.register_memory(region)
        payload = os.urandom(3 << 20)
        region[1 << 20 : (1 << 20) + len(payload)] = payload
        view = memoryview(region)[1 << 20 : (1 << 20) + len(payload)]
        got = asyncio.ensure_future(_recv_n(inn, 1))
        await out.send([_msg(1, view)])
        view.release()
        (frame,) = await got
        assert zlib.crc32(frame.payload) == zlib.crc32(payload)
        stats = out.stats()
        assert stats["zero_copy_bytes"] == len(payload)  # the payload went straight from the region
        assert stats["copied_bytes"] < 4096  # only frame headers were copied
        # An unregistered payload takes the bounce-buffer path and arrives just the same.
        other = os.urandom(200_000)
        got = asyncio.ensure_future(_recv_n(inn, 1))
        await out.send([_msg(2, other)])
        (frame,) = await got
        assert bytes(frame.payload) == other and out.stats()["copied_bytes"] >= len(other)
    finally:
        await _close(out, inn, lst, server, client)


async def test_many_frames_through_few_receive_slots() -> None:
    # 4 receive slots of 4 KiB: the sender must wait for reposted buffers (RNR retry), never lose data.
    server, client, out, inn, lst = await _pair(slots=4, slot_size=4096, send_slots=4)
    try:
        payloads = [os.urandom(1 + 731 * i) for i in range(60)]
        got = asyncio.ensure_future(_recv_n(inn, len(payloads)))
        await out.send([_msg(i + 1, p) for i, p in enumerate(payloads)])
        frames = await got
        assert [bytes(f.payload) for f in frames] == payloads
    finally:
        await _close(out, inn, lst, server, client)


async def test_peer_loss_is_seen_by_reader_and_sender() -> None:
    server, client, out, inn, lst = await _pair()
    try:
        await out.send([_msg(1, b"before the crash")])
        await _recv_n(inn, 1)
        inn._teardown()  # what a crash leaves: QP gone, side channel closed, no "bye"
        with pytest.raises(ReadError, match="lost"):
            await asyncio.wait_for(out.recv(), 30)
        with pytest.raises(WriteError):
            await out.send([_msg(2, b"after")])
    finally:
        await _close(out, inn, lst, server, client)


async def test_garbage_on_the_rc_path_is_a_frame_error() -> None:
    server, client, out, inn, lst = await _pair()
    try:
        fut = out._post_send(out._free_send.popleft(), [memoryview(b"GET / HTTP/1.0\r\n\r\n")])
        await fut
        with pytest.raises(FrameError, match="not an lu2k sealed frame"):
            await asyncio.wait_for(inn.recv(), 30)
    finally:
        await _close(out, inn, lst, server, client)


def _config(nid: str, port: int, key: str) -> Any:
    return parse_config({
        "net": [{"net type": "o2ib", "local NI(s)": [{"nid": nid, "tunables": {"peer_credits": 2, "credits": 4}}],
                 "lu2k": {"backend": "o2ib", "port": port, "key": key, "max_message_size": 1 << 20}}],
        "global": {"transaction_timeout": 60, "connect_timeout": 10, "reconnect_min": 0.05, "reconnect_max": 0.5},
    })


async def test_engines_over_o2ib_complete_each_message_exactly_once() -> None:
    a = Engine(_config("127.0.0.1@o2ib", 7992, "o2ib-site-key-0123"))
    b = Engine(_config("127.0.0.2@o2ib", 7992, "o2ib-site-key-0123"))
    await a.start(with_shim=False)
    await b.start(with_shim=False)
    try:
        calls: list[list[tuple[Status, str]]] = [[] for _ in range(30)]
        done = asyncio.Event()

        def finisher(i: int):  # type: ignore[no-untyped-def]
            def finish(status: Status, reason: str) -> None:
                calls[i].append((status, reason))
                if all(calls):
                    done.set()
            return finish

        for i in range(30):
            a.send(None, b.primary_nid(), 1, 9, os.urandom(100 + 150_000 * (i % 3)), finisher(i))
        await asyncio.wait_for(done.wait(), 120)
        assert {c[0][0] for c in calls} == {Status.NO_RECEIVER}
        peer = a.describe_peers()[0]
        assert peer["state"] == "up" and peer["in_flight"] == 0
    finally:
        await a.stop()
        await b.stop()
    # Both engines stopped: no completion can come any more, so these counts are final.
    assert all(len(c) == 1 for c in calls), calls


async def test_close_with_linger_expiring_fails_a_posted_send_cleanly() -> None:
    # The receiver reads nothing and has two receive slots: the third message's SEND waits for a
    # slot (RNR retries) with its work request posted.  close() with a linger far shorter gives
    # up on that completion: the send must end with WriteError, never as cancelled -- a cancelled
    # send would leave its messages' completions owed for ever.
    server, client, out, inn, lst = await _pair(slots=2, linger=0.001)
    try:
        sends = [asyncio.ensure_future(out.send([_msg(i + 1, b"r" * 1000)])) for i in range(4)]
        await asyncio.sleep(0.5)  # two delivered, the third posted and refused for want of a slot
        assert [s.done() for s in sends[:2]] == [True, True] and not sends[2].done()
        out.close()
        done, pending = await asyncio.wait(sends, timeout=30)
        assert not pending
        outcomes = ["cancelled" if s.cancelled() else type(s.exception()).__name__ if s.exception() else "sent" for s in sends]
        assert outcomes[2:] == ["WriteError", "WriteError"], outcomes
    finally:
        await _close(out, inn, lst, server, client)
