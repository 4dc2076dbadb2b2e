"""The message core (lu2k.core), pure: nodes wired in memory, a float for the clock."""

from __future__ import annotations

from typing import Any

import pytest

from lu2k import wire
from lu2k.core import (
    AbortRx, Batch, Close, CloseIn, Complete, Connect, Deliver, Delivery, InConn, LanTransmit, NetParams,
    Node, NodeParams, OutConn, OutMsg, PingDone, Resume, SendIn, Wake,
)
from lu2k.core.states import CONN_TRANSITIONS, FINAL, MSG_TRANSITIONS, ConnEvent, ConnState, MsgEvent, MsgState, conn_next, msg_next
from lu2k.errors import LocalProtocolError, Status
from lu2k.nid import Nid, parse_net, parse_nid
from lu2k.routing import Route

A, G1, G2, B = (parse_nid(n) for n in ("10.0.0.1@tcp", "10.0.0.2@tcp", "10.1.0.2@tcp1", "10.1.0.3@tcp1"))


def frames_of(batch_frames: list[tuple[bytes, Any]]) -> list[wire.Frame]:
    out = []
    for header, payload in batch_frames:
        h = wire.decode_header(header[: wire.peek_header_size(header[: wire.BASE_SIZE])], 1 << 20)
        out.append(wire.Frame(h, bytes(payload) if len(payload) else header[h.size :]))
    return out


