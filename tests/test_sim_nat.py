"""The simulator's NAT world (lu2k.sim.world, ``nat=True``): A cannot be connected to, holds its
connection to G with keepalives, and G reaches A over that connection's reverse direction
(lu2k.core.returnpath) -- under the same faults and invariants as the usual world.  The full
sweep: ``python benchmarks/sim_sweep.py --seeds 20000 --nat``."""

from __future__ import annotations

import os
from collections import Counter

from lu2k.core.returnpath import ReturnPath
from lu2k.sim import FAULTS, World

SWEEP = int(os.environ.get("LU2K_SIM_NAT_SEEDS", "400"))


def test_bounded_nat_sweep_keeps_every_invariant_and_uses_the_return_path() -> None:
    seen: set[str] = set()
    modes: Counter[ReturnPath] = Counter()
    adopted = served = 0
    for seed in range(SWEEP):
        w = World(seed, nat=True)
        seen |= w.faults.enabled
        modes[w.nat_mode] += 1
        w.run()  # raises Violation naming the seed
        adopted += w.nodes["G"].node.stats["return_paths_adopted"]
        served += w.nodes["A"].node.stats["return_paths_served"]
    # Every fault but raildown: NAT worlds have one rail (a multi-rail peer behind NAT is not supported).
    assert seen == set(FAULTS) - {"raildown"} and set(modes) == {ReturnPath.REVERSE, ReturnPath.AUTO}
    assert adopted >= SWEEP // 2 and served >= SWEEP // 2  # the reverse direction really carried traffic


def test_nobody_connects_to_the_inside_node() -> None:
    for seed in range(40):
        w = World(seed, nat=True)
        w.run()
        a = w.nodes["A"].node
        assert a.stats["conns_accepted"] == 0  # every message A received came on its own connections
        assert all(c.out is not None for s in a.sessions.values() for c in s.conns)


def test_a_nat_seed_replays_exactly() -> None:
    def trace(seed: int) -> tuple[object, ...]:
        w = World(seed, nat=True)
        r = w.run()
        return (r, sorted((mid, rec.status, rec.reason) for mid, rec in w.records.items()), sorted(w.received.items()))

    for seed in (3, 4242):
        assert trace(seed) == trace(seed)


def test_liveness_through_the_nat_when_time_allows() -> None:
    """Seeds that check liveness (no frame loss, a long transaction timeout): every message to
    A arrives, although G can only send to A over A's own connection."""
    checked = delivered = 0
    for seed in range(300):
        w = World(seed, nat=True)
        if not w.liveness:
            continue
        w.run()  # the liveness invariant: everything DELIVERED (or NO_RECEIVER on the dead portal)
        delivered += sum(1 for mid, r in w.records.items() if r.origin == "B" and w.received.get(mid) == "A")
        checked += 1
    assert checked >= 40 and delivered >= checked * 3
