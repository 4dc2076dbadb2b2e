"""The return path through NAT (lu2k.core.returnpath), pure: two nodes wired in memory, a float
for the clock.  The inside node can connect out; nobody can connect to it (``nat``).  The
outside node sends to INSIDE over the reverse direction of INSIDE's own connection."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest

from lu2k import wire
from lu2k.core import (
    AbortRx, Adopt, Close, CloseIn, Complete, Connect, ConnState, Deliver, InConn, NetParams, Node, NodeParams, OutConn,
    PingDone, Resume, SendIn, Wake,
)
from lu2k.core.returnpath import KEEPALIVE_TOKEN, PathSettings, ReturnPath, parse_keepalive, parse_path_settings, parse_return_path
from lu2k.core.states import CONN_TRANSITIONS, ConnEvent, conn_next
from lu2k.errors import ConfigError, Status
from lu2k.nid import parse_nid
from lu2k.wire import ConnType

sys.path.insert(0, str(Path(__file__).parent))
from test_core_node import ConnectsHeld  # noqa: E402

INSIDE, OUTSIDE = parse_nid("10.0.0.1@tcp"), parse_nid("10.0.0.2@tcp")


def frames_of(batch_frames: list[tuple[bytes, Any]]) -> list[wire.Frame]:
    out = []
    for header, payload in batch_frames:
        h = wire.decode_header(header[: wire.peek_header_size(header[: wire.BASE_SIZE])], 1 << 20)
        out.append(wire.Frame(h, bytes(payload) if len(payload) else header[h.size :]))
    return out


class Link:
    def __init__(self, src: Node, conn: OutConn, attempt: int, dst: Node, inconn: InConn) -> None:
        self.src, self.conn, self.attempt, self.dst, self.inconn = src, conn, attempt, dst, inconn
        self.alive = True
        self.cut = False  # frames vanish; nobody is told (a NAT that forgot the binding)

    @property
    def carries(self) -> bool:
        return self.alive and not self.cut


class World:
    """Actions carried out at once, in order.  ``nat`` hosts refuse every connect;
    ``drop_answers`` loses the answers the inside node sends (to force resends)."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.now = 0.0
        self.nat: set[str] = set()
        self.links: dict[tuple[int, int], Link] = {}  # (id(OutConn), attempt) -> link it opened
        self.by_in: dict[int, Link] = {}
        self.rev: dict[tuple[int, int], Link] = {}  # adopted: (id(OutConn), attempt) -> link it rides
        self.completions: dict[int, list[Status]] = {}
        self.received: list[tuple[str, bytes]] = []
        self.connects: list[tuple[str, str]] = []
        self.pings: list[PingDone] = []
        self.drop_answers = False
        self.hold_sends = False  # batches stay in their send (frames carried, payloads still read)
        self.held_sends: list[tuple[Node, Any]] = []

    def node(self, name: str, nid: Any, **params: Any) -> Node:
        n = Node(NodeParams(incarnation=len(self.nodes) + 1, reconnect_min=0.1, reconnect_max=0.4, **params))
        n.add_net(NetParams(nid, 988))
        self.nodes[nid.host] = n
        return n

    def name(self, node: Node) -> str:
        return next(h for h, n in self.nodes.items() if n is node)

    def send(self, node: Node, dst: Any, payload: bytes = b"x") -> int:
        key = len(self.completions)
        self.completions[key] = []
        node.submit(None, dst.to_bytes(), 1, 5, payload, lambda st, why: self.completions[key].append(st), self.now)
        self.run(node)
        return key

    def tick(self, to: float) -> None:
        while True:
            due = [(t, n) for n in self.nodes.values() if (t := n.get_timer()) is not None and t <= to]
            if not due:
                break
            t, n = min(due, key=lambda x: x[0])
            self.now = max(self.now, t)
            n.handle_timer(self.now)
            self.run(n)
        self.now = to

    def run(self, node: Node) -> None:
        while actions := node.take_actions():
            for a in actions:
                self.do(node, a)

    def do(self, node: Node, a: Any) -> None:
        if isinstance(a, Complete):
            assert a.msg.on_finish is not None
            a.msg.on_finish(a.status, a.reason)
        elif isinstance(a, Connect):
            self.connects.append((self.name(node), a.host))
            if a.host in self.nat:
                node.connect_failed(a.conn, a.attempt, "connect timed out", self.now)
                return
            peer = self.nodes[a.host]
            result = wire.HelloResult(a.conn.peer.ni.nid, a.conn.peer.nid, a.conn.ctype, node.incarnation, 1)
            inconn = peer.accepted(a.conn.peer.nid.net, result, self.now)
            made = self.links[(id(a.conn), a.attempt)] = Link(node, a.conn, a.attempt, peer, inconn)
            self.by_in[id(inconn)] = made
            self.run(peer)
            node.connected(a.conn, a.attempt, peer.incarnation, self.now)
        elif isinstance(a, Adopt):
            self.rev[(id(a.conn), a.attempt)] = self.by_in[id(a.via)]
        elif isinstance(a, Wake):
            self.write(node, a.conn)
        elif isinstance(a, SendIn):
            link: Link | None = self.by_in.get(id(a.conn))
            frames = frames_of([(f, b"") for f in a.frames])
            if link is not None:  # answers on the reverse direction of a connection we accepted
                if link.carries:
                    link.src.frames_received(link.conn, link.attempt, frames, self.now)
                    self.run(link.src)
            else:  # answers to requests that came on our own connection's reverse direction
                assert a.conn.out is not None
                own = self.links[(id(a.conn.out), a.conn.out.attempt)]
                if own.carries and not self.drop_answers:
                    own.dst.inbound_frames(own.inconn, frames, self.now)
                    self.run(own.dst)
        elif isinstance(a, Deliver):
            self.received.append((self.name(node), bytes(a.delivery.payload)))
            node.delivered(a.delivery, Status.DELIVERED, "", self.now)
        elif isinstance(a, PingDone):
            self.pings.append(a)
        elif isinstance(a, Close):
            if a.detach:  # stop riding the peer's connection; it lives on
                self.rev.pop((id(a.conn), a.attempt), None)
                return
            gone = self.links.get((id(a.conn), a.attempt)) or self.rev.get((id(a.conn), a.attempt))
            if gone is not None:
                self.kill(gone, a.reason)
        elif isinstance(a, CloseIn):
            closed = self.by_in.get(id(a.conn))
            if closed is None and a.conn.out is not None:
                closed = self.links.get((id(a.conn.out), a.conn.out.attempt))
            if closed is not None:
                self.kill(closed, a.reason)
        elif isinstance(a, (Resume, AbortRx)):
            pass

    def release_sends(self) -> None:
        self.hold_sends = False
        held, self.held_sends = self.held_sends, []
        for node, batch in held:
            node.send_done(batch, self.now)
            self.run(node)

    def kill(self, link: Link, reason: str) -> None:
        """The transport is gone: both sides learn it."""
        if not link.alive:
            return
        link.alive = False
        link.src.connection_lost(link.conn, link.attempt, reason, self.now)
        link.dst.inbound_lost(link.inconn)
        self.run(link.src)
        self.run(link.dst)

    def write(self, node: Node, conn: OutConn) -> None:
        while (batch := node.next_batch(conn, self.now)) is not None:
            frames = frames_of(batch.frames)
            own = self.links.get((id(conn), batch.attempt))
            rode = self.rev.get((id(conn), batch.attempt))
            if own is not None and own.carries:
                own.dst.inbound_frames(own.inconn, frames, self.now)
                node.send_done(batch, self.now)
                self.run(own.dst)
            elif rode is not None and rode.carries:
                rode.src.frames_received(rode.conn, rode.attempt, frames, self.now)  # backwards, to the inside node
                if self.hold_sends:
                    self.held_sends.append((node, batch))
                    self.run(rode.src)
                    return
                node.send_done(batch, self.now)
                self.run(rode.src)
            elif any(lk is not None and lk.alive for lk in (own, rode)):
                node.send_done(batch, self.now)  # cut: the frames vanish on the way
            else:
                node.send_done(batch, self.now, "gone")


