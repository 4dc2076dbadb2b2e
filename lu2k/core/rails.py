"""Multi-rail: which of a peer's NIDs (rails) carries the next message.  Pure.

A multi-rail peer is one daemon reachable by several NIDs on different nets -- a GEO link
and a LEO link, or two ground stations -- each net with its own backend and site profile
(LNet's ``lnetctl peer add --prim_nid A --nid B,C``).  The node keeps one sequence space per
multi-rail peer (not per NID), so a message may be resent on another rail and the
receiver's dedupe window still answers the copy: exactly once across rails.

The policy (:func:`pick`) looks only at a :class:`RailView` per rail and is written as a
table of rules, applied in order:

1. *Usable rails.*  A rail is out while it is ``down`` (its last connection died or failed
   and none is up since) or its health is more than ``margin`` below the best rail's
   (LNet's "prefer the healthiest NI": one failure costs ``health_sensitivity``, so a margin
   of one sensitivity lets a rail that failed once and reconnected rejoin at once, while
   one that keeps failing stays out until health recovery brings it back).  When no rail is
   usable, the healthiest rail is used -- the message waits there for a reconnect rather
   than failing.
2. *Small messages* (``size < small``) go on the usable rail with the lowest RTT: latency
   sensitive traffic rides the LEO rail while bulk fills both.  In that rail's credit queue
   and in its connection's send queue they go ahead of waiting bulk (:func:`queue_slot`),
   so they wait for one credit and one batch rather than for the bulk backlog.
3. *Bulk messages* go on the usable rail where they would be acknowledged first if each rail
   drained its backlog at its capacity: ``base_rtt + (backlog + size) / capacity``
   (earliest completion first).  An idle LEO rail takes bulk until its backlog would take
   longer to drain than the GEO rail's extra round trip; under sustained load the backlogs
   dominate and bulk splits in proportion to capacity.  A rail's capacity is its site profile's rate
   until it has measured more goodput than that (:class:`RailMeter`); a faster rail also
   drains its backlog sooner, so it takes more bulk even while its capacity is an estimate.

Ties go to the earlier rail in configuration order, so the choice is deterministic.

Failover: when a rail's connection dies, what was in flight on it and not acknowledged is
resent on the rail :func:`pick` chooses among the others (the node does it; see
:meth:`lu2k.core.node.Node.connection_lost`); the dead rail keeps a probe queued so that it
reconnects with its backoff and rejoins when the connection comes back up -- at one failure
below full health, so it is usable at once and out again if it fails again soon.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..nid import Nid

DEFAULT_SMALL = 4096  # bytes: below this a message is latency sensitive
DEFAULT_CAPACITY = 1e6  # bytes/s assumed for a rail with neither a profile rate nor a measurement
DEFAULT_RTT = 0.1  # seconds assumed for a rail with neither a profile RTT nor a sample
METER_WINDOW = 1.0  # seconds of deliveries a goodput sample covers
METER_MIN_BYTES = 256 << 10  # a window with less traffic than this says nothing about capacity
RTT_GAIN = 0.125  # smoothing of RTT samples (TCP's srtt gain)
RATE_GAIN = 0.25  # smoothing of goodput samples


@dataclass(frozen=True, slots=True)
class RailView:
    """What the policy knows about one rail when it chooses."""

    down: bool  # last connection lost or failed, none up since
    health: int  # 0..MAX_HEALTH (lu2k.health)
    capacity: float  # bytes per second (measured, else the profile's rate, else DEFAULT_CAPACITY)
    rtt: float  # seconds (smoothed samples, else the profile's RTT, else DEFAULT_RTT): includes queueing
    backlog: int  # bytes assigned to the rail and not acknowledged (queued + in flight)
    base_rtt: float = 0.0  # seconds without queueing (lowest sample, else the profile's RTT); 0: as rtt


def usable(rails: Sequence[RailView], margin: int) -> list[int]:
    """Indexes of the rails rule 1 allows (never empty when ``rails`` is not)."""
    if not rails:
        return []
    up = [i for i, r in enumerate(rails) if not r.down]
    if up:
        best = max(rails[i].health for i in up)
        ok = [i for i in up if rails[i].health >= best - margin]
        if ok:
            return ok
    best = max(r.health for r in rails)
    return [next(i for i, r in enumerate(rails) if r.health == best)]


def pick(rails: Sequence[RailView], size: int, *, small: int = DEFAULT_SMALL, margin: int = 100) -> int:
    """The index of the rail for a message of ``size`` bytes (see the module docstring)."""
    if not rails:
        raise ValueError("a multi-rail peer has at least one rail")
    ok = usable(rails, margin)
    if size < small:
        return min(ok, key=lambda i: (rails[i].rtt, i))
    return min(ok, key=lambda i: ((rails[i].base_rtt or rails[i].rtt) + (rails[i].backlog + size) / max(rails[i].capacity, 1.0), i))


def queue_slot(n: int, size_at: Callable[[int], int], size: int, *, small: int = DEFAULT_SMALL) -> int:
    """Where a message of ``size`` bytes joins a rail's credit (or send) queue of ``n`` messages
    (``size_at(i)``: the size of the i-th).  Bulk at the end; a small message after the small ones at
    the head, ahead of the bulk -- it waits for one credit, not for the bulk's backlog -- and
    at the end when the queue already ends with a small one (order among small messages is
    kept, and the scan stays short)."""
    if size >= small or not n or size_at(n - 1) < small:
        return n
    i = 0
    while i < n and size_at(i) < small:
        i += 1
    return i


def failover_target(rails: Sequence[RailView], lost: int, size: int, *, small: int = DEFAULT_SMALL,
                    margin: int = 100) -> int | None:
    """Where a message in flight on the dead rail ``lost`` goes again: :func:`pick` among the
    other rails that are not down, or None (no other rail is up: it waits for ``lost`` to
    reconnect)."""
    others = [i for i, r in enumerate(rails) if i != lost and not r.down]
    if not others:
        return None
    sub = [rails[i] for i in others]
    return others[pick(sub, size, small=small, margin=margin)]


class RailMeter:
    """Per-rail measurements: smoothed RTT (one probe message at a time) and goodput
    (acknowledged bytes per :data:`METER_WINDOW`, counted only while the rail was busy
    enough to say something about its capacity)."""

    __slots__ = ("profile_rate", "profile_rtt", "srtt", "min_rtt", "rate", "probe_seq", "probe_at", "_win_start", "_win_bytes",
                 "backlog", "acked_bytes", "acked_msgs", "resent_away", "resent_here", "failovers")

    def __init__(self, profile_rate: float = 0.0, profile_rtt: float = 0.0) -> None:
        self.profile_rate, self.profile_rtt = profile_rate, profile_rtt
        self.srtt = 0.0
        self.min_rtt = 0.0
        self.rate = 0.0
        self.probe_seq = 0  # sequence number of the message whose ACK gives the next RTT sample
        self.probe_at = 0.0
        self._win_start: float | None = None
        self._win_bytes = 0
        self.backlog = 0  # bytes charged to the rail and not finished (the node keeps it)
        self.acked_bytes = 0
        self.acked_msgs = 0
        self.resent_away = 0  # messages moved off this rail when it died
        self.resent_here = 0  # messages moved onto this rail from a dead one
        self.failovers = 0  # times this rail died with messages moved off it

    @property
    def capacity(self) -> float:
        # The profile is the operator's word for the link's rate; a measurement may raise it
        # (a rail without a profile starts from the default) but never talks it down: a rail
        # measured while lightly used would otherwise get less and less of the bulk.
        return max(self.rate, self.profile_rate) or DEFAULT_CAPACITY

    @property
    def rtt(self) -> float:
        return self.srtt or self.profile_rtt or DEFAULT_RTT

    @property
    def base_rtt(self) -> float:
        """The round trip without queueing: the profile's (the operator's word for the path),
        else the lowest sample, else the default."""
        return self.profile_rtt or self.min_rtt or DEFAULT_RTT

    def sent(self, seq: int, now: float) -> None:
        """A message went out on the rail: time it if no probe is running."""
        if not self.probe_seq:
            self.probe_seq, self.probe_at = seq, now

    def acked(self, seq: int, size: int, now: float) -> None:
        """A message that went out on the rail was acknowledged."""
        self.acked_bytes += size
        self.acked_msgs += 1
        if seq == self.probe_seq:
            sample = max(now - self.probe_at, 1e-6)
            self.srtt = sample if not self.srtt else self.srtt + RTT_GAIN * (sample - self.srtt)
            self.min_rtt = sample if not self.min_rtt else min(self.min_rtt, sample)
            self.probe_seq = 0
        if self._win_start is None:
            self._win_start, self._win_bytes = now, 0
        self._win_bytes += size
        span = now - self._win_start
        if span >= METER_WINDOW:
            if self._win_bytes >= METER_MIN_BYTES:
                sample_rate = self._win_bytes / span
                self.rate = sample_rate if not self.rate else self.rate + RATE_GAIN * (sample_rate - self.rate)
            self._win_start, self._win_bytes = now, 0

    def lost(self) -> None:
        """The rail's connection died: a running probe says nothing any more."""
        self.probe_seq = 0
        self._win_start = None


class RailSet:
    """One multi-rail peer as the node keeps it: its NIDs in configuration order (the primary
    first), the one sequence space and the one in-flight map its rails share (so an ACK
    that comes back on any rail finds its message), and the tokens of rail probes."""

    __slots__ = ("primary", "nids", "next_seq", "inflight", "probes")

    def __init__(self, primary: Nid, nids: Sequence[Nid]) -> None:
        self.primary = primary
        self.nids = list(dict.fromkeys([primary, *nids]))
        self.next_seq = 1
        self.inflight: dict[int, Any] = {}
        self.probes = 0

    def __repr__(self) -> str:
        return f"<RailSet {self.primary} {len(self.nids)} rails>"
