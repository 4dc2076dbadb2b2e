"""The aioquic glue: registry names, event translation on real aioquic packet objects, the pacer."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("aioquic")

from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.congestion.base import create_congestion_control  # noqa: E402
from aioquic.quic.connection import QuicConnection  # noqa: E402
from aioquic.quic.packet import QuicPacketType  # noqa: E402
from aioquic.quic.packet_builder import QuicSentPacket  # noqa: E402
from aioquic.quic.recovery import QuicPacketPacer  # noqa: E402
from aioquic.tls import Epoch  # noqa: E402

from lu2k.cc.aioquic_adapter import BURST_TIME, ControllerPacer, QuicControllerAdapter, algorithm_name, install_pacer  # noqa: E402
from lu2k.cc.bbr import BbrController  # noqa: E402
from lu2k.cc.rate import RateController  # noqa: E402
from lu2k.errors import ConfigError  # noqa: E402

MDS = 1472


def _packet(n: int, t: float, size: int = MDS) -> QuicSentPacket:
    return QuicSentPacket(epoch=Epoch.ONE_RTT, in_flight=True, is_ack_eliciting=True, is_crypto_packet=False,
                          packet_number=n, packet_type=QuicPacketType.ONE_RTT, sent_time=t, sent_bytes=size)


def test_names_register_once_and_validate() -> None:
    assert algorithm_name("bbr") == "lu2k-bbr"
    a = algorithm_name("rate", {"rate": 2.5e6})
    assert a == algorithm_name("rate", {"rate": 2.5e6}) and a != algorithm_name("rate", {"rate": 1e6})
    cc = create_congestion_control(a, max_datagram_size=MDS)
    assert isinstance(cc, QuicControllerAdapter) and isinstance(cc.controller, RateController)
    assert cc.controller.mss == MDS
    with pytest.raises(ConfigError):
        algorithm_name("rate", {"rate": -5})


def test_adapter_translates_events() -> None:
    cc = create_congestion_control("lu2k-bbr", max_datagram_size=MDS)
    assert isinstance(cc, QuicControllerAdapter)
    pkts = [_packet(i, 0.001 * i) for i in range(20)]
    for p in pkts:
        cc.on_packet_sent(packet=p)
    assert cc.bytes_in_flight == 20 * MDS
    for p in pkts[:15]:
        cc.on_packet_acked(now=0.1 + p.sent_time, packet=p)
    cc.on_packets_lost(now=0.2, packets=pkts[15:18])
    cc.on_packets_expired(packets=pkts[18:])
    assert cc.bytes_in_flight == 0
    ctl = cc.controller
    assert isinstance(ctl, BbrController)
    assert ctl.sampler.delivered == 15 * MDS and ctl.sampler.lost == 3 * MDS
    assert ctl.min_rtt == pytest.approx(0.1)
    assert cc.congestion_window == ctl.cwnd
    cc.on_rtt_measurement(now=0.3, rtt=0.1)
    cc.on_persistent_congestion()
    assert cc.get_log_data()["pacing_rate"] == ctl.pacing_rate
    # A packet the adapter never saw (sent before it was installed) is ignored, not a crash.
    cc.on_packet_acked(now=1.0, packet=_packet(99, 0.5))


def test_pacer_follows_controller_rate() -> None:
    ctl = RateController(mss=MDS, rate=1e6, initial_rtt=0.1)
    pacer = ControllerPacer(max_datagram_size=MDS, controller=ctl)
    assert pacer.packet_time == pytest.approx(MDS / 1e6)
    # Send until the burst allowance is spent; then the next slot is one packet time away.
    t = 10.0
    sent = 0
    while pacer.next_send_time(t) is None:
        pacer.update_after_send(t)
        sent += 1
    assert 1 <= sent <= 17
    assert pacer.next_send_time(t) == pytest.approx(t + MDS / 1e6)
    ctl.current = 0.5e6
    ctl._update()
    pacer.update_rate(congestion_window=1, smoothed_rtt=1.0)  # aioquic's inputs are ignored
    assert pacer.packet_time == pytest.approx(MDS / 0.5e6)


@pytest.mark.parametrize("pacer_class, holds_rate", [(ControllerPacer, True), (QuicPacketPacer, False)])
def test_frequent_transmit_passes_do_not_beat_the_rate(pacer_class: type, holds_rate: bool) -> None:
    # A transmit pass every tenth of a packet time (incoming ACK batches trigger one each).
    # Over one second the pacer may let out the rate plus its burst allowance, no more.
    # aioquic's own pacer, given the same rate, lets out several times that (checked too).
    ctl = RateController(mss=MDS, rate=1e6, initial_rtt=0.1)
    pacer = pacer_class(max_datagram_size=MDS, **({"controller": ctl} if pacer_class is ControllerPacer else {}))
    if pacer_class is QuicPacketPacer:
        pacer.update_rate(congestion_window=int(1e6 * 0.1), smoothed_rtt=0.1)
    packet_time = MDS / 1e6
    t, sent = 10.0, 0
    while t < 11.0:
        while pacer.next_send_time(t) is None:
            pacer.update_after_send(t)
            sent += 1
        t += packet_time / 10
    allowed = 1e6 / MDS + 17
    assert (sent <= allowed) is holds_rate


@pytest.mark.parametrize("rate", [2.5e6, 25e6])  # 20 and 200 Mbit/s
def test_a_late_event_loop_still_gets_the_rate(rate: float) -> None:
    # The loop wakes up whole milliseconds late (epoll) plus a busy pass over incoming ACKs;
    # the credit accrued meanwhile must not be lost, or a 200 Mbit/s connection paces at
    # well under its rate.  Over one simulated second the pacer must let out the rate.
    ctl = RateController(mss=MDS, rate=rate, initial_rtt=0.05)
    pacer = ControllerPacer(max_datagram_size=MDS, controller=ctl)
    t, sent = 10.0, 0
    while t < 11.0:
        while (due := pacer.next_send_time(t)) is None:
            pacer.update_after_send(t)
            sent += 1
        t = math.ceil(due * 1000) / 1000 + 0.003  # the timer's millisecond, then a busy pass
    assert sent * MDS >= 0.97 * rate
    # Bursts stay small: at most 16 datagrams below ~30 Mbit/s, a few milliseconds above.
    assert pacer.bucket_max * rate <= max(16 * MDS, rate * BURST_TIME) + 1


def test_unpaced_packets_are_charged_as_debt() -> None:
    # aioquic sends a packet carrying a due ACK without asking the pacer; its cost delays the
    # next paced packet instead of being forgotten.
    ctl = RateController(mss=MDS, rate=1e6, initial_rtt=0.1)
    pacer = ControllerPacer(max_datagram_size=MDS, controller=ctl)
    t = 10.0
    while pacer.next_send_time(t) is None:
        pacer.update_after_send(t)
    for _ in range(3):
        pacer.update_after_send(t)  # unpaced
    assert pacer.next_send_time(t) == pytest.approx(t + 4 * MDS / 1e6)


def test_install_pacer_only_for_our_controllers() -> None:
    ours = QuicConnection(configuration=QuicConfiguration(is_client=True, congestion_control_algorithm="lu2k-bbr", max_datagram_size=MDS))
    adapter = install_pacer(ours)
    assert adapter is not None and isinstance(ours._loss._pacer, ControllerPacer)
    stock = QuicConnection(configuration=QuicConfiguration(is_client=True, congestion_control_algorithm="cubic"))
    assert install_pacer(stock) is None
    assert not isinstance(stock._loss._pacer, ControllerPacer)


def test_app_limited_is_asked_with_the_send_time_and_marks_the_packet() -> None:
    cc = create_congestion_control("lu2k-bbr", max_datagram_size=MDS)
    assert isinstance(cc, QuicControllerAdapter)
    asked: list[float] = []
    cc.app_limited = lambda now: asked.append(now) or len(asked) == 2
    cc.on_packet_sent(packet=_packet(1, 2.5))
    cc.on_packet_sent(packet=_packet(2, 2.75))
    assert asked == [2.5, 2.75]
    assert cc.controller.sampler.app_limited_until == 2 * MDS  # the first, in flight, and the second itself