def inside_outside(mode: ReturnPath | None, keepalive: float = 1.0) -> tuple[World, Node, Node]:
    w = World()
    inside = w.node("i", INSIDE, transaction_timeout=5.0)
    outside = w.node("o", OUTSIDE, transaction_timeout=5.0)
    w.nat.add(INSIDE.host)
    inside.set_return_paths({}, {OUTSIDE: PathSettings(keepalive=keepalive)})
    outside.set_return_paths({}, {INSIDE: PathSettings(return_path=mode)})
    w.run(inside)
    return w, inside, outside


# -- tables and settings --------------------------------------------------------------------------


def test_adopt_is_in_the_connection_table() -> None:
    assert conn_next(ConnState.IDLE, ConnEvent.ADOPT) is ConnState.UP
    assert conn_next(ConnState.BACKOFF, ConnEvent.ADOPT) is ConnState.UP
    assert conn_next(ConnState.CONNECTING, ConnEvent.ADOPT) is ConnState.UP  # the set-up in progress is abandoned
    assert ConnEvent.ADOPT not in CONN_TRANSITIONS[ConnState.UP] and ConnEvent.ADOPT not in CONN_TRANSITIONS[ConnState.CLOSED]


def test_settings_parse_and_bad_values_name_where() -> None:
    assert parse_return_path("reverse", "x") is ReturnPath.REVERSE
    assert parse_keepalive(15, "x") == 15.0 and parse_keepalive(False, "x") == 0.0 and parse_keepalive(0, "x") == 0.0
    with pytest.raises(ConfigError, match="peer.return_path.*one of connect, reverse, auto, not 'both'"):
        parse_return_path("both", "peer.return_path")
    for bad in (-1, "soon", True, float("inf"), 0.001):
        with pytest.raises(ConfigError, match="keepalive"):
            parse_keepalive(bad, "net.keepalive")
    got = parse_path_settings({"keepalive": "2.5"}, "net")
    assert got == PathSettings(None, 2.5)
    assert got.over(PathSettings(ReturnPath.CONNECT, 9.0)) == PathSettings(ReturnPath.CONNECT, 2.5)


