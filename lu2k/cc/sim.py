"""A discrete-event link simulation that drives the pure controllers with a fake clock.

Used by the unit tests (synthetic but realistic ack/loss sequences) and by
``python -m lu2k.cc.sim`` for quick what-ifs without the network lab.  Pure and deterministic
for a given seed.

The model mirrors the lab's (:mod:`lu2k.lab.model`): one bottleneck serialising at ``rate``
with a drop-tail queue (default one BDP), random loss applied *after* serialisation (a lost
packet used its share of the link), then the one-way delay; acks come back over an
uncongested, loss-free return path.  Each flow is a bulk sender with a controller: it sends
``mss``-byte packets while in-flight < cwnd, spaced at the pacing rate; the receiver acks
every packet; the sender declares a packet lost when three later ones are acked or it is
older than 9/8 RTT behind an acked one (RFC 9002's thresholds), and after a silence of
three RTTs it declares everything outstanding lost (a crude PTO) and, as RFC 9002 does when
the losses span that long, tells the controller of persistent congestion.

Like the lab's ``--reconfig``/``--outage``, a link can change at given times
(:class:`Reconfig`): it is down for ``outage`` seconds (every packet offered is dropped) and
comes back with a new one-way delay -- a LEO terminal's hand-over to another satellite.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections import OrderedDict
from dataclasses import dataclass, field

from .base import CongestionController, SentPacket


@dataclass(frozen=True)
class Reconfig:
    """At ``at`` the link goes down for ``outage`` seconds, then carries ``delay`` one way."""

    at: float
    outage: float
    delay: float


@dataclass
class Link:
    """The bottleneck: rate in bytes/s, queue limit in bytes, one-way delay, random loss."""

    rate: float
    delay: float
    loss: float = 0.0
    queue_bytes: int | None = None
    seed: int = 1
    reconfigs: tuple[Reconfig, ...] = ()
    busy_until: float = 0.0
    queue_drops: int = 0
    medium_drops: int = 0
    outage_drops: int = 0

    def __post_init__(self) -> None:
        if self.queue_bytes is None:
            self.queue_bytes = max(int(self.rate * 2 * self.delay), 16 * 1500)
        self._rng = random.Random(self.seed)

    def path_at(self, now: float) -> float | None:
        """The one-way delay at ``now``, or None while the link is down."""
        delay = self.delay
        for change in self.reconfigs:
            if now < change.at:
                break
            if now < change.at + change.outage:
                return None
            delay = change.delay
        return delay

    def offer(self, now: float, size: int) -> float | None:
        """Arrival time at the far end, or None if dropped."""
        delay = self.path_at(now)
        if delay is None:
            self.outage_drops += 1
            return None
        queued = max(0.0, self.busy_until - now) * self.rate
        assert self.queue_bytes is not None
        if queued + size > self.queue_bytes:
            self.queue_drops += 1
            return None
        depart = max(now, self.busy_until) + size / self.rate
        self.busy_until = depart
        if self.loss and self._rng.random() < self.loss:
            self.medium_drops += 1
            return None
        return depart + delay


@dataclass
class Flow:
    controller: CongestionController
    start: float = 0.0
    stop: float | None = None
    mss: int = 1472
    delivered: int = 0
    sent: int = 0
    lost: int = 0
    next_send: float = 0.0
    largest_acked: int = -1
    last_ack: float = 0.0
    outstanding: "OrderedDict[int, tuple[float, SentPacket]]" = field(default_factory=OrderedDict)
    delivered_log: list[tuple[float, int]] = field(default_factory=list)
    wake_pending: bool = False

    def goodput(self, t0: float, t1: float) -> float:
        """Delivered bytes/s between t0 and t1 (from the per-ack log)."""
        before = after = 0
        for t, d in self.delivered_log:
            if t <= t0:
                before = d
            if t <= t1:
                after = d
        return (after - before) / (t1 - t0)


class Simulation:
    """Flows sharing one :class:`Link`; run with :meth:`run`."""

    def __init__(self, link: Link, flows: list[Flow], ack_delay: float | None = None) -> None:
        self.link = link
        self.flows = flows
        self.now = 0.0
        self._events: list[tuple[float, int, str, int, int]] = []
        self._seq = itertools.count()
        self._pn = itertools.count()
        # None: acks take the link's one-way delay of the moment (and are lost in an outage).
        self.ack_delay = ack_delay

    def _push(self, t: float, kind: str, flow: int, pn: int = 0) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, flow, pn))

    def run(self, duration: float) -> None:
        for i, f in enumerate(self.flows):
            self._push(f.start, "wake", i)
        while self._events:
            t, _, kind, fi, pn = heapq.heappop(self._events)
            if t > duration:
                break
            self.now = t
            flow = self.flows[fi]
            if kind == "wake":
                flow.wake_pending = False
                self._try_send(fi)
            elif kind == "arrive":
                back = self.ack_delay if self.ack_delay is not None else self.link.path_at(t)
                if back is not None:
                    self._push(t + back, "ack", fi, pn)
            elif kind == "ack":
                self._on_ack(fi, pn)
            elif kind == "pto":
                self._on_pto(fi)

    def _try_send(self, fi: int) -> None:
        f = self.flows[fi]
        cc = f.controller
        now = self.now
        if f.stop is not None and now >= f.stop:
            return
        while cc.bytes_in_flight + f.mss <= cc.cwnd:
            if now < f.next_send:
                self._wake(fi, f.next_send)
                return
            pn = next(self._pn)
            pkt = cc.on_sent(now, f.mss)
            f.outstanding[pn] = (now, pkt)
            f.sent += 1
            rate = cc.pacing_rate
            f.next_send = max(f.next_send, now - 0.002) + (f.mss / rate if rate > 0 else 0.0)
            arrival = self.link.offer(now, f.mss)
            if arrival is not None:
                self._push(arrival, "arrive", fi, pn)
            if len(f.outstanding) == 1:
                self._push(now + 3 * self._rtt(f), "pto", fi, pn)

    def _wake(self, fi: int, t: float) -> None:
        f = self.flows[fi]
        if not f.wake_pending:
            f.wake_pending = True
            self._push(t, "wake", fi)

    def _rtt(self, f: Flow) -> float:
        rtt = getattr(f.controller, "min_rtt", None)
        base = 2 * self.link.delay
        return rtt if isinstance(rtt, float) and rtt < 1e9 else base

    def _on_ack(self, fi: int, pn: int) -> None:
        f = self.flows[fi]
        entry = f.outstanding.pop(pn, None)
        if entry is None:
            return  # already declared lost
        now = self.now
        f.controller.on_acked(now, entry[1])
        f.delivered += f.mss
        f.delivered_log.append((now, f.delivered))
        f.last_ack = now
        f.largest_acked = max(f.largest_acked, pn)
        loss_delay = 9 / 8 * self._rtt(f)
        lost = [p for p, (sent, _pkt) in itertools.takewhile(lambda kv: kv[0] < f.largest_acked, f.outstanding.items())
                if p <= f.largest_acked - 3 or sent <= now - loss_delay]
        for p in lost:
            _sent, pkt = f.outstanding.pop(p)
            f.controller.on_lost(now, pkt)
            f.lost += 1
        self._try_send(fi)

    def _on_pto(self, fi: int) -> None:
        f = self.flows[fi]
        if not f.outstanding:
            return
        if self.now - f.last_ack < 3 * self._rtt(f):
            self._push(f.last_ack + 3 * self._rtt(f), "pto", fi)
            return
        for _p, (_sent, pkt) in list(f.outstanding.items()):
            f.controller.on_lost(self.now, pkt)
            f.lost += 1
        f.outstanding.clear()
        f.controller.on_persistent_congestion(self.now)
        self._try_send(fi)


def main(argv: list[str] | None = None) -> int:
    from . import create_controller

    ap = argparse.ArgumentParser(description="simulate lu2k congestion controllers on a lossy link")
    ap.add_argument("--cc", default="bbr")
    ap.add_argument("--rate-mbit", type=float, default=20.0)
    ap.add_argument("--rtt-ms", type=float, default=600.0)
    ap.add_argument("--loss", type=float, default=0.01)
    ap.add_argument("--flows", type=int, default=1)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--mss", type=int, default=1472)
    ap.add_argument("--rate-hint", action="store_true", help="bbr: give it the link's rate, as a site profile does")
    args = ap.parse_args(argv)
    rate = args.rate_mbit * 1e6 / 8
    link = Link(rate=rate, delay=args.rtt_ms / 2e3, loss=args.loss)
    params: dict[str, object] = {"initial_rtt": args.rtt_ms / 1e3}
    if args.cc == "rate":
        params["rate"] = rate
    elif args.rate_hint:
        params["initial_rate"] = rate
    flows = [Flow(create_controller(args.cc, mss=args.mss, **params), mss=args.mss) for _ in range(args.flows)]
    Simulation(link, flows).run(args.duration)
    t0 = min(10.0, args.duration / 3)
    for i, f in enumerate(flows):
        g = f.goodput(t0, args.duration)
        print(f"flow {i}: goodput {g * 8 / 1e6:.2f} Mbit/s ({g / (rate * (1 - args.loss)):.1%} of rate*(1-p)) "
              f"lost {f.lost}/{f.sent} state {f.controller.state()}")
    print(f"link: queue drops {link.queue_drops}, medium drops {link.medium_drops}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
