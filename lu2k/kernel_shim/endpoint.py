"""The application side of the shim: :class:`Endpoint` (blocking, ``fileno()``) and :class:`AsyncEndpoint`.

This is what lu2klnd's kernel half did for LNet, in user space: it owns a region shared
with the daemon (see :mod:`.abi` for the layout and ordering contract), allocates TX slots,
posts send descriptors, turns completions into :class:`Completion` objects, hands out
received messages as views of RX slots until they are released, and keeps per-peer
counts (the kernel half's peer and message tracking).

Both front ends share :class:`_Core`, which never blocks.  Waiting is done on one
``epoll`` descriptor (:meth:`Endpoint.fileno`) that covers the daemon's notify eventfd and
the control socket, so ``select()``/``poll()`` users and asyncio (``add_reader``) see
both new completions/messages and the daemon going away.  Wake-ups follow the
need-wakeup handshake: while the endpoint finds work it clears its ``NEED_WAKEUP`` bit
(the daemon then publishes without notifying); before anything sleeps it re-arms
(:meth:`_Core.arm`: set, fence, re-check).  It kicks the daemon only when the daemon's
flag word asks for it (after a full fence), so a busy daemon costs the sender no
syscalls.  For ``select()`` users: call :meth:`Endpoint.poll` (or ``recv(timeout=0)``
until it returns None) before selecting on ``fileno()`` -- like draining a non-blocking
socket -- because events already taken into the endpoint's queues do not make the
descriptor readable.

Back-pressure: a message needs a TX slot until its completion has been consumed; when
the pool is exhausted :meth:`Endpoint.send` waits for completions (or raises
``ShimError(EAGAIN)`` with ``timeout=0``).  If the daemon dies (control socket EOF),
every pending completion fails with ``Status.CANCELLED`` and later calls raise
``ShimError(ENOTCONN)``.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import math
import mmap
import os
import select
import socket
import time
from array import array
from collections.abc import Callable
from typing import Any

from ..errors import LocalProtocolError, Lu2kError, MessageFailed, NidError, RemoteProtocolError, ShimError, Status
from ..nid import NID_SIZE, Nid, parse_nid
from . import abi
from .ring import RingConsumer, RingProducer, SlotPool, full_fence

DELIVERED = Status.DELIVERED


_PACKED: dict[Nid | str, bytes] = {}  # applications send to few peers, many times: parse once


def pack_nid(dst: Nid | str | bytes) -> bytes:
    """A destination as the ABI's 20 packed bytes (a Nid, ``"10.0.0.1@tcp"`` or packed bytes)."""
    if isinstance(dst, (Nid, str)):
        raw = _PACKED.get(dst)
        if raw is None:
            raw = dst.to_bytes() if isinstance(dst, Nid) else parse_nid(dst, resolve=False).to_bytes()
            if len(_PACKED) < 4096:
                _PACKED[dst] = raw
        return raw
    if isinstance(dst, (bytes, bytearray, memoryview)):
        raw = bytes(dst)
        if len(raw) != NID_SIZE:
            raise NidError(f"packed NID must be {NID_SIZE} bytes, got {len(raw)}")
        return raw
    raise NidError(f"destination must be a Nid, a NID string or {NID_SIZE} packed bytes, not {type(dst).__name__}")


