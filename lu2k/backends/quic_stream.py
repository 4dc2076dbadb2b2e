"""QUIC backend, data path: lu2k frames over QUIC streams (the socklnd ``_cb`` of this backend).

Stream layout.  Each side of a connection opens unidirectional streams only:

* one **control stream**, opened as soon as the connection is up and kept open, carrying
  the hello (HELLO .. AUTH_OK, REJECT) and PING/PONG in order;
* **ACK streams**: the ACK/NACK frames of one ``send()`` on a stream of their own (FIN), so
  a lost packet on the return path delays only those ACKs, not every later one;
* one **message stream per MSG frame**, closed (FIN) right after it -- except that small
  messages handed over in one ``send()`` share a stream up to ``stream_batch`` (64 KiB):
  per-stream overhead (and aioquic's per-packet walk over open streams) would otherwise cost
  more than the head-of-line blocking it saves.

Every stream starts with a one-byte role (:data:`ROLE_CONTROL` / :data:`ROLE_MESSAGE` /
:data:`ROLE_ACKS`), then
lu2k frames exactly as on TCP (:mod:`lu2k.wire`), decoded by a :class:`~lu2k.wire.FrameDecoder`
per stream with the engine's ``buffer_for``, so a payload is copied once, from the decrypted
QUIC packet into the engine's buffer.  A lost packet stalls only the message whose bytes it
carried: messages complete, and are handed to ``recv()``, in whatever order their streams
complete.  The engine is built for that (per-sequence dedupe and ACKs); ``ordered: true``
restores send order for anyone who is not (at the price of head-of-line blocking again).

Bounds.  ``send()`` returns once aioquic has copied the payloads, then waits while more than
``send_buffer`` bytes of message streams are not yet acknowledged by the peer, so the
engine's credits, not aioquic's unbounded buffers, decide what is in flight.  Incoming
streams are capped by QUIC's MAX_STREAMS (``max_streams``).  Completed frames waiting for
``recv()`` are capped at ``recv_buffer`` bytes: beyond that, datagrams of this connection are
dropped unread, which the peer sees as loss and retransmits later (back-pressure the way a
full socket buffer gives it).

Parking.  aioquic walks every stream it knows (twice) for every packet it builds, and a
stream stays known until the peer has acknowledged all of it -- a round trip.  With a stream
per message that is a GEO round trip of streams (~1 200 at 2 000 messages/s) walked per
packet, the largest CPU cost of small messages.  :class:`StreamParking` takes our own send
streams out of aioquic's tables once everything on them has been sent, and puts a stream back
the moment aioquic declares some of it lost (so the retransmission goes out as before); a
parked stream that the peer acknowledges completely is just forgotten, as aioquic would.  The
walk then covers only streams with something to send.

Keepalive: a PING whenever nothing was sent for ``keepalive`` seconds, so NAT bindings and
the idle timeout survive quiet periods.  Liveness: QUIC has no reset, so a peer that restarted
just goes silent; with data outstanding and nothing heard for ``dead_timeout`` seconds the
connection is failed (``ReadError``) and the engine reconnects, instead of waiting for the
idle timeout.

A path that went silent: the side that was receiving data PINGs into the silence, and the
side whose probe timeout is backed off probes as soon as anything arrives, so the sending side
learns that a hand-over's outage is over within a round trip (:mod:`.quic_pathwatch`).  This
reads aioquic's recovery state (``_loss._pto_count``, ``_rtt_smoothed``, ``_rtt_initialized``,
``_rtt_initial``) and asks for a probe with ``QuicConnection._send_probe``, as aioquic's own
probe timeout does (aioquic is pinned to 1.7.x in setup.cfg).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import collections
from collections.abc import Callable, Sequence
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.packet import QuicErrorCode
from aioquic.quic.packet_builder import QuicDeliveryState
from aioquic.quic.stream import QuicStream, QuicStreamSender

import hashlib

from cryptography.hazmat.primitives.serialization import Encoding

from ..inet import format_hostport
from ..errors import ConnectError, FrameError, Lu2kError, ReadError, WriteError
from ..wire import HELLO_FRAMES, BufferFor, Frame, FrameDecoder, FrameHeader, FrameType, HelloResult
from .base import OutFrame, Transport
from .quic_pathwatch import DATA_DATAGRAM, PathWatch

ROLE_CONTROL = 0x01
ROLE_MESSAGE = 0x02
ROLE_ACKS = 0x03
UNORDERED_CONTROL = (FrameType.ACK, FrameType.NACK)

# Application close codes (QUIC APPLICATION_CLOSE).
APP_NO_ERROR = 0x0
APP_AUTH_REJECTED = 0x101
APP_PROTOCOL_ERROR = 0x102
# How much the backend hands aioquic ahead of the packets it builds.  aioquic walks every
# stream it holds for every packet and serves the streams with data in turn, so each fed
# stream costs CPU per packet and delays every other message's completion: a bulk message is
# fed alone.  Small messages each on their own stream (one per send()) must still share
# packets, or every one costs a whole packet and a whole pacing slot: so streams are fed until
# this many bytes are unsent inside aioquic, at most FEED_STREAMS of them.
FEED_BYTES = 8 * 1024
FEED_STREAMS = 8
PATHWATCH_LIMIT = 5.0  # seconds a silent path is watched when no dead_timeout is set


class _InStream:
    """Receive state of one peer stream."""

    __slots__ = ("role", "decoder", "frames", "finished", "reserved")

    def __init__(self) -> None:
        self.role = 0
        self.decoder: FrameDecoder | None = None
        self.frames: list[Frame] = []
        self.finished = False
        self.reserved = 0  # bytes of private payload buffers this stream holds (see _reserve)


class _OutStream:
    """A message stream waiting to be handed to aioquic."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0


