"""lu2k.backends._udtcore: the lu2k-rate control law under a fake clock, and the raw binding on loopback."""

from __future__ import annotations

import random
import threading

import pytest

udtcore = pytest.importorskip("lu2k.backends._udtcore", reason="UDT binding not built (apt-get install libudt-dev)")
RateLaw = udtcore.RateLaw

MS = 1000  # microseconds


def drive(law, *, start_us: int, seconds: float, rtt_ms: float, loss: float = 0.0, rtt_fn=None, bw_bps: float = 0.0,
          bottleneck_bps: float = 0.0, seed: int = 1) -> int:
    """Feed ``law`` ACKs every 10 ms (UDT's SYN) for ``seconds``; packets sent follow its rate."""
    rnd = random.Random(seed)
    now = start_us
    end = start_us + int(seconds * 1e6)
    while now < end:
        pkts = max(1, int(law.rate_bps * 0.010 / (1500 * 8)))
        law.on_sent(pkts)
        lost = sum(1 for _ in range(pkts) if rnd.random() < loss)
        if lost:
            law.on_loss(lost)
        rtt = rtt_fn(now) if rtt_fn else rtt_ms
        arrival = min(law.rate_bps, bottleneck_bps) if bottleneck_bps else 0.0
        law.on_ack(now, rtt * MS, bw_bps, arrival)
        now += 10 * MS
    return now


def test_paces_at_target_through_random_loss() -> None:
    # GEO: 600 ms, 2 % random loss, RTT flat: a loss-driven control would collapse; this one holds.
    law = RateLaw(target_bps=19.4e6, heavy_loss=0.08)
    assert law.rate_bps == pytest.approx(19.4e6)
    drive(law, start_us=1, seconds=60, rtt_ms=600, loss=0.02)
    assert law.rate_bps == pytest.approx(19.4e6)
    assert law.backoffs == 0
    assert 0.005 < law.last_loss_fraction < 0.05
    assert law.min_rtt_us == pytest.approx(600 * MS)


def test_sustained_rtt_inflation_backs_off_then_recovers() -> None:
    law = RateLaw(target_bps=20e6)
    now = drive(law, start_us=1, seconds=5, rtt_ms=600)
    # A queue builds somewhere: +300 ms for 5 s.
    now = drive(law, start_us=now, seconds=5, rtt_ms=900)
    assert law.backoffs >= 1
    low = law.rate_bps
    assert low < 20e6 * 0.9
    # The queue drains: back to the target, additively.
    drive(law, start_us=now, seconds=30, rtt_ms=600)
    assert law.rate_bps == pytest.approx(20e6)
    assert law.rate_bps > low


def test_rtt_pause_mid_climb_is_not_taken_as_min_rtt() -> None:
    # UDT's smoothed RTT climbs from its 100 ms guess and can sit at ~290 ms while the
    # connection is idle; that looked settled, became the min RTT, and every later 600 ms
    # RTT was "inflation" (GEO, no loss: backed off to ~5 Mbit/s).  The profile RTT floors it.
    def climb(now: int) -> float:
        return 288.0 if now < 3_000_000 else 600.0

    for hint, backs_off in ((600 * MS, False), (0, True)):
        law = RateLaw(target_bps=19.4e6, rtt_hint_us=hint)
        drive(law, start_us=1, seconds=20, rtt_ms=0, rtt_fn=climb)
        if backs_off:  # without a profile RTT the control cannot tell (the old behaviour)
            assert law.backoffs >= 1 and law.min_rtt_us == pytest.approx(288 * MS)
        else:
            assert law.backoffs == 0 and law.rate_bps == pytest.approx(19.4e6)
            assert law.min_rtt_us == pytest.approx(600 * MS)


def test_one_inflated_interval_is_not_congestion() -> None:
    law = RateLaw(target_bps=20e6)
    now = drive(law, start_us=1, seconds=5, rtt_ms=600)
    now = drive(law, start_us=now, seconds=0.7, rtt_ms=800)  # about one control interval
    drive(law, start_us=now, seconds=5, rtt_ms=600)
    assert law.backoffs == 0 and law.rate_bps == pytest.approx(20e6)


