"""RDS backend: lu2k frames over AF_RDS reliable datagrams (RDS over TCP), as lu2klnd shipped.

RDS gives reliable, ordered datagrams between a pair of (IP, port) sockets, one socket talking
to many peers, no connections and no notice when a peer goes away.  lu2k's Transport is a
connection carrying a stream of frames, so this module adds a thin session layer:

* **Sessions, TFTP-style.**  ``listen(host, port)`` binds one RDS socket.  ``connect`` binds a
  socket on the source address the routing table picks (port chosen by the kernel) and sends
  CONNECT to the listener; the listener binds a *fresh* socket per session and answers ACCEPT
  from it, so each Transport owns one socket with exactly one peer.  Datagrams from any other
  address are counted and dropped.  A CONNECT to a port nobody has bound is dropped silently by
  RDS, so an unanswered CONNECT ends in ``ConnectTimeout``.
* **Envelope.**  Every datagram starts with a 16-byte envelope (layout below).  DATA datagrams
  carry a slice of the frame byte stream; RDS keeps them in order, and the per-direction
  datagram sequence number turns any gap or reordering into a ``FrameError``.
* **Fragmentation.**  An RDS message may not exceed ``RDS_MAX_MSG_SIZE`` (1 MiB), nor the
  socket's RDS send buffer (half of SO_SNDBUF).  Frames (up to ``max_message_size``, 4 MiB by
  default) are therefore cut into datagrams of at most ``tx_datagram_size`` bytes, and small
  frames share a datagram.  Reassembly is the stream :class:`~lu2k.wire.FrameDecoder`; when a
  large payload is being received, ``recvmsg_into`` scatters the datagram straight into the
  buffer the engine supplied (envelope / payload / overflow iovecs), so shared memory is written
  once.  Each side announces in CONNECT/ACCEPT the largest datagram it will receive.
* **Backpressure.**  ``EAGAIN`` (our RDS send buffer is full) waits for POLLOUT; ``ENOBUFS``
  (the receiving *port* is congested, RDS's per-port congestion map) is retried with a short
  back-off, because poll reports POLLOUT on such a socket at once and would spin.
* **Close.**  RDS drops a socket's unsent messages on close, so ``close()`` sends CLOSE and
  keeps the socket open until the kernel's send queue for this session is empty
  (``RDS_INFO_SEND_MESSAGES``), bounded by ``linger``.  The peer sees ``ConnectionClosed``
  after every frame sent before the CLOSE.
* **Peer loss.**  A crashed peer sends nothing, so an idle ``recv()`` sends PROBE every
  ``keepalive`` seconds and gives up with ``ReadError`` after ``peer_timeout`` seconds without
  any datagram from the peer.  ``send()`` also reads pending control datagrams when no
  ``recv()`` is running, so a CLOSE from the peer fails further sends.

Everything from the envelope codec to the datagram planner is pure and tested on the host
(tests/test_rds_proto.py); the socket parts run only where the kernel has AF_RDS, i.e. in the
kernel-test guest (tests/guest/test_rds_guest.py).

Envelope (little-endian)::

    u32 magic     'LRDS'
    u8  version   1
    u8  kind      Kind
    u16 flags     CONNECT: the connection type asked for
    u32 session   random id the connector chose (0 is never used)
    u32 value     DATA: datagram sequence number (per direction, from 0, wraps);
                  CONNECT/ACCEPT: largest datagram the sender will receive;
                  PROBE/PROBE_ACK: probe token

Backend options (``options`` of the net): ``datagram_size`` (largest datagram we receive,
default 512 KiB, at most 1 MiB), ``socket_buffer`` (SO_SNDBUF/SO_RCVBUF, default 8 MiB or
twice the link's BDP), ``keepalive`` (s, default 10), ``peer_timeout`` (s, default 60),
``linger`` (s, default 30), ``local_address`` (source IP for connect, default: the route's),
``netns`` (name under /run/netns or a path: create this net's sockets in that namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import errno
import ipaddress
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import (
    BackendUnavailable,
    ConfigError,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    FrameError,
    LocalProtocolError,
    ReadError,
    WriteError,
)
from ..crypto import FrameCodec, SealedDecoder
from ..inet import family_of, format_hostport
from ..wire import BufferFor, ConnType, Frame, FrameDecoder, HelloResult
from .base import (
    AcceptCallback, Backend, BackendSettings, ExceptionMap, Listener, OutFrame, Transport, map_exceptions, option_int, option_seconds,
)
from .netpath import sockaddr

# Where rds's socket errors become lu2k's (the send path decides EAGAIN/ENOBUFS congestion by errno).
CONNECT_ERRORS: ExceptionMap = {OSError: ConnectError}
READ_ERRORS: ExceptionMap = {OSError: ReadError}

RDS_MAX_MSG_SIZE = 1 << 20  # include/net/rds... RDS_MAX_MSG_SIZE: the kernel refuses larger sends
SOL_RDS = 276
RDS_INFO_SEND_MESSAGES = 10003  # messages not yet handed to the transport (TCP)
RDS_INFO_RETRANS_MESSAGES = 10004  # handed to TCP but not yet acknowledged by the peer
CLONE_NEWNET = 0x40000000

ENVELOPE = struct.Struct("<IBBHII")
ENVELOPE_SIZE = ENVELOPE.size  # 16
ENVELOPE_MAGIC = 0x5344524C  # b"LRDS" read as little-endian u32
ENVELOPE_VERSION = 1
MIN_DATAGRAM = 4096  # below this the envelope overhead is silly and ACK batches would not fit

DEFAULT_DATAGRAM = 512 << 10
DEFAULT_SOCKET_BUFFER = 8 << 20
DIRECT_RECV_MIN = 16 << 10  # a payload remainder at least this big is received in place
BACKLOG_MAX = 64  # datagrams send() may set aside for recv() (bounded: then it stops reading)


class Kind(enum.IntEnum):
    CONNECT = 1
    ACCEPT = 2
    DATA = 3
    CLOSE = 4
    PROBE = 5
    PROBE_ACK = 6


# --- pure: envelope, datagram planning, kernel info parsing --------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    kind: Kind
    flags: int
    session: int
    value: int


def encode_envelope(kind: Kind, session: int, value: int = 0, flags: int = 0) -> bytes:
    if not 0 < session <= 0xFFFFFFFF:
        raise LocalProtocolError(f"RDS session id {session} outside 1..2^32-1")
    return ENVELOPE.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, kind, flags, session, value & 0xFFFFFFFF)


def decode_envelope(data: bytes | bytearray | memoryview) -> Envelope:
    """The envelope at the start of a datagram; ``FrameError`` for anything not ours."""
    if len(data) < ENVELOPE_SIZE:
        raise FrameError(f"RDS datagram of {len(data)} bytes is shorter than the {ENVELOPE_SIZE}-byte envelope")
    magic, version, kind, flags, session, value = ENVELOPE.unpack_from(data)
    if magic != ENVELOPE_MAGIC:
        raise FrameError(f"RDS datagram with bad magic 0x{magic:08x} (not lu2k)")
    if version != ENVELOPE_VERSION:
        raise FrameError(f"RDS envelope version {version}, this side speaks {ENVELOPE_VERSION}")
    try:
        k = Kind(kind)
    except ValueError:
        raise FrameError(f"RDS datagram of unknown kind {kind}") from None
    if session == 0:
        raise FrameError("RDS datagram with session id 0")
    return Envelope(k, flags, session, value)


def plan_datagrams(views: Sequence[memoryview], max_data: int) -> list[list[memoryview]]:
    """Cut a byte stream (a list of views) into datagram bodies of at most ``max_data`` bytes.

    No byte is copied: each datagram body is a list of sub-views, ready for ``sendmsg``.  Small
    views share a datagram; a large one is spread over several.
    """
    if max_data <= 0:
        raise LocalProtocolError(f"datagram body size must be positive, not {max_data}")
    out: list[list[memoryview]] = []
    cur: list[memoryview] = []
    room = max_data
    for v in views:
        v = v.cast("B") if v.format != "B" or v.ndim != 1 else v
        while len(v):
            take = min(room, len(v))
            cur.append(v[:take])
            v = v[take:]
            room -= take
            if room == 0:
                out.append(cur)
                cur, room = [], max_data
    if cur:
        out.append(cur)
    return out


def rds_send_limit(sndbuf_reported: int) -> int:
    """Largest RDS message a socket accepts, from SO_SNDBUF as getsockopt reports it.

    The kernel doubles what was set and RDS allows messages up to half of that
    (``rds_sk_sndbuf``), and never more than ``RDS_MAX_MSG_SIZE``.
    """
    return max(0, min(RDS_MAX_MSG_SIZE, sndbuf_reported // 2))


def tx_datagram_size(peer_rx_limit: int, send_limit: int) -> int:
    """Datagram size we send with: what the peer receives, what our socket takes, RDS's cap."""
    size = min(peer_rx_limit, send_limit, RDS_MAX_MSG_SIZE)
    if size < MIN_DATAGRAM:
        raise ConnectError(
            f"RDS datagram size would be {size} bytes (peer receives {peer_rx_limit}, our send buffer "
            f"allows {send_limit}); raise datagram_size/socket_buffer (at least {MIN_DATAGRAM})"
        )
    return size


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """One entry of RDS_INFO_SEND_MESSAGES (``struct rds_info_message``)."""

    seq: int
    length: int
    laddr: str
    faddr: str
    lport: int
    fport: int


