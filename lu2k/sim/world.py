"""A seeded world of three message cores over a simulated network, with faults and invariants.

Topology: the sender A (``10.0.0.1@tcp``), the gateway G (``10.0.0.2@tcp`` and
``10.1.0.2@tcp1``, routing on) and the receiver B (``10.1.0.3@tcp1``); A reaches tcp1
through G and B reaches tcp through G.  Applications on A send to B (through G), to G
(directly) and to a portal on B nobody listens on; the application on B sends back to A.
Each application keeps at most ``max_in_flight`` messages outstanding, as the shim does.

Everything runs under one event heap ordered by (time, insertion order) and one
``random.Random(seed)``: the same seed gives the same run, event for event.

Fault model (each seed enables a random subset, see :data:`FAULTS`):

* ``loss``, ``dup``, ``reorder``: a frame on a connection is dropped, delivered twice, or
  overtaken (transports promise none of this; the core must still keep its invariants);
* ``delay``: latency spikes far above the base latency;
* ``reset``: a connection is reset at a random moment;
* ``crash``: a node dies (its applications see their messages end with the crash) and
  restarts later with a new incarnation;
* ``partition``: two nodes cannot reach each other for a while (connections reset,
  connects time out);
* ``slow``: a receiving application stops releasing its receive buffers for a while;
* ``late``: timers fire late;
* ``stuck``: a connection stops moving: its sends never finish and nothing arrives (a peer
  that stopped reading), until someone resets it;
* ``raildown``: in a multi-rail world, one of the two rails between A and G goes down for a
  while (its connections reset, connects on it time out), then comes back.

Two-gateway worlds (about one seed in three, from a generator of their own, never behind
NAT): a second gateway H (``10.0.0.4@tcp``, ``10.1.0.4@tcp1``) beside G, named by both
leaves' routes.  Messages go through either by health, and what was never transmitted to a
gateway that failed moves to the other one (``Node._reroute_unsent``).

Multi-rail worlds (about one seed in three, drawn from a second generator seeded from the
seed, so the schedules of the other seeds stay what they were): A and G also share a second
net ``tcp2`` (``10.2.0.1@tcp2``, ``10.2.0.2@tcp2``) and each knows the other as one
multi-rail peer with two NIDs (:mod:`lu2k.core.rails`).  Everything between A and G --
A's messages to G and, through G, to B, and G's forwards of B's messages to A -- is spread
over both rails and fails over between them; the invariants below are the same.

Invariants checked after every run (:meth:`World.check`):

1. each submitted message got exactly one completion (a crash of its own node counts);
2. no application received a message twice;
3. DELIVERED only if the destination application received it; NO_ROUTE, NO_RECEIVER,
   TOO_LARGE and INVALID only if it did not;
4. credits, router buffer, receive buffers and payload references all returned; no
   message, delivery or forward left pending; accepted connections not left blocked;
5. every queue within its bound (checked after each event): what a leaf holds for its
   peers <= what its applications may have outstanding (the shim's ``max_in_flight``); what
   the gateway holds <= 3 x that per sender (a forward outlives its sender's transaction
   timeout by up to one more), for two senders and two incarnations each; dedupe windows
   within capacity.
"""

from __future__ import annotations

import heapq
import itertools
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import wire
from ..core import (
    AbortRx, Adopt, Batch, Close, CloseIn, Complete, Connect, Deliver, Delivery, InConn, LanTransmit, NetParams, Node,
    NodeParams, OutConn, OutMsg, PingDone, Resume, SendIn, Wake,
)
from ..core.returnpath import ANSWERS, KEEPALIVE_TOKEN, PathSettings, ReturnPath
from ..core.states import FINAL
from ..errors import Status
from ..nid import Nid, parse_net, parse_nid
from ..routing import Route
from ..wire import Frame

FAULTS = ("loss", "dup", "reorder", "delay", "reset", "crash", "partition", "slow", "late", "stuck", "raildown")
_PICKED = FAULTS[:-1]  # drawn by Faults.pick; raildown comes with a multi-rail world (see World)

NIDS = {
    "A": ["10.0.0.1@tcp"],
    "G": ["10.0.0.2@tcp", "10.1.0.2@tcp1"],
    "B": ["10.1.0.3@tcp1"],
}
ROUTES = {
    "A": [("tcp1", "10.0.0.2@tcp")],
    "B": [("tcp", "10.1.0.2@tcp1")],
    "G": [],
}
# Two-gateway worlds: a second gateway H beside G, and each leaf's route to the far net names both.
NIDS_H = {"H": ["10.0.0.4@tcp", "10.1.0.4@tcp1"]}
ROUTES_2GW = {
    "A": ROUTES["A"] + [("tcp1", "10.0.0.4@tcp")],
    "B": ROUTES["B"] + [("tcp", "10.1.0.4@tcp1")],
    "G": [],
    "H": [],
}
GATEWAYS = ("G", "H")
NIDS_MR = {"A": NIDS["A"] + ["10.2.0.1@tcp2"], "G": NIDS["G"] + ["10.2.0.2@tcp2"], "B": NIDS["B"]}
RAILS = {  # multi-rail worlds: each side's multi-rail peer, primary NID -> NIDs
    "A": {"10.0.0.2@tcp": ["10.0.0.2@tcp", "10.2.0.2@tcp2"]},
    "G": {"10.0.0.1@tcp": ["10.0.0.1@tcp", "10.2.0.1@tcp2"]},
    "B": {},
}
RAIL_NETS = ("tcp", "tcp2")
PROBE_BIT = 1 << 63  # PingDone tokens of the core's own rail probes
PORTAL = 5
DEAD_PORTAL = 9
ID = struct.Struct("<Q")