def test_heavy_loss_backs_off() -> None:
    law = RateLaw(target_bps=20e6, heavy_loss=0.10)
    drive(law, start_us=1, seconds=10, rtt_ms=600, loss=0.30)
    assert law.backoffs >= 2 and law.rate_bps < 20e6 * 0.8


def test_probing_grows_until_the_queue_shows_and_respects_estimate() -> None:
    law = RateLaw(start_bps=1e6, max_bps=1e9)
    # A 20 Mbit/s bottleneck with a 1 s buffer: above 20 Mbit/s its queue grows, below it drains.
    queue = {"bits": 0.0}

    def rtt(_now: int) -> float:
        queue["bits"] = min(20e6, max(0.0, queue["bits"] + (law.rate_bps - 20e6) * 0.010))
        return 600.0 + queue["bits"] / 20e6 * 1e3

    drive(law, start_us=1, seconds=60, rtt_ms=600, rtt_fn=rtt, bottleneck_bps=20e6)
    assert law.backoffs >= 1
    assert 12e6 < law.rate_bps <= 24e6
    assert queue["bits"] < 20e6 * 0.5  # it did not leave a standing queue behind

    capped = RateLaw(start_bps=1e6, max_bps=1e9)
    drive(capped, start_us=1, seconds=30, rtt_ms=50, bw_bps=8e6)
    assert capped.rate_bps == pytest.approx(8e6)  # the receiver's estimate bounds a blind probe


def test_timeout_halves_and_floor_holds() -> None:
    law = RateLaw(target_bps=10e6, min_bps=3e6, rtt_hint_us=100 * MS)
    base = law.rto_us
    assert base == pytest.approx(300 * MS)
    law.on_timeout()
    assert law.rate_bps == pytest.approx(5e6) and law.rto_us == pytest.approx(2 * base)
    law.on_timeout()
    assert law.rate_bps == pytest.approx(3e6) and law.rto_us == pytest.approx(4 * base)
    for _ in range(5):
        law.on_timeout()
    assert law.rto_us == pytest.approx(16 * base)  # backed off, but bounded
    law.on_ack(1, 100 * MS)
    assert law.rto_us == pytest.approx(base)  # an ACK: the path is alive again
    assert law.period_us(1500) == pytest.approx(1500 * 8 / 3e6 * 1e6)


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="unknown congestion control parameter bogus"):
        RateLaw(bogus=1)
    with pytest.raises(ValueError, match="backoff"):
        RateLaw(backoff=1.5)
    with pytest.raises(ValueError, match="min_bps must be >= 0"):
        RateLaw(min_bps=-1)
    with pytest.raises(TypeError):
        RateLaw(1)


# --- the raw binding over loopback -------------------------------------------------------------


def _pair(cc: str = "lu2k-rate", **params):
    ls = udtcore.socket()
    udtcore.set_cc(ls, cc, **params)
    udtcore.setsockopt(ls, "linger", -1)
    udtcore.bind(ls, "127.0.0.1", 0)
    udtcore.listen(ls)
    port = udtcore.getsockname(ls)[1]
    got: dict[str, int] = {}
    t = threading.Thread(target=lambda: got.setdefault("u", udtcore.accept(ls)[0]))
    t.start()
    c = udtcore.socket()
    udtcore.set_cc(c, cc, **params)
    udtcore.setsockopt(c, "linger", -1)
    udtcore.connect(c, "127.0.0.1", port)
    t.join()
    return ls, c, got["u"]