_INFO_MESSAGE = struct.Struct("<QI4s4s2s2sB")  # seq, len, laddr, faddr, lport(be), fport(be), flags


def parse_info_messages(data: bytes, each: int) -> list[QueuedMessage]:
    """Decode the array RDS_INFO_*_MESSAGES returns (``each`` bytes an entry, >= 25)."""
    if each < _INFO_MESSAGE.size:
        raise LocalProtocolError(f"rds_info_message entries of {each} bytes, need at least {_INFO_MESSAGE.size}")
    out = []
    for off in range(0, len(data) - each + 1, each):
        seq, length, la, fa, lp, fp, _flags = _INFO_MESSAGE.unpack_from(data, off)
        out.append(QueuedMessage(seq, length, socket.inet_ntoa(la), socket.inet_ntoa(fa),
                                 int.from_bytes(lp, "big"), int.from_bytes(fp, "big")))
    return out


def queued_between(messages: Sequence[QueuedMessage], local: tuple[str, int], remote: tuple[str, int]) -> int:
    """How many queued messages belong to the session ``local`` -> ``remote``.

    Ports must match; addresses only where the kernel filled them in (6.1 reports 0.0.0.0
    for messages on RDS-over-TCP paths).
    """

    def same(reported: str, ours: str) -> bool:
        return reported in (ours, "0.0.0.0")

    return sum(1 for m in messages if m.lport == local[1] and m.fport == remote[1]
               and same(m.laddr, local[0]) and same(m.faddr, remote[0]))