class Violation(AssertionError):
    """An invariant broke; the message names the seed so the run can be replayed."""


@dataclass
class Faults:
    """Which faults a run injects, and how hard."""

    enabled: frozenset[str] = frozenset()
    loss: float = 0.02
    dup: float = 0.02
    reorder: float = 0.05
    delay_p: float = 0.05

    @classmethod
    def pick(cls, rng: random.Random) -> "Faults":
        return cls(frozenset(f for f in _PICKED if rng.random() < 0.4))

    def label(self) -> str:
        return ",".join(f for f in FAULTS if f in self.enabled) or "none"


@dataclass
class RunResult:
    seed: int
    faults: str
    messages: int
    completions: dict[str, int]
    events: int
    sim_time: float
    rerouted: int = 0  # messages moved to another gateway before they were transmitted


@dataclass
class _Record:
    origin: str
    dst: bytes
    portal: int
    status: Status | None = None
    reason: str = ""
    completions: int = 0


class _Endpoint:
    """A receiving application: a few receive buffers, each released a little after delivery
    (or, while ``stalled``, only once the stall ends)."""

    def __init__(self, world: "World", node: "SimNode", buffers: int) -> None:
        self.world, self.node = world, node
        self.free = buffers
        self.total = buffers
        self.waiting: list[Delivery] = []
        self.stalled = False
        self.deferred = 0

    def offer(self, d: Delivery) -> None:
        if self.free and not self.waiting:
            self._take(d)
        else:
            self.waiting.append(d)

    def _take(self, d: Delivery) -> None:
        w = self.world
        self.free -= 1
        (mid,) = ID.unpack_from(bytes(d.payload[:8])) if len(d.payload) >= 8 else (-1,)
        if mid >= 0:
            if mid in w.received:
                raise w.violation(f"message {mid} delivered twice (to {self.node.name})")
            w.received[mid] = self.node.name
        self.node.answer_delivery(d, Status.DELIVERED, "")
        w.after(w.rng.uniform(0.001, 0.05), self.release, self.node.generation)

    def release(self, generation: int) -> None:
        if generation != self.node.generation:
            return
        if self.stalled:
            self.deferred += 1
            return
        self.free += 1
        if self.waiting:
            d = self.waiting.pop(0)
            self.node.run(lambda: self._take(d))

    def resume(self, generation: int) -> None:
        if generation != self.node.generation or not self.stalled:
            return
        self.stalled = False
        owed, self.deferred = self.deferred, 0
        for _ in range(owed):
            self.world.after(self.world.rng.uniform(0.001, 0.05), self.release, generation)


