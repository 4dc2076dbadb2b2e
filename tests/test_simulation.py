"""The deterministic simulation of the message layer (lu2k.sim): a bounded sweep, replay, and
proof that the invariants catch planted bugs.  The full sweep: benchmarks/sim_sweep.py."""

from __future__ import annotations

import os

import pytest

from lu2k.core import node as core_node
from lu2k.core.states import MsgState
from lu2k.dedupe import RecvWindow
from lu2k.sim import FAULTS, Faults, Violation, World, run_seed

SWEEP = int(os.environ.get("LU2K_SIM_SEEDS", "8000"))  # about 40 s on one core


@pytest.mark.timeout(900)  # about 40 s alone; several times that on a busy machine
def test_bounded_sweep_keeps_every_invariant() -> None:
    seen: set[str] = set()
    rerouted_worlds = 0
    for seed in range(SWEEP):
        w = World(seed)
        seen |= w.faults.enabled
        rerouted_worlds += w.run().rerouted > 0  # raises Violation naming the seed
    assert seen == set(FAULTS)
    assert rerouted_worlds >= SWEEP // 100  # failing over to the second gateway is part of the sweep


def test_a_seed_replays_exactly() -> None:
    def trace(seed: int) -> tuple[object, ...]:
        w = World(seed)
        r = w.run()
        return (r, sorted((mid, rec.status, rec.reason) for mid, rec in w.records.items()), sorted(w.received.items()))

    for seed in (7, 1234, 99991):
        assert trace(seed) == trace(seed)


def test_every_fault_alone_still_delivers_everything_when_time_allows() -> None:
    for fault in FAULTS:
        if fault in ("loss", "stuck"):
            continue  # these lose frames on a live connection: only timeouts end those messages
        for seed in range(20):
            w = World(seed, faults=Faults(frozenset({fault})))
            w.liveness = True
            w.params["timeout"] = 1000.0
            w.run()


def test_a_lost_dedupe_window_is_caught_as_a_double_delivery(monkeypatch: pytest.MonkeyPatch, in_pure_child: bool) -> None:
    if in_pure_child:  # the patched methods are compiled
        return
    monkeypatch.setattr(RecvWindow, "check", lambda self, seq: None)
    with pytest.raises(Violation, match=r"delivered twice .*--replay \d+"):
        for seed in range(400):
            run_seed(seed)


def test_a_hole_answered_as_a_duplicate_is_caught_as_a_message_never_received(monkeypatch: pytest.MonkeyPatch,
                                                                              in_pure_child: bool) -> None:
    if in_pure_child:  # the patched methods are compiled
        return
    real = RecvWindow.check

    def forgets_holes(self: RecvWindow, seq: int) -> int | None:
        got = real(self, seq)
        return 0 if got is None and seq < self.floor else got  # a late hole: "already delivered"

    monkeypatch.setattr(RecvWindow, "check", forgets_holes)
    with pytest.raises(Violation, match=r"reported DELIVERED but .* never received it .*--replay \d+"):
        for seed in range(3000):
            run_seed(seed)


def test_credits_not_given_back_are_caught(monkeypatch: pytest.MonkeyPatch, in_pure_child: bool) -> None:
    if in_pure_child:  # the patched methods are compiled
        return
    real = core_node.Node._on_acks

    def leaky(self: core_node.Node, peer: core_node.Peer, entries: list[tuple[int, int]]) -> None:
        before = peer.credits.in_use
        real(self, peer, entries)
        if peer.credits.in_use < before:
            peer.credits.in_use += 1  # forget to give one back

    monkeypatch.setattr(core_node.Node, "_on_acks", leaky)
    with pytest.raises(Violation, match="credits"):
        for seed in range(200):
            run_seed(seed)


def test_a_destination_share_not_given_back_is_caught(monkeypatch: pytest.MonkeyPatch, in_pure_child: bool) -> None:
    if in_pure_child:  # the patched methods are compiled
        return
    real = core_node.Node._dest_done
    skipped: list[int] = []

    def leaky(self: core_node.Node, peer: core_node.Peer, m: core_node.OutMsg, answered: bool = True) -> None:
        if not skipped:
            skipped.append(1)  # one message's destination count is never taken back
            return
        real(self, peer, m, answered)

    monkeypatch.setattr(core_node.Node, "_dest_done", leaky)
    with pytest.raises(Violation, match="against their destinations"):
        for seed in range(200):
            skipped.clear()
            run_seed(seed)


def test_a_completion_lost_by_the_core_is_caught(monkeypatch: pytest.MonkeyPatch, in_pure_child: bool) -> None:
    if in_pure_child:  # the patched methods are compiled
        return
    real = core_node.Node._complete
    dropped: list[int] = []

    def forgetful(self: core_node.Node, m: core_node.OutMsg) -> None:
        if m.on_finish is not None and m.status is core_node.Status.NO_RECEIVER and not dropped:
            dropped.append(1)
            m.completed = True
            return
        real(self, m)

    monkeypatch.setattr(core_node.Node, "_complete", forgetful)
    with pytest.raises(Violation, match="(got 0 completions|applications still wait)"):
        for seed in range(200):
            dropped.clear()
            run_seed(seed)


def test_a_reroute_that_moves_transmitted_messages_is_caught(monkeypatch: pytest.MonkeyPatch, in_pure_child: bool) -> None:
    """Only what never left may go to the other gateway: a message the failed gateway may
    already have forwarded, sent again through the other one, can arrive twice (the receiver
    dedupes per sending peer, and the two gateways are two peers)."""
    if in_pure_child:  # the patched methods are compiled
        return
    real = core_node.Node._reroute_unsent

    def careless(self: core_node.Node, peer: core_node.Peer) -> None:
        for m in peer.inflight.values():
            if m.state is MsgState.REQUEUED:  # transmitted, its connection lost: taken for never sent
                m.state = MsgState.IN_FLIGHT
        real(self, peer)

    monkeypatch.setattr(core_node.Node, "_reroute_unsent", careless)
    with pytest.raises(Violation, match=r"(delivered twice|but was received|completed twice)"):
        for seed in range(2000):
            run_seed(seed)


def test_a_peer_restart_seen_twice_in_one_step_fails_its_messages_once() -> None:
    """Seed 897539: failing a forwarded message on a peer's restart freed router buffer, which
    forwarded another message to that peer and adopted its other return path -- re-entering
    the restart handling, which failed the same messages again."""
    run_seed(897539)
