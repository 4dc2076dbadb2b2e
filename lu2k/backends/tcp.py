"""TCP backend, after socklnd: typed connections, autotuned buffers, per-net congestion control.

* Typed connections: the engine opens a CONTROL connection (TCP_NODELAY) for messages below
  ``min_bulk`` and a BULK connection for the rest, so a 4 MiB transfer never sits in front of
  a small RPC (socklnd's ``typed_conns``/``min_bulk``).
* Socket buffers: the kernel's autotuning (up to the maximum in ``net.ipv4.tcp_rmem`` /
  ``tcp_wmem``; the backend warns when those are below four and two BDPs: room for the
  peer's window and for BBR's two BDPs in flight);
  ``options.socket_buffer`` sets SO_SNDBUF/SO_RCVBUF instead (capped by ``net.core.[rw]mem_max``).
* Unsent bytes: with a profile, a socket holds at most ``notsent_lowat`` (TCP_NOTSENT_LOWAT,
  default half a BDP within 128 KiB..4 MiB) not yet sent, so the peer's byte window is spent
  on the path and not on a queue in this host's kernel.
* Congestion control: ``options.congestion`` (e.g. ``bbr``, ``cubic``) per network; the
  default is ``bbr`` where the kernel offers it, else the system default.
* Zero copy: frames go out with one ``sendmsg`` of header/payload iovecs; large payloads are
  ``recv_into`` a buffer of their own and decrypted straight into the one the engine supplies
  (with ``encryption: none``, received into it directly).
* Sealed: until the hello is done only hello frames are accepted (an unauthenticated peer
  costs one header); after it every frame is sealed (:mod:`lu2k.crypto`).
* Stalls: after an outage TCP's retransmission timer has backed off towards its two-minute
  ceiling, so a connection with data in flight could sit silent long after the link is back.
  With ``options.dead_timeout`` (default ``max(10 s, 8 RTT)``; 0 leaves the kernel's defaults)
  a connection that has data outstanding and has had no ACK at all for that long is ended
  (read from TCP_INFO every quarter of it), and TCP keepalive gives up on an idle connection
  whose peer went away about as fast.  The engine then reconnects on a fresh socket (fresh
  RTO) and resends whatever was not acknowledged.  Not TCP_USER_TIMEOUT: the kernel counts
  that from the first retransmission of a recovery that has not ended, and on a path with
  steady random loss recovery never ends, so it would end live connections at the first
  retransmission timeout after ``dead_timeout`` seconds of ordinary loss.
* Start-up: with BBR and a profile rate, a new BULK socket is paced at most 1.1x that rate
  (``options.startup_cap``) until BBR has left STARTUP, whose 2.885x overshoot would
  otherwise drop about a BDP at a one-BDP bottleneck queue on a long path.
* ProbeRTT: on paths of 200 ms RTT or more (``options.probe_rtt``, default ``auto``) BBR's
  model is restarted every 7 s, so it never drains the window to four packets for a round
  trip.  Both are decided by :class:`.tcp_bbr.BbrWatch` from ``TCP_CC_INFO``.
* Striping: one BULK connection may run over ``options.streams`` TCP sockets (default 1);
  see :mod:`.tcp_stripes`.
* Errors: ``OSError`` becomes a ``ConnectError``/``ReadError``/``WriteError`` through one
  table per phase (below); an accept loop out of descriptors pauses instead of spinning.
"""

from __future__ import annotations

import asyncio
import functools
import fcntl
import socket
import struct
import termios
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from ..crypto import FrameCodec, large_payload_cuts
from ..errors import ConfigError, ConnectError, ConnectionClosed, ConnectTimeout, Lu2kError, ReadError, WriteError
from ..inet import family_of, format_hostport
from ..ratelimit import LogLimiter
from ..values import format_rate, parse_rate
from ..wire import BufferFor, ConnType, Frame, HelloResult
from .base import (
    EXHAUSTION_ERRNOS, AcceptBackoff, AcceptCallback, Backend, BackendSettings, ExceptionMap, Listener, OutFrame, Transport,
    describe_exception, map_exceptions, option_int,
)
from .netpath import sockaddr
from .tcp_bbr import (
    BBR_INFO, MAX_PACING_RATE_LIMIT, PROBE_RTT_MODES, PROBE_RTT_SKIP_MIN_RTT, STARTUP_CAP_SHARE, Action, BbrWatch,
    ProbeRttMode, read_bbr,
)
from .tcp_stripes import DEFAULT_STREAMS, MAX_STREAMS, StripedTransport, StripeRegistry