class Mesh:
    """Nodes joined in memory: actions carried out at once, in order, with no faults.

    ``endpoint`` answers deliveries (default: DELIVERED, recorded in ``received``);
    ``hold_sends`` keeps batches unfinished (a peer that stopped reading).
    """

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.now = 0.0
        self.completions: dict[int, list[tuple[Status, str]]] = {}
        self.received: list[tuple[str, bytes]] = []
        self.held_deliveries: list[tuple[Node, Delivery]] = []
        self.hold_deliveries = False
        self.hold_sends = False
        self.held_batches: list[tuple[Node, Batch]] = []
        self.links: dict[tuple[int, int], tuple[Node, InConn]] = {}  # (id(OutConn), attempt) -> receiving side
        self.back: dict[int, tuple[Node, OutConn, int]] = {}  # id(InConn) -> sending side
        self.pings: list[PingDone] = []
        self.lan: list[OutMsg] = []
        self.closed_in: list[str] = []
        self.refuse: dict[str, Status] = {}

    def node(self, name: str, nids: list[Nid], routes: list[Route] = (), **params: Any) -> Node:  # type: ignore[assignment]
        net_opts = {k: params.pop(k) for k in ("checksum", "peer_credits", "credits", "max_message_size") if k in params}
        n = Node(NodeParams(incarnation=len(self.nodes) + 1, **params), list(routes))
        for nid in nids:
            n.add_net(NetParams(nid, 988, **net_opts))
            self.nodes[nid.host] = n
        return n

    def send(self, node: Node, dst: Nid, payload: Any = b"x", portal: int = 5) -> OutMsg:
        key = len(self.completions)
        self.completions[key] = []
        msg = node.submit(None, dst.to_bytes(), 1, portal, payload, lambda st, why: self.completions[key].append((st, why)), self.now)
        msg.owner = key
        self.run(node)
        return msg

    def done(self, msg: OutMsg) -> list[tuple[Status, str]]:
        return self.completions[msg.owner]

    def tick(self, node: Node, to: float) -> None:
        self.now = to
        node.handle_timer(to)
        self.run(node)

    def run(self, node: Node) -> None:
        while actions := node.take_actions():
            for a in actions:
                self.do(node, a)

    def do(self, node: Node, a: Any) -> None:
        if isinstance(a, Complete):
            assert a.msg.on_finish is not None
            a.msg.on_finish(a.status, a.reason)
        elif isinstance(a, Connect):
            peer = self.nodes[a.host]
            if a.host in self.refuse:
                node.connect_failed(a.conn, a.attempt, "refused", self.now, refused=self.refuse[a.host])
                return
            result = wire.HelloResult(a.conn.peer.ni.nid, a.conn.peer.nid, a.conn.ctype, node.incarnation, 1)
            inconn = peer.accepted(a.conn.peer.nid.net, result, self.now)
            self.links[(id(a.conn), a.attempt)] = (peer, inconn)
            self.back[id(inconn)] = (node, a.conn, a.attempt)
            node.connected(a.conn, a.attempt, peer.incarnation, self.now)
        elif isinstance(a, Wake):
            self.write(node, a.conn)
        elif isinstance(a, SendIn):
            sender, conn, attempt = self.back[id(a.conn)]
            sender.frames_received(conn, attempt, frames_of([(f, b"") for f in a.frames]), self.now)
            self.run(sender)
        elif isinstance(a, Deliver):
            if a.delivery.msg is None and self.hold_deliveries:
                self.held_deliveries.append((node, a.delivery))
                return
            self.answer(node, a.delivery)
        elif isinstance(a, LanTransmit):
            self.lan.append(a.msg)
        elif isinstance(a, PingDone):
            self.pings.append(a)
        elif isinstance(a, Close):
            for b in [b for n, b in self.held_batches if b.conn is a.conn]:
                self.held_batches = [(n, x) for n, x in self.held_batches if x is not b]
                node.send_done(b, self.now, a.reason)
        elif isinstance(a, CloseIn):
            self.closed_in.append(a.reason)
        elif isinstance(a, (Resume, AbortRx)):
            pass

    def answer(self, node: Node, d: Delivery, status: Status = Status.DELIVERED) -> None:
        if d.dst_portal == 5 and status is Status.DELIVERED:
            self.received.append((node.nis[next(iter(node.nis))].nid.host, bytes(d.payload)))
            node.delivered(d, Status.DELIVERED, "", self.now)
        else:
            node.delivered(d, Status.NO_RECEIVER if status is Status.DELIVERED else status, "no endpoint", self.now)

    def release_deliveries(self) -> None:
        held, self.held_deliveries = self.held_deliveries, []
        for node, d in held:
            self.answer(node, d)
            self.run(node)

    def write(self, node: Node, conn: OutConn) -> None:
        while (batch := node.next_batch(conn, self.now)) is not None:
            peer, inconn = self.links[(id(conn), batch.attempt)]
            peer.inbound_frames(inconn, frames_of(batch.frames), self.now)
            if self.hold_sends:
                self.held_batches.append((node, batch))
                self.run(peer)
                return
            node.send_done(batch, self.now)
            self.run(peer)


# -- state tables -------------------------------------------------------------------------------


def test_state_tables_are_complete_and_final_states_are_final() -> None:
    assert set(MSG_TRANSITIONS) == set(MsgState) and set(CONN_TRANSITIONS) == set(ConnState)
    for final in FINAL:
        assert MSG_TRANSITIONS[final] == {}
    assert msg_next(MsgState.SENT, MsgEvent.CONN_LOST) is MsgState.REQUEUED
    assert msg_next(MsgState.REQUEUED, MsgEvent.ACK) is MsgState.DONE
    with pytest.raises(LocalProtocolError, match="cannot ack while queued"):
        msg_next(MsgState.QUEUED, MsgEvent.ACK)
    with pytest.raises(LocalProtocolError, match="cannot up while idle"):
        conn_next(ConnState.IDLE, ConnEvent.UP)


# -- one hop ----------------------------------------------------------------------------------------


