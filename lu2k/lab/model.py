"""One direction of an emulated link, as a pure function of (packet length, now).

Theory of operation.  A packet offered at ``now`` goes through, in order:

1. **Link state** -- while the link is administratively down (a flap), or in the outage that
   opens each reconfiguration period (``reconfig_s``: the first ``outage_s`` seconds of every
   period ``floor(now / reconfig_s)`` after period 0's), it is dropped (``DOWN``).  Periods
   are counted from clock zero, not from the first packet, so the two directions of a hop --
   two models read by one forwarder on one clock -- reconfigure at the same instants.
2. **Rate cap and drop-tail queue** -- the link serialises one packet at a time at
   ``rate_bps``; ``busy_until`` is when the last accepted packet finishes.  The queue holds
   the bytes not yet serialised, ``(busy_until - now) * rate / 8``; a packet that would push it
   past the limit (default one BDP) is dropped (``QUEUE``).  Otherwise it departs at
   ``max(now, busy_until) + len*8/rate``.
3. **Loss** -- a packet that has been serialised may still be lost on the medium: Bernoulli
   with ``loss``, then Gilbert-Elliott bursts (``LOSS``).  A lost packet has used its share
   of the link, as on a real noisy channel.
4. **Delay** -- it is released ``delay +- jitter`` after departure, ``delay`` being the
   period's (:meth:`LinkSpec.period_delay`) on a reconfiguring link.  Releases never go
   backwards (a packet is not released before the one accepted ahead of it), so jitter only
   stretches the gaps; with ``reorder`` a chosen fraction is held back an extra
   ``reorder_delay`` instead, outside that clamp, so later packets overtake it.

Randomness comes from ``random.Random`` objects seeded from the spec's seed, one for loss
and one for jitter/reordering, so the loss pattern of a seed does not change when jitter is
switched on, and a run can be repeated exactly.

Nothing here reads a clock or touches a socket; the forwarder calls :meth:`LinkModel.offer`
and keeps the resulting release times on its timer heap.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Any

from .spec import LinkSpec


class Drop(enum.Enum):
    """Why the link dropped a packet."""

    DOWN = "down"
    QUEUE = "queue"
    LOSS = "loss"


@dataclass
class LatenessStats:
    """Lateness of releases (actual - scheduled) in seconds: count, max, and a bounded sample.

    The sample is a ring of the most recent ``capacity`` values, enough for stable p50/p99
    without unbounded growth in a long run.
    """

    capacity: int = 65536
    count: int = 0
    total: float = 0.0
    max: float = 0.0
    _ring: list[float] = field(default_factory=list)
    _next: int = 0

    def add(self, late: float) -> None:
        self.count += 1
        self.total += late
        if late > self.max:
            self.max = late
        if len(self._ring) < self.capacity:
            self._ring.append(late)
        else:
            self._ring[self._next] = late
            self._next = (self._next + 1) % self.capacity

    def percentile(self, q: float) -> float:
        if not self._ring:
            return 0.0
        values = sorted(self._ring)
        idx = min(len(values) - 1, max(0, int(round(q / 100.0 * (len(values) - 1)))))
        return values[idx]

    def summary(self) -> dict[str, float]:
        return {
            "count": self.count,
            "mean_us": (self.total / self.count * 1e6) if self.count else 0.0,
            "p50_us": self.percentile(50) * 1e6,
            "p99_us": self.percentile(99) * 1e6,
            "p999_us": self.percentile(99.9) * 1e6,
            "max_us": self.max * 1e6,
        }


@dataclass
class LinkCounters:
    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0  # accepted and scheduled for release
    bytes_out: int = 0
    drops_queue: int = 0
    drops_loss: int = 0
    drops_down: int = 0
    reordered: int = 0
    reconfigurations: int = 0  # reconfiguration periods entered after the first
    max_queue_bytes: int = 0
    # Of packets_in/bytes_in, the IPv6 ones (the forwarder reads the version nibble; the
    # model itself charges every packet its whole length, IP header included, either way).
    packets_ipv6: int = 0
    bytes_ipv6: int = 0
    lateness: LatenessStats = field(default_factory=LatenessStats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "packets_in": self.packets_in,
            "bytes_in": self.bytes_in,
            "packets_out": self.packets_out,
            "bytes_out": self.bytes_out,
            "drops_queue": self.drops_queue,
            "drops_loss": self.drops_loss,
            "drops_down": self.drops_down,
            "reordered": self.reordered,
            "reconfigurations": self.reconfigurations,
            "max_queue_bytes": self.max_queue_bytes,
            "packets_ipv6": self.packets_ipv6,
            "bytes_ipv6": self.bytes_ipv6,
            "lateness": self.lateness.summary(),
        }


class LinkModel:
    """One direction of the emulated link.  See the module docstring for the rules."""

    def __init__(self, spec: LinkSpec, name: str = "ab") -> None:
        self.spec = spec
        self.name = name
        self.counters = LinkCounters()
        self.up = True
        self._queue_limit = spec.effective_queue_bytes()
        self._bytes_per_s = spec.rate_bps / 8.0
        self._busy_until = 0.0
        self._last_release = 0.0
        self._ge_bad = False
        self._period = -1  # the reconfiguration period _delay belongs to
        self._delay = spec.delay_s
        # String seeds hash deterministically (random.seed version 2), unlike hash().
        self._rng_loss = random.Random(f"{spec.seed}/{name}/loss")
        self._rng_delay = random.Random(f"{spec.seed}/{name}/delay")

    @property
    def queue_limit(self) -> int:
        return self._queue_limit

    def set_up(self, up: bool) -> None:
        """Administrative link state; packets offered while down are dropped."""
        self.up = up

    def backlog_bytes(self, now: float) -> int:
        """Bytes accepted but not yet serialised at ``now`` (the queue occupancy)."""
        if self._bytes_per_s <= 0.0 or self._busy_until <= now:
            return 0
        return round((self._busy_until - now) * self._bytes_per_s)

    def _lost(self) -> bool:
        rng = self._rng_loss
        lost = self.spec.loss > 0.0 and rng.random() < self.spec.loss
        ge = self.spec.burst
        if ge is not None:
            # Transition first, then draw within the new state (netem's order).
            if self._ge_bad:
                if rng.random() < ge.p_bg:
                    self._ge_bad = False
            elif rng.random() < ge.p_gb:
                self._ge_bad = True
            p = ge.loss_bad if self._ge_bad else ge.loss_good
            if p > 0.0 and rng.random() < p:
                lost = True
        return lost

    def reconfigure(self, now: float) -> bool:
        """Bring the period's delay up to date for ``now``; False while in a reconfiguration outage."""
        spec = self.spec
        period = int(now // spec.reconfig_s)
        if period != self._period:
            self._period = period
            self._delay = spec.period_delay(period)
            if period:
                self.counters.reconfigurations += 1
        return not (period and now - period * spec.reconfig_s < spec.outage_s)

    def offer(self, length: int, now: float) -> float | Drop:
        """A packet of ``length`` bytes arrives at ``now``: its release time, or why it is dropped."""
        c = self.counters
        c.packets_in += 1
        c.bytes_in += length
        if not self.up or (self.spec.reconfig_s and not self.reconfigure(now)):
            c.drops_down += 1
            return Drop.DOWN
        if self._bytes_per_s > 0.0:
            start = self._busy_until if self._busy_until > now else now
            # Rounded: float residue must not turn "exactly full" into "one byte over".
            backlog = round((start - now) * self._bytes_per_s, 3)
            if backlog + length > self._queue_limit:
                c.drops_queue += 1
                return Drop.QUEUE
            depart = start + length / self._bytes_per_s
            self._busy_until = depart
            queued = int(backlog + length)
            if queued > c.max_queue_bytes:
                c.max_queue_bytes = queued
        else:
            depart = now
        if self._lost():
            c.drops_loss += 1
            return Drop.LOSS
        spec = self.spec
        release = depart + self._delay
        if spec.jitter_s > 0.0:
            release = max(depart, release + self._rng_delay.uniform(-spec.jitter_s, spec.jitter_s))
        if spec.reorder > 0.0 and self._rng_delay.random() < spec.reorder:
            # Held back outside the order clamp: packets behind it may now overtake it.
            c.reordered += 1
            release += spec.reorder_delay_s
        else:
            if release < self._last_release:
                release = self._last_release
            self._last_release = release
        c.packets_out += 1
        c.bytes_out += length
        return release