# -- sending over the peer's connection -------------------------------------------------------------


def test_reverse_never_connects_in_and_delivers_over_the_inside_connection() -> None:
    w, inside, outside = inside_outside(ReturnPath.REVERSE)
    assert w.connects == [("10.0.0.1", "10.0.0.2")]  # held: the inside site connected with nothing to send
    keys = [w.send(outside, INSIDE, b"to the inside %d" % i) for i in range(20)]
    assert all(w.completions[k] == [Status.DELIVERED] for k in keys)
    assert sorted(p for _, p in w.received) == sorted(b"to the inside %d" % i for i in range(20))
    assert ("10.0.0.2", "10.0.0.1") not in w.connects and outside.stats["return_paths_adopted"] == 1
    peer = outside.peer(INSIDE)
    assert peer.credits.in_use == 0 and not peer.inflight and outside.nis[OUTSIDE.net].credits.in_use == 0
    # ... and the inside site's own traffic goes the usual way on the same connection.
    k = w.send(inside, OUTSIDE, b"out")
    assert w.completions[k] == [Status.DELIVERED] and ("10.0.0.2", b"out") in w.received


def test_auto_adopts_once_connecting_in_failed() -> None:
    w, inside, outside = inside_outside(None)  # default: auto
    k = w.send(outside, INSIDE)
    assert ("10.0.0.2", "10.0.0.1") in w.connects and w.completions[k] == []  # tried the usual way first
    w.tick(0.2)  # the next attempt, after the usual backoff, takes the peer's connection
    assert w.completions[k] == [Status.DELIVERED] and outside.stats["return_paths_adopted"] == 1