class _Link:
    """One connection attempt: A's OutConn on one side, the peer's InConn on the other."""

    _ids = itertools.count(1)

    def __init__(self, world: "World", src: "SimNode", conn: OutConn, attempt: int, dst: "SimNode") -> None:
        self.world, self.src, self.conn, self.attempt, self.dst = world, src, conn, attempt, dst
        self.inconn: InConn | None = None
        self.alive = True
        self.id = next(self._ids)
        self.fwd_last = 0.0  # arrival time of the last frame each way (streams keep order)
        self.rev_last = 0.0
        self.held: list[Frame] = []  # frames that arrived while the receiver was blocked
        self.sending: list[Batch] = []
        self.writing = False
        self.stuck = False
        self.reverse: list[_Reverse] = []  # the accepting side's connections sending back on it
        self.rev_held: list[Frame] = []  # requests on the reverse direction waiting for rev_in to unblock

    def _arrival(self, forward: bool) -> float:
        w = self.world
        t = w.now + w.latency + w.rng.uniform(0, w.latency / 2)
        if "delay" in w.faults.enabled and w.rng.random() < w.faults.delay_p:
            t += w.rng.uniform(0.2, 2.0)
        if "reorder" in w.faults.enabled and w.rng.random() < w.faults.reorder:
            return t  # may overtake what went before
        if forward:
            t = self.fwd_last = max(t, self.fwd_last)
        else:
            t = self.rev_last = max(t, self.rev_last)
        return t

    def carry(self, frames: list[Frame], forward: bool) -> None:
        w = self.world
        if self.stuck:
            return
        for f in frames:
            if "loss" in w.faults.enabled and w.rng.random() < w.faults.loss:
                continue
            copies = 2 if "dup" in w.faults.enabled and w.rng.random() < w.faults.dup else 1
            for _ in range(copies):
                w.at(self._arrival(forward), self._arrive, f, forward)

    def _arrive(self, f: Frame, forward: bool) -> None:
        if not self.alive:
            return
        answer = f.header.type in ANSWERS
        if forward:
            inconn = self.inconn
            assert inconn is not None
            # Answers to what the receiver sends back on this connection are read past held
            # messages, as the engine does (else they could wait for each other).
            if (inconn.blocked or self.held) and not (answer and inconn.reverse is not None):
                self.held.append(f)
                return
            self.dst.run(lambda: self.dst.node.inbound_frames(inconn, [f], self.world.now))
        else:
            rev = self.conn.rev_in
            if not answer and (self.rev_held or (rev is not None and rev.blocked)):
                self.rev_held.append(f)  # requests on our own connection wait like an accepted one's
                return
            self.src.run(lambda: self.src.node.frames_received(self.conn, self.attempt, [f], self.world.now))

    def resume(self) -> None:
        inconn = self.inconn
        while self.alive and self.held and inconn is not None and not inconn.blocked:
            f = self.held.pop(0)
            self.dst.run(lambda: self.dst.node.inbound_frames(inconn, [f], self.world.now))

    def resume_rev(self) -> None:
        while self.alive and self.rev_held and not (self.conn.rev_in is not None and self.conn.rev_in.blocked):
            f = self.rev_held.pop(0)
            self.src.run(lambda: self.src.node.frames_received(self.conn, self.attempt, [f], self.world.now))

    def kill(self, reason: str, *, src_knows: bool = True, dst_knows: bool = True) -> None:
        """Reset: each live side learns of it (after a delay), sends in progress fail."""
        if not self.alive:
            return
        self.alive = False
        self.world.links.pop(self, None)
        w = self.world
        src_gen, dst_gen = self.src.generation, self.dst.generation
        batches, self.sending = self.sending, []
        for b in batches:  # an aborted send fails (and frees its payloads) on the sending side
            w.after(0.0, self.src.send_failed, b, reason, src_gen)
        for r in self.reverse:
            r.dst_gone(reason, dst_gen)
        if src_knows:
            w.after(w.rng.uniform(0, w.latency), self.src.lost_out, self.conn, self.attempt, reason, src_gen)
        if dst_knows and self.inconn is not None:
            w.after(w.rng.uniform(0, w.latency), self.dst.lost_in, self.inconn, dst_gen)


class _Reverse:
    """The accepting side's connection sending on a link's reverse direction (an Adopt)."""

    def __init__(self, base: _Link, conn: OutConn, attempt: int) -> None:
        self.base, self.conn, self.attempt = base, conn, attempt
        self.sending: list[Batch] = []
        self.writing = False
        base.reverse.append(self)

    @property
    def alive(self) -> bool:
        return self.base.alive

    @property
    def stuck(self) -> bool:
        return self.base.stuck

    @property
    def src(self) -> "SimNode":
        return self.base.dst

    def carry(self, frames: list[Frame], forward: bool) -> None:
        self.base.carry(frames, not forward)

    def kill(self, reason: str) -> None:
        self.base.kill(reason)

    def dst_gone(self, reason: str, gen: int) -> None:
        batches, self.sending = self.sending, []
        for b in batches:
            self.base.world.after(0.0, self.base.dst.send_failed, b, reason, gen)