log = structlog.get_logger("lu2k.backends.tcp")

IOV_MAX = 1024
RECV_CHUNK = 256 << 10
HELLO_CHUNK = 4096
DIRECT_RECV_MIN = 16 << 10  # payload remainder above this is received straight into place
KNOWN_OPTIONS = frozenset({"min_bulk", "congestion", "socket_buffer", "notsent_lowat", "dead_timeout", "encryption", "peer_keys", "peer_keys_only",
                           "streams", "rate_cap", "startup_cap", "probe_rtt"})
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)  # Linux; Python's socket module lacks it
TCP_CC_INFO = getattr(socket, "TCP_CC_INFO", 26)
# Unsent bytes a BULK socket may hold (TCP_NOTSENT_LOWAT) when the profile gives the BDP: half
# a BDP, within these bounds -- enough that the socket never runs dry between two of the
# engine's batches, little enough that the peer's byte window is spent on the path, not on
# a queue in this host's kernel.  0 (no profile): the kernel's default, no limit.
NOTSENT_LOWAT_MIN = 128 << 10
NOTSENT_LOWAT_MAX = 4 << 20
# What the kernel's autotuning must be allowed per socket, in BDPs: a receive buffer for the
# window (with the kernel's overhead share), a send buffer for BBR's two BDPs in flight.
AUTOTUNING_BDPS = {"tcp_rmem": 4, "tcp_wmem": 2}


