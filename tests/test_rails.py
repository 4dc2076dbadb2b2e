"""Multi-rail (lu2k.core.rails): the policy table, and the node spreading, failing over and
rejoining rails -- pure, nodes wired in memory, a float for the clock."""

from __future__ import annotations

from typing import Any

import pytest

from lu2k import wire
from lu2k.core import Connect, NetParams, Node, NodeParams, OutMsg, Wake
from lu2k.core.rails import DEFAULT_CAPACITY, DEFAULT_RTT, RailMeter, RailSet, RailView, failover_target, pick, usable
from lu2k.core.states import MsgState
from lu2k.errors import Status
from lu2k.nid import Nid, parse_nid

from test_core_node import Mesh

# -- the policy, as a table ---------------------------------------------------------------------


def rail(down: bool = False, health: int = 1000, capacity: float = 1e6, rtt: float = 0.1, backlog: int = 0,
         base_rtt: float = 0.0) -> RailView:
    return RailView(down, health, capacity, rtt, backlog, base_rtt)


GEO = rail(capacity=20e6 / 8, rtt=0.6)
LEO = rail(capacity=50e6 / 8, rtt=0.04)

PICK_CASES = [
    # (rails, size, chosen index, why)
    ([GEO, LEO], 100, 1, "small message: lowest RTT"),
    ([LEO, GEO], 100, 0, "small message: lowest RTT, whatever the order"),
    ([GEO, LEO], 1 << 20, 1, "bulk, both idle: the one that finishes it first (more capacity)"),
    ([GEO, rail(capacity=50e6 / 8, rtt=0.04, backlog=8 << 20)], 1 << 20, 0, "bulk: LEO's backlog makes GEO finish first"),
    ([GEO, rail(capacity=50e6 / 8, rtt=0.04, backlog=2 << 20)], 1 << 20, 1, "bulk: GEO's extra round trip outweighs LEO's backlog"),
    ([rail(capacity=1e6, rtt=0.5, backlog=0), rail(capacity=1e6, rtt=2.0, base_rtt=0.1)], 1 << 20, 1,
     "bulk: the base RTT (no queueing) counts, not the smoothed one"),
    ([GEO, rail(down=True, capacity=50e6 / 8, rtt=0.04)], 100, 0, "a down rail takes nothing, small or bulk"),
    ([GEO, rail(health=800, capacity=50e6 / 8, rtt=0.04)], 1 << 20, 0, "health more than a margin below the best: out"),
    ([GEO, rail(health=900, capacity=50e6 / 8, rtt=0.04)], 100, 1, "health within the margin: still in"),
    ([rail(down=True, health=500), rail(down=True, health=700)], 100, 1, "all down: the healthiest (it waits there)"),
    ([rail(capacity=1e6), rail(capacity=1e6)], 1 << 20, 0, "a tie goes to the earlier rail"),
]


@pytest.mark.parametrize("rails,size,want,why", PICK_CASES, ids=[c[3] for c in PICK_CASES])
def test_pick_table(rails: list[RailView], size: int, want: int, why: str) -> None:
    assert pick(rails, size) == want, why


def test_bulk_spreads_in_proportion_to_capacity() -> None:
    caps = [20e6 / 8, 50e6 / 8]
    backlog = [0, 0]
    for _ in range(700):
        i = pick([rail(capacity=caps[0], backlog=backlog[0]), rail(capacity=caps[1], backlog=backlog[1])], 64 << 10)
        backlog[i] += 64 << 10
    share = backlog[1] / sum(backlog)
    assert abs(share - 50 / 70) < 0.01


def test_usable_and_failover_target() -> None:
    assert usable([], 100) == []
    assert usable([rail(), rail(down=True), rail(health=850)], 100) == [0]
    assert failover_target([GEO, LEO], 1, 1 << 20) == 0
    assert failover_target([GEO, LEO], 0, 100) == 1
    assert failover_target([GEO, rail(down=True)], 0, 100) is None
    assert failover_target([GEO], 0, 100) is None
    with pytest.raises(ValueError):
        pick([], 1)


def test_meter_rtt_goodput_and_defaults() -> None:
    m = RailMeter()
    assert (m.capacity, m.rtt) == (DEFAULT_CAPACITY, DEFAULT_RTT)
    m = RailMeter(profile_rate=1e6, profile_rtt=0.5)
    assert (m.capacity, m.rtt) == (1e6, 0.5)
    m.sent(1, 10.0)
    m.sent(2, 10.1)  # a probe is running: not timed
    m.acked(2, 100, 10.3)
    assert m.srtt == 0.0
    m.acked(1, 100, 10.4)
    assert m.srtt == pytest.approx(0.4) and m.rtt == pytest.approx(0.4)
    # goodput: 4 MiB acknowledged over 2 s -> 2 MiB/s, which raises the capacity above the profile's
    t = 11.0
    for _ in range(64):
        m.acked(0, 64 << 10, t)
        t += 1 / 32
    m.acked(0, 0, t)
    assert m.rate > 1e6 and m.capacity == m.rate
    m.lost()
    assert m.probe_seq == 0


