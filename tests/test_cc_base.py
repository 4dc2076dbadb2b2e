"""Shared controller parts on synthetic sequences: delivery-rate samples, rounds, signals, registry."""

from __future__ import annotations

import math

import pytest

from lu2k.cc import controller_names, create_controller, default_for, get_controller
from lu2k.cc.base import CongestionSignals, DeliveryRateSampler, MaxFilter, RoundStats
from lu2k.errors import ConfigError

MSS = 1000


def test_rate_sample_is_delivered_over_the_longer_interval() -> None:
    s = DeliveryRateSampler()
    inflight = 0
    pkts = []
    for i in range(10):  # 10 packets sent 10 ms apart
        pkts.append(s.on_sent(i * 0.01, MSS, inflight, app_limited=False))
        inflight += MSS
    # Acked 100 ms after each was sent: 10 packets over ~90 ms of sending.
    samples = []
    for i, p in enumerate(pkts):
        sample, _ = s.on_acked(0.1 + i * 0.01, p)
        samples.append(sample)
    last = samples[-1]
    assert last.delivered == 10 * MSS
    assert last.rate == pytest.approx(10 * MSS / 0.19, rel=1e-6)  # ack interval 0.19 s (since idle restart)
    assert all(math.isclose(x.rtt, 0.1) for x in samples)
    # Steady state after the first round: one packet per 10 ms is 100 kB/s.
    pkt = s.on_sent(0.2, MSS, 0, app_limited=False)
    s2, _ = s.on_acked(0.3, pkt)
    assert s2.rtt == pytest.approx(0.1)


def test_lost_packets_are_not_delivered_and_count_in_the_round() -> None:
    s = DeliveryRateSampler()
    a = s.on_sent(0.0, MSS, 0, False)
    b = s.on_sent(0.001, MSS, MSS, False)
    s.on_lost(b)
    s.on_acked(0.1, a)
    assert s.delivered == MSS and s.lost == MSS
    assert s.last_round is not None and s.last_round.loss_rate == pytest.approx(0.5)


def test_rounds_advance_once_per_round_trip() -> None:
    s = DeliveryRateSampler()
    rounds = 0
    inflight = 0
    t = 0.0
    queue = []
    # 5 packets per RTT of 0.1 s for 10 RTTs.
    for rtt_i in range(10):
        for k in range(5):
            queue.append((t + 0.1, s.on_sent(t, MSS, inflight, False)))
            inflight += MSS
            t += 0.02
        while queue and queue[0][0] <= t:
            at, p = queue.pop(0)
            _, ended = s.on_acked(at, p)
            inflight -= MSS
            rounds += ended
    assert 8 <= rounds <= 10


def test_app_limited_marks_samples() -> None:
    s = DeliveryRateSampler()
    p = s.on_sent(0.0, MSS, 0, app_limited=True)
    sample, _ = s.on_acked(0.1, p)
    assert sample.app_limited
    q = s.on_sent(0.1, MSS, 0, app_limited=False)
    assert not q.app_limited


def test_max_filter_forgets_old_rounds() -> None:
    f = MaxFilter(3)
    f.update(1, 10.0)
    f.update(2, 5.0)
    f.update(3, 6.0)
    assert f.value == 10.0
    f.update(4, 4.0)
    assert f.value == 6.0
    f.reset(5, 1.0)
    assert f.value == 1.0


def _round(n: int, delivered_pkts: int, lost_pkts: int, min_rtt: float, max_rtt: float) -> RoundStats:
    r = RoundStats(n, delivered_pkts * MSS, lost_pkts * MSS, min_rtt, max_rtt)
    return r


def test_signals_learn_random_loss_as_baseline() -> None:
    sig = CongestionSignals(mss=MSS)
    for n in range(40):  # 1 % loss, no queue
        excess, queue = sig.on_round(_round(n, 990, 10, 0.6, 0.61), 0.6)
        assert not queue
        assert not excess
    assert sig.baseline_loss == pytest.approx(0.01, rel=0.05)


def test_signals_flag_loss_above_baseline() -> None:
    sig = CongestionSignals(mss=MSS)
    for n in range(40):
        sig.on_round(_round(n, 990, 10, 0.6, 0.61), 0.6)
    excess, _ = sig.on_round(_round(41, 940, 60, 0.6, 0.9), 0.6)  # 6 % with a queue
    assert excess
    # The congestion round did not raise the baseline.
    assert sig.baseline_loss == pytest.approx(0.01, rel=0.05)


def test_signals_flag_standing_queue() -> None:
    sig = CongestionSignals(mss=MSS)
    _, q1 = sig.on_round(_round(1, 1000, 0, 0.9, 1.0), 0.6)
    _, q2 = sig.on_round(_round(2, 1000, 0, 0.95, 1.0), 0.6)
    assert q1 and q2 and sig.queue_rounds == 2
    _, q3 = sig.on_round(_round(3, 1000, 0, 0.6, 0.7), 0.6)
    assert not q3 and sig.queue_rounds == 0


def test_signals_ignore_tiny_rounds() -> None:
    sig = CongestionSignals(mss=MSS)
    assert sig.on_round(_round(1, 2, 2, 0.6, 5.0), 0.6) == (False, False)


def test_registry_and_defaults() -> None:
    assert {"bbr", "rate"} <= set(controller_names())
    assert get_controller("bbr").name == "bbr"
    with pytest.raises(ConfigError, match="unknown congestion controller"):
        get_controller("vegas")
    with pytest.raises(ConfigError, match="bad parameters"):
        create_controller("bbr", mss=1200, colour="blue")
    with pytest.raises(ConfigError, match="needs a positive rate"):
        create_controller("rate", mss=1200, rate=0)
    assert default_for(600, 0.0) == "bbr"
    assert default_for(200, None) == "bbr"
    assert default_for(40, 0.01) == "bbr"
    assert default_for(40, 0.0) == "cubic"
    assert default_for(None, None) == "cubic"
