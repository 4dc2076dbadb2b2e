"""Plug lu2k's pure controllers into aioquic: its congestion-control registry and its pacer.

aioquic (1.7.x) creates a connection's controller by name through
``aioquic.quic.congestion.base.register_congestion_control(name, factory)``, calling
``factory(max_datagram_size=...)``.  Its recovery code then reads ``congestion_window`` and
``bytes_in_flight`` and calls ``on_packet_sent / on_packet_acked / on_packets_lost /
on_packets_expired / on_persistent_congestion / on_rtt_measurement``.
:class:`QuicControllerAdapter` turns those calls into the sans-I/O
:class:`~lu2k.cc.base.CongestionController` events (``now`` from the packets' send times and
the ack/loss calls), keeping each packet's sampling record on the aioquic packet object.

Pacing.  aioquic's ``QuicPacketPacer`` derives its rate from ``cwnd / smoothed_rtt``, which is
wrong for a model-based controller (the window is two BDPs; pacing must be at the bottleneck
rate).  :func:`install_pacer` replaces ``connection._loss._pacer`` with a
:class:`ControllerPacer` that takes the controller's ``pacing_rate``.  aioquic internals this
relies on (pinned to ``aioquic>=1.7,<1.8`` in setup.cfg):

* ``QuicConnection._loss`` (``QuicPacketRecovery``) with ``._cc`` and ``._pacer``;
* ``QuicPacketPacer``'s ``next_send_time / update_after_send / update_rate`` and its
  ``packet_time / bucket_max / bucket_time`` fields;
* ``QuicSentPacket`` being a plain dataclass (we add one attribute to it).

Names: each distinct parameter set is registered once under ``lu2k-<controller>-<digest>``
(see :func:`algorithm_name`); ``lu2k-bbr`` (default parameters) is registered on import.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from aioquic.quic.congestion.base import QuicCongestionControl, register_congestion_control
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.recovery import QuicPacketPacer

from . import create_controller
from .base import CongestionController

_ATTR = "_lu2k_cc_record"  # the per-packet record on aioquic's QuicSentPacket (set by name in on_packet_sent)
# The least sending time a pacing burst covers.  asyncio's epoll sleeps whole milliseconds and
# a pass over a batch of incoming ACKs takes a few more at 200 Mbit/s; credit that accrues
# while the loop is away must still be there when it comes back, or the connection paces
# below its own rate (measured on the lab's leo-fast profile:
# docs/measurements/2026-12-05-quic-pacing.md).  Below ~30 Mbit/s 16 datagrams are more.
BURST_TIME = 0.006
_registered: dict[str, tuple[str, dict[str, Any]]] = {}


class QuicControllerAdapter(QuicCongestionControl):
    """aioquic's controller interface on top of a pure lu2k controller."""

    def __init__(self, controller: CongestionController) -> None:
        # aioquic's base __init__ only sets the window, which the controller owns here.
        self.controller = controller
        self.ssthresh = None
        self._now = 0.0
        # Set by the backend: called with the send time, True when no stream has data waiting
        # (the sender is app-limited).
        self.app_limited: Callable[[float], bool] | None = None

    @property
    def congestion_window(self) -> int:  # type: ignore[override]  # the controller owns the window
        return self.controller.cwnd

    @property
    def bytes_in_flight(self) -> int:  # type: ignore[override]
        return self.controller.bytes_in_flight

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        now = packet.sent_time
        if now is None:
            now = self._now
        elif now > self._now:
            self._now = now
        limited = self.app_limited is not None and self.app_limited(now)
        packet._lu2k_cc_record = self.controller.on_sent(now, packet.sent_bytes, limited)  # type: ignore[attr-defined]

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        if now > self._now:
            self._now = now
        record = getattr(packet, _ATTR, None)
        if record is not None:
            self.controller.on_acked(now, record)

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        self._now = max(self._now, now)
        for packet in packets:
            record = getattr(packet, _ATTR, None)
            if record is not None:
                self.controller.on_lost(now, record)

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            record = getattr(packet, _ATTR, None)
            if record is not None:
                self.controller.on_discarded(record)

    def on_persistent_congestion(self) -> None:
        self.controller.on_persistent_congestion(self._now)

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        # The controller takes RTT from each acked packet's send time itself.
        self._now = max(self._now, now)

    def get_log_data(self) -> dict[str, Any]:
        return {"cwnd": self.controller.cwnd, "bytes_in_flight": self.controller.bytes_in_flight,
                "pacing_rate": self.controller.pacing_rate}


