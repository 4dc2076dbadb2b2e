"""The socklnd LAN driver: lu2kd's NI on a LAN of kernel LNet nodes (the asyncio adapter).

Theory of operation
-------------------
*Two faces.*  Towards the LAN the driver is a ksocklnd peer: it listens on the acceptor
port, accepts the kernel's typed connections (:mod:`lu2k.socklnd.conn` does the protocol),
and connects to kernel nodes from a privileged source port (1023 down to 512, as
``lnet_connect``), opening CONTROL, BULK_IN and BULK_OUT as protocol V3 requires -- with V3
the kernel never sends on an ANY connection, and it never connects back to a peer whose
source port was above 1023.  Towards lu2k it is a local net of the engine
(``engine.attach_lan``): the engine hands it every message whose next hop is on the LAN
(:meth:`SocklndDriver.transmit`), and it hands the engine every LAN message for a remote net
(``engine.send``).

*Encapsulation.*  An LNet message crossing the lu2k hop is one lu2k message from the LNet
source NID to the LNet destination NID on portal :data:`~lu2k.socklnd.idl.LNET_PORTAL`, its
payload the 72-byte LNet header and the LNet payload, untouched.  PUT, GET, ACK and REPLY all
travel that way; the far lu2kd hands the header and payload to the destination node as they
came, so replies flow back through the same two gateways.

*Own NIDs.*  Messages for lu2kd itself -- its LAN NID, or the NID it shows on each remote
net -- are answered by :class:`~lu2k.socklnd.router.RouterResponder`: ping GETs get the
ping info (the remote-net NIs UP only while a probe of the lu2k gateway for that net
succeeds), discovery pushes get their ACK.  REPLYs end lu2kd's own pings of LAN nodes
(:meth:`SocklndDriver.ping_lan`, ``lu2kctl ping``), matched by their wmd cookie in
:class:`~lu2k.socklnd.ping.LanPinger`.

*Back-pressure.*  LAN messages handed to lu2k and not yet finished count against a window
(the NI's ``credits`` messages and ``rx_window_bytes``), one for CONTROL connections and one
for bulk ones (a router's small and large buffer pools); while a window is full its
connections do not read from their sockets, so TCP pushes back on the kernel senders instead
of lu2kd buffering, and pings on CONTROL connections are still read.  While the lu2k hop to
a net is known down, LAN traffic for it is dropped at once, as a router with a dead remote
NI drops it.  Towards the LAN each node has one ordered queue of at most ``max_queued``
messages; a message that cannot be written within ``timeout`` fails, and every message the
engine hands over ends in exactly one ``on_done`` (DELIVERED once the node's socket took it,
as ksocklnd completes a send).

*Bad input* from the LAN (an unprivileged source port with secure accept on, a wrong magic
or version, a truncated hello, an absurd payload length...) closes that connection with a
logged reason and a counter; nothing else is touched.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from ..errors import (
    ConnectError, ConnectionClosed, ConnectTimeout, HandshakeError, LocalProtocolError, Lu2kError, NetworkError, NetworkTimeout,
    NidError, ReadError, RemoteProtocolError, Status, WriteError,
)
from ..nid import Net, Nid
from ..settings import NetConfig
from . import idl, proto
from .conn import ConnConfig, Established, KsockConnection, LnetReceived, State
from .idl import ConnType
from .ping import Dropped, LanPinger, PingDone, PingReply, ni_status_name
from .router import RouterResponder
from .tunables import SocklndTunables

log = structlog.get_logger("lu2k.socklnd")

READ_SIZE = 256 << 10
RECONNECT_MIN, RECONNECT_MAX = 0.2, 10.0


class EngineLike(Protocol):
    """What the driver needs from the daemon's engine."""

    def send(self, src_raw: bytes | None, dst: Nid | bytes, src_portal: int, dst_portal: int, payload: memoryview | bytes,
             on_finish: Callable[[Status, str], None]) -> Any: ...

    async def ping(self, nid: Nid, timeout: float = 5.0) -> dict[str, Any]: ...


# Socket errors become lu2k's, once, by phase (httpcore's map_exceptions).
_CONNECT_ERRORS: dict[type[BaseException], type[NetworkError]] = {asyncio.TimeoutError: ConnectTimeout, OSError: ConnectError}
_IO_ERRORS: dict[type[BaseException], type[NetworkError]] = {OSError: ReadError}


def _translate(e: BaseException, table: dict[type[BaseException], type[NetworkError]], what: str) -> NetworkError:
    for kind, ours in table.items():
        if isinstance(e, kind):
            if isinstance(e, OSError) and e.errno:
                # by errno: asyncio's sock_connect words every failure "Connect call failed (addr)"
                detail = os.strerror(e.errno)
            else:
                detail = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
            return ours(f"{what}: {detail}")
    raise e