# --- kernel glue ------------------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _netns_path(value: str) -> str:
    return value if "/" in value else f"/run/netns/{value}"


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with this thread in network namespace ``netns`` (sockets stay there)."""
    if not netns:
        yield
        return
    path = _netns_path(netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"cannot open network namespace {path}: {e.strerror}", where="netns") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _c().setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise ConfigError(f"cannot enter network namespace {path}: {os.strerror(err)}", where="netns")
        try:
            yield
        finally:
            if _c().setns(home, CLONE_NEWNET) != 0:  # pragma: no cover - would leave the thread astray
                raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")
    finally:
        os.close(target)
        os.close(home)


def _resolver(fut: "asyncio.Future[None]") -> Any:
    """A reader/writer callback that completes ``fut`` once (later calls are no-ops)."""

    def resolve() -> None:
        if not fut.done():
            fut.set_result(None)

    return resolve


def rds_socket(family: int = socket.AF_INET) -> socket.socket:
    """An AF_RDS socket whose addresses are ``family``'s.

    RDS over IPv6 (Linux >= 4.19) takes ``sockaddr_in6`` in bind/sendmsg and gives it back from
    recvmsg/getsockname.  Python's socket module turns address tuples into ``sockaddr_in``
    for AF_RDS whatever their form, so for IPv6 the RDS descriptor is wrapped in a socket
    object *of family AF_INET6*: Python then builds ``sockaddr_in6`` (scope id included) for
    the very same kernel socket, and reads the kernel's addresses by their own family."""
    sock = socket.socket(socket.AF_RDS, socket.SOCK_SEQPACKET, 0)
    if family != socket.AF_INET6:
        return sock
    return socket.socket(socket.AF_INET6, socket.SOCK_SEQPACKET, 0, fileno=sock.detach())


def rds_unavailable_reason() -> str | None:
    """None if this kernel gives AF_RDS sockets, else why not."""
    try:
        s = socket.socket(socket.AF_RDS, socket.SOCK_SEQPACKET, 0)
    except (OSError, AttributeError) as e:
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
        return f"this kernel gives no AF_RDS sockets ({reason}); load the RDS-over-TCP transport: modprobe rds_tcp"
    s.close()
    return None