class ControllerPacer(QuicPacketPacer):
    """aioquic's token-bucket pacer, fed with the controller's pacing rate."""

    def __init__(self, *, max_datagram_size: int, controller: CongestionController) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._controller = controller
        self._rate_seen = -1.0
        self._refresh()

    def _refresh(self) -> None:
        rate = self._controller.pacing_rate
        if rate == self._rate_seen:
            return
        self._rate_seen = rate
        if rate <= 0:
            self.packet_time = None
            return
        mds = self._max_datagram_size
        self.packet_time = max(1e-6, min(mds / rate, 1.0))
        # Bursts of up to 16 datagrams or BURST_TIME of sending, whichever is more (and at
        # most a quarter window), keep the timer rate sane without building queues.  A
        # bucket smaller than the loop's time away overflows at every wake-up: the
        # connection then paces below its own rate.
        burst = max(16 * mds, int(rate * BURST_TIME))
        self.bucket_max = max(2 * mds, min(self._controller.cwnd // 4, burst)) / rate
        self.bucket_time = min(self.bucket_time, self.bucket_max)

    # aioquic's bucket lets a packet go whenever *any* credit is left and then forgets the
    # rest of its cost (the bucket is floored at 0), so every transmit pass -- one per batch
    # of incoming datagrams here -- could slip a packet past the rate: measured on the lab's
    # GEO link, pacing "at 18 Mbit/s" kept a 20 Mbit/s bottleneck's queue full.  Here a
    # packet needs a whole packet's credit, and packets sent regardless (aioquic does not
    # pace a packet that carries a due ACK) are charged as debt.

    # Both are called for every packet: the bucket update is written out in each (as aioquic's
    # update_bucket does it) rather than called.  The rate is re-read before each packet and
    # after each ACK frame (update_rate), which is every time the controller can change it.

    def next_send_time(self, now: float) -> float | None:  # type: ignore[override]
        self._refresh()
        packet_time = self.packet_time
        if packet_time is None:
            return None
        if now > self.evaluation_time:
            self.bucket_time = min(self.bucket_time + (now - self.evaluation_time), self.bucket_max)
            self.evaluation_time = now
        if self.bucket_time >= packet_time * (1 - 1e-9):  # float residue of bucket_max
            return None
        return now + (packet_time - self.bucket_time)

    def update_after_send(self, now: float) -> None:
        packet_time = self.packet_time
        if packet_time is None:
            return
        if now > self.evaluation_time:
            self.bucket_time = min(self.bucket_time + (now - self.evaluation_time), self.bucket_max)
            self.evaluation_time = now
        self.bucket_time = max(self.bucket_time - packet_time, -self.bucket_max)

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        self._refresh()


def install_pacer(connection: Any) -> QuicControllerAdapter | None:
    """Give ``connection`` (an aioquic ``QuicConnection``) the controller-driven pacer.

    Returns the adapter when the connection's controller is one of ours, else ``None``
    (aioquic's own Reno/CUBIC keep aioquic's pacer).  Call before the first packet is sent.
    """
    recovery = connection._loss
    cc = recovery._cc
    if not isinstance(cc, QuicControllerAdapter):
        return None
    recovery._pacer = ControllerPacer(max_datagram_size=connection._max_datagram_size, controller=cc.controller)
    return cc


def algorithm_name(controller: str, params: dict[str, Any] | None = None) -> str:
    """Register (once) and return the aioquic algorithm name for a controller + parameters.

    Raises :class:`~lu2k.errors.ConfigError` at once if the parameters are bad, rather than
    when the first connection is made.
    """
    params = dict(params or {})
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = f"lu2k-{controller}-{digest}" if params else f"lu2k-{controller}"
    if name not in _registered:
        create_controller(controller, mss=1200, **params)  # validate now

        def factory(*, max_datagram_size: int) -> QuicCongestionControl:
            return QuicControllerAdapter(create_controller(controller, mss=max_datagram_size, **params))

        register_congestion_control(name, factory)
        _registered[name] = (controller, params)
    return name


algorithm_name("bbr")