@dataclass(eq=False)
class TxMsg:
    """One LNet message on its way to a kernel node; ``on_done`` is called exactly once."""

    wire: bytes | memoryview  # LNet header + payload
    deadline: float
    on_done: Callable[[Status, str], None]
    timeout: float  # the seconds it was given (deadline - its start), for the failure reason
    done: bool = False

    def finish(self, status: Status, reason: str = "") -> None:
        if not self.done:
            self.done = True
            self.on_done(status, reason or status.describe())


class RxWindow:
    """LAN messages handed to lu2k and not yet finished, for one class of connections.

    Like a kernel router's small and large buffer pools: CONTROL connections (small messages,
    pings) have their own window, so a LAN saturated with bulk still gets its pings read.
    """

    def __init__(self, max_msgs: int, max_bytes: int) -> None:
        self.max_msgs, self.max_bytes = max_msgs, max_bytes
        self.msgs = self.bytes = 0
        self.space = asyncio.Event()
        self.space.set()

    def take(self, size: int) -> None:
        self.msgs += 1
        self.bytes += size
        if self.msgs >= self.max_msgs or self.bytes >= self.max_bytes:
            self.space.clear()  # this class of connections stops reading until lu2k finishes some

    def give(self, size: int) -> None:
        self.msgs -= 1
        self.bytes -= size
        if self.msgs < self.max_msgs and self.bytes < self.max_bytes:
            self.space.set()

    async def wait(self) -> None:
        while not self.space.is_set():
            await self.space.wait()


class LanConn:
    """One TCP connection with a kernel node: the protocol core plus a socket pump."""

    def __init__(self, driver: "SocklndDriver", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 core: KsockConnection, address: str) -> None:
        self.driver, self.reader, self.writer, self.core, self.address = driver, reader, writer, core, address
        self.peer: KernelPeer | None = None
        self.last_tx = time.monotonic()
        self._lock = asyncio.Lock()
        self.closed = False
        self.established = False

    @property
    def ctype(self) -> ConnType:
        return self.core.ctype

    async def write(self, parts: Sequence[bytes | memoryview]) -> None:
        if not parts:
            return
        async with self._lock:
            if self.closed:
                raise WriteError(f"connection to {self.address} closed")
            try:
                self.writer.writelines(parts)
                await self.writer.drain()
            except (OSError, RuntimeError) as e:
                raise WriteError(f"write to {self.address}: {e}") from None
            self.last_tx = time.monotonic()

    async def flush(self) -> None:
        await self.write(self.core.data_to_send())

    async def run(self, handshake_timeout: float) -> None:
        """Handshake, then read until the connection ends; raises what ended it."""
        await self.flush()  # an active connection's connreq + hello
        deadline = time.monotonic() + handshake_timeout
        while True:
            try:
                if self.core.state is not State.ESTABLISHED:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise HandshakeError(f"no hello within {handshake_timeout:g} s (stopped in the {self.core.expecting()})")
                    try:
                        data = await asyncio.wait_for(self.reader.read(READ_SIZE), left)
                    except asyncio.TimeoutError:
                        continue
                else:
                    await self.driver.window_for(self).wait()
                    data = await self.reader.read(READ_SIZE)
            except OSError as e:
                raise _translate(e, _IO_ERRORS, f"read from {self.address}") from None
            if self.closed:
                return  # we closed it (driver closing, node restarted)
            if not data:
                if self.core.at_boundary():
                    raise ConnectionClosed(f"{self.address} closed the connection")
                raise RemoteProtocolError(f"{self.address} closed the connection in the middle of the {self.core.expecting()}")
            error: RemoteProtocolError | None = None
            try:
                self.core.receive_data(data)
            except RemoteProtocolError as e:
                error = e  # what came before the bad bytes is still handled, as the kernel would
            pending = self.core.data_to_send()  # ZC-ACKs, or a refusal hello
            if pending:
                try:
                    await self.write(pending)
                except WriteError:
                    if error is None:
                        raise
            while (ev := self.core.next_event()) is not None:
                if isinstance(ev, Established):
                    if error is None:  # a connection that is already bad never joins its peer
                        self.driver.on_established(self, ev)
                elif isinstance(ev, LnetReceived):
                    self.driver.on_lnet(self, ev)
                # Keepalive / ZcAcked: nothing to do (we never ask for zero copy)
            if error is not None:
                raise error

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.core.close()
            self.writer.close()