def default_notsent_lowat(bdp: int) -> int:
    return min(NOTSENT_LOWAT_MAX, max(NOTSENT_LOWAT_MIN, bdp // 2)) if bdp else 0


DEAD_TIMEOUT_MIN = 10.0  # s; the default is max(this, DEAD_TIMEOUT_RTTS x the profile's RTT)
DEAD_TIMEOUT_RTTS = 8
DEAD_CHECKS = 4  # TCP_INFO is read this many times per dead_timeout
KEEPALIVE_PROBES = 5  # unanswered in a row before an idle connection is given up
# struct tcp_info up to tcpi_last_ack_recv: eight u8 fields, then u32 rto, ato, snd_mss,
# rcv_mss, unacked, sacked, lost, retrans, fackets, last_data_sent, last_ack_sent,
# last_data_recv, last_ack_recv (milliseconds ago).
TCP_INFO_HEAD = struct.Struct("=8B13I")
TCPI_UNACKED = 8 + 4
TCPI_LAST_ACK_RECV = 8 + 12
JOIN_GRACE = 0.2  # seconds an accepted socket may take to show a stripe JOIN before the engine gets it


# The one place tcp's library errors become lu2k's, by phase.
CONNECT_ERRORS: ExceptionMap = {TimeoutError: ConnectTimeout, OSError: ConnectError}
READ_ERRORS: ExceptionMap = {OSError: ReadError}
WRITE_ERRORS: ExceptionMap = {OSError: WriteError}
LISTEN_ERRORS: ExceptionMap = {OSError: ConnectError}


def set_pacing_cap(sock: socket.socket, bytes_per_s: int) -> None:
    """SO_MAX_PACING_RATE, as the kernel's u32 (Python would pass ~0U, "no cap", as a signed int and fail)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, struct.pack("=I", bytes_per_s))


def available_congestion_controls() -> list[str]:
    try:
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
            return f.read().split()
    except OSError:
        return []


def autotuning_limits() -> dict[str, int]:
    """The most the kernel's buffer autotuning gives one socket (the last of tcp_rmem/tcp_wmem)."""
    out = {}
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                out[name] = int(f.read().split()[-1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def short_autotuning_limits(bdp: int, limits: dict[str, int]) -> list[str]:
    """The sysctls whose maximum is below what a path of ``bdp`` bytes needs, as ``name max=value < need``."""
    return [f"net.ipv4.{name} max={value} < {AUTOTUNING_BDPS[name] * bdp}" for name, value in sorted(limits.items())
            if value < AUTOTUNING_BDPS[name] * bdp]


def dead_timeout_option(opts: dict[str, Any], rtt_ms: float | None, where: str) -> float:
    """``options.dead_timeout`` in seconds: 0 (kernel defaults) or 1..3600; default max(10 s, 8 RTT)."""
    default = max(DEAD_TIMEOUT_MIN, DEAD_TIMEOUT_RTTS * (rtt_ms or 0.0) / 1e3)
    value = opts.get("dead_timeout", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"dead_timeout must be a number of seconds, got {value!r}", where=where)
    if value != 0 and not 1 <= value <= 3600:
        raise ConfigError(f"dead_timeout must be 0 (kernel defaults) or 1..3600 s, got {value!r}", where=where)
    return float(value)


def set_keepalive(sock: socket.socket, seconds: float) -> None:
    """Keepalive probes that give up on a silent peer after about ``seconds`` of idleness (at
    least 6 s: probes are whole seconds apart).

    Keepalive makes an idle connection send something, so a peer that is gone (its socket
    closed while the link was down) answers with a reset, or not at all.  It gives up only
    after :data:`KEEPALIVE_PROBES` unanswered probes in a row, so the random loss of a probe or
    its answer on a lossy link does not end a live connection.  A connection with data
    outstanding is watched by :class:`TcpTransport` instead (see :func:`ack_silence`).
    """
    idle = max(1, int(seconds / 2))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(seconds / 2 / KEEPALIVE_PROBES)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def unacked_and_ack_age(tcp_info: bytes) -> tuple[int, float] | None:
    """Segments sent and not yet acknowledged, and seconds since the peer last acknowledged
    anything, from ``TCP_INFO``; None if the answer is short."""
    if len(tcp_info) < TCP_INFO_HEAD.size:
        return None
    fields = TCP_INFO_HEAD.unpack_from(tcp_info)
    return fields[TCPI_UNACKED], fields[TCPI_LAST_ACK_RECV] / 1000


def ack_silence(tcp_info: bytes) -> float | None:
    """Seconds since the peer last acknowledged anything, from ``TCP_INFO``, when data is
    outstanding (sent and not yet acknowledged); None when nothing is, or the answer is short.

    The kernel stamps every ACK it takes in, duplicate and SACK ones included, so a connection
    repairing steady random loss keeps a small age; only a peer (or path) that has gone quiet
    lets it grow."""
    head = unacked_and_ack_age(tcp_info)
    return head[1] if head is not None and head[0] else None


class TcpTransport(Transport):
    backend_name = "tcp"

    def __init__(self, sock: socket.socket, max_payload: int, dead_timeout: float = 0.0) -> None:
        self._sock = sock
        self._dead_timeout = dead_timeout
        self._stall = ""  # why TCP gave up on the peer, once it has
        self._loop = asyncio.get_running_loop()
        try:
            peer = sock.getpeername()
            self._peer = format_hostport(str(peer[0]), int(peer[1]))
        except OSError:
            self._peer = "?"
        self._codec = FrameCodec(max_payload, self._peer)
        self._scratch: bytearray | None = None  # allocated on first use, freed on close
        self._closed = False
        self._send_lock = asyncio.Lock()
        # Sends and receives waiting for the socket, each with the call that unregisters it:
        # close() wakes them (a closed fd never becomes ready) before the fd can be reused.
        self._waiting: dict[asyncio.Future[None], Callable[[], object]] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self._bbr: BbrWatch | None = None
        self._bbr_timer: asyncio.TimerHandle | None = None
        self._dead_timer: asyncio.TimerHandle | None = None
        if dead_timeout:
            self._dead_timer = self._loop.call_later(dead_timeout / DEAD_CHECKS, self._check_acks)

    @property
    def peer_address(self) -> str:
        return self._peer

    def set_buffer_for(self, buffer_for: BufferFor | None) -> None:
        self._codec.set_buffer_for(buffer_for)

    async def peek(self, want: int, stop: bytes) -> bytes:
        """The first bytes received, left in place: ``want`` of them, or fewer once they no
        longer begin like ``stop`` (the JOIN magic).  ``ReadError`` at EOF or an error."""
        sock = self._sock
        while True:
            with map_exceptions(READ_ERRORS, f"receive from {self._peer} failed"):
                try:
                    head: bytes | None = sock.recv(want, socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    head = None
            if head == b"":
                raise ReadError(f"{self._peer} closed the connection before sending anything")
            if head is not None and (len(head) >= want or head[: len(stop)] != stop[: len(head)]):
                return head
            if head:
                await asyncio.sleep(0.01)  # part of a JOIN: the socket stays readable, so wait a little
            else:
                await self._wait(writable=False)

    def take(self, n: int) -> bytes:
        """``n`` bytes that :meth:`peek` showed are there, consumed outside the frame decoder."""
        with map_exceptions(READ_ERRORS, f"receive from {self._peer} failed"):
            return self._sock.recv(n)

    def unsent_bytes(self) -> int:
        """Bytes the kernel still holds for this socket (not yet acknowledged by the peer)."""
        try:
            return int(struct.unpack("i", fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
        except OSError:
            return 0

    def on_hello_done(self, result: HelloResult) -> None:
        self._codec.hello_done(result)

    async def _wait(self, writable: bool) -> None:
        fut = self._loop.create_future()
        fd = self._sock.fileno()
        add, remove = (self._loop.add_writer, self._loop.remove_writer) if writable else (self._loop.add_reader, self._loop.remove_reader)
        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        add(fd, wake)
        self._waiting[fut] = functools.partial(remove, fd)
        try:
            await fut
        finally:
            unregister = self._waiting.pop(fut, None)
            if unregister is not None:
                unregister()

    async def send(self, frames: Sequence[OutFrame]) -> None:
        async with self._send_lock:  # sealing assigns nonces: it must happen in wire order
            sealer = self._codec.sealer
            if sealer is None:
                await self._send_all(frames)
                return
            # Runs of small frames are sealed together (one buffer, one iovec); a large payload
            # is sealed into the sealer's reused buffer and sent before the next one is sealed,
            # so the buffer stays in cache for the kernel's copy.
            start = 0
            for end in large_payload_cuts(frames):
                await self._send_all(sealer.seal(frames[start:end]))
                start = end
            if start < len(frames):
                await self._send_all(sealer.seal(frames[start:] if start else frames))

    async def _send_all(self, frames: Sequence[OutFrame]) -> None:
        iov: list[Any] = []
        for header, payload in frames:
            iov.append(header)
            if len(payload):
                iov.append(payload)
        sock = self._sock
        while iov:
            if self._closed:
                raise WriteError(self._stall or f"connection to {self._peer} closed")
            with map_exceptions(WRITE_ERRORS, f"send to {self._peer} failed"):
                try:
                    sent = sock.sendmsg(iov if len(iov) <= IOV_MAX else iov[:IOV_MAX])
                except (BlockingIOError, InterruptedError):
                    await self._wait(writable=True)
                    continue
                except OSError as e:
                    if stalled := self._stalled(e):
                        raise WriteError(stalled) from None
                    raise
            self.bytes_sent += sent
            # Drop what went out; keep the rest as byte views (no copy).
            done = 0
            while sent:
                first = iov[done]
                size = first.nbytes if isinstance(first, memoryview) else len(first)
                if sent >= size:
                    sent -= size
                    done += 1
                else:
                    iov[done] = memoryview(first).cast("B")[sent:]
                    sent = 0
            if done:
                del iov[:done]

    async def recv(self) -> list[Frame]:
        codec = self._codec
        while True:
            decoder = codec.decoder  # replaced once, when the hello is done
            frames = decoder.frames()
            if frames:
                return frames
            if self._closed:
                raise ReadError(self._stall or f"connection to {self._peer} closed locally")
            target = decoder.payload_target()
            direct = target is not None and len(target) >= DIRECT_RECV_MIN
            if not direct:
                want = RECV_CHUNK if codec.hello_over else HELLO_CHUNK  # an unauthenticated peer gets a small buffer
                if self._scratch is None or len(self._scratch) != want:
                    self._scratch = bytearray(want)
            with map_exceptions(READ_ERRORS, f"receive from {self._peer} failed"):
                try:
                    n = self._sock.recv_into(target if direct else self._scratch)  # type: ignore[arg-type]
                except (BlockingIOError, InterruptedError):
                    await self._wait(writable=False)
                    continue
                except OSError as e:
                    if stalled := self._stalled(e):
                        raise ReadError(stalled) from None
                    raise
            if n == 0:
                if decoder.at_boundary():
                    raise ConnectionClosed(f"{self._peer} closed the connection")
                raise ReadError(f"{self._peer} closed the connection in the middle of a frame")
            self.bytes_received += n
            if direct:
                decoder.payload_filled(n)
            else:
                assert self._scratch is not None
                decoder.feed(memoryview(self._scratch)[:n])

    def _stalled(self, error: OSError) -> str:
        """The reason when ``error`` means TCP gave up on the peer (ETIMEDOUT: keepalive, or the
        kernel's retransmissions exhausted), else "".  The kernel reports ETIMEDOUT once; the
        other direction then sees EPIPE or a reset, so the reason is kept for it."""
        if isinstance(error, TimeoutError) and not self._stall:
            self._stall = (f"connection to {self._peer} stalled: the peer stopped answering within dead_timeout {self._dead_timeout:g} s"
                           if self._dead_timeout else f"connection to {self._peer} timed out (TCP retransmissions exhausted)")
        return self._stall

    def _check_acks(self) -> None:
        """End the connection if data is outstanding and no ACK came for ``dead_timeout``: the
        peer or the path is gone, and a fresh socket (fresh RTO) takes over (see the module's
        notes on stalls)."""
        self._dead_timer = None
        if self._closed:
            return
        try:
            silence = ack_silence(self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_HEAD.size))
        except OSError:
            return  # the socket is failing; the next send or receive reports it
        if silence is not None and silence >= self._dead_timeout:
            self._stall = f"connection to {self._peer} stalled: nothing acknowledged for dead_timeout {self._dead_timeout:g} s"
            self.close()  # the pending receive (and any send) fails with the reason
            return
        self._dead_timer = self._loop.call_later(self._dead_timeout / DEAD_CHECKS, self._check_acks)

    def watch_bbr(self, watch: BbrWatch, poll: float) -> None:
        """Run ``watch`` on this socket's kernel BBR: its first actions now, then a reading
        every ``poll`` seconds while capped and every second after (see :mod:`.tcp_bbr`)."""
        self._bbr = watch
        self._apply(watch.start())

        def check() -> None:
            self._bbr_timer = None
            if self._closed:
                return
            try:
                head = unacked_and_ack_age(self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_HEAD.size))
                unacked = head[0] if head is not None else 0
                reading = read_bbr(self._sock.getsockopt(socket.IPPROTO_TCP, TCP_CC_INFO, BBR_INFO.size), unacked)
                self._apply(watch.tick(time.monotonic(), reading))
            except OSError:
                return  # the socket is failing; the next send or receive reports it
            if watch.active:
                self._bbr_timer = self._loop.call_later(watch.next_tick(poll), check)

        if watch.active:
            self._bbr_timer = self._loop.call_later(poll, check)

    def _apply(self, actions: list[Action]) -> None:
        for action, value in actions:
            if action == "pace":
                set_pacing_cap(self._sock, value)
            else:  # restart BBR's model: setting the congestion control it already has does nothing
                try:
                    self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
                except OSError as e:
                    log.warning("cannot restart kernel BBR's model; its ProbeRTT stays", peer=self._peer, error=e.strerror)
                    if self._bbr is not None:
                        self._apply(self._bbr.restart_refused())
                    return
                try:
                    self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"bbr")
                except OSError as e:  # it was set on this socket before; end it rather than run reno
                    self._stall = f"connection to {self._peer}: cannot set congestion control bbr again: {e.strerror}"
                    self.close()
                    return

    @property
    def startup_capped(self) -> bool:
        return self._bbr is not None and self._bbr.capped

    def close(self) -> None:
        for timer in (self._bbr_timer, self._dead_timer):
            if timer is not None:
                timer.cancel()
        self._bbr_timer = self._dead_timer = None
        if not self._closed:
            self._closed = True
            self._scratch = None
            waiting, self._waiting = self._waiting, {}
            for fut, unregister in waiting.items():
                unregister()
                if not fut.done():
                    fut.set_result(None)  # the send or receive sees _closed and fails cleanly
            try:
                self._sock.close()
            except OSError:
                pass

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, **self._codec.stats()}
        if not self._closed:
            try:
                out["congestion"] = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
            except OSError:
                pass
        if self._bbr is not None:
            out["bbr_watch"] = f"probe_rtt {self._bbr.probe_rtt}"
        if self.startup_capped:
            out["startup_capped"] = True
        if self._bbr is not None and self._bbr.restarts:
            out["bbr_restarts"] = self._bbr.restarts
        return out


class TcpListener(Listener):
    """The listening socket and its accept loop (run when the socket is readable)."""

    def __init__(self, sock: socket.socket, backend: "TcpBackend", on_accept: AcceptCallback) -> None:
        self._sock = sock
        self._backend = backend
        self._on_accept = on_accept
        self._loop = asyncio.get_running_loop()
        self._backoff = AcceptBackoff()
        self._resume: asyncio.TimerHandle | None = None
        self._closed = False
        self.limiter = LogLimiter()
        self.accept_pauses = 0
        self._loop.add_reader(sock.fileno(), self._ready)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def _ready(self) -> None:
        while not self._closed:
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in EXHAUSTION_ERRNOS:
                    self._pause(e)
                    return
                continue  # that one connection failed (ECONNABORTED, EPERM ...): take the next
            self._backoff.succeeded()
            self._backend._accepted(conn, self._on_accept)

    def _pause(self, error: OSError) -> None:
        """Out of descriptors or memory: stop watching the socket for a while (it stays
        readable, so retrying at once would spin), then try again."""
        delay = self._backoff.failed()
        self.accept_pauses += 1
        self._loop.remove_reader(self._sock.fileno())
        self._resume = self._loop.call_later(delay, self._watch)
        if (n := self.limiter.allow("accept", time.monotonic())) is not None:
            log.warning("accept failed; pausing the listener", address=format_hostport(*self.address),
                        error=describe_exception(error), pause_s=delay, suppressed=n)

    def _watch(self) -> None:
        self._resume = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._ready)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        try:
            self._loop.remove_reader(self._sock.fileno())
        except (ValueError, OSError):
            pass
        self._sock.close()


class TcpBackend(Backend):
    name = "tcp"
    typed_connections = True

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        opts = settings.options
        where = f"net {settings.net}"
        unknown = sorted(set(opts) - KNOWN_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown tcp option(s) {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_OPTIONS))})", where=where)
        self.min_bulk = option_int(opts, "min_bulk", 1024, 0, 1 << 30, where, what="a byte count")
        cc = opts.get("congestion")
        available = available_congestion_controls()
        if cc is None:
            cc = "bbr" if "bbr" in available else None
        elif available and cc not in available:
            raise ConfigError(f"congestion control {cc!r} is not offered by this kernel (have: {', '.join(available)})", where=f"net {settings.net}")
        self.congestion: str | None = cc
        # Socket buffers: the kernel's autotuning unless the config sets a size.  Setting one
        # switches autotuning off and is capped by net.core.[rw]mem_max (208 KiB on a stock
        # kernel), far below a satellite path's window; autotuning grows to tcp_[rw]mem's maximum.
        self.socket_buffer: int | None = option_int(opts, "socket_buffer", 0, 0, 1 << 30, where, what="a byte count") or None
        bdp = settings.profile.bdp_bytes() if settings.profile.rate_mbit and settings.profile.rtt_ms else 0
        self.notsent_lowat = option_int(opts, "notsent_lowat", default_notsent_lowat(bdp), 0, 1 << 30, where, what="a byte count")
        self.short_limits = short_autotuning_limits(bdp, autotuning_limits()) if bdp and not self.socket_buffer else []
        if self.short_limits:
            log.warning("kernel TCP buffer autotuning is limited below this net's window: the link will not fill",
                        net=str(settings.net), limits=", ".join(self.short_limits),
                        fix="raise the last field of those sysctls, or set options.socket_buffer")
        self.dead_timeout = dead_timeout_option(opts, settings.profile.rtt_ms, where)
        self.streams = option_int(opts, "streams", DEFAULT_STREAMS, 1, MAX_STREAMS,
                                  where, what="a number of sockets per bulk connection")
        # SO_MAX_PACING_RATE: the kernel paces each socket at most this fast (BBR's probing
        # included) -- for a link shared with other traffic.  Off by default: at the link's own
        # rate it costs goodput (BBR's standing queue carries the link through ProbeRTT).
        self.rate_cap = int(min(parse_rate(opts.get("rate_cap", 0), f"{where}: rate_cap", number_unit=1e6,
                                           allow_unlimited=True) / 8, MAX_PACING_RATE_LIMIT))
        # The start-up cap (see STARTUP_CAP_SHARE): by default with BBR and a profile rate.
        if "startup_cap" in opts:
            raw = opts["startup_cap"]
            startup_bps = 0.0 if raw is False or raw == "off" else parse_rate(raw, f"{where}: startup_cap", number_unit=1e6,
                                                                                allow_unlimited=True)
        else:
            startup_bps = settings.profile.rate_mbit * 1e6 * STARTUP_CAP_SHARE if cc == "bbr" and settings.profile.rate_mbit else 0.0
        self.startup_cap = int(min(startup_bps / 8, MAX_PACING_RATE_LIMIT))
        if self.rate_cap:
            self.startup_cap = min(self.startup_cap, self.rate_cap) if self.startup_cap else 0
        if self.startup_cap and cc != "bbr":
            raise ConfigError(f"startup_cap needs congestion: bbr (it lifts when BBR leaves STARTUP), not {cc}", where=where)
        self.startup_poll = min(0.5, max(0.05, (settings.profile.rtt_ms or 100.0) / 2e3))
        # ProbeRTT (see lu2k.backends.tcp_bbr): avoided on long paths unless the config says kernel.
        probe_rtt = opts.get("probe_rtt", "auto" if cc == "bbr" else "kernel")
        if probe_rtt not in PROBE_RTT_MODES:
            raise ConfigError(f"probe_rtt must be one of {', '.join(PROBE_RTT_MODES)}, not {probe_rtt!r}", where=where)
        if probe_rtt != "kernel" and cc != "bbr":
            raise ConfigError(f"probe_rtt: {probe_rtt} needs congestion: bbr (ProbeRTT is BBR's), not {cc}", where=where)
        self.probe_rtt: ProbeRttMode = probe_rtt
        self._stripes = StripeRegistry()
        self._tasks: set[asyncio.Task[None]] = set()

    def _tune(self, sock: socket.socket, conn_type: ConnType) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # we batch ourselves
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self.socket_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.socket_buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.socket_buffer)
        if self.notsent_lowat:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, self.notsent_lowat)
        if self.congestion:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.congestion.encode())
            except OSError as e:
                raise ConfigError(f"cannot set congestion control {self.congestion!r}: {e.strerror}", where=f"net {self.settings.net}") from None
        if self.dead_timeout:
            set_keepalive(sock, self.dead_timeout)
        if self.rate_cap:
            set_pacing_cap(sock, self.rate_cap)

    async def listen(self, host: str, port: int, on_accept: AcceptCallback) -> Listener:
        with map_exceptions(LISTEN_ERRORS, f"cannot listen on {format_hostport(host, port)}"):
            sock = socket.socket(family_of(host), socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.socket_buffer:  # must be set before listen() to size the window scale
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.socket_buffer)
                sock.bind(sockaddr(host, port))
                sock.listen(128)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
        return TcpListener(sock, self, on_accept)

    def _accepted(self, conn: socket.socket, on_accept: AcceptCallback) -> None:
        try:
            conn.setblocking(False)
            self._tune(conn, ConnType.ANY)
        except (ConfigError, OSError):
            conn.close()
            return
        transport = StripedTransport(TcpTransport(conn, self.settings.max_message_size, self.dead_timeout), registry=self._stripes,
                                     watcher=self._watch_bbr)
        task = asyncio.ensure_future(self._first_bytes(transport, on_accept))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _first_bytes(self, transport: StripedTransport, on_accept: AcceptCallback) -> None:
        """A stripe's JOIN, which comes with the handshake, attaches the socket to its
        connection; a hello, or nothing yet within :data:`JOIN_GRACE`, goes to the engine (a
        JOIN delayed by loss is still recognised at the transport's first ``recv``)."""
        try:
            if await asyncio.wait_for(transport.take_join(), JOIN_GRACE):
                return
        except asyncio.TimeoutError:
            pass
        except Lu2kError:
            transport.close()
            return
        except BaseException:  # cancelled: the backend is closing
            transport.close()
            raise
        await on_accept(transport)

    async def connect(self, host: str, port: int, conn_type: ConnType, timeout: float) -> Transport:
        what = f"connect to {format_hostport(host, port)} failed"
        with map_exceptions(CONNECT_ERRORS, what):
            sock = socket.socket(family_of(host), socket.SOCK_STREAM)
        try:
            with map_exceptions(CONNECT_ERRORS, what):
                self._tune(sock, conn_type)
                sock.setblocking(False)
                try:
                    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, sockaddr(host, port)), timeout)
                except asyncio.TimeoutError:
                    raise ConnectTimeout(f"connect to {format_hostport(host, port)} timed out after {timeout:g}s") from None
            first = TcpTransport(sock, self.settings.max_message_size, self.dead_timeout)
            if conn_type is ConnType.BULK:
                self._watch_bbr(first)
        except BaseException:
            sock.close()
            raise
        if conn_type is not ConnType.BULK or self.streams == 1:
            return first

        async def open_stripe(index: int, join: bytes) -> TcpTransport:
            t = await self.connect(host, port, ConnType.CONTROL, timeout)  # a plain socket, tuned alike
            assert isinstance(t, TcpTransport)
            try:
                with map_exceptions(CONNECT_ERRORS, what):
                    self._watch_bbr(t)
                await t.send([(join, b"")])
            except BaseException:
                t.close()
                raise
            return t

        return StripedTransport(first, streams=self.streams, opener=open_stripe)

    def _watch_bbr(self, transport: TcpTransport) -> None:
        """A socket that will carry our bulk data -- a new one of ours, or an accepted one our
        return path sends on -- starts under the start-up cap (its share of it, when a
        connection is striped), and its BBR is kept out of ProbeRTT on long paths."""
        if self.startup_cap or self.probe_rtt != "kernel":
            cap = max(1, self.startup_cap // self.streams) if self.startup_cap else 0
            transport.watch_bbr(BbrWatch(time.monotonic(), cap, self.rate_cap, self.probe_rtt), self.startup_poll)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def describe(self) -> dict[str, Any]:
        return {
            "congestion": self.congestion or "system default",
            "socket_buffer": self.socket_buffer or "autotuned",
            "notsent_lowat": self.notsent_lowat or "kernel default",
            **({"autotuning_short": self.short_limits} if self.short_limits else {}),
            "min_bulk": self.min_bulk,
            "dead_timeout": self.dead_timeout or "kernel default",
            "streams": self.streams,
            "rate_cap": format_rate(self.rate_cap * 8),
            "startup_cap": format_rate(self.startup_cap * 8) if self.startup_cap else "off",
            "probe_rtt": (f"auto (skipped on paths of {PROBE_RTT_SKIP_MIN_RTT * 1e3:g} ms RTT or more)"
                          if self.probe_rtt == "auto" else self.probe_rtt),
        }