def rds_info_messages(sock: socket.socket, which: int) -> list[QueuedMessage]:
    """One of the kernel's RDS message lists (all sockets), via getsockopt(SOL_RDS, which).

    Called through libc because the entry size comes back as getsockopt's return value,
    which Python's ``socket.getsockopt`` discards.
    """
    size = 1 << 14
    while True:
        buf = ctypes.create_string_buffer(size)
        optlen = ctypes.c_uint32(size)
        each = _c().getsockopt(sock.fileno(), SOL_RDS, which, buf, ctypes.byref(optlen))
        if each < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSPC and optlen.value > size and optlen.value <= 64 << 20:
                size = optlen.value + (1 << 12)  # the queue grew; the kernel said how much it needs
                continue
            raise OSError(err, os.strerror(err))
        if each == 0:  # nothing queued anywhere: the kernel does not report an entry size then
            return []
        return parse_info_messages(buf.raw[: optlen.value], each)


def source_address_for(host: str, port: int) -> str:
    """The local IP the routing table would use to reach ``host`` (no packet is sent)."""
    probe = socket.socket(family_of(host), socket.SOCK_DGRAM)
    try:
        probe.connect((host, port or 9))
        return str(probe.getsockname()[0])
    finally:
        probe.close()


# --- transport ----------------------------------------------------------------------------------------