def test_credits_bound_what_is_in_flight_and_completion_waits_for_the_payload() -> None:
    m = Mesh()
    a = m.node("a", [A], peer_credits=2)
    msgs = [a.submit(None, G1.to_bytes(), 1, 5, b"x", None, 0.0) for _ in range(3)]
    peer = a.peer(G1)
    assert [x.state for x in msgs] == [MsgState.IN_FLIGHT, MsgState.IN_FLIGHT, MsgState.QUEUED]
    assert peer.credits.in_use == 2 and peer.credits.min_value == -1 and a.nis[A.net].queued == 1
    connect = [x for x in a.take_actions() if isinstance(x, Connect)]
    assert len(connect) == 1 and (connect[0].host, connect[0].port) == ("10.0.0.2", 988)
    conn = connect[0].conn
    a.connected(conn, connect[0].attempt, 99, 0.1)
    assert [type(x) for x in a.take_actions()] == [Wake]
    batch = a.next_batch(conn, 0.1)
    assert batch is not None and len(batch.frames) == 2 and msgs[0].state is MsgState.SENT and msgs[0].busy == 1
    # The ACK comes back before the transport let go of the payload: no completion yet.
    a.frames_received(conn, connect[0].attempt, frames_of([(wire.encode_acks([(1, 0)]), b"")]), 0.2)
    assert msgs[0].state is MsgState.DONE and not msgs[0].completed
    # The freed credit put msgs[2] on the connection; its writer is still busy, so no new Wake.
    assert a.take_actions() == [] and msgs[2].state is MsgState.IN_FLIGHT
    a.send_done(batch, 0.3)
    done = [x for x in a.take_actions() if isinstance(x, Complete)]
    assert [(x.msg, x.status) for x in done] == [(msgs[0], Status.DELIVERED)]
    nxt = a.next_batch(conn, 0.3)
    assert nxt is not None and nxt.msgs == [msgs[2]] and peer.credits.in_use == 2


def test_a_restarted_peer_gets_what_was_never_sent_numbered_from_one_and_its_window_has_no_gap() -> None:
    m = Mesh()
    a = m.node("a", [A])
    m.node("g", [G1])
    first = [m.send(a, G1, bytes([i])) for i in range(3)]
    assert [x.seq for x in first] == [1, 2, 3] and all(m.done(x) == [(Status.DELIVERED, "delivered")] for x in first)
    conn = first[0].conn
    assert conn is not None
    a.connection_lost(conn, conn.attempt, "reset", 1.0)
    m.run(a)
    g2 = m.node("g", [G1])  # g restarted: a new process, a new incarnation, no sessions
    assert g2.incarnation != 2
    later = [m.send(a, G1, bytes([i])) for i in (7, 8)]  # given credits while the connection is down
    assert [x.seq for x in later] == [4, 5] and [x.state for x in later] == [MsgState.IN_FLIGHT] * 2
    m.tick(a, 2.0)  # reconnects, to the new g
    assert [m.done(x) for x in later] == [[(Status.DELIVERED, "delivered")]] * 2 and [x.seq for x in later] == [1, 2]
    (session,) = g2.sessions.values()
    assert session.window.floor == 3 and session.window.check(3) is None  # nothing held above a gap
    assert m.send(a, G1, b"next").seq == 3


def test_resend_after_reconnect_is_answered_from_the_window_without_a_second_delivery() -> None:
    m = Mesh()
    a = m.node("a", [A])
    g = m.node("g", [G1])
    m.hold_sends = True  # the first batch reaches g but its send never finishes
    msg = m.send(a, G1)
    assert m.received == [("10.0.0.2", b"x")] and msg.state is MsgState.DONE  # ACKed already
    assert m.done(msg) == []  # ... but the transport still holds the payload
    conn = msg.conn
    assert conn is not None
    a.connection_lost(conn, conn.attempt, "reset", 1.0)
    m.hold_sends = False
    for n, b in m.held_batches:
        n.send_done(b, 1.0, "reset")
    m.held_batches.clear()
    m.run(a)
    assert m.done(msg) == [(Status.DELIVERED, "delivered")]
    # A copy of seq 1 arriving again (say, resent by an older daemon version) is answered, not delivered.
    session = next(iter(g.sessions.values()))
    inconn = session.conns[-1]
    header = wire.encode_msg_header(1, A.to_bytes(), G1.to_bytes(), 1, 5, b"x", False)
    g.inbound_frames(inconn, frames_of([(header, b"x")]), 1.5)
    sent = [x for x in g.take_actions() if isinstance(x, SendIn)]
    assert len(m.received) == 1 and g.stats["duplicates"] == 1
    assert wire.decode_acks(frames_of([(sent[0].frames[0], b"")])[0]) == [(1, 0)]


