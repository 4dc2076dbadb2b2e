"""Security findings of issue 13 in the pure message core: a misbehaving peer or endpoint
must not make another's messages be delivered twice, stall, or miss their timeouts.

The nodes are wired in memory by ``test_core_node.Mesh`` (actions carried out at once, a
float for the clock).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from lu2k import wire
from lu2k.core import Connect, ConnState, Deliver, Delivery, InConn, Node, Wake
from lu2k.core.node import PEER_IDLE_TIMEOUT, PEER_SWEEP_MIN, SESSION_IDLE_TIMEOUT, dest_reserve
from lu2k.errors import Status
from lu2k.nid import parse_nid

sys.path.insert(0, str(Path(__file__).parent))
from test_core_node import A, G1, Mesh  # noqa: E402


def impostor_hello(g: Node, nid: object, incarnation: int, now: float) -> InConn:
    """A key holder finishes a hello at ``g`` claiming ``nid`` with ``incarnation``."""
    result = wire.HelloResult(nid, G1, wire.ConnType.ANY, incarnation, wire.PROTOCOL_VERSION)  # type: ignore[arg-type]
    return g.accepted(G1.net, result, now)


def test_a_rehello_as_another_incarnation_does_not_make_the_real_peer_deliver_twice() -> None:
    """Finding 7: a key holder re-helloing as A with a new incarnation dropped A's dedupe
    session; A's resend of a message already delivered (its ACK lost with the connection)
    was delivered a second time."""
    m = Mesh()
    a = m.node("a", [A])
    g = m.node("g", [G1])
    m.hold_deliveries = True
    msg = m.send(a, G1, b"once")
    assert msg.conn is not None
    impostor_hello(g, A, 0xBAD, 1.0)  # closes A's connections: they look stale now
    m.run(g)
    assert m.closed_in  # A's connection was closed
    m.release_deliveries()  # delivered, but the connection its ACK would go on is gone
    m.hold_deliveries = False
    assert m.received == [("10.0.0.2", b"once")]
    a.connection_lost(msg.conn, msg.conn.attempt, "closed by peer", 1.0)
    m.tick(a, 1.2)  # A reconnects as the same incarnation and resends
    assert m.received == [("10.0.0.2", b"once")] and g.stats["duplicates"] == 1
    assert m.done(msg) == [(Status.DELIVERED, "delivered")]


def test_sessions_without_connections_expire() -> None:
    """Finding 7: inbound sessions per (NID, incarnation) never expired."""
    m = Mesh()
    g = m.node("g", [G1], transaction_timeout=10.0)
    c1 = impostor_hello(g, A, 1, 0.0)
    c2 = impostor_hello(g, A, 2, 1.0)  # a real restart of A: the old window stays for now
    assert set(g.sessions) == {(A, 1), (A, 2)} and not c1.alive
    g.inbound_lost(c2)  # both idle since 1.0
    impostor_hello(g, parse_nid("10.0.0.7@tcp"), 5, 1.0 + SESSION_IDLE_TIMEOUT)
    assert set(g.sessions) == {(A, 1), (A, 2), (parse_nid("10.0.0.7@tcp"), 5)}  # idle for exactly the timeout
    impostor_hello(g, parse_nid("10.0.0.8@tcp"), 6, 1.5 + SESSION_IDLE_TIMEOUT)
    assert (A, 1) not in g.sessions and (A, 2) not in g.sessions and g.stats["sessions_expired"] == 2


class StuckPortalMesh(Mesh):
    """Deliveries to portal 7 are never answered: its endpoint stopped releasing buffers."""

    def do(self, node: Node, a: Any) -> None:
        if isinstance(a, Deliver) and a.delivery.dst_portal == 7:
            self.held_deliveries.append((node, a.delivery))
            return
        super().do(node, a)


def test_a_stuck_receiver_does_not_starve_other_endpoints_of_credits() -> None:
    """Finding 6, sender side: messages to a receiver that stopped releasing its buffers
    held every peer credit; other endpoints' messages to the same peer then waited and failed."""
    m = StuckPortalMesh()
    a = m.node("a", [A], peer_credits=8, transaction_timeout=10.0)
    g = m.node("g", [G1])
    stuck = [m.send(a, G1, b"s", portal=7) for _ in range(20)]
    fine = [m.send(a, G1, b"f", portal=5) for _ in range(5)]
    assert [m.done(x) for x in fine] == [[(Status.DELIVERED, "delivered")]] * 5
    peer = a.peer(G1)
    assert peer.credits.in_use == peer.dest_cap == 6 and len(m.held_deliveries) == 6
    m.tick(a, 10.0)  # every stuck message meets its transaction timeout, in flight or waiting
    assert all(len(m.done(x)) == 1 and m.done(x)[0][0] is Status.TIMED_OUT for x in stuck)
    assert "no acknowledgement" in m.done(stuck[0])[0][1] and "waited for credits" in m.done(stuck[-1])[0][1]
    assert peer.credits.in_use == 0 and not peer.by_dest and not peer.parked and a.nis[A.net].queued == 0
    assert g is not None