def test_connect_mode_never_uses_the_peer_connection() -> None:
    w, inside, outside = inside_outside(ReturnPath.CONNECT)
    k = w.send(outside, INSIDE)
    w.tick(6.0)
    assert w.completions[k] == [Status.NO_ROUTE] and not outside.stats["return_paths_adopted"] and w.received == []


def test_reverse_without_a_connection_from_the_peer_waits_then_fails_no_route() -> None:
    w = World()
    outside = w.node("o", OUTSIDE, transaction_timeout=2.0)
    outside.set_return_paths({INSIDE.net: PathSettings(return_path=ReturnPath.REVERSE)}, {})  # per net
    k = w.send(outside, INSIDE)
    w.tick(3.0)
    assert w.completions[k] == [Status.NO_ROUTE] and w.connects == []
    assert outside.peer(INSIDE).last_error == "waiting for 10.0.0.1@tcp to connect (return_path: reverse)"


def test_a_message_waiting_for_the_peer_goes_out_when_it_connects() -> None:
    w = World()
    inside = w.node("i", INSIDE)
    outside = w.node("o", OUTSIDE)
    w.nat.add(INSIDE.host)
    outside.set_return_paths({}, {INSIDE: PathSettings(return_path=ReturnPath.REVERSE)})
    k = w.send(outside, INSIDE, b"early")
    assert w.completions[k] == []
    inside.set_return_paths({}, {OUTSIDE: PathSettings(keepalive=1.0)})
    w.run(inside)
    assert w.completions[k] == [Status.DELIVERED] and w.received == [("10.0.0.1", b"early")]


def test_inside_connection_lost_means_resend_on_the_next_one_exactly_once() -> None:
    w, inside, outside = inside_outside(ReturnPath.REVERSE)
    w.drop_answers = True  # the inside site delivers, its ACK is lost with its connection
    k = w.send(outside, INSIDE, b"once")
    assert w.received == [("10.0.0.1", b"once")] and w.completions[k] == []
    w.drop_answers = False
    first = next(iter(w.links.values()))
    w.kill(first, "reset by the NAT")
    w.tick(1.0)  # the inside site reconnects (backoff), the outside site follows and resends
    assert sum(1 for lk in w.links.values() if lk.alive) == 1
    assert w.completions[k] == [Status.DELIVERED] and w.received == [("10.0.0.1", b"once")]  # answered from the window
    assert inside.stats["duplicates"] == 1 and outside.peer(INSIDE).credits.in_use == 0


def test_a_new_connection_from_the_peer_takes_over_a_stale_one() -> None:
    """Rebinding: the inside site's old connection is dead for it but the outside site has not
    noticed; the new one arrives and the outside site moves its traffic (and resends)."""
    w, inside, outside = inside_outside(ReturnPath.REVERSE)
    w.drop_answers = True
    k = w.send(outside, INSIDE, b"moved")
    w.drop_answers = False
    old = next(iter(w.links.values()))
    old.cut = True  # only the inside site learns of it
    inside.connection_lost(old.conn, old.attempt, "NAT forgot us", w.now)
    w.run(inside)
    w.tick(1.0)
    assert outside.stats["return_paths_rebound"] == 1 and outside.stats["return_paths_adopted"] == 2
    assert w.completions[k] == [Status.DELIVERED] and w.received == [("10.0.0.1", b"moved")]
    assert not old.inconn.alive  # the stale accepted connection was closed