def _has_unsent(sender: QuicStreamSender) -> bool:
    """Data or a FIN waiting to be (re)sent.  Not ``buffer_is_empty``: aioquic clears that only
    on the walk after the last frame went out, and never for a stream out of the walk."""
    return bool(len(sender._pending)) or sender._pending_eof


class StreamParking:
    """Our send streams, in or out of aioquic's stream tables (see "Parking" above).

    aioquic (1.7) keeps every stream in ``_streams`` (looked up by ID, walked for flow-control
    updates) and ``_streams_queue`` (walked for data to send) until it is finished.  A send
    stream with nothing left to send needs neither: frames arriving for it are ignored by
    aioquic as for a discarded stream (the peer sends none on our unidirectional streams but
    MAX_STREAM_DATA, and a stream that is all sent is not blocked), and the ACKs and losses of
    its packets reach it through the delivery handler each sent frame holds.  That handler is
    wrapped when the stream is tracked -- before its first frame is built -- so that a loss
    puts the stream back, and its completion is reported once through ``on_finished``.
    """

    def __init__(self, quic: QuicConnection, on_finished: Callable[[int], None]) -> None:
        self._quic = quic
        self._on_finished = on_finished
        self._sending: dict[int, QuicStream] = {}  # tracked streams in aioquic's tables
        self.parked: dict[int, QuicStream] = {}  # tracked streams taken out of them
        self.unparked = 0  # streams put back for a retransmission (a statistic)

    def track(self, stream_id: int) -> None:
        """Watch a send stream we just opened (before anything of it was transmitted)."""
        stream = self._quic._streams[stream_id]
        # The handler refers to the stream by ID only: a closure over the stream (or over its
        # sender's bound method) would make every stream a reference cycle, garbage that only
        # the cyclic collector frees -- a thousand a second, and its pauses show in the tail.
        stream.sender.on_data_delivery = functools.partial(self._on_data_delivery, stream_id)  # type: ignore[method-assign]
        self._sending[stream_id] = stream

    def _on_data_delivery(self, stream_id: int, delivery: QuicDeliveryState, start: int, stop: int, fin: bool) -> None:
        stream = self._sending.get(stream_id) or self.parked.get(stream_id)
        if stream is None:
            return  # all acknowledged already: a late ACK of a packet declared lost
        QuicStreamSender.on_data_delivery(stream.sender, delivery, start, stop, fin)
        self._delivered(stream)

    def _delivered(self, stream: QuicStream) -> None:
        sid = stream.sender._stream_id
        assert sid is not None
        sender = stream.sender
        if sender.is_finished:
            # Acknowledged, FIN included.  In aioquic's tables, its walk discards it; parked,
            # forgetting it is the discard (a stream of ours frees no stream credit of the peer's).
            if self.parked.pop(sid, None) is None:
                del self._sending[sid]
            self._on_finished(sid)
        elif sid in self.parked and _has_unsent(sender):
            # Part of it was lost: back into the walk, which retransmits it.
            del self.parked[sid]
            self._quic._streams[sid] = stream
            self._quic._streams_queue.append(stream)
            self._sending[sid] = stream
            self.unparked += 1

    def park(self) -> None:
        """After a transmit pass: take out the tracked streams that have sent everything."""
        idle = [stream for stream in self._sending.values()
                if not (_has_unsent(stream.sender) or stream.sender.reset_pending or stream.sender.is_finished)]
        if not idle:
            return
        streams = self._quic._streams
        for stream in idle:
            sid = stream.sender._stream_id
            assert sid is not None
            del self._sending[sid]
            del streams[sid]
            self.parked[sid] = stream
        self._quic._streams_queue = [stream for stream in self._quic._streams_queue if stream.sender._stream_id in streams]


