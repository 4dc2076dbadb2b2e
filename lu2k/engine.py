"""The daemon's engine: peers, messages, unidirectional connections, credits, routing.

Theory of operation
-------------------
*Messages.*  Every message the shim hands over becomes an :class:`OutMsg` and ends in
exactly one call of its ``finish`` (delivered, or failed with a :class:`Status` and a
reason).  Its payload stays in the shim's shared memory until then: we send from it and,
after a reconnect, resend from it.  ``finish`` is deferred while a transport still holds
the payload, so a buffer is never handed back to the endpoint while a send reads it.

*Connections are unidirectional.*  To send to a peer we open our own connection to the
address in its NID (the kernel's routing picks the source and next hop); connections we
accept only receive messages.  The reverse direction of a connection carries only the
hello reply and ACK/NACK frames for the messages that came in on it.  With a typed backend
(TCP) there is a CONTROL connection for small messages and a BULK one for the rest.

*Exactly once.*  Each message gets a sequence number in our session with the next hop
(our incarnation, its NID).  The receiver ACKs it once it has delivered it to the shim --
or, when it is a gateway, once the next hop has ACKed it (so "delivered" is end to end).
After a reconnect we resend everything not yet ACKed; the receiver's
:class:`~lu2k.dedupe.RecvWindow` answers duplicates from memory.  If the peer restarted
(new incarnation), messages it may have seen fail with ``PEER_RESTARTED`` rather than risk
a second delivery.

*Credits.*  A message in flight holds one NI credit and one peer credit (``credits``,
``peer_credits``).  Without credits it waits in the peer's queue; the shim server only
takes new messages from an endpoint while it has fewer than ``max_in_flight`` open, so a
slow peer turns into back-pressure on the endpoint, not memory growth.

*Timeouts.*  A message not finished within ``transaction_timeout`` fails: ``NO_ROUTE``
with the last connect error if it never got out, ``TIMED_OUT`` otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from . import wire
from .backends import Backend, Transport, get_backend
from .credits import Credits
from .dedupe import IN_PROGRESS, RecvWindow
from .errors import (
    ConnectionClosed, FrameError, HandshakeError, LocalProtocolError, Lu2kError, NetworkError, NidError, RemoteProtocolError, Status,
)
from .health import Backoff, Health
from .nid import Net, Nid
from .routing import Route, RouteTable
from .settings import DaemonConfig, NetConfig
from .wire import ConnType, Frame, FrameType

log = structlog.get_logger("lu2k.engine")

SEND_BATCH_FRAMES = 512
SEND_BATCH_BYTES = 8 << 20
TIMER_INTERVAL = 0.05


@dataclass(eq=False, slots=True)
class OutMsg:
    """One message on its way out of this daemon (from the shim, or being forwarded)."""

    src_raw: bytes  # origin of the message (us, or the original sender when forwarding), packed
    dst_raw: bytes  # final destination, packed
    src_portal: int
    dst_portal: int
    payload: memoryview | bytes
    deadline: float
    on_finish: Callable[[Status, str], None]
    seq: int = 0
    peer: "Peer | None" = None
    transmitted: bool = False  # went out at least once (so the peer may have it)
    busy: int = 0  # transports currently reading the payload
    done: bool = False
    _deferred: tuple[Status, str] | None = None
    header: bytes = b""
    owner: Any = None  # the shim port that handed it over, if any

    def finish(self, status: Status, reason: str = "") -> None:
        if self.done:
            return
        if self.busy:
            self._deferred = (status, reason)
            return
        self.done = True
        self.on_finish(status, reason or status.describe())

    def release(self) -> None:
        self.busy -= 1
        if not self.busy and self._deferred and not self.done:
            status, reason = self._deferred
            self._deferred = None
            self.finish(status, reason)


class OutConn:
    """Our outgoing connection of one type to one peer: connect, hello, send, read ACKs."""

    def __init__(self, engine: "Engine", peer: "Peer", ctype: ConnType) -> None:
        self.engine, self.peer, self.ctype = engine, peer, ctype
        self.transport: Transport | None = None
        self.queue: collections.deque[OutMsg] = collections.deque()
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.backoff = Backoff(engine.config.global_.reconnect_min, engine.config.global_.reconnect_max)
        self.state = "idle"
        self.pings: dict[int, asyncio.Future[float]] = {}
        self.sent_msgs = 0

    def submit(self, msg: OutMsg) -> None:
        self.queue.append(msg)
        self.wakeup.set()
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while self.queue or self.pings:
            if self.engine.closing:
                return
            now = time.monotonic()
            if not self.backoff.ready(now):
                await asyncio.sleep(self.backoff.next_at - now)
                continue
            try:
                await self._connect()
            except (NetworkError, RemoteProtocolError) as e:
                delay = self.backoff.failed(time.monotonic(), str(e))
                self.peer.health.failure(time.monotonic())
                self.peer.last_error = str(e)
                log.warning("connect failed", peer=str(self.peer.nid), type=self.ctype.name, error=str(e), retry_in=round(delay, 3))
                if isinstance(e, HandshakeError):
                    self.peer.fail_unsent(Status.AUTH_FAILED if "authentic" in str(e) or "key" in str(e) else Status.PROTOCOL, str(e), self.ctype)
                continue
            self.backoff.succeeded()
            try:
                await self._pump()
            except (NetworkError, RemoteProtocolError) as e:
                self.peer.last_error = str(e)
                self.peer.health.failure(time.monotonic())
                log.warning("connection lost", peer=str(self.peer.nid), type=self.ctype.name, error=str(e))
                self.backoff.failed(time.monotonic(), str(e))
            finally:
                self._drop_transport()

    def _drop_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.state = "idle"
        for fut in self.pings.values():
            if not fut.done():
                fut.set_exception(NetworkError(f"connection to {self.peer.nid} lost"))
        self.pings.clear()
        # Everything sent on this connection and not yet acknowledged goes out again.
        self.peer.requeue_unacked(self)

    async def _connect(self) -> None:
        peer, eng = self.peer, self.engine
        self.state = "connecting"
        host, port = peer.address()
        transport = await peer.ni.backend.connect(host, port, self.ctype, eng.config.global_.connect_timeout)
        self.state = "hello"
        hello = wire.HelloInitiator(
            key=peer.ni.config.key, backend=peer.ni.backend.name, src=peer.ni.nid, dst=peer.nid,
            conn_type=self.ctype, incarnation=eng.incarnation,
        )
        try:
            await transport.send([(hello.start(), b"")])
            finished = False
            while not finished:
                for f in await asyncio.wait_for(transport.recv(), eng.config.global_.connect_timeout):
                    reply = hello.receive(f)
                    if reply is None:  # AUTH_OK: the peer accepted our proof too
                        finished = True
                        break
                    await transport.send([(reply, b"")])
        except asyncio.TimeoutError:
            transport.close()
            raise HandshakeError(f"hello with {peer.nid} timed out") from None
        except BaseException:
            transport.close()
            raise
        assert hello.result is not None
        self.transport = transport
        self.state = "up"
        peer.on_connected(hello.result.peer_incarnation)
        log.info("connected", peer=str(peer.nid), type=self.ctype.name, via=transport.peer_address)

    async def _pump(self) -> None:
        assert self.transport is not None
        reader = asyncio.ensure_future(self._read_acks(self.transport))
        try:
            while True:
                if reader.done():
                    reader.result()  # raises the read error
                    return
                if not self.queue:
                    if not self.peer.inflight_on(self) and not self.pings:
                        # Idle: keep the connection; wait for work or the reader to fail.
                        pass
                    self.wakeup.clear()
                    waiter = asyncio.ensure_future(self.wakeup.wait())
                    await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    continue
                batch: list[OutMsg] = []
                frames: list[tuple[bytes, memoryview | bytes]] = []
                size = 0
                while self.queue and len(batch) < SEND_BATCH_FRAMES and size < SEND_BATCH_BYTES:
                    msg = self.queue.popleft()
                    if msg.done:
                        continue
                    msg.busy += 1
                    msg.transmitted = True
                    batch.append(msg)
                    frames.append((msg.header, msg.payload))
                    size += len(msg.payload)
                try:
                    await self.transport.send(frames)
                finally:
                    for m in batch:
                        m.release()
                self.sent_msgs += len(batch)
                self.engine.stats["msgs_sent"] += len(batch)
                self.engine.stats["bytes_sent"] += size
        finally:
            reader.cancel()

    async def _read_acks(self, transport: Transport) -> None:
        while True:
            for f in await transport.recv():
                t = f.header.type
                if t is FrameType.ACK:
                    self.peer.on_acks(wire.decode_acks(f))
                elif t is FrameType.NACK:
                    seq, status, reason = wire.decode_nack(f)
                    self.peer.on_ack(seq, status, reason)
                elif t is FrameType.PONG:
                    (token,) = wire.PING_BODY.unpack(f.header.body)
                    fut = self.pings.pop(token, None)
                    if fut and not fut.done():
                        fut.set_result(time.monotonic())
                else:
                    raise FrameError(f"{t.name} frame on the reverse direction of a connection")

    async def ping(self, timeout: float) -> float:
        token = int.from_bytes(os.urandom(8), "little")
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.pings[token] = fut
        self.wakeup.set()
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())
        start = time.monotonic()
        # The ping goes out as soon as the connection is up.
        while self.transport is None:
            if fut.done():
                break
            if time.monotonic() - start > timeout:
                self.pings.pop(token, None)
                raise NetworkError(f"no connection to {self.peer.nid}: {self.peer.last_error or 'connecting'}")
            await asyncio.sleep(0.01)
        if self.transport is not None and not fut.done():
            await self.transport.send([(wire.encode_frame(FrameType.PING, wire.PING_BODY.pack(token)), b"")])
        try:
            end = await asyncio.wait_for(fut, max(0.001, timeout - (time.monotonic() - start)))
        except asyncio.TimeoutError:
            self.pings.pop(token, None)
            raise NetworkError(f"ping {self.peer.nid} timed out") from None
        return end - start

    def close(self) -> None:
        if self.task:
            self.task.cancel()
        if self.transport:
            self.transport.close()


class Peer:
    """A next hop: our session with it, its credits, queue, connections and health."""

    def __init__(self, engine: "Engine", nid: Nid, ni: "NI") -> None:
        self.engine, self.nid, self.ni = engine, nid, ni
        self.credits = Credits(ni.config.peer_credits)
        self.queue: collections.deque[OutMsg] = collections.deque()
        self.inflight: dict[int, OutMsg] = {}
        self.sent_on: dict[int, OutConn] = {}
        self.conns: dict[ConnType, OutConn] = {}
        self.next_seq = 1
        self.peer_incarnation: int | None = None
        g = engine.config.global_
        self.health = Health(g.health_sensitivity, g.recovery_interval)
        self.last_error = ""
        self.stats = collections.Counter[str]()
        self.override = engine.peer_addresses.get(nid)

    def address(self) -> tuple[str, int]:
        if self.override:
            host, _, port = self.override.rpartition(":")
            return host.strip("[]"), int(port)
        return self.nid.host, self.ni.config.port

    def conn_for(self, size: int) -> OutConn:
        backend = self.ni.backend
        if backend.typed_connections:
            ctype = ConnType.BULK if size >= getattr(backend, "min_bulk", 1024) else ConnType.CONTROL
        else:
            ctype = ConnType.ANY
        conn = self.conns.get(ctype)
        if conn is None:
            conn = self.conns[ctype] = OutConn(self.engine, self, ctype)
        return conn

    def enqueue(self, msg: OutMsg) -> None:
        msg.peer = self
        self.queue.append(msg)
        self.ni.queued += 1
        self.pump()

    def pump(self) -> None:
        ni = self.ni
        queue, credits, ni_credits = self.queue, self.credits, ni.credits
        while queue and credits.in_use < credits.limit and ni_credits.in_use < ni_credits.limit:
            msg = queue.popleft()
            ni.queued -= 1
            if msg.done:
                continue
            credits.in_use += 1
            ni_credits.in_use += 1
            self._assign(msg)
            self._send(msg)
        credits.note_queue(len(queue))
        ni_credits.note_queue(ni.queued)

    def _assign(self, msg: OutMsg) -> None:
        msg.seq = self.next_seq
        self.next_seq += 1
        msg.header = wire.encode_msg_header(
            msg.seq, msg.src_raw, msg.dst_raw, msg.src_portal, msg.dst_portal, msg.payload, self.ni.config.checksum,
        )
        self.inflight[msg.seq] = msg

    def _send(self, msg: OutMsg) -> None:
        conn = self.conn_for(len(msg.payload))
        self.sent_on[msg.seq] = conn
        conn.submit(msg)

    def inflight_on(self, conn: OutConn) -> bool:
        return any(c is conn for c in self.sent_on.values())

    def on_connected(self, incarnation: int) -> None:
        if self.peer_incarnation is not None and incarnation != self.peer_incarnation:
            log.warning("peer restarted", peer=str(self.nid))
            for seq, msg in list(self.inflight.items()):
                if msg.transmitted:
                    self._complete(seq, Status.PEER_RESTARTED, f"{self.nid} restarted while the message was in flight; delivery unknown")
        self.peer_incarnation = incarnation
        self.health.success()

    def requeue_unacked(self, conn: OutConn) -> None:
        if self.engine.closing:
            return
        # Resend in sequence order on the same connection type; the receiver dedupes.
        pending = [m for s, m in sorted(self.inflight.items()) if self.sent_on.get(s) is conn and not m.done]
        queued = {id(m) for m in conn.queue}
        for m in pending:
            if id(m) not in queued:
                conn.queue.append(m)
        conn.queue = collections.deque(sorted(conn.queue, key=lambda m: m.seq))

    def on_ack(self, seq: int, status: Status, reason: str) -> None:
        if seq in self.inflight:
            self._complete(seq, status, reason)

    def on_acks(self, entries: list[tuple[int, int]]) -> None:
        """A batch of positive ACKs: finish them all, then refill the pipe once."""
        inflight, sent_on = self.inflight, self.sent_on
        done = 0
        for seq, code in entries:
            msg = inflight.pop(seq, None)
            if msg is None:
                continue  # a late duplicate, or a message already timed out
            sent_on.pop(seq, None)
            done += 1
            msg.finish(Status.DELIVERED if code == 0 else Status.from_code(code), "")
        if done:
            self.credits.in_use -= done
            self.ni.credits.in_use -= done
            self.stats["delivered"] += done
            self.health.value = min(1000, self.health.value + done)
            self.pump()
            self.ni.pump_waiting()

    def _complete(self, seq: int, status: Status, reason: str) -> None:
        msg = self.inflight.pop(seq)
        self.sent_on.pop(seq, None)
        self.credits.give()
        self.ni.credits.give()
        self.stats["delivered" if status is Status.DELIVERED else "failed"] += 1
        if status is Status.DELIVERED:
            self.health.success()
        msg.finish(status, reason)
        self.pump()
        self.ni.pump_waiting()

    def fail_unsent(self, status: Status, reason: str, ctype: ConnType) -> None:
        """A hello was refused: nothing queued for this peer can get through."""
        for seq, msg in list(self.inflight.items()):
            if self.sent_on.get(seq) is self.conns.get(ctype):
                self._complete(seq, status, reason)
        while self.queue:
            m = self.queue.popleft()
            self.ni.queued -= 1
            self.stats["failed"] += 1
            m.finish(status, reason)

    def expire(self, now: float) -> None:
        for seq, msg in list(self.inflight.items()):
            if msg.deadline <= now:
                if msg.transmitted:
                    self._complete(seq, Status.TIMED_OUT, f"no acknowledgement from {self.nid} within the transaction timeout; delivery unknown")
                else:
                    self._complete(seq, Status.NO_ROUTE, f"{self.nid} unreachable: {self.last_error or 'no connection'}")
        if self.queue and self.queue[0].deadline <= now:
            keep: collections.deque[OutMsg] = collections.deque()
            for m in self.queue:
                if m.deadline <= now:
                    self.stats["failed"] += 1
                    m.finish(Status.TIMED_OUT if self.peer_incarnation else Status.NO_ROUTE,
                             f"waited for credits to {self.nid} past the transaction timeout" + (f" ({self.last_error})" if self.last_error else ""))
                else:
                    keep.append(m)
            self.ni.queued -= len(self.queue) - len(keep)
            self.queue = keep
        self.health.tick(now)

    def describe(self) -> dict[str, Any]:
        return {
            "nid": str(self.nid),
            "net": str(self.ni.net),
            "state": "up" if any(c.state == "up" for c in self.conns.values()) else ("connecting" if self.conns else "idle"),
            "health": self.health.value,
            "tx_credits": self.credits.limit - self.credits.in_use,
            "max_tx_credits": self.credits.limit,
            "min_tx_credits": self.credits.min_value,
            "queued": len(self.queue),
            "in_flight": len(self.inflight),
            "delivered": self.stats["delivered"],
            "failed": self.stats["failed"],
            "last_error": self.last_error,
            "connections": {c.ctype.name.lower(): {"state": c.state, "sent": c.sent_msgs, **(c.transport.stats() if c.transport else {})} for c in self.conns.values()},
        }

    def close(self) -> None:
        for c in self.conns.values():
            c.close()


class NI:
    """A local network interface: one net, its backend, listener and NI credits."""

    def __init__(self, engine: "Engine", config: NetConfig, backend: Backend) -> None:
        self.engine, self.config, self.backend = engine, config, backend
        self.net: Net = config.net
        self.nid: Nid = config.nid
        self.credits = Credits(config.credits)
        self.nid_raw = config.nid.to_bytes()
        self.listener: Any = None
        self.peers: dict[Nid, Peer] = {}
        self.queued = 0  # messages waiting for credits, over all peers

    def pump_waiting(self) -> None:
        if not self.credits.available:
            return
        for p in self.peers.values():
            if p.queue:
                p.pump()
                if not self.credits.available:
                    return


class InboundSession:
    """What we know about one sender (NID + incarnation) whose messages we receive."""

    def __init__(self, peer_nid: Nid, incarnation: int) -> None:
        self.peer_nid, self.incarnation = peer_nid, incarnation
        self.window = RecvWindow()
        self.conns: list["InConn"] = []
        self.stats = collections.Counter[str]()

    def ack(self, seq: int, status: Status, reason: str) -> None:
        self.window.finish(seq, int(status))
        for c in reversed(self.conns):
            if c.alive:
                c.queue_ack(seq, status, reason)
                return
        # No live connection: the sender resends after reconnecting and gets the status then.


class InConn:
    """A connection we accepted: hello, then receive MSG frames and answer with ACKs."""

    def __init__(self, engine: "Engine", ni: NI, transport: Transport) -> None:
        self.engine, self.ni, self.transport = engine, ni, transport
        self.session: InboundSession | None = None
        self.alive = True
        self._acks: list[tuple[int, int]] = []
        self._control: list[bytes] = []
        self._rx: dict[int, Any] = {}
        self._flush_scheduled = False

    async def run(self) -> None:
        eng = self.engine
        try:
            result = await self._hello()
        except (RemoteProtocolError, NetworkError, asyncio.TimeoutError) as e:
            log.warning("refused connection", net=str(self.ni.net), via=self.transport.peer_address, reason=str(e) or "hello timed out")
            self.transport.close()
            eng.stats["conns_refused"] += 1
            return
        key = (result.peer_nid, result.peer_incarnation)
        session = eng.sessions.get(key)
        if session is None:
            session = eng.sessions[key] = InboundSession(result.peer_nid, result.peer_incarnation)
            # A newer incarnation of that peer makes older sessions moot.
            for k in [k for k in eng.sessions if k[0] == result.peer_nid and k[1] != result.peer_incarnation]:
                del eng.sessions[k]
        self.session = session
        session.conns.append(self)
        self.transport.set_buffer_for(self._buffer_for)
        log.info("accepted", peer=str(result.peer_nid), type=result.conn_type.name, via=self.transport.peer_address)
        try:
            while True:
                frames = await self.transport.recv()
                for f in frames:
                    await self._handle(f)
                self._flush()
        except (RemoteProtocolError, NetworkError) as e:
            if not isinstance(e, ConnectionClosed):
                log.warning("closing connection", peer=str(session.peer_nid), reason=str(e))
            if isinstance(e, FrameError):
                eng.stats["bad_frames"] += 1
        finally:
            self.alive = False
            session.conns.remove(self)
            for buf in self._rx.values():
                buf[0].rx_abort(buf[1])
            self._rx.clear()
            self.transport.close()

    async def _hello(self) -> wire.HelloResult:
        eng = self.engine
        responder = wire.HelloResponder(key=self.ni.config.key, backend=self.ni.backend.name, local_nids=frozenset({self.ni.nid}), incarnation=eng.incarnation)
        timeout = eng.config.global_.connect_timeout
        try:
            while not responder.done:
                for f in await asyncio.wait_for(self.transport.recv(), timeout):
                    await self.transport.send([(responder.receive(f), b"")])
                    if responder.done:
                        break
        except HandshakeError:
            if responder.reject_frame:
                try:
                    await asyncio.wait_for(self.transport.send([(responder.reject_frame, b"")]), 1.0)
                except (NetworkError, asyncio.TimeoutError):
                    pass
            raise
        assert responder.result is not None
        return responder.result

    def _buffer_for(self, header: wire.FrameHeader) -> memoryview | None:
        if header.type is not FrameType.MSG:
            return None
        dst = header.body[8 + wire.NID_SIZE : 8 + 2 * wire.NID_SIZE]
        dport = int.from_bytes(header.body[8 + 2 * wire.NID_SIZE + 4 : 8 + 2 * wire.NID_SIZE + 8], "little")
        if not self.engine.is_local(dst):
            return None
        port = self.engine.port_for(dport)
        if port is None:
            return None
        buf = port.rx_alloc(header.payload_len)
        if buf is None:
            return None
        self._rx[id(header)] = (port, buf)
        return buf.view

    async def _handle(self, f: Frame) -> None:
        t = f.header.type
        session = self.session
        assert session is not None
        if t is FrameType.PING:
            self.transport_send_now(wire.encode_frame(FrameType.PONG, f.header.body))
            return
        if t is not FrameType.MSG:
            raise FrameError(f"unexpected {t.name} frame on an incoming connection")
        pre = self._rx.pop(id(f.header), None)
        info = wire.decode_msg(f.header)
        try:
            wire.check_payload(info, f.payload)
        except FrameError:
            if pre:
                pre[0].rx_abort(pre[1])
            raise
        session.stats["received"] += 1
        self.engine.stats["msgs_received"] += 1
        self.engine.stats["bytes_received"] += len(f.payload)
        prior = session.window.check(info.seq)
        if prior is not None:
            if pre:
                pre[0].rx_abort(pre[1])
            self.engine.stats["duplicates"] += 1
            if prior != IN_PROGRESS:
                self.queue_ack(info.seq, Status(prior) if prior in Status._value2member_map_ else Status.PROTOCOL, "duplicate")
            return
        session.window.start(info.seq)
        if self.engine.is_local(info.dst_raw):
            status, reason = await self.engine.deliver_local(info, f.payload, pre)
            session.ack(info.seq, status, reason)
        else:
            if pre:
                pre[0].rx_abort(pre[1])
            await self.engine.forward(info, f.payload, lambda st, why, s=session, q=info.seq: s.ack(q, st, why))

    def transport_send_now(self, data: bytes) -> None:
        """Queue a control frame (PONG) for the reverse direction."""
        self._control.append(data)
        self._schedule_flush()

    def queue_ack(self, seq: int, status: Status, reason: str) -> None:
        if status is Status.DELIVERED:
            self._acks.append((seq, 0))
        else:
            self._control.append(wire.encode_nack(seq, status, reason))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not (self._acks or self._control) or not self.alive:
            return
        frames: list[tuple[bytes, bytes]] = [(n, b"") for n in self._control]
        for i in range(0, len(self._acks), 4096):
            frames.append((wire.encode_acks(self._acks[i : i + 4096]), b""))
        self._acks, self._control = [], []
        task = asyncio.ensure_future(self._send_acks(frames))
        self.engine.background.add(task)
        task.add_done_callback(self.engine.background.discard)

    async def _send_acks(self, frames: list[tuple[bytes, bytes]]) -> None:
        try:
            await self.transport.send(frames)
        except NetworkError:
            pass  # the sender will resend and we answer from the dedupe window


class Engine:
    """Everything the daemon does, minus the process plumbing (see :mod:`lu2k.daemon`)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.incarnation = int.from_bytes(os.urandom(8), "little") | 1
        self.nis: dict[Net, NI] = {}
        self.sessions: dict[tuple[Nid, int], InboundSession] = {}
        self.routes = RouteTable((n.net for n in config.nets), (Route(r.net, r.gateway, r.hops, r.priority) for r in config.routes))
        self.peer_addresses = {p.nid: p.address for p in config.peers if p.address}
        self.stats = collections.Counter[str]()
        self.closing = False
        self.background: set[asyncio.Task[Any]] = set()
        self.shim: Any = None
        self._packed: dict[Nid, bytes] = {}
        self._unpacked: dict[bytes, Nid] = {}
        self._local_packed: set[bytes] = set()
        self._direct: dict[bytes, Peer] = {}
        self._registered: dict[Any, list[tuple[Any, Any]]] = {}  # shim port -> backend memory registrations
        self._timer: asyncio.Task[None] | None = None
        self.router_bytes = 0
        self._router_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.started = time.time()
        self._lan: dict[Net, Any] = {}  # LAN drivers (lu2k.socklnd) by the net they own

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, *, with_shim: bool = True) -> None:
        try:
            for nc in self.config.nets:
                await self.add_net(nc)
            if with_shim:
                from .kernel_shim.server import ShimConfig as ShimServerConfig, ShimServer

                shim_cfg = ShimServerConfig(max_in_flight=self.config.shim.max_in_flight, **self.config.shim.options)
                self.shim = ShimServer(self.config.shim.path, self, config=shim_cfg)
                await self.shim.start()
        except BaseException:
            await self.stop()
            raise
        self._timer = asyncio.ensure_future(self._tick())

    async def stop(self) -> None:
        self.closing = True
        if self._timer:
            self._timer.cancel()
        for ni in self.nis.values():
            if ni.listener:
                ni.listener.close()
            for p in ni.peers.values():
                for m in list(p.inflight.values()) + list(p.queue):
                    m.finish(Status.CANCELLED, "daemon shutting down")
                p.close()
        if self.shim is not None:
            await self.shim.close()
        for ni in self.nis.values():
            await ni.backend.close()
        for t in list(self.background):
            t.cancel()

    # -- run-time configuration (lu2kctl import / net|peer|route add|del) ---------------------

    async def add_net(self, nc: NetConfig) -> NI:
        """Bring up one NI: its backend and listener.  Raises (and leaves nothing) on failure."""
        backend = get_backend(nc.backend)(nc.backend_settings())
        ni = NI(self, nc, backend)
        host = nc.listen or nc.nid.host
        try:
            ni.listener = await backend.listen(host, nc.port, lambda t, ni=ni: self._accept(ni, t))
        except BaseException:
            await backend.close()
            raise
        self.nis[nc.net] = ni
        self.routes.local_nets.add(nc.net)
        self._local_packed.add(ni.nid_raw)
        self._direct.clear()
        log.info("net up", net=str(nc.net), nid=str(nc.nid), backend=nc.backend, listen=f"{host}:{ni.listener.address[1]}")
        return ni

    async def remove_net(self, net: Net, reason: str) -> None:
        """Take an NI down; what it still holds fails with CANCELLED and ``reason``."""
        ni = self.nis.pop(net, None)
        if ni is None:
            return
        self._direct.clear()
        self.routes.local_nets.discard(net)
        self._local_packed.discard(ni.nid_raw)
        if ni.listener:
            ni.listener.close()
        for nid in list(ni.peers):
            self.drop_peer(nid, reason)
        await ni.backend.close()
        log.info("net down", net=str(net), reason=reason)

    def drop_peer(self, nid: Nid, reason: str) -> None:
        """Forget a peer: fail what is queued or in flight to it, close its connections."""
        ni = self.nis.get(nid.net)
        p = ni.peers.pop(nid, None) if ni else None
        self._direct.clear()
        if p is None:
            return
        for m in list(p.inflight.values()) + list(p.queue):
            m.finish(Status.CANCELLED, reason)
        ni.queued -= len(p.queue)  # type: ignore[union-attr]
        for seq in list(p.inflight):
            p.inflight.pop(seq)
            p.credits.in_use -= 1
            ni.credits.in_use -= 1  # type: ignore[union-attr]
        p.queue.clear()
        p.close()
        ni.pump_waiting()  # type: ignore[union-attr]  # NI credits came back

    def set_routes(self, routes: list[Route]) -> None:
        self.routes = RouteTable([*self.nis, *self._lan], routes)
        self._direct.clear()

    def attach_lan(self, net: Net, driver: Any) -> None:
        """``net`` becomes a local net served by a LAN driver: messages whose next hop is on it
        go to ``driver.transmit(src_raw, dst_raw, src_portal, dst_portal, payload, on_done)``."""
        self._lan[net] = driver
        self.routes.local_nets.add(net)
        self._direct.clear()

    def detach_lan(self, net: Net) -> None:
        if self._lan.pop(net, None) is not None:
            self.routes.local_nets.discard(net)
            self._direct.clear()

    def set_peer_addresses(self, addresses: dict[Nid, str]) -> None:
        self.peer_addresses = dict(addresses)
        self._direct.clear()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TIMER_INTERVAL)
            now = time.monotonic()
            for ni in self.nis.values():
                for p in list(ni.peers.values()):
                    p.expire(now)

    # -- NIDs --------------------------------------------------------------------------

    def packed(self, nid: Nid) -> bytes:
        b = self._packed.get(nid)
        if b is None:
            b = self._packed[nid] = nid.to_bytes()
        return b

    def unpack(self, raw: bytes) -> Nid:
        nid = self._unpacked.get(raw)
        if nid is None:
            nid = Nid.from_bytes(raw)
            if len(self._unpacked) < 65536:
                self._unpacked[raw] = nid
        return nid

    def is_local(self, packed_nid: bytes) -> bool:
        return bytes(packed_nid) in self._local_packed

    def primary_nid(self) -> Nid:
        return self.config.nets[0].nid

    def port_for(self, portal: int) -> Any:
        if self.shim is None:
            return None
        port = self.shim.ports.get(portal)
        return port if port is not None and port.attached else None

    # -- sending ---------------------------------------------------------------------------

    def peer(self, nid: Nid) -> Peer:
        ni = self.nis.get(nid.net)
        if ni is None:
            raise LocalProtocolError(f"{nid} is not on a local net")
        p = ni.peers.get(nid)
        if p is None:
            p = ni.peers[nid] = Peer(self, nid, ni)
        return p

    def health_of(self, nid: Nid) -> int:
        ni = self.nis.get(nid.net)
        p = ni.peers.get(nid) if ni else None
        return p.health.value if p else 1000

    def send(self, src_raw: bytes | None, dst: Nid | bytes, src_portal: int, dst_portal: int, payload: memoryview | bytes,
             on_finish: Callable[[Status, str], None], deadline: float | None = None) -> OutMsg:
        """Route and queue one message; ``on_finish`` is called exactly once.

        ``dst`` is a NID or its packed form (what the shim hands over); ``src_raw`` is the
        packed origin when forwarding, None when we originate the message.  A packed NID
        that does not decode raises NidError.
        """
        if isinstance(dst, Nid):
            dst_raw, dst_nid = self.packed(dst), dst
        else:
            dst_raw, dst_nid = dst, None
        deadline = deadline if deadline is not None else time.monotonic() + self.config.global_.transaction_timeout
        self.stats["msgs_submitted"] += 1
        if dst_raw in self._local_packed:
            msg = OutMsg(src_raw or dst_raw, dst_raw, src_portal, dst_portal, payload, deadline, on_finish)
            task = asyncio.ensure_future(self._loopback(msg))
            self.background.add(task)
            task.add_done_callback(self.background.discard)
            return msg
        peer = self._direct.get(dst_raw)
        if peer is None:
            dst_nid = dst_nid or self.unpack(dst_raw)
            hop = self.routes.next_hop(dst_nid, self.health_of)
            if hop is not None and hop.net in self._lan:
                msg = OutMsg(src_raw or dst_raw, dst_raw, src_portal, dst_portal, payload, deadline, on_finish)
                self._lan[hop.net].transmit(msg.src_raw, dst_raw, src_portal, dst_portal, payload, msg.finish)
                return msg
            if hop is None or hop.net not in self.nis:
                msg = OutMsg(src_raw or dst_raw, dst_raw, src_portal, dst_portal, payload, deadline, on_finish)
                msg.finish(Status.NO_ROUTE, f"no route to net {dst_nid.net}")
                return msg
            peer = self.peer(hop)
            if hop == dst_nid and len(self._direct) < 65536:
                self._direct[dst_raw] = peer  # same-net destinations: no route lookup next time
        ni = peer.ni
        msg = OutMsg(src_raw or ni.nid_raw, dst_raw, src_portal, dst_portal, payload, deadline, on_finish)
        if len(payload) > ni.config.max_message_size:
            msg.finish(Status.TOO_LARGE, f"{len(payload)} bytes exceeds max_message_size {ni.config.max_message_size} of net {ni.net}")
            return msg
        peer.enqueue(msg)
        return msg

    async def _loopback(self, msg: OutMsg) -> None:
        info = wire.MsgInfo(0, msg.src_raw, msg.dst_raw, msg.src_portal, msg.dst_portal, None)
        status, reason = await self.deliver_local(info, msg.payload, None)
        msg.finish(status, reason)

    # -- receiving -----------------------------------------------------------------------

    async def _accept(self, ni: NI, transport: Transport) -> None:
        if self.closing:
            transport.close()
            return
        await InConn(self, ni, transport).run()

    async def deliver_local(self, info: wire.MsgInfo, payload: memoryview | bytes, pre: Any) -> tuple[Status, str]:
        port = self.port_for(info.dst_portal)
        if port is None:
            if pre:
                pre[0].rx_abort(pre[1])
            return Status.NO_RECEIVER, f"no endpoint attached on portal {info.dst_portal} at {self.unpack(info.dst_raw)}"
        if pre is not None and pre[0] is port:
            buf = pre[1]
        else:
            if pre:
                pre[0].rx_abort(pre[1])
            if len(payload) > port.max_message_size:
                return Status.TOO_LARGE, f"{len(payload)} bytes exceeds the receiver's buffer limit {port.max_message_size}"
            while (buf := port.rx_alloc(len(payload))) is None:
                try:
                    await port.rx_wait()  # back-pressure: stop reading until the endpoint releases
                except Lu2kError:
                    return Status.NO_RECEIVER, f"endpoint on portal {info.dst_portal} detached"
                if not port.attached:
                    return Status.NO_RECEIVER, f"endpoint on portal {info.dst_portal} detached"
            buf.view[:] = payload
        port.deliver(buf, info.src_raw, info.src_portal, len(payload))
        self.stats["msgs_delivered"] += 1
        return Status.DELIVERED, ""

    async def forward(self, info: wire.MsgInfo, payload: memoryview | bytes, done: Callable[[Status, str], None]) -> None:
        try:
            dst = self.unpack(info.dst_raw)
        except NidError as e:
            done(Status.PROTOCOL, f"undecodable destination NID: {e}")
            return
        if not self.config.routing:
            done(Status.NO_ROUTE, f"{self.primary_nid()} is not a router (message for {dst})")
            return
        size = len(payload)
        limit = self.config.global_.router_buffer_bytes
        while self.router_bytes + size > limit and self.router_bytes > 0:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._router_waiters.append(fut)
            await fut
        self.router_bytes += size
        self.stats["msgs_forwarded"] += 1

        def finished(status: Status, reason: str) -> None:
            self.router_bytes -= size
            while self._router_waiters:
                w = self._router_waiters.popleft()
                if not w.done():
                    w.set_result(None)
                    break
            done(status, reason)

        # The payload is the decoder's private buffer (no shim buffer), so no copy is needed.
        self.send(info.src_raw, dst, info.src_portal, info.dst_portal, payload, finished)

    # -- shim handler ------------------------------------------------------------------------

    def local_nid(self) -> bytes:
        return self.packed(self.primary_nid())

    def on_attach(self, port: Any) -> None:
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

    def on_detach(self, port: Any) -> None:
        """Its messages can no longer be completed to anyone: stop spending the link on them."""
        cancelled = 0
        for ni in self.nis.values():
            for p in ni.peers.values():
                for seq, m in list(p.inflight.items()):
                    if m.owner is port:
                        p._complete(seq, Status.CANCELLED, "endpoint detached")
                        cancelled += 1
                for m in p.queue:
                    if m.owner is port:
                        m.finish(Status.CANCELLED, "endpoint detached")
                        cancelled += 1
        for backend, handle in self._registered.pop(port, []):
            # A work request still posted from this memory fails; the engine treats that as a
            # connection error and resends (the receiver dedupes), so nothing is lost or doubled.
            backend.unregister_memory(handle)
        log.info("endpoint detached", portal=port.portal, pid=port.pid, cancelled=cancelled)

    def on_rx_space(self, port: Any) -> None:
        return None  # rx_wait() wakes the waiting receivers

    def on_submit(self, port: Any, reqs: list[Any]) -> None:
        for req in reqs:
            def finish(status: Status, reason: str, port: Any = port, req: Any = req) -> None:
                if port.attached:
                    port.complete(req, status, reason)
            try:
                msg = self.send(None, bytes(req.dst_nid), port.portal, req.dst_portal, req.payload, finish)
                msg.owner = port
            except NidError as e:
                port.complete(req, Status.INVALID, f"bad destination NID: {e}")
            except LocalProtocolError as e:
                port.complete(req, Status.NO_ROUTE, str(e))

    # -- control ---------------------------------------------------------------------------------

    async def ping(self, nid: Nid, timeout: float = 5.0) -> dict[str, Any]:
        if self.is_local(self.packed(nid)):
            return {"nid": str(nid), "rtt_ms": 0.0, "local": True}
        hop = self.routes.next_hop(nid, self.health_of)
        if hop is None:
            raise NetworkError(f"no route to net {nid.net}")
        peer = self.peer(hop)
        conn = peer.conn_for(0)
        rtt = await conn.ping(timeout)
        return {"nid": str(nid), "via": str(hop), "rtt_ms": round(rtt * 1000, 3), "incarnation": f"{peer.peer_incarnation or 0:016x}"}

    def describe_nets(self) -> list[dict[str, Any]]:
        out = []
        for ni in self.nis.values():
            c = ni.config
            out.append({
                "net": str(ni.net), "nid": str(ni.nid), "status": "up", "backend": c.backend,
                "listen": f"{ni.listener.address[0]}:{ni.listener.address[1]}" if ni.listener else None,
                "tunables": {"peer_timeout": c.peer_timeout, "peer_credits": c.peer_credits, "credits": c.credits},
                "credits": {"tx": ni.credits.limit - ni.credits.in_use, "max_tx": ni.credits.limit, "min_tx": ni.credits.min_value},
                "max_message_size": c.max_message_size,
                "profile": {k: v for k, v in vars(c.profile).items() if v is not None},
                "backend_settings": ni.backend.describe(),
            })
        return out

    def describe_peers(self) -> list[dict[str, Any]]:
        return [p.describe() for ni in self.nis.values() for p in ni.peers.values()]

    def describe_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats)
        out["uptime_s"] = round(time.time() - self.started, 1)
        out["endpoints"] = len(self.shim.ports) if self.shim else 0
        if self.shim is not None:
            out.update({f"shim_{k}": v for k, v in self.shim.stats().items() if isinstance(v, int)})
        out["inbound_sessions"] = len(self.sessions)
        return out

    def describe_routes(self) -> list[dict[str, Any]]:
        return [{"net": str(r.net), "gateway": str(r.gateway), "hop": r.hops if r.hops is not None else -1, "priority": r.priority,
                 "health": self.health_of(r.gateway)} for r in self.routes.routes()]
