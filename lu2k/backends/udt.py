"""UDT backend: lu2k frames over UDT messages (libudt 4.11 through lu2k's own binding).

lu2klnd's first backend.  Setup and data path live here; the preamble and AEAD in
:mod:`.udt_proto`; config keys and sizing in :mod:`.udt_tunables`; the socket filter that
keeps hostile UDT handshakes from libudt in :mod:`.udt_guard`; the binding and the
congestion control in ``_udt/`` (compiled to ``lu2k.backends._udtcore``).

Theory of operation:

* **One frame, one UDT message.**  Sockets are UDT ``SOCK_DGRAM`` (message mode, reliable,
  in order), so boundaries are kept by UDT and every message is one sealed lu2k frame.
* **Off the event loop.**  libudt's calls block; each runs in a thread with the GIL
  released.  Per connection: a receive thread (blocking ``recvmsg``) handing frames to
  the loop with ``call_soon_threadsafe``, bounded by a semaphore of ``recv_queue``
  messages -- when the engine stops reading, the thread stops too, UDT's receive buffer
  fills and UDT's flow window throttles the sender; and one send thread (a one-worker
  executor, so frames go out in the order ``send`` was called).  Connects, accepts and the
  preamble exchange also run in threads.  Closing a UDT socket wakes every call blocked on
  it (lingering is off, or ``close`` would wait for unsent data).  Until the hello is over
  the receive thread reads one message per ``recv()`` into 4 KiB (nothing has said who
  the peer is yet); only then does it map a max-frame buffer, returned to the system when
  the connection ends.  The listener takes connections from libudt only into one of 64
  preamble slots, at most 100 a second (see ``_accept_loop``).
  (libudt 4.11's receive timeout is not used: with it set, ``recvmsg`` waits the whole
  timeout even when a message is ready.)
* **Encryption.**  After UDT connects, each side sends a preamble with a fresh salt; both
  derive per-direction AEAD keys from the network key (:mod:`.udt_proto`).  The lu2k hello
  then runs inside the encrypted channel; a peer without the key fails at its first frame.
* **Authenticated packets.**  Every socket is given the net's packet key before it binds or
  connects: the binding then adds a counter and a MAC to each UDT packet (control packets
  whole, data packets' headers) and drops forged or replayed ones before libudt acts on them
  (``_udt/packet_auth.h``), so an on-path attacker cannot acknowledge data it dropped, close
  the connection, make the sender resend or inject data.  Data payloads are the AEAD's: an
  altered one fails to open and closes the connection (a bad frame, as on tcp).  Dropped
  packets are counted per connection (``packets_forged``, ``packets_replayed`` in ``lu2kctl
  peer show``) and logged.  libudt's packets are sized to leave room for the 16-byte trailer.
* **Congestion control.**  ``cc: lu2k-rate`` (default) installs lu2k's loss-tolerant
  rate control through UDT's CCC factory (see ``_udt/rate_law.h``); ``cc: udt`` keeps
  UDT's DAIMD.  Buffers and the flight window are sized from the site profile.
* **Rendezvous.**  With ``rendezvous: true`` connects leave from ``rendezvous_port`` in
  UDT rendezvous mode, and ``listen`` rendezvous-connects to each of ``rendezvous_peers``
  from the net's port instead of accepting -- both ends punch the NAT.
* **Figures.**  ``Transport.stats()`` is UDT's ``perfmon`` (RTT, bandwidth estimate, loss,
  retransmissions, rates, windows) plus the control's state, for ``lu2kctl peer show``.
  Those, and the watchdog's look at the control's state, take libudt's global lock: they are
  asked in a thread of their own with a bounded wait (:mod:`.udt_asking`), so a libudt that
  stops answering is reported, not waited for by the loop.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import mmap
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

try:
    from . import _udtcore
except ImportError as e:  # the registry turns this into BackendUnavailable with an install hint
    raise ImportError(f"lu2k's UDT binding (lu2k.backends._udtcore) is not built or cannot load: {e}") from None

from ..errors import (
    ConfigError, ConnectError, ConnectionClosed, ConnectTimeout, FrameError, HandshakeError, LocalProtocolError,
    Lu2kError, ReadError, WriteError,
)
from ..fec import MAX_OVERHEAD as FEC_OVERHEAD
from ..inet import family_of, format_hostport, udt_mss_for, udt_wire_mss, wildcard
from ..wire import BASE_SIZE, BufferFor, ConnType, Frame, FrameHeader, FrameType, HelloResult, decode_header, peek_header_size
from . import udt_guard
from . import udt_proto as proto
from .base import AcceptCallback, Backend, BackendSettings, Listener, OutFrame, Transport
from .netpath import route_mtu
from .udt_asking import Asker, NotAnswered
from .udt_fec import FecRelay, loopback_for
from .udt_tunables import UdtTuning, tune

T = TypeVar("T")
log = structlog.get_logger("lu2k.backends.udt")
UDTError = _udtcore.UDTError
RECV_BATCH = 64  # frames handed to the engine per recv() at most
HELLO_BUFFER = 4096  # bytes a message may have before the hello is over (a hello frame has a few hundred)
RELAY_LINGER = 0.2  # s a connection's FEC relay outlives libudt's close (its shutdown packet)
MAX_PREAMBLES = 64  # accepted connections in their preamble at once
ACCEPT_RATE = 100.0  # connections taken from libudt per second, after a burst of MAX_PREAMBLES
LISTEN_BACKLOG = 16  # connections libudt may hold for us beyond those; it refuses more without making them
LISTEN_RETRIES = 40  # x 0.25 s: outlasts libudt's hold on a just-closed listener's port
FIGURES_WAIT = 0.25  # s the loop waits for a connection's figures from libudt (microseconds, normally)
LIBUDT_SILENT_REPORT_S = 5.0  # s without an answer from libudt before the watchdog reports it
# libudt calls that take its global lock, asked from the loop (see udt_asking): one per process,
# as the lock is.
_LIBUDT = Asker("udt-figures", stuck_after=FIGURES_WAIT)
# Listener addresses this process closed, and when: libudt holds such a port for a while, so
# binding it again meets EADDRINUSE that is worth waiting out (another process's is not).
_released: dict[tuple[str, int], float] = {}
# UDT error codes (major * 1000 + minor) that mean "this connection is over".
_CLOSED_CODES = {_udtcore.E_CONNLOST, _udtcore.E_NOCONN, _udtcore.E_INVSOCK}
_STATS_KEYS = {  # perfmon field -> name shown by lu2kctl
    "ms_rtt": "rtt_ms", "mbps_bandwidth": "bandwidth_estimate_mbit", "mbps_send_rate": "send_rate_mbit",
    "mbps_recv_rate": "recv_rate_mbit", "pkt_sent_total": "packets_sent", "pkt_recv_total": "packets_received",
    "pkt_retrans_total": "retransmitted", "pkt_snd_loss_total": "lost_sent", "pkt_rcv_loss_total": "lost_received",
    "pkt_recv_nak_total": "naks_received", "pkt_flight_size": "in_flight_packets",
    "pkt_flow_window": "flow_window_packets", "us_pkt_snd_period": "packet_period_us",
}


class AcceptPacer:
    """At most ``rate`` connections a second after a burst of ``burst`` (a token bucket; pure)."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, float(burst)
        self._tokens, self._last = float(burst), now

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now

    def delay(self, now: float) -> float:
        """Seconds to wait before the next connection may be taken."""
        self._refill(now)
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self._tokens -= 1