def test_peer_restart_fails_what_it_may_have_seen_and_sends_the_rest() -> None:
    m = Mesh()
    a = m.node("a", [A], peer_credits=1)
    g = m.node("g", [G1])
    m.hold_deliveries = True
    first = m.send(a, G1)
    second = m.send(a, G1)
    assert first.state is MsgState.SENT and second.state is MsgState.QUEUED
    conn = first.conn
    assert conn is not None
    a.connection_lost(conn, conn.attempt, "reset", 1.0)
    m.run(a)  # reconnects at once (first failure: backoff ready after 0.1 s)
    assert [type(x) for x in a.take_actions()] == []
    m.now = 1.2
    g.incarnation = 1234  # the peer came back as a new daemon
    m.tick(a, 1.2)
    assert m.done(first) == [(Status.PEER_RESTARTED, "10.0.0.2@tcp restarted while the message was in flight; delivery unknown")]
    assert second.state is MsgState.SENT and a.stats["peer_restarts"] == 1


def test_unreachable_peer_times_out_as_no_route_with_the_last_error_and_sent_as_timed_out() -> None:
    m = Mesh()
    a = m.node("a", [A], transaction_timeout=5.0)
    m.refuse["10.0.0.9"] = None  # type: ignore[assignment]
    m.nodes["10.0.0.9"] = a
    lost = m.send(a, parse_nid("10.0.0.9@tcp"))
    assert lost.state is MsgState.IN_FLIGHT and a.get_timer() == pytest.approx(0.1)  # the reconnect backoff
    m.tick(a, 4.9)
    assert m.done(lost) == []
    m.tick(a, 5.0)
    assert m.done(lost) == [(Status.NO_ROUTE, "10.0.0.9@tcp unreachable: refused")]
    g = m.node("g", [G1])
    m.hold_deliveries = True
    sent = m.send(a, G1)
    assert sent.state is MsgState.SENT and a.get_timer() == pytest.approx(10.0)
    m.tick(a, 10.0)
    assert m.done(sent)[0][0] is Status.TIMED_OUT
    assert a.peer(G1).credits.in_use == 0 and g is not None


def test_a_refused_hello_fails_what_waits_with_the_refusal_status() -> None:
    m = Mesh()
    a = m.node("a", [A])
    m.node("g", [G1])
    m.refuse["10.0.0.2"] = Status.AUTH_FAILED
    msgs = [m.send(a, G1) for _ in range(10)]
    assert m.done(msgs[0]) == [(Status.AUTH_FAILED, "refused")] and m.done(msgs[1]) == []
    m.tick(a, 0.1)  # the next attempt is refused too: everything waiting fails with it
    assert all(m.done(x) == [(Status.AUTH_FAILED, "refused")] for x in msgs)
    assert a.peer(G1).credits.in_use == 0 and a.nis[A.net].queued == 0


def test_a_send_blocked_past_the_deadline_resets_the_connection_and_completes_on_time() -> None:
    """The stuck connection is reset at the first deadline.  A message still waiting for its
    turn on it was never transmitted, so it cannot have been delivered: NO_ROUTE, with why."""
    m = Mesh()
    a = m.node("a", [A], transaction_timeout=3.0)
    m.node("g", [G1])
    m.hold_sends = True
    m.hold_deliveries = True
    msg = m.send(a, G1)
    behind = m.send(a, G1)
    assert msg.busy == 1 and behind.state is MsgState.IN_FLIGHT
    m.tick(a, 3.0)
    assert m.done(msg) == [(Status.TIMED_OUT, "no acknowledgement from 10.0.0.2@tcp within the transaction timeout; delivery unknown")]
    assert msg.conn is not None and msg.conn.state is ConnState.BACKOFF and not m.held_batches
    assert m.done(behind) == [(Status.NO_ROUTE, "10.0.0.2@tcp unreachable: send to 10.0.0.2@tcp blocked past a message's transaction timeout")]
    assert a.peer(G1).credits.in_use == 0


