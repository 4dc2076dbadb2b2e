"""The daemon's engine: the asyncio pump around the message core.

Everything LNet means by a message -- routing, credits, sequence numbers, ACKs, resends,
dedupe, PEER_RESTARTED, transaction timeouts, gateway forwarding -- lives in the pure
:class:`lu2k.core.Node` (see its module docstring and :mod:`lu2k.core.states`).  This
module only moves bytes and time in and out of it, the way aioquic's
``asyncio/protocol.py`` drives ``QuicConnection``:

* backends' transports and the shim produce inputs (a message submitted, a connection
  up, frames received, a send finished, a connection lost), each handed to the node with
  ``now`` = the loop's monotonic clock;
* :meth:`Engine._transmit` then carries out the node's actions (connect, wake a writer,
  send ACKs, deliver to a shim port, complete a message, close) and re-arms the one
  timer the node asks for (:meth:`Node.get_timer`).

Per outgoing connection one task connects, runs the hello (:meth:`Engine._hello`, the
one place a hello is driven, for both sides) and then writes the batches the node hands
out while a reader task feeds the ACKs back.  Per accepted connection one task runs the
hello and feeds MSG frames in, pausing while the node says the connection is blocked
(its deliveries or forwards wait): that is the back-pressure on the sending peer.

Statuses are decided by exception *type* (:data:`REFUSALS`), never by an error's text.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog

from . import wire
from .backends import Backend, Transport, get_backend
from .core import NI as CoreNI
from .core import (
    PING_PORTAL, AbortRx, Adopt, Close, CloseIn, Complete, Connect, Deliver, Delivery, InConn, LanTransmit, NetParams, Node,
    NodeParams, OutConn, OutMsg, Peer, PingDone, Resume, SendIn, Wake,
)
from .core.returnpath import ANSWERS, REQUESTS
from .credits import Credits
from .inet import format_hostport
from .errors import (
    AuthenticationError, ConnectionClosed, FrameError, HandshakeError, LocalProtocolError, Lu2kError, NetworkError,
    NetworkTimeout, RemoteProtocolError, Status,
)
from .kernel_shim.access import RateLimitedLog
from .kernel_shim.ports import RxBuffer, SendRequest
from .nid import Net, Nid
from .routing import Route
from .settings import DaemonConfig, NetConfig
from .wire import FrameType

log = structlog.get_logger("lu2k.engine")

# A refused hello fails what waits for that peer at once; anything else is retried.
REFUSALS: dict[type[Lu2kError], Status] = {AuthenticationError: Status.AUTH_FAILED, HandshakeError: Status.PROTOCOL}
# Frames of one read handed to the core at a time: a quarter of the peer credits, at most
# RX_SLICE.  A read can hold a peer's whole credit window of small messages; between slices
# the loop runs, so the ACK (the peer's credits) for the first slice leaves while the rest is
# handled and the peer keeps sending.
RX_SLICE = 64


def rx_slice(peer_credits: int) -> int:
    return max(1, min(RX_SLICE, peer_credits // 4))


def _reverse_blocked(conn: OutConn) -> bool:
    """The peer's requests on ``conn``'s reverse direction must wait (their InConn is blocked)."""
    rev = conn.rev_in
    return rev is not None and rev.alive and rev.blocked


def refusal_status(error: Lu2kError) -> Status | None:
    for cls in type(error).__mro__:
        if cls in REFUSALS:
            return REFUSALS[cls]
    return None


class ShimPort(Protocol):
    """What the engine uses of one attached endpoint (:class:`lu2k.kernel_shim.server.ShimPort`).
    Its RX slots and requests are :mod:`lu2k.kernel_shim.ports`' ``RxBuffer``/``SendRequest``."""

    portal: int
    pid: int
    attached: bool
    max_message_size: int

    @property
    def region(self) -> Any: ...  # the shared mmap, for backends that register memory

    def rx_alloc(self, size: int) -> RxBuffer | None: ...

    async def rx_wait(self) -> None: ...

    def rx_abort(self, buf: RxBuffer) -> None: ...

    def deliver(self, buf: RxBuffer, src_nid: bytes, src_portal: int, length: int) -> None: ...

    def complete(self, req: SendRequest, status: Status, reason: str = "") -> None: ...

    def stats(self) -> dict[str, Any]: ...  # lu2kctl endpoint show


class Shim(Protocol):
    """The shim server as the engine sees it (:class:`lu2k.kernel_shim.server.ShimServer`)."""

    @property
    def ports(self) -> Mapping[int, ShimPort]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class LanDriver(Protocol):
    """A LAN an LNet router serves (see :meth:`Engine.attach_lan`)."""

    def transmit(self, src_raw: bytes, dst_raw: bytes, src_portal: int, dst_portal: int, payload: memoryview | bytes,
                 on_done: Callable[[Status, str], None]) -> None: ...


