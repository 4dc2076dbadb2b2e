"""The daemon side of the shim: the Unix control socket and one :class:`ShimPort` per endpoint.

This is the thin asyncio adapter around :mod:`.abi` and :mod:`.ring`; the engine plugs
in as a :class:`ShimHandler`.

Flow of one message out: the endpoint writes the payload into a TX slot, a SEND_DESC
into the submit ring and (if our ``NEED_WAKEUP`` bit is set) kicks our eventfd.  We take
descriptors while the port has fewer than ``max_in_flight`` requests outstanding, check
each (slot start, length, not already in flight -- a bad one is completed at once with
``Status.INVALID``), and hand the good ones to ``handler.on_submit`` as
:class:`SendRequest` whose ``payload`` is a view of the TX slot (zero copy).  The engine
calls :meth:`ShimPort.complete` exactly once per request; completions and deliveries
made during one event-loop iteration are published together, with at most one notify
per port.

Flow of one message in: the engine asks :meth:`ShimPort.rx_alloc` for an RX slot (the
backend receives straight into it), then :meth:`ShimPort.deliver`.  When the RX pool is
exhausted the engine waits in :meth:`ShimPort.rx_wait`: the endpoint's releases are what
make room, so a slow reader back-pressures its senders instead of growing memory.

Misbehaviour is contained per port: a bad control packet gets an errno reply, a bad
descriptor an INVALID completion or an error event, corrupt ring indices or a full
completion backlog disconnect that endpoint only.  Each ATTACH gets a fresh memfd sealed
against shrinking (an endpoint cannot make our loads fault) and nothing from an old
region is reused.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import logging
import mmap
import os
import socket
import struct
from array import array
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import ConfigError, LocalProtocolError, Lu2kError, RemoteProtocolError, ShimError, Status
from ..nid import NID_SIZE
from . import abi
from .access import AccessPolicy, PeerCred, RateLimitedLog, bind_private_socket, peer_credentials, prepare_socket_dir
from .ring import RingConsumer, RingProducer, SlotPool, full_fence

log = logging.getLogger("lu2k.shim")

_HARD_MAX_POOL = 4 << 30  # offsets are u64 but keep one endpoint from asking for the moon


class ShimConfig:
    """Tunables of the shim server (``lu2k: shim:`` in the daemon config).

    Keys: ``max_in_flight`` (requests per port handed to the engine and not yet
    completed), ``max_message_size``, ``tx_pool_bytes``/``rx_pool_bytes`` (defaults when
    an endpoint asks for 0), ``max_pool_bytes`` (largest pool an endpoint may ask for),
    ``max_ports``, ``batch`` (descriptors taken per port per loop iteration),
    ``socket_mode`` (permissions of the socket file), ``idle_poll_us``/``idle_polls``
    (after activity, poll a port's rings this often, this many times, before asking for
    kicks again; 0 disables polling).
    """

    KEYS = ("max_in_flight", "max_message_size", "tx_pool_bytes", "rx_pool_bytes", "max_pool_bytes",
            "max_ports", "batch", "socket_mode", "idle_poll_us", "idle_polls")

    def __init__(self, max_in_flight: int = 1024, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.KEYS))
        if unknown:
            raise ConfigError(f"unknown shim option(s) {', '.join(unknown)} (known: {', '.join(self.KEYS)})", where="lu2k.shim")
        self.max_in_flight = self._int("max_in_flight", max_in_flight, 1, 1 << 20)
        self.max_message_size = self._int("max_message_size", options.get("max_message_size", abi.DEFAULT_MAX_MESSAGE), 0, 64 << 20)
        self.max_pool_bytes = self._int("max_pool_bytes", options.get("max_pool_bytes", 1 << 30), abi.MIN_POOL_BYTES, _HARD_MAX_POOL)
        self.tx_pool_bytes = self._int("tx_pool_bytes", options.get("tx_pool_bytes", 64 << 20), abi.MIN_POOL_BYTES, self.max_pool_bytes)
        self.rx_pool_bytes = self._int("rx_pool_bytes", options.get("rx_pool_bytes", 64 << 20), abi.MIN_POOL_BYTES, self.max_pool_bytes)
        self.max_ports = self._int("max_ports", options.get("max_ports", 256), 1, 1 << 16)
        self.batch = self._int("batch", options.get("batch", 256), 1, 1 << 16)
        self.socket_mode = self._int("socket_mode", options.get("socket_mode", 0o600), 0, 0o777)
        self.idle_poll_us = self._int("idle_poll_us", options.get("idle_poll_us", 200), 0, 1_000_000)
        self.idle_polls = self._int("idle_polls", options.get("idle_polls", 4), 0, 1_000_000)

    @staticmethod
    def _int(key: str, value: Any, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, got {value!r}", where=f"lu2k.shim.{key}")
        if not lo <= value <= hi:
            raise ConfigError(f"{value} outside {lo}..{hi}", where=f"lu2k.shim.{key}")
        return value

    def __repr__(self) -> str:
        return "ShimConfig(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.KEYS) + ")"


@dataclass(slots=True, eq=False)
class SendRequest:
    """One message an endpoint handed over; complete it exactly once with ShimPort.complete."""

    cookie: int
    dst_nid: bytes  # 20 bytes, packed; NOT validated -- the engine parses it
    dst_portal: int
    payload: memoryview  # the TX slot in shared memory (zero copy)
    offset: int  # region offset of the TX slot
    port: "ShimPort | None" = field(default=None, repr=False)
    done: bool = False


@dataclass(slots=True, eq=False)
class RxBuffer:
    """An RX slot taken for one incoming message; ``view`` is exactly the requested size."""

    offset: int
    capacity: int
    view: memoryview
    port: "ShimPort | None" = field(default=None, repr=False)
    state: int = 0  # 0 allocated, 1 delivered, 2 aborted


class ShimHandler(Protocol):
    """What the engine implements."""

    def on_attach(self, port: "ShimPort") -> None: ...  # may raise ShimError(errno, msg) to refuse

    def on_submit(self, port: "ShimPort", reqs: list[SendRequest]) -> None: ...  # completes each exactly once

    def on_detach(self, port: "ShimPort") -> None: ...

    def on_rx_space(self, port: "ShimPort") -> None: ...

    def local_nid(self) -> bytes: ...


_STATE_ALLOCATED, _STATE_DELIVERED, _STATE_ABORTED = 0, 1, 2
_EMPTY_REASON = b""


class ShimPort:
    """One attached endpoint: its region, rings, pools and counters."""

    def __init__(self, server: "ShimServer", conn: "_Connection", portal: int, layout: abi.Layout,
                 mm: mmap.mmap, kick_fd: int, notify_fd: int) -> None:
        self.server = server
        self.portal = portal
        self.pid, self.uid, self.gid = conn.pid, conn.uid, conn.gid
        self.layout = layout
        self.max_message_size = layout.max_message_size
        self.max_in_flight = server.config.max_in_flight
        self.attached = True
        self._conn = conn
        self._mm = mm
        self._mem = memoryview(mm)
        self._kick_fd = kick_fd
        self._notify_fd = notify_fd
        rings = layout.rings
        self._submit = RingConsumer(self._mem, rings[abi.RING_SUBMIT], abi.SEND_DESC, "submit")
        self._complete = RingProducer(self._mem, rings[abi.RING_COMPLETE], abi.COMPLETION, "complete", reset=True)
        self._deliver = RingProducer(self._mem, rings[abi.RING_DELIVER], abi.RX_DESC, "deliver", reset=True)
        self._release = RingConsumer(self._mem, rings[abi.RING_RELEASE], abi.RELEASE_DESC, "release")
        self._flags = self._mem[abi.HDR_DAEMON_FLAGS : abi.HDR_DAEMON_FLAGS + 4].cast("I")
        self._ep_flags = self._mem[abi.HDR_ENDPOINT_FLAGS : abi.HDR_ENDPOINT_FLAGS + 4].cast("I")
        self._tx = SlotPool(layout.tx)  # only for lookup(): the endpoint allocates TX slots
        self._tx_in_flight: set[int] = set()
        self._rx = SlotPool(layout.rx)
        self._rx_delivered: set[int] = set()
        self._backlog: collections.deque[tuple[int, int, int, bytes]] = collections.deque()
        self._rx_waiters: list[asyncio.Future[None]] = []
        self._service_scheduled = False
        self._flush_scheduled = False
        self._stalled = False
        self.in_flight = 0
        self.counters = dict.fromkeys(abi.STATS_FIELDS, 0)
        self.detach_reason = ""
        self._failing = ""  # set when a disconnect is scheduled; the views stay valid until then
        self._idle = 0
        self._poll_handle: asyncio.TimerHandle | None = None

    # -- engine-facing -------------------------------------------------------------------------

    @property
    def region(self) -> mmap.mmap:
        """The endpoint's whole shared region (for backends that register it for zero-copy DMA)."""
        return self._mm

    def complete(self, req: SendRequest, status: Status, reason: str = "") -> None:
        """Finish ``req`` (exactly once); its TX slot becomes free for the endpoint."""
        if req.done:
            raise LocalProtocolError(f"request cookie {req.cookie} on portal {self.portal} completed twice")
        if req.port is not self:
            raise LocalProtocolError(f"request cookie {req.cookie} does not belong to portal {self.portal}")
        req.done = True
        self._tx_in_flight.discard(req.offset)
        self.in_flight -= 1
        c = self.counters
        c["completed"] += 1
        if status:
            c["failed"] += 1
        else:
            c["tx_bytes"] += len(req.payload)
        if not self.attached:
            return
        try:
            if not status and not self._backlog and self._complete.put(req.cookie, 0, 0, _EMPTY_REASON):
                if not self._flush_scheduled:  # the common case, inlined
                    self._schedule_flush()
            else:
                self._post_completion(req.cookie, int(status), 0, abi.encode_reason(reason, abi.COMP_REASON_LEN) if reason else _EMPTY_REASON)
        except abi.RegionError as e:  # this endpoint corrupted its ring: detach it, never fail the caller
            self.server._disconnect(self, e.reason)
            return
        if self._stalled and self.in_flight < self.max_in_flight:
            self._stalled = False
            self._schedule_service()

    def rx_alloc(self, size: int) -> RxBuffer | None:
        """An RX slot for ``size`` bytes, or None if none is free now (or size > max)."""
        if not self.attached or size > self.max_message_size or size < 0:
            return None
        got = self._rx.alloc(size)
        if got is None:
            self.counters["rx_full"] += 1
            return None
        offset, cap = got
        return RxBuffer(offset, cap, self._mem[offset : offset + size], self)

    async def rx_wait(self) -> None:
        """Return when RX space may have been released; ShimError(ENOTCONN) once detached."""
        if not self.attached:
            raise ShimError(errno.ENOTCONN, f"shim port on portal {self.portal} is detached")
        fut = asyncio.get_running_loop().create_future()
        self._rx_waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._rx_waiters:
                self._rx_waiters.remove(fut)
        if not self.attached:
            raise ShimError(errno.ENOTCONN, f"shim port on portal {self.portal} detached while waiting for RX space")

    def deliver(self, buf: RxBuffer, src_nid: bytes, src_portal: int, length: int) -> None:
        """Hand ``buf``'s first ``length`` bytes to the endpoint as a message from ``src_nid``."""
        if buf.port is not self or buf.state != _STATE_ALLOCATED:
            raise LocalProtocolError(f"RX buffer at offset {buf.offset} is not an allocated buffer of portal {self.portal}")
        if not 0 <= length <= len(buf.view):
            raise LocalProtocolError(f"deliver length {length} exceeds the {len(buf.view)}-byte RX buffer")
        if type(src_nid) is not bytes:
            src_nid = bytes(src_nid)
        if len(src_nid) != NID_SIZE:
            raise LocalProtocolError(f"source NID must be {NID_SIZE} packed bytes, got {len(src_nid)}")
        if not self.attached:
            raise ShimError(errno.ENOTCONN, f"shim port on portal {self.portal} is detached")
        # Cannot be full: the deliver ring has an entry for every RX slot.
        try:
            ok = self._deliver.put(buf.offset, length, src_portal, self.portal, src_nid, 0, 0)
        except abi.RegionError as e:  # the receiver corrupted its ring: it is detached, like one that left
            self.server._disconnect(self, e.reason)
            raise ShimError(errno.ENOTCONN, f"shim port on portal {self.portal} is being detached: {e.reason}") from None
        if not ok:
            raise LocalProtocolError("deliver ring full (ring smaller than the RX pool?)")
        buf.state = _STATE_DELIVERED
        self._rx_delivered.add(buf.offset)
        c = self.counters
        c["delivered"] += 1
        c["rx_bytes"] += length
        if not self._flush_scheduled:
            self._schedule_flush()
        # Releases will follow: poll for them instead of having the reader kick us for each.
        if self._poll_handle is None:
            self._start_polling()
        else:
            self._idle = 0

    def rx_abort(self, buf: RxBuffer) -> None:
        """Give back an RX buffer that will not be delivered."""
        if buf.port is not self or buf.state != _STATE_ALLOCATED:
            raise LocalProtocolError(f"RX buffer at offset {buf.offset} cannot be aborted (state {buf.state})")
        buf.state = _STATE_ABORTED
        buf.view.release()
        if self._rx.is_allocated(buf.offset):
            self._rx.free(buf.offset)
            self._wake_rx_waiters()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"portal": self.portal, "pid": self.pid, "uid": self.uid, "attached": self.attached}
        out.update(self.counters)
        out["in_flight"] = self.in_flight
        out["rx_buffers_in_use"] = self._rx.in_use
        out["rx_buffers"] = self._rx.total
        out["tx_buffers"] = self._tx.total
        out["max_message_size"] = self.max_message_size
        if self.detach_reason:
            out["detach_reason"] = self.detach_reason
        return out

    # -- ring service ------------------------------------------------------------------------

    def _post_completion(self, cookie: int, status: int, flags: int, reason: bytes) -> None:
        if self._backlog or not self._complete.put(cookie, status, flags, reason):
            if self._failing:
                return
            self._backlog.append((cookie, status, flags, reason))
            if len(self._backlog) > self._complete.entries:
                self.server._disconnect(self, "endpoint does not consume its completion ring")
                return
        self._schedule_flush()

    def _post_event(self, status: Status, reason: str) -> None:
        self.counters["events"] += 1
        self._post_completion(0, int(status), abi.COMP_EVENT, abi.encode_reason(reason, abi.COMP_REASON_LEN))

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.server._loop.call_soon(self._flush)

    def _schedule_service(self) -> None:
        if not self._service_scheduled and self.attached:
            self._service_scheduled = True
            self.server._loop.call_soon(self._service)

    def _flush(self) -> None:
        """Publish what this iteration produced and notify the endpoint once, if it sleeps."""
        self._flush_scheduled = False
        if not self.attached:
            return
        try:
            if self._backlog:
                self._drain_backlog()
            published = self._complete.publish()
            published = self._deliver.publish() or published
        except RemoteProtocolError as e:
            self.server._disconnect(self, str(e))
            return
        if published:
            full_fence()
            if self._ep_flags[0] & abi.FLAG_NEED_WAKEUP:
                self.counters["notifies_out"] += 1
                try:
                    os.eventfd_write(self._notify_fd, 1)
                except BlockingIOError:
                    pass  # counter saturated: the endpoint is certainly going to look

    def _drain_backlog(self) -> None:
        while self._backlog:
            if not self._complete.put(*self._backlog[0]):
                break
            self._backlog.popleft()

    def _on_kick(self) -> None:
        self.counters["kicks_in"] += 1
        try:
            os.eventfd_read(self._kick_fd)
        except BlockingIOError:
            pass
        self._service()

    def _service(self) -> None:
        """Consume releases and submissions; re-arm the wake-up bits once the endpoint goes quiet.

        After a pass that found work we keep polling for ``idle_polls`` passes,
        ``idle_poll_us`` apart, with the wake-up bits clear (io_uring's SQPOLL idle time):
        an endpoint streaming messages then never pays for a kick, and the added latency
        is a fraction of a millisecond -- nothing against a satellite round trip.
        """
        self._service_scheduled = False
        if not self.attached or self._failing:
            return
        flags = self._flags
        flags[0] = 0  # we are awake: no kicks needed until we re-arm
        try:
            freed = self._drain_release()
            taken, more = self._drain_submit()
            if self._backlog:
                self._drain_backlog()
                self._schedule_flush()
            if freed:
                self._wake_rx_waiters()
                self._call_handler("on_rx_space")
            if not self.attached or self._failing:
                return
            if more:
                self._schedule_service()  # yield to other ports and the network, then continue
                return
            cfg = self.server.config
            self._idle = 0 if (freed or taken) else self._idle + 1
            if cfg.idle_poll_us and self._idle <= cfg.idle_polls:
                if self._poll_handle is None:
                    self._poll_handle = self.server._loop.call_later(cfg.idle_poll_us / 1e6, self._poll_fire)
                return
            # Re-arm: set the bits, fence, look again (the endpoint fences between publish and flag load).
            flags[0] = abi.FLAG_NEED_WAKEUP_RELEASE | (0 if self._stalled else abi.FLAG_NEED_WAKEUP)
            full_fence()
            if self._release.available() or (not self._stalled and self._submit.available()):
                self._schedule_service()
        except RemoteProtocolError as e:
            self.server._disconnect(self, str(e))

    def _start_polling(self) -> None:
        """Clear the wake-up bits and make sure a poll is scheduled (the invariant: bits clear
        => a service pass is coming)."""
        self._idle = 0
        cfg = self.server.config
        if not cfg.idle_poll_us or self._failing:
            return
        if self._poll_handle is None:
            self._poll_handle = self.server._loop.call_later(cfg.idle_poll_us / 1e6, self._poll_fire)
        self._flags[0] = 0

    def _poll_fire(self) -> None:
        self._poll_handle = None
        self.counters["polls"] = self.counters.get("polls", 0) + 1
        self._service()

    def _drain_release(self) -> int:
        descs = self._release.take(self._release.entries)
        if not descs:
            return 0
        self._release.commit()
        freed = 0
        delivered, rx = self._rx_delivered, self._rx
        for (offset,) in descs:
            if offset in delivered:
                delivered.discard(offset)
                rx.free(offset)
                freed += 1
            else:
                self.counters["bad_releases"] += 1
                what = "double release" if rx.lookup(offset) is not None else "release of an offset outside the RX slots"
                self._post_event(Status.INVALID, f"{what}: RX offset {offset}")
        self.counters["released"] += freed
        return freed

    def _drain_submit(self) -> tuple[int, bool]:
        """Hand up to ``batch`` submissions to the engine; ``(taken, more_waiting)``."""
        budget = min(self.server.config.batch, self.max_in_flight - self.in_flight)
        if budget <= 0:
            if self._submit.available() and not self._stalled:
                self._stalled = True
                self.counters["stalls"] += 1
            return 0, False
        descs = self._submit.take(budget)
        if not descs:
            return 0, False
        self._submit.commit()  # fields are copied out; the payload stays in its TX slot
        reqs: list[SendRequest] = []
        lookup, in_flight, mem, max_size = self._tx.lookup, self._tx_in_flight, self._mem, self.max_message_size
        for cookie, offset, length, dst_portal, dst_nid, flags in descs:
            cap = lookup(offset)
            if cap is None or length > cap or length > max_size or flags:  # the checks below say which field is wrong
                try:
                    self._tx.check_span(offset, length, max_size, "TX")
                    abi.check_send_flags(flags)
                except abi.DescriptorError as e:
                    self._invalid(cookie, e.reason)
                    continue
            if offset in in_flight:
                self._invalid(cookie, f"TX slot {offset} already in flight")
            else:
                in_flight.add(offset)
                reqs.append(SendRequest(cookie, dst_nid, dst_portal, mem[offset : offset + length], offset, self))
        c = self.counters
        c["submitted"] += len(descs)
        if reqs:
            self.in_flight += len(reqs)
            try:
                self.server.handler.on_submit(self, reqs)
            except Exception as e:  # the engine broke its contract; keep exactly-once anyway
                log.exception("on_submit failed on portal %d", self.portal)
                for r in reqs:
                    if not r.done:
                        self.complete(r, Status.PROTOCOL, f"daemon error: {e}")
        if self.in_flight >= self.max_in_flight and self._submit.available():
            self._stalled = True
            c["stalls"] += 1
            return len(descs), False
        return len(descs), self._submit.available() > 0

    def _invalid(self, cookie: int, reason: str) -> None:
        self.counters["invalid"] += 1
        self.counters["completed"] += 1
        self.counters["failed"] += 1
        self._post_completion(cookie, int(Status.INVALID), 0, abi.encode_reason(reason, abi.COMP_REASON_LEN))

    def _wake_rx_waiters(self) -> None:
        waiters, self._rx_waiters = self._rx_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _call_handler(self, name: str) -> None:
        try:
            getattr(self.server.handler, name)(self)
        except Exception:
            log.exception("shim handler %s failed on portal %d", name, self.portal)

    # -- teardown ------------------------------------------------------------------------

    def _close(self, reason: str) -> None:
        """Detach: stop serving, tell the engine, drop our views of the region."""
        if not self.attached:
            return
        self.attached = False
        self.detach_reason = reason
        loop = self.server._loop
        loop.remove_reader(self._kick_fd)
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        if self.server.ports.get(self.portal) is self:
            del self.server.ports[self.portal]
        self._wake_rx_waiters()
        self._call_handler("on_detach")
        self._backlog.clear()
        for fd in (self._kick_fd, self._notify_fd):
            os.close(fd)
        for ring in (self._submit, self._complete, self._deliver, self._release):
            ring.release()
        self._flags.release()
        self._ep_flags.release()
        self._mem.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # the engine still holds payload views; the mapping goes when they do

    def counters_struct(self) -> bytes:
        c = dict(self.counters, in_flight=self.in_flight)
        return abi.STATS.pack(*(c[k] for k in abi.STATS_FIELDS))


