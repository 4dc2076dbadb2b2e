"""Striping one BULK connection of the tcp backend over several TCP sockets (GridFTP/bbcp style).

Why: one TCP connection on a long lossy path (a GEO hop: 600 ms RTT, 1 % loss) is held
back by its own loss recovery and congestion control -- every lost segment stalls the
ordered byte stream behind it for a round trip, and the window grows back one RTT at a
time.  Several connections in parallel lose independently: while one recovers, the others
keep the link busy.  lu2k messages need no order between them (the core places them by
sequence number and answers repeats from its dedupe window), so the frames of one
connection can be spread over several sockets without any reassembly.

Theory of operation
-------------------
* The *first* socket of a BULK connection is an ordinary tcp connection: the engine runs
  the hello over it.  When the hello is done both ends derive from its (secret) frame key
  a 128-bit *join id*; the accepting end registers the connection under it.
* The connecting end then opens ``streams - 1`` more sockets.  Each starts with a JOIN
  record (:data:`JOIN`: magic, version, stripe index, join id) instead of a hello; the
  accepting backend peeks at the first bytes of every accepted socket, and a JOIN whose id
  is registered attaches the socket to that connection as stripe ``index``.  Anything else
  (a hello) goes to the engine as before.  Knowing the join id proves the socket comes from
  the end that did the hello: only the two ends know the frame key.
* Every stripe seals its frames like the first socket, with keys of its own derived from
  the hello's keys and its index (:func:`stripe_keys`), so records cannot be moved from one
  stripe to another; with ``encryption: none`` stripes carry plaintext like the first.
* Sending: a batch of frames is handed out a share (``SHARE_BYTES``) at a time, each share
  to a stripe that is not still writing one, the one whose kernel socket holds the fewest
  bytes; a stripe whose socket is full keeps one share while the others carry the rest, so
  no stripe runs dry behind a slow one.  ``send`` returns when every share is written (the
  payload buffers are free then, as the engine requires).  Receiving: one reader per stripe feeds a small
  bounded queue that ``recv`` takes from; when the engine stops reading, the readers stop
  and TCP pushes back on the sender.
* Exactly once: a stripe that fails fails the whole connection (every socket is closed),
  so the engine reconnects and resends what was not acknowledged -- the same path as any
  lost connection; the receiving core drops copies.  A stripe that never joins (refused,
  lost) leaves the connection working on the stripes it has.

CONTROL connections and backends without typed connections are never striped.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog

from ..errors import ConnectionClosed, FrameError, Lu2kError, ReadError, WriteError
from ..wire import BufferFor, ConnType, Frame, HelloResult
from .base import OutFrame, Transport

if TYPE_CHECKING:
    from .tcp import TcpTransport

log = structlog.get_logger("lu2k.backends.tcp")

JOIN = struct.Struct("<4sBB2x16s")  # magic b"L2SJ", version, stripe index (1..MAX_STREAMS-1), join id
JOIN_MAGIC = b"L2SJ"
JOIN_VERSION = 1
MAX_STREAMS = 16
QUEUE_PER_STRIPE = 2  # received frame batches waiting for the engine, per stripe
SHARE_BYTES = 256 << 10  # what one stripe is given of a batch at a time

# ``streams`` when the net's options do not say: one socket.  With its window and unsent bytes
# sized for the path (``notsent_lowat``, the peer's byte window), one BBR socket carried 92 % of
# the lab's GEO link at 1 % loss where two carried 87 % (docs/measurements/2026-12-04-tcp.md):
# each stripe restarts BBR's STARTUP, overshooting the bottleneck queue, and splits the window.
DEFAULT_STREAMS = 1


def join_id(connector_tx_key: bytes) -> bytes:
    """The id both ends derive from the hello's connector-to-acceptor frame key."""
    return hmac.new(connector_tx_key, b"lu2k tcp stripe join", hashlib.sha256).digest()[:16]


def _derive(key: bytes, index: int) -> bytes:
    return hmac.new(key, b"lu2k tcp stripe %d" % index, hashlib.sha256).digest()


def stripe_keys(result: HelloResult, index: int) -> HelloResult:
    """The hello result stripe ``index`` seals with: keys of its own (index 0: the hello's)."""
    if index == 0:
        return result
    return replace(result, tx_key=_derive(result.tx_key, index), rx_key=_derive(result.rx_key, index))


def encode_join(index: int, jid: bytes) -> bytes:
    return JOIN.pack(JOIN_MAGIC, JOIN_VERSION, index, jid)


def decode_join(raw: bytes) -> tuple[int, bytes] | None:
    """(index, join id) of a JOIN record, or None if it is not a valid one."""
    if len(raw) != JOIN.size:
        return None
    magic, version, index, jid = JOIN.unpack(raw)
    if magic != JOIN_MAGIC or version != JOIN_VERSION or not 1 <= index < MAX_STREAMS:
        return None
    return index, jid


