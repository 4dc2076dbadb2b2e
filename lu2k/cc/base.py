"""The congestion-controller interface and the measurement parts every controller shares.

Pure and sans-I/O, like aioquic's ``QuicConnection``: a controller is told, with ``now``,
that a packet was sent, acknowledged, lost or discarded; it answers with a congestion window
(bytes that may be in flight) and a pacing rate (bytes per second).  Nothing here reads a
clock, so the controllers are tested on synthetic ack/loss sequences with a fake clock
(see :mod:`lu2k.cc.sim`) and driven for real by :mod:`lu2k.cc.aioquic_adapter`.

Shared measurement (after draft-cheng-iccrg-delivery-rate-estimation):

* :class:`DeliveryRateSampler` stamps each sent packet with the connection's delivered-bytes
  count and time, so that when the packet is acknowledged the bytes delivered in between,
  divided by the longer of the send and ack intervals, is a delivery-rate sample that random
  loss does not bias (a lost packet is simply not delivered; the sample is what got through).
* Rounds: a round trip ends when a packet sent after the previous round ended is acked.
  Per-round loss and minimum RTT feed :class:`CongestionSignals`.

:class:`CongestionSignals` is how a loss-tolerant controller still backs off on a shared link.
Random (medium) loss does not depend on our rate or on the queue; congestion loss happens when
the bottleneck queue is full, so it comes with RTT inflation and it grows with the rate.  So:

* the *baseline* loss rate is learned only from rounds in which the RTT stayed near the
  minimum (no queue, so whatever was lost was lost on the medium);
* a round whose loss exceeds that baseline by more than sampling noise allows is *excess loss*;
* a round in which even the smallest RTT sample stayed well above the path minimum means a
  standing queue that our own pacing is not draining: *queue build-up*.

Either signal tells the controller it is sending faster than its share of the bottleneck.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError


# SentPacket and RateSample are made once per packet sent and acknowledged.  A dataclass's
# generated __init__ stays interpreted under mypyc (a frozen one sets each field through
# object.__setattr__); these written-out ones compile.
class SentPacket:
    """What a controller remembers about one packet until it is acked, lost or discarded."""

    __slots__ = ("size", "sent_time", "delivered", "delivered_time", "first_sent_time", "app_limited")

    def __init__(self, size: int, sent_time: float, delivered: int, delivered_time: float,
                 first_sent_time: float, app_limited: bool) -> None:
        self.size = size
        self.sent_time = sent_time
        self.delivered = delivered  # connection's delivered bytes when this packet was sent
        self.delivered_time = delivered_time  # when ``delivered`` last grew, as of sending
        self.first_sent_time = first_sent_time  # send time of the packet that opened the current sample interval
        self.app_limited = app_limited  # the sender had nothing more to send: the sample understates the path

    def __repr__(self) -> str:
        return (f"SentPacket(size={self.size}, sent_time={self.sent_time}, delivered={self.delivered}, "
                f"delivered_time={self.delivered_time}, first_sent_time={self.first_sent_time}, "
                f"app_limited={self.app_limited})")


class RateSample:
    """One delivery-rate sample, produced when a packet is acknowledged (read-only by convention)."""

    __slots__ = ("rate", "rtt", "delivered", "interval", "app_limited")

    def __init__(self, rate: float, rtt: float, delivered: int, interval: float, app_limited: bool) -> None:
        self.rate = rate  # bytes per second
        self.rtt = rtt  # this packet's RTT (send to ack), seconds
        self.delivered = delivered  # bytes delivered over the sample interval
        self.interval = interval
        self.app_limited = app_limited

    def __repr__(self) -> str:
        return (f"RateSample(rate={self.rate}, rtt={self.rtt}, delivered={self.delivered}, "
                f"interval={self.interval}, app_limited={self.app_limited})")


@dataclass(slots=True)
class RoundStats:
    """What happened during one round trip."""

    number: int
    delivered: int = 0
    lost: int = 0
    min_rtt: float = math.inf
    max_rtt: float = 0.0
    max_rate: float = 0.0

    @property
    def loss_rate(self) -> float:
        total = self.delivered + self.lost
        return self.lost / total if total else 0.0


class DeliveryRateSampler:
    """Delivery-rate estimation and round counting, shared by every controller."""

    def __init__(self) -> None:
        self.delivered = 0  # bytes acknowledged so far
        self.lost = 0
        self.delivered_time = 0.0
        self.first_sent_time = 0.0
        self.app_limited_until = 0  # delivered count below which samples are app-limited
        self.round_count = 0
        self._next_round_delivered = 0
        self.round = RoundStats(0)
        self.last_round: RoundStats | None = None

    def on_sent(self, now: float, size: int, bytes_in_flight: int, app_limited: bool) -> SentPacket:
        if bytes_in_flight == 0:
            # Restarting from idle: the interval starts now, not when the last ack came.
            self.first_sent_time = now
            self.delivered_time = now
        if app_limited:
            self.app_limited_until = self.delivered + bytes_in_flight + size
        return SentPacket(size, now, self.delivered, self.delivered_time, self.first_sent_time,
                          self.app_limited_until > 0)

    def on_acked(self, now: float, pkt: SentPacket) -> tuple[RateSample, bool]:
        """Account an acked packet; returns its rate sample and whether a round ended."""
        self.delivered += pkt.size
        self.delivered_time = now
        if self.app_limited_until and self.delivered >= self.app_limited_until:
            self.app_limited_until = 0
        # The next packet sent opens a sample interval that starts at this one's send time.
        self.first_sent_time = pkt.sent_time
        send_elapsed = pkt.sent_time - pkt.first_sent_time
        ack_elapsed = now - pkt.delivered_time
        interval = max(send_elapsed, ack_elapsed)
        delivered = self.delivered - pkt.delivered
        rate = delivered / interval if interval > 0 else 0.0
        rtt = max(now - pkt.sent_time, 1e-6)
        sample = RateSample(rate, rtt, delivered, interval, pkt.app_limited)
        r = self.round
        r.delivered += pkt.size
        r.min_rtt = min(r.min_rtt, rtt)
        r.max_rtt = max(r.max_rtt, rtt)
        if not pkt.app_limited:
            r.max_rate = max(r.max_rate, rate)
        round_ended = False
        if pkt.delivered >= self._next_round_delivered:
            self._next_round_delivered = self.delivered
            self.round_count += 1
            self.last_round = r
            self.round = RoundStats(self.round_count)
            round_ended = True
        return sample, round_ended

    def on_lost(self, pkt: SentPacket) -> None:
        self.lost += pkt.size
        self.round.lost += pkt.size


class CongestionSignals:
    """Tells random loss from congestion (see the module docstring for the reasoning)."""

    def __init__(self, *, loss_margin: float = 0.015, queue_factor: float = 0.25,
                 queue_slack: float = 0.020, min_round_packets: int = 8, mss: int = 1200) -> None:
        self.loss_margin = loss_margin
        self.queue_factor = queue_factor
        self.queue_slack = queue_slack
        self.min_round_packets = min_round_packets
        self.mss = mss
        self.baseline_loss = 0.0
        self._baseline_weight = 0.0  # how much evidence the baseline rests on (0..1)
        self.queue_rounds = 0  # consecutive rounds with a standing queue
        self.excess_loss_rounds = 0
        self.events = 0

    def queue_threshold(self, min_rtt: float) -> float:
        return min_rtt * (1 + self.queue_factor) + self.queue_slack

    def on_round(self, r: RoundStats, min_rtt: float) -> tuple[bool, bool]:
        """Judge a finished round: (excess loss?, standing queue?)."""
        packets = (r.delivered + r.lost) / self.mss
        if packets < self.min_round_packets or not math.isfinite(min_rtt):
            return False, False
        loss = r.loss_rate
        queue_free = r.max_rtt <= self.queue_threshold(min_rtt)
        # Binomial noise of a loss-rate estimate over this many packets, 3 sigma.
        p = max(self.baseline_loss, 0.002)
        noise = 3 * math.sqrt(p * (1 - p) / packets)
        excess = loss > self.baseline_loss + max(self.loss_margin, noise)
        if queue_free and not excess:
            # Nothing queued, so what was lost was lost on the medium.
            w = 0.125
            self.baseline_loss += w * (loss - self.baseline_loss)
            self._baseline_weight = min(1.0, self._baseline_weight + w)
        elif queue_free and excess and self._baseline_weight < 0.5:
            # Early on we cannot yet tell: take loss without a queue as the medium's.
            self.baseline_loss += 0.25 * (loss - self.baseline_loss)
            self._baseline_weight = min(1.0, self._baseline_weight + 0.25)
            excess = False
        standing_queue = r.min_rtt > self.queue_threshold(min_rtt)
        self.queue_rounds = self.queue_rounds + 1 if standing_queue else 0
        self.excess_loss_rounds = self.excess_loss_rounds + 1 if excess else 0
        if excess or standing_queue:
            self.events += 1
        return excess, standing_queue


class CongestionController(abc.ABC):
    """A sans-I/O congestion controller: events in, ``cwnd`` and ``pacing_rate`` out."""

    name: ClassVar[str]

    def __init__(self, *, mss: int) -> None:
        if mss < 100:
            raise ConfigError(f"max datagram size {mss} is too small for congestion control")
        self.mss = mss
        self.bytes_in_flight = 0
        self.cwnd = 10 * mss
        self.pacing_rate = 0.0  # bytes/s; 0 = not pacing (only before the first estimate)
        self.sampler = DeliveryRateSampler()

    # --- events -------------------------------------------------------------------------------

    def on_sent(self, now: float, size: int, app_limited: bool = False) -> SentPacket:
        pkt = self.sampler.on_sent(now, size, self.bytes_in_flight, app_limited)
        self.bytes_in_flight += size
        return pkt

    def on_acked(self, now: float, pkt: SentPacket) -> None:
        self.bytes_in_flight = max(0, self.bytes_in_flight - pkt.size)
        sample, round_ended = self.sampler.on_acked(now, pkt)
        self._on_sample(now, sample, round_ended)

    def on_lost(self, now: float, pkt: SentPacket) -> None:
        self.bytes_in_flight = max(0, self.bytes_in_flight - pkt.size)
        self.sampler.on_lost(pkt)
        self._on_loss(now, pkt)

    def on_discarded(self, pkt: SentPacket) -> None:
        """The packet left flight without a verdict (key discarded, early retransmit)."""
        self.bytes_in_flight = max(0, self.bytes_in_flight - pkt.size)

    def on_persistent_congestion(self, now: float) -> None:
        """Every packet over several PTOs was lost: the path is black-holed or collapsed."""

    # --- for subclasses -----------------------------------------------------------------------

    @abc.abstractmethod
    def _on_sample(self, now: float, sample: RateSample, round_ended: bool) -> None: ...

    def _on_loss(self, now: float, pkt: SentPacket) -> None:
        return None

    def state(self) -> dict[str, Any]:
        """Figures for logs and ``lu2kctl peer show``."""
        return {
            "controller": self.name,
            "cwnd": self.cwnd,
            "pacing_rate_mbit": round(self.pacing_rate * 8 / 1e6, 3),
            "bytes_in_flight": self.bytes_in_flight,
            "delivered": self.sampler.delivered,
            "lost": self.sampler.lost,
            "rounds": self.sampler.round_count,
        }


class MaxFilter:
    """Windowed maximum over the last ``window`` rounds (BBR's BtlBw filter)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._per_round: dict[int, float] = {}
        self.value = 0.0

    def update(self, round_number: int, sample: float) -> None:
        if sample > self._per_round.get(round_number, 0.0):
            self._per_round[round_number] = sample
        for r in [r for r in self._per_round if r <= round_number - self.window]:
            del self._per_round[r]
        self.value = max(self._per_round.values(), default=0.0)

    def reset(self, round_number: int, sample: float) -> None:
        self._per_round = {round_number: sample}
        self.value = sample