class SimNode:
    """One daemon: a Node, its applications, and the glue that carries out its actions."""

    def __init__(self, world: "World", name: str) -> None:
        self.world, self.name = world, name
        self.nids = [parse_nid(n) for n in world.nids_of(name)]
        self.generation = 0
        self.up = False
        self.node: Node = None  # type: ignore[assignment]
        self.endpoint: _Endpoint | None = None
        self.timer_at: float | None = None
        self.timer_token = 0
        self.in_links: dict[int, _Link] = {}  # id(InConn) -> link
        self.out_links: dict[tuple[int, int], _Link | _Reverse] = {}  # (id(OutConn), attempt) -> link
        self.pending: dict[OutMsg, int] = {}  # messages our applications submitted, -> id
        self.outstanding = 0
        self.bound_in = 0
        self.app_waiting: tuple[list[tuple[bytes, int]], int, Any] | None = None

    def boot(self) -> None:
        w = self.world
        self.generation += 1
        self.up = True
        p = w.params
        self.node = Node(NodeParams(incarnation=w.rng.getrandbits(63) | 1, transaction_timeout=p["timeout"],
                                    reconnect_min=0.05, reconnect_max=0.8, routing=(self.name in GATEWAYS),
                                    router_buffer_bytes=p["router_bytes"], window_capacity=4096,
                                    window_hole_limit=p["hole_limit"],
                                    max_pending_deliveries=p["max_pending"]),
                         [Route(parse_net(net), parse_nid(gw)) for net, gw in (ROUTES_2GW if w.two_gateways else ROUTES)[self.name]])
        for nid in self.nids:
            self.node.add_net(NetParams(nid, 988, credits=p["credits"], peer_credits=p["peer_credits"],
                                        max_message_size=p["max_size"], checksum=w.rng.random() < 0.5,
                                        typed_connections=p["typed"], min_bulk=256, peer_window_bytes=p["peer_window"]))
        if w.multirail:
            self.node.set_rails({parse_nid(prim): [parse_nid(n) for n in nids] for prim, nids in RAILS.get(self.name, {}).items()})
        self.endpoint = _Endpoint(w, self, p["rx_buffers"])
        w.wake_app(self)
        self.in_links.clear()
        self.out_links.clear()
        self.timer_at = None
        self.outstanding = 0
        if w.nat:
            self.run(lambda: w.nat_paths(self))

    # -- running the core --------------------------------------------------------------

    def run(self, call: Callable[[], Any]) -> None:
        """Make one input call, then carry out every action it (transitively) produced."""
        if not self.up:
            return
        call()
        node = self.node
        while True:
            actions = node.take_actions()
            if not actions:
                break
            for a in actions:
                self._do(a)
        self._arm_timer()
        self.world.check_bounds(self)

    def _arm_timer(self) -> None:
        at = self.node.get_timer()
        if at is None or at == self.timer_at:
            return
        self.timer_at = at
        self.timer_token += 1
        w = self.world
        late = w.rng.uniform(0, 0.3) if "late" in w.faults.enabled and w.rng.random() < 0.3 else 0.0
        w.at(max(at, w.now) + late, self._timer, self.timer_token, self.generation)

    def _timer(self, token: int, generation: int) -> None:
        if generation != self.generation or token != self.timer_token or not self.up:
            return
        self.timer_at = None
        self.run(lambda: self.node.handle_timer(self.world.now))

    def _do(self, a: Any) -> None:
        w = self.world
        if isinstance(a, Complete):
            self._completed(a.msg, a.status, a.reason)
        elif isinstance(a, Wake):
            self._write(a.conn)
        elif isinstance(a, Deliver):
            self._deliver(a.delivery)
        elif isinstance(a, SendIn):
            link = self.in_links.get(id(a.conn))
            if link is not None and link.alive:
                link.carry([_decode(b, w.max_size) for b in a.frames], forward=False)
            elif a.conn.out is not None:  # answers to what came on our own connection's reverse direction
                out = self.out_links.get((id(a.conn.out), a.conn.out.attempt))
                if out is not None and out.alive and out.src is self:
                    out.carry([_decode(b, w.max_size) for b in a.frames], forward=True)
        elif isinstance(a, Adopt):
            base = self.in_links.get(id(a.via))
            if base is not None and base.alive:
                self.out_links[(id(a.conn), a.attempt)] = _Reverse(base, a.conn, a.attempt)
        elif isinstance(a, PingDone) and a.token & KEEPALIVE_TOKEN:
            pass
        elif isinstance(a, Connect):
            w.connect(self, a)
        elif isinstance(a, Close):
            gone = self.out_links.pop((id(a.conn), a.attempt), None)
            if a.detach and isinstance(gone, _Reverse):
                pass  # we stop writing on the peer's connection; it carries on
            elif isinstance(gone, _Reverse):
                gone.kill(a.reason)
            elif gone is not None:
                gone.kill(a.reason, src_knows=False)
        elif isinstance(a, CloseIn):
            link = self.in_links.pop(id(a.conn), None)
            if link is not None:
                link.kill(a.reason, dst_knows=False)
            elif a.conn.out is not None:  # the reverse half of our own connection: it goes with it
                out = self.out_links.pop((id(a.conn.out), a.conn.out.attempt), None)
                if out is not None:
                    out.kill(a.reason)
        elif isinstance(a, Resume):
            link = self.in_links.get(id(a.conn))
            if link is not None:
                w.after(0.0, link.resume)
            elif a.conn.out is not None:
                out = self.out_links.get((id(a.conn.out), a.conn.out.attempt))
                if isinstance(out, _Link):
                    w.after(0.0, out.resume_rev)
        elif isinstance(a, AbortRx):
            raise w.violation("AbortRx for a token the simulator never gave")
        elif isinstance(a, PingDone) and a.token & PROBE_BIT and w.multirail:
            pass  # a rail probe's answer: the core's own business
        elif isinstance(a, (LanTransmit, PingDone)):
            raise w.violation(f"unexpected action {a!r}")
        else:
            raise w.violation(f"unknown action {a!r}")

    def _write(self, conn: OutConn) -> None:
        link = self.out_links.get((id(conn), conn.attempt))
        if link is None or not link.alive or link.writing:
            return
        batch = self.node.next_batch(conn, self.world.now)
        if batch is None:
            return
        link.writing = True
        link.sending.append(batch)
        link.carry([_decode(h, self.world.max_size, p) for h, p in batch.frames], forward=True)
        w = self.world
        if not link.stuck:
            w.after(w.rng.uniform(0.0005, 0.01), self._sent, link, batch, self.generation)

    def _sent(self, link: "_Link | _Reverse", batch: Batch, generation: int) -> None:
        if generation != self.generation or batch not in link.sending:
            return
        link.sending.remove(batch)
        link.writing = False
        self.run(lambda: self.node.send_done(batch, self.world.now))
        if link.alive:
            self.run(lambda: self._write(link.conn))

    def send_failed(self, batch: Batch, reason: str, generation: int) -> None:
        if generation == self.generation:
            self.run(lambda: self.node.send_done(batch, self.world.now, reason))

    def lost_out(self, conn: OutConn, attempt: int, reason: str, generation: int) -> None:
        if generation == self.generation:
            self.out_links.pop((id(conn), attempt), None)
            self.run(lambda: self.node.connection_lost(conn, attempt, reason, self.world.now))

    def lost_in(self, inconn: InConn, generation: int) -> None:
        if generation == self.generation:
            self.in_links.pop(id(inconn), None)
            self.run(lambda: self.node.inbound_lost(inconn))

    def _deliver(self, d: Delivery) -> None:
        if d.dst_portal == PORTAL and self.endpoint is not None:
            self.endpoint.offer(d)
        else:
            self.answer_delivery(d, Status.NO_RECEIVER, f"no endpoint attached on portal {d.dst_portal}")

    def answer_delivery(self, d: Delivery, status: Status, reason: str) -> None:
        self.node.delivered(d, status, reason, self.world.now)

    # -- applications ----------------------------------------------------------------------

    def submit(self, mid: int, dst: bytes, portal: int, size: int) -> None:
        w = self.world
        payload = ID.pack(mid) + bytes(max(0, size - 8))
        rec = w.records[mid] = _Record(self.name, dst, portal)
        self.outstanding += 1
        w.submitted += 1

        def finish(status: Status, reason: str, mid: int = mid) -> None:
            w.complete(mid, status, reason)

        def go() -> None:
            msg = self.node.submit(None, dst, 1, portal, payload, finish, w.now)
            if msg.state not in FINAL or not msg.completed:
                self.pending[msg] = mid

        self.run(go)
        del rec

    def _completed(self, msg: OutMsg, status: Status, reason: str) -> None:
        self.pending.pop(msg, None)
        self.outstanding -= 1
        assert msg.on_finish is not None
        msg.on_finish(status, reason)
        self.world.wake_app(self)

    # -- crash -----------------------------------------------------------------------------

    def crash(self) -> None:
        if not self.up:
            return
        w = self.world
        self.up = False
        w.crashes += 1
        w.rerouted += self.node.stats["msgs_rerouted"]  # the counters die with the incarnation
        for link in list(w.links):
            if link.src is self:
                link.kill("peer crashed", src_knows=False)
            elif link.dst is self:
                link.kill("peer crashed", dst_knows=False)
        # The applications see their daemon die: every message they handed over ends here.
        for msg, mid in list(self.pending.items()):
            w.complete(mid, None, "daemon crashed")
        self.pending.clear()
        self.outstanding = 0
        self.generation += 1
        self.endpoint = None
        w.wake_app(self)  # its applications go on (they resubmit nothing; they send new messages)