def test_a_stuck_receiver_cannot_fill_the_connection_the_others_use() -> None:
    """Finding 6: with many credits, one stuck receiver's deliveries reached the receiving
    daemon's bound (max_pending_deliveries): it stopped reading the connection, and every
    other endpoint's traffic on it stalled."""
    m = StuckPortalMesh()
    a = m.node("a", [A], peer_credits=256)
    g = m.node("g", [G1])
    stuck = [m.send(a, G1, b"s", portal=7) for _ in range(200)]
    inconn = next(iter(g.sessions.values())).conns[0]
    assert not inconn.blocked and inconn.pending == a.peer(G1).dest_cap == 48
    fine = m.send(a, G1, b"f", portal=5)
    assert m.done(fine) == [(Status.DELIVERED, "delivered")]
    released = 0
    while m.held_deliveries:  # the receiver wakes up: the parked messages follow, in order
        released += len(m.held_deliveries)
        m.release_deliveries()  # (Mesh answers portal 7 as "no endpoint": any answer will do)
    assert released == 200 and all(len(m.done(x)) == 1 for x in stuck) and not a.peer(G1).parked


def test_a_destination_that_answers_is_not_held_to_its_share() -> None:
    """The share binds only a destination that stopped acknowledging: one that answers may
    have all the credits in flight (a long link needs them), and is held again once it has
    been silent for dest_stall."""
    m = StuckPortalMesh()
    a = m.node("a", [A], peer_credits=256)
    m.node("g", [G1])
    assert m.done(m.send(a, G1, b"first", portal=5)) == [(Status.DELIVERED, "delivered")]  # portal 5 answers
    m.hold_deliveries = True  # from here nothing is answered (in flight, unacknowledged)
    burst = [m.send(a, G1, b"b", portal=5) for _ in range(200)]
    peer = a.peer(G1)
    assert peer.dest_cap == 48 and peer.by_dest[(G1.to_bytes(), 5)] == 200 and all(x.conn is not None for x in burst)
    m.now = peer.dest_stall + 0.5  # no acknowledgement since: the share binds again
    late = m.send(a, G1, b"late", portal=5)
    assert late.conn is None and list(peer.parked[(G1.to_bytes(), 5)]) == [late]


class StopsAnsweringMesh(Mesh):
    """Portal 7 has an endpoint too, which answers until ``portal7_stuck`` is set, then never again."""

    portal7_stuck = False

    def do(self, node: Node, a: Any) -> None:
        if isinstance(a, Deliver) and a.delivery.dst_portal == 7 and self.portal7_stuck:
            self.held_deliveries.append((node, a.delivery))
            return
        super().do(node, a)

    def answer(self, node: Node, d: Delivery, status: Status = Status.DELIVERED) -> None:
        if d.dst_portal == 7 and status is Status.DELIVERED:
            node.delivered(d, Status.DELIVERED, "", self.now)
        else:
            super().answer(node, d, status)


def test_a_destination_that_answered_then_stopped_leaves_the_reserve_to_the_others() -> None:
    """A destination that had just answered may go past its share, but not into the reserve:
    it stopped with all the credits in flight, and another endpoint's messages to the same
    peer waited for its transaction timeouts."""
    m = StopsAnsweringMesh()
    a = m.node("a", [A], peer_credits=8, transaction_timeout=6.0)
    m.node("g", [G1])
    assert m.done(m.send(a, G1, b"first", portal=7)) == [(Status.DELIVERED, "delivered")]
    m.portal7_stuck = True
    stuck = [m.send(a, G1, b"s", portal=7) for _ in range(30)]
    peer = a.peer(G1)
    assert peer.dest_reserve == 2 and peer.by_dest[(G1.to_bytes(), 7)] == peer.dest_cap_answering == 6
    fine = [m.send(a, G1, b"f", portal=5) for _ in range(20)]
    assert [m.done(x) for x in fine] == [[(Status.DELIVERED, "delivered")]] * 20
    assert not any(m.done(x) for x in stuck)
    m.tick(a, 6.0)
    assert all(len(m.done(x)) == 1 and m.done(x)[0][0] is Status.TIMED_OUT for x in stuck)