class RdsTransport(Transport):
    """One session: an RDS socket of its own, one peer address, frames as a datagram stream."""

    backend_name = "rds"

    def __init__(self, backend: "RdsBackend", sock: socket.socket, peer: tuple[str, int], session: int,
                 tx_size: int) -> None:
        self._backend = backend
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._peer = peer
        self._local: tuple[str, int] = sock.getsockname()[:2]
        self._session = session
        self._tx_size = tx_size
        self._tx_body = tx_size - ENVELOPE_SIZE
        self._rx_size = backend.datagram_size
        self._codec = FrameCodec(backend.settings.max_message_size, f"rds:{format_hostport(*peer)}")
        self._env = bytearray(ENVELOPE_SIZE)
        self._scratch = bytearray(self._rx_size)
        self._tx_seq = 0
        self._rx_seq = 0
        self._send_lock = asyncio.Lock()
        self._backlog: deque[bytes] = deque()
        self._rx_waiter: asyncio.Future[None] | None = None
        self._tx_waiter: asyncio.Future[None] | None = None
        self._receiving = False
        self._closing = False
        self._peer_closed = False
        self._close_task: asyncio.Task[None] | None = None
        self._last_rx = time.monotonic()
        self._last_probe = 0.0
        self._probe_token = 0
        self.drain_result = "open"
        backend.transports.add(self)
        self.counters: dict[str, int] = {
            "bytes_sent": 0, "bytes_received": 0, "datagrams_sent": 0, "datagrams_received": 0,
            "stray_datagrams": 0, "congestion_waits": 0, "probes_sent": 0, "drain_timeouts": 0,
        }

    # -- Transport API --

    @property
    def peer_address(self) -> str:
        return f"rds:{format_hostport(*self._peer)}"

    def set_buffer_for(self, buffer_for: BufferFor | None) -> None:
        self._codec.set_buffer_for(buffer_for)

    def on_hello_done(self, result: HelloResult) -> None:
        self._codec.hello_done(result)

    @property
    def _decoder(self) -> FrameDecoder | SealedDecoder:
        return self._codec.decoder  # the hello decoder, then the sealed one

    async def send(self, frames: Sequence[OutFrame]) -> None:
        async with self._send_lock:  # sealing assigns nonces: it must happen in wire order
            views: list[memoryview] = []
            for header, payload in self._codec.outgoing(frames):
                views.append(memoryview(header))
                if len(payload):
                    views.append(memoryview(payload))
            for body in plan_datagrams(views, self._tx_body):
                await self._send_datagram(Kind.DATA, body, value=self._tx_seq, fail_if_closing=True)
                self._tx_seq = (self._tx_seq + 1) & 0xFFFFFFFF

    async def recv(self) -> list[Frame]:
        if self._receiving:
            raise LocalProtocolError("recv() called while another recv() is running on this transport")
        self._receiving = True
        try:
            return await self._recv()
        finally:
            self._receiving = False

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake(ReadError(f"connection to {self.peer_address} closed locally"), WriteError(f"connection to {self.peer_address} closed"))
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop any more: nothing can drain, just let go of the socket
            self._release()
            return
        self._close_task = asyncio.ensure_future(self._close_gracefully())

    async def wait_closed(self) -> None:
        if self._close_task is not None:
            await asyncio.shield(self._close_task)

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "datagram_size": self._tx_size, "local": format_hostport(*self._local),
                "close": self.drain_result}

    # -- sending --

    async def _send_datagram(self, kind: Kind, body: Sequence[memoryview | bytes] = (), value: int = 0,
                             flags: int = 0, fail_if_closing: bool = False) -> None:
        bufs = [encode_envelope(kind, self._session, value, flags), *body]
        backoff = 0.001
        while True:
            if fail_if_closing:
                if not self._closing:
                    self._pump_control()
                if self._closing:
                    raise WriteError(f"connection to {self.peer_address} closed")
                if self._peer_closed:
                    raise WriteError(f"{self.peer_address} closed the connection")
            try:
                n = self._sock.sendmsg(bufs, [], 0, self._peer)
            except (BlockingIOError, InterruptedError):
                await self._wait_writable()
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    # The peer's port is congested (its receive queue is over its rcvbuf);
                    # poll would report POLLOUT at once, so back off instead of spinning.
                    self.counters["congestion_waits"] += 1
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 0.05)
                    continue
                if e.errno == errno.EMSGSIZE:
                    raise WriteError(f"RDS refused a {sum(len(b) for b in bufs)}-byte datagram to {self.peer_address} "
                                     f"(send buffer shrank?)") from None
                raise WriteError(f"send to {self.peer_address} failed: {e.strerror or e}") from None
            self.counters["datagrams_sent"] += 1
            self.counters["bytes_sent"] += n - ENVELOPE_SIZE
            return

    async def _wait_writable(self) -> None:
        fut = self._loop.create_future()
        self._tx_waiter = fut
        fd = self._sock.fileno()
        self._loop.add_writer(fd, _resolver(fut))
        try:
            await fut
        finally:
            self._tx_waiter = None
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(fd)

    def _pump_control(self) -> None:
        """Read what is waiting when no recv() runs, so a CLOSE or PROBE is seen by senders too."""
        if self._receiving or self._sock.fileno() < 0:
            return
        while len(self._backlog) < BACKLOG_MAX:
            try:
                data, addr = self._sock.recvfrom(self._rx_size + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # recv() will report it
            if tuple(addr[:2]) != self._peer:
                self.counters["stray_datagrams"] += 1
                continue
            try:
                env = decode_envelope(data)
            except FrameError:
                self._backlog.append(data)  # recv() raises it in order
                continue
            if env.session != self._session:
                self.counters["stray_datagrams"] += 1
                continue
            self._last_rx = time.monotonic()
            if env.kind is Kind.DATA:
                self._backlog.append(data)
            else:
                self._control(env)

    # -- receiving --

    async def _recv(self) -> list[Frame]:
        decoder = self._decoder
        while True:
            frames = decoder.frames()
            if frames:
                return frames
            if self._closing:
                raise ReadError(f"connection to {self.peer_address} closed locally")
            if self._peer_closed:
                if decoder.at_boundary():
                    raise ConnectionClosed(f"{self.peer_address} closed the connection")
                raise ReadError(f"{self.peer_address} closed the connection in the middle of a frame")
            if self._backlog:
                self._take(memoryview(self._backlog.popleft()))
                continue
            target = decoder.payload_target()
            direct = target if target is not None and len(target) >= DIRECT_RECV_MIN else None
            bufs: list[Any] = [self._env, direct, self._scratch] if direct is not None else [self._env, self._scratch]
            with map_exceptions(READ_ERRORS, f"receive from {self.peer_address} failed"):
                try:
                    n, _anc, flags, addr = self._sock.recvmsg_into(bufs)
                except (BlockingIOError, InterruptedError):
                    await self._wait_readable()
                    continue
            if flags & socket.MSG_TRUNC:
                raise FrameError(f"RDS datagram from {format_hostport(addr[0], addr[1])} larger than the {self._rx_size} bytes announced")
            if tuple(addr[:2]) != self._peer:
                self.counters["stray_datagrams"] += 1
                continue
            if n < ENVELOPE_SIZE:
                raise FrameError(f"RDS datagram of {n} bytes from {self.peer_address}")
            self._take_scattered(n, direct)

    def _take_scattered(self, n: int, direct: memoryview | None) -> None:
        env = decode_envelope(self._env)
        body = n - ENVELOPE_SIZE
        if env.session != self._session:
            self.counters["stray_datagrams"] += 1
            return
        self._last_rx = time.monotonic()
        if env.kind is not Kind.DATA:
            self._control(env)
            return
        self._check_seq(env)
        self.counters["datagrams_received"] += 1
        self.counters["bytes_received"] += body
        if direct is not None:
            k = min(body, len(direct))
            self._decoder.payload_filled(k)  # already in place: no copy
            if body > k:
                self._decoder.feed(memoryview(self._scratch)[: body - k])
        else:
            self._decoder.feed(memoryview(self._scratch)[:body])

    def _take(self, data: memoryview) -> None:
        """One datagram that send() set aside (already copied once, so fed from memory)."""
        env = decode_envelope(data)
        if env.session != self._session:
            self.counters["stray_datagrams"] += 1
            return
        if env.kind is not Kind.DATA:
            self._control(env)
            return
        self._check_seq(env)
        self.counters["datagrams_received"] += 1
        self.counters["bytes_received"] += len(data) - ENVELOPE_SIZE
        self._decoder.feed(data[ENVELOPE_SIZE:])

    def _check_seq(self, env: Envelope) -> None:
        if env.value != self._rx_seq:
            raise FrameError(f"RDS datagram {env.value} from {self.peer_address} where {self._rx_seq} was due "
                             f"(RDS lost or reordered a datagram)")
        self._rx_seq = (self._rx_seq + 1) & 0xFFFFFFFF

    def _control(self, env: Envelope) -> None:
        if env.kind is Kind.CLOSE:
            self._peer_closed = True
            self._wake(None, WriteError(f"{self.peer_address} closed the connection"))
        elif env.kind is Kind.PROBE:
            self._send_control_nowait(Kind.PROBE_ACK, env.value)
        elif env.kind in (Kind.PROBE_ACK, Kind.ACCEPT):
            pass  # liveness already noted; a repeated ACCEPT is harmless
        else:
            raise FrameError(f"unexpected {env.kind.name} datagram on an established RDS session with {self.peer_address}")

    def _send_control_nowait(self, kind: Kind, value: int = 0) -> None:
        """Best-effort control datagram: if RDS has no room now, the peer will probe again."""
        try:
            self._sock.sendmsg([encode_envelope(kind, self._session, value)], [], 0, self._peer)
        except OSError:
            return
        if kind is Kind.PROBE:
            self.counters["probes_sent"] += 1

    async def _wait_readable(self) -> None:
        keepalive, peer_timeout = self._backend.keepalive, self._backend.peer_timeout
        fut = self._loop.create_future()
        self._rx_waiter = fut
        fd = self._sock.fileno()
        self._loop.add_reader(fd, _resolver(fut))
        try:
            while not fut.done():
                now = time.monotonic()
                silent = now - self._last_rx
                if silent >= peer_timeout:
                    raise ReadError(f"{self.peer_address} lost: nothing received for {silent:.1f} s (peer_timeout {peer_timeout:g} s)")
                if silent >= keepalive and now - self._last_probe >= keepalive:
                    self._probe_token += 1
                    self._last_probe = now
                    self._send_control_nowait(Kind.PROBE, self._probe_token)
                next_probe = (self._last_probe if silent >= keepalive else self._last_rx) + keepalive
                wait = min(next_probe, self._last_rx + peer_timeout) - now
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), max(wait, 0.01))
            fut.result()
        finally:
            self._rx_waiter = None
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(fd)

    # -- closing --

    def _wake(self, rx_error: Exception | None, tx_error: Exception | None) -> None:
        if rx_error is not None and self._rx_waiter is not None and not self._rx_waiter.done():
            self._rx_waiter.set_exception(rx_error)
        if tx_error is not None and self._tx_waiter is not None and not self._tx_waiter.done():
            self._tx_waiter.set_exception(tx_error)

    async def _close_gracefully(self) -> None:
        try:
            if not self._peer_closed:
                try:
                    await asyncio.wait_for(self._send_datagram(Kind.CLOSE), self._backend.linger)
                except (WriteError, asyncio.TimeoutError):
                    pass
            await self._drain(self._backend.linger)
        finally:
            self._release()

    def pending_messages(self) -> int:
        """Messages of this session the kernel still holds: unsent, or sent but unacknowledged."""
        return sum(
            queued_between(rds_info_messages(self._sock, which), self._local, self._peer)
            for which in (RDS_INFO_SEND_MESSAGES, RDS_INFO_RETRANS_MESSAGES)
        )

    async def _drain(self, linger: float) -> None:
        """Wait until the kernel holds no message of this session (RDS drops them on close)."""
        deadline = time.monotonic() + linger
        pause = 0.002
        while True:
            try:
                pending = self.pending_messages()
            except OSError as e:
                # No RDS info here: all we can do is give the queue a moment.
                self.drain_result = f"unknown ({e.strerror or e}); waited 0.2 s"
                await asyncio.sleep(max(0.0, min(0.2, deadline - time.monotonic())))
                return
            if pending == 0:
                self.drain_result = "drained"
                return
            if time.monotonic() >= deadline:
                self.counters["drain_timeouts"] += 1
                self.drain_result = f"{pending} message(s) still queued after linger {linger:g} s"
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    def abort(self) -> None:
        """Let go of the socket now, without CLOSE or drain (the backend is shutting down)."""
        self._closing = True
        self._wake(ReadError(f"connection to {self.peer_address} aborted"), WriteError(f"connection to {self.peer_address} aborted"))
        if self._close_task is not None and not self._close_task.done():
            self._close_task.cancel()
        self._release()

    def _release(self) -> None:
        self._backend.transports.discard(self)
        fd = self._sock.fileno()
        if fd >= 0:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(fd)
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(fd)
        self._sock.close()


