"""lu2k.core.fairq, pure: deficit round robin between endpoints, the byte window, and the
message core's per-peer bound with one saturating and one paced endpoint."""

from __future__ import annotations

from typing import Any

import pytest

from lu2k import wire
from lu2k.core import NetParams, Node, NodeParams
from lu2k.core.actions import Connect, Wake
from lu2k.core.fairq import ByteWindow, FairQueue
from lu2k.core.states import MsgState
from lu2k.errors import LocalProtocolError
from lu2k.nid import parse_nid

Msg = tuple[str, int, int]  # (owner, number, size)


def _q(quantum: int = 1000) -> FairQueue[Msg]:
    return FairQueue(lambda m: m[0], lambda m: m[2], quantum)


def test_a_late_small_message_does_not_wait_behind_a_backlog() -> None:
    q = _q(quantum=64 << 10)
    for i in range(100):
        q.append(("bulk", i, 64 << 10))
    q.append(("paced", 0, 1024))
    assert len(q) == 101 and q.bytes == 100 * (64 << 10) + 1024 and q.owners == 2
    first_two = [q.popleft(), q.popleft()]
    assert ("paced", 0, 1024) in first_two  # not behind 100 messages: one round at most
    assert all(m[0] == "bulk" for m in (q.popleft() for _ in range(99)))
    assert not q and q.bytes == 0 and q.owners == 0


def test_owners_share_bytes_equally_whatever_their_message_sizes() -> None:
    q = _q(quantum=1500)
    for i in range(3000):
        q.append(("small", i, 100))
    for i in range(300):
        q.append(("large", i, 1400))
    got = {"small": 0, "large": 0}
    while got["large"] < 200 * 1400:  # while both still have messages waiting
        m = q.popleft()
        got[m[0]] += m[2]
    # Deficit round robin: byte shares equal to within one quantum plus one message.
    assert abs(got["small"] - got["large"]) <= 1500 + 1400


def test_order_within_an_owner_peek_and_remove() -> None:
    q = _q()
    items = [("a", i, 300) for i in range(5)] + [("b", i, 300) for i in range(5)]
    for m in items:
        q.append(m)
    assert q[0] == q.popleft()  # [0] shows exactly what popleft returns next
    gone = items[8]  # ("b", 3, 300): messages are found by identity, as the core's are
    q.remove(gone)
    with pytest.raises(ValueError):
        q.remove(gone)
    out = [q.popleft() for _ in range(len(q))]
    assert [m for m in out if m[0] == "a"] == sorted(m for m in out if m[0] == "a")  # FIFO per owner
    assert ("b", 3, 300) not in out and len(out) == 8
    with pytest.raises(IndexError):
        q.popleft()
    with pytest.raises(IndexError):
        q[0]


def test_owner_is_taken_when_queued() -> None:
    box: dict[str, Any] = {"owner": "first"}
    q: FairQueue[dict[str, Any]] = FairQueue(lambda m: m["owner"], lambda m: 1)
    q.append(box)
    box["owner"] = "changed later"  # a caller that labels its message after handing it over
    q.remove(box)
    assert not q


def test_byte_window_bound() -> None:
    w = ByteWindow(1000)
    assert w.fits(5000)  # empty: an oversized message still goes, alone
    w.take(600)
    assert w.fits(400) and not w.fits(401)
    w.take(400)
    w.give(1000)
    assert w.in_use == 0 and w.max_in_use == 1000
    with pytest.raises(LocalProtocolError):
        w.give(1)
    assert ByteWindow(0).fits(1 << 40)  # 0: no byte bound
    with pytest.raises(LocalProtocolError):
        ByteWindow(-1)


A, B = parse_nid("10.0.0.1@tcp"), parse_nid("10.0.0.2@tcp")
SIZE = 64 << 10
WINDOW = 10 * SIZE + 1000  # not a multiple of the message size: the bound must still hold exactly