def test_railset_keeps_order_and_drops_repeats() -> None:
    a, b = parse_nid("10.0.0.1@tcp"), parse_nid("10.1.0.1@tcp1")
    rs = RailSet(a, [b, a, b])
    assert rs.nids == [a, b] and rs.next_seq == 1 and "2 rails" in repr(rs)


# -- the node with two rails ----------------------------------------------------------------------

SA, SB = parse_nid("10.0.0.1@tcp"), parse_nid("10.1.0.1@tcp1")  # sender, one NID per net
RA, RB = parse_nid("10.0.0.2@tcp"), parse_nid("10.1.0.2@tcp1")  # receiver, one NID per net


class RailMesh(Mesh):
    """Mesh whose hellos carry the multi-rail flag, with nets that can be cut: a connect on a
    cut net fails, and frames written on it are lost."""

    def __init__(self) -> None:
        super().__init__()
        self.cut: set[Any] = set()

    def do(self, node: Node, a: Any) -> None:
        if isinstance(a, Connect):
            if a.conn.peer.nid.net in self.cut:
                node.connect_failed(a.conn, a.attempt, "link down", self.now)
                return
            peer = self.nodes[a.host]
            result = wire.HelloResult(a.conn.peer.ni.nid, a.conn.peer.nid, a.conn.ctype, node.incarnation, 1,
                                      multirail=a.conn.peer.rail is not None, pong_nids=True)
            inconn = peer.accepted(a.conn.peer.nid.net, result, self.now)
            self.links[(id(a.conn), a.attempt)] = (peer, inconn)
            self.back[id(inconn)] = (node, a.conn, a.attempt)
            node.connected(a.conn, a.attempt, peer.incarnation, self.now)
            return
        if isinstance(a, Wake) and a.conn.peer.nid.net in self.cut:
            while (batch := node.next_batch(a.conn, self.now)) is not None:
                node.send_done(batch, self.now)  # gone into the void
            return
        super().do(node, a)


def two_rails(peer_credits: int = 8, rates: tuple[float, float] = (20e6 / 8, 50e6 / 8),
              rtts: tuple[float, float] = (0.6, 0.04)) -> tuple[RailMesh, Node, Node]:
    m = RailMesh()
    a = Node(NodeParams(incarnation=1))
    b = Node(NodeParams(incarnation=2))
    for node, nids in ((a, (SA, SB)), (b, (RA, RB))):
        for nid, rate, rtt in zip(nids, rates, rtts):
            node.add_net(NetParams(nid, 988, peer_credits=peer_credits, rate=rate, rtt=rtt))
            m.nodes[nid.host] = node
    a.set_rails({RA: [RA, RB]})
    b.set_rails({SA: [SA, SB]})
    return m, a, b


def send(m: RailMesh, a: Node, dst: Nid, payload: bytes) -> OutMsg:
    return m.send(a, dst, payload)


def test_bulk_goes_on_both_rails_and_small_on_the_low_rtt_one() -> None:
    m, a, b = two_rails(peer_credits=128)
    m.hold_deliveries = True  # nothing is acknowledged: the backlog builds up
    bulk = [send(m, a, RA, bytes([i]) * 65536) for i in range(70)]
    on = [x.peer.nid for x in bulk if x.peer is not None]
    # Earliest completion: the idle LEO rail takes bulk until its backlog outweighs GEO's extra
    # 560 ms of round trip (56 messages of 64 KiB at 50 Mbit/s), then both take it.
    assert on.count(SB) == 0 and on.count(RB) == 65 and on.count(RA) == 5
    small = send(m, a, RA, b"ping")
    assert small.conn is not None and small.conn.peer.nid == RB
    assert [x.seq for x in bulk + [small]] == list(range(1, 72))  # one sequence space for both rails
    m.hold_deliveries = False
    m.release_deliveries()
    assert all(m.done(x) == [(Status.DELIVERED, "delivered")] for x in bulk + [small])
    assert len(m.received) == 71
    assert len(b.sessions) == 1 and next(iter(b.sessions))[0] is None  # one session (one window) for both rails
    assert b.sessions[next(iter(b.sessions))].nids == {SA, SB}