# --- listener and backend -----------------------------------------------------------------------------


class RdsListener(Listener):
    def __init__(self, backend: "RdsBackend", sock: socket.socket, host: str, on_accept: AcceptCallback) -> None:
        self._backend = backend
        self._sock = sock
        self._host = host
        self._on_accept = on_accept
        self._loop = asyncio.get_running_loop()
        self._recent: deque[tuple[tuple[str, int], int]] = deque(maxlen=256)
        self._buf = bytearray(ENVELOPE_SIZE + 64)
        self._loop.add_reader(sock.fileno(), self._ready)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def _ready(self) -> None:
        while True:
            try:
                n, _anc, flags, addr = self._sock.recvmsg_into([self._buf])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            peer = (addr[0], addr[1])
            try:
                env = decode_envelope(memoryview(self._buf)[:n])
            except FrameError:
                continue  # not a lu2k CONNECT: nothing to answer
            if env.kind is not Kind.CONNECT or (peer, env.session) in self._recent:
                continue
            self._recent.append((peer, env.session))
            self._accept(peer, env)

    def _accept(self, peer: tuple[str, int], env: Envelope) -> None:
        backend = self._backend
        try:
            sock = backend.new_socket(self._sock.family)
        except BackendUnavailable:
            return  # the connector times out; an acceptor has nobody to report to
        try:
            sock.bind(sockaddr(self._host, 0))
            tx_size = tx_datagram_size(env.value, backend.send_limit(sock))
            sock.sendmsg([encode_envelope(Kind.ACCEPT, env.session, backend.datagram_size)], [], 0, peer)
        except (OSError, ConnectError):
            sock.close()
            return
        transport = RdsTransport(backend, sock, peer, env.session, tx_size)
        backend.spawn(self._on_accept(transport))

    def close(self) -> None:
        fd = self._sock.fileno()
        if fd >= 0:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(fd)
        self._sock.close()