@dataclass(eq=False)
class KernelPeer:
    """A kernel node on the LAN: its connections, its send queue and the task draining it."""

    nid: Nid
    nid4: int
    conns: list[LanConn] = field(default_factory=list)
    queue: collections.deque[TxMsg] = field(default_factory=collections.deque)
    incarnation: int | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    connecting: dict[ConnType, asyncio.Task[None]] = field(default_factory=dict)
    last_error: str = ""
    sent: int = 0
    failed: int = 0
    discovered: list[tuple[int, int]] | None = None  # (nid4, status) of its NIs, from lu2kd's last discover

    def pick(self, size: int, min_bulk: int) -> LanConn | None:
        """The connection for a message of ``size`` bytes, as ksocknal_match_tx_v3 prefers them."""
        want = ConnType.BULK_OUT if size >= min_bulk else ConnType.CONTROL
        order = (want, ConnType.ANY, ConnType.CONTROL if want is ConnType.BULK_OUT else ConnType.BULK_OUT, ConnType.BULK_IN)
        live = [c for c in self.conns if not c.closed and c.core.state is State.ESTABLISHED]
        for ctype in order:
            for c in live:
                if c.ctype is ctype:
                    return c
        return None


class SocklndDriver:
    """lu2kd's NI on one socklnd LAN; attach with ``engine.attach_lan(net, driver)``."""

    def __init__(self, nc: NetConfig, engine: EngineLike, *, remote_gateways: dict[Net, list[Nid]] | None = None,
                 peer_addresses: dict[Nid, str] | None = None,
                 next_hop: Callable[[Nid], Nid | None] | None = None, tunables: SocklndTunables | None = None) -> None:
        from ..backends.base import BackendSettings

        self.config = nc
        self.engine = engine
        self.net: Net = nc.net
        self.nid: Nid = nc.nid
        self.nid4 = idl.nid4_of(nc.nid)
        tun = tunables or SocklndTunables.from_settings(
            BackendSettings(nc.net, nc.port, nc.max_message_size, nc.profile, nc.key, dict(nc.options)),
            credits=nc.credits, peer_credits=nc.peer_credits)
        self.tun = replace(tun, checksum=nc.checksum)
        self.incarnation = time.time_ns() & 0x7FFFFFFFFFFFFFFF  # as ksocknal_new_incarnation
        self.peer_addresses = dict(peer_addresses or {})
        self.next_hop = next_hop
        self.remote_gateways: dict[Net, list[Nid]] = {}
        self.remote_nids: dict[Net, Nid] = {}
        # Per remote net: True/False once a probe answered, None before (shown DOWN, still forwarded).
        self.remote_up: dict[Net, bool | None] = {}
        self.own_nid4s: frozenset[int] = frozenset({self.nid4})
        self.set_remote_gateways(remote_gateways or {})
        self.conn_config = ConnConfig(local_nids=frozenset({self.nid4}), incarnation=self.incarnation,
                                      version=self.tun.protocol, send_checksums=self.tun.checksum)
        self.responder = RouterResponder(discovery=self.tun.discovery)
        # The interface cookie is random per instance, so a REPLY meant for an earlier lu2kd never matches.
        self.pinger = LanPinger(self.nid4, int.from_bytes(os.urandom(8), "little"))
        self._pings: dict[int, asyncio.Future[PingDone]] = {}
        self.peers: dict[int, KernelPeer] = {}
        self.conns: set[LanConn] = set()
        self.stats = collections.Counter[str]()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.windows = {"control": RxWindow(self.tun.rx_window_msgs, self.tun.rx_window_bytes),
                        "bulk": RxWindow(self.tun.rx_window_msgs, self.tun.rx_window_bytes)}
        self.closing = False
        self.pushed: dict[int, list[tuple[int, int]]] = {}  # NIs each node told us in a discovery push

    def set_remote_gateways(self, remote_gateways: dict[Net, list[Nid]]) -> None:
        """The nets routed over lu2k and their lu2k gateways (at start, and when routes change).

        We show one NID on each such net (``remote_nids``, else our LAN address on it), its
        status decided by a probe of the gateways; a net no longer routed is no longer shown.
        """
        self.remote_gateways = {net: list(gws) for net, gws in remote_gateways.items()}
        remote_nids: dict[Net, Nid] = {n.net: n for n in self.tun.remote_nids}
        for rnet in self.remote_gateways:
            if rnet not in remote_nids and rnet.type == "tcp" and isinstance(self.nid.addr, ipaddress.IPv4Address):
                remote_nids[rnet] = Nid(self.nid.addr, rnet)
        self.remote_nids = remote_nids
        self.remote_up = {n: self.remote_up.get(n) for n in remote_nids}
        self.own_nid4s = frozenset({self.nid4, *(idl.nid4_of(n) for n in remote_nids.values())})

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        host = self.config.listen or self.nid.host
        try:
            self.server = await asyncio.start_server(self._on_accept, host, self.tun.port, reuse_address=True,
                                                     limit=READ_SIZE)
        except OSError as e:
            raise _translate(e, _CONNECT_ERRORS, f"socklnd acceptor on {host}:{self.tun.port}") from None
        self._spawn(self._tick())
        self._spawn(self._probe_remote())  # remote nets may come with a later route add
        log.info("socklnd net up", net=str(self.net), nid=str(self.nid), listen=f"{host}:{self.address[1]}",
                 secure_accept=self.tun.secure_accept, protocol=self.tun.protocol,
                 remote_nids=[str(n) for n in self.remote_nids.values()])

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        addr = self.server.sockets[0].getsockname()
        return str(addr[0]), int(addr[1])

    async def close(self, reason: str = "socklnd net closing") -> None:
        self.closing = True
        if self.server is not None:
            self.server.close()
        for p in self.peers.values():
            while p.queue:
                p.queue.popleft().finish(Status.CANCELLED, reason)
            if p.task:
                p.task.cancel()
            for t in p.connecting.values():
                t.cancel()
        for c in list(self.conns):
            c.close()
        for cookie in list(self._pings):  # pings whose GET went out: no REPLY can come any more
            end = self.pinger.fail(cookie, NetworkError(f"ping abandoned: {reason}"))
            if end is not None:
                self._ping_ended(end)
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.windows.values():
            w.space.set()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- the LAN: accepting ----------------------------------------------------------------------

    async def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername") or ("?", 0)
        address = f"{peername[0]}:{peername[1]}"
        if self.closing:
            writer.close()
            return
        if not proto.source_port_allowed(int(peername[1]), self.tun.secure_accept):
            self.stats["conns_refused"] += 1
            log.warning("refused LAN connection", net=str(self.net), via=address,
                        reason=f"insecure source port {peername[1]} (secure_accept allows 1023 and below)")
            writer.close()
            return
        _setup_socket(writer, self.tun)
        task = asyncio.current_task()
        if task is not None:  # so close() ends it too
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        conn = LanConn(self, reader, writer, KsockConnection(self.conn_config, active=False), address)
        try:
            await self._run_conn(conn)
        except asyncio.CancelledError:
            pass  # driver closing: asyncio's server callback must not see the cancel

    async def _run_conn(self, conn: LanConn) -> None:
        self.conns.add(conn)
        try:
            await conn.run(self.tun.connect_timeout)
        except ConnectionClosed as e:
            log.info("LAN connection closed", net=str(self.net), peer=self._who(conn), reason=str(e))
        except RemoteProtocolError as e:
            if conn.core.active and not conn.established:  # the node refused us (e.g. a lost connection race)
                self.stats["connects_refused_by_node"] += 1
                log.info("LAN node refused our connection", net=str(self.net), peer=self._who(conn), reason=str(e))
            else:
                self.stats["bad_frames" if conn.established else "conns_refused"] += 1
                log.warning("closing LAN connection", net=str(self.net), peer=self._who(conn), reason=str(e))
            if conn.peer is not None:
                conn.peer.last_error = str(e)
        except (NetworkError, OSError) as e:
            log.info("LAN connection lost", net=str(self.net), peer=self._who(conn), reason=str(e))
            if conn.peer is not None:
                conn.peer.last_error = str(e)
        finally:
            conn.close()
            self.conns.discard(conn)
            if conn.peer is not None and conn in conn.peer.conns:
                conn.peer.conns.remove(conn)

    def _who(self, conn: LanConn) -> str:
        return f"{conn.peer.nid} ({conn.address})" if conn.peer else conn.address

    def on_established(self, conn: LanConn, ev: Established) -> None:
        try:
            nid = idl.nid_of4(ev.peer_nid)
        except NidError as e:
            raise HandshakeError(f"peer NID does not decode: {e}") from None
        if nid.net != self.net:
            raise HandshakeError(f"peer {nid} is not on net {self.net}")
        peer = self._peer(nid)
        if peer.incarnation is not None and peer.incarnation != ev.incarnation:
            log.info("LAN node restarted; dropping its old connections", peer=str(nid))
            for old in list(peer.conns):
                old.close()
            peer.conns.clear()
        peer.incarnation = ev.incarnation
        conn.peer, conn.established = peer, True
        peer.conns.append(conn)
        peer.wake.set()
        log.info("LAN connection up", net=str(self.net), peer=str(nid), type=ev.ctype.name, version=ev.version,
                 via=conn.address, active=conn.core.active)

    def _peer(self, nid: Nid) -> KernelPeer:
        nid4 = idl.nid4_of(nid)
        p = self.peers.get(nid4)
        if p is None:
            p = self.peers[nid4] = KernelPeer(nid, nid4)
        return p

    # -- the LAN: receiving -----------------------------------------------------------------------

    def window_for(self, conn: LanConn) -> RxWindow:
        return self.windows["control" if conn.ctype is ConnType.CONTROL else "bulk"]

    @property
    def rx_msgs(self) -> int:
        return sum(w.msgs for w in self.windows.values())

    @property
    def rx_bytes(self) -> int:
        return sum(w.bytes for w in self.windows.values())

    def on_lnet(self, conn: LanConn, ev: LnetReceived) -> None:
        hdr = ev.hdr
        self.stats["lan_rx_msgs"] += 1
        if hdr.dest_nid in self.own_nid4s:
            self._for_me(hdr, ev.payload)
            return
        try:
            dst = idl.nid_of4(hdr.dest_nid)
            src = idl.nid_of4(hdr.src_nid)
        except NidError as e:
            self.stats["dropped"] += 1
            log.warning("dropped LAN message", peer=self._who(conn), reason=f"undecodable NID: {e}")
            return
        if dst.net == self.net:
            self.stats["dropped"] += 1
            log.warning("dropped LAN message", peer=self._who(conn),
                        reason=f"{hdr.describe()}: the destination is on this LAN; lu2kd only routes to remote nets")
            return
        if self.remote_up.get(dst.net) is False:
            # As a kernel router whose remote NI is down: drop now (LNet retries or times it out)
            # rather than hold the read window until the transaction timeout.
            self.stats["dropped_remote_down"] += 1
            log.debug("dropped LAN message", msg=hdr.describe(), reason=f"the lu2k hop to {dst.net} is down")
            return
        size = len(ev.wire)
        window = self.window_for(conn)
        window.take(size)
        released = False

        def finished(status: Status, reason: str) -> None:
            nonlocal released
            if released:
                return
            released = True
            window.give(size)
            if status is Status.DELIVERED:
                self.stats["forwarded"] += 1
            else:
                self.stats["forward_failed"] += 1
                log.info("LAN message not delivered across lu2k (LNet retries or times it out)", msg=hdr.describe(),
                         status=status.name, reason=reason)

        try:
            self.engine.send(src.to_bytes(), dst, 0, idl.LNET_PORTAL, memoryview(ev.wire), finished)
        except Lu2kError as e:
            finished(Status.NO_ROUTE, str(e))

    def _for_me(self, hdr: proto.LnetHdr, payload: bytes | bytearray | memoryview) -> None:
        """A message addressed to one of our NIDs: a REPLY to one of our pings, or one to answer."""
        if hdr.type is idl.LnetMsgType.REPLY:
            end = self.pinger.handle(hdr, payload, time.monotonic())
            if isinstance(end, Dropped):
                self.stats["dropped"] += 1
                log.info("LNet message for lu2kd", note=end.note)
            else:
                self._ping_ended(end)
            return
        answer = self.responder.handle(hdr, bytes(payload), self.ping_nis())
        self.stats["answered" if answer.reply else "dropped"] += 1
        if answer.pushed is not None:
            self.pushed[hdr.src_nid] = answer.pushed.nis
        (log.debug if answer.reply or answer.pushed else log.info)("LNet message for lu2kd", note=answer.note)
        if answer.reply is not None:
            raw, data = answer.reply
            self._send_lnet(raw + data, lambda st, why: None if st is Status.DELIVERED else log.info(
                "router answer not delivered", to=idl.nid4_str(hdr.src_nid), status=st.name, reason=why))

    def ping_nis(self) -> list[tuple[int, bool]]:
        return [(self.nid4, True)] + [(idl.nid4_of(n), self.remote_up.get(net) is True) for net, n in self.remote_nids.items()]

    def _send_lnet(self, wire: bytes, on_done: Callable[[Status, str], None]) -> None:
        """An LNet message we originate (a router answer): to the LAN or across lu2k."""
        dest, src, _ = proto.peek_route(wire)
        try:
            dst = idl.nid_of4(dest)
        except NidError as e:
            on_done(Status.INVALID, str(e))
            return
        if dst.net == self.net:
            self._queue(dst, TxMsg(wire, time.monotonic() + self.tun.timeout, on_done, self.tun.timeout))
            return
        try:
            self.engine.send(idl.nid_of4(src).to_bytes(), dst, 0, idl.LNET_PORTAL, wire, on_done)
        except Lu2kError as e:
            on_done(Status.NO_ROUTE, str(e))

    # -- lu2kd's own pings of LAN nodes (lnet_ping) ------------------------------------------------

    async def ping_lan(self, nid: Nid, timeout: float) -> PingReply:
        """Ping a node on this LAN as ``lnetctl ping`` does: a GET to its ping target, then its REPLY.

        The GET takes the normal path to the node (connecting as for any message: typed
        connections from a privileged port).  Raises :class:`NetworkTimeout` when no REPLY
        comes within ``timeout`` seconds (a node that is not there, or whose LNet drops the
        GET), :class:`NetworkError` when the GET cannot be sent, and a
        :class:`RemoteProtocolError` when the REPLY's ping info does not decode.
        """
        if nid.net != self.net:
            raise LocalProtocolError(f"{nid} is not on socklnd net {self.net}")
        if self.closing:
            raise NetworkError(f"cannot ping {nid}: socklnd net {self.net} closing")
        nid4 = idl.nid4_of(nid)
        if nid4 == self.nid4:
            return PingReply(nid4, self.responder.ping_info(self.ping_nis()), 0.0, local=True)
        now = time.monotonic()
        cookie, get = self.pinger.start(nid4, now)
        ended: asyncio.Future[PingDone] = asyncio.get_running_loop().create_future()
        self._pings[cookie] = ended
        sent = False

        def on_sent(status: Status, reason: str) -> None:
            nonlocal sent
            if status is Status.DELIVERED:
                sent = True
                return
            end = self.pinger.fail(cookie, NetworkError(f"the ping GET to {nid} was not sent: {reason}"))
            if end is not None:
                self._ping_ended(end)

        # The ping's own timer below ends it (and cancels the GET if it is still queued), so a
        # node that cannot be reached reads "no reply within <timeout>" with the connect error;
        # the message's deadline is only a backstop.
        msg = TxMsg(get, now + 2 * timeout, on_sent, 2 * timeout)
        self.stats["pings_sent"] += 1
        self._queue(nid, msg)
        try:
            end = await asyncio.wait_for(ended, timeout)
        except asyncio.TimeoutError:
            self.stats["pings_failed"] += 1
            peer = self.peers.get(nid4)
            if sent:
                why = "the node took the GET; its LNet did not answer"
            else:
                why = "the GET was never sent" + (f": {peer.last_error}" if peer is not None and peer.last_error else "")
            raise NetworkTimeout(f"no reply from {nid} within {timeout:g} s ({why})") from None
        finally:
            self._pings.pop(cookie, None)
            self.pinger.forget(cookie)
            msg.finish(Status.CANCELLED, "ping over")  # a GET still queued is not sent after its ping ended
        if end.error is not None:
            self.stats["pings_failed"] += 1
            raise end.error
        assert end.reply is not None
        return end.reply

    async def discover_lan(self, nid: Nid, timeout: float) -> PingReply:
        """``lnetctl discover`` of a LAN node: ping it and keep the NIs it lists (shown in ``net show``).

        lu2kd does not push its own ping info to the node: nodes learn lu2kd's NIs by their
        own discovery of it, as they discover any gateway.
        """
        reply = await self.ping_lan(nid, timeout)
        if not reply.local:
            self._peer(nid).discovered = list(reply.nis)
        return reply

    def _ping_ended(self, end: PingDone) -> None:
        fut = self._pings.get(end.cookie)
        if fut is not None and not fut.done():
            fut.set_result(end)

    # -- from lu2k: transmitting --------------------------------------------------------------------

    def transmit(self, src_raw: bytes, dst_raw: bytes, src_portal: int, dst_portal: int, payload: memoryview | bytes,
                 on_done: Callable[[Status, str], None]) -> None:
        """A message from lu2k whose next hop is on this LAN; ``on_done`` ends it exactly once."""
        if self.closing:
            on_done(Status.CANCELLED, f"socklnd net {self.net} closing")
            return
        if dst_portal != idl.LNET_PORTAL:
            on_done(Status.INVALID, f"socklnd net {self.net} carries LNet messages only (portal {idl.LNET_PORTAL:#x}), not portal {dst_portal}")
            return
        if len(payload) < idl.LNET_HDR_NID4_SIZE:
            on_done(Status.PROTOCOL, f"LNet message of {len(payload)} bytes is shorter than its header")
            return
        dest, _, plen = proto.peek_route(payload)
        if plen != len(payload) - idl.LNET_HDR_NID4_SIZE:
            on_done(Status.PROTOCOL, f"LNet header says {plen} payload bytes, the message carries {len(payload) - idl.LNET_HDR_NID4_SIZE}")
            return
        try:
            dst = Nid.from_bytes(dst_raw)
            if idl.nid4_of(dst) != dest:
                raise NidError(f"lu2k destination {dst} differs from the LNet header's {idl.nid4_str(dest)}")
        except NidError as e:
            on_done(Status.PROTOCOL, str(e))
            return
        if dest in self.own_nid4s:
            try:
                hdr = proto.LnetHdr.unpack(payload[: idl.LNET_HDR_NID4_SIZE])
            except RemoteProtocolError as e:
                on_done(Status.PROTOCOL, str(e))
                return
            self._for_me(hdr, payload[idl.LNET_HDR_NID4_SIZE :])
            on_done(Status.DELIVERED, "")
            return
        hop = dst
        if dst.net != self.net:
            gateway = self.next_hop(dst) if self.next_hop else None
            if gateway is None or gateway.net != self.net:
                on_done(Status.NO_ROUTE, f"no route from LAN {self.net} to net {dst.net}")
                return
            hop = gateway
        self._queue(hop, TxMsg(payload, time.monotonic() + self.tun.timeout, on_done, self.tun.timeout))

    def _queue(self, hop: Nid, msg: TxMsg) -> None:
        peer = self._peer(hop)
        if len(peer.queue) >= self.tun.max_queued:
            self.stats["queue_full"] += 1
            msg.finish(Status.NO_ROUTE, f"send queue to {hop} full ({self.tun.max_queued} messages): the node is not reading")
            return
        peer.queue.append(msg)
        peer.wake.set()
        if peer.task is None or peer.task.done():
            peer.task = self._spawn(self._pump(peer))

    async def _pump(self, peer: KernelPeer) -> None:
        """Drain one node's queue in order, connecting when there is no usable connection."""
        while peer.queue and not self.closing:
            msg = peer.queue[0]
            now = time.monotonic()
            if msg.done:
                peer.queue.popleft()
                continue
            if msg.deadline <= now:
                peer.queue.popleft()
                peer.failed += 1
                msg.finish(Status.TIMED_OUT if peer.conns else Status.NO_ROUTE,
                           f"not sent to {peer.nid} within {msg.timeout:g} s" + (f" ({peer.last_error})" if peer.last_error else ""))
                continue
            conn = peer.pick(len(msg.wire), self.tun.min_bulk)
            if conn is None:
                self._connect_all(peer)
                peer.wake.clear()
                try:
                    await asyncio.wait_for(peer.wake.wait(), msg.deadline - now)
                except asyncio.TimeoutError:
                    pass
                continue
            peer.queue.popleft()
            view = memoryview(msg.wire)
            try:
                conn.core.send_lnet(bytes(view[: idl.LNET_HDR_NID4_SIZE]), view[idl.LNET_HDR_NID4_SIZE :])
                await conn.flush()
            except (NetworkError, LocalProtocolError) as e:
                peer.failed += 1
                conn.close()
                msg.finish(Status.NO_ROUTE, f"connection to {peer.nid} lost while sending: {e}")
                continue
            peer.sent += 1
            self.stats["lan_tx_msgs"] += 1
            msg.finish(Status.DELIVERED, "")

    # -- the LAN: connecting ------------------------------------------------------------------------

    def _connect_all(self, peer: KernelPeer) -> None:
        for ctype in idl.V3_CONN_TYPES:
            if any(c.ctype is ctype and not c.closed for c in peer.conns):
                continue
            t = peer.connecting.get(ctype)
            if t is None or t.done():
                peer.connecting[ctype] = self._spawn(self._connect(peer, ctype))

    def _address_of(self, nid: Nid) -> tuple[str, int]:
        override = self.peer_addresses.get(nid)
        if override:
            host, _, port = override.rpartition(":")
            return host.strip("[]"), int(port)
        return nid.host, self.tun.peer_port

    async def _connect(self, peer: KernelPeer, ctype: ConnType) -> None:
        """Keep one connection of ``ctype`` to ``peer`` while it has messages queued."""
        delay = RECONNECT_MIN
        while peer.queue and not self.closing:
            host, port = self._address_of(peer.nid)
            try:
                reader, writer = await self._open(host, port)
            except NetworkError as e:
                peer.last_error = str(e)
                log.info("LAN connect failed", peer=str(peer.nid), type=ctype.name, error=str(e), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            core = KsockConnection(self.conn_config, active=True, local_nid=self.nid4, peer_nid=peer.nid4, ctype=ctype)
            conn = LanConn(self, reader, writer, core, f"{host}:{port}")
            await self._run_conn(conn)  # until the connection ends
            if conn.established:
                delay = RECONNECT_MIN
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)

    async def _open(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect from a privileged port (1023 down to 512), as lnet_connect does, unless told not to."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        local = self.config.listen or self.nid.host
        ports: Sequence[int] = (range(idl.LNET_ACCEPTOR_MAX_RESERVED_PORT, idl.LNET_ACCEPTOR_MIN_RESERVED_PORT - 1, -1)
                                if self.tun.privileged_connect else (0,))
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for lport in ports:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setblocking(False)
                sock.bind((local, lport))
                await asyncio.wait_for(loop.sock_connect(sock, (host, port)), self.tun.connect_timeout)
            except OSError as e:
                sock.close()
                if e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    last = e
                    continue
                if e.errno == errno.EACCES and lport:
                    raise ConnectError(f"connect to {host}:{port}: binding source port {lport} needs root or CAP_NET_BIND_SERVICE "
                                       "(or privileged_connect: false, which kernel nodes will not connect back to)") from None
                raise _translate(e, _CONNECT_ERRORS, f"connect to {host}:{port}") from None
            except asyncio.TimeoutError as e:
                sock.close()
                raise _translate(e, _CONNECT_ERRORS, f"connect to {host}:{port}") from None
            except BaseException:
                sock.close()
                raise
            reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
            _setup_socket(writer, self.tun)
            return reader, writer
        raise ConnectError(f"connect to {host}:{port}: no privileged source port free (1023..512)"
                           + (f": {last.strerror}" if last and last.strerror else ""))

    # -- timers ----------------------------------------------------------------------------------------

    async def _tick(self) -> None:
        """Keepalive NOOPs on idle connections; expire queued messages of idle pumps."""
        period = max(0.05, min(self.tun.keepalive / 2, 1.0))
        while not self.closing:
            await asyncio.sleep(period)
            now = time.monotonic()
            for c in list(self.conns):
                if c.core.state is State.ESTABLISHED and not c.closed and now - c.last_tx >= self.tun.keepalive:
                    c.core.send_keepalive()
                    c.last_tx = now
                    self._spawn(self._quiet_flush(c))
            for p in self.peers.values():
                if p.queue and (p.task is None or p.task.done()):
                    p.task = self._spawn(self._pump(p))

    async def _quiet_flush(self, conn: LanConn) -> None:
        try:
            await conn.flush()
        except (NetworkError, LocalProtocolError):
            conn.close()

    async def _probe_remote(self) -> None:
        """Is the lu2k hop to each remote net up?  Decides the status of its NI in our pings."""
        # Loops check ``closing`` too: asyncio.wait_for in Python 3.11 can swallow a cancel.
        while not self.closing:
            for rnet, gateways in list(self.remote_gateways.items()):
                if rnet not in self.remote_nids:
                    continue
                up, why = False, "no gateway"
                for gw in gateways:  # up while any of the net's lu2k gateways answers
                    try:
                        await self.engine.ping(gw, timeout=self.tun.probe_interval)
                        up, why = True, ""
                        break
                    except Lu2kError as e:
                        why = f"{gw}: {e}"
                if up != self.remote_up.get(rnet):
                    (log.info if up else log.warning)("remote net " + ("up" if up else "down"), net=str(rnet), reason=why)
                if rnet in self.remote_nids:  # not dropped by a route change during the probe
                    self.remote_up[rnet] = up
            await asyncio.sleep(self.tun.probe_interval)

    # -- control -----------------------------------------------------------------------------------------

    def describe_peer(self, peer: KernelPeer) -> dict[str, Any]:
        out: dict[str, Any] = {"nid": str(peer.nid), "conns": sorted(c.ctype.name.lower() for c in peer.conns if not c.closed),
                               "queued": len(peer.queue), "sent": peer.sent, "failed": peer.failed, "last_error": peer.last_error}
        if peer.discovered is not None:
            out["nis"] = _describe_nis(peer.discovered)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "net": str(self.net), "nid": str(self.nid), "status": "up", "backend": "socklnd",
            "listen": f"{self.address[0]}:{self.address[1]}" if self.server else None,
            "tunables": {"peer_credits": self.tun.peer_credits, "credits": self.tun.rx_window_msgs},
            "remote_nis": [{"nid": str(n), "status": "up" if self.remote_up.get(net) else "down",
                            "gateways": [str(g) for g in self.remote_gateways.get(net, [])]} for net, n in self.remote_nids.items()],
            "rx_window": {k: {"msgs": w.msgs, "bytes": w.bytes} for k, w in self.windows.items()},
            "peers": [self.describe_peer(p) for p in self.peers.values()],
            "stats": dict(self.stats),
        }


def _describe_nis(nis: list[tuple[int, int]]) -> dict[str, str]:
    return {idl.nid4_str(n): ni_status_name(s) for n, s in nis}


def _setup_socket(writer: asyncio.StreamWriter, tun: SocklndTunables) -> None:
    """Socket options as ksocknal_lib_setup_sock sets them: buffer sizes, no Nagle, TCP keepalive
    (so a dead node's connections end)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        if tun.tx_buffer_size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, tun.tx_buffer_size)
        if tun.rx_buffer_size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, tun.rx_buffer_size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(tun.keepalive)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 9)
    except OSError:
        pass  # best effort: the socket may already be gone
