"""lu2k.lab.model: the per-direction link, driven by a fake clock (no I/O, no event loop)."""

from __future__ import annotations

import math

import pytest

from lu2k.lab.model import Drop, LatenessStats, LinkModel
from lu2k.lab.spec import GilbertElliott, LinkSpec


def test_rate_cap_serialises_back_to_back_packets() -> None:
    link = LinkModel(LinkSpec(rate_bps=8e6, delay_s=0.1))  # 1 byte per microsecond
    r1 = link.offer(1000, now=0.0)
    r2 = link.offer(1000, now=0.0)
    assert r1 == pytest.approx(0.001 + 0.1)
    assert r2 == pytest.approx(0.002 + 0.1)
    # After the link has drained, a packet only pays its own serialisation time.
    assert link.offer(500, now=1.0) == pytest.approx(1.0 + 0.0005 + 0.1)


def test_throughput_of_overloaded_link_equals_rate() -> None:
    spec = LinkSpec(rate_bps=10e6, delay_s=0.02)
    link = LinkModel(spec)
    delivered = 0
    last = 0.0
    # Offer 3x the link rate for 2 s of fake time.
    t = 0.0
    while t < 2.0:
        r = link.offer(1500, t)
        if not isinstance(r, Drop):
            delivered += 1500
            last = max(last, r)
        t += 1500 * 8 / 30e6
    assert link.counters.drops_queue > 0
    # Everything delivered left the link at exactly the configured rate (plus the queue drain).
    duration = last - spec.delay_s
    assert delivered * 8 / duration == pytest.approx(10e6, rel=0.01)


def test_drop_tail_queue_is_bounded_in_bytes() -> None:
    spec = LinkSpec(rate_bps=1e6, delay_s=0.0, queue_bytes=10 * 1500)
    link = LinkModel(spec)
    verdicts = [link.offer(1500, 0.0) for _ in range(15)]
    accepted = [v for v in verdicts if not isinstance(v, Drop)]
    assert len(accepted) == 10
    assert verdicts[10:] == [Drop.QUEUE] * 5
    assert link.counters.max_queue_bytes <= spec.queue_bytes
    assert link.backlog_bytes(0.0) == 15000
    # Once one packet has been serialised there is room for exactly one more.
    t = 1500 * 8 / 1e6
    assert not isinstance(link.offer(1500, t), Drop)
    assert link.offer(1500, t) is Drop.QUEUE


def test_unlimited_rate_has_no_queue() -> None:
    link = LinkModel(LinkSpec(rate_bps=0, delay_s=0.3))
    assert all(link.offer(9000, 0.0) == pytest.approx(0.3) for _ in range(1000))
    assert link.counters.drops_queue == 0


def _loss_fraction(spec: LinkSpec, n: int = 100_000) -> tuple[float, list[bool]]:
    link = LinkModel(spec)
    pattern = [isinstance(link.offer(100, i * 1e-3), Drop) for i in range(n)]
    return sum(pattern) / n, pattern


@pytest.mark.parametrize("p", [0.001, 0.01, 0.02, 0.1])
def test_bernoulli_loss_within_statistical_bounds(p: float) -> None:
    n = 100_000
    frac, _ = _loss_fraction(LinkSpec(loss=p, seed=7), n)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - p) < 5 * sigma


def test_loss_is_repeatable_per_seed_and_differs_between_seeds() -> None:
    _, a = _loss_fraction(LinkSpec(loss=0.05, seed=3), 5000)
    _, b = _loss_fraction(LinkSpec(loss=0.05, seed=3), 5000)
    _, c = _loss_fraction(LinkSpec(loss=0.05, seed=4), 5000)
    assert a == b
    assert a != c


def test_loss_pattern_does_not_depend_on_jitter() -> None:
    _, plain = _loss_fraction(LinkSpec(loss=0.05, seed=3), 5000)
    _, jittery = _loss_fraction(LinkSpec(loss=0.05, seed=3, delay_s=0.01, jitter_s=0.005), 5000)
    assert plain == jittery


def test_gilbert_elliott_mean_and_burstiness() -> None:
    ge = GilbertElliott.from_mean(0.02, burst_len=5)
    n = 200_000
    frac, pattern = _loss_fraction(LinkSpec(burst=ge, seed=11), n)
    assert frac == pytest.approx(0.02, rel=0.15)
    runs: list[int] = []
    run = 0
    for lost in pattern:
        if lost:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    mean_run = sum(runs) / len(runs)
    # Geometric bursts with mean 1/p_bg = 5; Bernoulli loss at 2 % would give ~1.02.
    assert 4.0 < mean_run < 6.0


