"""QUIC backend: learning at once that a path which went silent carries packets again.  Pure.

A LEO terminal's hand-over takes the link away for a few hundred milliseconds.  QUIC's sender
learns that the path is back only from its probe timeout, and each unanswered probe doubles
the next wait (RFC 9002 section 6.2.1): on a 45 ms path the probes go at about 0.09, 0.26 and
0.6 s, so a 300 ms outage leaves the link idle for up to another 0.3 s after it ends.  The side
that was receiving notices the silence first -- data was arriving, then nothing -- and one
small packet from it is enough to show the sender that the path works.  Two rules, one per
role; a connection that carries data both ways plays both:

* **Receiver** (:meth:`PathWatch.ping_due`): once no data-bearing datagram has come for
  ``max(100 ms, 2 RTT)`` and nothing at all has been heard since the last one, send a PING
  every ``max(20 ms, RTT / 4)`` until anything arrives, for at most ``limit`` seconds.  If the
  peer only stopped sending, its ACK of the first PING ends the watch: one PING per pause.
* **Sender** (:meth:`PathWatch.probe_due`): a datagram that arrives while the probe timeout
  is backed off (a probe went unanswered) is evidence that the path carries packets again, so
  the next probe goes now rather than at the backed-off time -- at most one per
  ``max(10 ms, RTT / 4)``.  The backoff count itself is left to aioquic: a probe that is not
  answered still doubles the next wait.

Both take ``now`` and the smoothed RTT and never read a clock; the quic protocol
(:mod:`lu2k.backends.quic_stream`) sends the PINGs and probes.
"""

from __future__ import annotations

import math

# A datagram at least this long carries data (a STREAM frame); ACK-only and PING packets are
# far shorter.
DATA_DATAGRAM = 600
SILENCE_MIN = 0.100
SILENCE_RTTS = 2.0
PING_MIN_INTERVAL = 0.020
PING_INTERVAL_RTTS = 0.25
PROBE_MIN_SPACING = 0.010
PROBE_SPACING_RTTS = 0.25
FIGURES = ("silence_pings", "early_probes")  # what figures() reports


class PathWatch:
    """Per connection: when to PING after data stopped, and when to probe early."""

    def __init__(self, limit: float) -> None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        self.limit = limit  # seconds of silence after which the watch gives up (the peer is gone)
        self.last_data = -math.inf  # last data-bearing datagram
        self.last_heard = -math.inf  # last datagram of any kind
        self._last_ping = -math.inf
        self._last_probe = -math.inf
        self.pings = 0  # PINGs sent into a silence (statistics)
        self.early_probes = 0  # probes sent before the backed-off timeout (statistics)

    def figures(self) -> dict[str, int]:
        """The statistics, as ``net show -v`` and ``peer show`` name them."""
        return dict(zip(FIGURES, (self.pings, self.early_probes)))

    def on_datagram(self, now: float, size: int) -> None:
        self.last_heard = now
        if size >= DATA_DATAGRAM:
            self.last_data = now

    def _silence(self, rtt: float) -> float:
        return max(SILENCE_MIN, SILENCE_RTTS * rtt)

    def _interval(self, rtt: float) -> float:
        return max(PING_MIN_INTERVAL, PING_INTERVAL_RTTS * rtt)

    def _watching(self, now: float) -> bool:
        # Data came once, nothing at all since, and not for so long that the peer is gone.
        return math.isfinite(self.last_data) and self.last_heard <= self.last_data and now - self.last_data <= self.limit

    def ping_due(self, now: float, rtt: float) -> bool:
        """Receiver: should a PING go now?  (Counts it when it says yes.)"""
        if not self._watching(now) or now - self.last_data < self._silence(rtt):
            return False
        if now - self._last_ping < self._interval(rtt):
            return False
        self._last_ping = now
        self.pings += 1
        return True

    def next_check(self, now: float, rtt: float) -> float | None:
        """When :meth:`ping_due` may next say yes; None while there is nothing to watch (the
        next data-bearing datagram starts it again)."""
        if not self._watching(now):
            return None
        quiet_from = self.last_data + self._silence(rtt)
        return max(now, quiet_from, self._last_ping + self._interval(rtt))

    def probe_due(self, now: float, rtt: float, backed_off: bool) -> bool:
        """Sender: a datagram just arrived; should the next probe go now?  (Counts it.)"""
        if not backed_off or now - self._last_probe < max(PROBE_MIN_SPACING, PROBE_SPACING_RTTS * rtt):
            return False
        self._last_probe = now
        self.early_probes += 1
        return True
