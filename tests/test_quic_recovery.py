"""lu2k.backends.quic_recovery: with FEC on, a packet is not declared lost while FEC may still
rebuild it; without FEC, and once FEC's time is up, aioquic's own rules hold."""

from __future__ import annotations

import pytest

pytest.importorskip("aioquic")

from aioquic.quic.packet import QuicPacketType  # noqa: E402
from aioquic.quic.packet_builder import QuicSentPacket  # noqa: E402
from aioquic.quic.recovery import QuicPacketRecovery, QuicPacketSpace  # noqa: E402
from aioquic.tls import Epoch  # noqa: E402

from lu2k.backends.quic_recovery import fec_packet_threshold, tolerate_fec  # noqa: E402
from lu2k.fec import parse_fec  # noqa: E402

RTT = 0.6
ACK_DELAY = 0.01


def _recovery_with_sent(n: int, interval: float) -> tuple[QuicPacketRecovery, QuicPacketSpace, list[int]]:
    """A connection's recovery with ``n`` packets sent ``interval`` apart from t=0 and a 600 ms RTT measured."""
    recovery = QuicPacketRecovery(congestion_control_algorithm="reno", initial_rtt=RTT, max_datagram_size=1400,
                                  peer_completed_address_validation=True, send_probe=lambda: None)
    space = QuicPacketSpace(is_application_data=True)
    recovery.spaces = [space]
    lost: list[int] = []
    for pn in range(n):
        packet = QuicSentPacket(epoch=Epoch.ONE_RTT, in_flight=True, is_ack_eliciting=True, is_crypto_packet=False,
                                packet_number=pn, packet_type=QuicPacketType.ONE_RTT, sent_time=pn * interval, sent_bytes=1400)
        packet.delivery_handlers.append((lambda delivery, pn=pn: lost.append(pn) if delivery.name == "LOST" else None, ()))
        recovery.on_packet_sent(packet=packet, space=space)
    recovery._rtt_initialized = True
    recovery._rtt_latest = recovery._rtt_smoothed = recovery._rtt_min = RTT
    return recovery, space, lost


def _ack_all_but_first(recovery: QuicPacketRecovery, space: QuicPacketSpace, upto: int, now: float) -> None:
    from aioquic.quic.rangeset import RangeSet

    recovery.on_ack_received(ack_rangeset=RangeSet([range(1, upto + 1)]), ack_delay=0.0, now=now, space=space)


def test_without_fec_three_later_acks_declare_a_packet_lost() -> None:
    recovery, space, lost = _recovery_with_sent(100, 1 / 1700)
    tolerate_fec(recovery, parse_fec("off", rtt_s=RTT), ACK_DELAY)  # nothing changes
    _ack_all_but_first(recovery, space, 50, now=RTT + 50 / 1700)
    assert lost == [0]


def test_with_fec_a_packet_waits_for_its_group_then_counts_as_lost() -> None:
    fec = parse_fec("auto", rtt_s=RTT)
    recovery, space, lost = _recovery_with_sent(300, 1 / 1700)
    tolerate_fec(recovery, fec, ACK_DELAY)
    # The rest of its group and beyond acknowledged on time: FEC may still rebuild packet 0.
    _ack_all_but_first(recovery, space, 120, now=RTT + 120 / 1700)
    assert lost == [] and space.loss_time is not None
    # Past 9/8 of the RTT plus the group's wait and the ACK delay: lost after all.
    assert space.loss_time == pytest.approx(9 / 8 * RTT + fec.max_delay + 2 * ACK_DELAY)
    recovery.on_loss_detection_timeout(now=space.loss_time + 1e-6)
    assert lost == [0]


def test_the_packet_threshold_covers_two_groups() -> None:
    fec = parse_fec("auto", rtt_s=RTT)
    assert fec_packet_threshold(fec) >= 2 * fec.k_max
    recovery, space, lost = _recovery_with_sent(600, 1e-5)  # a burst: the time threshold is far away
    tolerate_fec(recovery, fec, ACK_DELAY)
    _ack_all_but_first(recovery, space, fec_packet_threshold(fec) - 1, now=RTT)
    assert lost == []
    _ack_all_but_first(recovery, space, fec_packet_threshold(fec), now=RTT)  # that many later packets acknowledged
    assert lost == [0]