def test_a_message_given_credits_just_before_its_deadline_times_out_as_waiting() -> None:
    """One message's timeout freed the credit the next one waited for; that one met its own
    deadline a moment later, before its connection's writer ran, and failed NO_ROUTE ("no
    connection") although the connection was up."""
    m = Mesh()
    a = m.node("a", [A], peer_credits=1, transaction_timeout=6.0)
    m.node("g", [G1])
    m.hold_deliveries = True
    first = m.send(a, G1)
    m.now = 0.001
    second = m.send(a, G1)
    a.handle_timer(6.0)  # the first times out; the second is given its credit ...
    actions = a.take_actions()
    assert second.conn is not None and second.conn.state is ConnState.UP and not second.transmitted
    for act in actions:
        if not isinstance(act, Wake):  # ... but its writer has not run yet
            m.do(a, act)
    m.tick(a, 6.001)
    assert m.done(first)[0][0] is Status.TIMED_OUT
    assert m.done(second) == [(Status.TIMED_OUT, "waited to be sent to 10.0.0.2@tcp past the transaction timeout")]


@pytest.mark.parametrize(("credits", "reserve"), [(1, 0), (4, 1), (8, 2), (64, 16), (256, 16), (4096, 256)])
def test_the_reserve_is_a_quarter_of_few_credits_and_a_sixteenth_of_many(credits: int, reserve: int) -> None:
    assert dest_reserve(credits) == reserve


def test_a_peer_dropped_and_used_again_does_not_restart_its_sequence_numbers() -> None:
    """``lu2kctl peer del`` then a new message: the new peer started again at sequence 1 in
    the same session, and the receiver answered it from its dedupe window -- DELIVERED
    for a message that was never delivered."""
    m = Mesh()
    a = m.node("a", [A])
    m.node("g", [G1])
    first = m.send(a, G1, b"first")
    a.drop_peer(G1, "peer deleted")
    m.run(a)
    second = m.send(a, G1, b"second")
    assert [m.done(x) for x in (first, second)] == [[(Status.DELIVERED, "delivered")]] * 2
    assert m.received == [("10.0.0.2", b"first"), ("10.0.0.2", b"second")]


def send_with_id(m: Mesh, node: Node, payload: bytes, msg_id: int | None) -> Any:
    key = len(m.completions)
    m.completions[key] = []
    msg = node.submit(None, G1.to_bytes(), 1, 5, payload, lambda st, why: m.completions[key].append((st, why)), m.now,
                      msg_id=msg_id)
    msg.owner = key
    m.run(node)
    return msg


def test_a_resend_with_the_same_id_after_the_sending_daemon_restarted_is_not_delivered_twice() -> None:
    """Finding 11: after a crash of the sending daemon its application cannot know what was
    delivered; resending made duplicates.  With an id, the receiver recognises the copy."""
    m = Mesh()
    a = m.node("a", [A])
    g = m.node("g", [G1])
    send_with_id(m, a, b"with id", 42)
    send_with_id(m, a, b"no id", None)
    assert len(m.received) == 2
    a2 = m.node("a", [A])  # the sending daemon, restarted: a new incarnation, a new session at g
    assert a2.incarnation != a.incarnation
    again = send_with_id(m, a2, b"with id", 42)
    assert m.done(again) == [(Status.DELIVERED, "delivered")]  # answered from the id memory
    assert m.received == [("10.0.0.2", b"with id"), ("10.0.0.2", b"no id")] and g.stats["duplicates_by_id"] == 1
    send_with_id(m, a2, b"no id", None)  # without an id the resend is a new message
    other = send_with_id(m, a2, b"another id", 43)
    assert m.received[2:] == [("10.0.0.2", b"no id"), ("10.0.0.2", b"another id")] and m.done(other)[0][0] is Status.DELIVERED


