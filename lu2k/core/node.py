"""One daemon's LNet message layer as a pure state machine.  No asyncio, no sockets, no clock.

Driven like aioquic's ``QuicConnection``: the runner (the daemon's engine, or the
simulator) calls an input method with ``now`` and then carries out ``node.actions``
(:mod:`lu2k.core.actions`) in order; :meth:`Node.get_timer` says when to call
:meth:`Node.handle_timer` next.  The message and connection states and their legal moves
are the tables in :mod:`lu2k.core.states`.

Theory of operation
-------------------
*Messages.*  Every message handed to :meth:`Node.submit` becomes an :class:`OutMsg` and
ends in exactly one :class:`~lu2k.core.actions.Complete` (DELIVERED, or a failure status
and a reason).  Its payload stays the submitter's (shim shared memory) until then: we send
from it and, after a reconnect, resend from it; the completion waits while a transport
still reads the payload (``busy``), so a buffer is never handed back while a send reads it.

*Connections are unidirectional.*  To send to a peer we open our own connection to it;
connections we accept only receive messages, and their reverse direction carries only ACK,
NACK and PONG frames.  With typed connections small messages use CONTROL, the rest BULK.
A peer behind NAT is the exception: we send to it on the reverse direction of its own
connection (:mod:`lu2k.core.returnpath`).

*Exactly once.*  Each message gets a sequence number in our session with the next hop
(our incarnation, its NID).  The receiver ACKs it once it delivered it to the local
endpoint -- or, as a gateway, once the next hop ACKed it, so DELIVERED is end to end.
After a reconnect everything not yet ACKed goes out again; the receiver's
:class:`~lu2k.dedupe.RecvWindow` answers copies from memory.  A peer that comes back with a
new incarnation may have lost what it had: messages it may have seen fail with
PEER_RESTARTED rather than risk a second delivery.

*Credits.*  A message on a peer holds one NI credit and one peer credit
(:class:`~lu2k.credits.Credits`) from ASSIGN to its final state; without credits it waits
in the peer's queue.  The submitters bound what they hand over (the shim's
``max_in_flight``; the gateway's router buffer), so congestion is back-pressure, not
memory growth.  An accepted connection is not read further while a forward waits for
router buffer space or ``max_pending_deliveries`` deliveries wait for their endpoints
(:attr:`InConn.blocked`), which back-pressures the sending peer; below that, one endpoint
that stops releasing its buffers does not hold up the others.

*Timeouts.*  A message not finished by its deadline fails: NO_ROUTE (with the last
connect error) if it never went out for want of a connection, TIMED_OUT otherwise (waiting
for credits or for its turn on a connection that is up, or unacknowledged).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from .. import wire
from ..credits import Credits
from ..dedupe import HOLE_LIMIT, IN_PROGRESS, AppIds, AppKey, RecvWindow
from ..errors import FrameError, LocalProtocolError, NidError, RemoteProtocolError, Status
from ..health import MAX_HEALTH, Backoff, Health
from ..nid import Net, Nid
from ..routing import Route, RouteTable
from ..wire import ConnType, Frame, FrameType
from .fairq import ByteWindow, FairQueue
from . import rails as mr
from .actions import (
    AbortRx, Action, Close, CloseIn, Complete, Connect, Deliver, LanTransmit, PingDone, Resume, SendIn, Wake,
)
from .returnpath import ANSWERS, REQUESTS, ReturnPath, ReturnPaths
from .states import FINAL, TRANSMITTED, ConnEvent, ConnState, MsgEvent, MsgState, conn_next, msg_next

SEND_BATCH_FRAMES = 512
SEND_BATCH_BYTES = 8 << 20
ACKS_PER_FRAME = 4096
# An inbound session (sender NID, incarnation) with no connection is kept this long (or 4
# transaction timeouts, if longer): a sender resends a message only until its transaction
# timeout, so a copy arriving later cannot exist.  At most MAX_SESSIONS are kept.
SESSION_IDLE_TIMEOUT = 600.0
MAX_SESSIONS = 16384
# A peer with nothing queued or in flight and no connection up is forgotten after this long
# idle (checked when the NI's peer table has grown, amortised); its next sequence number is
# kept until every receiver has let our session go (2 x the session idle timeout).
PEER_IDLE_TIMEOUT = 600.0
# A destination (NID + portal) with no acknowledgement for this long (or this many profile RTTs)
# is held to its share of a peer's credits (Peer.dest_cap).
DEST_STALL_MIN = 1.0
DEST_STALL_RTTS = 4
NEVER = float("-inf")
PEER_SWEEP_MIN = 256  # peers on one NI before idle ones are looked for
PING_PORTAL = 0xFFFFFFFF  # a message to this portal is answered by the daemon itself (routed ping)
RAIL_PROBE = "rail probe"  # target of the pings that bring a dead rail back

Finish = Callable[[Status, str], None]


def dest_reserve(peer_credits: int) -> int:
    """The credits of a peer that one destination never gets: a quarter of a few, at least
    a sixteenth of many (8 -> 2, 64 -> 16, 4096 -> 256)."""
    return max(peer_credits // 16, min(peer_credits // 4, 16))


@dataclass(frozen=True, slots=True)
class NodeParams:
    """Daemon-wide settings the message layer needs (from ``global`` and ``routing``)."""

    incarnation: int
    transaction_timeout: float = 50.0
    reconnect_min: float = 0.1
    reconnect_max: float = 10.0
    health_sensitivity: int = 100
    recovery_interval: float = 1.0
    routing: bool = False
    router_buffer_bytes: int = 256 << 20
    window_capacity: int = 65536
    window_hole_limit: int = HOLE_LIMIT  # later numbers held before a missing one is taken for a hole (lu2k.dedupe)
    max_pending_deliveries: int = 64  # per accepted connection; then it is not read until they drain


@dataclass(frozen=True, slots=True)
class NetParams:
    """One local NI's settings."""

    nid: Nid
    port: int
    credits: int = 256
    peer_credits: int = 8
    max_message_size: int = 1 << 20
    checksum: bool = False
    typed_connections: bool = False
    min_bulk: int = 1024
    peer_window_bytes: int = 0  # bytes assigned to a peer and not yet ACKed (0: credits only); see core.fairq
    rate: float = 0.0  # bytes/s from the net's site profile (multi-rail capacity), 0: unknown
    rtt: float = 0.0  # seconds from the net's site profile (multi-rail RTT), 0: unknown


class OutMsg:
    """One message on its way out of this node (submitted here, or being forwarded)."""

    __slots__ = ("src_raw", "dst_raw", "src_portal", "dst_portal", "payload", "deadline", "on_finish", "owner",
                 "state", "seq", "peer", "conn", "header", "busy", "status", "reason", "completed", "forward", "lan",
                 "ping", "charged", "msg_id")

    def __init__(self, src_raw: bytes, dst_raw: bytes, src_portal: int, dst_portal: int, payload: Any,
                 deadline: float, on_finish: Finish | None) -> None:
        self.src_raw, self.dst_raw, self.src_portal, self.dst_portal = src_raw, dst_raw, src_portal, dst_portal
        self.payload = payload
        self.deadline = deadline
        self.on_finish = on_finish
        self.owner: Any = None  # who handed it over (the shim port), opaque to the node
        self.state = MsgState.QUEUED
        self.seq = 0
        self.peer: Peer | None = None
        self.conn: OutConn | None = None
        self.header = b""
        self.busy = 0  # transports currently reading the payload
        self.status = Status.DELIVERED
        self.reason = ""
        self.completed = False
        self.forward: tuple[InConn, int, int] | None = None  # (connection it came on, seq, size) when we forward it
        self.lan: Net | None = None
        self.ping: _Ping | None = None
        self.charged: mr.RailMeter | None = None  # the rail whose backlog counts it (multi-rail)
        self.msg_id: int | None = None  # the application's id for it (safe resend after a crash)

    @property
    def transmitted(self) -> bool:
        return self.state in TRANSMITTED

    def __repr__(self) -> str:
        return f"<OutMsg seq={self.seq} {self.state.value} portal={self.dst_portal} len={len(self.payload)}>"


def _finished(obj: Any) -> bool:
    # A message is done with its deadline once completed: until then its send may be stuck
    # (see Node.handle_timer).
    return bool(obj.completed) if isinstance(obj, OutMsg) else bool(obj.done)


class _Deadlines:
    """Deadlines of pending messages and pings.  Most messages get ``now + transaction_timeout``,
    so their deadlines arrive in order: those go in a FIFO, the rest in a heap.  A finished
    entry is dropped when it reaches the front; when finished entries pile up behind one
    that is stuck, they are compacted away."""

    def __init__(self) -> None:
        self.fifo: deque[Any] = deque()
        self.heap: list[tuple[float, int, Any]] = []
        self.dead = 0  # finished entries still stored
        self._tie = itertools.count()

    def add(self, obj: Any) -> None:
        fifo = self.fifo
        if not fifo or obj.deadline >= fifo[-1].deadline:
            fifo.append(obj)
        else:
            heapq.heappush(self.heap, (obj.deadline, next(self._tie), obj))

    def __iter__(self) -> Iterator[Any]:
        yield from self.fifo
        for _d, _t, obj in self.heap:
            yield obj

    def first(self) -> float | None:
        fifo, heap = self.fifo, self.heap
        if self.dead > 1024 and self.dead * 2 > len(fifo) + len(heap):
            self.fifo = fifo = deque(o for o in fifo if not _finished(o))
            self.heap = heap = [e for e in heap if not _finished(e[2])]
            heapq.heapify(heap)
            self.dead = 0
        while fifo and _finished(fifo[0]):
            fifo.popleft()
            self.dead -= 1
        while heap and _finished(heap[0][2]):
            heapq.heappop(heap)
            self.dead -= 1
        if self.dead < 0:
            self.dead = 0
        a = fifo[0].deadline if fifo else None
        b = heap[0][0] if heap else None
        if a is None:
            return b
        return a if b is None or a <= b else b

    def expired(self, now: float) -> list[Any]:
        out = []
        fifo, heap = self.fifo, self.heap
        while fifo and fifo[0].deadline <= now:
            out.append(fifo.popleft())
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        self.dead -= sum(1 for o in out if _finished(o))
        return out