# -- through a gateway --------------------------------------------------------------------------------


def routed_mesh(**g_params: Any) -> tuple[Mesh, Node, Node, Node]:
    m = Mesh()
    a = m.node("a", [A], [Route(parse_net("tcp1"), G1)])
    g = m.node("g", [G1, G2], routing=True, **g_params)
    b = m.node("b", [B], [Route(parse_net("tcp"), G2)])
    return m, a, g, b


def test_delivered_through_a_gateway_means_the_far_endpoint_took_it() -> None:
    m, a, g, b = routed_mesh()
    m.hold_deliveries = True
    msg = m.send(a, B, b"far")
    assert msg.state is MsgState.SENT and g.stats["msgs_forwarded"] == 1 and m.received == []
    m.release_deliveries()
    assert m.received == [("10.1.0.3", b"far")] and m.done(msg) == [(Status.DELIVERED, "delivered")]
    m.hold_deliveries = False
    nack = m.send(a, B, b"x", portal=9)
    assert m.done(nack) == [(Status.NO_RECEIVER, "no endpoint")]
    assert g.router_bytes == 0 and not any(p.inflight for ni in g.nis.values() for p in ni.peers.values())


G3, G4 = parse_nid("10.0.0.4@tcp"), parse_nid("10.1.0.4@tcp1")


def two_gateway_mesh(**a_params: Any) -> tuple[Mesh, Node]:
    """A reaches tcp1 through G1 (g1) or G3 (g3), both routers to B."""
    m = Mesh()
    tcp, tcp1 = parse_net("tcp"), parse_net("tcp1")
    a = m.node("a", [A], [Route(tcp1, G1), Route(tcp1, G3)], **a_params)
    m.node("g1", [G1, G2], routing=True)
    m.node("g3", [G3, G4], routing=True)
    m.node("b", [B], [Route(tcp, G2), Route(tcp, G4)])
    return m, a


def test_messages_never_sent_to_a_gateway_that_cannot_be_reached_go_through_the_other() -> None:
    m, a = two_gateway_mesh(peer_credits=2)
    m.refuse["10.0.0.2"] = None  # type: ignore[assignment]  # g1 down: its connects fail
    msgs = [m.send(a, B, bytes([i])) for i in range(6)]
    assert [m.done(x) for x in msgs] == [[(Status.DELIVERED, "delivered")]] * 6
    assert sorted(p for _, p in m.received) == [bytes([i]) for i in range(6)]
    assert a.stats["msgs_rerouted"] >= 1 and a.peer(G1).stats["rerouted_away"] == a.stats["msgs_rerouted"]
    g1 = a.peer(G1)
    assert not g1.inflight and not g1.queue and g1.credits.in_use == 0 and a.nis[A.net].credits.in_use == 0
    m.tick(a, 100.0)  # their first deadlines pass: nothing completes twice
    assert all(len(m.done(x)) == 1 for x in msgs)