def test_an_id_whose_first_copy_failed_or_is_still_being_delivered() -> None:
    m = Mesh()
    a = m.node("a", [A])
    g = m.node("g", [G1])
    m.hold_deliveries = True
    first = send_with_id(m, a, b"slow", 7)
    a2 = m.node("a", [A])
    copy = send_with_id(m, a2, b"slow", 7)  # arrives while the first still waits for its endpoint
    assert m.done(copy) == [] and len(m.held_deliveries) == 1
    m.release_deliveries()
    assert m.done(copy) == [(Status.DELIVERED, "delivered")] and m.received == [("10.0.0.2", b"slow")]
    assert g.stats["duplicates_by_id"] == 1 and first.msg_id == 7
    m.hold_deliveries = False
    refused = a2.submit(None, G1.to_bytes(), 1, 9, b"x", lambda st, why: None, m.now, msg_id=8)  # portal 9: no endpoint
    m.run(a2)
    assert refused.status is Status.NO_RECEIVER and (A.to_bytes(), 1, 8) not in g.app_ids._done


def test_unreachable_peers_stop_reconnecting_once_nothing_waits_for_them() -> None:
    """Finding 9: every distinct unreachable NID became a peer that reconnected forever."""
    m = Mesh()
    a = m.node("a", [A], transaction_timeout=5.0)
    nids = [parse_nid(f"10.0.9.{i}@tcp") for i in range(1, 101)]
    for nid in nids:
        m.nodes[nid.host] = a
        m.refuse[nid.host] = None  # type: ignore[assignment]
        m.send(a, nid)
    m.tick(a, 5.0)  # every message fails NO_ROUTE at its transaction timeout
    assert a.pending_messages() == 0 and a.get_timer() is None
    connects = 0
    for t in (10.0, 100.0, 1000.0):
        a.handle_timer(t)
        connects += sum(1 for x in a.take_actions() if isinstance(x, Connect))
    assert connects == 0


def _unreachable(m: Mesh, node: Node, prefix: int, i: int) -> Any:
    nid = parse_nid(f"10.{prefix}.{i // 250}.{i % 250 + 1}@tcp")
    m.nodes[nid.host] = node
    m.refuse[nid.host] = None  # type: ignore[assignment]
    return nid


def test_idle_peers_are_forgotten_and_their_numbers_kept_while_a_receiver_may_remember() -> None:
    """Finding 9: 8 000 distinct unreachable NIDs stayed in the peer table for ever.  A peer
    idle for PEER_IDLE_TIMEOUT is forgotten when the table has grown; its next sequence number
    is kept as long as a receiver may still hold our session, then forgotten too."""
    m = Mesh()
    a = m.node("a", [A], transaction_timeout=5.0)
    m.node("g", [G1])
    first = m.send(a, G1, b"before")  # a real peer, then idle
    for i in range(PEER_SWEEP_MIN):
        m.send(a, _unreachable(m, a, 9, i))
    m.tick(a, 5.0)
    peers = a.nis[A.net].peers
    assert len(peers) == PEER_SWEEP_MIN + 1 and m.done(first) == [(Status.DELIVERED, "delivered")]
    for conn in list(peers[G1].conns.values()):  # G1's connection closes while idle (a peer with one up stays)
        a.connection_lost(conn, conn.attempt, "closed by peer", 6.0)
    m.tick(a, 5.0 + PEER_IDLE_TIMEOUT)
    newcomer = _unreachable(m, a, 9, 999)
    m.send(a, newcomer)  # a new peer: the table is looked through first
    assert set(peers) == {newcomer} and a.stats["peers_forgotten"] == PEER_SWEEP_MIN + 1
    second = m.send(a, G1, b"after")  # G1 again: numbering continues, so G answers nothing from its window
    assert m.done(second) == [(Status.DELIVERED, "delivered")]
    assert m.received == [("10.0.0.2", b"before"), ("10.0.0.2", b"after")]
    # Long after, the kept numbers of the forgotten ones go too (every receiver let go of us).
    m.tick(a, 5.0 + 4 * SESSION_IDLE_TIMEOUT)
    for i in range(PEER_SWEEP_MIN):
        m.send(a, _unreachable(m, a, 8, i))
    assert _unreachable(m, a, 9, 0) not in a._dropped_seq and a.stats["peers_forgotten"] > PEER_SWEEP_MIN + 1