class Completion:
    """The outcome of one send: exactly one per message."""

    __slots__ = ("cookie", "dst", "size", "status", "reason", "_offset", "_front", "_callbacks")

    def __init__(self, cookie: int, dst: bytes, size: int, offset: int, front: Any) -> None:
        self.cookie = cookie
        self.dst = dst
        self.size = size
        self.status: Status | None = None
        self.reason = ""
        self._offset = offset
        self._front = front
        self._callbacks: list[Callable[[Completion], None]] | None = None

    @property
    def done(self) -> bool:
        return self.status is not None

    def _finish(self, status: Status, reason: str) -> None:
        self.status = status
        self.reason = reason or ("" if status is Status.DELIVERED else status.describe())
        if self._callbacks:
            for cb in self._callbacks:
                cb(self)
            self._callbacks = None

    def add_done_callback(self, cb: Callable[["Completion"], None]) -> None:
        if self.done:
            cb(self)
        elif self._callbacks is None:
            self._callbacks = [cb]
        else:
            self._callbacks.append(cb)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done (sync endpoint only); False on timeout."""
        if self.status is not None:
            return True
        return bool(self._front._block(lambda: self.status is not None, timeout))

    def result(self, timeout: float | None = None) -> None:
        """Return if delivered; raise MessageFailed (with status and reason) otherwise."""
        if not self.done and not self.wait(timeout):
            raise ShimError(errno.ETIMEDOUT, f"message {self.cookie} not complete after {timeout} s")
        if self.status is not Status.DELIVERED:
            raise MessageFailed(self.status or Status.PROTOCOL, self.reason)

    def __repr__(self) -> str:
        state = self.status.name if self.status is not None else "PENDING"
        return f"<Completion {self.cookie} {state}{': ' + self.reason if self.reason else ''}>"


class AsyncCompletion(Completion):
    """A Completion whose ``wait()`` is awaitable; ``await completion`` is ``result()``."""

    __slots__ = ()

    async def wait(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        if self.done:
            return True
        self._front._pump()  # take what is there and arm the doorbell before sleeping
        if self.done:
            return True
        fut = asyncio.get_running_loop().create_future()

        def done(_c: Completion) -> None:
            if not fut.done():
                fut.set_result(None)

        self.add_done_callback(done)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def result(self, timeout: float | None = None) -> None:  # type: ignore[override]
        if not await self.wait(timeout):
            raise ShimError(errno.ETIMEDOUT, f"message {self.cookie} not complete after {timeout} s")
        if self.status is not Status.DELIVERED:
            raise MessageFailed(self.status or Status.PROTOCOL, self.reason)

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.result().__await__()


class TxSlot:
    """A reserved TX buffer: write the payload into ``view``, then ``post()`` or ``cancel()``."""

    __slots__ = ("view", "_core", "_offset", "_front", "_state")

    def __init__(self, core: "_Core", offset: int, view: memoryview, front: Any) -> None:
        self._core = core
        self._offset = offset
        self.view = view
        self._front = front
        self._state = 0  # 0 reserved, 1 posted, 2 cancelled

    def post(self, dst: Nid | str | bytes, portal: int = 0, *, length: int | None = None, flush: bool = True,
             msg_id: int | None = None) -> Completion:
        """Send the first ``length`` bytes (default: all of ``view``) to ``dst``/``portal``;
        ``msg_id`` as for :meth:`Endpoint.send`."""
        if self._state:
            raise LocalProtocolError("TX slot already posted or cancelled")
        n = len(self.view) if length is None else length
        if not 0 <= n <= len(self.view):
            raise LocalProtocolError(f"post length {n} outside the {len(self.view)}-byte slot")
        comp = self._core.post(self._offset, n, pack_nid(dst), portal, self._front, msg_id)
        self._state = 1
        self.view.release()
        if flush:
            self._core.kick_if_wanted()
        return comp

    def cancel(self) -> None:
        if self._state:
            raise LocalProtocolError("TX slot already posted or cancelled")
        self._state = 2
        self.view.release()
        self._core.tx_free(self._offset)

    def __enter__(self) -> "TxSlot":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._state == 0:
            self.cancel()


class Received:
    """One received message: ``payload`` is a view of the RX slot, valid until ``release()``."""

    __slots__ = ("src_nid", "src_portal", "dst_portal", "payload", "_core", "_offset", "_released")

    def __init__(self, core: "_Core", offset: int, payload: memoryview, src_nid: bytes, src_portal: int, dst_portal: int) -> None:
        self._core = core
        self._offset = offset
        self.payload = payload
        self.src_nid = src_nid
        self.src_portal = src_portal
        self.dst_portal = dst_portal
        self._released = False

    @property
    def src(self) -> Nid:
        return Nid.from_bytes(self.src_nid)

    def release(self, *, flush: bool = True) -> None:
        """Give the buffer back to the daemon; the payload view becomes invalid.

        ``flush=False`` defers telling a sleeping daemon until the endpoint's next call
        (batching releases); the default tells it at once.
        """
        if self._released:
            raise LocalProtocolError(f"received message at RX offset {self._offset} released twice")
        self._released = True
        self.payload.release()
        self._core.release(self._offset)
        if flush:
            self._core.kick_if_wanted()

    def __enter__(self) -> "Received":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._released:
            self.release()

    def __len__(self) -> int:
        return len(self.payload)


_PEER_KEYS = ("sent", "delivered", "failed", "received", "bytes_sent", "bytes_received", "in_flight")


class _Core:
    """Shared-memory state of one attachment; never blocks."""

    def __init__(self, sock: socket.socket, portal: int, reply_arg: bytes, fds: list[int]) -> None:
        self.sock = sock
        self.portal = portal
        self.dead: str | None = None
        self.last_event = ""
        in_raw, local_nid, max_in_flight, layout_raw = abi.ATTACH.unpack(reply_arg)
        self.local_nid = local_nid
        self.max_in_flight = max_in_flight
        memfd, self.kick_fd, self.notify_fd = fds
        try:
            try:
                layout = abi.Layout.unpack(layout_raw)
                if os.fstat(memfd).st_size < layout.region_size:
                    raise ShimError(errno.EPROTO, "shared region is smaller than its layout")
                self.mm = mmap.mmap(memfd, layout.region_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(memfd)
            try:
                abi.check_region_header(self.mm[: abi.REGION_HDR.size], layout)
            except BaseException:
                self.mm.close()
                raise
        except BaseException:
            os.close(self.kick_fd)
            os.close(self.notify_fd)
            raise
        self.layout = layout
        self.max_message_size = layout.max_message_size
        mem = self.mem = memoryview(self.mm)
        rings = layout.rings
        self.submit = RingProducer(mem, rings[abi.RING_SUBMIT], abi.SEND_DESC, "submit")
        self.complete = RingConsumer(mem, rings[abi.RING_COMPLETE], abi.COMPLETION, "complete")
        self.deliver = RingConsumer(mem, rings[abi.RING_DELIVER], abi.RX_DESC, "deliver")
        self.release_ring = RingProducer(mem, rings[abi.RING_RELEASE], abi.RELEASE_DESC, "release")
        self.daemon_flags = mem[abi.HDR_DAEMON_FLAGS : abi.HDR_DAEMON_FLAGS + 4].cast("I")
        self.ep_flags = mem[abi.HDR_ENDPOINT_FLAGS : abi.HDR_ENDPOINT_FLAGS + 4].cast("I")
        self.ep_flags[0] = abi.FLAG_NEED_WAKEUP  # armed until we find work (see arm())
        self.tx = SlotPool(layout.tx)
        self.rx = SlotPool(layout.rx)  # lookup() only: the daemon allocates RX slots
        self.pending: dict[int, Completion] = {}
        self.next_cookie = 1  # our own cookies have bit 63 set: ids an application gives are below it
        self.rx_queue: collections.deque[Received] = collections.deque()
        self.rx_outstanding: set[int] = set()
        self.kick_want = 0  # daemon flag bits our unannounced publishes would need
        self.peers: dict[bytes, dict[str, int]] = {}
        self.counters = collections.Counter[str]()
        self.sent = 0  # hot counter kept apart from the Counter
        self.epoll = select.epoll()
        self.epoll.register(self.notify_fd, select.EPOLLIN)
        self.epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    # -- sending ----------------------------------------------------------------------

    def check_alive(self) -> None:
        if self.dead is not None:
            raise ShimError(errno.ENOTCONN, f"endpoint on portal {self.portal} is not attached: {self.dead}")

    def try_reserve(self, size: int) -> tuple[int, memoryview] | None:
        self.check_alive()
        if size > self.max_message_size or size < 0:
            raise ShimError(errno.EMSGSIZE, f"message of {size} bytes exceeds the shim's max_message_size {self.max_message_size}")
        got = self.tx.alloc(size)
        if got is None:
            return None
        offset = got[0]
        return offset, self.mem[offset : offset + size]

    def tx_free(self, offset: int) -> None:
        if self.tx.is_allocated(offset):
            self.tx.free(offset)

    def post(self, offset: int, length: int, dst: bytes, portal: int, front: Any, msg_id: int | None = None) -> Completion:
        self.check_alive()
        if not 0 <= portal <= 0xFFFFFFFF:
            raise LocalProtocolError(f"portal {portal} is not a u32")
        flags = 0
        if msg_id is None:
            cookie = self.next_cookie | 1 << 63
            self.next_cookie = (self.next_cookie + 1) & abi.MAX_MSG_ID or 1
        else:
            if not isinstance(msg_id, int) or not 1 <= msg_id <= abi.MAX_MSG_ID:
                raise LocalProtocolError(f"msg_id must be an integer in 1 .. 2**63-1, not {msg_id!r}")
            if msg_id in self.pending:
                raise ShimError(errno.EEXIST, f"a message with id {msg_id} is already in flight on this endpoint")
            cookie, flags = msg_id, abi.SEND_FLAG_MSG_ID
        # Cannot be full: the submit ring has an entry per TX slot and this one is ours.
        if not self.submit.put(cookie, offset, length, portal, dst, flags):
            raise LocalProtocolError("submit ring full (ring smaller than the TX pool?)")
        self.submit.publish()
        self.kick_want |= abi.FLAG_NEED_WAKEUP
        comp = front._completion_class(cookie, dst, length, offset, front)
        self.pending[cookie] = comp
        p = self.peers.get(dst) or self._peer(dst)
        p["sent"] += 1
        p["in_flight"] += 1
        self.sent += 1
        return comp

    def release(self, offset: int) -> None:
        self.rx_outstanding.discard(offset)
        if self.dead is not None:
            return
        if not self.release_ring.put(offset):
            raise LocalProtocolError("release ring full (ring smaller than the RX pool?)")
        self.release_ring.publish()
        self.kick_want |= abi.FLAG_NEED_WAKEUP_RELEASE
        self.counters["released"] += 1

    def kick_if_wanted(self) -> None:
        """After publishing: fence, and kick the daemon if it asked for it."""
        want = self.kick_want
        if not want or self.dead is not None:
            return
        self.kick_want = 0
        full_fence()
        if self.daemon_flags[0] & want:
            self.counters["kicks"] += 1
            try:
                os.eventfd_write(self.kick_fd, 1)
            except BlockingIOError:
                pass  # counter saturated: the daemon will look anyway

    # -- receiving --------------------------------------------------------------------

    def process(self) -> int:
        """Consume completions and deliveries; returns how many there were.

        Finding work clears our NEED_WAKEUP bit: while we are busy the daemon need not
        notify us; :meth:`arm` sets it again before anyone sleeps.
        """
        if self.dead is not None:
            return 0
        try:
            n = self._completions() + self._deliveries()
        except (RemoteProtocolError, ShimError) as e:
            self.fail_all(f"daemon broke the shim ABI: {e}")
            return 1
        if n and self.ep_flags[0]:
            self.ep_flags[0] = 0
        return n

    def arm(self) -> int:
        """Set NEED_WAKEUP, fence, and process until the rings are seen empty after the fence.

        Afterwards any publish by the daemon is followed by a notify, so sleeping on the
        epoll descriptor is safe.  Returns how many events were processed on the way.
        """
        n = 0
        while self.dead is None:
            self.ep_flags[0] = abi.FLAG_NEED_WAKEUP
            full_fence()
            if not (self.complete.available() or self.deliver.available()):
                break
            n += self.process()
        self.kick_if_wanted()
        return n

    def _completions(self) -> int:
        descs = self.complete.take()
        if not descs:
            return 0
        self.complete.commit()
        pending, tx, peers = self.pending, self.tx, self.peers
        delivered = 0
        for cookie, status, flags, reason in descs:
            if flags & abi.COMP_EVENT:
                self.counters["events"] += 1
                self.last_event = f"{Status.from_code(status).name}: {abi.decode_reason(reason)}"
                continue
            comp = pending.pop(cookie, None)
            if comp is None:
                self.counters["unknown_completions"] += 1
                continue
            if tx.is_allocated(comp._offset):
                tx.free(comp._offset)
            p = peers[comp.dst]
            p["in_flight"] -= 1
            if not status:
                p["delivered"] += 1
                p["bytes_sent"] += comp.size
                delivered += 1
                comp.status = DELIVERED
                if comp._callbacks:
                    comp._finish(DELIVERED, "")
            else:
                st = Status.from_code(status)
                p["failed"] += 1
                self.counters["failed"] += 1
                comp._finish(st, abi.decode_reason(reason))
        if delivered:
            self.counters["delivered"] += delivered
        return len(descs)

    def _deliveries(self) -> int:
        descs = self.deliver.take()
        if not descs:
            return 0
        self.deliver.commit()
        mem, lookup = self.mem, self.rx.lookup
        for offset, length, src_portal, dst_portal, src_nid, _flags, _res in descs:
            cap = lookup(offset)
            if cap is None or length > cap or offset in self.rx_outstanding:
                raise ShimError(errno.EPROTO, f"daemon delivered a bad RX descriptor (offset {offset}, length {length})")
            self.rx_outstanding.add(offset)
            self.rx_queue.append(Received(self, offset, mem[offset : offset + length], src_nid, src_portal, dst_portal))
            p = self._peer(src_nid)
            p["received"] += 1
            p["bytes_received"] += length
            self.counters["received"] += 1
        return len(descs)

    def _peer(self, nid: bytes) -> dict[str, int]:
        p = self.peers.get(nid)
        if p is None:
            p = self.peers[nid] = dict.fromkeys(_PEER_KEYS, 0)
        return p

    def drain_notify(self) -> None:
        try:
            os.eventfd_read(self.notify_fd)
        except BlockingIOError:
            pass

    def read_ctl(self) -> bytes | None:
        """One control packet if any; marks the core dead on EOF."""
        if self.dead is not None:
            return None
        try:
            packet = self.sock.recv(abi.MAX_CTL_PACKET)
        except BlockingIOError:
            return None
        except OSError as e:
            self.fail_all(f"control socket error: {e}")
            return None
        if not packet:
            self.process()  # take what the daemon published before it closed (completions, events)
            reason = "lu2kd closed the shim socket (daemon exited or disconnected this endpoint)"
            self.fail_all(reason + (f"; last event: {self.last_event}" if self.last_event else ""))
            return None
        return packet

    def fail_all(self, reason: str) -> None:
        """The daemon is gone: fail every pending completion once, with CANCELLED."""
        if self.dead is not None:
            return
        self.dead = reason
        pending, self.pending = self.pending, {}
        for comp in pending.values():
            p = self.peers[comp.dst]
            p["in_flight"] -= 1
            p["failed"] += 1
            self.counters["failed"] += 1
            comp._finish(Status.CANCELLED, reason)

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        """Drop our mapping and descriptors (views handed out keep the mapping alive)."""
        for ring in (self.submit, self.complete, self.deliver, self.release_ring):
            ring.release()
        self.daemon_flags.release()
        self.ep_flags.release()
        self.mem.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # the application still holds payload views
        self.epoll.close()
        for fd in (self.kick_fd, self.notify_fd):
            os.close(fd)
        self.sock.close()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: self.counters.get(k, 0) for k in ("sent", "delivered", "failed", "received", "released", "kicks", "events",
                                                                   "unknown_completions")}
        out["sent"] = self.sent
        out.update(portal=self.portal, in_flight=len(self.pending), tx_buffers_in_use=self.tx.in_use,
                   rx_buffers_held=len(self.rx_outstanding), attached=self.dead is None)
        if self.last_event:
            out["last_event"] = self.last_event
        if self.dead:
            out["detach_reason"] = self.dead
        return out

    def peer_table(self) -> dict[str, dict[str, int]]:
        out = {}
        for raw, counts in self.peers.items():
            try:
                name = str(Nid.from_bytes(raw))
            except NidError:
                name = raw.hex()
            out[name] = dict(counts)
        return out


def _attach_request(portal: int, tx_pool_bytes: int, rx_pool_bytes: int) -> bytes:
    if not 0 <= portal <= 0xFFFFFFFF:
        raise LocalProtocolError(f"portal {portal} is not a u32")
    in_raw = abi.ATTACH_IN.pack(abi.ABI_VERSION, portal, 0, 0, tx_pool_bytes, rx_pool_bytes)
    arg = abi.ATTACH.pack(in_raw, bytes(NID_SIZE), 0, bytes(abi.LAYOUT.size))
    return abi.encode_request(abi.CMD_ATTACH, 1, arg)


def _parse_attach_reply(packet: bytes, ancdata: list[tuple[int, int, bytes]]) -> tuple[bytes, list[int]]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    try:
        cmd, _seq, error, reason, arg = abi.decode_reply(packet)
        if error:
            raise ShimError(error, f"ATTACH refused: {reason}")
        if cmd != abi.CMD_ATTACH or len(arg) != abi.ATTACH.size or len(fds) != 3:
            raise ShimError(errno.EPROTO, f"malformed ATTACH reply ({len(arg)} bytes, {len(fds)} descriptors)")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return arg, fds


def _connect(path: str | None) -> socket.socket:
    path = path or abi.default_shim_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise ShimError(e.errno or errno.ECONNREFUSED, f"cannot connect to lu2kd shim socket {path}: {e.strerror} (is lu2kd running?)") from None
    return sock


_ANC_SPACE = socket.CMSG_SPACE(3 * array("i").itemsize)


def _poll_in(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``fd`` to be readable (or hung up); works for any fd number."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLRDHUP)
    return bool(p.poll(max(0, math.ceil(timeout * 1000))))


class Endpoint:
    """A blocking endpoint; ``fileno()`` is readable when :meth:`poll` may find something."""

    _completion_class = Completion

    def __init__(self, core: _Core) -> None:
        self._core = core
        self._seq = 1

    @classmethod
    def attach(cls, path: str | None = None, portal: int = 0, *, tx_pool_bytes: int = 0, rx_pool_bytes: int = 0,
               timeout: float = 10.0) -> "Endpoint":
        """Connect to the daemon's shim socket and bind ``portal``."""
        request = _attach_request(portal, tx_pool_bytes, rx_pool_bytes)
        sock = _connect(path)
        try:
            sock.settimeout(timeout)
            try:
                sock.send(request)
            except TimeoutError:
                raise
            except OSError:
                pass  # a daemon that refuses us replies at once and closes: read why below
            try:
                packet, anc, _flags, _addr = sock.recvmsg(abi.MAX_CTL_PACKET, _ANC_SPACE)
            except TimeoutError:
                raise
            except OSError as e:
                raise ShimError(e.errno or errno.ECONNRESET, f"daemon closed the shim socket during ATTACH: {e.strerror}") from None
            if not packet:
                raise ShimError(errno.ECONNRESET, "daemon closed the shim socket during ATTACH")
            arg, fds = _parse_attach_reply(packet, anc)
            sock.setblocking(False)
            return cls(_Core(sock, portal, arg, fds))
        except TimeoutError:
            sock.close()
            raise ShimError(errno.ETIMEDOUT, f"no ATTACH reply from lu2kd within {timeout} s") from None
        except BaseException:
            sock.close()
            raise

    # -- properties ---------------------------------------------------------------------

    @property
    def portal(self) -> int:
        return self._core.portal

    @property
    def local_nid(self) -> Nid:
        return Nid.from_bytes(self._core.local_nid)

    @property
    def max_message_size(self) -> int:
        return self._core.max_message_size

    @property
    def attached(self) -> bool:
        return self._core.dead is None

    def fileno(self) -> int:
        return self._core.epoll.fileno()

    # -- waiting -------------------------------------------------------------------------

    def _block(self, done: Callable[[], bool], timeout: float | None) -> bool:
        core = self._core
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            core.process()
            if done():
                core.kick_if_wanted()
                return True
            core.arm()  # also kicks the daemon for what we published
            if done():
                return True
            if core.dead is not None:
                return done()
            if deadline is None:
                self._wait_events(-1.0)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return done()
                self._wait_events(remaining)

    def _wait_events(self, timeout: float) -> None:
        core = self._core
        for fd, _ev in core.epoll.poll(timeout):
            if fd == core.notify_fd:
                core.drain_notify()
            else:
                core.read_ctl()

    def poll(self) -> int:
        """Process what has arrived without blocking; returns the number of new events."""
        core = self._core
        for fd, _ev in core.epoll.poll(0):
            if fd == core.notify_fd:
                core.drain_notify()
            else:
                core.read_ctl()
        return core.process() + core.arm()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a completion or message arrives (or the daemon goes away)."""
        core = self._core
        before = core.counters["delivered"] + core.counters["failed"] + core.counters["received"]
        return self._block(lambda: bool(core.rx_queue) or core.dead is not None
                           or core.counters["delivered"] + core.counters["failed"] + core.counters["received"] != before, timeout)

    # -- sending -------------------------------------------------------------------------

    def reserve(self, size: int, *, timeout: float | None = None) -> TxSlot:
        """A TX slot of ``size`` bytes to fill in place; waits for one (``timeout=0``: EAGAIN)."""
        core = self._core
        got = core.try_reserve(size)
        if got is None:
            holder: list[tuple[int, memoryview]] = []

            def have() -> bool:
                if holder or core.dead is not None:
                    return True
                g = core.try_reserve(size)
                if g is not None:
                    holder.append(g)
                return bool(holder)

            if timeout == 0 or not self._block(have, timeout) or not holder:
                core.check_alive()
                raise ShimError(errno.EAGAIN, f"no TX buffer for {size} bytes free ({len(core.pending)} messages in flight)")
            got = holder[0]
        return TxSlot(core, got[0], got[1], self)

    def send(self, dst: Nid | str | bytes, payload: bytes | bytearray | memoryview, portal: int = 0, *,
             timeout: float | None = None, flush: bool = True, msg_id: int | None = None) -> Completion:
        """Copy ``payload`` into a TX slot and post it; returns its Completion.

        ``flush=False`` leaves the doorbell to a later ``flush()`` (or any call that
        waits), so a burst of posts costs at most one kick.

        ``msg_id`` (1 .. 2**63-1, unique among this application's messages) makes a resend
        safe: if the message completes CANCELLED because this daemon went away, send it
        again with the same id once the daemon is back; a receiving daemon that already
        delivered it answers DELIVERED without delivering it again (it remembers the last
        65 536 ids it delivered, each for an hour: ``lu2k.dedupe.AppIds``).  The id is the
        completion's ``cookie``; two messages with one id may not be in flight at once.
        """
        core = self._core
        dst_raw = pack_nid(dst)
        n = len(payload)
        got = core.tx.alloc(n) if core.dead is None and n <= core.max_message_size else None
        if got is None:  # slow path: errors, or wait for a TX slot (back-pressure)
            slot = self.reserve(n, timeout=timeout)
            slot.view[:] = payload
            return slot.post(dst_raw, portal, flush=flush, msg_id=msg_id)
        offset = got[0]
        core.mm[offset : offset + n] = payload
        try:
            comp = core.post(offset, n, dst_raw, portal, self, msg_id)
        except Lu2kError:
            core.tx_free(offset)
            raise
        if flush:
            core.kick_if_wanted()
        return comp

    def flush(self) -> None:
        """Kick the daemon for posts made with ``flush=False`` (if it is asleep)."""
        self._core.kick_if_wanted()

    # -- receiving -----------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> Received | None:
        """The next message (None on timeout); raises ShimError(ENOTCONN) once detached and drained."""
        core = self._core
        if not core.rx_queue:
            core.process()
            if not core.rx_queue:
                if timeout == 0:
                    self.poll()  # also notices a daemon that went away
                else:
                    self._block(lambda: bool(core.rx_queue) or core.dead is not None, timeout)
        if core.rx_queue:
            return core.rx_queue.popleft()
        core.check_alive()
        return None

    # -- information ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return self._core.stats()

    def peers(self) -> dict[str, dict[str, int]]:
        """Per peer NID: sent/delivered/failed/received/bytes_sent/bytes_received/in_flight."""
        return self._core.peer_table()

    def _command(self, cmd: int, arg: bytes = b"", timeout: float = 10.0) -> bytes:
        core = self._core
        core.check_alive()
        core.kick_if_wanted()
        self._seq += 1
        core.sock.send(abi.encode_request(cmd, self._seq, arg))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ShimError(errno.ETIMEDOUT, f"no reply to {abi.COMMANDS.get(cmd, cmd)} within {timeout} s")
            # poll, not select: select() cannot watch a descriptor numbered 1024 or above
            if not _poll_in(core.sock.fileno(), remaining):
                continue
            packet = core.read_ctl()
            if packet is None:
                core.check_alive()
                continue
            rcmd, seq, error, reason, rarg = abi.decode_reply(packet)
            if seq != self._seq:
                continue  # a stale reply to a command that timed out earlier
            if error:
                raise ShimError(error, f"{abi.COMMANDS.get(cmd, hex(cmd))} refused: {reason}")
            return rarg

    def daemon_stats(self) -> dict[str, int]:
        """The daemon's counters for this port (STATS command)."""
        return dict(zip(abi.STATS_FIELDS, abi.STATS.unpack(self._command(abi.CMD_STATS, bytes(abi.STATS.size)))))

    def info(self) -> dict[str, Any]:
        version, portal, pid, nports, nid, max_msg, max_in_flight = abi.INFO.unpack(self._command(abi.CMD_INFO, bytes(abi.INFO.size)))
        return {"abi_version": version, "portal": portal, "daemon_pid": pid, "endpoints": nports,
                "local_nid": str(Nid.from_bytes(nid)), "max_message_size": max_msg, "max_in_flight": max_in_flight}

    def detach(self) -> None:
        """Unbind: pending completions fail with CANCELLED; held payload views stay readable."""
        core = self._core
        if core.sock.fileno() < 0:
            return
        if core.dead is None:
            core.process()
            try:
                self._command(abi.CMD_DETACH, timeout=5.0)
            except ShimError:
                pass  # the daemon is gone or wedged; we leave either way
            core.process()
        core.fail_all("endpoint detached")
        core.close()

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


class AsyncEndpoint:
    """The asyncio endpoint: same API, awaitable; driven by ``loop.add_reader`` on the epoll fd."""

    _completion_class = AsyncCompletion

    def __init__(self, core: _Core, loop: asyncio.AbstractEventLoop) -> None:
        self._core = core
        self._loop = loop
        self._seq = 1
        self._rx_waiters: list[asyncio.Future[None]] = []
        self._tx_waiters: list[asyncio.Future[None]] = []
        self._ctl_waiter: tuple[int, asyncio.Future[bytes]] | None = None
        self._closed = False
        loop.add_reader(core.epoll.fileno(), self._on_readable)

    @classmethod
    async def attach(cls, path: str | None = None, portal: int = 0, *, tx_pool_bytes: int = 0, rx_pool_bytes: int = 0,
                     timeout: float = 10.0) -> "AsyncEndpoint":
        loop = asyncio.get_running_loop()
        request = _attach_request(portal, tx_pool_bytes, rx_pool_bytes)
        sock = _connect(path)
        sock.setblocking(False)
        try:
            try:
                await loop.sock_sendall(sock, request)
            except OSError:
                pass  # a daemon that refuses us replies at once and closes: read why below
            try:
                packet, anc = await asyncio.wait_for(_recvmsg(loop, sock), timeout)
            except asyncio.TimeoutError:
                raise
            except OSError as e:
                raise ShimError(e.errno or errno.ECONNRESET, f"daemon closed the shim socket during ATTACH: {e.strerror}") from None
            if not packet:
                raise ShimError(errno.ECONNRESET, "daemon closed the shim socket during ATTACH")
            arg, fds = _parse_attach_reply(packet, anc)
            return cls(_Core(sock, portal, arg, fds), loop)
        except asyncio.TimeoutError:
            sock.close()
            raise ShimError(errno.ETIMEDOUT, f"no ATTACH reply from lu2kd within {timeout} s") from None
        except BaseException:
            sock.close()
            raise

    portal = Endpoint.portal
    local_nid = Endpoint.local_nid
    max_message_size = Endpoint.max_message_size
    attached = Endpoint.attached
    fileno = Endpoint.fileno
    stats = Endpoint.stats
    peers = Endpoint.peers
    flush = Endpoint.flush

    def _on_readable(self) -> None:
        core = self._core
        for fd, _ev in core.epoll.poll(0):
            if fd == core.notify_fd:
                core.drain_notify()
            else:
                packet = core.read_ctl()
                if packet is not None and self._ctl_waiter is not None:
                    seq, fut = self._ctl_waiter
                    if len(packet) >= abi.CTL_REPLY.size and abi.CTL_REPLY.unpack_from(packet)[1] == seq and not fut.done():
                        fut.set_result(packet)
        self._pump()
        core.arm()
        self._wake_for_queues()
        if core.dead is not None:
            self._loop.remove_reader(core.epoll.fileno())
            if self._ctl_waiter is not None and not self._ctl_waiter[1].done():
                self._ctl_waiter[1].set_exception(ShimError(errno.ENOTCONN, core.dead))
            self._wake(self._rx_waiters)
            self._wake(self._tx_waiters)

    def _pump(self) -> None:
        """Process, then re-arm: whoever awaits next must be woken by the daemon's notify."""
        core = self._core
        core.process()
        core.arm()
        self._wake_for_queues()

    def _wake_for_queues(self) -> None:
        if self._core.rx_queue:
            self._wake(self._rx_waiters)
        if self._tx_waiters:
            self._wake(self._tx_waiters)  # they re-try their allocation

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        for w in waiters:
            if not w.done():
                w.set_result(None)
        waiters.clear()

    async def _wait_on(self, waiters: list[asyncio.Future[None]], timeout: float | None) -> bool:
        if self._core.arm():
            return True  # something arrived while arming: let the caller look again
        fut = self._loop.create_future()
        waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            if fut in waiters:
                waiters.remove(fut)

    def poll(self) -> int:
        n = self._core.process() + self._core.arm()
        self._wake_for_queues()
        return n

    async def reserve(self, size: int, *, timeout: float | None = None) -> TxSlot:
        core = self._core
        deadline = None if timeout is None else self._loop.time() + timeout
        while (got := core.try_reserve(size)) is None:
            self._pump()
            if (got := core.try_reserve(size)) is not None:
                break
            remaining = None if deadline is None else deadline - self._loop.time()
            if timeout == 0 or (remaining is not None and remaining <= 0) or not await self._wait_on(self._tx_waiters, remaining):
                core.check_alive()
                raise ShimError(errno.EAGAIN, f"no TX buffer for {size} bytes free ({len(core.pending)} messages in flight)")
        return TxSlot(core, got[0], got[1], self)

    async def send(self, dst: Nid | str | bytes, payload: bytes | bytearray | memoryview, portal: int = 0, *,
                   timeout: float | None = None, flush: bool = True, msg_id: int | None = None) -> AsyncCompletion:
        """As :meth:`Endpoint.send` (``msg_id`` included)."""
        core = self._core
        dst_raw = pack_nid(dst)
        n = len(payload)
        got = core.tx.alloc(n) if core.dead is None and n <= core.max_message_size else None
        if got is None:  # slow path: errors, or wait for a TX slot (back-pressure)
            slot = await self.reserve(n, timeout=timeout)
            slot.view[:] = payload
            return slot.post(dst_raw, portal, flush=flush, msg_id=msg_id)  # type: ignore[return-value]
        offset = got[0]
        core.mm[offset : offset + n] = payload
        try:
            comp = core.post(offset, n, dst_raw, portal, self, msg_id)
        except Lu2kError:
            core.tx_free(offset)
            raise
        if flush:
            core.kick_if_wanted()
        return comp  # type: ignore[return-value]

    async def recv(self, timeout: float | None = None) -> Received | None:
        core = self._core
        deadline = None if timeout is None else self._loop.time() + timeout
        while not core.rx_queue:
            self._pump()
            if core.rx_queue:
                break
            core.check_alive()
            remaining = None if deadline is None else deadline - self._loop.time()
            if (remaining is not None and remaining <= 0) or not await self._wait_on(self._rx_waiters, remaining):
                return None
        return core.rx_queue.popleft()

    async def _command(self, cmd: int, arg: bytes = b"", timeout: float = 10.0) -> bytes:
        core = self._core
        core.check_alive()
        self._seq += 1
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._ctl_waiter = (self._seq, fut)
        try:
            core.sock.send(abi.encode_request(cmd, self._seq, arg))
            packet = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise ShimError(errno.ETIMEDOUT, f"no reply to {abi.COMMANDS.get(cmd, cmd)} within {timeout} s") from None
        finally:
            self._ctl_waiter = None
        _cmd, _seq, error, reason, rarg = abi.decode_reply(packet)
        if error:
            raise ShimError(error, f"{abi.COMMANDS.get(cmd, hex(cmd))} refused: {reason}")
        return rarg

    async def daemon_stats(self) -> dict[str, int]:
        return dict(zip(abi.STATS_FIELDS, abi.STATS.unpack(await self._command(abi.CMD_STATS, bytes(abi.STATS.size)))))

    async def info(self) -> dict[str, Any]:
        version, portal, pid, nports, nid, max_msg, max_in_flight = abi.INFO.unpack(await self._command(abi.CMD_INFO, bytes(abi.INFO.size)))
        return {"abi_version": version, "portal": portal, "daemon_pid": pid, "endpoints": nports,
                "local_nid": str(Nid.from_bytes(nid)), "max_message_size": max_msg, "max_in_flight": max_in_flight}

    async def detach(self) -> None:
        if self._closed:
            return
        self._closed = True
        core = self._core
        if core.dead is None:
            self._pump()
            try:
                await self._command(abi.CMD_DETACH, timeout=5.0)
            except ShimError:
                pass
            self._pump()
        self._loop.remove_reader(core.epoll.fileno())
        core.fail_all("endpoint detached")
        self._wake(self._rx_waiters)
        self._wake(self._tx_waiters)
        core.close()

    async def __aenter__(self) -> "AsyncEndpoint":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.detach()


async def _recvmsg(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """``sock.recvmsg`` awaited through a one-shot reader (asyncio has no sock_recvmsg)."""
    while True:
        try:
            packet, anc, _flags, _addr = sock.recvmsg(abi.MAX_CTL_PACKET, _ANC_SPACE)
            return packet, anc
        except BlockingIOError:
            pass
        fut: asyncio.Future[None] = loop.create_future()

        def readable(fut: asyncio.Future[None] = fut) -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(sock.fileno(), readable)
        try:
            await fut
        finally:
            loop.remove_reader(sock.fileno())