def test_when_a_gateway_connection_dies_what_it_sent_stays_and_what_it_never_sent_moves() -> None:
    m, a = two_gateway_mesh(peer_credits=8)
    a.routes.next_hop = lambda dst, health_of, _real=a.routes.next_hop: (  # type: ignore[method-assign]
        G1 if health_of(G1) == 1000 else _real(dst, health_of))  # g1 while it is healthy
    m.hold_sends = True  # g1's writer stays busy with its first batch
    first = m.send(a, B, b"first")
    later = [m.send(a, B, bytes([i])) for i in range(3)]
    conn = first.conn
    assert conn is not None and first.state is MsgState.SENT and [x.state for x in later] == [MsgState.IN_FLIGHT] * 3
    m.hold_sends = False
    a.connection_lost(conn, conn.attempt, "reset", 1.0)
    m.run(a)
    # The transmitted one stays with g1 (it may have it); the others went through g3.
    assert first.state is MsgState.REQUEUED and first.peer is a.peer(G1) and m.done(first) == []
    assert [m.done(x) for x in later] == [[(Status.DELIVERED, "delivered")]] * 3
    assert [x.peer for x in later] == [a.peer(G3)] * 3 and a.stats["msgs_rerouted"] == 3
    assert list(a.peer(G1).inflight) == [first.seq] and a.peer(G1).credits.in_use == 1