class RdsBackend(Backend):
    name = "rds"
    typed_connections = False

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        where = f"net {settings.net} (rds)"
        opts = settings.options
        self.netns: str | None = opts.get("netns") or None
        with in_netns(self.netns):
            reason = rds_unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(f"backend 'rds' is unavailable: {reason}")
        self.datagram_size = option_int(opts, "datagram_size", DEFAULT_DATAGRAM, MIN_DATAGRAM, RDS_MAX_MSG_SIZE, where, what="a byte count")
        default_buf = max(DEFAULT_SOCKET_BUFFER, 2 * settings.profile.bdp_bytes(0))
        self.socket_buffer = option_int(opts, "socket_buffer", default_buf, 2 * MIN_DATAGRAM, 1 << 30, where, what="a byte count")
        self.keepalive = option_seconds(opts, "keepalive", 10.0, where)
        self.peer_timeout = option_seconds(opts, "peer_timeout", 60.0, where)
        if self.peer_timeout <= self.keepalive:
            raise ConfigError(f"peer_timeout ({self.peer_timeout:g} s) must exceed keepalive ({self.keepalive:g} s)", where=where)
        self.linger = option_seconds(opts, "linger", 30.0, where)
        self.local_address: str | None = opts.get("local_address") or None
        self._tasks: set[asyncio.Task[None]] = set()
        self.transports: set[RdsTransport] = set()

    @staticmethod
    def probe() -> str | None:
        return rds_unavailable_reason()

    def new_socket(self, family: int = socket.AF_INET) -> socket.socket:
        """An RDS socket for ``family``'s addresses (see :func:`rds_socket`)."""
        with in_netns(self.netns):
            try:
                sock = rds_socket(family)
            except OSError as e:
                raise BackendUnavailable(f"cannot create an RDS socket: {e.strerror or e} (modprobe rds_tcp)") from None
        for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # SO_SNDBUFFORCE/SO_RCVBUFFORCE
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, self.socket_buffer)
            except OSError:  # not CAP_NET_ADMIN: the kernel caps at [wr]mem_max
                sock.setsockopt(socket.SOL_SOCKET, opt, self.socket_buffer)
        sock.setblocking(False)
        return sock

    @staticmethod
    def send_limit(sock: socket.socket) -> int:
        return rds_send_limit(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _check_host(host: str) -> int:
        """The address family of ``host``, an IPv4 or IPv6 literal RDS can bind (not the
        any-address; no zone: link-local addresses are not NIDs)."""
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise ConnectError(f"RDS needs an IPv4 or IPv6 address, not {host!r}") from None
        if addr.is_unspecified:
            raise ConnectError(f"RDS sockets bind one local address; {host} is not one (give the NI's address)")
        return socket.AF_INET6 if addr.version == 6 else socket.AF_INET

    async def listen(self, host: str, port: int, on_accept: AcceptCallback) -> Listener:
        family = self._check_host(host)
        sock = self.new_socket(family)
        try:
            with map_exceptions(CONNECT_ERRORS, f"cannot listen on rds {format_hostport(host, port)}"):
                sock.bind(sockaddr(host, port))
        except BaseException:
            sock.close()
            raise
        return RdsListener(self, sock, host, on_accept)

    async def connect(self, host: str, port: int, conn_type: ConnType, timeout: float) -> Transport:
        family = self._check_host(host)
        with map_exceptions(CONNECT_ERRORS, f"no route to rds {format_hostport(host, port)}"):
            with in_netns(self.netns):
                local = self.local_address or source_address_for(host, port)
        sock = self.new_socket(family)
        session = int.from_bytes(os.urandom(4), "little") or 1
        try:
            with map_exceptions(CONNECT_ERRORS, f"cannot bind an RDS socket to {local}"):
                sock.bind(sockaddr(local, 0))
            with map_exceptions(CONNECT_ERRORS, f"connect to rds {format_hostport(host, port)} failed"):
                try:
                    peer, tx_size = await asyncio.wait_for(self._handshake(sock, host, port, session, conn_type), timeout)
                except asyncio.TimeoutError:
                    raise ConnectTimeout(f"rds {format_hostport(host, port)} did not answer within {timeout:g} s (no listener there?)") from None
        except BaseException:
            sock.close()
            raise
        return RdsTransport(self, sock, peer, session, tx_size)

    async def _handshake(self, sock: socket.socket, host: str, port: int, session: int,
                         conn_type: ConnType) -> tuple[tuple[str, int], int]:
        """CONNECT to the listener; the ACCEPT comes from the session's own socket."""
        loop = asyncio.get_running_loop()
        hello = encode_envelope(Kind.CONNECT, session, self.datagram_size, int(conn_type))
        while True:
            try:
                sock.sendmsg([hello], [], 0, sockaddr(host, port))
                break
            except (BlockingIOError, InterruptedError, OSError) as e:
                if isinstance(e, OSError) and e.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EINTR):
                    raise
                await asyncio.sleep(0.01)
        peer: tuple[str, int] | None = None
        tx_size = 0
        while peer is None:
            try:
                data, addr = sock.recvfrom(self.datagram_size + 1)
            except (BlockingIOError, InterruptedError):
                fut = loop.create_future()
                loop.add_reader(sock.fileno(), _resolver(fut))
                try:
                    await fut
                finally:
                    loop.remove_reader(sock.fileno())
                continue
            try:
                env = decode_envelope(data)
            except FrameError:
                continue
            if env.session != session:
                continue
            if env.kind is Kind.ACCEPT:
                peer = (addr[0], addr[1])
                tx_size = tx_datagram_size(env.value, self.send_limit(sock))
        return peer, tx_size

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        # Sessions still open belong to nobody once the backend is gone.
        for transport in list(self.transports):
            transport.abort()

    def describe(self) -> dict[str, Any]:
        return {
            "datagram_size": self.datagram_size,
            "socket_buffer": self.socket_buffer,
            "keepalive": self.keepalive,
            "peer_timeout": self.peer_timeout,
            "linger": self.linger,
            "netns": self.netns or "(daemon's)",
        }