class QuicTransport(Transport):
    """One QUIC connection seen as an lu2k transport."""

    backend_name = "quic"

    def __init__(self, protocol: "Lu2kQuicProtocol", peer: str) -> None:
        self._protocol = protocol
        self._quic = protocol._quic
        self._peer = peer
        self._buffer_for: BufferFor | None = None
        self._frames: collections.deque[Frame] = collections.deque()
        self._frames_bytes = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._error: Lu2kError | None = None
        self._closed = False
        self._control_id: int | None = None
        self._unacked: dict[int, int] = {}  # message stream -> its bytes, until the peer has acknowledged it all
        self.parking = StreamParking(self._quic, self._stream_acknowledged)
        self._pending: collections.deque[_OutStream] = collections.deque()  # not yet given to aioquic
        self._active: list[int] = []
        self.unacked_bytes = 0
        self.in_streams: dict[int, _InStream] = {}
        self._next_ordered: int | None = None
        self._held: dict[int, list[Frame]] = {}
        self.msgs_sent = self.msgs_received = 0
        self.bytes_sent = self.bytes_received = 0
        self.datagrams_dropped = 0
        self._hello_done = False
        self.private_bytes = 0  # payload buffers of unfinished message streams we allocated
        self.private_budget = max(protocol.stream_options.recv_buffer, 8 * protocol.stream_options.max_payload)
        # Client side, resumed TLS session: no certificate is sent again, so the binding is
        # the one remembered with the session ticket (set by the backend).
        self.resumed_binding = b""

    # --- the hello ---------------------------------------------------------------------------------

    def on_hello_done(self, result: HelloResult) -> None:
        """From now on the peer may open message and ACK streams, and the control stream
        carries PING/PONG too.  Until now, any other stream was refused at its first byte and
        the control stream took only hello frames: an unauthenticated peer cannot make us
        allocate a payload, however many streams it opens."""
        self._hello_done = True
        for s in self.in_streams.values():
            if s.decoder is not None:
                s.decoder._accept = None

    @property
    def channel_binding(self) -> bytes:
        """RFC 5929 ``tls-server-end-point``: the hash of the certificate the TLS server
        presented.  A relay terminating TLS with its own certificate sees a different hash on
        each side, so the hello's MACs (which cover it) fail."""
        quic = self._quic
        cert = quic.configuration.certificate if not quic._is_client else getattr(quic.tls, "_peer_certificate", None)
        if cert is None:
            return self.resumed_binding
        return b"tls-server-end-point:" + hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()

    # --- settings from the backend ---------------------------------------------------------------

    @property
    def _opts(self) -> "StreamOptions":
        return self._protocol.stream_options

    @property
    def peer_address(self) -> str:
        return self._peer

    def set_buffer_for(self, buffer_for: BufferFor | None) -> None:
        self._buffer_for = buffer_for  # the streams' decoders ask through _stream_buffer_for

    def _stream_buffer_for(self, stream: _InStream) -> BufferFor:
        """The engine's buffer if it has one; else a private buffer, within the connection's
        budget: a peer (even one holding the key) announcing big payloads on many streams
        and then sending nothing cannot make us allocate more than ``private_budget``."""
        def buffer_for(header: FrameHeader) -> memoryview | None:
            target = self._buffer_for(header) if self._buffer_for is not None else None
            if target is not None or not header.payload_len:
                return target
            need = header.payload_len
            if self.private_bytes + need > self.private_budget:
                raise FrameError(f"{self._peer} announced more unfinished message payload than this connection's budget "
                                 f"({self.private_bytes} + {need} > {self.private_budget} bytes)")
            self.private_bytes += need
            stream.reserved += need
            return memoryview(bytearray(need))
        return buffer_for

    def _release(self, stream: _InStream) -> None:
        self.private_bytes -= stream.reserved
        stream.reserved = 0

    # --- sending -----------------------------------------------------------------------------------

    def open_control_stream(self) -> None:
        """Open our control stream first, so message streams follow it in ID order."""
        if self._control_id is None:
            self._control_id = self._quic.get_next_available_stream_id(is_unidirectional=True)
            self._quic.send_stream_data(self._control_id, bytes([ROLE_CONTROL]))
            self._protocol.transmit_soon()

    async def send(self, frames: Sequence[OutFrame]) -> None:
        self._check_writable()
        self.open_control_stream()
        assert self._control_id is not None
        item: _OutStream | None = None  # message stream being gathered from this call
        acks: list[bytes] = []
        limit = self._opts.stream_batch
        for header, payload in frames:
            ftype = header[5] if len(header) > 5 else 0
            size = len(header) + len(payload)
            if ftype == FrameType.MSG:
                # Small messages of one send() share a stream (up to stream_batch bytes):
                # a stream per 100-byte message costs more than head-of-line blocking saves.
                if item is not None and (size >= limit or item.size + size > limit):
                    self._pending.append(item)
                    item = None
                if item is None:
                    item = _OutStream()
                # The copy frees the caller's payload buffer as soon as send() returns.
                item.chunks += (bytes(header), bytes(payload))
                item.size += size
                self.unacked_bytes += size
                self.msgs_sent += 1
            elif ftype in UNORDERED_CONTROL:
                acks += (bytes(header), bytes(payload))
            else:
                self._quic.send_stream_data(self._control_id, bytes(header) + bytes(payload))
            self.bytes_sent += size
        if item is not None:
            self._pending.append(item)
        if acks:
            # ACK/NACK frames of one call get a stream of their own, right away: on the ordered
            # control stream one lost packet would hold back every later ACK for a PTO
            # (~1 s on GEO), and the sender's window with them.
            sid = self._quic.get_next_available_stream_id(is_unidirectional=True)
            self._quic.send_stream_data(sid, bytes([ROLE_ACKS]) + b"".join(acks), end_stream=True)
            self.parking.track(sid)
        self._protocol.transmit_soon()
        if self.unacked_bytes > self._opts.send_buffer:
            self._writable.clear()
        while not self._writable.is_set():
            await self._writable.wait()
            self._check_writable()

    def feed(self) -> bool:
        """Hand queued message streams to aioquic while less than ``FEED_BYTES`` are unsent
        there, in at most ``FEED_STREAMS`` streams (see their comment).  Returns True if
        something new was handed over."""
        if not self._pending:
            return False
        streams = self._quic._streams
        active = []
        unsent = 0
        for sid in self._active:
            st = streams.get(sid)
            if st is not None and _has_unsent(st.sender):
                active.append(sid)
                unsent += sum(r.stop - r.start for r in st.sender._pending)
        fed = False
        while self._pending and unsent < FEED_BYTES and len(active) < FEED_STREAMS:
            item = self._pending.popleft()
            sid = self._quic.get_next_available_stream_id(is_unidirectional=True)
            self._quic.send_stream_data(sid, bytes([ROLE_MESSAGE]))
            self.parking.track(sid)
            last = len(item.chunks) - 1
            for i, chunk in enumerate(item.chunks):
                self._quic.send_stream_data(sid, chunk, end_stream=i == last)
            self._unacked[sid] = item.size
            unsent += 1 + item.size
            active.append(sid)
            fed = True
        self._active = active
        return fed

    def _check_writable(self) -> None:
        if self._error is not None:
            raise WriteError(f"connection to {self._peer} failed: {self._error}")
        if self._closed or self._quic._state not in (QuicConnectionState.FIRSTFLIGHT, QuicConnectionState.CONNECTED):
            raise WriteError(f"connection to {self._peer} is closed")

    def _stream_acknowledged(self, stream_id: int) -> None:
        """The peer has acknowledged all of a stream of ours (called from aioquic's ACK handling)."""
        size = self._unacked.pop(stream_id, None)
        if size is None:
            return  # an ACK stream
        self.unacked_bytes -= size
        if self.unacked_bytes <= self._opts.send_buffer // 2:
            self._writable.set()

    # --- receiving -------------------------------------------------------------------------------

    @property
    def recv_backlog(self) -> int:
        return self._frames_bytes

    def on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        s = self.in_streams.get(stream_id)
        if s is None:
            s = self.in_streams[stream_id] = _InStream()
        view = memoryview(data)
        if not s.role and view:
            s.role = view[0]
            view = view[1:]
            if s.role not in (ROLE_CONTROL, ROLE_MESSAGE, ROLE_ACKS):
                raise FrameError(f"stream {stream_id} from {self._peer} has unknown role {s.role}")
            if not self._hello_done and s.role != ROLE_CONTROL:
                raise FrameError(f"stream {stream_id} from {self._peer} opened before the hello finished")
            s.decoder = FrameDecoder(self._opts.max_payload, self._stream_buffer_for(s), accept=None if self._hello_done else HELLO_FRAMES)
            if s.role == ROLE_ACKS and self._opts.ordered:
                self._deliver_ordered(stream_id, [])  # not a message: ordered delivery skips it
        if view:
            assert s.decoder is not None
            self.bytes_received += len(view)
            s.decoder.feed(view)
            for f in s.decoder.frames():
                if s.role == ROLE_CONTROL and f.header.type is FrameType.MSG:
                    raise FrameError(f"MSG frame on the control stream from {self._peer}")
                if s.role == ROLE_MESSAGE and f.header.type is not FrameType.MSG:
                    raise FrameError(f"{f.header.type.name} frame on a message stream from {self._peer}")
                if s.role == ROLE_ACKS and f.header.type not in UNORDERED_CONTROL:
                    raise FrameError(f"{f.header.type.name} frame on an ACK stream from {self._peer}")
                s.frames.append(f)
        if s.role in (ROLE_CONTROL, ROLE_ACKS) and s.frames:
            self._deliver(s.frames)
            s.frames = []
        if end_stream:
            s.finished = True
            del self.in_streams[stream_id]
            self._release(s)  # its frames are handed on (and counted against recv_buffer) now
            if s.decoder is None or not s.decoder.at_boundary():
                raise FrameError(f"stream {stream_id} from {self._peer} ended in the middle of a frame")
            if s.role == ROLE_MESSAGE:
                if not s.frames:
                    raise FrameError(f"message stream {stream_id} from {self._peer} carried no message")
                self.msgs_received += len(s.frames)
                if self._opts.ordered:
                    self._deliver_ordered(stream_id, s.frames)
                else:
                    self._deliver(s.frames)

    def _deliver_ordered(self, stream_id: int, frames: list[Frame]) -> None:
        if self._next_ordered is None:
            # The peer's first stream is its control stream; messages follow, 4 IDs apart.
            self._next_ordered = (stream_id & 3) + 4
        self._held[stream_id] = frames
        while self._next_ordered in self._held:
            self._deliver(self._held.pop(self._next_ordered))
            self._next_ordered += 4

    def _deliver(self, frames: list[Frame]) -> None:
        for f in frames:
            self._frames.append(f)
            self._frames_bytes += f.header.size + f.header.payload_len
        self._readable.set()

    async def recv(self) -> list[Frame]:
        while not self._frames:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise ReadError(f"connection to {self._peer} closed locally")
            self._readable.clear()
            await self._readable.wait()
        out = list(self._frames)
        self._frames.clear()
        self._frames_bytes = 0
        return out

    # --- closing -----------------------------------------------------------------------------------

    def fail(self, error: Lu2kError) -> None:
        """The connection ended (peer close, idle timeout, protocol error)."""
        if self._error is None:
            self._error = error
        self._readable.set()
        self._writable.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._readable.set()
            self._writable.set()
            self._protocol.close_connection(APP_NO_ERROR, "closed by lu2k")

    async def wait_closed(self) -> None:
        await self._protocol.wait_closed()

    def stats(self) -> dict[str, Any]:
        loss = self._quic._loss
        out: dict[str, Any] = {
            "msgs_sent": self.msgs_sent, "msgs_received": self.msgs_received,
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "unacked_bytes": self.unacked_bytes, "datagrams_dropped": self.datagrams_dropped,
            "srtt_ms": round(loss._rtt_smoothed * 1e3, 2), "min_rtt_ms": None if loss._rtt_min == float("inf") else round(loss._rtt_min * 1e3, 2),
            "cwnd": loss.congestion_window, "bytes_in_flight": loss.bytes_in_flight,
            "streams_opened": self._quic._local_next_stream_id_uni // 4, "streams_in_aioquic": len(self._quic._streams),
            "streams_parked": len(self.parking.parked), "streams_unparked": self.parking.unparked,
            **self._protocol.pathwatch.figures(),
        }
        controller = getattr(loss._cc, "controller", None)
        if controller is not None:
            out["congestion"] = controller.state()
        return out