class StripeRegistry:
    """Accepted BULK connections waiting for their stripes, by join id (one per backend)."""

    def __init__(self) -> None:
        self._by_id: dict[bytes, StripedTransport] = {}

    def add(self, jid: bytes, transport: "StripedTransport") -> None:
        self._by_id[jid] = transport

    def remove(self, jid: bytes) -> None:
        self._by_id.pop(jid, None)

    def get(self, jid: bytes) -> "StripedTransport | None":
        for known, t in self._by_id.items():
            if hmac.compare_digest(known, jid):
                return t
        return None


Opener = Callable[[int, bytes], Awaitable["TcpTransport"]]


class StripedTransport(Transport):
    """One lu2k connection over one or more tcp sockets (see the module docstring)."""

    backend_name = "tcp"

    def __init__(self, first: "TcpTransport", *, registry: StripeRegistry | None = None, streams: int = 1,
                 opener: Opener | None = None, watcher: Callable[["TcpTransport"], None] | None = None) -> None:
        self.stripes: list[TcpTransport] = [first]
        self._registry = registry  # accepting end
        # Accepting end: what tunes a socket's sending side for bulk (the backend's BBR watch),
        # applied to every stripe once the engine sends bulk on our direction (carry_requests).
        self._watcher = watcher
        self._carrying_bulk = False
        self._streams, self._opener = streams, opener  # connecting end
        self._result: HelloResult | None = None
        self._jid = b""
        self._buffer_for: BufferFor | None = None
        self._queue: asyncio.Queue[list[Frame] | Lu2kError] | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._taken: set[int] = {0}
        self._peer = first.peer_address
        self._join_checked = registry is None
        self._closed = False
        self.joins_refused = 0

    # -- the first socket and the hello ------------------------------------------------------

    @property
    def peer_address(self) -> str:
        return self._peer

    async def take_join(self) -> bool:
        """Accepting end, before the hello: whether this socket began with a JOIN (it then
        belongs to the connection the JOIN names, and this transport is left empty)."""
        first = self.stripes[0]
        head = await first.peek(JOIN.size, JOIN_MAGIC)
        self._join_checked = True
        if not head.startswith(JOIN_MAGIC):
            return False
        joined = decode_join(first.take(JOIN.size))
        owner = self._registry.get(joined[1]) if joined is not None and self._registry is not None else None
        if joined is None or owner is None:
            raise FrameError(f"{self._peer}: stripe JOIN for no connection here")
        self.stripes = []
        self._closed = True
        owner.attach(joined[0], first)
        return True

    def set_buffer_for(self, buffer_for: BufferFor | None) -> None:
        self._buffer_for = buffer_for
        for s in self.stripes:
            s.set_buffer_for(buffer_for)

    def on_hello_done(self, result: HelloResult) -> None:
        self.stripes[0].on_hello_done(result)
        if result.conn_type is not ConnType.BULK:
            return
        self._result = result
        self._queue = asyncio.Queue(maxsize=QUEUE_PER_STRIPE * MAX_STREAMS)
        if self._registry is not None:
            self._jid = join_id(result.rx_key)
            self._registry.add(self._jid, self)
        elif self._opener is not None and self._streams > 1:
            self._jid = join_id(result.tx_key)
            for index in range(1, self._streams):
                self._spawn(self._open(index))

    async def _open(self, index: int) -> None:
        assert self._opener is not None
        try:
            t = await self._opener(index, encode_join(index, self._jid))
        except Lu2kError as e:
            log.info("stripe not opened; carrying on with fewer", peer=self.peer_address, stripe=index, error=str(e))
            return
        if self._closed:
            t.close()
            return
        self.attach(index, t)

    def attach(self, index: int, t: "TcpTransport") -> bool:
        """Add a joined socket as stripe ``index``; False (and the socket closed) if it cannot be."""
        if self._closed or self._result is None or index in self._taken or len(self.stripes) >= MAX_STREAMS:
            self.joins_refused += 1
            t.close()
            return False
        self._taken.add(index)
        t.on_hello_done(stripe_keys(self._result, index))
        t.set_buffer_for(self._buffer_for)
        self.stripes.append(t)
        if self._carrying_bulk:
            self._watch(t)
        if self._readers:
            self._start_reader(t)
        log.info("stripe joined", peer=self._peer, stripe=index, stripes=len(self.stripes))
        return True

    def carry_requests(self, conn_type: ConnType) -> None:
        """Bulk messages of ours on this accepted connection (a return path): each socket's
        BBR gets the watch that the sockets of a connection we open get (start-up cap, no
        ProbeRTT on long paths).  Only the sending side is changed: TCP's congestion control
        is per direction's sender, so the peer's messages on the other direction are not."""
        if conn_type is not ConnType.BULK or self._watcher is None or self._carrying_bulk or self._closed:
            return
        self._carrying_bulk = True
        for t in self.stripes:
            self._watch(t)

    def _watch(self, t: "TcpTransport") -> None:
        assert self._watcher is not None
        try:
            self._watcher(t)
        except OSError as e:  # the socket is failing: its next send or receive ends the connection
            log.info("cannot watch a socket's BBR", peer=self._peer, error=e.strerror)

    # -- data ----------------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_reader(self, t: "TcpTransport") -> None:
        self._readers.append(asyncio.ensure_future(self._read(t)))

    async def _read(self, t: "TcpTransport") -> None:
        assert self._queue is not None
        try:
            while True:
                frames = await t.recv()
                await self._queue.put(frames)
        except Lu2kError as e:
            self._end(e)

    def _end(self, e: Lu2kError) -> None:
        """One stripe ended, or the engine closes: every socket closes, and a ``recv`` waiting
        (or the next one) raises ``e`` -- the engine reconnects and resends, as for any lost
        connection."""
        if self._closed:
            return
        self._closed = True
        if self._registry is not None and self._jid:
            self._registry.remove(self._jid)
        for t in self.stripes:
            t.close()
        for task in [*self._readers, *self._tasks]:
            if task is not asyncio.current_task():
                task.cancel()
        queue = self._queue
        if queue is not None:
            while not queue.empty():  # the error must not wait behind frames nobody will read
                queue.get_nowait()
            queue.put_nowait(e)

    async def recv(self) -> list[Frame]:
        if not self._join_checked and await self.take_join():
            raise ConnectionClosed(f"{self._peer} joined its connection as a stripe")
        if self._queue is None:  # the hello, or a connection that is not striped
            if not self.stripes:
                raise ConnectionClosed(f"{self._peer} joined its connection as a stripe")
            return await self.stripes[0].recv()
        if not self._readers:
            for t in self.stripes:
                self._start_reader(t)
        item = await self._queue.get()
        if isinstance(item, Lu2kError):
            self._queue.put_nowait(item)  # and for every later call
            raise item
        return item

    async def send(self, frames: Sequence[OutFrame]) -> None:
        stripes = list(self.stripes)
        if not stripes:
            raise WriteError(f"connection to {self._peer} closed")
        if len(stripes) == 1 or len(frames) == 0:
            await stripes[0].send(frames)
            return
        if self._closed:
            raise WriteError(f"connection to {self.peer_address} closed")
        await self._spread(stripes, frames)

    async def _spread(self, stripes: list["TcpTransport"], frames: Sequence[OutFrame]) -> None:
        """Hand the batch out a share at a time, each share to the free stripe whose kernel holds
        the fewest bytes, and return when every share is written.  A stripe whose socket is
        full (its TCP recovering a loss) keeps only the share it has: the others carry the rest
        of the batch, so none of them runs dry -- an idle stripe would be app-limited and its
        BBR would neither leave STARTUP nor fill its share of the link."""
        sizes = [len(h) + len(p) for h, p in frames]
        next_frame = 0
        writing: dict[int, asyncio.Future[None]] = {}
        failure: BaseException | None = None
        try:
            while next_frame < len(frames) or writing:
                free = [i for i in range(len(stripes)) if i not in writing]
                if next_frame < len(frames) and free and failure is None:
                    i = min(free, key=lambda k: stripes[k].unsent_bytes())
                    end, taken = next_frame, 0
                    while end < len(frames) and (end == next_frame or taken + sizes[end] <= SHARE_BYTES):
                        taken += sizes[end]
                        end += 1
                    writing[i] = asyncio.ensure_future(stripes[i].send(frames[next_frame:end]))
                    next_frame = end
                    continue
                if not writing:
                    break
                await asyncio.wait(writing.values(), return_when=asyncio.FIRST_COMPLETED)
                for i, fut in list(writing.items()):
                    if fut.done():
                        del writing[i]
                        if failure is None and (fut.cancelled() or fut.exception() is not None):
                            failure = fut.exception() if not fut.cancelled() else WriteError(f"send to {self._peer} cancelled")
                            if isinstance(failure, Lu2kError):
                                self._end(failure)  # closes every socket: the other writes end too
        finally:
            if writing:  # cancelled, or failed: no write may outlive the call (the payloads are the caller's)
                for fut in writing.values():
                    fut.cancel()
                await asyncio.gather(*writing.values(), return_exceptions=True)
        if failure is not None:
            raise failure

    def close(self) -> None:
        self._end(ReadError(f"connection to {self.peer_address} closed locally"))

    def stats(self) -> dict[str, Any]:
        per = [s.stats() for s in self.stripes]
        out: dict[str, Any] = dict(per[0]) if per else {}
        for key in ("bytes_sent", "bytes_received"):
            out[key] = sum(int(p.get(key, 0)) for p in per)
        out["streams"] = len(self.stripes)
        restarts = sum(int(p.get("bbr_restarts", 0)) for p in per)
        if restarts:
            out["bbr_restarts"] = restarts  # each socket's BBR is watched on its own
        if self.joins_refused:
            out["stripe_joins_refused"] = self.joins_refused
        return out

