"""The pure rules for a QUIC path that went silent and came back (lu2k.backends.quic_pathwatch)."""

from __future__ import annotations

import pytest

from lu2k.backends.quic_pathwatch import DATA_DATAGRAM, PathWatch

RTT = 0.045
DATA = 1472
ACK = 60


def _receiving(watch: PathWatch, until: float) -> None:
    t = 0.0
    while t <= until:
        watch.on_datagram(t, DATA)
        t += 0.001


def test_the_receiver_pings_into_a_silence_after_data_until_something_comes() -> None:
    watch = PathWatch(limit=5.0)
    _receiving(watch, 1.0)
    last = watch.last_data
    # Not before max(100 ms, 2 RTT) of silence.
    assert not watch.ping_due(last + 0.05, RTT)
    assert watch.next_check(last + 0.05, RTT) == pytest.approx(last + 0.1)
    assert watch.ping_due(last + 0.1, RTT)
    # Then every max(20 ms, RTT / 4), not faster.
    assert not watch.ping_due(last + 0.11, RTT)
    assert watch.next_check(last + 0.11, RTT) == pytest.approx(last + 0.1 + 0.02)
    t, sent = last + 0.12, 1
    while t < last + 0.4:  # a 300 ms outage: nothing arrives
        sent += watch.ping_due(t, RTT)
        t += 0.005
    assert sent == watch.pings and 13 <= sent <= 16
    # The path is back: the peer's ACK of a PING arrives; the watch ends with it.
    watch.on_datagram(last + 0.42, ACK)
    assert not watch.ping_due(last + 0.5, RTT)
    assert watch.next_check(last + 0.5, RTT) is None
    # Data again, then silence again: a new watch.
    watch.on_datagram(2.0, DATA)
    assert watch.next_check(2.0, RTT) == pytest.approx(2.1)
    assert watch.ping_due(2.1, RTT)


def test_a_peer_that_only_stopped_sending_gets_one_ping() -> None:
    watch = PathWatch(limit=5.0)
    _receiving(watch, 1.0)
    last = watch.last_data
    assert watch.ping_due(last + 0.1, RTT)
    watch.on_datagram(last + 0.1 + RTT, ACK)  # its ACK of our PING
    t = last + 0.2
    while t < last + 3.0:
        assert not watch.ping_due(t, RTT)
        t += 0.01
    assert watch.pings == 1


def test_an_ack_after_the_data_means_the_path_is_alive() -> None:
    # The peer stopped sending data but its ACKs of what we sent still arrive: nothing to do.
    watch = PathWatch(limit=5.0)
    _receiving(watch, 1.0)
    watch.on_datagram(1.05, ACK)
    assert not watch.ping_due(1.5, RTT)
    assert watch.next_check(1.5, RTT) is None


def test_nothing_is_watched_before_data_or_after_the_limit() -> None:
    watch = PathWatch(limit=2.0)
    assert watch.next_check(0.0, RTT) is None and not watch.ping_due(10.0, RTT)
    watch.on_datagram(0.0, ACK)  # a handshake or keepalive packet is not data
    assert not watch.ping_due(1.0, RTT)
    watch.on_datagram(1.0, DATA_DATAGRAM)
    assert watch.ping_due(1.2, RTT)
    assert not watch.ping_due(3.1, RTT)  # 2.1 s of silence: past the limit, the peer is gone
    assert watch.next_check(3.1, RTT) is None


def test_intervals_follow_a_long_rtt() -> None:
    watch = PathWatch(limit=10.0)
    watch.on_datagram(0.0, DATA)
    geo = 0.6
    assert not watch.ping_due(1.1, geo)  # 2 RTT = 1.2 s of silence first
    assert watch.ping_due(1.2, geo)
    assert not watch.ping_due(1.3, geo)  # then every RTT / 4 = 150 ms
    assert watch.ping_due(1.35, geo)


def test_the_sender_probes_early_only_while_backed_off_and_spaced() -> None:
    watch = PathWatch(limit=5.0)
    assert not watch.probe_due(1.0, RTT, backed_off=False)
    assert watch.probe_due(1.0, RTT, backed_off=True)
    assert not watch.probe_due(1.005, RTT, backed_off=True)  # max(10 ms, RTT / 4) apart
    assert watch.probe_due(1.012, RTT, backed_off=True)
    assert watch.early_probes == 2


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PathWatch(limit=0)