def test_a_failed_write_on_the_peer_connection_closes_it_and_it_is_not_adopted_again() -> None:
    """After an outage the outside site wrote on the inside site's old connection (half open:
    its reader, waiting, had not noticed) and failed; the connection stayed alive in the core,
    was adopted again at once and failed again, ten times a second, until the daemon stopped."""
    w, inside, outside = inside_outside(None)  # auto
    k = w.send(outside, INSIDE)
    w.tick(0.2)
    assert w.completions[k] == [Status.DELIVERED] and outside.stats["return_paths_adopted"] == 1
    conn = next(c for c in outside.peer(INSIDE).conns.values() if c.via is not None)
    stale = conn.via
    assert stale is not None
    outside.connection_lost(conn, conn.attempt, "connection to 10.0.0.1:40000 closed", w.now)  # the runner's write failed
    w.run(outside)
    assert not stale.alive  # closed, and the inside site learns it (CloseIn)
    k = w.send(outside, INSIDE, b"after")
    w.tick(2.0)  # the inside site reconnects; the outside site rides the new connection
    assert w.completions[k] == [Status.DELIVERED] and ("10.0.0.1", b"after") in w.received
    assert conn.via is not None and conn.via is not stale and conn.via.alive
    assert outside.stats["return_paths_adopted"] == 2


def test_keepalives_hold_the_connection_and_a_silent_path_is_reset() -> None:
    w, inside, outside = inside_outside(ReturnPath.REVERSE, keepalive=1.0)
    w.tick(10.5)
    assert inside.stats["keepalives_sent"] == 11 and not inside.stats["keepalives_missed"]  # one at once, then each second
    assert all(p.token & KEEPALIVE_TOKEN and p.error == "" for p in w.pings) and len(w.pings) == 11
    # The outside site stops answering (the NAT dropped the binding and the peer's packets vanish).
    link = next(lk for lk in w.links.values() if lk.alive)
    link.cut = True  # nothing gets through any more; nobody is told
    w.tick(15.0)
    assert inside.stats["keepalives_missed"] == 1
    assert sum(1 for lk in w.links.values() if lk.carries) == 1  # reconnected
    k = w.send(outside, INSIDE, b"after")  # and the outside site follows the new connection
    assert w.completions[k] == [Status.DELIVERED]


def test_answers_on_a_connection_we_do_not_send_on_are_a_protocol_error() -> None:
    w = World()
    a = w.node("a", INSIDE)
    b = w.node("b", OUTSIDE)
    w.send(a, OUTSIDE)
    link = next(iter(w.links.values()))
    b.inbound_frames(link.inconn, frames_of([(wire.encode_acks([(1, 0)]), b"")]), w.now)
    closes = [x for x in b.take_actions() if isinstance(x, CloseIn)]
    assert closes and "carries nothing back" in closes[0].reason and b.stats["bad_frames"] == 1


