"""Security findings of issue 13 end to end: two real lu2kd on loopback, shim endpoints.

Finding 6, sender side: an endpoint on the receiving daemon that stops taking messages (its
RX buffers full, never released) must not hold the sending daemon's credits for that peer:
another endpoint's traffic to the same peer is delivered meanwhile, and every message to
the stuck one ends with exactly one completion by its transaction timeout.

Finding 11: kill -9 of the *sending* daemon; the application resends what did not complete
DELIVERED with the same message ids; every message arrives exactly once.
"""

from __future__ import annotations

import random
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest

from lu2k.errors import ShimError, Status
from lu2k.kernel_shim.endpoint import Completion, Endpoint
from lu2k.localpair import daemons

sys.path.insert(0, str(Path(__file__).parent))
from e2e_support import HDR, Receiver, make_message  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def test_a_stuck_receiver_does_not_stall_another_endpoints_traffic_to_the_same_peer() -> None:
    rnd = random.Random(6)
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"], tunables={"peer_credits": 8},
                 extra={"global": {"transaction_timeout": 6}}) as (a, b):
        stuck = Endpoint.attach(b.shim_path, portal=7, rx_pool_bytes=64 << 10)  # never receives
        try:
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
                assert set(statuses) <= {Status.DELIVERED, Status.TIMED_OUT} and statuses[Status.TIMED_OUT] > 0, \
                    [(c.status, c.reason) for c in to_stuck]
            rx.join(60)
            assert rx.error is None and len(rx.seen) == 20 and rx.corrupt == 0
        finally:
            stuck.detach()


class _Counting(threading.Thread):
    """Receives until stopped, counting each message index (duplicates included)."""

    def __init__(self, shim_path: str) -> None:
        super().__init__(daemon=True)
        self.ep = Endpoint.attach(shim_path, portal=0)
        self.seen: Counter[int] = Counter()
        self.corrupt = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                msg = self.ep.recv(timeout=0.2)
                if msg is None:
                    continue
                with msg:
                    index, crc = HDR.unpack_from(msg.payload)
                    self.corrupt += zlib.crc32(msg.payload[HDR.size:]) != crc
                    self.seen[index] += 1
        except BaseException as e:
            self.error = e
        finally:
            self.ep.detach()


def test_kill_9_of_the_sending_daemon_then_resend_by_id_delivers_each_message_once() -> None:
    """Finding 11: after kill -9 of the sending daemon, messages reported CANCELLED may have
    been delivered; resending them made duplicates.  Resent with their ids, none is doubled."""
    count = 5000
    rnd = random.Random(11)
    bodies = [make_message(i, rnd.choice((200, 4000, 20000)), rnd) for i in range(count)]
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"]) as (a, b):
        rx = _Counting(b.shim_path)
        rx.start()
        killed = threading.Event()

        def kill_when_under_way() -> None:
            while sum(rx.seen.values()) < count // 3 and rx.is_alive():
                time.sleep(0.01)
            a.kill()
            killed.set()

        killer = threading.Thread(target=kill_when_under_way, daemon=True)
        killer.start()
        comps: dict[int, Completion] = {}
        ep = Endpoint.attach(a.shim_path, portal=1)
        try:
            for i in range(count):
                try:
                    comps[i] = ep.send(b.nid, bodies[i], 0, msg_id=i + 1, timeout=30)
                except ShimError:
                    break  # the daemon is gone: the rest was never handed over
            assert killed.wait(60) and all(c.wait(30) for c in comps.values())
        finally:
            ep.detach()
        statuses = Counter(c.status for c in comps.values())
        assert set(statuses) <= {Status.DELIVERED, Status.CANCELLED} and statuses[Status.CANCELLED] > 0, statuses
        seen_before = set(rx.seen)
        resend = [i for i in range(count) if i not in comps or comps[i].status is not Status.DELIVERED]
        cancelled_but_delivered = sum(1 for i in resend if i in seen_before)
        a.start()
        with Endpoint.attach(a.shim_path, portal=1) as ep2:
            again = {i: ep2.send(b.nid, bodies[i], 0, msg_id=i + 1, timeout=60) for i in resend}
            assert all(c.wait(60) for c in again.values())
            assert {c.status for c in again.values()} == {Status.DELIVERED}, Counter((c.status, c.reason) for c in again.values())
        deadline = time.monotonic() + 60
        while len(rx.seen) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        rx.stop.set()
        rx.join(10)
    print(f"sent {len(comps)} before the kill: {dict(statuses)}; resent {len(resend)}, "
          f"of which {cancelled_but_delivered} had been delivered already")
    assert rx.error is None and rx.corrupt == 0
    assert set(rx.seen) == set(range(count)) and max(rx.seen.values()) == 1, [i for i, n in rx.seen.items() if n > 1][:20]
