"""Credits, health/backoff, routing and the receive window: pure, fake clock."""

from __future__ import annotations

import pytest

from lu2k.credits import Credits
from lu2k.dedupe import IN_PROGRESS, RecvWindow
from lu2k.errors import LocalProtocolError
from lu2k.health import MAX_HEALTH, Backoff, Health
from lu2k.nid import parse_net, parse_nid
from lu2k.routing import Route, RouteTable


def test_credits_bound_and_lnet_style_min() -> None:
    c = Credits(2)
    c.take()
    c.take()
    assert not c.available
    with pytest.raises(LocalProtocolError):
        c.take()
    c.note_queue(3)
    assert c.value == -3 and c.min_value == -3
    c.give()
    c.note_queue(0)
    assert c.value == 1 and c.min_value == -3
    c.give()
    with pytest.raises(LocalProtocolError):
        c.give()
    with pytest.raises(LocalProtocolError):
        Credits(0)


def test_health_failure_and_recovery() -> None:
    h = Health(sensitivity=100, recovery_interval=1.0)
    h.failure(10.0)
    h.failure(10.0)
    assert h.value == MAX_HEALTH - 200
    h.tick(10.5)
    assert h.value == MAX_HEALTH - 200
    h.tick(13.0)
    assert h.value == MAX_HEALTH - 197
    h.success()
    assert h.value == MAX_HEALTH - 196


def test_backoff_doubles_and_caps() -> None:
    b = Backoff(0.1, 1.0)
    delays = [b.failed(0.0, "x") for _ in range(6)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert not b.ready(0.5) and b.ready(1.0)
    b.succeeded()
    assert b.ready(0.0) and b.attempts == 0


def test_backoff_keeps_its_cap_after_thousands_of_failures() -> None:
    # A peer that stays unreachable for hours (NAT, a dead site) is retried at the cap forever.
    b = Backoff(0.05, 0.8)
    delays = [b.failed(float(i), "refused") for i in range(5000)]
    assert delays[-1] == 0.8 and b.attempts == 5000


def test_routing_local_direct_and_gateway_choice() -> None:
    tcp, o2ib = parse_net("tcp"), parse_net("o2ib")
    g1, g2, g3 = parse_nid("10.0.0.1@tcp"), parse_nid("10.0.0.2@tcp"), parse_nid("10.0.0.3@tcp")
    rt = RouteTable([tcp], [Route(o2ib, g1, 2, 0), Route(o2ib, g2, 1, 0), Route(o2ib, g3, 1, 5)])
    health = {g1: 1000, g2: 1000, g3: 1000}
    dst = parse_nid("192.168.0.5@o2ib")
    assert rt.next_hop(parse_nid("10.0.0.9@tcp"), health.get) == parse_nid("10.0.0.9@tcp")
    assert rt.next_hop(dst, health.get) == g2  # same priority: fewer hops wins
    health[g2] = 500
    assert rt.next_hop(dst, health.get) == g1  # healthier wins before hops
    assert rt.next_hop(parse_nid("1.2.3.4@tcp5"), health.get) is None
    assert rt.remove(o2ib, g1) == 1 and len(rt.routes()) == 2


def test_routing_round_robin_among_equals() -> None:
    tcp, o2ib = parse_net("tcp"), parse_net("o2ib")
    g1, g2 = parse_nid("10.0.0.1@tcp"), parse_nid("10.0.0.2@tcp")
    rt = RouteTable([tcp], [Route(o2ib, g1), Route(o2ib, g2)])
    hops = {rt.next_hop(parse_nid("1.1.1.1@o2ib"), lambda n: 1000) for _ in range(4)}
    assert hops == {g1, g2}


def test_recv_window_dedupes_and_compacts() -> None:
    w = RecvWindow(capacity=8)
    assert w.check(1) is None
    w.start(1)
    assert w.check(1) == IN_PROGRESS
    w.start(2)
    w.finish(2, 0)
    assert w.floor == 1 and w.check(2) == 0
    w.finish(1, 111)
    assert w.floor == 3 and w.check(1) == 111 and w.check(2) == 0  # failures survive compaction
    w.start(5)
    w.finish(5, 61)
    assert w.check(5) == 61 and w.check(4) is None


def test_recv_window_moves_past_a_number_that_never_came_and_still_takes_it_once_if_it_does() -> None:
    w = RecvWindow(capacity=64, hole_limit=4)
    for seq in (2, 3, 4):
        w.start(seq)
        w.finish(seq, 0)
    assert w.floor == 1  # 1 may still come: three later ones are not enough to give up on it
    w.start(5)
    w.finish(5, 0)
    assert w.floor == 6 and w.check(3) == 0  # four held above it: 1 is a hole now
    assert w.check(1) is None  # ... which, if it comes after all, is new: it was never delivered
    w.start(1)
    assert w.check(1) == IN_PROGRESS
    w.finish(1, 0)
    assert w.check(1) == 0  # and a copy of it is a duplicate
    for seq in range(8, 12):  # 6 and 7 never come; 7 will, and fail
        w.start(seq)
        w.finish(seq, 0)
    assert w.floor == 12 and w.check(6) is None and w.check(7) is None
    w.start(7)
    w.finish(7, 111)
    assert w.check(7) == 111 and w.check(6) is None


def test_recv_window_with_a_number_that_never_comes_stays_small() -> None:
    w = RecvWindow(capacity=65536, hole_limit=1024)
    for seq in range(2, 50_000):
        w.start(seq)
        w.finish(seq, 0)
    assert w.floor == 50_000 and len(w._seen) == 0 and w.check(1) is None and w.check(49_999) == 0