class StreamOptions:
    """Data-path tunables, resolved once per backend."""

    def __init__(self, *, max_payload: int, send_buffer: int, recv_buffer: int, keepalive: float, ordered: bool,
                 stream_batch: int = 64 << 10, dead_timeout: float = 0.0) -> None:
        self.max_payload = max_payload
        self.dead_timeout = dead_timeout
        self.stream_batch = stream_batch
        self.send_buffer = send_buffer
        self.recv_buffer = recv_buffer
        self.keepalive = keepalive
        self.ordered = ordered


ErrorTranslator = Callable[[events.ConnectionTerminated, bool], Lu2kError]


class Lu2kQuicProtocol(QuicConnectionProtocol):
    """aioquic's asyncio pump, with lu2k's stream layout, bounds and error translation."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        stream_options: StreamOptions,
        translate: ErrorTranslator,
        on_connected: Callable[["Lu2kQuicProtocol"], None] | None = None,
        on_closed: Callable[["Lu2kQuicProtocol"], None] | None = None,
    ) -> None:
        super().__init__(quic)
        self.stream_options = stream_options
        self._translate = translate
        self._on_connected = on_connected
        self._on_closed = on_closed  # once, when the connection has ended (the backend forgets it)
        self.transport_obj: QuicTransport | None = None
        self.handshake_done = False
        self.handshake_waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A 0-RTT connect does not await this; a failure then surfaces through recv().
        self.handshake_waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.peer = "?"
        self._keepalive: asyncio.TimerHandle | None = None
        self._pathwatch_timer: asyncio.TimerHandle | None = None
        dead = stream_options.dead_timeout
        self.pathwatch = PathWatch(limit=dead / 2 if dead > 0 else PATHWATCH_LIMIT)
        self._liveness: asyncio.TimerHandle | None = None
        self._last_send = self._last_receive = self._loop.time()

    # --- pump ------------------------------------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        t = self.transport_obj
        if t is not None and t.recv_backlog > self.stream_options.recv_buffer:
            t.datagrams_dropped += 1
            return
        self._last_receive = now = self._loop.time()
        if self.peer == "?" and isinstance(addr, tuple):
            self.peer = format_hostport(str(addr[0]), int(addr[1]))
        super().datagram_received(data, addr)
        self._check_local_close()
        if self.handshake_done:
            self._watch_path(now, len(data))

    # --- a path that went silent and came back (see quic_pathwatch) ----------------------------

    def _rtt(self) -> float:
        loss = self._quic._loss
        return float(loss._rtt_smoothed) if loss._rtt_initialized else float(loss._rtt_initial)

    def _watch_path(self, now: float, size: int) -> None:
        watch = self.pathwatch
        watch.on_datagram(now, size)
        if self._quic._loss._pto_count and watch.probe_due(now, self._rtt(), backed_off=True):
            # The peer's packets get through again while our probes wait out a backed-off
            # timeout: probe now.
            self._quic._send_probe()
            self.transmit()
        if self._pathwatch_timer is None and size >= DATA_DATAGRAM:
            self._arm_pathwatch(now)

    def _arm_pathwatch(self, now: float) -> None:
        at = self.pathwatch.next_check(now, self._rtt())
        if at is not None:
            self._pathwatch_timer = self._loop.call_at(at, self._pathwatch_tick)

    def _pathwatch_tick(self) -> None:
        self._pathwatch_timer = None
        if self._quic._state is not QuicConnectionState.CONNECTED:
            return
        now = self._loop.time()
        if self.pathwatch.ping_due(now, self._rtt()):
            self._quic.send_ping(0)
            self.transmit()
        self._arm_pathwatch(now)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: fatal while connecting, noise afterwards
        # (QUIC's own timers decide when a path is dead).
        if not self.handshake_done and not self.handshake_waiter.done():
            self.handshake_waiter.set_exception(ConnectError(f"cannot reach {self.peer}: {exc}"))

    def transmit(self) -> None:
        udp = self._transport
        if udp is None or udp.is_closing():
            # The UDP socket is gone (listener closed, backend shut down): nothing can be
            # sent or received any more, so this connection is over.
            self._socket_gone()
            return
        defer = getattr(udp, "defer_transmit", None)
        if defer is not None and defer(self):
            return  # the batched endpoint calls us once its batch of datagrams is in
        holding = getattr(udp, "holding", None)
        with holding() if holding is not None else contextlib.nullcontext():  # one GSO send for the pass
            super().transmit()
            t = self.transport_obj
            while t is not None and t.feed():
                super().transmit()
            if t is not None:
                t.parking.park()
        self._last_send = self._loop.time()

    def transmit_soon(self) -> None:
        self._transmit_soon()

    def _handle_timer(self) -> None:
        super()._handle_timer()
        self._check_local_close()

    def _check_local_close(self) -> None:
        # aioquic reports a close it initiated (e.g. a TLS alert we raised) only after the
        # closing period (3 PTOs -- seconds on GEO); a connect should fail at once.
        ev = self._quic._close_event
        if ev is not None and not self.handshake_done and not self.handshake_waiter.done():
            self.handshake_waiter.set_exception(self._translate(ev, True))

    def quic_event_received(self, event: events.QuicEvent) -> None:
        try:
            self._on_event(event)
        except FrameError as e:
            if self.transport_obj is not None:
                self.transport_obj.fail(e)
            self.close_connection(APP_PROTOCOL_ERROR, str(e)[:200])

    def _on_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            # Before the handshake completes only 0-RTT data can arrive; it is held in the
            # transport, which the engine gets (and reads) only once the handshake is done.
            self.early_transport().on_stream_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, events.HandshakeCompleted):
            if event.alpn_protocol != "lu2k":
                err = self._translate(events.ConnectionTerminated(0x178, None, f"peer negotiated ALPN {event.alpn_protocol!r}"), True)
                self._fail_handshake(err)
                self.close_connection(APP_PROTOCOL_ERROR, "ALPN must be lu2k")
                return
            self.handshake_done = True
            self.transport_obj = self.transport_obj or QuicTransport(self, self.peer)
            self.transport_obj.open_control_stream()
            self._arm_keepalive()
            if self._on_connected is not None:
                self._on_connected(self)
            if not self.handshake_waiter.done():
                self.handshake_waiter.set_result(None)
        elif isinstance(event, events.StreamReset):
            raise FrameError(f"{self.peer} reset stream {event.stream_id} (error {event.error_code})")
        elif isinstance(event, events.ConnectionTerminated):
            err = self._translate(event, not self.handshake_done)
            self._fail_handshake(err)
            if self.transport_obj is not None:
                self.transport_obj.fail(err)
            for timer in (self._keepalive, self._liveness, self._pathwatch_timer):
                if timer is not None:
                    timer.cancel()
            self._ended()

    def _fail_handshake(self, err: Lu2kError) -> None:
        if not self.handshake_waiter.done():
            self.handshake_waiter.set_exception(err)

    # --- early data ----------------------------------------------------------------------------

    def early_transport(self) -> QuicTransport:
        """A transport usable before the handshake finishes (0-RTT with a session ticket)."""
        if self.transport_obj is None:
            self.transport_obj = QuicTransport(self, self.peer)
            self.transport_obj.open_control_stream()
        return self.transport_obj

    # --- keepalive and close -----------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        interval = self.stream_options.keepalive
        if interval > 0:
            self._keepalive = self._loop.call_later(interval, self._keepalive_tick)
        if self._liveness is None and self.stream_options.dead_timeout > 0:
            self._liveness = self._loop.call_later(self.stream_options.dead_timeout / 4, self._liveness_tick)

    def _liveness_tick(self) -> None:
        # QUIC has no RST: a peer that restarted (or vanished) just stops answering, and the
        # idle timeout alone would take a minute to notice.  Data outstanding and nothing
        # heard for dead_timeout means the peer is gone; the engine then reconnects.
        self._liveness = None
        if self._quic._state is not QuicConnectionState.CONNECTED:
            return
        silent = self._loop.time() - self._last_receive
        limit = self.stream_options.dead_timeout
        if silent > limit and self._quic._loss.bytes_in_flight > 0:
            err = ReadError(f"{self.peer} stopped answering ({silent:.1f} s without a packet while data was outstanding)")
            if self.transport_obj is not None:
                self.transport_obj.fail(err)
            self.close_connection(APP_NO_ERROR, "peer timed out")
            return
        self._liveness = self._loop.call_later(limit / 4, self._liveness_tick)

    def _keepalive_tick(self) -> None:
        if self._quic._state is not QuicConnectionState.CONNECTED:
            return
        if self._loop.time() - self._last_send >= self.stream_options.keepalive * 0.9:
            self._quic.send_ping(0)
            self.transmit()
        self._arm_keepalive()

    def close_connection(self, code: int, reason: str) -> None:
        for timer in (self._keepalive, self._liveness, self._pathwatch_timer):
            if timer is not None:
                timer.cancel()
        if self._quic._state not in (QuicConnectionState.CLOSING, QuicConnectionState.DRAINING, QuicConnectionState.TERMINATED):
            self._quic.close(error_code=code, reason_phrase=reason)
            self.transmit()

    def abandon(self, reason: str) -> None:
        """End the connection at once, sending nothing: for one whose handshake never
        finished (nobody is owed a goodbye, and a closing period would keep it for 3 PTOs)."""
        quic = self._quic
        if quic._state is QuicConnectionState.TERMINATED:
            return
        if quic._close_event is None:
            quic._close_event = events.ConnectionTerminated(
                error_code=QuicErrorCode.CONNECTION_REFUSED, frame_type=None, reason_phrase=reason)
        quic._close_end()
        if self._timer is not None:  # aioquic's timer would fire on a connection that asks for none
            self._timer.cancel()
            self._timer = self._timer_at = None
        self._process_events()  # ConnectionTerminated: aioquic's server forgets it, and so do we

    def _ended(self) -> None:
        if self._on_closed is not None:
            on_closed, self._on_closed = self._on_closed, None
            on_closed(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._socket_gone()

    def _socket_gone(self) -> None:
        for timer in (self._keepalive, self._liveness, self._timer, self._pathwatch_timer):
            if timer is not None:
                timer.cancel()
        self._keepalive = self._liveness = self._timer = self._pathwatch_timer = None
        err = ReadError(f"the UDP socket for {self.peer} was closed")
        self._fail_handshake(err)
        if self.transport_obj is not None:
            self.transport_obj.fail(err)
        self._closed.set()
        self._ended()