class OneHop:
    """Node ``A`` with one connected peer ``B``; the test plays the transport and B's ACKs."""

    def __init__(self, **net: Any) -> None:
        self.node = Node(NodeParams(incarnation=1))
        self.node.add_net(NetParams(A, 988, **net))
        self.conn: Any = None
        self.now = 0.0

    def submit(self, size: int, owner: object) -> Any:
        m = self.node.submit(None, B.to_bytes(), 1, 5, bytes(size), None, self.now, owner=owner)
        self.pump()
        return m

    def pump(self) -> None:
        """Carry out the node's actions: connect once, write every batch it has."""
        for a in self.node.take_actions():
            if isinstance(a, Connect):
                self.conn = a.conn
                self.node.connected(a.conn, a.attempt, 99, self.now)
                self.pump()
        while self.conn is not None and (batch := self.node.next_batch(self.conn, self.now)) is not None:
            self.node.send_done(batch, self.now)
        self.node.take_actions()

    def ack_oldest(self) -> None:
        peer = self.node.nis[A.net].peers[B]
        seq = min(peer.inflight)
        self.now += 0.01
        self.node.frames_received(self.conn, self.conn.attempt, [_ack_frame(seq)], self.now)
        self.pump()


def _ack_frame(seq: int) -> wire.Frame:
    raw = wire.encode_acks([(seq, 0)])
    h = wire.decode_header(raw[: wire.peek_header_size(raw[: wire.BASE_SIZE])], 1 << 20)
    return wire.Frame(h, raw[h.size:])


def test_core_bounds_a_peer_in_bytes_and_lets_the_paced_endpoint_pass() -> None:
    """A saturating endpoint hands 200 messages to one peer, then a paced endpoint one.

    The peer's credits would allow 256 in flight; the byte window allows 10 (640 KiB + 1000 B).
    The rest waits in the fair queue -- where the paced message waits one round, not 190 messages.
    """
    hop = OneHop(credits=1024, peer_credits=256, peer_window_bytes=WINDOW)
    sat, paced = object(), object()
    msgs = [hop.submit(SIZE, sat) for _ in range(200)]
    peer = hop.node.nis[A.net].peers[B]
    assigned = [m for m in msgs if m.state is not MsgState.QUEUED]
    assert len(assigned) == 10 and all(m.state is MsgState.SENT for m in assigned)
    assert peer.window.in_use == 10 * SIZE <= WINDOW
    assert len(peer.queue) == 190 and peer.queue.bytes == 190 * SIZE
    small = hop.submit(1024, paced)
    assert small.state is MsgState.QUEUED  # 1024 more bytes would pass the window: it waits too ...
    # ... but not behind the backlog: as ACKs free the window it goes within one round (after
    # at most one message of the other endpoint), not 191st.
    before = set(map(id, assigned))
    order: list[Any] = []
    while small.state is MsgState.QUEUED:
        hop.ack_oldest()
        order += [m for m in peer.inflight.values() if id(m) not in before and m not in order]
        assert peer.window.in_use <= WINDOW
    assert small in order[:2]
    # Everything else, one ACK at a time: the window never holds more than its limit.
    while peer.inflight:
        hop.ack_oldest()
        assert peer.window.in_use <= WINDOW
    assert peer.window.max_in_use <= WINDOW and peer.window.in_use == 0 and not peer.queue
    assert all(m.state is MsgState.DONE for m in msgs) and small.state is MsgState.DONE


def test_without_a_window_credits_alone_bound_the_peer() -> None:
    node = Node(NodeParams(incarnation=1))
    node.add_net(NetParams(A, 988, credits=1024, peer_credits=16))
    for i in range(40):  # four destinations, so that no one reaches its share of the credits (dest_cap)
        node.submit(None, B.to_bytes(), 1, 5 + i % 4, bytes(SIZE), None, 0.0, owner=None)
    actions = node.take_actions()
    peer = node.nis[A.net].peers[B]
    assert len(peer.inflight) == 16 and peer.window.in_use == 16 * SIZE and len(peer.queue) == 24
    assert not any(isinstance(a, Wake) for a in actions)  # not connected yet: nothing to wake
