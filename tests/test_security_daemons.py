"""Security findings of issue 13 end to end: two real lu2kd on loopback, shim endpoints.

Finding 6, sender side: an endpoint on the receiving daemon that stops taking messages (its
RX buffers full, never released) must not hold the sending daemon's credits for that peer:
another endpoint's traffic to the same peer is delivered meanwhile, and every message to
the stuck one ends with exactly one completion by its transaction timeout.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from lu2k.errors import Status
from lu2k.kernel_shim.endpoint import Endpoint
from lu2k.localpair import daemons

sys.path.insert(0, str(Path(__file__).parent))
from e2e_support import Receiver, make_message  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def test_a_stuck_receiver_does_not_stall_another_endpoints_traffic_to_the_same_peer() -> None:
    import random

    rnd = random.Random(6)
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"], tunables={"peer_credits": 8},
                 extra={"global": {"transaction_timeout": 6}}) as (a, b):
        stuck = Endpoint.attach(b.shim_path, portal=7, rx_pool_bytes=64 << 10)  # never receives
        rx = Receiver(b.shim_path, 20, portal=0)
        rx.start()
        with Endpoint.attach(a.shim_path, portal=1) as s1, Endpoint.attach(a.shim_path, portal=2) as s2:
            to_stuck = [s1.send(b.nid, make_message(i, 32 << 10, rnd), 7) for i in range(30)]
            s1.flush()
            to_fine = [s2.send(b.nid, make_message(i, 4096, rnd), 0) for i in range(20)]
            assert all(c.wait(60) for c in to_fine)
            assert [c.status for c in to_fine] == [Status.DELIVERED] * 20, [(c.status, c.reason) for c in to_fine]
            assert all(c.wait(60) for c in to_stuck)
            statuses = Counter(c.status for c in to_stuck)
            assert set(statuses) <= {Status.DELIVERED, Status.TIMED_OUT} and statuses[Status.TIMED_OUT] > 0, statuses
        rx.join(60)
        assert rx.error is None and len(rx.seen) == 20 and rx.corrupt == 0
        stuck.detach()
