"""QUIC backend, loss detection that leaves forward error correction its time.

With ``fec`` on, a datagram lost on the wire is rebuilt at the receiver when its FEC group
closes (:mod:`lu2k.fec`): up to the group's ``max_delay`` after it was sent, while the datagrams
after it arrived on time.  aioquic declares a packet lost as soon as three later ones are
acknowledged (RFC 9002's packet threshold) or once it is 9/8 of an RTT old when a later one is
acknowledged (the time threshold, RTT/8 of slack).  Both fire before a rebuilt packet's ACK can
come back, so each datagram FEC rebuilt was also retransmitted -- the bytes twice -- and the
congestion controller counted it as a loss: at 2 % loss on GEO that took the BBR bandwidth
estimate 17 % below the link and put a queue under every message.

:func:`tolerate_fec` gives one connection's loss detection a packet threshold wider than two
groups (a group's packets, its repair, and the next group's packets that can be acknowledged
before the rebuild) and adds the group delay plus the peer's ACK delay to the time threshold.
What FEC cannot rebuild is declared lost that much later: by at most the group delay plus the ACK
delay, next to a retransmission round trip.
"""

from __future__ import annotations

import functools
from typing import Any

from aioquic.quic.recovery import K_PACKET_THRESHOLD, K_TIME_THRESHOLD, QuicPacketRecovery, QuicPacketSpace

from ..fec import MAX_PIECES, FecSettings


def fec_packet_threshold(settings: FecSettings) -> int:
    """Packets acknowledged after one before it counts as lost: two groups' data and repair."""
    return max(K_PACKET_THRESHOLD, 2 * min(MAX_PIECES, settings.k_max + settings.k_max // 4))


def tolerate_fec(recovery: QuicPacketRecovery, settings: FecSettings, ack_delay: float) -> None:
    """Make ``recovery`` (one connection's) wait for FEC's rebuilds before declaring a loss."""
    if not settings.enabled:
        return
    detect = functools.partial(_detect_loss, recovery, packet_threshold=fec_packet_threshold(settings),
                               extra_delay=settings.max_delay + 2 * ack_delay)
    recovery._detect_loss = detect  # type: ignore[method-assign]


def _detect_loss(recovery: Any, *, now: float, space: QuicPacketSpace, packet_threshold: int, extra_delay: float) -> None:
    """RFC 9002's loss detection (appendix A.10) with both thresholds as parameters, on aioquic
    1.7's recovery state (it replaces ``QuicPacketRecovery._detect_loss`` of one connection)."""
    loss_delay = K_TIME_THRESHOLD * (
        max(recovery._rtt_latest, recovery._rtt_smoothed) if recovery._rtt_initialized else recovery._rtt_initial
    ) + extra_delay
    newest_lost = space.largest_acked_packet - packet_threshold
    time_threshold = now - loss_delay

    lost_packets = []
    space.loss_time = None
    for packet_number, packet in space.sent_packets.items():
        if packet_number > space.largest_acked_packet:
            break
        if packet_number <= newest_lost or packet.sent_time <= time_threshold:
            lost_packets.append(packet)
        else:
            packet_loss_time = packet.sent_time + loss_delay
            if space.loss_time is None or space.loss_time > packet_loss_time:
                space.loss_time = packet_loss_time

    recovery._on_packets_lost(now=now, packets=lost_packets,
                              persistent_congestion=recovery._in_persistent_congestion(packets=lost_packets), space=space)