class ConnectsHeld:
    """For a harness with ``do(node, action)`` and ``run(node)``: connects to ``hold_hosts``
    wait until the test answers them itself, or lets them through (``finish_connects``)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_hosts: set[str] = set()
        self.held_connects: list[tuple[Node, Connect]] = []

    def do(self, node: Node, a: Any) -> None:
        if isinstance(a, Connect) and a.host in self.hold_hosts:
            self.held_connects.append((node, a))
            return
        super().do(node, a)  # type: ignore[misc]

    def finish_connects(self) -> None:
        self.hold_hosts.clear()
        held, self.held_connects = self.held_connects, []
        for node, a in held:
            self.do(node, a)
            self.run(node)  # type: ignore[attr-defined]


class HeldConnects(ConnectsHeld, Mesh):
    """A Mesh whose connects to ``hold_hosts`` wait."""


def test_credits_a_reroute_gives_back_go_at_once_to_a_peer_waiting_for_them() -> None:
    """Rerouted messages give their NI credits back; another peer of the NI waiting for one
    gets it then, even when the new gateway cannot take the messages yet (its own credits are
    in use) -- not at the next unrelated event."""
    m = HeldConnects()
    other = parse_nid("10.0.0.9@tcp")
    tcp, tcp1 = parse_net("tcp"), parse_net("tcp1")
    a = m.node("a", [A], [Route(tcp1, G1), Route(tcp1, G3)], credits=2, peer_credits=1)
    m.node("g1", [G1, G2], routing=True)
    m.node("g3", [G3, G4], routing=True)
    m.node("b", [B], [Route(tcp, G2), Route(tcp, G4)])
    m.node("p", [other])
    m.hold_deliveries = True  # nothing is answered: credits stay taken
    busy = m.send(a, G3, b"for g3 itself")  # g3's one peer credit, and one of the NI's two
    m.hold_hosts.add(G1.host)
    routed = m.send(a, B, b"through g1")  # the NI's second credit (g1: the first route), waiting for g1's connect
    waiting = m.send(a, other, b"for p")
    assert busy.state is MsgState.SENT and routed.state is MsgState.IN_FLIGHT and waiting.state is MsgState.QUEUED
    node, connect = m.held_connects.pop()
    node.connect_failed(connect.conn, connect.attempt, "refused", m.now)
    m.run(node)
    assert routed.peer is a.peer(G3) and routed.state is MsgState.QUEUED  # moved; g3 has no credit for it yet
    assert waiting.state is MsgState.SENT and a.nis[A.net].credits.in_use == 2  # the freed credit went to p at once


def test_a_node_that_is_not_a_router_refuses_to_forward() -> None:
    m = Mesh()
    a = m.node("a", [A], [Route(parse_net("tcp1"), G1)])
    m.node("g", [G1, G2])
    msg = m.send(a, B)
    assert m.done(msg) == [(Status.NO_ROUTE, "10.0.0.2@tcp is not a router (message for 10.1.0.3@tcp1)")]


def test_router_buffer_parks_forwards_and_blocks_the_connection_until_space_returns() -> None:
    m, a, g, b = routed_mesh(router_buffer_bytes=1000)
    m.hold_deliveries = True
    one = m.send(a, B, bytes(800))
    two = m.send(a, B, bytes(800))
    inconn = next(iter(g.sessions.values())).conns[0]
    assert g.router_bytes == 800 and inconn.parked == 1 and inconn.blocked
    m.release_deliveries()
    m.release_deliveries()
    assert [m.done(x)[0][0] for x in (one, two)] == [Status.DELIVERED, Status.DELIVERED]
    assert g.router_bytes == 0 and not inconn.blocked


def test_routed_ping_is_answered_by_the_far_end_or_fails() -> None:
    m, a, g, b = routed_mesh()
    a.ping(B, 77, 5.0, 0.0)
    m.run(a)
    assert [(p.token, p.error, p.rtt) for p in m.pings] == [(77, "", 0.0)] and m.received == []
    a.ping(parse_nid("10.1.0.99@tcp1"), 78, 5.0, 0.0)  # nobody there: the gateway cannot connect
    m.nodes["10.1.0.99"] = b
    m.refuse["10.1.0.99"] = None  # type: ignore[assignment]
    m.run(a)
    m.run(g)
    m.tick(g, 5.0)
    m.tick(a, 5.0)
    assert m.pings[1].token == 78 and m.pings[1].rtt is None and m.pings[1].error


# -- what a peer must not do ------------------------------------------------------------------------------


def test_a_message_claiming_another_nid_of_the_senders_net_is_refused() -> None:
    m = Mesh()
    a = m.node("a", [A])
    g = m.node("g", [G1])
    m.send(a, G1)
    inconn = next(iter(g.sessions.values())).conns[0]
    forged = wire.encode_msg_header(2, parse_nid("10.0.0.77@tcp").to_bytes(), G1.to_bytes(), 1, 5, b"y", False)
    g.inbound_frames(inconn, frames_of([(forged, b"y")]), 1.0)
    actions = g.take_actions()
    assert [type(x) for x in actions] == [CloseIn] and "claiming to be from 10.0.0.77@tcp" in actions[0].reason
    assert g.stats["bad_frames"] == 1 and len(m.received) == 1


def test_a_payload_checksum_mismatch_fails_that_message_only() -> None:
    m = Mesh()
    a = m.node("a", [A], checksum=True)
    m.node("g", [G1])
    m.hold_deliveries = False
    payload = bytearray(b"original")
    msg = a.submit(None, G1.to_bytes(), 1, 5, payload, None, 0.0)
    payload[:] = b"changed!"  # the application rewrote its slot after posting
    msg.on_finish = lambda st, why: m.completions.setdefault(-1, []).append((st, why))
    m.run(a)
    assert m.completions[-1][0][0] is Status.PROTOCOL and "checksum" in m.completions[-1][0][1]
    after = m.send(a, G1, b"fine")
    assert m.done(after) == [(Status.DELIVERED, "delivered")] and m.closed_in == []


# -- LAN drivers, endpoints going away ----------------------------------------------------------------------


def test_lan_next_hop_goes_to_the_driver_and_still_times_out() -> None:
    m = Mesh()
    a = m.node("a", [A], transaction_timeout=2.0)
    lan = parse_net("o2ib")
    a.attach_lan(lan)
    one = m.send(a, parse_nid("192.168.0.5@o2ib"))
    two = m.send(a, parse_nid("192.168.0.6@o2ib"))
    assert m.lan == [one, two] and one.src_raw == A.to_bytes()
    a.lan_done(one, Status.DELIVERED, "", 0.5)
    m.run(a)
    m.tick(a, 2.0)
    assert m.done(one) == [(Status.DELIVERED, "delivered")]
    assert m.done(two) == [(Status.TIMED_OUT, "no acknowledgement from LAN o2ib within the transaction timeout; delivery unknown")]
    a.lan_done(two, Status.DELIVERED, "", 2.5)  # a late answer changes nothing
    m.run(a)
    assert len(m.done(two)) == 1
    a.detach_lan(lan, "gone")
    gone = m.send(a, parse_nid("192.168.0.5@o2ib"))
    assert m.done(gone) == [(Status.NO_ROUTE, "no route to net o2ib")]


def test_cancel_owned_fails_only_that_owners_messages() -> None:
    m = Mesh()
    a = m.node("a", [A])
    m.refuse["10.0.0.2"] = None  # type: ignore[assignment]
    m.nodes["10.0.0.2"] = a
    mine = [m.send(a, G1) for _ in range(3)]
    for x in mine:
        x.owner = "port-1" if x is not mine[2] else "port-2"
    assert a.cancel_owned("port-1", "endpoint detached") == 2
    m.run(a)
    assert [m.completions[i] for i in range(3)][:2] == [[(Status.CANCELLED, "endpoint detached")]] * 2
    assert m.completions[2] == [] and mine[2].state is MsgState.IN_FLIGHT


def test_stop_cancels_everything_once() -> None:
    m = Mesh()
    a = m.node("a", [A], peer_credits=1)
    m.refuse["10.0.0.2"] = None  # type: ignore[assignment]
    m.nodes["10.0.0.2"] = a
    msgs = [m.send(a, G1) for _ in range(4)]
    a.stop("daemon shutting down")
    m.run(a)
    assert all(m.done(x) == [(Status.CANCELLED, "daemon shutting down")] for x in msgs)
    assert a.pending_messages() == 0


def test_bad_destination_nid_is_invalid_and_unknown_net_no_route() -> None:
    m = Mesh()
    a = m.node("a", [A])
    key = 0
    m.completions[key] = []
    a.submit(None, b"\xff" * 20, 1, 5, b"x", lambda st, why: m.completions[key].append((st, why)), 0.0)
    m.run(a)
    assert m.completions[0][0][0] is Status.INVALID
    msg = m.send(a, parse_nid("1.2.3.4@tcp7"))
    assert m.done(msg) == [(Status.NO_ROUTE, "no route to net tcp7")]


def test_submit_batch_pumps_once_keeps_order_and_completes_each_message_once() -> None:
    m = Mesh()
    a = m.node("a", [A], peer_credits=4)
    m.node("g1", [G1])
    done: list[tuple[int, Status]] = []
    items = [(G1.to_bytes(), 1, 5, f"m{i}".encode(), (lambda st, why, i=i: done.append((i, st))), None, None) for i in range(10)]
    a.submit_batch(items, 0.0)
    peer = a.peer(G1)
    # Nothing was assigned during the batch: the peer's queue is pumped once, by take_actions.
    assert a.pump_held is False and len(peer.queue) == 10 and peer.credits.in_use == 0
    m.run(a)
    assert [p for _h, p in m.received] == [f"m{i}".encode() for i in range(10)]  # in submit order, each once
    assert done == [(i, Status.DELIVERED) for i in range(10)] and peer.credits.in_use == 0


def test_submit_batch_with_a_bad_destination_fails_that_one_and_releases_the_hold() -> None:
    m = Mesh()
    a = m.node("a", [A])
    m.node("g1", [G1])
    done: list[tuple[int, Status]] = []
    items = [(G1.to_bytes(), 1, 5, b"ok", lambda st, why: done.append((0, st)), None, None),
             (b"\xff" * 20, 1, 5, b"bad", lambda st, why: done.append((1, st)), None, None),
             (G1.to_bytes(), 1, 5, b"ok2", lambda st, why: done.append((2, st)), None, None)]
    a.submit_batch(items, 0.0)
    m.run(a)
    assert sorted(done) == [(0, Status.DELIVERED), (1, Status.INVALID), (2, Status.DELIVERED)]
    assert a.pump_held is False and [p for _h, p in m.received] == [b"ok", b"ok2"]
