"""Security findings of issue 13 end to end: two real lu2kd on loopback, shim endpoints.

Finding 6, sender side: an endpoint on the receiving daemon that stops taking messages (its
RX buffers full, never released) must not hold the sending daemon's credits for that peer:
another endpoint's traffic to the same peer is delivered meanwhile, and every message to
the stuck one ends with exactly one completion by its transaction timeout.

Finding 11: kill -9 of the *sending* daemon; the application resends what did not complete
DELIVERED with the same message ids; every message arrives exactly once.  kill -9 of the
*receiving* daemon: every message accounted for, the only second copies those the killed
daemon had put into the ring without its ACK reaching the sender ("delivery unknown").
"""

from __future__ import annotations

import random
import sys
import threading
import time
import zlib
from collections import Counter, deque
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from lu2k.backends import availability
from lu2k.errors import ShimError, Status
from lu2k.kernel_shim.endpoint import Completion, Endpoint
from lu2k.localpair import daemons

sys.path.insert(0, str(Path(__file__).parent))
from e2e_support import HDR, CountingReceiver, Receiver, make_message  # noqa: E402

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


def test_kill_9_of_the_sending_daemon_then_resend_by_id_delivers_each_message_once() -> None:
    """Finding 11: after kill -9 of the sending daemon, messages reported CANCELLED may have
    been delivered; resending them made duplicates.  Resent with their ids, none is doubled."""
    count = 5000
    rnd = random.Random(11)
    bodies = [make_message(i, rnd.choice((200, 4000, 20000)), rnd) for i in range(count)]
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"]) as (a, b):
        rx = CountingReceiver(b.shim_path)
        rx.start()
        killed = threading.Event()
        handed = [0]  # messages handed to the daemon so far

        def kill_when_under_way() -> None:
            # A third through, with messages in flight (on a loaded machine the sender can fall
            # behind until the daemon has finished all it was given: then nothing is cancelled).
            while (sum(rx.seen.values()) < count // 3 or handed[0] - sum(rx.seen.values()) < 64) and rx.is_alive() \
                    and handed[0] < count:
                time.sleep(0.001)
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
                    handed[0] = i + 1
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


class _Reattaching(threading.Thread):
    """The receiving application, which outlives its daemon.  When the daemon dies, its
    endpoint still hands out what the daemon had published into the ring, then raises
    ENOTCONN; the application attaches again once the daemon is back.  Each receipt is
    recorded as (daemon life, index), life 0 being the daemon that is killed.  The record
    lives in this process, not the daemon's, so the kill cannot lose it."""

    def __init__(self, shim_path: str) -> None:
        super().__init__(daemon=True)
        self.shim_path = shim_path
        self.ep = Endpoint.attach(shim_path, portal=0)
        self.receipts: list[tuple[int, int]] = []
        self.life = 0
        self.corrupt = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    msg = self.ep.recv(timeout=0.2)
                except ShimError:  # the daemon is gone and everything it published was taken
                    self.ep.detach()
                    self.ep = self._attach_again()
                    self.life += 1
                    continue
                if msg is None:
                    continue
                with msg:
                    index, crc = HDR.unpack_from(msg.payload)
                    self.corrupt += zlib.crc32(msg.payload[HDR.size:]) != crc
                    self.receipts.append((self.life, index))
        except BaseException as e:
            self.error = e
        finally:
            self.ep.detach()

    def _attach_again(self) -> Endpoint:
        while True:
            try:
                return Endpoint.attach(self.shim_path, portal=0)
            except ShimError:
                if self.stop.wait(0.02):
                    raise


# Failures after which the message may have been delivered ("delivery unknown"), and those
# after which it certainly was not.
OUTCOME_UNKNOWN = {Status.PEER_RESTARTED, Status.TIMED_OUT}
NOT_DELIVERED = {Status.NO_RECEIVER, Status.NO_ROUTE}


def _names(statuses: Counter[Status | None]) -> dict[str, int]:
    return {s.name if s is not None else "none": n for s, n in statuses.items()}


class _KillRun(NamedTuple):
    messages: int
    first: Counter[Status | None]
    attempts: dict[int, list[Completion]]
    rx: _Reattaching
    stats: dict[str, Any]
    daemon_side: dict[str, Any]
    everything: list[Completion]
    statuses: Counter[Status | None]
    received: Counter[int]


def _kill_the_receiver_mid_stream(backend: str) -> _KillRun:
    """One stream of the test below: kill -9 of the receiving daemon once a third is received,
    restart, resend by id until every message is DELIVERED."""
    count, window = 3000, 256
    rnd = random.Random(13)
    bodies = [make_message(i, rnd.choice((200, 4000, 20000)), rnd) for i in range(count)]
    # udt hears nothing from a killed peer (no reset); when UDT had nothing unacknowledged
    # the connection is given up only at the transaction timeout, here 10 s, not 50.
    extra = {"global": {"transaction_timeout": 10}} if backend == "udt" else None
    with daemons([f"127.0.0.1@{backend}", f"127.0.0.2@{backend}"], backend=backend, extra=extra) as (a, b):
        rx = _Reattaching(b.shim_path)
        rx.start()
        restarted = threading.Event()
        restart_error: list[BaseException] = []

        def kill_and_restart_when_under_way() -> None:
            while len(rx.receipts) < count // 3 and rx.is_alive():
                time.sleep(0.01)
            b.kill()
            try:
                b.start()  # the same config: same NID, port and shim socket
            except BaseException as e:
                restart_error.append(e)
            restarted.set()

        threading.Thread(target=kill_and_restart_when_under_way, daemon=True).start()
        attempts: dict[int, list[Completion]] = {i: [] for i in range(count)}
        with Endpoint.attach(a.shim_path, portal=1) as ep:

            def send_all(indices: list[int]) -> None:
                outstanding: deque[Completion] = deque()
                for i in indices:
                    comp = ep.send(b.nid, bodies[i], 0, msg_id=i + 1, timeout=120)
                    attempts[i].append(comp)
                    outstanding.append(comp)
                    if len(outstanding) >= window:
                        assert outstanding.popleft().wait(120), "a completion is owed"
                assert all(c.wait(120) for c in outstanding), "a completion is owed"

            send_all(list(range(count)))
            first = Counter(attempts[i][0].status for i in range(count))
            assert restarted.wait(60) and not restart_error, restart_error
            deadline = time.monotonic() + 120  # each round ends when its completions are in; no speed asked
            rounds = 0
            while failed := [i for i in range(count) if attempts[i][-1].status is not Status.DELIVERED]:
                assert time.monotonic() < deadline, Counter((attempts[i][-1].status, attempts[i][-1].reason) for i in failed)
                if rounds:
                    time.sleep(0.2)  # the receiver may not be attached again yet (NO_RECEIVER)
                send_all(failed)
                rounds += 1
            stats, daemon_side = ep.stats(), ep.daemon_stats()
        # Every message received; wait for the last ring entries to be taken, then stop.
        deadline = time.monotonic() + 60
        while {i for _, i in rx.receipts} != set(range(count)) and time.monotonic() < deadline:
            time.sleep(0.05)
        rx.stop.set()
        rx.join(10)
        assert rx.error is None, rx.error
    everything = [c for i in range(count) for c in attempts[i]]
    statuses = Counter(c.status for c in everything)
    by_life = Counter(life for life, _ in rx.receipts)
    received = Counter(i for _, i in rx.receipts)
    doubled = [i for i, n in received.items() if n > 1]
    print(f"{backend}: sent {count} (window {window}); first attempts {_names(first)}; "
          f"resent {len(everything) - count} in {rounds} rounds; received {len(rx.receipts)} "
          f"({by_life[0]} from the killed daemon, {len(rx.receipts) - by_life[0]} after the restart); "
          f"doubled {len(doubled)}, first attempt {_names(Counter(attempts[i][0].status for i in doubled))}")
    return _KillRun(count, first, attempts, rx, stats, daemon_side, everything, statuses, received)


@pytest.mark.parametrize("backend", ["tcp", "udt"])
def test_kill_9_of_the_receiving_daemon_accounts_for_every_message(backend: str) -> None:
    """kill -9 of the receiving daemon mid-stream, restarted with the same config; the
    receiving application attaches again, the sender resends every failed message with its
    id until all are DELIVERED.  Every attempt completes once with a status to act on; every
    message is received intact; a message is received twice only if an earlier attempt
    ended "delivery unknown" (the dead daemon had it in the ring; the new one cannot know
    its id), and never twice from one daemon."""
    if backend != "tcp" and availability().get(backend) is not None:
        pytest.skip(f"{backend} backend unavailable: {availability()[backend]}")
    # The kill is meant to hit traffic in flight.  On a loaded machine it can land while the
    # sender is idle with all it sent acknowledged (every first attempt is then DELIVERED,
    # also correct): the stream is run again then, up to three times in all.
    for _ in range(3):
        run = _kill_the_receiver_mid_stream(backend)
        if run.first[Status.DELIVERED] < run.messages:
            break
    count, first, attempts, rx, stats, daemon_side, everything, statuses, received = run
    assert first[Status.DELIVERED] < count and rx.life == 1, (first, rx.life)
    # One completion per attempt, each a status an application can act on; none owed.
    assert set(statuses) <= {Status.DELIVERED} | OUTCOME_UNKNOWN | NOT_DELIVERED, \
        Counter((c.status, c.reason) for c in everything if c.status is not Status.DELIVERED)
    assert stats["sent"] == len(everything) == stats["delivered"] + stats["failed"] and stats["in_flight"] == 0, stats
    assert statuses[Status.DELIVERED] == stats["delivered"] == count, (statuses, stats)
    assert daemon_side["in_flight"] == 0 and daemon_side["submitted"] == daemon_side["completed"] == len(everything), daemon_side
    assert daemon_side["failed"] == stats["failed"], (daemon_side, stats)
    # Every message received intact; none twice from one daemon.
    assert rx.corrupt == 0 and set(received) == set(range(count)), sorted(set(range(count)) - set(received))[:20]
    assert max(Counter(rx.receipts).values()) == 1
    # A resent message was DELIVERED by the restarted daemon (or answered from its memory of
    # ids, which holds only what it delivered itself): it was received after the restart.
    after_restart = {i for life, i in rx.receipts if life == 1}
    assert all(i in after_restart for i in range(count) if len(attempts[i]) > 1)
    # A second receipt needs an earlier attempt that may have been delivered.
    for i in range(count):
        unknown = sum(c.status in OUTCOME_UNKNOWN for c in attempts[i])
        assert received[i] <= 1 + unknown, (i, received[i], [(c.status, c.reason) for c in attempts[i]])