def _tidy(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def _udt_message(e: BaseException) -> str:
    return str(e.args[1]) if isinstance(e, UDTError) and len(e.args) > 1 else str(e)


def _udt_code(e: BaseException) -> int:
    return int(e.args[0]) if isinstance(e, UDTError) and e.args else -1


def _family(host: str) -> int:
    return family_of(host)


def _in_thread(loop: asyncio.AbstractEventLoop, fn: Callable[..., T], *args: Any, name: str) -> "asyncio.Future[T]":
    """Run a blocking libudt call in a thread of its own; the result comes back on the loop."""
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        try:
            result: Any = fn(*args)
            ok = True
        except BaseException as e:  # noqa: BLE001 - carried to the awaiting task
            result, ok = e, False
        try:
            loop.call_soon_threadsafe(settle, ok, result)
        except RuntimeError:  # loop closed: nobody is waiting any more
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


# Between a dial thread and the loop giving up on it (UdtBackend._abandon): who closes the socket.
_DIAL_LOCK = threading.Lock()


def _connect_over(state: dict[str, int]) -> bool:
    """The dial thread's connect call returned; True when the loop gave up on it meanwhile."""
    with _DIAL_LOCK:
        state["connect_over"] = 1
        return "abandoned" in state


def _close_quietly(u: int) -> None:
    try:
        _udtcore.close(u)
    except UDTError:
        pass


def _close_in_thread(u: int) -> None:
    """Close ``u`` in a thread of its own, for the event loop's callers.  libudt's close waits
    for the socket's lock, which a connect in progress holds for up to its own timeout (3 s),
    and behind libudt's global lock, which under hostile traffic was seen held for good: the
    loop -- every other connection, the control socket, shutdown -- must never wait there."""

    threading.Thread(target=_close_quietly, args=(u,), name=f"udt-close-{u}", daemon=True).start()


def _udt_figures(u: int) -> dict[str, Any]:
    """A connection's figures for ``peer show`` (blocking: libudt's global lock)."""
    perf = _udtcore.perfmon(u, False)
    out: dict[str, Any] = {name: _tidy(perf[key]) for key, name in _STATS_KEYS.items()}
    out.update({f"packets_{k}": v for k, v in _udtcore.packet_auth_stats(u).items()})
    # Packets queued in UDT's send buffer (unsent + unacknowledged): near zero means the
    # sender is application-limited, not network-limited.
    out["send_buffer_packets"] = _udtcore.getsockopt(u, "snddata")
    # Flat, so ``lu2kctl peer show -v`` prints it as key=value like everything else.
    cc = _udtcore.cc_state(u)
    out["cc"] = cc.pop("cc") if cc is not None else "udt"
    out.update({f"cc_{k}": _tidy(v) for k, v in (cc or {}).items()})
    return out


def _control_states(sockets: list[int]) -> dict[int, dict[str, Any] | None]:
    """Each socket's control state (blocking: libudt's global lock); closed ones left out."""
    out: dict[int, dict[str, Any] | None] = {}
    for u in sockets:
        try:
            out[u] = _udtcore.cc_state(u)
        except UDTError:
            pass
    return out


# --- socket set-up (blocking helpers, run in threads) -------------------------------------------


def _new_socket(tuning: UdtTuning, family: int, packet_key: bytes, wire_mss: int | None = None) -> int:
    """A tuned UDT socket whose packets are at most ``wire_mss`` (default ``tuning.mss``)
    bytes on the wire, IPv4 or IPv6, authenticated with ``packet_key``."""
    u = _udtcore.socket(family)
    try:
        _udtcore.set_packet_key(u, packet_key)  # before bind/connect: the channel is keyed when opened
        # libudt's packets leave room for the trailer the binding appends to each.
        _udtcore.setsockopt(u, "mss", udt_mss_for(wire_mss or tuning.mss, family) - proto.PACKET_TRAILER_SIZE)
        _udtcore.setsockopt(u, "fc", tuning.flight_window)  # before RCVBUF: UDT caps RCVBUF at FC
        _udtcore.setsockopt(u, "sndbuf", tuning.buffer)
        _udtcore.setsockopt(u, "rcvbuf", tuning.buffer)
        _udtcore.setsockopt(u, "udp_sndbuf", tuning.udp_buffer)
        _udtcore.setsockopt(u, "udp_rcvbuf", tuning.udp_buffer)
        _udtcore.setsockopt(u, "linger", -1)
        _udtcore.set_cc(u, tuning.cc, **tuning.cc_params)
    except BaseException:
        _close_quietly(u)
        raise
    return u


def _bind_guarded(u: int, tuning: UdtTuning, family: int, host: str, port: int) -> None:
    """Give ``u`` a UDP socket of lu2k's own carrying the handshake guard (:mod:`.udt_guard`)."""
    sock = udt_guard.guarded_socket(family, host, port, udt_guard.max_peer_window(tuning.flight_window))
    try:
        _udtcore.bind_udp(u, sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # libudt owns the descriptor now


def _exchange_preamble(u: int, tuning: UdtTuning, connector: bool, key: bytes, peer: str) -> tuple[proto.Sealer, proto.Opener]:
    """Both sides' salts over the fresh UDT connection; the per-direction AEAD pair."""
    salt = proto.new_salt()
    buf = bytearray(proto.PREAMBLE_SIZE + 1)
    if connector:
        _udtcore.sendmsg(u, proto.encode_preamble(tuning.cipher, salt))
        n = _udtcore.recvmsg_into(u, buf)
        cipher, peer_salt = proto.decode_preamble(memoryview(buf)[: n or 0])
        if cipher != tuning.cipher:
            raise HandshakeError(f"{peer} answered with cipher {cipher}, this net uses {tuning.cipher}")
        k_out, k_in = proto.derive_keys(key, tuning.cipher, salt, peer_salt)
    else:
        n = _udtcore.recvmsg_into(u, buf)
        cipher, peer_salt = proto.decode_preamble(memoryview(buf)[: n or 0])
        if cipher != tuning.cipher:
            raise HandshakeError(f"{peer} wants cipher {cipher}, this net uses {tuning.cipher}")
        _udtcore.sendmsg(u, proto.encode_preamble(tuning.cipher, salt))
        k_in, k_out = proto.derive_keys(key, tuning.cipher, peer_salt, salt)
    return proto.Sealer(tuning.cipher, k_out), proto.Opener(tuning.cipher, k_in, peer)


def _with_deadline(u: int, seconds: float, fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` (blocking on ``u``); if it takes longer than ``seconds``, close ``u`` to end it."""
    expired = threading.Event()
    lock = threading.Lock()
    finished = False

    def expire() -> None:
        with lock:  # never close a socket whose handshake has just succeeded
            if finished:
                return
            expired.set()
        _close_quietly(u)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        result = fn()
        with lock:
            finished = True
            if expired.is_set():
                raise HandshakeError(f"{what} did not finish within {seconds:g} s")
        return result
    except UDTError as e:
        if expired.is_set():
            raise HandshakeError(f"{what} did not finish within {seconds:g} s") from None
        raise HandshakeError(f"{what} failed: {_udt_message(e)}") from None
    finally:
        timer.cancel()


# --- transport -------------------------------------------------------------------------------------


class UdtTransport(Transport):
    backend_name = "udt"

    def __init__(self, u: int, peer: str, tuning: UdtTuning, max_payload: int, sealer: proto.Sealer, opener: proto.Opener,
                 on_close: Callable[["UdtTransport"], None] | None = None) -> None:
        self._u = u
        self._on_close = on_close
        self._peer = peer
        self._tuning = tuning
        self._max_payload = max_payload
        self._sealer = sealer
        self._opener = opener
        self._loop = asyncio.get_running_loop()
        self._buffer_for: BufferFor | None = None
        self._closed = False
        self._udt_closed = threading.Event()
        self._ready: deque[tuple[FrameHeader, memoryview]] = deque()
        self._error: Lu2kError | None = None
        self._wakeup = asyncio.Event()
        self._slots = threading.Semaphore(tuning.recv_queue)  # bounded hand-off to the loop
        self._tx = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"udt-tx-{u}")
        self._rx_done = threading.Event()
        # Until the hello is over the receive thread reads one message per recv() into a small
        # buffer, so that a peer not yet known costs no max-frame buffer (4 MiB, all of it
        # touched, and kept by the allocator after the connection is gone).  The engine calls
        # on_hello_done before it asks for the next message, so the first big frame finds the
        # big buffer.
        self._hello_over = False
        self._demand = threading.Event()
        self._last_stats: dict[str, Any] = {}
        self._dropped_reported = 0  # forged + replayed packets already logged
        self.bytes_sent = self.bytes_received = 0
        self.messages_sent = self.messages_received = 0
        threading.Thread(target=self._receive_loop, name=f"udt-rx-{u}", daemon=True).start()

    @property
    def peer_address(self) -> str:
        return self._peer

    def set_buffer_for(self, buffer_for: BufferFor | None) -> None:
        self._buffer_for = buffer_for

    # --- receive: a thread per connection ---------------------------------------------------

    def on_hello_done(self, result: HelloResult) -> None:
        self._hello_over = True
        self._demand.set()

    def _receive_loop(self) -> None:
        buf: bytearray | mmap.mmap = bytearray(HELLO_BUFFER + 1)  # one spare byte: a full buffer means "too long"
        big: mmap.mmap | None = None
        view = memoryview(buf)
        try:
            while not self._closed:
                if not self._hello_over:
                    if not self._demand.wait(0.5):
                        continue
                    self._demand.clear()
                if self._hello_over and big is None:
                    # A mapping of its own, not the heap: its pages are touched only as far as
                    # messages reach and go back to the system when the connection ends (a
                    # 4 MiB heap buffer per connection, allocated in this thread's malloc
                    # arena, was kept by glibc: a daemon grew ~2 MB with every connection).
                    view.release()
                    buf = big = mmap.mmap(-1, self._tuning.max_frame + 1)
                    view = memoryview(buf)
                try:
                    n = _udtcore.recvmsg_into(self._u, buf)
                except UDTError as e:
                    if self._closed:
                        raise ReadError(f"connection to {self._peer} closed locally") from None
                    if _udt_code(e) in _CLOSED_CODES:
                        # UDT keeps message boundaries, so an end is always between frames.
                        raise ConnectionClosed(f"{self._peer} closed the connection ({_udt_message(e)})") from None
                    raise ReadError(f"receive from {self._peer} failed: {_udt_message(e)}") from None
                if n is None:
                    continue
                if n >= len(buf):
                    if big is None:
                        raise FrameError(f"UDT message from {self._peer} before the hello is over is longer than any hello frame")
                    raise FrameError(f"UDT message from {self._peer} longer than the largest frame ({self._tuning.max_frame} bytes)")
                plain = self._opener.open(view[:n])
                header, payload = self._parse(plain)
                self.bytes_received += n
                while not self._slots.acquire(timeout=0.5):
                    if self._closed:
                        return
                self._hand_over(header, payload)
        except Lu2kError as e:
            self._fail(e.with_traceback(None))  # its frames would keep views of the buffer alive
        finally:
            view.release()
            if big is not None:
                try:
                    big.close()
                except BufferError:  # a view still exported: unmapped when the last one goes
                    pass
            self._rx_done.set()

    def _parse(self, plain: bytes) -> tuple[FrameHeader, memoryview]:
        if len(plain) < BASE_SIZE:
            raise FrameError(f"UDT message from {self._peer} of {len(plain)} bytes is shorter than a frame header")
        size = peek_header_size(plain[:BASE_SIZE])
        if len(plain) < size:
            raise FrameError(f"UDT message from {self._peer} truncates its frame header")
        header = decode_header(plain[:size], self._max_payload)
        if len(plain) - size != header.payload_len:
            raise FrameError(
                f"{header.type.name} frame from {self._peer} announces {header.payload_len} payload bytes but carries {len(plain) - size}"
            )
        return header, memoryview(plain)[size:]

    def _hand_over(self, header: FrameHeader, payload: memoryview) -> None:
        def deliver() -> None:
            self._ready.append((header, payload))
            self._wakeup.set()

        try:
            self._loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # loop gone
            self._closed = True

    def _fail(self, error: Lu2kError) -> None:
        def deliver() -> None:
            if self._error is None:
                self._error = error
            self._wakeup.set()

        try:
            self._loop.call_soon_threadsafe(deliver)
        except RuntimeError:
            pass

    async def recv(self) -> list[Frame]:
        if not self._ready and not self._hello_over:
            self._demand.set()
        while not self._ready:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise ReadError(f"connection to {self._peer} closed locally")
            self._wakeup.clear()
            await self._wakeup.wait()
        out: list[Frame] = []
        while self._ready and len(out) < RECV_BATCH:
            header, payload = self._ready.popleft()
            self._slots.release()
            self.messages_received += 1
            out.append(Frame(header, self._place(header, payload)))
        return out

    def _place(self, header: FrameHeader, payload: memoryview) -> "memoryview | bytes":
        if not len(payload):
            return b""
        if header.type is FrameType.MSG and self._buffer_for is not None:
            target = self._buffer_for(header)
            if target is not None:
                if len(target) != header.payload_len:
                    raise LocalProtocolError("buffer_for returned a buffer of the wrong size")
                # The AEAD had to produce a fresh plaintext anyway; this is the one copy.
                target[:] = payload
                return target
        return payload

    # --- send: one worker thread per connection, FIFO -------------------------------------------

    def _send_blocking(self, frames: Sequence[OutFrame]) -> None:
        for header, payload in frames:
            if self._closed:
                raise WriteError(f"connection to {self._peer} closed")
            message = self._sealer.seal(bytes(header), payload)
            try:
                while _udtcore.sendmsg(self._u, message) == 0:  # 0: send timeout; not set, but harmless
                    if self._closed:
                        raise WriteError(f"connection to {self._peer} closed")
            except UDTError as e:
                if self._closed:
                    raise WriteError(f"connection to {self._peer} closed") from None
                raise WriteError(f"send to {self._peer} failed: {_udt_message(e)}") from None
            self.bytes_sent += len(message)
            self.messages_sent += 1

    async def send(self, frames: Sequence[OutFrame]) -> None:
        if self._closed:
            raise WriteError(f"connection to {self._peer} closed")
        if self._error is not None and not isinstance(self._error, FrameError):
            raise WriteError(f"connection to {self._peer} is gone: {self._error}")
        sending = self._loop.run_in_executor(self._tx, self._send_blocking, list(frames))
        try:
            await sending
        except RuntimeError:  # executor shut down by close()
            raise WriteError(f"connection to {self._peer} closed") from None
        except asyncio.CancelledError:
            # close() cancels a send still waiting for the worker thread: that is the
            # connection closing under it, not this task being cancelled.
            task = asyncio.current_task()
            if sending.cancelled() and self._closed and (task is None or not task.cancelling()):
                raise WriteError(f"connection to {self._peer} closed") from None
            raise

    # --- close and figures ----------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self.check_packets()
        self._closed = True
        self._wakeup.set()
        self._demand.set()  # a receive thread waiting for the next hello frame ends now
        self._tx.shutdown(wait=False, cancel_futures=True)
        if self._on_close is not None:
            self._on_close(self)

        def close_udt() -> None:
            try:
                self._last_stats = _udt_figures(self._u)  # the last ones, kept for peer show
            except UDTError:
                pass
            _close_quietly(self._u)
            self._udt_closed.set()

        threading.Thread(target=close_udt, name=f"udt-close-{self._u}", daemon=True).start()

    async def wait_closed(self) -> None:
        if not self._closed:
            return
        await asyncio.to_thread(self._udt_closed.wait, 10)
        await asyncio.to_thread(self._rx_done.wait, 10)

    def check_alive(self, cc: dict[str, Any] | None) -> None:
        """Declare the connection dead if the peer has been silent through timeouts too long,
        by the control's state ``cc`` (asked by the watchdog; None: UDT's own control).

        libudt 4.11 would never do it under lu2k-rate: its "broken" test needs 5 s since
        the last response, and every timeout resets that clock.
        """
        if self._closed:
            return
        if cc and cc["consecutive_timeouts"] > 0 and cc["silent_s"] > self._tuning.dead_peer_s:
            error = ReadError(
                f"{self._peer} acknowledged nothing for {cc['silent_s']:.0f} s "
                f"({cc['consecutive_timeouts']} retransmission timeouts); connection declared dead"
            )
            if self._error is None:
                self._error = error
            self.close()

    def check_packets(self) -> None:
        """Log packets dropped as forged or replayed since the last look."""
        if self._closed:
            return
        auth = _udtcore.packet_auth_stats(self._u)
        dropped = auth["forged"] + auth["replayed"]
        if dropped > self._dropped_reported:
            log.warning("udt packets dropped: forged or replayed (an attacker on the path, or a path duplicating datagrams)",
                        peer=self._peer, forged=auth["forged"], replayed=auth["replayed"])
            self._dropped_reported = dropped

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "messages_sent": self.messages_sent, "messages_received": self.messages_received,
            "cipher": self._tuning.cipher,
        }
        if not self._closed:
            try:
                self._last_stats = _LIBUDT.ask(lambda: _udt_figures(self._u), FIGURES_WAIT)
            except UDTError:
                pass
            except NotAnswered as e:
                out["udt_figures"] = f"{e}: these are from before"
        out.update(self._last_stats)
        return out


# --- listener and backend ----------------------------------------------------------------------------


class UdtListener(Listener):
    def __init__(self, backend: "UdtBackend", u: int | None, address: tuple[str, int]) -> None:
        self._backend = backend
        self._u = u
        self._address = address
        self.closed = False
        self.peer_sockets: set[int] = set()  # rendezvous attempts in progress
        self.relay: FecRelay | None = None  # with fec: the net's port is the relay's, libudt listens behind it

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._u is not None and self.relay is None:
            _released[(self._address[0], self._address[1])] = time.monotonic()
        for u in [self._u, *self.peer_sockets]:
            if u is not None:
                _close_in_thread(u)  # wakes the accept/rendezvous thread blocked on it
        if self.relay is not None:
            self._backend._close_relay(self.relay)
        self._backend._listeners.discard(self)


class UdtBackend(Backend):
    """UDT for lossy long links; one instance per net."""

    name = "udt"
    uses_frame_sealing = False  # every UDT message is already sealed (udt_proto), hello included

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        self.tuning = tune(settings)
        if not settings.key:
            raise ConfigError("the udt backend encrypts with keys derived from the network key; set one", where=f"net {settings.net}.key")
        self._listeners: set[UdtListener] = set()
        self._transports: set[UdtTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handshakes = threading.Semaphore(MAX_PREAMBLES)  # accepted connections still in their preamble
        self._refusals = {"preambles_refused": 0, "accepts_paused": 0}  # by the accept threads (under the lock)
        self._refusals_lock = threading.Lock()
        self._watchdog: asyncio.Task[None] | None = None
        self._libudt_silence_reported = False
        self._relays: set[FecRelay] = set()
        self._fec_closed: dict[str, int] = {}  # counters of relays already closed
        self._packet_key = proto.packet_key(settings.key)

    @classmethod
    def probe(cls) -> str | None:
        """None: usable here (the binding loaded, which already ran UDT::startup)."""
        return None

    def _transport(self, u: int, peer: str, sealer: proto.Sealer, opener: proto.Opener, relay: FecRelay | None = None) -> UdtTransport:
        def on_close(t: UdtTransport) -> None:
            self._transports.discard(t)
            if relay is not None:  # after libudt's close, so its shutdown packet still reaches the peer
                task = asyncio.ensure_future(self._close_relay_after(t, relay))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        t = UdtTransport(u, peer, self.tuning, self.settings.max_message_size, sealer, opener, on_close)
        self._transports.add(t)
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch())
        return t

    async def _watch(self) -> None:
        """Once a second: connections whose peer went silent are ended (see check_alive), and
        dropped packets are logged."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            transports = list(self._transports)
            for t in transports:
                t.check_packets()
            if not transports:
                continue
            question = functools.partial(_control_states, [t._u for t in transports])
            if not _LIBUDT.submit(question, functools.partial(self._states_answered, loop, transports)):
                self._report_libudt_silence(_LIBUDT.silent_for())

    def _states_answered(self, loop: asyncio.AbstractEventLoop, transports: list[UdtTransport], ok: bool, states: Any) -> None:
        """In the asking thread: back to the loop with the control states."""
        try:
            loop.call_soon_threadsafe(self._check_alive, transports, states if ok else {})
        except RuntimeError:  # loop closed
            pass

    def _check_alive(self, transports: list[UdtTransport], states: dict[int, dict[str, Any] | None]) -> None:
        if self._libudt_silence_reported:
            self._libudt_silence_reported = False
            log.warning("libudt answers again; udt connections are watched and measured again")
        for t in transports:
            if t._u in states:
                t.check_alive(states[t._u])

    def _report_libudt_silence(self, seconds: float) -> None:
        if seconds >= LIBUDT_SILENT_REPORT_S and not self._libudt_silence_reported:
            self._libudt_silence_reported = True
            log.error("libudt has not answered a question for its figures: its global lock is held. udt connections "
                      "whose peer went silent are not ended and peer show has no fresh udt figures until it answers",
                      silent_s=round(seconds))

    def _hand_to_engine(self, u: int, peer: str, pair: tuple[proto.Sealer, proto.Opener], on_accept: AcceptCallback, listener: UdtListener) -> None:
        """On the loop: wrap an accepted, keyed connection and give it to the engine."""
        if listener.closed:
            _close_in_thread(u)
            return
        transport = self._transport(u, peer, *pair)
        task = asyncio.ensure_future(on_accept(transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _acceptor_handshake(self, u: int, peer: str, loop: asyncio.AbstractEventLoop, on_accept: AcceptCallback, listener: UdtListener) -> None:
        try:
            pair = _with_deadline(
                u, self.tuning.handshake_timeout,
                lambda: _exchange_preamble(u, self.tuning, False, self.settings.key, peer), f"UDT preamble from {peer}",
            )
        except Lu2kError:
            # Nobody to report to: the engine never saw this connection.  Just drop it.
            self._count("preambles_refused")
            _close_quietly(u)
            return
        finally:
            self._handshakes.release()
        try:
            loop.call_soon_threadsafe(self._hand_to_engine, u, peer, pair, on_accept, listener)
        except RuntimeError:
            _close_quietly(u)

    def _count(self, what: str) -> None:
        with self._refusals_lock:
            self._refusals[what] += 1

    def _accept_loop(self, listener: UdtListener, loop: asyncio.AbstractEventLoop, on_accept: AcceptCallback) -> None:
        assert listener._u is not None
        # A connection is taken from libudt only when a preamble slot is free, and at most
        # ACCEPT_RATE a second.  libudt keeps a closed socket, loss lists and all (~190 KB),
        # for a second or more, so a stranger completing handshakes as fast as it could
        # (taken and closed at once when no slot was free) made it hold hundreds of MB.  Left
        # in libudt's backlog, the surplus is refused by libudt before it makes a socket.
        pacer = AcceptPacer(ACCEPT_RATE, MAX_PREAMBLES, time.monotonic())
        while not listener.closed:
            delay = pacer.delay(time.monotonic())
            if delay > 0 or not self._handshakes.acquire(blocking=False):
                self._count("accepts_paused")
                threading.Event().wait(delay)
                while not self._handshakes.acquire(timeout=0.5):
                    if listener.closed:
                        return
            pacer.take(time.monotonic())
            try:
                u, (host, port) = _udtcore.accept(listener._u)
            except UDTError:
                self._handshakes.release()
                return  # listener closed
            if listener.relay is not None:  # libudt saw the relay's leg: name the peer behind it
                host, port = listener.relay.peer_of(host, port) or (host, port)
            threading.Thread(
                target=self._acceptor_handshake, args=(u, format_hostport(host, port), loop, on_accept, listener),
                name=f"udt-hs-{u}", daemon=True,
            ).start()

    def _rendezvous_loop(self, listener: UdtListener, host: str, port: int, peer: tuple[str, int],
                         loop: asyncio.AbstractEventLoop, on_accept: AcceptCallback) -> None:
        """Keep one rendezvous connection up towards ``peer``, acting as its acceptor."""
        peer_text = format_hostport(*peer)
        while not listener.closed:
            try:
                u = _new_socket(self.tuning, _family(host), self._packet_key)
            except UDTError:
                return
            listener.peer_sockets.add(u)
            try:
                _udtcore.setsockopt(u, "reuseaddr", 1)
                _udtcore.setsockopt(u, "rendezvous", 1)
                _udtcore.bind(u, host, port)
                _udtcore.connect(u, peer[0], peer[1])  # UDT gives up after its own rendezvous timeout
            except UDTError:
                listener.peer_sockets.discard(u)
                _close_quietly(u)
                threading.Event().wait(1.0)  # not there yet (or port busy): try again shortly
                continue
            listener.peer_sockets.discard(u)
            self._handshakes.acquire()
            self._acceptor_handshake(u, peer_text, loop, on_accept, listener)
            while not listener.closed and _udtcore.state(u) == _udtcore.CONNECTED:
                threading.Event().wait(0.5)  # one connection per peer at a time on this port pair

    async def listen(self, host: str, port: int, on_accept: AcceptCallback) -> Listener:
        loop = asyncio.get_running_loop()
        tuning = self.tuning
        if tuning.rendezvous:
            listener = UdtListener(self, None, (host, port))
            self._listeners.add(listener)
            for peer in tuning.rendezvous_peers:
                threading.Thread(target=self._rendezvous_loop, args=(listener, host, port, peer, loop, on_accept),
                                 name=f"udt-rdv-{peer[0]}:{peer[1]}", daemon=True).start()
            return listener

        # With fec, libudt listens on loopback and the relay takes the net's address and port.
        udt_bind = (loopback_for(_family(host)), 0) if tuning.fec.enabled else (host, port)

        def setup() -> tuple[int, tuple[str, int]]:
            # libudt keeps a closed listener's port for ~3 s (in case a client is mid-connect),
            # so a net restarted in-process retries for a while rather than failing at once.
            released = _released.get(udt_bind, -1e9)
            for attempt in range(LISTEN_RETRIES + 1):
                u = _new_socket(tuning, _family(host), self._packet_key)
                try:
                    _bind_guarded(u, tuning, _family(host), *udt_bind)
                    _udtcore.listen(u, LISTEN_BACKLOG)
                    return u, _udtcore.getsockname(u)
                except (UDTError, OSError) as e:
                    _close_quietly(u)
                    held = _udt_code(e) == _udtcore.E_DUPLISTEN or (
                        isinstance(e, OSError) and e.errno == errno.EADDRINUSE
                        and time.monotonic() - released < LISTEN_RETRIES * 0.25)
                    if not held or attempt == LISTEN_RETRIES:
                        raise
                except BaseException:
                    _close_quietly(u)
                    raise
                threading.Event().wait(0.25)
            raise AssertionError("unreachable")

        try:
            u, address = await _in_thread(loop, setup, name="udt-listen")
        except (UDTError, ValueError) as e:
            raise ConnectError(f"cannot listen on {format_hostport(host, port)} with UDT: {_udt_message(e)}") from None
        except OSError as e:
            raise ConnectError(f"cannot listen on {format_hostport(host, port)} with UDT: {e.strerror or e}") from None
        listener = UdtListener(self, u, address)
        if tuning.fec.enabled:
            try:
                listener.relay = self._open_relay(loop, (host, port), udt_address=address)
            except OSError as e:
                _close_in_thread(u)
                raise ConnectError(f"cannot listen on {format_hostport(host, port)} (udt fec relay): {e.strerror or e}") from None
            address = listener._address = listener.relay.address
        self._listeners.add(listener)
        threading.Thread(target=self._accept_loop, args=(listener, loop, on_accept), name=f"udt-accept-{address[1]}", daemon=True).start()
        return listener

    async def connect(self, host: str, port: int, conn_type: ConnType, timeout: float) -> Transport:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            addr = str(infos[0][4][0])
        except (OSError, IndexError) as e:
            raise ConnectError(f"cannot resolve {host!r}: {e}") from None
        if "%" in host:
            addr = host  # an IPv6 link-local address keeps its zone (getaddrinfo's text drops it)
        peer = format_hostport(host, port)
        tuning = self.tuning
        state: dict[str, int] = {}
        # Packets sized by the route's MTU where the kernel knows a lower one (an explicit
        # ``mss`` option is taken as given); libudt agrees the smaller of both ends' sizes.
        mtu = route_mtu(addr, port)
        if mtu is not None and tuning.fec.enabled:
            mtu -= FEC_OVERHEAD  # FEC frames (repairs the largest) must fit the route too
        wire_mss = udt_wire_mss(tuning.mss, _family(addr), mtu, configured="mss" in self.settings.options)
        relay: FecRelay | None = None
        target: tuple[str, int] = (addr, port)
        if tuning.fec.enabled:  # libudt dials the relay's leg for this peer; the relay the peer
            try:
                relay = self._open_relay(loop, (wildcard(_family(addr)), 0))
                target = relay.leg_for(infos[0][4])
            except OSError as e:
                if relay is not None:
                    self._close_relay(relay)
                raise ConnectError(f"UDT connect to {peer} failed: fec relay: {e.strerror or e}") from None

        def dial() -> tuple[proto.Sealer, proto.Opener]:
            u = _new_socket(tuning, _family(addr), self._packet_key, wire_mss)
            with _DIAL_LOCK:
                state["u"] = u
            try:
                if tuning.rendezvous:
                    _udtcore.setsockopt(u, "reuseaddr", 1)
                    _udtcore.setsockopt(u, "rendezvous", 1)
                    _udtcore.bind(u, wildcard(_family(addr)), tuning.rendezvous_port)
                else:
                    _bind_guarded(u, tuning, _family(addr), wildcard(_family(addr)), 0)
                _udtcore.connect(u, *target)
            except BaseException:
                # Failed (the loop closes the socket when it hears) or given up on meanwhile
                # (then the close is ours).
                if _connect_over(state):
                    _close_quietly(u)
                raise
            if _connect_over(state):
                _close_quietly(u)
                raise ConnectError(f"UDT connect to {peer} given up")  # nobody waits for it any more
            return _exchange_preamble(u, tuning, True, self.settings.key, peer)

        fut = _in_thread(loop, dial, name=f"udt-connect-{peer}")
        try:
            # The socket is known once the dial is over (not before: its thread sets it).
            sealer, opener = await self._dialled(fut, state, peer, timeout)
            return self._transport(state["u"], peer, sealer, opener, relay=relay)
        except BaseException:
            if relay is not None:
                self._close_relay(relay)
            raise

    async def _dialled(self, fut: "asyncio.Future[tuple[proto.Sealer, proto.Opener]]", state: dict[str, int], peer: str,
                       timeout: float) -> tuple[proto.Sealer, proto.Opener]:
        """The outcome of a dial thread, with every failure as a ConnectError (its socket closed)."""
        try:
            sealer, opener = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            self._abandon(fut, state)
            raise ConnectTimeout(f"UDT connect to {peer} timed out after {timeout:g}s") from None
        except UDTError as e:
            self._abandon(fut, state)
            # No answer at all also means a peer that drops our handshake as forged: one whose
            # net has another key (every UDT packet is authenticated with it).
            hint = " (nothing listening, a firewall, or a peer with another network key)" if _udt_code(e) == _udtcore.E_NOSERVER else ""
            raise ConnectError(f"UDT connect to {peer} failed: {_udt_message(e)}{hint}") from None
        except (Lu2kError, ValueError) as e:
            self._abandon(fut, state)
            if isinstance(e, ConnectError):
                raise
            raise ConnectError(f"UDT connect to {peer} failed: {e}") from None
        except OSError as e:  # lu2k's own UDP socket for libudt (udt_guard) could not be made
            self._abandon(fut, state)
            raise ConnectError(f"UDT connect to {peer} failed: {e.strerror or e}") from None
        except BaseException:
            self._abandon(fut, state)
            raise
        return sealer, opener

    def _open_relay(self, loop: asyncio.AbstractEventLoop, bind: tuple[str, int], udt_address: tuple[str, int] | None = None) -> FecRelay:
        relay = FecRelay.open(loop, bind, self.tuning.fec, udp_buffer=self.tuning.udp_buffer, udt_address=udt_address)
        self._relays.add(relay)
        return relay

    async def _close_relay_after(self, t: UdtTransport, relay: FecRelay) -> None:
        try:
            await t.wait_closed()
            await asyncio.sleep(RELAY_LINGER)
        finally:
            self._close_relay(relay)

    def _close_relay(self, relay: FecRelay) -> None:
        if relay in self._relays:
            self._relays.discard(relay)
            for k, v in relay.fec_stats().items():
                self._fec_closed[k] = self._fec_closed.get(k, 0) + v
            relay.close()

    @staticmethod
    def _abandon(fut: "asyncio.Future[Any]", state: dict[str, int]) -> None:
        """Give up on a connect.  Once libudt's connect call is over, closing the socket ends
        the preamble blocked on it; while the call runs (it gives up by itself, after 3 s, 30
        in rendezvous mode) the dial thread closes the socket when it returns: a close racing
        libudt's connect was where a daemon's udt was seen to lock up for good."""
        with _DIAL_LOCK:
            state["abandoned"] = 1
            close_now = "u" in state and "connect_over" in state
        if close_now:
            _close_in_thread(state["u"])
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # consume the late outcome

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for listener in list(self._listeners):
            listener.close()
        for task in list(self._tasks):
            task.cancel()
        transports = list(self._transports)
        self._transports.clear()
        for t in transports:
            t.close()
        for t in transports:
            await t.wait_closed()
        if self._relays:  # the FEC relays carry libudt's shutdown packets: let them out, then close
            await asyncio.sleep(RELAY_LINGER)
            for relay in list(self._relays):
                self._close_relay(relay)
            lingering = list(self._tasks)
            for task in lingering:
                task.cancel()
            await asyncio.gather(*lingering, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        out = self.tuning.describe()
        # Process-wide: also what reached no connection (forged handshakes to the listener, ...).
        totals = _udtcore.packet_auth_totals()
        out["packets_forged"], out["packets_replayed"] = totals["forged"], totals["replayed"]
        with self._refusals_lock:
            out.update(self._refusals)  # accepted UDT connections dropped before the engine saw them
        if self.tuning.fec.enabled:
            totals = dict(self._fec_closed)
            for relay in self._relays:
                for k, v in relay.fec_stats().items():
                    totals[k] = totals.get(k, 0) + v
            out.update({f"fec_{k}": v for k, v in sorted(totals.items())})
        return out