def _decode(header: bytes, max_size: int, payload: Any = b"") -> Frame:
    h = wire.decode_header(header[: wire.peek_header_size(header[: wire.BASE_SIZE])], max_size)
    body = bytes(payload) if len(payload) else header[h.size :]
    return Frame(h, body)


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    fn: Callable[..., None] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False)


class World:
    """One seeded run; see the module docstring."""

    def __init__(self, seed: int, faults: Faults | None = None, messages: int | None = None, nat: bool = False) -> None:
        self.seed = seed
        # nat: A sits behind NAT -- nobody can connect to it; it holds its connection to G open
        # with keepalives and G sends to it on that connection's reverse direction (return_path
        # reverse or auto, picked per seed from a generator of its own so the rest of the
        # schedule is the same seed's).
        self.nat = nat
        self.nat_mode = random.Random(seed ^ 0x4E4154).choice((ReturnPath.REVERSE, ReturnPath.AUTO))
        self.nat_released = False
        self.rng = random.Random(seed)
        rng = self.rng
        # One run in four checks liveness: no fault that loses frames on a live connection,
        # and a transaction timeout far beyond any delay, so every message must get through.
        self.liveness = rng.random() < 0.25
        self.faults = faults if faults is not None else Faults.pick(rng)
        if self.liveness:
            self.faults.enabled -= {"loss", "stuck"}
        self.params: dict[str, Any] = {
            "timeout": rng.choice((2.0, 4.0, 8.0)),
            "credits": rng.choice((2, 4, 8)),
            "peer_credits": rng.choice((1, 2, 4)),
            "max_size": 4096,
            "router_bytes": rng.choice((4096, 16384, 1 << 20)),
            "rx_buffers": rng.choice((1, 2, 4)),
            "typed": rng.random() < 0.5,
            "max_in_flight": rng.choice((2, 4, 8)),
            "max_pending": rng.choice((1, 2, 64)),
        }
        self.max_size = 1 << 16
        self.max_in_flight = int(self.params["max_in_flight"])
        self.latency = rng.choice((0.005, 0.05, 0.3))
        if self.liveness:
            self.params["timeout"] = 1000.0
        # Multi-rail, from a generator of its own: the draws above (and so every schedule
        # without multi-rail) are what they were before multi-rail existed.
        mr_rng = random.Random(seed * 7919 + 17)
        self.multirail = mr_rng.random() < 0.3 or "raildown" in self.faults.enabled
        if nat:  # a multi-rail peer behind NAT is not supported (docs/nat.md): NAT worlds have one rail
            self.multirail = False
            self.faults.enabled -= {"raildown"}
        if self.multirail and faults is None and mr_rng.random() < 0.6:
            self.faults.enabled |= {"raildown"}
        self.rails_down: set[Any] = set()
        # A byte window per peer (core.fairq), also from a generator of its own.
        self.params["peer_window"] = random.Random(seed * 104729 + 31).choice((0, 0, 4096, 16384))
        # How soon a dedupe window gives up on a missing number (lu2k.dedupe): the default is
        # never reached by a world's few messages, so most worlds give up after 1-4 later ones.
        self.params["hole_limit"] = random.Random(seed * 15485863 + 7).choice((1, 2, 4, 1024))
        # A second gateway (about one seed in three, not behind NAT), also from a generator of
        # its own: the leaves route through G or H by health, and move what they have not yet
        # transmitted to the other one when one fails (Node._reroute_unsent).
        self.two_gateways = not nat and random.Random(seed * 2750159 + 11).random() < 0.35
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.nodes = {n: SimNode(self, n) for n in (*NIDS, *(NIDS_H if self.two_gateways else ()))}
        self.host_of = {nid.host: sn for sn in self.nodes.values() for nid in sn.nids}
        self.links: dict[_Link, None] = {}  # ordered: iteration order is part of the schedule
        self.partitioned: set[frozenset[str]] = set()
        self.records: dict[int, _Record] = {}
        self.received: dict[int, str] = {}
        self.submitted = 0
        self.crashes = 0
        self.rerouted = 0
        self.n_events = 0
        self.total_messages = messages if messages is not None else rng.randint(8, 24)
        self.horizon = 0.0

    def nids_of(self, name: str) -> list[str]:
        if name in NIDS_H:
            return NIDS_H[name]
        return (NIDS_MR if self.multirail else NIDS)[name]

    # -- scheduler ---------------------------------------------------------------------------

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.events, (t, next(self._seq), fn, args))

    def after(self, dt: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + dt, fn, *args)

    def violation(self, what: str) -> Violation:
        return Violation(f"seed {self.seed} [{self.faults.label()}]: {what} "
                         f"(replay: python benchmarks/sim_sweep.py --replay {self.seed}{' --nat' if self.nat else ''})")

    # -- network -------------------------------------------------------------------------------

    def connect(self, src: SimNode, a: Connect) -> None:
        dst = self.host_of.get(a.host)
        gen = src.generation
        delay = self.latency * 2 + self.rng.uniform(0, self.latency)
        if dst is None:
            self.after(delay, self._connect_failed, src, a, "no such host", gen)
            return
        self.after(delay, self._connect_done, src, dst, a, gen)

    def _connect_failed(self, src: SimNode, a: Connect, reason: str, gen: int) -> None:
        if gen == src.generation:
            src.run(lambda: src.node.connect_failed(a.conn, a.attempt, reason, self.now))

    def _connect_done(self, src: SimNode, dst: SimNode, a: Connect, gen: int) -> None:
        if gen != src.generation or not src.up:
            return
        if not dst.up:
            src.run(lambda: src.node.connect_failed(a.conn, a.attempt, "connection refused", self.now))
            return
        if frozenset((src.name, dst.name)) in self.partitioned or a.conn.peer.nid.net in self.rails_down:
            src.run(lambda: src.node.connect_failed(a.conn, a.attempt, "connect timed out", self.now))
            return
        if self.nat and dst.name == "A":
            src.run(lambda: src.node.connect_failed(a.conn, a.attempt, "connect timed out (A is behind NAT)", self.now))
            return
        link = _Link(self, src, a.conn, a.attempt, dst)
        peer_nid = a.conn.peer.ni.nid
        result = wire.HelloResult(peer_nid, a.conn.peer.nid, a.conn.ctype, src.node.incarnation, wire.PROTOCOL_VERSION,
                                  multirail=a.conn.peer.rail is not None)

        def accept() -> None:  # the link is known before the actions run (an Adopt may name it)
            link.inconn = dst.node.accepted(a.conn.peer.nid.net, result, self.now)
            dst.in_links[id(link.inconn)] = link

        dst.run(accept)
        src.out_links[(id(a.conn), a.attempt)] = link
        self.links[link] = None
        src.run(lambda: src.node.connected(a.conn, a.attempt, dst.node.incarnation, self.now))

    # -- traffic and faults ----------------------------------------------------------------------

    def complete(self, mid: int, status: Status | None, reason: str) -> None:
        rec = self.records[mid]
        rec.completions += 1
        if rec.completions > 1:
            raise self.violation(f"message {mid} ({rec.origin}->{Nid.from_bytes(rec.dst)}) completed twice: {rec.status} then {status} ({reason})")
        rec.status, rec.reason = status, reason

    def nat_paths(self, sn: SimNode) -> None:
        g, a = parse_nid(NIDS["G"][0]), parse_nid(NIDS["A"][0])
        if sn.name == "A" and not self.nat_released:
            sn.node.set_return_paths({}, {g: PathSettings(keepalive=0.5)})
        elif sn.name == "G":
            sn.node.set_return_paths({}, {a: PathSettings(return_path=self.nat_mode)})

    def _nat_release(self) -> None:
        """Once every message has its completion and no core holds one, A stops holding its
        connection (else its keepalives would run forever and the world never end)."""
        done = (self.submitted == self.total_messages and all(r.completions for r in self.records.values())
                and all(n.up and not n.node.pending_messages() for n in self.nodes.values()))
        if not done:
            self.after(1.0, self._nat_release)
        elif not self.nat_released:
            self.nat_released = True
            node = self.nodes["A"]
            node.run(lambda: node.node.set_return_paths({}, {}))

    def _app(self, name: str, targets: list[tuple[bytes, int]], count: int, mids: Any) -> None:
        """An application: submit a message every 0-50 ms while below ``max_in_flight``;
        at the limit, wait for a completion (or the restart of its daemon)."""
        node = self.nodes[name]
        if count <= 0:
            return
        if not node.up or node.outstanding >= self.params["max_in_flight"]:
            node.app_waiting = (targets, count, mids)
            return
        dst, portal = self.rng.choice(targets)
        size = self.rng.choice((8, 100, 300, 2000, 4096, 5000)) if self.rng.random() < 0.9 else 0
        node.submit(next(mids), dst, portal, size)
        self.after(self.rng.uniform(0.0, 0.05), self._app, name, targets, count - 1, mids)

    def wake_app(self, node: SimNode) -> None:
        if node.app_waiting is not None:
            targets, count, mids = node.app_waiting
            node.app_waiting = None
            self.after(self.rng.uniform(0.0, 0.05), self._app, node.name, targets, count, mids)

    def _schedule_faults(self) -> None:
        rng, en, horizon = self.rng, self.faults.enabled, self.horizon
        if "reset" in en:
            for _ in range(rng.randint(1, 4)):
                self.at(rng.uniform(0, horizon), self._reset_one)
        if "crash" in en:
            who = rng.choice(("A", "G", "B", "H") if self.two_gateways else ("A", "G", "B"))
            t = rng.uniform(0, horizon)
            self.at(t, self._crash, who)
            self.at(t + rng.uniform(0.1, 3.0), self._restart, who)
        if "partition" in en:
            pairs = (("A", "G"), ("G", "B"), ("A", "H"), ("H", "B")) if self.two_gateways else (("A", "G"), ("G", "B"))
            pair = frozenset(rng.choice(pairs))
            t = rng.uniform(0, horizon)
            self.at(t, self._partition, pair)
            self.at(t + rng.uniform(0.5, 6.0), self.partitioned.discard, pair)
        if "stuck" in en:
            self.at(rng.uniform(0, horizon), self._stick_one)
        if "raildown" in en:
            net = parse_net(rng.choice(RAIL_NETS))
            t = rng.uniform(0, horizon)
            self.at(t, self._rail_down, net)
            self.at(t + rng.uniform(0.5, 6.0), self.rails_down.discard, net)
        if "slow" in en:
            who = rng.choice(("B", "G", "A"))
            t = rng.uniform(0, horizon)
            self.at(t, self._stall, who)
            self.at(t + rng.uniform(0.5, 10.0), self._unstall, who)

    def _reset_one(self) -> None:
        if self.links:
            link = self.rng.choice(sorted(self.links, key=lambda lk: lk.id))
            link.kill("connection reset by peer")

    def _stick_one(self) -> None:
        if self.links:
            self.rng.choice(sorted(self.links, key=lambda lk: lk.id)).stuck = True

    def _crash(self, who: str) -> None:
        self.nodes[who].crash()

    def _restart(self, who: str) -> None:
        node = self.nodes[who]
        if not node.up:
            node.boot()

    def _partition(self, pair: frozenset[str]) -> None:
        self.partitioned.add(pair)
        for link in list(self.links):
            if frozenset((link.src.name, link.dst.name)) == pair:
                self.after(self.rng.uniform(0, 1.0), link.kill, "connection timed out")

    def _rail_down(self, net: Any) -> None:
        self.rails_down.add(net)
        for link in list(self.links):
            if link.conn.peer.nid.net == net:
                self.after(self.rng.uniform(0, 1.0), link.kill, "rail down: connection timed out")

    def _stall(self, who: str) -> None:
        ep = self.nodes[who].endpoint
        if ep is not None:
            ep.stalled = True

    def _unstall(self, who: str) -> None:
        node = self.nodes[who]
        if node.endpoint is not None:
            node.endpoint.resume(node.generation)

    # -- running ---------------------------------------------------------------------------------

    def run(self, max_events: int = 200_000) -> RunResult:
        for n in self.nodes.values():
            n.boot()
        for n in self.nodes.values():
            n.bound_in = 0
        mids = itertools.count(1)
        total = self.total_messages
        a_share = total * 2 // 3
        self.horizon = 2.0 + total * 0.05
        b, g, a = (parse_nid(n).to_bytes() for n in ("10.1.0.3@tcp1", "10.0.0.2@tcp", "10.0.0.1@tcp"))
        self.after(0.0, self._app, "A", [(b, PORTAL), (g, PORTAL), (b, DEAD_PORTAL)], a_share, mids)
        self.after(0.0, self._app, "B", [(a, PORTAL)], total - a_share, mids)
        self._schedule_faults()
        if self.nat:
            self.after(1.0, self._nat_release)
        events = self.events
        while events:
            t, _s, fn, args = heapq.heappop(events)
            self.now = t
            fn(*args)
            self.n_events += 1
            if self.n_events > max_events:
                raise self.violation(f"no quiescence after {max_events} events (t={self.now:.2f})")
        self.check()
        self.rerouted += sum(sn.node.stats["msgs_rerouted"] for sn in self.nodes.values())
        counts: dict[str, int] = {}
        for r in self.records.values():
            key = r.status.name if r.status is not None else "CRASHED"
            counts[key] = counts.get(key, 0) + 1
        return RunResult(self.seed, self.faults.label(), len(self.records), counts, self.n_events, self.now, self.rerouted)

    # -- invariants ------------------------------------------------------------------------------

    def check_bounds(self, sn: SimNode) -> None:
        held = 0
        inflight: dict[int, int] = {}  # the rails of a multi-rail peer share one in-flight map
        for ni in sn.node.nis.values():
            for p in ni.peers.values():
                held += len(p.queue)
                inflight[id(p.inflight)] = len(p.inflight)
        held += sum(inflight.values())
        # A leaf holds at most what its applications may have outstanding.  The gateway holds a
        # forward for at most T (+ a late timer) after it arrived, and it arrived at most T (+ a
        # late timer) after the sender submitted it; a sender's application slot that G still
        # holds a message of was busy for T before it could send the next one.  So per slot at
        # most 3 of its messages sit at G, for two senders, twice (a crashed sender's old
        # forwards run out their time next to the new incarnation's).
        bound = self.max_in_flight * (12 if sn.name in GATEWAYS else 1)
        if held > bound:
            raise self.violation(f"{sn.name} holds {held} messages for its peers, bound {bound}")

    def check(self) -> None:
        for mid, rec in self.records.items():
            if rec.completions != 1:
                raise self.violation(f"message {mid} ({rec.origin}->{Nid.from_bytes(rec.dst)} portal {rec.portal}) got {rec.completions} completions")
            got = mid in self.received
            if rec.status is Status.DELIVERED and not got:
                raise self.violation(f"message {mid} reported DELIVERED but {Nid.from_bytes(rec.dst)} never received it")
            if rec.status in (Status.NO_ROUTE, Status.NO_RECEIVER, Status.TOO_LARGE, Status.INVALID) and got:
                raise self.violation(f"message {mid} reported {rec.status.name} ({rec.reason}) but was received")
            if self.liveness and rec.status not in (None, Status.PEER_RESTARTED, Status.TOO_LARGE):
                expect = Status.NO_RECEIVER if rec.portal == DEAD_PORTAL else Status.DELIVERED
                if rec.status is not expect:
                    raise self.violation(f"liveness: message {mid} ({rec.origin}->{Nid.from_bytes(rec.dst)}) ended {rec.status.name} "
                                         f"({rec.reason}), expected {expect.name}")
        for sn in self.nodes.values():
            if not sn.up:
                raise self.violation(f"{sn.name} still down at the end")
            for session in sn.node.sessions.values():
                if len(session.window._seen) > session.window.capacity + 1:
                    raise self.violation(f"{sn.name}: dedupe window of {session.peer_nid} over capacity")
            node = sn.node
            if node.router_bytes or node._router_wait:
                raise self.violation(f"{sn.name}: router buffer not returned ({node.router_bytes} bytes)")
            for ni in node.nis.values():
                if ni.credits.in_use or ni.queued:
                    raise self.violation(f"{sn.name}: NI {ni.net} credits in use {ni.credits.in_use}, queued {ni.queued}")
                for p in ni.peers.values():
                    if p.window.in_use:
                        raise self.violation(f"{sn.name}: peer {p.nid} byte window holds {p.window.in_use} bytes")
                    if p.credits.in_use or p.queue or p.inflight:
                        raise self.violation(f"{sn.name}: peer {p.nid} credits {p.credits.in_use} queue {len(p.queue)} "
                                             f"inflight {len(p.inflight)}")
                    if p.by_dest or p.parked:  # the per-destination share comes back too
                        raise self.violation(f"{sn.name}: peer {p.nid} still counts {sum(p.by_dest.values())} messages "
                                             f"against their destinations, {sum(map(len, p.parked.values()))} parked")
            if node.pending_messages():
                raise self.violation(f"{sn.name}: {node.pending_messages()} messages never completed inside the core")
            for s in node.sessions.values():
                for c in s.conns:
                    if c.pending or c.parked:
                        raise self.violation(f"{sn.name}: accepted connection still has {c.pending} deliveries / {c.parked} forwards")
            ep = sn.endpoint
            if ep is not None and (ep.free != ep.total or ep.waiting):
                raise self.violation(f"{sn.name}: endpoint buffers {ep.free}/{ep.total} free, {len(ep.waiting)} waiting")
            if sn.pending:
                raise self.violation(f"{sn.name}: applications still wait for {len(sn.pending)} messages")


def run_seed(seed: int, messages: int | None = None, nat: bool = False) -> RunResult:
    """Run one seeded schedule and check its invariants (raises :class:`Violation`)."""
    return World(seed, messages=messages, nat=nat).run()
