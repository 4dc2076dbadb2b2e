"""On-path attacker between two engines over tcp: capture, tamper, inject, replay, forged ACKs.

A small man-in-the-middle proxy sits between daemon A (sender) and daemon B (receiver, no
endpoint attached, so every genuine message completes ``NO_RECEIVER``).  The proxy knows the
wire format an attacker would know: it splits each direction into the two plaintext hello
frames, then the sealed records (4-byte length prefix), and applies the attack to one unit.

What must hold: nothing the attacker adds or changes is accepted -- B never receives an
injected message, A never reports ``DELIVERED`` for a message that was not delivered, every
message still ends in exactly one completion with its true status -- and the capture shows
neither the payloads nor the NIDs after the hello.  The same attacks against a net with
``encryption: none`` are shown to work (forged ACK -> DELIVERED), which is why sealing is the
default.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Callable
from typing import Any

import pytest

from lu2k.localpair import free_port
from lu2k import wire
from lu2k.crypto import PREFIX, TAG_SIZE
from lu2k.engine import Engine
from lu2k.errors import Status
from lu2k.nid import parse_nid
from lu2k.settings import parse_config
from lu2k.wire import FrameDecoder, FrameType

MARKER = b"TOP-SECRET-PAYLOAD-"
A_NID, B_NID = parse_nid("127.0.0.1@tcp"), parse_nid("127.0.0.2@tcp")
HELLO_UNITS = 2  # per direction: HELLO + AUTH (A->B), HELLO_REPLY + AUTH_OK (B->A)
_count = itertools.count()


def _config(nid: str, port: int, encryption: str) -> Any:
    return parse_config({
        "net": [{"net type": "tcp", "local NI(s)": [{"nid": nid, "tunables": {"peer_credits": 16, "credits": 64}}],
                 "lu2k": {"backend": "tcp", "port": port, "key": "mitm-test-network-key-0123456789",
                          "max_message_size": 1 << 20, "options": {"encryption": encryption}}}],
        "global": {"transaction_timeout": 4, "connect_timeout": 2, "reconnect_min": 0.05, "reconnect_max": 0.2},
    })


class Splitter:
    """Cuts one direction of the byte stream into attack units: hello frames, then records."""

    def __init__(self, sealed: bool) -> None:
        self.sealed = sealed
        self.units = 0
        self._hello = FrameDecoder(1 << 20)
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            if self.units < HELLO_UNITS or not self.sealed:
                if len(self._buf) < wire.BASE_SIZE:
                    break
                size = wire.peek_header_size(self._buf[: wire.BASE_SIZE])
                if len(self._buf) < size:
                    break
                plen = struct.unpack_from("<I", self._buf, 8)[0]
                size += plen
            else:
                if len(self._buf) < 4:
                    break
                size = 4 + PREFIX.unpack_from(self._buf)[0] + TAG_SIZE  # small payloads only: one record per frame
            if len(self._buf) < size:
                break
            out.append(self._buf[:size])
            self._buf = self._buf[size:]
            self.units += 1
        return out


Attack = Callable[[str, int, int, bytes], list[bytes]]  # (direction, connection, unit index, unit) -> units to forward


class MitmProxy:
    def __init__(self, target: tuple[str, int], attack: Attack, sealed: bool) -> None:
        self.target, self.attack, self.sealed = target, attack, sealed
        self.capture: list[bytes] = []
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The handler is tracked like the pumps: close() cancels one still connecting upstream,
        # and waits again for pumps a handler started meanwhile.
        handler = asyncio.current_task()
        assert handler is not None
        self._tasks.add(handler)
        conn = self.connections
        self.connections += 1
        self._writers.append(writer)
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except BaseException:  # refused, or the proxy closing meanwhile: the accepted side is closed either way
            writer.close()
            return
        finally:
            self._tasks.discard(handler)
        self._writers.append(up_w)
        for name, r, w in (("a->b", reader, up_w), ("b->a", up_r, writer)):
            task = asyncio.ensure_future(self._pump(name, conn, r, w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, direction: str, conn: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        split = Splitter(self.sealed)
        try:
            while data := await r.read(65536):
                self.capture.append(data)
                start = split.units
                for i, unit in enumerate(split.feed(data)):
                    for out in self.attack(direction, conn, start + i, unit):
                        w.write(out)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # A writer left to the garbage collector unclosed is a ResourceWarning (an error here).
        # Pumps close their writers, but a pump cancelled before its first step never runs its
        # ``finally``: so every writer is closed here too.
        while self._tasks:
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
        for writer in self._writers:
            writer.close()


async def _run(attack: Attack, count: int = 8, encryption: str = "aes-256-gcm") -> tuple[list[tuple[Status, str]], Engine, Engine, MitmProxy]:
    port = free_port("127.0.0.2")
    a, b = Engine(_config(str(A_NID), port, encryption)), Engine(_config(str(B_NID), port, encryption))
    await b.start(with_shim=False)
    await a.start(with_shim=False)
    proxy = MitmProxy(("127.0.0.2", port), attack, sealed=encryption != "none")
    a.set_peer_addresses({B_NID: f"127.0.0.1:{await proxy.start()}"})
    results: list[list[tuple[Status, str]]] = [[] for _ in range(count)]
    done = asyncio.Event()

    def finisher(i: int) -> Callable[[Status, str], None]:
        def finish(status: Status, reason: str) -> None:
            results[i].append((status, reason))
            if all(results):
                done.set()
        return finish

    try:
        for i in range(count):
            a.send(None, B_NID, 1, 5, MARKER + bytes([65 + i]) * 200, finisher(i))
        await asyncio.wait_for(done.wait(), 20)
    finally:
        # Stopping ends every engine task: any second completion has been recorded by then.
        await a.stop()
        await b.stop()
        await proxy.close()
    assert all(len(r) == 1 for r in results), f"every message ends in exactly one completion: {results}"
    return [r[0] for r in results], a, b, proxy


def _plain_msg(seq: int) -> bytes:
    payload = b"INJECTED" * 8
    return wire.encode_msg_header(seq, A_NID.to_bytes(), B_NID.to_bytes(), 1, 5, payload, False) + payload


def _forged_acks(count: int = 8) -> bytes:
    return wire.encode_acks([(seq, 0) for seq in range(1, count + 1)])


def _after_hello(direction: str, unit: int, want: str) -> bool:
    return direction == want and unit == HELLO_UNITS


async def test_capture_shows_no_payload_and_no_nids() -> None:
    statuses, _a, b, proxy = await _run(lambda d, c, i, u: [u])
    assert {s for s, _ in statuses} == {Status.NO_RECEIVER}
    stream = b"".join(proxy.capture)
    assert MARKER not in stream
    # NIDs appear in the plaintext hello only (it must name who is calling whom), never after.
    hello_bytes = 2 * (wire.BASE_SIZE + wire.HELLO_BODY.size) + 2 * (wire.BASE_SIZE + wire.HELLO_REPLY_BODY.size)
    assert stream.count(B_NID.to_bytes()) <= proxy.connections and b.stats["msgs_received"] == 8  # one per hello
    assert len(stream) > hello_bytes


async def test_tampered_record_closes_the_connection_and_nothing_is_lost() -> None:
    def flip(direction: str, conn: int, unit: int, data: bytes) -> list[bytes]:
        if conn == 0 and _after_hello(direction, unit, "a->b"):
            data = data[:-20] + bytes([data[-20] ^ 0x01]) + data[-19:]
        return [data]

    statuses, _a, b, proxy = await _run(flip)
    assert {s for s, _ in statuses} == {Status.NO_RECEIVER}
    assert b.stats["bad_frames"] == 1 and proxy.connections >= 2  # closed, reconnected, resent


async def test_injected_plaintext_message_is_never_delivered() -> None:
    def inject(direction: str, conn: int, unit: int, data: bytes) -> list[bytes]:
        if conn == 0 and _after_hello(direction, unit, "a->b"):
            return [_plain_msg(1000), data]
        return [data]

    statuses, _a, b, _proxy = await _run(inject)
    assert {s for s, _ in statuses} == {Status.NO_RECEIVER}
    assert b.stats["bad_frames"] == 1
    assert b.stats["msgs_received"] == 8  # the genuine ones, after the reconnect; never the injected one


async def test_replayed_record_is_refused() -> None:
    def replay(direction: str, conn: int, unit: int, data: bytes) -> list[bytes]:
        if conn == 0 and _after_hello(direction, unit, "a->b"):
            return [data, data]
        return [data]

    statuses, _a, b, _proxy = await _run(replay)
    assert {s for s, _ in statuses} == {Status.NO_RECEIVER}
    assert b.stats["bad_frames"] == 1


async def test_reordered_records_are_refused() -> None:
    held: list[bytes] = []

    def swap(direction: str, conn: int, unit: int, data: bytes) -> list[bytes]:
        if conn == 0 and direction == "a->b" and unit == HELLO_UNITS:
            held.append(data)
            return []
        if conn == 0 and direction == "a->b" and unit == HELLO_UNITS + 1:
            return [data, *held]
        return [data]

    statuses, _a, b, _proxy = await _run(swap, count=16)
    assert {s for s, _ in statuses} == {Status.NO_RECEIVER}
    assert b.stats["bad_frames"] == 1


async def test_forged_acks_never_make_delivered() -> None:
    def forge(direction: str, conn: int, unit: int, data: bytes) -> list[bytes]:
        if conn == 0 and _after_hello(direction, unit, "b->a"):
            return [_forged_acks(), data]
        return [data]

    statuses, a, _b, _proxy = await _run(forge)
    assert {s for s, _ in statuses} == {Status.NO_RECEIVER}
    assert a.stats["bad_frames"] == 1  # counted on the sending side too


async def test_forged_acks_on_every_connection_end_in_timeouts_not_delivered() -> None:
    """An attacker who forges on every connection can stop traffic (on-path, it could drop
    it anyway) but never make a message look delivered."""
    def forge(direction: str, conn: int, unit: int, data: bytes) -> list[bytes]:
        if _after_hello(direction, unit, "b->a"):
            return [_forged_acks(), data]
        return [data]

    statuses, _a, _b, _proxy = await _run(forge, count=4)
    assert Status.DELIVERED not in {s for s, _ in statuses}
    assert {s for s, _ in statuses} <= {Status.NO_RECEIVER, Status.TIMED_OUT}


async def test_without_encryption_the_same_forgery_works() -> None:
    """``encryption: none`` is what the issue's attacker had: forged ACKs are believed.  This
    is the failure the sealed default removes (and proof that the proxy's attack is real)."""
    def forge(direction: str, conn: int, unit: int, data: bytes) -> list[bytes]:
        if conn == 0 and direction == "b->a" and unit == HELLO_UNITS:  # right after AUTH_OK, on the messages' connection
            return [data, _forged_acks()]
        return [data]

    statuses, _a, _b, proxy = await _run(forge, encryption="none")
    assert Status.DELIVERED in {s for s, _ in statuses}
    assert MARKER in b"".join(proxy.capture)


@pytest.mark.parametrize("garbage", [b"\x00" * 64, b"\xff" * 4 + b"x" * 60, struct.pack("<I", 16) + b"\x00" * 32])
async def test_garbage_records_close_only_that_connection(garbage: bytes) -> None:
    def inject(direction: str, conn: int, unit: int, data: bytes) -> list[bytes]:
        if conn == 0 and _after_hello(direction, unit, "a->b"):
            return [garbage]
        return [data]

    statuses, _a, b, _proxy = await _run(inject, count=4)
    assert {s for s, _ in statuses} == {Status.NO_RECEIVER}
    assert b.stats["bad_frames"] == 1


def test_hello_frames_types_are_what_the_splitter_assumes() -> None:
    assert FrameType.HELLO in wire.HELLO_FRAMES and FrameType.MSG not in wire.HELLO_FRAMES