def test_a_rail_that_dies_mid_transfer_costs_no_message_and_rejoins() -> None:
    m, a, b = two_rails(peer_credits=16)
    m.hold_deliveries = True  # the receiver has them, unanswered: in progress in its window
    early = [send(m, a, RA, bytes([i]) * 65536) for i in range(10)]
    leo = a.peer(RB)
    conn = next(iter(leo.conns.values()))
    m.cut.add(RB.net)  # from here, what the LEO rail sends is lost
    late = [send(m, a, RA, bytes([100 + i]) * 65536) for i in range(30)]
    everything = early + late
    stuck = [x for x in everything if x.conn is not None and x.conn.peer is leo]
    assert any(x in stuck for x in early) and any(x in stuck for x in late)
    assert all(x.state is MsgState.SENT for x in stuck)
    a.connection_lost(conn, conn.attempt, "link down", 1.0)  # the transport noticed
    m.now = 1.0
    m.run(a)
    assert leo.rail_down and a.stats["rail_failovers"] == 1 and leo.meter is not None and leo.meter.resent_away >= len(stuck)
    assert all(x.conn is not None and x.conn.peer.nid == RA for x in stuck)  # resent on the GEO rail
    m.hold_deliveries = False
    m.release_deliveries()
    assert all(m.done(x) == [(Status.DELIVERED, "delivered")] for x in everything), [m.done(x) for x in everything]
    payloads = sorted(p for _, p in m.received)
    assert payloads == sorted(bytes(x.payload) for x in everything)  # each delivered exactly once
    assert b.stats["duplicates"] >= sum(1 for x in early if x in stuck)  # copies answered from the one window
    # While the rail is down, everything goes on the other one; a probe keeps it reconnecting.
    x = send(m, a, RA, b"small")
    assert x.conn is not None and x.conn.peer.nid == RA
    assert any(p.target == "rail probe" for p in conn.pings.values())
    m.cut.discard(RB.net)
    for p in (a.peer(RA), a.peer(RB)):
        assert p.meter is not None
        p.meter.srtt = 0.0  # the samples so far timed the test's own pauses: back to the profiles' RTTs
    for t in (2.0, 5.0, 15.0, 40.0):
        m.tick(a, t)
    assert not leo.rail_down  # the probe reconnected it
    y = send(m, a, RA, b"small again")
    assert y.conn is not None and y.conn.peer.nid == RB  # and it rejoined
    assert m.done(y) == [(Status.DELIVERED, "delivered")] and a.pending_messages() == 0


def test_receiver_keeps_per_nid_sessions_without_the_flag_and_rails_reconfigure() -> None:
    m, a, b = two_rails()
    a.set_rails({})  # the sender is no longer multi-rail: per-NID sequence spaces, per-NID sessions
    send(m, a, RA, b"1")
    send(m, a, RB, b"2")
    assert sorted(str(k[0]) for k in b.sessions) == sorted([str(SA), str(SB)])
    a.set_rails({RA: [RB]})
    assert a.peer(RA).rail is not None and a.peer(RA).inflight is a.peer(RB).inflight
    # The new rail set continues above the numbers its NIDs used (1 on each): the receiver still
    # holds those windows, and a restart at 1 would be answered from them without a delivery.
    assert a.peer(RA).rail.next_seq == 2  # type: ignore[union-attr]
    send(m, a, RA, b"3")
    assert len(m.received) == 3


def test_a_rail_that_never_connects_leaves_its_queue_to_the_other() -> None:
    m, a, b = two_rails(peer_credits=4)
    m.cut.add(RB.net)
    msgs = [send(m, a, RA, bytes([1]) * 65536) for _ in range(12)]
    m.run(a)
    assert all(m.done(x) == [(Status.DELIVERED, "delivered")] for x in msgs)
    assert len(m.received) == 12 and a.peer(RB).rail_down


def test_a_pong_lists_the_peers_nids_for_discover() -> None:
    m, a, b = two_rails()
    a.set_rails({})
    a.ping(RA, 7, 5.0, 0.0)
    m.run(a)
    assert [(p.token, p.error, p.nids) for p in m.pings] == [(7, "", (RA, RB))]


def test_pong_nids_on_the_wire() -> None:
    raw = wire.encode_nids([RA.to_bytes(), RB.to_bytes()])
    assert wire.decode_nids(raw) == [RA, RB]
    with pytest.raises(wire.FrameError, match="not a list of NIDs"):
        wire.decode_nids(raw[:-1])
    with pytest.raises(wire.FrameError, match="bad NID"):
        wire.decode_nids(bytes(len(raw)) + b"\xff" * 20)


