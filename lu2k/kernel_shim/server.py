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
from typing import Any, Protocol

from ..errors import LocalProtocolError, Lu2kError, RemoteProtocolError, ShimError, Status
from ..nid import NID_SIZE
from . import abi
from .access import AccessPolicy, PeerCred, RateLimitedLog, bind_private_socket, peer_credentials, prepare_socket_dir
from .config import ShimConfig  # the one ShimConfig (lu2k: shim:), read with the daemon config
from .ports import PortLogic, RxBuffer, SendRequest  # noqa: F401  (RxBuffer, SendRequest: re-exported)
from .ring import full_fence

log = logging.getLogger("lu2k.shim")


class ShimHandler(Protocol):
    """What the engine implements."""

    def on_attach(self, port: "ShimPort") -> None: ...  # may raise ShimError(errno, msg) to refuse

    def on_submit(self, port: "ShimPort", reqs: list[SendRequest]) -> None: ...  # completes each exactly once

    def on_detach(self, port: "ShimPort") -> None: ...

    def on_rx_space(self, port: "ShimPort") -> None: ...

    def local_nid(self) -> bytes: ...




class ShimPort(PortLogic):
    """One attached endpoint: :class:`~.ports.PortLogic` plus its eventfds and loop scheduling."""

    def __init__(self, server: "ShimServer", conn: "_Connection", portal: int, layout: abi.Layout,
                 mm: mmap.mmap, kick_fd: int, notify_fd: int) -> None:
        super().__init__(portal, layout, memoryview(mm), server.config.max_in_flight, server.config.batch)
        self.server = server
        self.pid, self.uid, self.gid = conn.pid, conn.uid, conn.gid
        self._conn = conn
        self._mm = mm
        self._kick_fd = kick_fd
        self._notify_fd = notify_fd
        self._rx_waiters: list[asyncio.Future[None]] = []
        self._service_scheduled = False
        self._idle = 0
        self._poll_handle: asyncio.TimerHandle | None = None

    # -- engine-facing -------------------------------------------------------------------------

    @property
    def region(self) -> mmap.mmap:
        """The endpoint's whole shared region (for backends that register it for zero-copy DMA)."""
        return self._mm

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

    # -- ring service ------------------------------------------------------------------------

    def _disconnect(self, reason: str) -> None:
        self.server._disconnect(self, reason)

    def _hand_over(self, reqs: list[SendRequest]) -> None:
        self.server.handler.on_submit(self, reqs)

    def _expect_releases(self) -> None:
        # Releases will follow: poll for them instead of having the reader kick us for each.
        if self._poll_handle is None:
            self._start_polling()
        else:
            self._idle = 0

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
            published = self.publish()
        except RemoteProtocolError as e:
            self.server._disconnect(self, str(e))
            return
        if published:
            full_fence()
            if self.wants_notify():
                self.counters["notifies_out"] += 1
                try:
                    os.eventfd_write(self._notify_fd, 1)
                except BlockingIOError:
                    pass  # counter saturated: the endpoint is certainly going to look

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
        self.release_views()
        try:
            self._mm.close()
        except BufferError:
            pass  # the engine still holds payload views; the mapping goes when they do

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
        version, portal, flags, reserved, tx_bytes, rx_bytes = abi.ATTACH_IN.unpack(in_raw)
        if version != abi.ABI_VERSION:
            raise ShimError(errno.EPROTO, f"endpoint speaks shim ABI {version}, daemon speaks {abi.ABI_VERSION}")
        if flags:
            raise ShimError(errno.EINVAL, f"unknown ATTACH flags 0x{flags:x}")
        if reserved:  # a later ABI revision may give it a meaning this daemon does not know
            raise ShimError(errno.EINVAL, f"ATTACH reserved field is 0x{reserved:x}, must be 0")
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
            port.release_views()
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