class _Ping:
    __slots__ = ("token", "started", "deadline", "sent", "via", "conn", "done", "target")

    def __init__(self, token: int, started: float, deadline: float, via: str, target: str = "") -> None:
        self.token, self.started, self.deadline, self.via, self.target = token, started, deadline, via, target
        self.sent = False
        self.conn: OutConn | None = None
        self.done = False


class Batch:
    """Frames handed to one transport send; give it back with :meth:`Node.send_done`."""

    __slots__ = ("conn", "attempt", "frames", "msgs", "size")

    def __init__(self, conn: OutConn, attempt: int) -> None:
        self.conn, self.attempt = conn, attempt
        self.frames: list[tuple[bytes, Any]] = []
        self.msgs: list[OutMsg] = []
        self.size = 0


class OutConn:
    """Our outgoing connection of one type to one peer."""

    def __init__(self, peer: Peer, ctype: ConnType, backoff: Backoff) -> None:
        self.peer, self.ctype = peer, ctype
        self.state = ConnState.IDLE
        self.attempt = 0
        self.queue: deque[OutMsg] = deque()
        self.pings: dict[int, _Ping] = {}
        self.backoff = backoff
        self.woken = False
        self.sent_msgs = 0
        self.sending = 0  # batches handed to a transport and not yet send_done (any attempt)
        self.transport_stats: dict[str, Any] = {}
        # Return path (lu2k.core.returnpath): the accepted connection we send on instead of our
        # own, the peer's requests on our own connection's reverse direction, whether we keep
        # this connection up with nothing to send, whether connecting in failed last time.
        self.via: InConn | None = None
        self.rev_in: InConn | None = None
        self.hold = False
        self.connect_failed = False
        self.prewarm = False  # opened beside its sibling before anything needs it (until up or failed)

    def has_work(self) -> bool:
        q = self.queue
        while q and q[0].state in FINAL:
            q.popleft()  # failed while waiting for this connection
        return bool(q) or self.hold or self.prewarm or any(not p.sent for p in self.pings.values())

    def __repr__(self) -> str:
        return f"<OutConn {self.peer.nid} {self.ctype.name} {self.state.value} #{self.attempt}>"


def _owner_key(m: OutMsg) -> int:
    return id(m.owner)  # the submitting endpoint (None: forwarded), by identity


def _payload_size(m: OutMsg) -> int:
    return len(m.payload)