class _Connection:
    """One client of the control socket (at most one port attached through it)."""

    def __init__(self, server: "ShimServer", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer_credentials(sock)  # kernel-verified (SO_PEERCRED, SO_PEERGROUPS)
        self.pid, self.uid, self.gid = self.peer.pid, self.peer.uid, self.peer.gid
        self.port: ShimPort | None = None
        self.closed = False

    def on_readable(self) -> None:
        for _ in range(64):  # bounded per iteration; level-triggered reader brings us back
            try:
                packet = self.sock.recv(abi.MAX_CTL_PACKET + 1)
            except BlockingIOError:
                return
            except OSError as e:
                self.close(f"control socket error: {e}")
                return
            if not packet:  # EOF (a zero-length packet reads the same; it ends the session too)
                self.close("endpoint closed the control socket")
                return
            self.handle(packet)
            if self.closed:
                return

    def handle(self, packet: bytes) -> None:
        raw_cmd, raw_seq = abi.CTL_HDR.unpack_from(packet) if len(packet) >= abi.CTL_HDR.size else (0, 0)
        try:
            if len(packet) > abi.MAX_CTL_PACKET:
                raise ShimError(errno.EINVAL, f"control packet of more than {abi.MAX_CTL_PACKET} bytes")
            cmd, seq, arg = abi.decode_request(packet)
            if cmd == abi.CMD_ATTACH:
                self.attach(seq, arg)
                return
            if cmd == abi.CMD_INFO:
                self.reply(cmd, seq, arg=self.info())
                return
            port = self.port
            if port is None:
                raise ShimError(errno.ENOTCONN, f"{abi.COMMANDS[cmd]} needs an attached port")
            if cmd == abi.CMD_DETACH:
                self.server._detach(port, "endpoint detached")
                self.port = None
                self.reply(cmd, seq)
            elif cmd == abi.CMD_STATS:
                self.reply(cmd, seq, arg=port.counters_struct())
        except ShimError as e:
            self.server.counters["rejected"] += 1
            self.reply(raw_cmd, raw_seq, e.code, str(e))
        except Exception as e:  # a daemon bug must not take the event loop or other endpoints down
            log.exception("shim command 0x%08x failed", raw_cmd)
            self.server.counters["rejected"] += 1
            self.reply(raw_cmd, raw_seq, errno.EIO, f"daemon error: {e}")

    def info(self) -> bytes:
        port = self.port
        cfg = self.server.config
        return abi.INFO.pack(abi.ABI_VERSION, port.portal if port else 0, os.getpid(), len(self.server.ports),
                             self.server.local_nid(), cfg.max_message_size, cfg.max_in_flight)

    def attach(self, seq: int, arg: bytes) -> None:
        server, cfg = self.server, self.server.config
        in_raw = arg[: abi.ATTACH_IN.size]
        version, portal, flags, _res, tx_bytes, rx_bytes = abi.ATTACH_IN.unpack(in_raw)
        if version != abi.ABI_VERSION:
            raise ShimError(errno.EPROTO, f"endpoint speaks shim ABI {version}, daemon speaks {abi.ABI_VERSION}")
        if flags:
            raise ShimError(errno.EINVAL, f"unknown ATTACH flags 0x{flags:x}")
        if self.port is not None:
            raise ShimError(errno.EISCONN, f"this connection is already attached on portal {self.port.portal}")
        refused = server.access.check_bind(self.peer, portal)
        if refused is not None:
            server._refused(self.peer, f"ATTACH portal {portal}", refused)
            raise ShimError(errno.EACCES, refused)
        other = server.ports.get(portal)
        if other is not None:
            raise ShimError(errno.EADDRINUSE, f"portal {portal} is bound by pid {other.pid}")
        if len(server.ports) >= cfg.max_ports:
            raise ShimError(errno.EMFILE, f"daemon already has {cfg.max_ports} endpoints attached")
        for name, value in (("tx_pool_bytes", tx_bytes), ("rx_pool_bytes", rx_bytes)):
            if value > cfg.max_pool_bytes:
                raise ShimError(errno.EINVAL, f"{name} {value} exceeds the daemon's max_pool_bytes {cfg.max_pool_bytes}")
        tx_bytes = max(tx_bytes or cfg.tx_pool_bytes, abi.MIN_POOL_BYTES)
        rx_bytes = max(rx_bytes or cfg.rx_pool_bytes, abi.MIN_POOL_BYTES)
        layout = abi.build_layout(cfg.max_message_size, tx_bytes, rx_bytes, cfg.max_in_flight)
        local_nid = server.local_nid()
        fds: list[int] = []
        mm = None
        try:
            memfd = os.memfd_create(f"lu2k-shim-{portal}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            fds.append(memfd)
            os.ftruncate(memfd, layout.region_size)
            # Sealed: the endpoint cannot shrink the file under our mapping (SIGBUS in the daemon).
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mm = mmap.mmap(memfd, layout.region_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            header = abi.pack_region_header(layout)
            mm[: len(header)] = header
            struct.pack_into("<I", mm, abi.HDR_ENDPOINT_FLAGS, abi.FLAG_NEED_WAKEUP)
            # Armed before the endpoint can see the region, so its first post kicks us.
            struct.pack_into("<I", mm, abi.HDR_DAEMON_FLAGS, abi.FLAG_NEED_WAKEUP | abi.FLAG_NEED_WAKEUP_RELEASE)
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fds.append(kick)
            notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fds.append(notify)
        except OSError as e:
            for fd in fds:
                os.close(fd)
            if mm is not None:
                mm.close()
            raise ShimError(e.errno or errno.ENOMEM, f"cannot set up the shared region: {e.strerror}") from None
        port = ShimPort(server, self, portal, layout, mm, kick, notify)
        try:
            server.handler.on_attach(port)
        except Exception as e:
            port.attached = False  # never served; tear down without calling on_detach
            os.close(memfd)
            for fd in (kick, notify):
                os.close(fd)
            for ring in (port._submit, port._complete, port._deliver, port._release):
                ring.release()
            port._flags.release()
            port._ep_flags.release()
            port._mem.release()
            mm.close()
            if isinstance(e, ShimError):
                raise
            log.exception("on_attach failed")
            raise ShimError(errno.EIO, f"daemon refused the endpoint: {e}") from None
        server.ports[portal] = port
        self.port = port
        server._loop.add_reader(kick, port._on_kick)
        reply_arg = abi.ATTACH.pack(in_raw, local_nid, cfg.max_in_flight, layout.pack())
        ok = self.reply(abi.CMD_ATTACH, seq, arg=reply_arg, fds=[memfd, kick, notify])
        os.close(memfd)  # the mapping keeps the memory; the endpoint has its own descriptor
        if ok:
            log.debug("attached portal %d pid %d uid %d region %d bytes", portal, self.pid, self.uid, layout.region_size)

    def reply(self, cmd: int, seq: int, error: int = 0, reason: str = "", arg: bytes = b"", fds: list[int] | None = None) -> bool:
        packet = abi.encode_reply(cmd, seq, error, reason, arg)
        try:
            if fds:
                self.sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds).tobytes())])
            else:
                self.sock.send(packet)
            return True
        except OSError as e:  # includes BlockingIOError: a client that does not read its replies
            self.close(f"cannot send control reply: {e}")
            return False

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self.port is not None:
            self.server._detach(self.port, reason)
            self.port = None
        self.server._forget(self)