def test_the_documented_two_site_configs_parse_as_described() -> None:
    import re
    from pathlib import Path

    import yaml

    from lu2k.settings import parse_config

    text = (Path(__file__).resolve().parent.parent / "docs" / "nat.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    cfgs = []
    for block in blocks:
        doc = yaml.safe_load(block)
        lu = doc["net"][0]["lu2k"]
        lu.pop("key_file")
        lu["key"] = "a long shared secret for the test"
        cfgs.append(parse_config(doc))
    inside, outside = cfgs
    assert inside.peers[0].paths == PathSettings(None, 15.0)
    assert outside.peers[0].paths == PathSettings(ReturnPath.REVERSE, None)


# -- typed connections (tcp): CONTROL and BULK ------------------------------------------------------


def typed_pair(w: World) -> tuple[Node, Node]:
    """INSIDE and OUTSIDE in ``w``, with tcp's typed connections (CONTROL below 1 KiB, BULK)."""
    inside = w.node("i", INSIDE, transaction_timeout=5.0)
    outside = w.node("o", OUTSIDE, transaction_timeout=5.0)
    for n in (inside, outside):
        for ni in n.nis.values():
            ni.params = dataclasses.replace(ni.params, typed_connections=True, min_bulk=1024)
    return inside, outside


def typed_inside_outside() -> tuple[World, Node, Node]:
    w = World()
    inside, outside = typed_pair(w)
    w.nat.add(INSIDE.host)
    inside.set_return_paths({}, {OUTSIDE: PathSettings(keepalive=1.0)})
    outside.set_return_paths({}, {INSIDE: PathSettings(return_path=ReturnPath.REVERSE)})
    w.run(inside)
    return w, inside, outside


def test_with_typed_connections_the_inside_holds_both_and_each_carries_its_kind_back() -> None:
    w, inside, outside = typed_inside_outside()
    held = inside.peer(OUTSIDE).conns
    assert {ConnType.CONTROL, ConnType.BULK} <= set(held) and all(c.hold and c.state is ConnState.UP for c in held.values())
    assert inside.stats["keepalives_sent"] == 2  # one on each at once: the outside hears both
    small, big = w.send(outside, INSIDE, b"s"), w.send(outside, INSIDE, b"B" * 4096)
    assert w.completions[small] == w.completions[big] == [Status.DELIVERED]
    rides = outside.peer(INSIDE).conns
    assert all(c.via is not None and c.via.ctype is t for t, c in rides.items()), rides


def test_bulk_riding_the_peers_control_connection_moves_to_its_bulk_one_exactly_once() -> None:
    """The inside's BULK connection breaks while its CONTROL one lives: our bulk rides CONTROL
    (behind it our small messages would wait).  When BULK is back and heard, our bulk moves
    there; CONTROL stays open, what was unacknowledged is resent and answered once."""
    w, inside, outside = typed_inside_outside()
    w.send(outside, INSIDE, b"B" * 4096)
    bulk_link = next(lk for lk in w.links.values() if lk.conn.ctype is ConnType.BULK)
    control_link = next(lk for lk in w.links.values() if lk.conn.ctype is ConnType.CONTROL)
    w.kill(bulk_link, "reset by the NAT")
    inside.peer(OUTSIDE).conns[ConnType.BULK].backoff.next_at = w.now + 2.0  # its path stays out a while
    w.drop_answers = True  # delivered, its ACK lost: in flight when the move comes
    k = w.send(outside, INSIDE, b"C" * 4096)
    w.tick(1.0)  # our backoff after the loss; then the only connection of the peer's is CONTROL
    ours = outside.peer(INSIDE).conns[ConnType.BULK]
    assert ours.via is control_link.inconn and w.completions[k] == [] and not outside.stats["return_paths_moved"]
    w.drop_answers = False
    w.tick(3.0)  # the inside reconnects BULK and its first keepalive announces it
    assert outside.stats["return_paths_moved"] == 1 and ours.via is not None and ours.via.ctype is ConnType.BULK
    assert control_link.alive and control_link.inconn.alive  # the peer's CONTROL connection lives on
    assert w.completions[k] == [Status.DELIVERED] and w.received.count(("10.0.0.1", b"C" * 4096)) == 1
    assert inside.stats["duplicates"] == 1  # the resend, answered from the window
    # An answer still on its way on the old connection is read, not a protocol error.
    outside.inbound_frames(control_link.inconn, frames_of([(wire.encode_acks([(2, 0)]), b"")]), w.now)
    assert not [a for a in outside.take_actions() if isinstance(a, CloseIn)] and not outside.stats["bad_frames"]
    after = [w.send(outside, INSIDE, b"s"), w.send(outside, INSIDE, b"D" * 4096)]
    assert all(w.completions[x] == [Status.DELIVERED] for x in after)
    peer = outside.peer(INSIDE)
    assert peer.credits.in_use == 0 and not peer.inflight


class SlowConnects(ConnectsHeld, World):
    """A World whose connects to ``hold_hosts`` wait until ``finish_connects``."""


def test_a_first_answer_rides_the_peers_control_connection_while_ours_is_set_up() -> None:
    """A peer connected to us and sent a request; our connection back is still in its set-up
    (a connect and a hello: 1.8 s on GEO).  The answer goes on the peer's CONTROL connection at
    once; the set-up, when it finishes, is closed as superseded; bulk waits for our own."""
    w = SlowConnects()
    client, server = typed_pair(w)
    w.hold_hosts.add(INSIDE.host)  # the server's connections back to the client take their time
    request = w.send(client, OUTSIDE, b"request")
    assert w.completions[request] == [Status.DELIVERED]
    back = server.peer(INSIDE).conns
    assert back[ConnType.CONTROL].state is ConnState.CONNECTING and len(w.held_connects) == 2  # CONTROL and its BULK sibling
    reply = w.send(server, INSIDE, b"reply")
    assert w.completions[reply] == [Status.DELIVERED] and ("10.0.0.1", b"reply") in w.received
    assert server.stats["return_paths_early"] == 1 and back[ConnType.CONTROL].via is not None
    bulk = w.send(server, INSIDE, b"B" * 4096)
    assert w.completions[bulk] == [] and back[ConnType.BULK].via is None  # bulk: our own connection
    w.finish_connects()
    assert w.completions[bulk] == [Status.DELIVERED]
    control_links = [lk for (oid, _), lk in w.links.items() if oid == id(back[ConnType.CONTROL])]
    assert control_links and not any(lk.alive for lk in control_links)  # the abandoned set-up: closed
    assert back[ConnType.CONTROL].state is ConnState.UP and back[ConnType.CONTROL].via is not None
    more = [w.send(server, INSIDE, b"again"), w.send(client, OUTSIDE, b"and on")]
    assert all(w.completions[k] == [Status.DELIVERED] for k in more)
    assert w.received.count(("10.0.0.1", b"reply")) == 1
    assert client.stats["return_paths_served"] == 1


def test_without_auto_or_for_bulk_the_answer_waits_for_our_own_connection() -> None:
    for mode, payload in ((ReturnPath.CONNECT, b"reply"), (None, b"B" * 4096)):
        w = SlowConnects()
        client, server = typed_pair(w)
        server.set_return_paths({}, {INSIDE: PathSettings(return_path=mode)})
        w.hold_hosts.add(INSIDE.host)
        w.send(client, OUTSIDE, b"request")
        reply = w.send(server, INSIDE, payload)
        assert w.completions[reply] == [] and not server.stats["return_paths_early"], mode
        w.finish_connects()
        assert w.completions[reply] == [Status.DELIVERED]


def test_bulk_moves_off_the_control_connection_only_once_its_send_there_has_ended() -> None:
    """A send still under way on the old connection reads its payloads there: the move waits
    for its end (else a send stuck on the peer's connection would keep its messages forever)."""
    w, inside, outside = typed_inside_outside()
    w.send(outside, INSIDE, b"B" * 4096)
    bulk_link = next(lk for lk in w.links.values() if lk.conn.ctype is ConnType.BULK)
    w.kill(bulk_link, "reset by the NAT")
    inside.peer(OUTSIDE).conns[ConnType.BULK].backoff.next_at = w.now + 2.0
    w.hold_sends = True
    k = w.send(outside, INSIDE, b"C" * 4096)
    w.tick(1.0)  # rides CONTROL; its send stays under way
    ours = outside.peer(INSIDE).conns[ConnType.BULK]
    assert ours.via is not None and ours.via.ctype is ConnType.CONTROL and ours.sending == 1
    w.tick(3.0)  # the BULK connection is back and heard
    assert not outside.stats["return_paths_moved"] and ours.via.ctype is ConnType.CONTROL
    w.release_sends()
    assert outside.stats["return_paths_moved"] == 1 and ours.via is not None and ours.via.ctype is ConnType.BULK
    assert w.completions[k] == [Status.DELIVERED] and w.received.count(("10.0.0.1", b"C" * 4096)) == 1


def test_a_ping_over_the_peers_connection_lists_its_nids_as_a_direct_one_does() -> None:
    """lnetctl discover over a return path: the inside site's PONG lists its NIDs."""
    w, inside, outside = inside_outside(ReturnPath.REVERSE)
    outside.ping(INSIDE, 41, 5.0, w.now)
    w.run(outside)
    done = [p for p in w.pings if p.token == 41]
    assert done and done[0].error == "" and INSIDE in done[0].nids, done