def test_jitter_never_reorders_without_reorder_option() -> None:
    link = LinkModel(LinkSpec(rate_bps=20e6, delay_s=0.3, jitter_s=0.02, seed=5))
    releases = [link.offer(1200, i * 1e-4) for i in range(20_000)]
    times = [r for r in releases if not isinstance(r, Drop)]
    assert times == sorted(times)
    spread = [t - i * 1e-4 for i, t in enumerate(times)]
    assert max(spread) - min(spread) > 0.01  # the jitter is really there


def test_reorder_option_reorders_the_chosen_fraction() -> None:
    link = LinkModel(LinkSpec(rate_bps=20e6, delay_s=0.05, reorder=0.05, reorder_delay_s=0.005, seed=9))
    times = [link.offer(1200, i * 1e-3) for i in range(20_000)]
    released = [t for t in times if not isinstance(t, Drop)]
    inversions = sum(1 for a, b in zip(released, released[1:]) if b < a)
    assert link.counters.reordered == pytest.approx(1000, rel=0.2)
    assert inversions > 0.5 * link.counters.reordered


def test_link_down_drops_everything_until_up() -> None:
    link = LinkModel(LinkSpec(rate_bps=1e6))
    link.set_up(False)
    assert link.offer(100, 0.0) is Drop.DOWN
    link.set_up(True)
    assert not isinstance(link.offer(100, 0.1), Drop)
    assert link.counters.drops_down == 1 and link.counters.packets_out == 1


def test_counters_add_up() -> None:
    link = LinkModel(LinkSpec(rate_bps=1e6, loss=0.1, queue_bytes=20 * 1500, seed=2))
    for i in range(5000):
        link.offer(1500, i * 1e-3)
    c = link.counters
    assert c.packets_in == c.packets_out + c.drops_queue + c.drops_loss + c.drops_down
    assert c.drops_queue > 0 and c.drops_loss > 0
    d = c.to_dict()
    assert d["packets_in"] == 5000 and "p99_us" in d["lateness"]


def test_lateness_stats_percentiles_are_bounded() -> None:
    s = LatenessStats(capacity=100)
    for i in range(1000):
        s.add(i * 1e-6)
    assert s.count == 1000 and len(s._ring) == 100
    assert s.max == pytest.approx(999e-6)
    assert s.percentile(50) >= 900e-6  # the ring keeps the most recent values


def test_reconfiguration_outage_and_rtt_jump() -> None:
    """leo-fast-style link: each period opens with an outage and a redrawn delay within the range."""
    spec = LinkSpec(rate_bps=0.0, delay_s=0.015, delay_max_s=0.030, reconfig_s=15.0, outage_s=0.3)
    link = LinkModel(spec)
    # Period 0 has no outage; later periods are down for their first 300 ms and up after it.
    assert not isinstance(link.offer(100, 0.0), Drop)
    assert link.offer(100, 15.0) is Drop.DOWN
    assert link.offer(100, 15.299) is Drop.DOWN
    delays = []
    for period in range(1, 40):
        t = period * 15.0 + 0.31
        release = link.offer(100, t)
        assert not isinstance(release, Drop)
        delays.append(release - t)
        assert release - t == pytest.approx(spec.period_delay(period))
    assert all(0.015 <= d <= 0.030 for d in delays)
    assert max(delays) - min(delays) > 0.008  # the RTT really jumps around its range
    assert link.counters.drops_down == 2 and link.counters.reconfigurations == 39


def test_reconfiguration_is_the_same_in_both_directions_and_keeps_order() -> None:
    ab = LinkModel(LinkSpec(delay_s=0.015, delay_max_s=0.030, reconfig_s=1.0, seed=2), "ab")
    ba = LinkModel(LinkSpec(delay_s=0.015, delay_max_s=0.030, reconfig_s=1.0, seed=3), "ba")
    releases = []
    for i in range(20_000):
        t = i * 1e-3
        r1, r2 = ab.offer(100, t), ba.offer(100, t)
        assert r1 == r2  # same instants, same delay: both directions jump together
        releases.append(r1)
    # A drop in delay never lets a packet overtake the one before it.
    assert all(b >= a for a, b in zip(releases, releases[1:]))