class ShimServer:
    """Listens on the shim socket and serves one ShimPort per attached endpoint."""

    def __init__(self, path: str, handler: ShimHandler, *, config: ShimConfig | None = None,
                 access: AccessPolicy | None = None) -> None:
        self.path = path
        self.handler = handler
        self.config = config or ShimConfig()
        self.access = access or AccessPolicy()
        self.refusal_log = RateLimitedLog(log)
        self._accept_backoff = 0.0  # seconds; > 0 while accept() is paused after running out of descriptors
        self.ports: dict[int, ShimPort] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self._conns: set[_Connection] = set()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._inode: tuple[int, int] | None = None

    def local_nid(self) -> bytes:
        nid = bytes(self.handler.local_nid())
        if len(nid) != NID_SIZE:
            raise LocalProtocolError(f"handler.local_nid() must return {NID_SIZE} packed bytes, got {len(nid)}")
        return nid

    async def start(self) -> None:
        """Bind the socket (replacing our own stale one, refusing a live or foreign one) and start accepting.

        The directory is created or checked by :func:`.access.prepare_socket_dir`: ours,
        not a symlink, not writable by other users.
        """
        self._loop = asyncio.get_running_loop()
        acc = self.access
        mode = acc.socket_mode if acc.socket_group is not None or self.config.socket_mode == 0o600 else self.config.socket_mode
        if mode & 0o007:
            raise ShimError(errno.EPERM, f"socket_mode {mode:04o} would open the shim socket to every local user; "
                                         "use lu2k.shim.access.socket_group with mode 0660")
        prepare_socket_dir(os.path.dirname(os.path.abspath(self.path)), mode=acc.dir_mode, group=acc.socket_group)
        sock = bind_private_socket(self.path, socket.SOCK_SEQPACKET, mode=mode, group=acc.socket_group)
        try:
            sock.listen(64)
        except OSError as e:
            sock.close()
            raise ShimError(e.errno or errno.EIO, f"cannot listen on shim socket {self.path}: {e.strerror}") from None
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_accept)

    # accept() errors that mean "out of a resource", not "this client was bad": stop asking
    # for a while instead of spinning on a listener that stays readable.
    _ACCEPT_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
    ACCEPT_BACKOFF_MIN = 0.05
    ACCEPT_BACKOFF_MAX = 2.0

    def _on_accept(self) -> None:
        assert self._sock is not None
        for _ in range(64):
            try:
                csock, _addr = self._sock.accept()
            except BlockingIOError:
                self._accept_backoff = 0.0
                return
            except OSError as e:
                self.counters["accept_errors"] += 1
                if e.errno in self._ACCEPT_EXHAUSTED:
                    self._pause_accept(e)
                else:
                    self.refusal_log.warning("accept", "shim accept failed: %s", e)
                return
            self._accept_backoff = 0.0
            csock.setblocking(False)
            conn = _Connection(self, csock)
            refused = self.access.check_attach(conn.peer)
            if refused is not None:
                self._refused(conn.peer, "connect", refused)
                try:  # drop what it sent already: closing with unread data would reset it before it reads why
                    for _ in range(4):
                        csock.recv(abi.MAX_CTL_PACKET)
                except OSError:
                    pass
                conn.reply(0, 0, errno.EACCES, refused)  # best effort: the client reads why, then EOF
                csock.close()
                continue
            self._conns.add(conn)
            self._loop.add_reader(csock.fileno(), conn.on_readable)

    def _pause_accept(self, e: OSError) -> None:
        """Out of descriptors: stop accepting, retry after an exponentially growing pause."""
        assert self._sock is not None
        delay = min(self.ACCEPT_BACKOFF_MAX, max(self.ACCEPT_BACKOFF_MIN, self._accept_backoff * 2))
        self._accept_backoff = delay
        self.counters["accept_paused"] += 1
        self.refusal_log.warning("accept-exhausted", "shim accept failed (%s); pausing accept for %.2f s", e.strerror, delay)
        self._loop.remove_reader(self._sock.fileno())
        self._loop.call_later(delay, self._resume_accept)

    def _resume_accept(self) -> None:
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_accept)

    def _refused(self, peer: PeerCred, what: str, reason: str) -> None:
        self.counters["refused"] += 1
        self.refusal_log.warning(("refused", peer.uid), "shim %s refused for uid %d pid %d: %s", what, peer.uid, peer.pid, reason)

    def _forget(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        try:
            self._loop.remove_reader(conn.sock.fileno())
        except ValueError:
            pass
        conn.sock.close()

    def _detach(self, port: ShimPort, reason: str) -> None:
        port._close(reason)

    def _disconnect(self, port: ShimPort, reason: str) -> None:
        """An endpoint broke the ABI: tell it why (best effort), then drop its connection.

        Deferred to the next loop iteration so a ring walk in progress never touches
        released views; the port stops producing for the endpoint at once.
        """
        if not port.attached or port._failing:
            return
        port._failing = reason
        self._loop.call_soon(self._do_disconnect, port, reason)

    def _do_disconnect(self, port: ShimPort, reason: str) -> None:
        if not port.attached:
            return
        log.warning("disconnecting endpoint on portal %d (pid %d): %s", port.portal, port.pid, reason)
        self.counters["disconnected"] += 1
        try:
            port._backlog.clear()
            if port._complete.refresh() > 0:
                port._complete.put(0, int(Status.PROTOCOL), abi.COMP_EVENT, abi.encode_reason(reason, abi.COMP_REASON_LEN))
                port._complete.publish()
                os.eventfd_write(port._notify_fd, 1)
        except (Lu2kError, OSError):
            pass
        port._conn.close(reason)

    async def close(self) -> None:
        """Stop accepting and detach every endpoint (they see EOF and fail what is pending)."""
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass
        for conn in list(self._conns):
            conn.close("daemon shutting down")

    def stats(self) -> dict[str, Any]:
        return {"path": self.path, "endpoints": len(self.ports), "connections": len(self._conns), **self.counters}

