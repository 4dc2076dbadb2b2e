"""Connections opened before anything needs them (lu2k.core.node: ``_prewarm_siblings``,
``_prewarm_back``): a fresh pair of daemons on a long link pays one connection set-up on the
critical path of its first exchange, not three."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from lu2k.core import Connect, ConnState, Node
from lu2k.errors import Status
from lu2k.wire import ConnType

sys.path.insert(0, str(Path(__file__).parent))
from test_core_node import A, G1, Mesh  # noqa: E402
from test_core_returnpath import INSIDE, OUTSIDE, World  # noqa: E402


class CountingMesh(Mesh):
    def __init__(self) -> None:
        super().__init__()
        self.connects: list[tuple[str, str, ConnType]] = []

    def do(self, node: Node, a: Any) -> None:
        if isinstance(a, Connect):
            self.connects.append((next(iter(node.nis.values())).nid.host, a.host, a.conn.ctype))
        super().do(node, a)


def typed(node: Node) -> Node:
    for ni in node.nis.values():
        ni.params = dataclasses.replace(ni.params, typed_connections=True, min_bulk=1024)
    return node


def test_the_first_typed_connection_opens_its_sibling_beside_it() -> None:
    m = CountingMesh()
    a = typed(m.node("a", [A]))
    typed(m.node("g", [G1]))
    small = m.send(a, G1, b"s")
    assert ("10.0.0.1", "10.0.0.2", ConnType.CONTROL) in m.connects and ("10.0.0.1", "10.0.0.2", ConnType.BULK) in m.connects
    bulk_conn = a.peer(G1).conns[ConnType.BULK]
    assert bulk_conn.state is ConnState.UP and not bulk_conn.prewarm and not bulk_conn.queue  # up, with nothing to send
    before = len(m.connects)
    big = m.send(a, G1, b"b" * 4096)
    assert m.done(small) == m.done(big) == [(Status.DELIVERED, "delivered")]
    assert big.conn is bulk_conn and len(m.connects) == before  # the bulk message did not wait for a connect


def test_a_peer_that_connected_is_connected_back_before_there_is_an_answer() -> None:
    m = CountingMesh()
    a = m.node("a", [A])
    g = m.node("g", [G1])
    m.send(a, G1)
    m.run(g)
    assert m.connects == [("10.0.0.1", "10.0.0.2", ConnType.ANY), ("10.0.0.2", "10.0.0.1", ConnType.ANY)]
    back = g.peer(A).conns[ConnType.ANY]
    assert back.state is ConnState.UP and not back.prewarm
    reply = m.send(g, A)
    assert m.done(reply) == [(Status.DELIVERED, "delivered")] and len(m.connects) == 2


def test_a_connection_back_that_fails_is_not_retried_and_auto_then_rides_the_peers() -> None:
    """The inside site behind NAT connects out; the outside site's connection back fails once
    and is left alone; its first message then goes over the inside site's connection."""
    w = World()
    inside = w.node("i", INSIDE)
    outside = w.node("o", OUTSIDE)
    w.nat.add(INSIDE.host)
    w.send(inside, OUTSIDE, b"out")
    w.tick(10.0)
    assert w.connects.count(("10.0.0.2", "10.0.0.1")) == 1 and not outside.stats["return_paths_adopted"]
    k = w.send(outside, INSIDE, b"back")
    w.tick(11.0)
    assert w.completions[k] == [Status.DELIVERED] and outside.stats["return_paths_adopted"] == 1
    assert w.connects.count(("10.0.0.2", "10.0.0.1")) == 1