def test_a_rail_that_failed_twice_rejoins_when_it_reconnects() -> None:
    m, a, b = two_rails()
    send(m, a, RA, b"x")
    leo = a.peer(RB)
    for t in (1.0, 2.0):
        conn = next(iter(leo.conns.values()))
        if conn.state.value == "up":
            a.connection_lost(conn, conn.attempt, "reset", t)
        m.now = t
        m.run(a)
        leo.health.failure(t)  # and once more: well below the margin
    assert leo.health.value < 900
    m.tick(a, 30.0)
    assert not leo.rail_down and leo.health.value >= 900
    y = send(m, a, RA, b"small")
    assert y.conn is not None and y.conn.peer is leo


@pytest.mark.parametrize("sizes,size,want", [
    ([], 10, 0),
    ([65536, 65536], 10, 0),  # small jumps the bulk
    ([10, 20, 65536, 65536], 10, 2),  # ... but not the small ones already ahead
    ([65536, 10], 10, 2),  # the queue ends small: at the end, order kept
    ([10, 65536], 65536, 2),  # bulk always at the end
])
def test_queue_slot(sizes: list[int], size: int, want: int) -> None:
    from lu2k.core.rails import queue_slot

    assert queue_slot(len(sizes), sizes.__getitem__, size) == want


def test_small_messages_wait_for_a_credit_not_behind_the_bulk() -> None:
    m, a, b = two_rails(peer_credits=2)
    m.hold_deliveries = True
    bulk = [send(m, a, RA, bytes([i]) * 65536) for i in range(12)]
    leo = a.peer(RB)
    assert len(leo.queue) >= 2
    small = send(m, a, RA, b"hi")
    assert leo.queue[0] is small and small.state is MsgState.QUEUED
    m.hold_deliveries = False
    m.release_deliveries()
    assert all(m.done(x) == [(Status.DELIVERED, "delivered")] for x in bulk + [small])
    order = [p for _, p in m.received]
    assert order.index(b"hi") < len(order) - 1  # it overtook bulk that was queued before it


def test_small_messages_go_ahead_in_the_send_queue_too() -> None:
    m, a, b = two_rails(peer_credits=64)
    leo = a.peer(RB)
    bulk = [a.submit(None, RA.to_bytes(), 1, 5, bytes(65536), None, 0.0) for _ in range(6)]
    small = a.submit(None, RA.to_bytes(), 1, 5, b"hi", None, 0.0)
    conn = small.conn
    assert conn is not None and conn.peer is leo and conn.queue[0] is small
    assert [x for x in conn.queue if x is not small] == [x for x in bulk if x.conn is conn]


def test_an_answered_message_whose_send_is_stuck_resets_that_connection_at_its_deadline() -> None:
    # A copy resent on another rail can be answered while the first send still blocks (the
    # rail stopped reading); the completion waits for the payload, so the stuck connection
    # must go at the message's deadline (found by the simulator, seed 19799).
    m, a, b = two_rails()
    m.hold_sends = True
    msg = send(m, a, RA, b"stuck")
    assert msg.state is MsgState.DONE and msg.busy == 1 and m.done(msg) == []
    m.hold_sends = False
    m.tick(a, 49.0)
    assert m.done(msg) == []
    m.tick(a, 51.0)  # past the transaction timeout: the connection is reset, the send aborted
    assert m.done(msg) == [(Status.DELIVERED, "delivered")] and a.pending_messages() == 0


def test_messages_moved_off_a_rail_leave_its_send_queue() -> None:
    m, a, b = two_rails(peer_credits=8)
    m.cut.add(RB.net)
    m.hold_deliveries = True  # the moved messages stay SENT on the GEO rail
    msgs = [send(m, a, RA, bytes([1]) * 65536) for _ in range(8)]
    leo = a.peer(RB)
    assert leo.rail_down and all(x.state is MsgState.SENT and x.conn is not None and x.conn.peer.nid == RA for x in msgs)
    conn = next(iter(leo.conns.values()))
    assert all(x.conn is conn for x in conn.queue)  # nothing of theirs left behind
    m.cut.discard(RB.net)
    for t in (1.0, 5.0, 15.0, 40.0):  # the LEO rail reconnects and writes: none of them goes out twice
        m.tick(a, t)
    assert not leo.rail_down
    m.hold_deliveries = False
    m.release_deliveries()
    assert all(m.done(x) == [(Status.DELIVERED, "delivered")] for x in msgs) and len(m.received) == 8