def test_messages_keep_boundaries_and_perfmon_reports() -> None:
    ls, c, s = _pair(target_bps=200e6)
    try:
        sizes = [1, 1400, 1500, 70000, 1 << 20]
        for n in sizes:
            assert udtcore.sendmsg(c, bytes([n % 256]) * n) == n
        buf = bytearray((1 << 20) + 1)
        for n in sizes:
            got = udtcore.recvmsg_into(s, buf)
            assert got == n and buf[:n] == bytes([n % 256]) * n
        perf = udtcore.perfmon(c)
        assert perf["pkt_sent_total"] >= sum(-(-n // 1456) for n in sizes)
        assert 0 < perf["ms_rtt"] < 5000 and "mbps_bandwidth" in perf
        state = udtcore.cc_state(s)
        assert state["cc"] == "lu2k-rate" and state["target_mbit"] == pytest.approx(200)  # inherited from the listener
        # A message longer than the buffer is cut to the buffer: callers detect it by a full buffer.
        udtcore.sendmsg(c, b"y" * 500)
        assert udtcore.recvmsg_into(s, bytearray(100)) == 100
    finally:
        for u in (c, s, ls):
            udtcore.close(u)


def test_stock_control_and_errors() -> None:
    ls, c, s = _pair("udt")
    try:
        assert udtcore.cc_state(c) is None
        assert udtcore.getsockopt(c, "linger") == -1
        assert udtcore.state(c) == udtcore.CONNECTED
        with pytest.raises(ValueError, match="unknown UDT socket option"):
            udtcore.setsockopt(c, "nonsense", 1)
        with pytest.raises(ValueError, match="read-only"):
            udtcore.setsockopt(c, "state", 1)
        with pytest.raises(ValueError, match="unknown congestion control"):
            udtcore.set_cc(udtcore.socket(), "reno")
        with pytest.raises(ValueError, match="not a numeric"):
            udtcore.connect(udtcore.socket(), "localhost", 1)
    finally:
        for u in (c, s, ls):
            udtcore.close(u)
    # The peer is gone: the survivor's calls fail with UDT's error, not a crash.
    with pytest.raises(udtcore.UDTError) as info:
        udtcore.sendmsg(c, b"x")
    assert info.value.args[0] in (udtcore.E_INVSOCK, udtcore.E_CONNLOST, udtcore.E_NOCONN)


def test_close_wakes_a_blocked_receiver_and_rendezvous_connects() -> None:
    ls, c, s = _pair()
    errors: list[int] = []

    def rx() -> None:
        try:
            udtcore.recvmsg_into(s, bytearray(10))
        except udtcore.UDTError as e:
            errors.append(e.args[0])

    t = threading.Thread(target=rx)
    t.start()
    udtcore.close(s)
    t.join(30)
    assert not t.is_alive() and errors
    udtcore.close(c)
    udtcore.close(ls)

    # Rendezvous: both ends bind and connect to each other, nobody listens.
    a, b = udtcore.socket(), udtcore.socket()
    for u in (a, b):
        udtcore.setsockopt(u, "rendezvous", 1)
        udtcore.bind(u, "127.0.0.1", 0)
    pa, pb = udtcore.getsockname(a)[1], udtcore.getsockname(b)[1]
    t = threading.Thread(target=udtcore.connect, args=(b, "127.0.0.1", pa))
    t.start()
    udtcore.connect(a, "127.0.0.1", pb)
    t.join(30)
    try:
        udtcore.sendmsg(a, b"through the NAT")
        buf = bytearray(64)
        assert buf[: udtcore.recvmsg_into(b, buf)] == b"through the NAT"
    finally:
        udtcore.close(a)
        udtcore.close(b)


def test_rtt_climbing_at_start_is_not_mistaken_for_a_queue() -> None:
    # libudt's RTT starts at 100 ms and is smoothed twice: on GEO it climbs for seconds.
    law = RateLaw(target_bps=19.4e6, rtt_hint_us=600 * MS)
    assert law.rto_us == pytest.approx(2 * 600 * MS + 100 * MS)  # no timeout before the first ACK can come

    def climbing(now: int) -> float:
        return min(600.0, 100.0 + now / 1e6 * 100.0)  # +100 ms per second for 5 s

    now = drive(law, start_us=1, seconds=8, rtt_ms=0, rtt_fn=climbing)
    assert law.backoffs == 0 and law.rate_bps == pytest.approx(19.4e6)
    assert law.rtt_settled and law.min_rtt_us == pytest.approx(600 * MS)
    # Once settled, a real queue is still seen.
    drive(law, start_us=now, seconds=6, rtt_ms=900)
    assert law.backoffs >= 1


def test_epoll_reports_readiness() -> None:
    ls, c, s = _pair()
    eid = udtcore.epoll_create()
    try:
        udtcore.epoll_add(eid, s, udtcore.EPOLL_IN | udtcore.EPOLL_ERR)
        udtcore.sendmsg(c, b"wake up")
        readable: list[int] = []
        for _ in range(100):  # a bounded number of 100 ms waits, not a timing assertion
            readable, _writable = udtcore.epoll_wait(eid, 100)
            if s in readable:
                break
        assert s in readable
        buf = bytearray(16)
        assert buf[: udtcore.recvmsg_into(s, buf)] == b"wake up"
        udtcore.epoll_remove(eid, s)
        with pytest.raises(udtcore.UDTError):
            udtcore.epoll_wait(-1, 0)  # no such epoll id
    finally:
        udtcore.epoll_release(eid)
        for u in (c, s, ls):
            udtcore.close(u)


def test_a_call_waiting_on_a_libudt_lock_lets_the_other_python_threads_run() -> None:
    """getsockopt waits on the socket's connection lock, which a connect holds until it gives up
    (3 s to a peer that never answers); the waiting call must release the GIL meanwhile, or
    every Python thread of the process stops with it."""
    import socket
    import time

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers: no ICMP refusal either
    silent.bind(("127.0.0.1", 0))
    u = udtcore.socket()
    udtcore.bind(u, "127.0.0.1", 0)
    refused: list[int] = []

    def connect() -> None:
        try:
            udtcore.connect(u, "127.0.0.1", silent.getsockname()[1])
        except udtcore.UDTError as e:
            refused.append(e.args[0])

    returned = threading.Event()

    def query() -> None:
        udtcore.getsockopt(u, "mss")
        returned.set()

    connecting = threading.Thread(target=connect)
    connecting.start()
    try:
        while udtcore.state(u) != udtcore.CONNECTING:
            time.sleep(0.005)
        time.sleep(0.1)  # past CONNECTING: inside CUDT::connect, holding the lock
        waiting = threading.Thread(target=query)
        waiting.start()
        time.sleep(0.2)  # this thread wakes only if the waiting one gave the GIL up
        assert not returned.is_set(), "the main thread ran only after getsockopt returned: it kept the GIL while waiting"
        waiting.join(30)
        assert returned.is_set()
    finally:
        connecting.join(30)
        udtcore.close(u)
        silent.close()
    assert refused == [udtcore.E_NOSERVER]


def test_a_closed_channels_descriptor_is_kept_by_a_placeholder_until_its_worker_is_gone() -> None:
    # libudt closes a channel's UDP socket before it stops the channel's receive worker.  Were the
    # number free at once, another socket of the process could take it and the worker would wait
    # in that socket's recvmsg for good (with libudt's global lock held by the collector joining
    # it).  The binding keeps the number on an AF_UNIX placeholder where recvmsg fails at once.
    import os
    import socket
    import time

    from lu2k.backends import udt_guard

    sock = udt_guard.guarded_socket(socket.AF_INET, "127.0.0.1", 0, 1 << 20)
    port = sock.getsockname()[1]
    u = udtcore.socket(socket.AF_INET)
    udtcore.bind_udp(u, sock.fileno())
    fd = sock.detach()  # libudt owns it now
    udtcore.listen(u, 4)  # a listener: its channel's receive worker runs
    udtcore.close(u)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # libudt's collector closes the channel within a few seconds
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind(("127.0.0.1", port))
            break
        except OSError:
            time.sleep(0.1)
        finally:
            probe.close()
    else:
        pytest.fail("libudt never closed the channel's UDP socket")
    view = socket.socket(fileno=os.dup(fd))  # what the number names now
    try:
        assert view.family == socket.AF_UNIX and view.type == socket.SOCK_DGRAM
    finally:
        view.close()