async def _frames_or(recv: asyncio.Future[Any], resume: asyncio.Event) -> bool:
    """Wait until frames arrive (``recv`` done: True) or ``resume`` is set (held frames may go
    on now: False) -- a connection whose frames are held keeps reading the others."""
    resume.clear()
    waiter = asyncio.ensure_future(resume.wait())
    await asyncio.wait({recv, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    return recv.done()


class NI:
    """A local network interface's I/O side: its backend and listener (the core holds the rest)."""

    def __init__(self, engine: "Engine", config: NetConfig, backend: Backend) -> None:
        self.engine, self.config, self.backend = engine, config, backend
        self.net: Net = config.net
        self.nid: Nid = config.nid
        self.listener: Any = None

    @property
    def core(self) -> CoreNI:
        return self.engine.core.nis[self.net]

    @property
    def credits(self) -> Credits:
        return self.core.credits

    @property
    def queued(self) -> int:
        return int(self.core.queued)

    @property
    def peers(self) -> dict[Nid, Peer]:
        return dict(self.core.peers)


class _OutLink:
    """The transport of one connection attempt of an OutConn."""

    def __init__(self, conn: OutConn, attempt: int) -> None:
        self.conn, self.attempt = conn, attempt
        self.transport: Transport | None = None
        self.wake = asyncio.Event()
        self.closed = False
        self.resume = asyncio.Event()  # requests on its reverse direction may be read again (returnpath)


class _InLink:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.resume = asyncio.Event()
        self.tokens: set[RxBuffer] = set()  # receive buffers handed to the decoder, not yet in a frame


class Engine:
    """Everything the daemon does, minus the process plumbing (see :mod:`lu2k.daemon`)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.incarnation = int.from_bytes(os.urandom(8), "little") | 1
        self.core = Node(self._node_params(config), [Route(r.net, r.gateway, r.hops, r.priority) for r in config.routes])
        self.core.set_peer_addresses({p.nid: p.address for p in config.peers if p.address})
        self.core.set_return_paths({n.net: n.paths for n in config.nets}, {p.nid: p.paths for p in config.peers})
        self._config = config
        self.discovered: dict[Nid, list[Nid]] = {}  # multi-rail peers learned by ``discover`` (primary -> NIDs)
        self.apply_rails()
        self.nis: dict[Net, NI] = {}
        self.lans: dict[Net, LanDriver] = {}
        self.stats: collections.Counter[str] = self.core.stats  # one set of counters: the core's and the pump's
        self.refusal_log = RateLimitedLog(log)
        self.closing = False
        self.background: set[asyncio.Task[Any]] = set()
        self.shim: Shim | None = None
        self._out: dict[OutConn, _OutLink] = {}
        self._in: dict[InConn, _InLink] = {}
        self._pings: dict[int, asyncio.Future[PingDone]] = {}
        self._packed: dict[Nid, bytes] = {}
        self._rx_queues: dict[ShimPort, collections.deque[Delivery]] = {}  # deliveries waiting for an endpoint's buffers
        self._registered: dict[ShimPort, list[tuple[Any, Any]]] = {}  # shim port -> backend memory registrations
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._transmitting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started = time.time()

    def _node_params(self, config: DaemonConfig) -> NodeParams:
        g = config.global_
        return NodeParams(incarnation=self.incarnation, transaction_timeout=g.transaction_timeout,
                          reconnect_min=g.reconnect_min, reconnect_max=g.reconnect_max,
                          health_sensitivity=g.health_sensitivity, recovery_interval=g.recovery_interval,
                          routing=config.routing, router_buffer_bytes=g.router_buffer_bytes)

    @property
    def config(self) -> DaemonConfig:
        return self._config

    @config.setter
    def config(self, config: DaemonConfig) -> None:
        """A new configuration (``lu2kctl set``/``import``): globals, routing and return paths
        apply at once."""
        self._config = config
        self.core.params = self._node_params(config)
        self.core.set_return_paths({n.net: n.paths for n in config.nets}, {p.nid: p.paths for p in config.peers})
        self.apply_rails()
        if self._loop is not None:
            self._transmit()  # a peer newly held gets its connection now

    def apply_rails(self) -> None:
        """Multi-rail peers (lu2k.core.rails): the configured ones, then those ``discover`` found."""
        groups = {p.nid: p.rails for p in self.config.peers if len(p.rails) > 1}
        taken = {n for nids in groups.values() for n in nids}
        for prim, nids in self.discovered.items():
            if prim not in groups and not taken & set(nids):
                groups[prim] = nids
        self.core.set_rails(groups)

    def now(self) -> float:
        return time.monotonic()

    # -- the pump ---------------------------------------------------------------------------

    def _transmit(self) -> None:
        """Carry out every action the core produced, then re-arm its timer."""
        if self._transmitting:
            return  # an action fed the core again; the loop below picks up what that produced
        self._transmitting = True
        core = self.core
        try:
            while True:
                actions = core.take_actions()
                if not actions:
                    break
                for a in actions:
                    try:
                        if isinstance(a, Complete):
                            assert a.msg.on_finish is not None
                            a.msg.on_finish(a.status, a.reason)
                        elif isinstance(a, Deliver):
                            self._deliver(a.delivery)
                        elif isinstance(a, Wake):
                            link = self._out.get(a.conn)
                            if link is not None:
                                link.wake.set()
                        elif isinstance(a, SendIn):
                            self._send_in(a)
                        elif isinstance(a, Resume):
                            inl = self._in.get(a.conn)
                            if inl is not None:
                                inl.resume.set()
                            elif a.conn.out is not None and (link := self._out.get(a.conn.out)) is not None:
                                link.resume.set()
                        elif isinstance(a, Connect):
                            self._spawn(self._run_out(a))
                        elif isinstance(a, Adopt):
                            self._spawn(self._run_reverse(a))
                        elif isinstance(a, AbortRx):
                            self._abort_rx(a.token)
                        elif isinstance(a, Close):
                            link = self._out.get(a.conn)
                            if link is not None and link.attempt == a.attempt:
                                link.closed = True
                                link.wake.set()
                                if link.transport is not None and not a.detach:  # detach: the peer's connection lives on
                                    link.transport.close()
                        elif isinstance(a, CloseIn):
                            inl = self._in.get(a.conn)
                            if inl is not None:
                                inl.transport.close()
                                inl.resume.set()  # a reader paused on a blocked connection ends too
                            elif a.conn.out is not None and (link := self._out.get(a.conn.out)) is not None:
                                if link.transport is not None:  # the reverse half of our own connection
                                    link.transport.close()
                        elif isinstance(a, LanTransmit):
                            self._lan_transmit(a.msg)
                        elif isinstance(a, PingDone):
                            fut = self._pings.pop(a.token, None)
                            if fut is not None and not fut.done():
                                fut.set_result(a)
                    except Exception:  # a failure while serving one endpoint or connection stays there
                        self.stats["action_errors"] += 1
                        log.exception("action failed", action=type(a).__name__)
        finally:
            self._transmitting = False
            self._arm_timer()

    def _arm_timer(self) -> None:
        at = self.core.get_timer()
        if at is None or self.closing:
            return
        if self._timer is not None and self._timer_at is not None and self._timer_at <= at:
            return  # fires no later than needed; it re-arms then
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop or asyncio.get_running_loop()
        self._timer_at = at
        self._timer = loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.core.handle_timer(self.now())
        self._transmit()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, *, with_shim: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            for nc in self.config.nets:
                await self.add_net(nc)
            if with_shim:
                from .kernel_shim.server import ShimServer

                self.shim = ShimServer(self.config.shim.path, self, config=self.config.shim, access=self.config.shim.access)
                await self.shim.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for ni in self.nis.values():
            if ni.listener:
                ni.listener.close()
        self.core.stop("daemon shutting down")
        self._transmit()
        if self.shim is not None:
            await self.shim.close()
        for ni in self.nis.values():
            await ni.backend.close()
        for t in list(self.background):
            t.cancel()

    async def close(self) -> None:
        """Same as :meth:`stop`."""
        await self.stop()

    # -- run-time configuration (lu2kctl import / net|peer|route add|del) ---------------------

    async def add_net(self, nc: NetConfig) -> NI:
        """Bring up one NI: its backend and listener.  Raises (and leaves nothing) on failure."""
        backend = get_backend(nc.backend)(nc.backend_settings())
        ni = NI(self, nc, backend)
        host = nc.listen or nc.nid.host
        try:
            ni.listener = await backend.listen(host, nc.port, functools.partial(self._accept, ni))
        except BaseException:
            await backend.close()
            raise
        self.core.add_net(NetParams(nc.nid, nc.port, credits=nc.credits, peer_credits=nc.peer_credits,
                                    max_message_size=nc.max_message_size, checksum=nc.checksum,
                                    typed_connections=backend.typed_connections, min_bulk=getattr(backend, "min_bulk", 1024),
                                    # Bytes past the link bounded to the profile's window (core.fairq); none without one.
                                    peer_window_bytes=int(nc.derived.get("window_bytes", 0)),
                                    rate=(nc.profile.rate_mbit or 0.0) * 1e6 / 8, rtt=(nc.profile.rtt_ms or 0.0) / 1e3))
        self.nis[nc.net] = ni
        log.info("net up", net=str(nc.net), nid=str(nc.nid), backend=nc.backend, listen=format_hostport(host, ni.listener.address[1]))
        self._transmit()  # connections held open to this net's peers (returnpath keepalive) start now
        return ni

    async def remove_net(self, net: Net, reason: str) -> None:
        """Take an NI down; what it still holds fails with CANCELLED and ``reason``."""
        ni = self.nis.pop(net, None)
        if ni is None:
            return
        if ni.listener:
            ni.listener.close()
        self.core.remove_net(net, reason)
        self._transmit()
        await ni.backend.close()
        log.info("net down", net=str(net), reason=reason)

    def drop_peer(self, nid: Nid, reason: str) -> None:
        """Forget a peer: fail what is queued or in flight to it, close its connections."""
        self.core.drop_peer(nid, reason)
        self._transmit()

    def set_routes(self, routes: list[Route]) -> None:
        self.core.set_routes(routes)

    def set_peer_addresses(self, addresses: dict[Nid, str]) -> None:
        self.core.set_peer_addresses(addresses)

    @property
    def peer_addresses(self) -> dict[Nid, str]:
        """Configured ``host:port`` overrides of NID-derived peer addresses."""
        return self.core.peer_addresses

    def attach_lan(self, net: Net, driver: LanDriver) -> None:
        """Serve ``net`` through ``driver``: the net becomes local for routing, and every
        message whose next hop is on it goes to ``driver.transmit`` (its ``on_done`` is the
        message's one outcome; the transaction timeout still applies).  Traffic from the LAN
        comes in through :meth:`send`."""
        self.core.attach_lan(net)
        self.lans[net] = driver

    def detach_lan(self, net: Net, reason: str = "LAN detached") -> None:
        self.lans.pop(net, None)
        self.core.detach_lan(net, reason)
        self._transmit()

    # -- NIDs --------------------------------------------------------------------------

    def is_local(self, packed_nid: bytes) -> bool:
        return self.core.is_local(bytes(packed_nid))

    def primary_nid(self) -> Nid:
        """Our first lu2k NID (a LAN net's NID is the kernel nodes' side, never our own name)."""
        return next((n.nid for n in self.config.nets if n.net not in self.lans), self.config.nets[0].nid)

    def local_nid(self) -> bytes:
        return self.primary_nid().to_bytes()

    def peer(self, nid: Nid) -> Peer:
        return self.core.peer(nid)

    def next_hop(self, nid: Nid) -> Nid | None:
        """Where a message for ``nid`` goes next: itself on a local net, a gateway, or None."""
        return self.core.routes.next_hop(nid, self.core.health_of)

    def health_of(self, nid: Nid) -> int:
        return self.core.health_of(nid)

    def _port_for(self, portal: int) -> ShimPort | None:
        if self.shim is None:
            return None
        port = self.shim.ports.get(portal)
        return port if port is not None and port.attached else None

    # -- sending ---------------------------------------------------------------------------

    def send(self, src_raw: bytes | None, dst: Nid | bytes, src_portal: int, dst_portal: int, payload: memoryview | bytes,
             on_finish: Callable[[Status, str], None], deadline: float | None = None) -> OutMsg:
        """Route and queue one message; ``on_finish`` is called exactly once.

        ``dst`` is a NID or its packed form (what the shim hands over); ``src_raw`` is the
        packed origin when forwarding, None when we originate the message.  A packed NID
        that does not decode completes the message with INVALID.
        """
        if isinstance(dst, Nid):
            dst_raw = self._packed.get(dst)
            if dst_raw is None:
                dst_raw = dst.to_bytes()
                if len(self._packed) < 65536:
                    self._packed[dst] = dst_raw
        else:
            dst_raw = bytes(dst)
        msg = self.core.submit(src_raw, dst_raw, src_portal, dst_portal, payload, on_finish, self.now(), deadline)
        self._transmit()
        return msg

    def _lan_transmit(self, msg: OutMsg) -> None:
        assert msg.lan is not None
        driver = self.lans.get(msg.lan)

        def done(status: Status, reason: str) -> None:
            self.core.lan_done(msg, status, reason, self.now())
            self._transmit()

        if driver is None:
            done(Status.NO_ROUTE, f"no LAN driver on net {msg.lan}")
            return
        try:
            driver.transmit(msg.src_raw, msg.dst_raw, msg.src_portal, msg.dst_portal, msg.payload, done)
        except Lu2kError as e:
            done(Status.NO_ROUTE, f"LAN driver on net {msg.lan} refused the message: {e}")

    # -- outgoing connections ------------------------------------------------------------

    async def _run_out(self, a: Connect) -> None:
        conn, attempt, core = a.conn, a.attempt, self.core
        link = _OutLink(conn, attempt)
        self._out[conn] = link
        peer = conn.peer
        ni = self.nis.get(peer.ni.net)
        g = self.config.global_
        try:
            if ni is None:
                raise LocalProtocolError(f"net {peer.ni.net} is down")
            transport = await ni.backend.connect(a.host, a.port, conn.ctype, g.connect_timeout)
            link.transport = transport
            hello = wire.HelloInitiator(key=ni.backend.settings.key_for(peer.nid), backend=ni.backend.name, src=ni.nid, dst=peer.nid,
                                        conn_type=conn.ctype, incarnation=self.incarnation, sealed=ni.backend.seal_frames,
                                        channel_binding=transport.channel_binding, multirail=peer.rail is not None)
            result = await self._hello(transport, hello)
        except Lu2kError as e:
            if link.transport is not None:
                link.transport.close()
            if self._out.get(conn) is link:
                del self._out[conn]
            self.refusal_log.warning(("connect", str(peer.nid)), "connect failed", peer=str(peer.nid), type=conn.ctype.name, error=str(e))
            core.connect_failed(conn, attempt, str(e), self.now(), refused=refusal_status(e))
            self._transmit()
            return
        core.connected(conn, attempt, result.peer_incarnation, self.now())
        self._transmit()
        if conn.attempt != attempt:  # superseded while it was set up (it rides the peer's connection now)
            transport.close()
            if self._out.get(conn) is link:
                del self._out[conn]
            return
        log.info("connected", peer=str(peer.nid), type=conn.ctype.name, via=transport.peer_address)
        reader = asyncio.ensure_future(self._read_out(link, transport))
        try:
            await self._write_out(link, transport, reader)
        except (NetworkError, RemoteProtocolError) as e:
            if isinstance(e, FrameError):  # a bad or forged frame on the ACK direction (sealed frames that do not open)
                self.stats["bad_frames"] += 1
            if not link.closed:
                log.warning("connection lost", peer=str(peer.nid), type=conn.ctype.name, error=str(e))
            core.connection_lost(conn, attempt, str(e), self.now())
            self._transmit()
        finally:
            reader.cancel()
            transport.close()
            if self._out.get(conn) is link:
                del self._out[conn]

    async def _write_out(self, link: _OutLink, transport: Transport, reader: asyncio.Future[Any]) -> None:
        core, conn = self.core, link.conn
        while not link.closed and conn.attempt == link.attempt:  # a later attempt has its own writer
            if reader.done():
                reader.result()  # raises the read error
                return
            batch = core.next_batch(conn, self.now())
            if batch is None:
                link.wake.clear()
                waiter: asyncio.Future[Any] = asyncio.ensure_future(link.wake.wait())
                await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                continue
            try:
                await transport.send(batch.frames)
            except NetworkError as e:
                core.send_done(batch, self.now(), str(e))
                self._transmit()
                raise
            except BaseException:
                # Cancelled mid-send: only stop() cancels this task, after the shim closed, so
                # no endpoint can reuse a payload a transport thread may still read; each
                # message still reaches its one completion.
                core.send_done(batch, self.now(), f"send to {conn.peer.nid} cancelled")
                self._transmit()
                raise
            core.send_done(batch, self.now())
            self._transmit()
        raise ConnectionClosed(f"connection to {conn.peer.nid} closed")

    async def _read_out(self, link: _OutLink, transport: Transport) -> None:
        core, conn, attempt = self.core, link.conn, link.attempt
        # Requests the peer sends on our connection's reverse direction (returnpath) wait here
        # while their InConn is blocked; answers to our messages are read past them.  What
        # waits is bounded by the peer's credits.
        held: list[wire.Frame] = []
        rest: list[wire.Frame] = []  # the frames of the last read after its first slice
        per_slice = rx_slice(conn.peer.ni.params.peer_credits)
        recv: asyncio.Future[list[wire.Frame]] | None = None
        try:
            while True:
                if held and not _reverse_blocked(conn):
                    frames, held = held, []
                    core.frames_received(conn, attempt, frames, self.now())
                    self._transmit()
                    continue
                if rest:
                    await asyncio.sleep(0)  # the answers to the previous slice go out
                    frames, rest = rest[:per_slice], rest[per_slice:]
                else:
                    if recv is None:
                        recv = asyncio.ensure_future(transport.recv())
                    if held and not await _frames_or(recv, link.resume):
                        continue
                    frames = await recv
                    recv = None
                    if len(frames) > per_slice:
                        frames, rest = frames[:per_slice], frames[per_slice:]
                if held or _reverse_blocked(conn):
                    held += [f for f in frames if f.header.type in REQUESTS]
                    frames = [f for f in frames if f.header.type not in REQUESTS]
                if frames:
                    core.frames_received(conn, attempt, frames, self.now())
                    self._transmit()
                if link.closed:
                    return
        finally:
            if recv is not None:
                recv.cancel()

    async def _run_reverse(self, a: Adopt) -> None:
        """Write ``a.conn``'s batches on the reverse direction of the accepted connection
        ``a.via`` (returnpath); its answers come in through that connection's reader."""
        conn, attempt, core = a.conn, a.attempt, self.core
        inl = self._in.get(a.via)
        if inl is None:
            core.connection_lost(conn, attempt, f"connection from {conn.peer.nid} already gone", self.now())
            self._transmit()
            return
        link = _OutLink(conn, attempt)
        link.transport = inl.transport
        self._out[conn] = link
        inl.transport.carry_requests(conn.ctype)
        inl.resume.set()  # a reader paused on a blocked connection reads again: our answers come on it now
        log.info("sending on the peer's connection", peer=str(conn.peer.nid), type=conn.ctype.name, via=inl.transport.peer_address)
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            await self._write_out(link, inl.transport, never)
        except (NetworkError, RemoteProtocolError) as e:
            if not link.closed:
                log.warning("return path lost", peer=str(conn.peer.nid), error=str(e))
            core.connection_lost(conn, attempt, str(e), self.now())
            self._transmit()
        finally:
            never.cancel()
            if self._out.get(conn) is link:
                del self._out[conn]

    async def _hello(self, transport: Transport, hello: wire.HelloInitiator | wire.HelloResponder) -> wire.HelloResult:
        """Run one hello to its end -- the only place a hello is driven, on either side --
        then let the transport switch to its post-hello mode (``on_hello_done``) before any
        MSG or ACK frame goes over it."""
        timeout = self.config.global_.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                if isinstance(hello, wire.HelloInitiator):
                    await transport.send([(hello.start(), b"")])
                finished = False
                while not finished:
                    for f in await transport.recv():
                        reply = hello.receive(f)
                        if reply is None:  # the initiator got AUTH_OK
                            finished = True
                            break
                        await transport.send([(reply, b"")])
                        if isinstance(hello, wire.HelloResponder) and hello.done:
                            finished = True
                            break
        except HandshakeError:
            if isinstance(hello, wire.HelloResponder) and hello.reject_frame:
                try:
                    async with asyncio.timeout(1.0):
                        await transport.send([(hello.reject_frame, b"")])
                        # Let the refused peer read why and hang up first: closing at once can
                        # drop the REJECT still queued (QUIC discards unsent stream data).
                        while True:
                            await transport.recv()
                except (NetworkError, RemoteProtocolError, TimeoutError):
                    pass
            transport.close()
            raise
        except TimeoutError:
            transport.close()
            raise NetworkTimeout(f"hello with {transport.peer_address} timed out") from None
        except BaseException:
            transport.close()
            raise
        assert hello.result is not None
        try:
            transport.on_hello_done(hello.result)
        except Lu2kError:
            transport.close()
            raise
        return hello.result

    # -- incoming connections -----------------------------------------------------------------

    async def _accept(self, ni: NI, transport: Transport) -> None:
        if self.closing:
            transport.close()
            return
        settings = ni.backend.settings
        responder = wire.HelloResponder(key=ni.config.key, backend=ni.backend.name, local_nids=frozenset({ni.nid}),
                                        incarnation=self.incarnation, sealed=ni.backend.seal_frames,
                                        channel_binding=transport.channel_binding, peer_keys=settings.peer_keys,
                                        peer_keys_only=settings.peer_keys_only)
        try:
            result = await self._hello(transport, responder)
            conn = self.core.accepted(ni.net, result, self.now())
        except Lu2kError as e:
            # Rate-limited per remote host: a flood of bad hellos must not become a flood of log lines.
            host = str(transport.peer_address).rpartition(":")[0]
            self.refusal_log.warning(("refused", host), "refused connection", net=str(ni.net), via=transport.peer_address,
                                     reason=str(e) or "hello timed out")
            transport.close()
            self.stats["conns_refused"] += 1
            return
        inl = _InLink(transport)
        self._in[conn] = inl
        transport.set_buffer_for(lambda header: self._buffer_for(inl, header))
        log.info("accepted", peer=str(result.peer_nid), type=result.conn_type.name, via=transport.peer_address)
        core = self.core
        # While blocked, a connection we also send on (returnpath) is still read: answers to
        # our messages go to the core, its MSG/PING frames wait in ``held`` (bounded by the
        # peer's credits) -- else our answers and its messages could wait for each other.
        held: list[wire.Frame] = []
        rest: list[wire.Frame] = []  # the frames of the last read after its first slice
        per_slice = rx_slice(conn.ni.params.peer_credits)
        recv: asyncio.Future[list[wire.Frame]] | None = None
        try:
            while conn.alive:
                if held and not conn.blocked:
                    frames, held = held, []
                    core.inbound_frames(conn, frames, self.now())
                    self._transmit()
                    continue
                if rest:
                    await asyncio.sleep(0)  # the ACK of the previous slice goes out
                    frames, rest = rest[:per_slice], rest[per_slice:]
                else:
                    if conn.blocked and conn.reverse is None and recv is None:
                        inl.resume.clear()
                        await inl.resume.wait()
                        continue
                    if recv is None:
                        recv = asyncio.ensure_future(transport.recv())
                    if (conn.blocked or held) and not await _frames_or(recv, inl.resume):
                        continue
                    frames = await recv
                    recv = None
                    tokens = inl.tokens
                    if tokens:
                        for f in frames:
                            tokens.discard(f.header.token)
                    if len(frames) > per_slice:
                        frames, rest = frames[:per_slice], frames[per_slice:]
                if conn.blocked or held:
                    held += [f for f in frames if f.header.type not in ANSWERS]
                    frames = [f for f in frames if f.header.type in ANSWERS]
                    if not frames:
                        continue
                core.inbound_frames(conn, frames, self.now())
                self._transmit()
        except (RemoteProtocolError, NetworkError) as e:
            if not isinstance(e, ConnectionClosed):
                log.warning("closing connection", peer=str(result.peer_nid), reason=str(e))
            if isinstance(e, FrameError):
                self.stats["bad_frames"] += 1
        finally:
            if recv is not None:
                recv.cancel()
            for f in held + rest:
                token: Any = f.header.token
                if token is not None:
                    self._abort_rx(token)
            core.inbound_lost(conn)
            for buf in inl.tokens:
                self._abort_rx(buf)
            inl.tokens.clear()
            del self._in[conn]
            transport.close()
            self._transmit()

    def _buffer_for(self, inl: _InLink, header: wire.FrameHeader) -> memoryview | None:
        """Receive in place: a MSG for a local endpoint goes straight into one of its RX slots."""
        if header.type is not FrameType.MSG or self.shim is None:
            return None
        dst_raw, dst_portal = wire.MSG_BODY_DST.unpack_from(header.body)
        if dst_portal == PING_PORTAL or not self.core.is_local(dst_raw):
            return None
        port = self._port_for(dst_portal)
        if port is None or port in self._rx_queues:  # others wait for its slots: they go first
            return None
        buf = port.rx_alloc(header.payload_len)
        if buf is None:
            return None
        header.token = buf
        inl.tokens.add(buf)
        return buf.view

    def _abort_rx(self, buf: RxBuffer) -> None:
        try:
            if buf.port is not None:
                buf.port.rx_abort(buf)
        except Lu2kError:
            pass  # the port detached meanwhile; its region went with it

    def _send_in(self, a: SendIn) -> None:
        inl = self._in.get(a.conn)
        if inl is not None:
            transport = inl.transport
        elif a.conn.out is not None and (link := self._out.get(a.conn.out)) is not None and link.transport is not None:
            transport = link.transport  # answers to requests on our own connection's reverse direction
        else:
            return
        frames = [(f, b"") for f in a.frames]

        async def send() -> None:
            try:
                await transport.send(frames)
            except NetworkError:
                pass  # the sender resends and we answer from the dedupe window

        self._spawn(send())

    # -- local delivery ------------------------------------------------------------------------

    def _deliver(self, d: Delivery) -> None:
        port = self._port_for(d.dst_portal)
        token = d.token
        now = self.now()
        if port is None:
            if token is not None:
                self._abort_rx(token)
            self.core.delivered(d, Status.NO_RECEIVER, f"no endpoint attached on portal {d.dst_portal} at {self.core.unpack(d.dst_raw)}", now)
            return
        waiting = self._rx_queues.get(port)
        if waiting is not None:
            # Others already wait for this endpoint's buffers: keep their order, and do not sit
            # on an RX slot meanwhile (the head of the queue may need it).
            if token is not None:
                d.payload = bytes(d.payload)  # the payload sits in that slot: copy it out first
                self._abort_rx(token)
                d.token = None
            waiting.append(d)
            return
        size = len(d.payload)
        if token is not None and token.port is port:
            buf = token
        else:
            if token is not None:
                d.payload = bytes(d.payload)  # it sits in that slot: copy it out before giving the slot back
                self._abort_rx(token)
            if size > port.max_message_size:
                self.core.delivered(d, Status.TOO_LARGE, f"{size} bytes exceeds the receiver's buffer limit {port.max_message_size}", now)
                return
            got = port.rx_alloc(size)
            if got is None:
                self._rx_queues[port] = collections.deque([d])
                self._spawn(self._drain_rx_queue(port))
                return
            buf = got
            buf.view[:] = d.payload
        self._hand_to(port, buf, d, now)

    def _hand_to(self, port: ShimPort, buf: RxBuffer, d: Delivery, now: float) -> None:
        size = len(d.payload)
        try:
            port.deliver(buf, d.src_raw, d.src_portal, size)
        except Lu2kError as e:  # that endpoint broke its rings: it is being detached
            self.core.delivered(d, Status.NO_RECEIVER, f"endpoint on portal {d.dst_portal} failed: {e}", now)
            return
        self.core.delivered(d, Status.DELIVERED, "", now)

    async def _drain_rx_queue(self, port: ShimPort) -> None:
        """The endpoint's RX pool is full: deliver what waits for it, in order, as it releases
        buffers.  Only this endpoint's messages wait; the connections they came on go on
        reading (up to the core's ``max_pending_deliveries``)."""
        queue = self._rx_queues[port]
        why = f"endpoint on portal {port.portal} detached"
        try:
            while queue:
                d = queue[0]
                size = len(d.payload)
                if size > port.max_message_size:
                    queue.popleft()
                    self.core.delivered(d, Status.TOO_LARGE, f"{size} bytes exceeds the receiver's buffer limit {port.max_message_size}", self.now())
                    self._transmit()
                    continue
                buf = port.rx_alloc(size)
                if buf is None:
                    try:
                        await port.rx_wait()
                    except Lu2kError:
                        break
                    if not port.attached:
                        break
                    continue
                queue.popleft()
                buf.view[:] = d.payload
                self._hand_to(port, buf, d, self.now())
                self._transmit()
        finally:
            self._rx_queues.pop(port, None)
            for d in queue:
                self.core.delivered(d, Status.NO_RECEIVER, why, self.now())
            queue.clear()
            self._transmit()

    # -- shim handler ------------------------------------------------------------------------

    def on_attach(self, port: ShimPort) -> None:
        # Backends that DMA (o2ib) register the endpoint's region, so sends go straight from it.
        handles = []
        for ni in self.nis.values():
            register = getattr(ni.backend, "register_memory", None)
            if register is None:
                continue
            try:
                handles.append((ni.backend, register(port.region)))
            except Lu2kError as e:
                log.warning("cannot register endpoint memory; sends will be copied", net=str(ni.net), portal=port.portal, error=str(e))
        if handles:
            self._registered[port] = handles
        log.info("endpoint attached", portal=port.portal, pid=port.pid)

    def on_detach(self, port: ShimPort) -> None:
        """Its messages can no longer be completed to anyone: stop spending the link on them."""
        cancelled = self.core.cancel_owned(port, "endpoint detached")
        self._transmit()
        for backend, handle in self._registered.pop(port, []):
            # A work request still posted from this memory fails; the engine treats that as a
            # connection error and resends (the receiver dedupes), so nothing is lost or doubled.
            backend.unregister_memory(handle)
        log.info("endpoint detached", portal=port.portal, pid=port.pid, cancelled=cancelled)

    def on_rx_space(self, port: ShimPort) -> None:
        return None  # rx_wait() wakes the waiting deliveries

    def on_submit(self, port: ShimPort, reqs: list[SendRequest]) -> None:
        portal, items = port.portal, []
        for req in reqs:
            def finish(status: Status, reason: str, req: SendRequest = req) -> None:
                if port.attached:
                    port.complete(req, status, reason)
            items.append((bytes(req.dst_nid), portal, req.dst_portal, req.payload, finish, port, req.msg_id))
        # One pump per peer for the whole doorbell's worth of descriptors (in _transmit).
        self.core.submit_batch(items, self.now())
        self._transmit()

    # -- control ---------------------------------------------------------------------------------

    async def ping(self, nid: Nid, timeout: float = 5.0) -> dict[str, Any]:
        """Ping ``nid``: a direct peer answers a PING frame; a NID behind gateways is pinged
        end to end (a message to its daemon's ping portal), so the answer is the far end's."""
        if self.is_local(nid.to_bytes()):
            return {"nid": str(nid), "rtt_ms": 0.0, "local": True}
        token = int.from_bytes(os.urandom(8), "little")
        fut: asyncio.Future[PingDone] = asyncio.get_running_loop().create_future()
        self._pings[token] = fut
        self.core.ping(nid, token, timeout, self.now())
        self._transmit()
        try:
            res = await asyncio.wait_for(fut, timeout + 1.0)
        except asyncio.TimeoutError:
            raise NetworkError(f"ping {nid} timed out") from None
        finally:
            self._pings.pop(token, None)
        if res.error or res.rtt is None:
            raise NetworkError(res.error or f"ping {nid} failed")
        out: dict[str, Any] = {"nid": str(nid), "via": res.via, "rtt_ms": round(res.rtt * 1000, 3)}
        if res.via == str(nid):
            out["incarnation"] = f"{res.incarnation:016x}"
            if res.nids:
                out["peer_nis"] = [str(n) for n in res.nids]
        else:
            out["end_to_end"] = True  # the far end answered, not the gateway
        return out

    def describe_nets(self) -> list[dict[str, Any]]:
        out = []
        for ni in self.nis.values():
            c, credits = ni.config, ni.credits
            out.append({
                "net": str(ni.net), "nid": str(ni.nid), "status": "up", "backend": c.backend,
                "listen": format_hostport(*ni.listener.address) if ni.listener else None,
                "tunables": {"peer_timeout": c.peer_timeout, "peer_credits": c.peer_credits, "credits": c.credits},
                "credits": {"tx": credits.limit - credits.in_use, "max_tx": credits.limit, "min_tx": credits.min_value},
                "max_message_size": c.max_message_size,
                "profile": {k: v for k, v in vars(c.profile).items() if v is not None},
                "derived": dict(c.derived),  # what the profile set because the config did not
                "backend_settings": ni.backend.describe(),
            })
        return out

    def describe_peers(self) -> list[dict[str, Any]]:
        return [self._describe_peer(p) for ni in self.core.nis.values() for p in ni.peers.values()]

    def _describe_peer(self, p: Peer) -> dict[str, Any]:
        conns = {}
        for c in p.conns.values():
            link = self._out.get(c)
            stats = link.transport.stats() if link is not None and link.transport is not None else {}
            conns[c.ctype.name.lower()] = {"state": c.state.value, "sent": c.sent_msgs, **stats}
            if c.via is not None:  # sending on the peer's own connection (returnpath)
                conns[c.ctype.name.lower()]["path"] = "peer's connection"
        out: dict[str, Any] = {
            "nid": str(p.nid),
            "net": str(p.ni.net),
            "state": "up" if p.up else ("connecting" if p.conns else "idle"),
            "health": self.core.health_of(p.nid),
            "tx_credits": p.credits.limit - p.credits.in_use,
            "max_tx_credits": p.credits.limit,
            "min_tx_credits": p.credits.min_value,
            "queued": p.waiting_count(),  # parked behind a stuck destination included
            "in_flight": len(p.inflight),
            "delivered": p.stats["delivered"],
            "failed": p.stats["failed"],
            "rerouted_away": p.stats["rerouted_away"],  # never sent to it: moved to a healthier gateway
            "last_error": p.last_error,
            "connections": conns,
        }
        if p.rail is not None and p.meter is not None:  # one rail of a multi-rail peer (the in-flight map is the peer's)
            m = p.meter
            out["in_flight"] = sum(1 for x in p.inflight.values() if x.conn is not None and x.conn.peer is p)
            out["rail"] = {"primary": str(p.rail.primary), "down": p.rail_down, "rtt_ms": round(m.rtt * 1e3, 3),
                           "capacity_mbit": round(m.capacity * 8 / 1e6, 3), "measured_mbit": round(m.rate * 8 / 1e6, 3),
                           "backlog_bytes": m.backlog, "acked_msgs": m.acked_msgs, "acked_bytes": m.acked_bytes,
                           "resent_away": m.resent_away, "resent_here": m.resent_here, "failovers": m.failovers}
        return out

    def describe_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats)
        out["uptime_s"] = round(time.time() - self.started, 1)
        out["endpoints"] = len(self.shim.ports) if self.shim else 0
        if self.shim is not None:
            out.update({f"shim_{k}": v for k, v in self.shim.stats().items() if isinstance(v, int)})
        out["inbound_sessions"] = len(self.core.sessions)
        return out

    def describe_routes(self) -> list[dict[str, Any]]:
        return [{"net": str(r.net), "gateway": str(r.gateway), "hop": r.hops if r.hops is not None else -1, "priority": r.priority,
                 "health": self.health_of(r.gateway)} for r in self.core.routes.routes()]