class Peer:
    """A next hop: our session with it (sequence numbers, incarnation), credits, connections."""

    def __init__(self, ni: NI, nid: Nid, params: NodeParams) -> None:
        self.ni, self.nid = ni, nid
        self.credits = Credits(ni.params.peer_credits)
        # Fair between the endpoints that submitted, bounded in bytes past the link (core.fairq).
        self.queue: FairQueue[OutMsg] = FairQueue(_owner_key, _payload_size)
        self.window = ByteWindow(ni.params.peer_window_bytes)
        # One destination (NID + portal) may hold at most ``dest_cap`` of the credits (a
        # quarter stays for the others; below four credits none can) and fewer than the
        # deliveries after which the receiver stops reading the connection, so a receiver
        # that stopped taking messages cannot starve the others; its further messages wait
        # in ``parked`` (in order) without blocking the queue behind them.
        # A destination whose messages were acknowledged within ``dest_stall`` seconds may go
        # past that, up to ``dest_cap_answering`` (a long link needs many messages in flight to
        # one destination), but never into ``dest_reserve``: a destination can stop answering
        # with all it was given in flight, and those credits are back only at its timeouts.
        limit = ni.params.peer_credits
        self.dest_reserve = dest_reserve(limit)
        self.dest_cap = max(1, min(limit - self.dest_reserve, params.max_pending_deliveries * 3 // 4))
        self.dest_cap_answering = max(1, limit - self.dest_reserve)
        self.dest_stall = max(DEST_STALL_MIN, DEST_STALL_RTTS * ni.params.rtt)
        self.by_dest: Counter[tuple[bytes, int]] = Counter()
        self.dest_acked: dict[tuple[bytes, int], float] = {}  # destination -> when it last acknowledged one
        self.parked: dict[tuple[bytes, int], deque[OutMsg]] = {}
        self.inflight: dict[int, OutMsg] = {}
        self.conns: dict[ConnType, OutConn] = {}
        self.next_seq = 1
        self.incarnation: int | None = None
        self.health = Health(params.health_sensitivity, params.recovery_interval)
        self.last_error = ""
        self.stats: Counter[str] = Counter()
        self._params = params
        self.rail: mr.RailSet | None = None  # multi-rail: the peer this NID is one rail of
        self.meter: mr.RailMeter | None = None
        self.rail_down = False  # its last connection died or failed and none is up since
        self.last_used = 0.0  # when a message was last queued to it (idle peers are forgotten)

    def conn_for(self, size: int) -> OutConn:
        p = self.ni.params
        if p.typed_connections:
            ctype = ConnType.BULK if size >= p.min_bulk else ConnType.CONTROL
        else:
            ctype = ConnType.ANY
        return self.conn_of(ctype)

    def dest_limit(self, key: tuple[bytes, int], fresh: float) -> int:
        """How many credits destination ``key`` may hold: more while it answers (acknowledged
        since ``fresh``), never the reserve."""
        return self.dest_cap_answering if self.dest_acked.get(key, NEVER) >= fresh else self.dest_cap

    def conn_of(self, ctype: ConnType) -> OutConn:
        conn = self.conns.get(ctype)
        if conn is None:
            conn = self.conns[ctype] = OutConn(self, ctype, Backoff(self._params.reconnect_min, self._params.reconnect_max))
        return conn

    @property
    def up(self) -> bool:
        return any(c.state is ConnState.UP for c in self.conns.values())

    def waiting(self) -> list[OutMsg]:
        """Messages waiting for a credit: the queue and the parked ones."""
        out = list(self.queue)
        for q in self.parked.values():
            out += q
        return out

    def waiting_count(self) -> int:
        return len(self.queue) + sum(len(q) for q in self.parked.values())


class NI:
    """A local network interface: its NID, NI credits and peers."""

    def __init__(self, params: NetParams) -> None:
        self.params = params
        self.net: Net = params.nid.net
        self.nid: Nid = params.nid
        self.nid_raw = params.nid.to_bytes()
        self.credits = Credits(params.credits)
        self.peers: dict[Nid, Peer] = {}
        self.queued = 0  # messages waiting for credits, over all peers
        self.sweep_at = PEER_SWEEP_MIN  # peer count at which idle peers are next looked for
        self.sweep_after = 0.0  # ... or, past PEER_SWEEP_MIN peers, the time


class Session:
    """What we know about one sender (NID + incarnation) whose messages we receive."""

    def __init__(self, peer_nid: Nid, incarnation: int, capacity: int, hole_limit: int = HOLE_LIMIT) -> None:
        self.peer_nid, self.incarnation = peer_nid, incarnation
        self.peer_raw = peer_nid.to_bytes()
        self.window = RecvWindow(capacity, hole_limit)
        self.conns: list[InConn] = []
        self.resent_on: dict[int, InConn] = {}  # seq still in progress -> connection its latest copy came on
        self.stats: Counter[str] = Counter()
        self.nids: set[Nid] = {peer_nid}  # a multi-rail sender's session spans the NIDs of its rails
        self.idle_since: float | None = None  # when its last connection went (None: it has one)


class InConn:
    """A connection we accepted (after its hello): MSG and PING frames in, ACKs out."""

    def __init__(self, ni: NI, session: Session, ctype: ConnType, max_pending: int = 64) -> None:
        self.ni, self.session, self.ctype = ni, session, ctype
        self.max_pending = max_pending
        self.alive = True
        self.acks: list[tuple[int, int]] = []
        self.control: list[bytes] = []
        self.pending = 0  # deliveries handed out and not answered yet
        self.parked = 0  # forwards waiting for router buffer space
        self.pong_nids = False  # the sender reads our NIDs in PONG payloads (discover)
        self.out: OutConn | None = None  # set: the reverse direction of our own connection (returnpath)
        self.reverse: OutConn | None = None  # our connection that sends on this one's reverse direction
        self.heard = False  # a frame came after the hello: the peer's side reads post-hello frames now
        self.moved_from = False  # our connection rode this one and moved on: answers may still come on it

    @property
    def blocked(self) -> bool:
        """True while the runner must not read more frames from this connection: too many of
        its deliveries wait (one slow endpoint does not stop the others' traffic until then),
        or a forward waits for router buffer space."""
        return self.pending >= self.max_pending or self.parked > 0


class Delivery:
    """One message for a local endpoint, answered by :meth:`Node.delivered`."""

    __slots__ = ("src_raw", "dst_raw", "src_portal", "dst_portal", "payload", "token", "conn", "seq", "msg", "done", "app_key")

    def __init__(self, src_raw: bytes, dst_raw: bytes, src_portal: int, dst_portal: int, payload: Any, token: Any,
                 conn: InConn | None, seq: int, msg: OutMsg | None) -> None:
        self.src_raw, self.dst_raw, self.src_portal, self.dst_portal = src_raw, dst_raw, src_portal, dst_portal
        self.payload, self.token, self.conn, self.seq, self.msg = payload, token, conn, seq, msg
        self.done = False
        self.app_key: AppKey | None = None  # remembered in Node.app_ids once answered


class Node(ReturnPaths):
    """The message layer of one daemon.  See the module docstring."""

    _ping_type = _Ping  # for the return-path mixin's keepalives (it cannot import this module)

    def __init__(self, params: NodeParams, routes: list[Route] | None = None) -> None:
        self.params = params
        self.incarnation = params.incarnation
        self.nis: dict[Net, NI] = {}
        self.lans: set[Net] = set()
        self.routes = RouteTable((), routes or ())
        # (sender NID, incarnation); a multi-rail sender's one session is (None, incarnation)
        self.sessions: dict[tuple[Nid | None, int], Session] = {}
        self._rails: dict[Nid, mr.RailSet] = {}  # every NID of a multi-rail peer -> its rail set
        self.app_ids = AppIds()  # application message ids delivered here, across sender restarts
        self.peer_addresses: dict[Nid, str] = {}
        self.actions: list[Action] = []
        self.stats: Counter[str] = Counter()
        self.router_bytes = 0
        self.closing = False
        self._router_wait: deque[tuple[InConn, wire.MsgInfo, Any]] = deque()
        self._deadlines = _Deadlines()
        self._backoff_waiting: dict[OutConn, None] = {}  # dicts, not sets: the order of actions is deterministic
        self._local_raw: set[bytes] = set()
        self._direct: dict[bytes, Peer] = {}
        self._unpacked: dict[bytes, Nid] = {}
        self._dirty: dict[InConn, None] = {}
        self._refill: dict[Peer, None] = {}  # peers whose credits came back while messages wait
        self.pump_held = False  # set by submit_batch: queued messages are assigned once per batch, in take_actions
        # A dropped peer's next sequence number: a new Peer for that NID continues from it, as
        # the receiver still holds our session's window (restarting at 1 would be answered
        # from that window -- "delivered" without a delivery).
        self._dropped_seq: dict[Nid, int] = {}
        self._dropped_at: dict[Nid, float] = {}
        self._now = 0.0
        self._rp_init()

    # ------------------------------------------------------------------ configuration

    def add_net(self, params: NetParams) -> NI:
        if params.nid.net in self.nis or params.nid.net in self.lans:
            raise LocalProtocolError(f"net {params.nid.net} is already up")
        ni = self.nis[params.nid.net] = NI(params)
        self.routes.local_nets.add(ni.net)
        self._local_raw.add(ni.nid_raw)
        self._direct.clear()
        self._rp_hold_all()
        return ni

    def remove_net(self, net: Net, reason: str) -> None:
        """Take an NI down; what it still holds fails with CANCELLED and ``reason``."""
        ni = self.nis.pop(net, None)
        if ni is None:
            return
        self.routes.local_nets.discard(net)
        self._local_raw.discard(ni.nid_raw)
        self._direct.clear()
        for nid in list(ni.peers):
            self._drop_peer(ni, nid, reason)
        for key, s in list(self.sessions.items()):
            if key[0] is None:  # a multi-rail session: only its connections on this net go
                for c in [c for c in s.conns if c.ni is ni]:
                    self._close_in(c, reason)
            elif s.peer_nid.net == net:
                for c in list(s.conns):
                    self._close_in(c, reason)
                del self.sessions[key]

    def attach_lan(self, net: Net) -> None:
        """Messages whose next hop is on ``net`` go to the LAN driver (LanTransmit actions)."""
        if net in self.nis or net in self.lans:
            raise LocalProtocolError(f"net {net} is already up")
        self.lans.add(net)
        self.routes.local_nets.add(net)
        self._direct.clear()

    def detach_lan(self, net: Net, reason: str) -> None:
        """Stop using the LAN driver of ``net``; what it still holds fails with CANCELLED."""
        self.lans.discard(net)
        self.routes.local_nets.discard(net)
        self._direct.clear()
        for m in self._pending_where(lambda m: m.lan == net):
            self._fail(m, Status.CANCELLED, reason)

    def cancel_owned(self, owner: object, reason: str) -> int:
        """Fail (CANCELLED) every pending message ``owner`` handed over -- its submitter is
        gone, so nobody could be told the outcome; stop spending the link on them."""
        doomed = self._pending_where(lambda m: m.owner is owner)
        for m in doomed:
            self._fail(m, Status.CANCELLED, reason)
        return len(doomed)

    def _pending_where(self, pred: Callable[[OutMsg], bool]) -> list[OutMsg]:
        return [obj for obj in self._deadlines if isinstance(obj, OutMsg) and obj.state not in FINAL and pred(obj)]

    def set_routes(self, routes: list[Route]) -> None:
        self.routes = RouteTable(set(self.nis) | self.lans, routes)
        self._direct.clear()

    def set_peer_addresses(self, addresses: dict[Nid, str]) -> None:
        self.peer_addresses = dict(addresses)
        self._direct.clear()

    def set_rails(self, groups: dict[Nid, list[Nid]]) -> None:
        """Multi-rail peers: primary NID -> all its NIDs (see :mod:`lu2k.core.rails`).  A peer
        whose rails changed is dropped (what it held fails with CANCELLED) and starts afresh."""
        new: dict[Nid, mr.RailSet] = {}
        for prim, nids in groups.items():
            rs = mr.RailSet(prim, nids)
            old = self._rails.get(rs.nids[0]) if rs.nids else None
            if old is not None and old.nids == rs.nids:
                rs = old  # unchanged: its peers, sequence space and in-flight map stay
            if len(rs.nids) > 1:
                for n in rs.nids:
                    new[n] = rs
        changed = {n for n in set(new) | set(self._rails)
                   if (new[n].nids if n in new else None) != (self._rails[n].nids if n in self._rails else None)}
        self._rails = new
        for n in changed:
            self.drop_peer(n, "peer's rails reconfigured")
        # A new rail set continues above every sequence number its NIDs used: the receiver may
        # still hold a window for them (restarting at 1 would be answered from it).
        for rs in dict.fromkeys(new.values()):
            floor = max((self._dropped_seq.pop(n, 1) for n in rs.nids), default=1)
            rs.next_seq = max(rs.next_seq, floor)

    def rail_peers(self, rs: mr.RailSet) -> list[Peer]:
        """The rails of a multi-rail peer that are on local nets, in configuration order."""
        return [self.peer(n) for n in rs.nids if n.net in self.nis]

    def _rail_views(self, rails: list[Peer]) -> list[mr.RailView]:
        out = []
        for p in rails:
            p.health.tick(self._now)
            m = p.meter
            assert m is not None
            out.append(mr.RailView(p.rail_down, p.health.value, m.capacity, m.rtt, m.backlog, m.base_rtt))
        return out

    def _pick_rail(self, peer: Peer, msg: OutMsg) -> Peer:
        assert peer.rail is not None
        rails = self.rail_peers(peer.rail)
        if len(rails) > 1:
            peer = rails[mr.pick(self._rail_views(rails), len(msg.payload), margin=self.params.health_sensitivity)]
        meter = peer.meter
        if meter is not None:
            meter.backlog += len(msg.payload)
            msg.charged = meter
        return peer

    def _rail_failover(self, peer: Peer, conn: OutConn, pending: list[OutMsg]) -> None:
        """``peer``'s rail died: what went out on ``conn`` and is not acknowledged (``pending``)
        goes again on the other rails, and what waits for its credits is picked again.  The
        messages keep the credits they hold on the dead rail (it sends nothing meanwhile);
        their sequence numbers stay, so the receiver's one window answers a copy it has."""
        assert peer.rail is not None and peer.meter is not None
        peer.meter.lost()
        rails = self.rail_peers(peer.rail)
        lost = rails.index(peer)
        kicked: dict[OutConn, None] = {}
        margin = self.params.health_sensitivity
        for m in pending:
            views = self._rail_views(rails)
            i = mr.failover_target(views, lost, len(m.payload), margin=margin)
            if i is None:
                continue
            target = rails[i]
            tconn = target.conn_for(len(m.payload))
            self._recharge(m, target)
            m.conn = tconn
            tconn.queue.append(m)
            kicked[tconn] = None
            peer.meter.resent_away += 1
            assert target.meter is not None
            target.meter.resent_here += 1
        ni = peer.ni
        for m in list(peer.queue):
            if m.state is not MsgState.QUEUED:
                continue
            i = mr.failover_target(self._rail_views(rails), lost, len(m.payload), margin=margin)
            if i is None:
                break
            target = rails[i]
            peer.queue.remove(m)
            ni.queued -= 1
            self._recharge(m, target)
            m.peer = target
            target.queue.append(m)
            target.ni.queued += 1
            self._refill[target] = None
        if kicked:
            conn.queue = deque(m for m in conn.queue if m.conn is conn)
            peer.meter.failovers += 1
            self.stats["rail_failovers"] += 1
        for tconn in kicked:
            tconn.queue = deque(sorted((m for m in tconn.queue if m.state not in FINAL), key=lambda m: m.seq))
            self._kick(tconn)

    def _reroute_unsent(self, peer: Peer) -> None:
        """``peer`` just failed (its connect, or its connection): the messages that only pass
        through it and were never transmitted go to a healthier gateway when the routes offer
        one -- as LNet picks routers by health.  Untransmitted, they cannot arrive twice.  One
        that held a credit gives it back and leaves its sequence number unused, as a message
        that times out before it is sent does (the receiver's window moves past such holes)."""
        if self.closing:
            return
        ni = peer.ni
        unsent = [m for _seq, m in sorted(peer.inflight.items()) if m.state is MsgState.IN_FLIGHT and not m.busy]
        for parked in peer.parked.values():
            unsent += parked
        unsent += peer.queue
        own_health = self.health_of(peer.nid)
        moved: list[tuple[OutMsg, Peer]] = []
        for m in unsent:
            dst = self.unpack(m.dst_raw)
            if dst == peer.nid:
                continue
            hop = self.routes.next_hop(dst, self.health_of)
            if hop is None or hop == peer.nid or hop.net != ni.net or self.health_of(hop) <= own_health:
                continue  # same NI only: an originated message's source NID is this NI's
            if m.state is MsgState.IN_FLIGHT:
                self._give_back(peer, m, answered=False)
                m.seq, m.header, m.conn = 0, b"", None
            else:
                self._unqueue(peer, m)
            self._transition(m, MsgEvent.REROUTE)
            moved.append((m, self.peer(hop)))
        if not moved:
            return
        for conn in peer.conns.values():
            conn.queue = deque(m for m in conn.queue if m.conn is conn)
        self.stats["msgs_rerouted"] += len(moved)
        peer.stats["rerouted_away"] += len(moved)
        self._refill[peer] = None  # NI credits came back: the NI's other peers may be waiting
        for m, target in moved:
            self._enqueue(target, m, arm=False)

    def _recharge(self, m: OutMsg, target: Peer) -> None:
        if m.charged is not None:
            m.charged.backlog -= len(m.payload)
        m.charged = target.meter
        if target.meter is not None:
            target.meter.backlog += len(m.payload)

    def _rail_probe(self, conn: OutConn) -> None:
        """Keep a PING queued on a dead rail so it reconnects (with its backoff) and rejoins;
        the answer is for the node alone (PingDone with a token no runner asked for)."""
        if any(not p.sent for p in conn.pings.values()) or self.closing:
            return
        rs = conn.peer.rail
        assert rs is not None
        rs.probes += 1
        token = (1 << 63) | rs.probes  # runners draw their tokens at random: no clash in practice
        wait = max(self.params.transaction_timeout, 4 * self.params.reconnect_max)
        ping = _Ping(token, self._now, self._now + wait, str(conn.peer.nid), RAIL_PROBE)
        ping.conn = conn
        conn.pings[token] = ping
        self._arm(ping.deadline, ping)
        self._maybe_connect(conn)

    def _rail_acks(self, peer: Peer, entries: list[tuple[int, int]]) -> None:
        """ACKs on a rail: the message may have gone out on any rail of the peer."""
        inflight = peer.inflight
        for seq, code in entries:
            m = inflight.get(seq)
            if m is None:
                continue
            if not code and m.conn is not None and m.conn.peer.meter is not None and m.transmitted:
                m.conn.peer.meter.acked(seq, len(m.payload), self._now)
            self._answer(m, Status.from_code(code) if code else Status.DELIVERED, "")

    def drop_peer(self, nid: Nid, reason: str) -> None:
        """Forget a peer: fail what is queued or in flight to it, close its connections."""
        ni = self.nis.get(nid.net)
        if ni is not None:
            self._drop_peer(ni, nid, reason)

    def _drop_peer(self, ni: NI, nid: Nid, reason: str) -> None:
        peer = ni.peers.pop(nid, None)
        self._direct.clear()
        if peer is None:
            return
        self._dropped_seq[nid] = (peer.rail or peer).next_seq
        self._dropped_at[nid] = self._now
        for m in list(peer.inflight.values()) + peer.waiting():
            self._fail(m, Status.CANCELLED, reason)
        for c in peer.conns.values():
            self._close_conn(c, reason)
            self._fail_pings(c, reason)
        self._pump_ni(ni)

    def stop(self, reason: str = "daemon shutting down") -> None:
        """Fail everything still pending with CANCELLED; close every connection."""
        self.closing = True
        for ni in list(self.nis.values()):
            for nid in list(ni.peers):
                self._drop_peer(ni, nid, reason)
        for obj in list(self._deadlines):
            if isinstance(obj, OutMsg) and obj.state not in FINAL:
                self._fail(obj, Status.CANCELLED, reason)
        for s in self.sessions.values():
            for c in list(s.conns):
                self._close_in(c, reason)

    # ------------------------------------------------------------------ NIDs

    def is_local(self, raw: bytes) -> bool:
        return raw in self._local_raw

    def unpack(self, raw: bytes) -> Nid:
        nid = self._unpacked.get(raw)
        if nid is None:
            nid = Nid.from_bytes(raw)
            if len(self._unpacked) < 65536:
                self._unpacked[raw] = nid
        return nid

    def health_of(self, nid: Nid) -> int:
        ni = self.nis.get(nid.net)
        p = ni.peers.get(nid) if ni else None
        if p is None:
            return MAX_HEALTH
        p.health.tick(self._now)
        return p.health.value

    def peer(self, nid: Nid) -> Peer:
        ni = self.nis.get(nid.net)
        if ni is None:
            raise LocalProtocolError(f"{nid} is not on a local net")
        p = ni.peers.get(nid)
        if p is None:
            n = len(ni.peers)
            if n >= ni.sweep_at or (n >= PEER_SWEEP_MIN and self._now >= ni.sweep_after):
                self._forget_idle_peers(ni)
            p = ni.peers[nid] = Peer(ni, nid, self.params)
            p.last_used = self._now
            rs = self._rails.get(nid)
            if rs is not None:  # one rail of a multi-rail peer: one sequence space and in-flight map for all
                p.rail, p.inflight = rs, rs.inflight
                p.meter = mr.RailMeter(ni.params.rate, ni.params.rtt)
                # The per-destination share is not applied across rails (a message moved to
                # another rail keeps its count on the first): a rail's credits are its only cap.
                p.dest_cap = p.dest_cap_answering = p.credits.limit
            else:
                p.next_seq = self._dropped_seq.pop(nid, 1)
                self._dropped_at.pop(nid, None)
        return p

    def _forget_idle_peers(self, ni: NI) -> None:
        """Drop ``ni``'s peers idle for :data:`PEER_IDLE_TIMEOUT` (nothing queued, parked or
        in flight, no connection up or opening, not a rail, not held open by a keepalive), so
        that a stream of distinct destinations does not grow the table for ever; forget the
        sequence numbers of peers dropped long enough ago that no receiver keeps our session."""
        now = self._now
        idle = [nid for nid, p in ni.peers.items()
                if now - p.last_used >= PEER_IDLE_TIMEOUT and p.rail is None and not p.inflight and not p.waiting_count()
                and all(c.state in (ConnState.IDLE, ConnState.BACKOFF) and not c.hold for c in p.conns.values())]
        for nid in idle:
            self._drop_peer(ni, nid, "idle peer forgotten")
            self.stats["peers_forgotten"] += 1
        horizon = 2 * max(SESSION_IDLE_TIMEOUT, 4 * self.params.transaction_timeout)
        for nid in [n for n, t in self._dropped_at.items() if now - t > horizon]:
            del self._dropped_at[nid]
            self._dropped_seq.pop(nid, None)
        ni.sweep_at = max(PEER_SWEEP_MIN, 2 * len(ni.peers))  # amortised: a sweep per doubling ...
        ni.sweep_after = now + PEER_IDLE_TIMEOUT / 4  # ... or per quarter of the idle timeout

    def address_of(self, peer: Peer) -> tuple[str, int]:
        override = self.peer_addresses.get(peer.nid)
        if override:
            host, _, port = override.rpartition(":")
            return host.strip("[]"), int(port)
        return peer.nid.host, peer.ni.params.port

    # ------------------------------------------------------------------ timer

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next (None: nothing pending)."""
        at = self._deadlines.first()
        for c in list(self._backoff_waiting):
            if not c.has_work():
                self._backoff_waiting.pop(c, None)  # nothing to send: no reason to reconnect
            elif at is None or c.backoff.next_at < at:
                at = c.backoff.next_at
        rp = self._rp_timer()
        return rp if at is None or (rp is not None and rp < at) else at

    def handle_timer(self, now: float) -> None:
        self._now = now
        for obj in self._deadlines.expired(now):
            if isinstance(obj, OutMsg):
                if obj.state not in FINAL:
                    self._expire(obj)
                elif not obj.completed:
                    # Answered (a copy went out on another rail too), but a send still reads
                    # its payload past the deadline: that connection is stuck.
                    self._reset_stuck(obj)
            elif not obj.done:
                self._ping_failed(obj, "timed out" if obj.sent else "no connection")
                if obj.target == RAIL_PROBE and obj.conn is not None and obj.conn.peer.rail_down:
                    self._rail_probe(obj.conn)
        for c in list(self._backoff_waiting):
            if c.backoff.next_at <= now:
                self._backoff_waiting.pop(c, None)
                self._maybe_connect(c)
        self._rp_handle_timer(now)

    def _arm(self, deadline: float, obj: Any) -> None:
        self._deadlines.add(obj)

    def _expire(self, m: OutMsg) -> None:
        peer = m.peer
        if m.state is MsgState.QUEUED and peer is not None:
            why = f"waited for credits to {peer.nid} past the transaction timeout" + (f" ({peer.last_error})" if peer.last_error else "")
            self._fail(m, Status.TIMED_OUT if peer.incarnation is not None else Status.NO_ROUTE, why)
        elif not m.transmitted and peer is not None:
            conn = m.conn
            if conn is not None and conn.state is ConnState.UP:  # given credits just before its deadline
                self._fail(m, Status.TIMED_OUT, f"waited to be sent to {peer.nid} past the transaction timeout")
            else:
                self._fail(m, Status.NO_ROUTE, f"{peer.nid} unreachable: {peer.last_error or 'no connection'}")
        else:
            hop = str(peer.nid) if peer is not None else (f"LAN {m.lan}" if m.lan else "the local endpoint")
            self._fail(m, Status.TIMED_OUT, f"no acknowledgement from {hop} within the transaction timeout; delivery unknown")
        self._reset_stuck(m)

    def _reset_stuck(self, m: OutMsg) -> None:
        conn = m.conn
        if m.busy and conn is not None and conn.state is ConnState.UP:
            # Its send is still blocked (the peer stopped reading): the connection is stuck.
            # Reset it -- the aborted send frees the payload, so the completion goes out now,
            # and whatever else was on it is resent on a fresh connection.
            reason = f"send to {conn.peer.nid} blocked past a message's transaction timeout"
            self.actions.append(Close(conn, conn.attempt, reason))
            self.connection_lost(conn, conn.attempt, reason, self._now)

    # ------------------------------------------------------------------ submitting

    def submit(self, src_raw: bytes | None, dst_raw: bytes, src_portal: int, dst_portal: int, payload: Any,
               on_finish: Finish | None, now: float, deadline: float | None = None, owner: Any = None,
               msg_id: int | None = None) -> OutMsg:
        """Route and queue one message; it ends in exactly one Complete action.

        ``src_raw`` is the packed origin when forwarding (None: we originate it).  A
        ``dst_raw`` that does not decode completes the message with INVALID.  ``msg_id``
        is the application's id for it, carried to the receiver (:class:`~lu2k.dedupe.AppIds`).
        """
        self._now = now
        if deadline is None:
            deadline = now + self.params.transaction_timeout
        self.stats["msgs_submitted"] += 1
        peer = self._direct.get(dst_raw)
        if peer is None:
            msg = OutMsg(src_raw or dst_raw, dst_raw, src_portal, dst_portal, payload, deadline, on_finish)
            msg.owner, msg.msg_id = owner, msg_id
            self._route_slow(msg, src_raw is None)
            return msg
        msg = OutMsg(src_raw or peer.ni.nid_raw, dst_raw, src_portal, dst_portal, payload, deadline, on_finish)
        msg.owner, msg.msg_id = owner, msg_id
        self._enqueue(peer, msg)
        return msg

    def submit_batch(self, items: Iterable[tuple[bytes, int, int, Any, Finish | None, Any, int | None]], now: float) -> None:
        """:meth:`submit` for a batch of originated messages ``(dst_raw, src_portal, dst_portal,
        payload, on_finish, owner, msg_id)``.  Each peer's queue is pumped once for the batch (in
        :meth:`take_actions`) instead of once per message; the order per peer is the order here."""
        self.pump_held = True
        try:
            for dst_raw, src_portal, dst_portal, payload, on_finish, owner, msg_id in items:
                self.submit(None, dst_raw, src_portal, dst_portal, payload, on_finish, now, owner=owner, msg_id=msg_id)
        finally:
            self.pump_held = False

    def _route_slow(self, msg: OutMsg, originated: bool) -> None:
        dst_raw = msg.dst_raw
        if self.closing:
            self._fail(msg, Status.CANCELLED, "daemon shutting down")
            return
        if dst_raw in self._local_raw:
            self._arm(msg.deadline, msg)
            self._transition(msg, MsgEvent.ASSIGN)
            self._transition(msg, MsgEvent.TRANSMIT)
            self._deliver(Delivery(msg.src_raw, dst_raw, msg.src_portal, msg.dst_portal, msg.payload, None, None, 0, msg))
            return
        try:
            dst = self.unpack(dst_raw)
        except NidError as e:
            self._fail(msg, Status.INVALID, f"bad destination NID: {e}")
            return
        hop = self.routes.next_hop(dst, self.health_of)
        if hop is not None and hop.net in self.lans:
            if originated and self.nis:
                msg.src_raw = next(iter(self.nis.values())).nid_raw  # we have no NI on a LAN: our primary NID
            msg.lan = hop.net
            self._arm(msg.deadline, msg)
            self._transition(msg, MsgEvent.ASSIGN)
            self._transition(msg, MsgEvent.TRANSMIT)
            self.actions.append(LanTransmit(msg))
            return
        if hop is None or hop.net not in self.nis:
            self._fail(msg, Status.NO_ROUTE, f"no route to net {dst.net}")
            return
        peer = self.peer(hop)
        if hop == dst and len(self._direct) < 65536:
            self._direct[dst_raw] = peer  # same-net destinations: no route lookup next time
        if originated:
            msg.src_raw = peer.ni.nid_raw
        self._enqueue(peer, msg)

    def _enqueue(self, peer: Peer, msg: OutMsg, arm: bool = True) -> None:
        if peer.rail is not None:
            peer = self._pick_rail(peer, msg)
        peer.last_used = self._now
        ni = peer.ni
        if len(msg.payload) > ni.params.max_message_size:
            self._fail(msg, Status.TOO_LARGE,
                       f"{len(msg.payload)} bytes exceeds max_message_size {ni.params.max_message_size} of net {ni.net}")
            return
        msg.peer = peer
        if arm:
            self._arm(msg.deadline, msg)
        # The peer's queue is fair between endpoints (core.fairq); on a multi-rail peer a small
        # message also goes ahead of its endpoint's bulk, here and in the rail's connection queue.
        size = len(msg.payload)
        if peer.rail is not None and size < mr.DEFAULT_SMALL:
            peer.queue.insert(msg, lambda n, size_at: mr.queue_slot(n, size_at, size))
        else:
            peer.queue.append(msg)
        ni.queued += 1
        if self.pump_held:
            self._refill[peer] = None
        else:
            self._pump_peer(peer)

    def _pump_peer(self, peer: Peer) -> None:
        ni = peer.ni
        queue, credits, ni_credits, window = peer.queue, peer.credits, ni.credits, peer.window
        parked, by_dest, limit_of = peer.parked, peer.by_dest, peer.dest_limit
        fresh = self._now - peer.dest_stall
        checksum = ni.params.checksum
        while credits.in_use < credits.limit and ni_credits.in_use < ni_credits.limit:
            ready = next((k for k in parked if by_dest[k] < limit_of(k, fresh)), None) if parked else None
            if ready is not None:
                waiting = parked[ready]
                if not window.fits(len(waiting[0].payload)):
                    break
                msg = waiting.popleft()
                if not waiting:
                    del parked[ready]
            elif queue:
                if not window.fits(len(queue[0].payload)):
                    break
                msg = queue.popleft()
                if parked or by_dest:
                    key = (msg.dst_raw, msg.dst_portal)
                    if msg.state is MsgState.QUEUED and (key in parked or by_dest[key] >= limit_of(key, fresh)):
                        parked.setdefault(key, deque()).append(msg)  # still counted in ni.queued
                        continue
            else:
                break
            ni.queued -= 1
            if msg.state is not MsgState.QUEUED:
                continue
            by_dest[(msg.dst_raw, msg.dst_portal)] += 1
            credits.take()
            ni_credits.take()
            window.take(len(msg.payload))
            self._transition(msg, MsgEvent.ASSIGN)
            space = peer.rail or peer  # multi-rail: one sequence space for all rails of the peer
            msg.seq = space.next_seq
            space.next_seq += 1
            msg.header = wire.encode_msg_header(msg.seq, msg.src_raw, msg.dst_raw, msg.src_portal, msg.dst_portal,
                                                msg.payload, checksum, msg.msg_id)
            peer.inflight[msg.seq] = msg
            conn = msg.conn = peer.conn_for(len(msg.payload))
            cq = conn.queue
            if peer.rail is not None and cq and len(msg.payload) < mr.DEFAULT_SMALL:  # multi-rail: small ahead of bulk
                cq.insert(mr.queue_slot(len(cq), lambda i: len(cq[i].payload), len(msg.payload)), msg)
            else:
                cq.append(msg)
            self._kick(conn)
        credits.note_queue(peer.waiting_count())
        ni_credits.note_queue(ni.queued)

    def _pump_ni(self, ni: NI) -> None:
        for p in list(ni.peers.values()):
            if not ni.credits.available:
                return
            if p.queue or p.parked:
                self._pump_peer(p)

    def _kick(self, conn: OutConn) -> None:
        """``conn`` has work: wake its writer, or get it connected."""
        if conn.state is ConnState.UP:
            if not conn.woken:
                conn.woken = True
                self.actions.append(Wake(conn))
        else:
            self._maybe_connect(conn)

    def _maybe_connect(self, conn: OutConn) -> None:
        if conn.state is ConnState.CONNECTING and conn.queue and not self.closing:
            self._rp_ride_instead(conn)  # a message waits for the set-up: the peer's connection may carry it now
            return
        if conn.state not in (ConnState.IDLE, ConnState.BACKOFF) or not conn.has_work() or self.closing:
            return
        if not conn.backoff.ready(self._now):
            self._backoff_waiting[conn] = None
            return
        self._backoff_waiting.pop(conn, None)
        if self._rp_instead_of_connect(conn):
            return
        conn.state = conn_next(conn.state, ConnEvent.CONNECT)
        conn.attempt += 1
        host, port = self.address_of(conn.peer)
        self.actions.append(Connect(conn, conn.attempt, host, port))
        if conn.ctype is not ConnType.ANY:
            self._prewarm_siblings(conn.peer)

    def _prewarm_siblings(self, peer: Peer) -> None:
        """A peer's first typed connection: open the other type beside it, so that the first
        message of the other kind does not wait a whole set-up behind it (a connect and the
        two-round-trip hello: 1.8 s on GEO).  Once per peer; a failure is not retried."""
        for ctype in (ConnType.CONTROL, ConnType.BULK):
            if ctype not in peer.conns:
                sibling = peer.conn_of(ctype)
                sibling.prewarm = True
                self._maybe_connect(sibling)

    # ------------------------------------------------------------------ message state

    def _transition(self, m: OutMsg, event: MsgEvent) -> None:
        m.state = msg_next(m.state, event)

    def _fail(self, m: OutMsg, status: Status, reason: str) -> None:
        self._finish(m, MsgEvent.FAIL, status, reason)

    def _finish(self, m: OutMsg, event: MsgEvent, status: Status, reason: str) -> None:
        """Move ``m`` to its final state, give back its credits, complete it when its payload is free."""
        held = m.state in (MsgState.IN_FLIGHT, MsgState.SENT, MsgState.REQUEUED)
        queued = m.state is MsgState.QUEUED
        m.state = msg_next(m.state, event)
        m.status, m.reason = status, reason or status.describe()
        if m.charged is not None:
            m.charged.backlog -= len(m.payload)
            m.charged = None
        peer = m.peer
        if peer is not None:
            if held and peer.inflight.get(m.seq) is m:
                self._give_back(peer, m)
                if status is Status.DELIVERED:
                    peer.stats["delivered"] += 1
                    peer.health.success()
                else:
                    peer.stats["failed"] += 1
                if peer.ni.queued:
                    self._refill[peer] = None  # pumped once, before the actions are handed out
            elif queued:
                peer.stats["failed"] += 1
                self._unqueue(peer, m)
        if not m.busy:
            self._complete(m)

    def _give_back(self, peer: Peer, m: OutMsg, answered: bool = True) -> None:
        """``m`` leaves ``peer``'s in-flight map: its credits and window bytes come back."""
        del peer.inflight[m.seq]
        self._dest_done(peer, m, answered)
        peer.credits.give()
        peer.ni.credits.give()
        peer.window.give(len(m.payload))

    @staticmethod
    def _unqueue(peer: Peer, m: OutMsg) -> None:
        """Take QUEUED ``m`` out of ``peer``'s queue (or its destination's parked ones)."""
        q = peer.queue
        if q and q[0] is m:
            q.popleft()
        else:
            key = (m.dst_raw, m.dst_portal)
            parked = peer.parked.get(key)
            if parked is not None and m in parked:
                parked.remove(m)
                if not parked:
                    del peer.parked[key]
            else:
                q.remove(m)
        peer.ni.queued -= 1
        peer.credits.note_queue(peer.waiting_count())
        peer.ni.credits.note_queue(peer.ni.queued)

    def _dest_done(self, peer: Peer, m: OutMsg, answered: bool = True) -> None:
        """``m`` gave its credit back: one fewer in flight to its destination (which
        ``answered`` it, unless it failed or never went out)."""
        key = (m.dst_raw, m.dst_portal)
        if answered and m.status is Status.DELIVERED:
            peer.dest_acked[key] = self._now
        n = peer.by_dest[key] - 1
        if n > 0:
            peer.by_dest[key] = n
        else:
            del peer.by_dest[key]
            if self._now - peer.dest_acked.get(key, -peer.dest_stall) > peer.dest_stall:
                peer.dest_acked.pop(key, None)  # nothing in flight and long quiet: forget it
        if key in peer.parked:
            self._refill[peer] = None

    def _complete(self, m: OutMsg) -> None:
        m.completed = True
        self._deadlines.dead += 1
        if m.forward is not None:
            conn, seq, size = m.forward
            self.router_bytes -= size
            self._session_ack(conn, seq, m.status, m.reason if m.status else "")
            self._drain_router()
        elif m.ping is not None:
            ping = m.ping
            if not ping.done:
                ping.done = True
                if m.status is Status.DELIVERED:
                    self.actions.append(PingDone(ping.token, self._now - ping.started, 0, ping.via, ""))
                else:
                    self.actions.append(PingDone(ping.token, None, 0, ping.via, f"no answer from {ping.target}: {m.reason}"))
        else:
            self.actions.append(Complete(m, m.status, m.reason))

    # ------------------------------------------------------------------ outgoing connections

    def connected(self, conn: OutConn, attempt: int, peer_incarnation: int, now: float) -> None:
        """The hello on ``conn``'s attempt finished; the peer runs as ``peer_incarnation``."""
        self._now = now
        if attempt != conn.attempt or conn.state is not ConnState.CONNECTING:
            self.actions.append(Close(conn, attempt, "superseded"))
            return
        conn.state = conn_next(conn.state, ConnEvent.UP)
        conn.connect_failed = False
        self._conn_up(conn, peer_incarnation)

    def _conn_up(self, conn: OutConn, peer_incarnation: int) -> None:
        conn.backoff.succeeded()
        conn.prewarm = False
        peer = conn.peer
        if peer.incarnation is not None and peer_incarnation != peer.incarnation:
            self.stats["peer_restarts"] += 1
            # The new incarnation first: failing a forwarded message frees router buffer, which
            # can forward another message to this peer and adopt its other connection -- back
            # in here, where it must not fail these messages a second time.
            peer.incarnation = peer_incarnation
            for m in [m for m in peer.inflight.values() if m.transmitted]:
                if m.state not in FINAL:
                    self._fail(m, Status.PEER_RESTARTED, f"{peer.nid} restarted while the message was in flight; delivery unknown")
            if peer.rail is None:
                self._renumber_unsent(peer)
        peer.incarnation = peer_incarnation
        if peer.rail is not None:  # the rail is back; the peer's other rails talk to the same daemon
            peer.rail_down = False
            # Back at one failure below full health: usable at once (rules of lu2k.core.rails),
            # out again if it fails again before health recovery has brought it up.
            peer.health.value = max(peer.health.value, MAX_HEALTH - self.params.health_sensitivity)
            for p in self.rail_peers(peer.rail):
                p.incarnation = peer_incarnation
        peer.health.success()
        self._rp_conn_up(conn)
        if conn.has_work():
            conn.woken = True
            self.actions.append(Wake(conn))

    def _renumber_unsent(self, peer: Peer) -> None:
        """``peer`` restarted: the new incarnation's window starts at 1.  What was never sent
        to the old one (only that is left in flight) takes 1, 2, ... in its order -- a window
        left with a gap below it would hold every later sequence number up to its capacity."""
        unsent = [m for _seq, m in sorted(peer.inflight.items())]
        checksum = peer.ni.params.checksum
        peer.inflight.clear()
        for seq, m in enumerate(unsent, 1):
            m.seq = seq
            m.header = wire.encode_msg_header(seq, m.src_raw, m.dst_raw, m.src_portal, m.dst_portal, m.payload, checksum, m.msg_id)
            peer.inflight[seq] = m
        peer.next_seq = len(unsent) + 1
        for conn in peer.conns.values():
            conn.queue = deque(sorted((m for m in conn.queue if m.state not in FINAL and m.conn is conn), key=lambda m: m.seq))

    def connect_failed(self, conn: OutConn, attempt: int, reason: str, now: float, refused: Status | None = None) -> None:
        """The connect or hello failed.  ``refused`` is set when the peer refused us (wrong key,
        protocol): then nothing queued for it on this connection type can get through."""
        self._now = now
        if attempt != conn.attempt or conn.state is not ConnState.CONNECTING:
            return
        conn.state = conn_next(conn.state, ConnEvent.FAILED)
        conn.connect_failed = True
        conn.prewarm = False
        peer = conn.peer
        conn.backoff.failed(now, reason)
        peer.health.failure(now)
        peer.last_error = reason
        self.stats["connect_failures"] += 1
        if refused is not None:
            for m in [m for m in peer.inflight.values() if m.conn is conn]:
                self._fail(m, refused, reason)
            for m in peer.waiting():
                self._fail(m, refused, reason)
        if peer.rail is not None and refused is None:
            peer.rail_down = True
            self._rail_failover(peer, conn, [m for m in peer.inflight.values() if m.conn is conn and m.state is not MsgState.SENT])
            self._rail_probe(conn)
        elif refused is None:
            self._reroute_unsent(peer)
        self._maybe_connect(conn)

    def connection_lost(self, conn: OutConn, attempt: int, reason: str, now: float) -> None:
        """An UP connection died (read or write error, peer closed, protocol violation)."""
        self._now = now
        if attempt != conn.attempt or conn.state is not ConnState.UP:
            return
        conn.state = conn_next(conn.state, ConnEvent.LOST)
        conn.woken = False
        via = conn.via
        self._rp_unlink(conn)
        if via is not None and via.alive:
            # It sent on the reverse direction of the peer's connection: that connection is
            # broken too (its reader may not see it while it waits), and adopting it again
            # would fail the same way at once.
            self._close_in(via, f"return path to {conn.peer.nid} lost: {reason}")
        peer = conn.peer
        peer.last_error = reason
        peer.health.failure(now)
        conn.backoff.failed(now, reason)
        self.stats["connections_lost"] += 1
        self._fail_pings(conn, f"connection to {peer.nid} lost")
        pending = self._take_back_unacked(conn)
        if peer.rail is not None:  # multi-rail: the other rails take them, this one reconnects and rejoins
            peer.rail_down = True
            self._rail_failover(peer, conn, pending)
            self._rail_probe(conn)
        else:
            self._reroute_unsent(peer)
        self._requeue(conn, pending)
        self._maybe_connect(conn)

    def _take_back_unacked(self, conn: OutConn) -> list[OutMsg]:
        """Everything sent on ``conn``'s connection and not acknowledged, in order: it goes out
        again (the receiver answers a copy it already has from its dedupe window)."""
        pending = [m for _s, m in sorted(conn.peer.inflight.items()) if m.conn is conn]
        for m in pending:
            self._transition(m, MsgEvent.CONN_LOST)
        return pending

    def _requeue(self, conn: OutConn, pending: list[OutMsg]) -> None:
        queued = {id(m) for m in conn.queue}
        conn.queue.extend(m for m in pending if id(m) not in queued and m.conn is conn)
        conn.queue = deque(sorted((m for m in conn.queue if m.state not in FINAL and m.conn is conn), key=lambda m: m.seq))

    def next_batch(self, conn: OutConn, now: float) -> Batch | None:
        """Frames for ``conn``'s transport, or None (then wait for the next Wake)."""
        self._now = now
        if conn.state is not ConnState.UP:
            conn.woken = False
            return None
        batch = Batch(conn, conn.attempt)
        for ping in conn.pings.values():
            if not ping.sent:
                ping.sent = True
                batch.frames.append((wire.encode_frame(FrameType.PING, wire.PING_BODY.pack(ping.token)), b""))
        queue, frames, msgs = conn.queue, batch.frames, batch.msgs
        size = 0
        while queue and len(msgs) < SEND_BATCH_FRAMES and size < SEND_BATCH_BYTES:
            m = queue.popleft()
            if m.state in FINAL:
                continue
            m.state = msg_next(m.state, MsgEvent.TRANSMIT)
            m.busy += 1
            msgs.append(m)
            frames.append((m.header, m.payload))
            size += len(m.payload)
        if not frames:
            conn.woken = False
            return None
        conn.sending += 1
        meter = conn.peer.meter
        if meter is not None and msgs:
            meter.sent(msgs[0].seq, now)
        batch.size = size
        return batch

    def send_done(self, batch: Batch, now: float, error: str | None = None) -> None:
        """The transport no longer reads ``batch``'s payloads (sent, or the send failed)."""
        self._now = now
        for m in batch.msgs:
            m.busy -= 1
            if not m.busy and m.state in FINAL and not m.completed:
                self._complete(m)
        conn = batch.conn
        conn.sending -= 1
        if conn.via is not None and conn.via.ctype is not conn.ctype and not conn.sending and error is None:
            self._rp_maybe_move(conn)  # it waited for this send to end
        if error is None:
            batch.conn.sent_msgs += len(batch.msgs)
            self.stats["msgs_sent"] += len(batch.msgs)
            self.stats["bytes_sent"] += batch.size
        else:
            self.connection_lost(batch.conn, batch.attempt, error, now)

    def frames_received(self, conn: OutConn, attempt: int, frames: list[Frame], now: float) -> None:
        """ACK / NACK / PONG frames on the reverse direction of our connection."""
        self._now = now
        if attempt != conn.attempt or conn.state is not ConnState.UP:
            return
        peer = conn.peer
        requests: list[Frame] = []
        try:
            for f in frames:
                t = f.header.type
                if t in REQUESTS:
                    requests.append(f)  # the peer sends to us on our connection (returnpath)
                elif t is FrameType.ACK:
                    self._on_acks(peer, wire.decode_acks(f))
                elif t is FrameType.NACK:
                    seq, status, reason = wire.decode_nack(f)
                    self._on_ack(peer, seq, status, reason)
                elif t is FrameType.PONG:
                    (token,) = wire.PING_BODY.unpack(f.header.body)
                    nids = tuple(wire.decode_nids(f.payload)) if len(f.payload) else ()
                    ping = conn.pings.pop(token, None)
                    if ping is not None and not ping.done:
                        ping.done = True
                        self.actions.append(PingDone(token, now - ping.started, peer.incarnation or 0, str(peer.nid), "", nids))
                else:
                    raise FrameError(f"{t.name} frame on the reverse direction of a connection")
            if requests:
                self._rp_requests(conn, requests)
        except RemoteProtocolError as e:
            self.stats["bad_frames"] += 1
            self.actions.append(Close(conn, attempt, str(e)))
            self.connection_lost(conn, attempt, str(e), now)

    def _on_acks(self, peer: Peer, entries: list[tuple[int, int]]) -> None:
        """A batch of ACKs: the common case (delivered, after a send) is _finish inlined,
        with the credits given back once for the batch."""
        if peer.rail is not None:
            self._rail_acks(peer, entries)
            return
        inflight = peer.inflight
        done = done_bytes = 0
        for seq, code in entries:
            m = inflight.get(seq)
            if m is None:
                continue  # a late duplicate, or a message already timed out
            state = m.state
            if code or (state is not MsgState.SENT and state is not MsgState.REQUEUED):
                self._answer(m, Status.from_code(code) if code else Status.DELIVERED, "")
                continue
            del inflight[seq]
            self._dest_done(peer, m)
            m.state = msg_next(state, MsgEvent.ACK)
            m.status, m.reason = Status.DELIVERED, "delivered"
            done += 1
            done_bytes += len(m.payload)
            if not m.busy:
                self._complete(m)
        if done:
            peer.credits.give(done)
            peer.ni.credits.give(done)
            peer.window.give(done_bytes)
            peer.stats["delivered"] += done
            peer.health.success(done)
            if peer.ni.queued:
                self._refill[peer] = None

    def _on_ack(self, peer: Peer, seq: int, status: Status, reason: str) -> None:
        m = peer.inflight.get(seq)
        if m is not None:
            self._answer(m, status, reason)

    def _answer(self, m: OutMsg, status: Status, reason: str) -> None:
        if not m.transmitted:
            raise RemoteProtocolError(f"answer for message seq {m.seq}, which was never sent")
        self._finish(m, MsgEvent.ACK if status is Status.DELIVERED else MsgEvent.NACK, status, reason)

    def _close_conn(self, conn: OutConn, reason: str) -> None:
        if conn.state in (ConnState.CONNECTING, ConnState.UP):
            self.actions.append(Close(conn, conn.attempt, reason))
        conn.state = conn_next(conn.state, ConnEvent.CLOSE)
        self._backoff_waiting.pop(conn, None)
        self._rp_unlink(conn)

    def note_transport_stats(self, conn: OutConn, stats: dict[str, Any]) -> None:
        conn.transport_stats = stats

    # ------------------------------------------------------------------ LAN drivers

    def lan_done(self, msg: OutMsg, status: Status, reason: str, now: float) -> None:
        """The LAN driver's one answer for ``msg``."""
        self._now = now
        if msg.state is MsgState.SENT:
            self._finish(msg, MsgEvent.ACK if status is Status.DELIVERED else MsgEvent.NACK, status, reason)


    # ------------------------------------------------------------------ pings

    def ping(self, nid: Nid, token: int, timeout: float, now: float) -> None:
        """Ping ``nid``: a PING frame to a direct peer, or a message to the far end's
        :data:`PING_PORTAL` through the gateways (answered end to end).  Ends in one PingDone."""
        self._now = now
        raw = nid.to_bytes()
        if raw in self._local_raw:
            self.actions.append(PingDone(token, 0.0, self.incarnation, "", ""))
            return
        hop = self.routes.next_hop(nid, self.health_of)
        if hop is None or (hop.net not in self.nis and hop.net not in self.lans):
            self.actions.append(PingDone(token, None, 0, "", f"no route to net {nid.net}"))
            return
        ping = _Ping(token, now, now + timeout, str(hop), str(nid))
        if hop != nid or hop.net in self.lans:
            msg = OutMsg(raw, raw, 0, PING_PORTAL, b"", now + timeout, None)
            msg.ping = ping  # its completion, end to end, is the ping's answer
            self._route_slow(msg, True)
            return
        peer = self.peer(hop)
        conn = peer.conn_for(0)
        ping.conn = conn
        conn.pings[token] = ping
        self._arm(ping.deadline, ping)
        self._kick(conn)

    def _ping_failed(self, ping: _Ping, why: str) -> None:
        ping.done = True
        if ping.conn is not None:
            ping.conn.pings.pop(ping.token, None)
            peer = ping.conn.peer
            if why == "no connection":
                why = f"no connection to {peer.nid}: {peer.last_error or 'connecting'}"
            else:
                why = f"ping {peer.nid} {why}"
        self.actions.append(PingDone(ping.token, None, 0, ping.via, why))

    def _fail_pings(self, conn: OutConn, why: str) -> None:
        """Pings already sent on a lost connection fail; unsent ones wait for the next (or
        fail too when the connection is closed for good)."""
        for ping in list(conn.pings.values()):
            if ping.sent or conn.state is ConnState.CLOSED:
                conn.pings.pop(ping.token, None)
                if not ping.done:
                    ping.done = True
                    self.actions.append(PingDone(ping.token, None, 0, ping.via, why))

    # ------------------------------------------------------------------ incoming connections

    def accepted(self, net: Net, result: wire.HelloResult, now: float) -> InConn:
        """A hello we answered finished: the connection carries ``result.peer_nid``'s messages."""
        self._now = now
        ni = self.nis.get(net)
        if ni is None:
            raise LocalProtocolError(f"net {net} is not up")
        conn = self._attach_in(ni, result.peer_nid, result.peer_incarnation, result.conn_type, multirail=result.multirail)
        conn.pong_nids = result.pong_nids
        self.stats["conns_accepted"] += 1
        self._prewarm_back(ni, result.peer_nid)
        return conn

    def _prewarm_back(self, ni: NI, nid: Nid) -> None:
        """A peer we have no connection to connected to us: open ours back beside it, so that
        the first answer (an LNet reply, a transfer's ACCEPT) does not wait a whole set-up.
        Not where the peer is to be reached only over its own connection (``reverse``); a
        peer that cannot be connected to (NAT) fails once, and ``auto`` then rides its
        connection at the first message."""
        if self.closing or nid == ni.nid or self.return_path(nid) is ReturnPath.REVERSE:
            return
        known = ni.peers.get(nid)
        if known is not None and known.conns:
            return
        conn = self.peer(nid).conn_of(ConnType.CONTROL if ni.params.typed_connections else ConnType.ANY)
        conn.prewarm = True
        self._maybe_connect(conn)

    def _attach_in(self, ni: NI, peer_nid: Nid, incarnation: int, ctype: ConnType, *, multirail: bool = False) -> InConn:
        """A connection that carries ``peer_nid``'s messages, in its session ``incarnation``."""
        # A multi-rail sender numbers its messages once for all its rails: one session (one
        # dedupe window) for all of them, so a message resent on another rail is answered.
        key = (None if multirail else peer_nid, incarnation)
        session = self.sessions.get(key)
        if session is None:
            self._expire_sessions(self._now)
            session = self.sessions[key] = Session(peer_nid, incarnation, self.params.window_capacity, self.params.window_hole_limit)
        if peer_nid not in session.nids or not session.conns:
            session.nids.add(peer_nid)
            # Another incarnation of that peer: its connections are stale, but its window is
            # kept until it expires -- incarnations are random, so a hello cannot tell a real
            # restart from a key holder replaying the NID, and dropping the window would let
            # the real peer's resends be delivered a second time.
            for other in self.sessions.values():
                if peer_nid in other.nids and other is not session:
                    for c in list(other.conns):
                        self._close_in(c, f"{peer_nid} came back as another incarnation")
        conn = InConn(ni, session, ctype, self.params.max_pending_deliveries)
        session.conns.append(conn)
        session.idle_since = None
        return conn

    def inbound_lost(self, conn: InConn) -> None:
        """An accepted connection ended; its acks not yet sent are answered on a resend."""
        if not conn.alive:
            return
        conn.alive = False
        self._dirty.pop(conn, None)
        if conn in conn.session.conns:
            conn.session.conns.remove(conn)
            if not conn.session.conns:
                conn.session.idle_since = self._now
        self._rp_inbound_lost(conn)

    def _expire_sessions(self, now: float) -> None:
        """Forget sessions without connections for longer than a sender can still resend
        (:data:`SESSION_IDLE_TIMEOUT`); past :data:`MAX_SESSIONS`, the longest idle first."""
        ttl = max(SESSION_IDLE_TIMEOUT, 4 * self.params.transaction_timeout)
        idle = sorted(((s.idle_since, k) for k, s in self.sessions.items() if s.idle_since is not None), key=lambda e: e[0])
        excess = len(self.sessions) + 1 - MAX_SESSIONS
        for since, k in idle:
            if now - since <= ttl and excess <= 0:
                break
            del self.sessions[k]
            excess -= 1
            self.stats["sessions_expired"] += 1

    def _close_in(self, conn: InConn, reason: str) -> None:
        if conn.alive:
            self.actions.append(CloseIn(conn, reason))
            self.inbound_lost(conn)

    def inbound_frames(self, conn: InConn, frames: list[Frame], now: float) -> None:
        """MSG and PING frames from an accepted connection."""
        self._now = now
        if not conn.alive:
            for f in frames:
                if f.header.token is not None:
                    self.actions.append(AbortRx(f.header.token))
            return
        for i, f in enumerate(frames):
            try:
                self._inbound_frame(conn, f)
            except RemoteProtocolError as e:
                self.stats["bad_frames"] += 1
                for rest in frames[i:]:
                    if rest.header.token is not None:
                        self.actions.append(AbortRx(rest.header.token))
                self._close_in(conn, str(e))
                return
        if not conn.heard:
            conn.heard = True
            self._rp_heard(conn)
        self._flush_in(conn)

    def _inbound_frame(self, conn: InConn, f: Frame) -> None:
        t = f.header.type
        session = conn.session
        if t in ANSWERS:
            self._rp_answers(conn, [f])  # answers to what we send on its reverse direction
            return
        if t is FrameType.PING:
            nids = wire.encode_nids([n.nid_raw for n in self.nis.values()]) if conn.pong_nids else b""
            conn.control.append(wire.encode_frame(FrameType.PONG, f.header.body, nids))
            self._dirty[conn] = None
            return
        if t is not FrameType.MSG:
            raise FrameError(f"unexpected {t.name} frame on an incoming connection")
        token = f.header.token
        info = wire.decode_msg(f.header)
        # A message from the sender's own net must carry the sender's NID (the hello proved it);
        # one from another net was forwarded by it as a gateway.
        if info.src_raw != session.peer_raw:
            try:
                src = self.unpack(info.src_raw)
            except NidError as e:
                raise FrameError(f"MSG frame with bad source NID: {e}") from None
            if src.net == session.peer_nid.net:
                raise RemoteProtocolError(f"{session.peer_nid} sent a message claiming to be from {src}")
        session.stats["received"] += 1
        self.stats["msgs_received"] += 1
        self.stats["bytes_received"] += len(f.payload)
        prior = session.window.check(info.seq)
        if prior is not None:
            if token is not None:
                self.actions.append(AbortRx(token))
            self.stats["duplicates"] += 1
            if prior != IN_PROGRESS:
                self._queue_ack(conn, info.seq, Status.from_code(prior), "duplicate")
            else:
                session.resent_on[info.seq] = conn  # answer where the sender now listens
            return
        try:
            wire.check_payload(info, f.payload)
        except FrameError as e:
            # The sender's payload changed under it (or the link corrupted it): this one
            # message fails; the connection and everyone else's traffic carry on.
            if token is not None:
                self.actions.append(AbortRx(token))
            self.stats["bad_checksums"] += 1
            session.window.start(info.seq)
            self._session_ack(conn, info.seq, Status.PROTOCOL, str(e))
            return
        session.window.start(info.seq)
        if info.dst_raw in self._local_raw:
            if info.dst_portal == PING_PORTAL:
                if token is not None:
                    self.actions.append(AbortRx(token))
                self._session_ack(conn, info.seq, Status.DELIVERED, "")
                return
            key: AppKey | None = None
            if info.msg_id is not None:
                # The application's id: a copy sent again after the sending daemon restarted
                # (a new session, new sequence numbers) is answered, not delivered again.
                key = (info.src_raw, info.src_portal, info.msg_id)
                prior_id = self.app_ids.check(key, self._now)
                if prior_id is not None:
                    if token is not None:
                        self.actions.append(AbortRx(token))
                    self.stats["duplicates_by_id"] += 1
                    if prior_id == IN_PROGRESS:
                        self.app_ids.wait(key, (conn, info.seq))
                    else:
                        self._session_ack(conn, info.seq, Status.from_code(prior_id), "")
                    return
                self.app_ids.start(key)
            conn.pending += 1
            d = Delivery(info.src_raw, info.dst_raw, info.src_portal, info.dst_portal, f.payload, token, conn, info.seq, None)
            d.app_key = key
            self._deliver(d)
        else:
            if token is not None:
                self.actions.append(AbortRx(token))
            self._forward(conn, info, f.payload)

    def _deliver(self, d: Delivery) -> None:
        self.actions.append(Deliver(d))

    def delivered(self, d: Delivery, status: Status, reason: str, now: float) -> None:
        """The runner's answer to a Deliver action."""
        self._now = now
        if d.done:
            raise LocalProtocolError("delivery answered twice")
        d.done = True
        if status is Status.DELIVERED:
            self.stats["msgs_delivered"] += 1
        if d.msg is not None:  # a message to ourselves
            if d.msg.state is MsgState.SENT:
                self._finish(d.msg, MsgEvent.ACK if status is Status.DELIVERED else MsgEvent.NACK, status, reason)
            return
        conn = d.conn
        assert conn is not None
        self._session_ack(conn, d.seq, status, reason)
        if d.app_key is not None:
            for waiter in self.app_ids.finish(d.app_key, int(status), now):
                other, seq = cast(tuple[InConn, int], waiter)
                self._session_ack(other, seq, status, reason)
        was_blocked = conn.blocked
        conn.pending -= 1
        if was_blocked and conn.alive and not conn.blocked:
            self.actions.append(Resume(conn))

    def _forward(self, conn: InConn, info: wire.MsgInfo, payload: Any) -> None:
        if not self.params.routing:
            me = next(iter(self.nis.values())).nid if self.nis else "this daemon"
            try:
                dst: object = self.unpack(info.dst_raw)
            except NidError:
                dst = "an undecodable NID"
            self._session_ack(conn, info.seq, Status.NO_ROUTE, f"{me} is not a router (message for {dst})")
            return
        if self._router_wait or (self.router_bytes + len(payload) > self.params.router_buffer_bytes and self.router_bytes > 0):
            conn.parked += 1
            self._router_wait.append((conn, info, payload))
            return
        self._forward_now(conn, info, payload)

    def _forward_now(self, conn: InConn, info: wire.MsgInfo, payload: Any) -> None:
        size = len(payload)
        self.router_bytes += size
        self.stats["msgs_forwarded"] += 1
        msg = OutMsg(info.src_raw, info.dst_raw, info.src_portal, info.dst_portal, payload,
                     self._now + self.params.transaction_timeout, None)
        msg.forward = (conn, info.seq, size)
        msg.msg_id = info.msg_id
        peer = self._direct.get(info.dst_raw)
        if peer is None:
            try:
                self.unpack(info.dst_raw)
            except NidError as e:
                msg.forward = None
                self.router_bytes -= size
                self._session_ack(conn, info.seq, Status.PROTOCOL, f"undecodable destination NID: {e}")
                return
            self._route_slow(msg, False)
        else:
            self._enqueue(peer, msg)

    def _drain_router(self) -> None:
        wait = self._router_wait
        while wait:
            conn, info, payload = wait[0]
            if self.router_bytes + len(payload) > self.params.router_buffer_bytes and self.router_bytes > 0:
                return
            wait.popleft()
            conn.parked -= 1
            self._forward_now(conn, info, payload)
            if conn.alive and not conn.blocked:
                self.actions.append(Resume(conn))

    def _session_ack(self, conn: InConn, seq: int, status: Status, reason: str) -> None:
        """Record the outcome of ``conn.session``'s message ``seq`` and answer it -- on the
        connection it came on while that lives, so a lost answer always goes with a lost
        connection (which makes the sender resend, and we answer from the window); else on
        the newest live connection of the session."""
        session = conn.session
        session.window.finish(seq, int(status))
        newer = session.resent_on.pop(seq, None) if session.resent_on else None
        if newer is not None and newer.alive:
            conn = newer
        if not conn.alive:
            conn = next((c for c in reversed(session.conns) if c.alive), conn)
            if not conn.alive:
                return  # the sender resends after reconnecting and gets the status then
        self._queue_ack(conn, seq, status, reason)

    def _queue_ack(self, conn: InConn, seq: int, status: Status, reason: str) -> None:
        if status is Status.DELIVERED:
            conn.acks.append((seq, 0))
        else:
            conn.control.append(wire.encode_nack(seq, status, reason))
        self._dirty[conn] = None

    def _flush_in(self, conn: InConn) -> None:
        if not (conn.acks or conn.control) or not conn.alive:
            return
        frames = conn.control
        acks = conn.acks
        for i in range(0, len(acks), ACKS_PER_FRAME):
            frames.append(wire.encode_acks(acks[i : i + ACKS_PER_FRAME]))
        conn.acks, conn.control = [], []
        self._dirty.pop(conn, None)
        self.actions.append(SendIn(conn, frames))

    def flush(self) -> None:
        """Turn the ACKs gathered since the last call into SendIn actions (one per connection)."""
        while self._dirty:
            conn = next(iter(self._dirty))
            self._flush_in(conn)
            self._dirty.pop(conn, None)

    # ------------------------------------------------------------------ reading out

    def take_actions(self) -> list[Action]:
        """Everything the runner must do now (clears the list)."""
        while self._refill:
            peer = next(iter(self._refill))
            del self._refill[peer]
            if peer.queue or peer.parked:
                self._pump_peer(peer)
            if peer.ni.queued:
                self._pump_ni(peer.ni)
        self.flush()
        out, self.actions = self.actions, []
        return out

    def pending_messages(self) -> int:
        """Messages not yet completed (queued, in flight, or waiting for their payload)."""
        return sum(1 for obj in self._deadlines if isinstance(obj, OutMsg) and not obj.completed)
