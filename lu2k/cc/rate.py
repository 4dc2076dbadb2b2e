"""Configured-rate congestion control, for links whose rate the operator knows.  Pure.

Theory of operation.  A dedicated satellite carrier has a known rate; probing for it wastes
time on a 600 ms RTT and loss-based backoff wastes the link.  So this controller paces at the
configured ``rate`` -- the rate the operator wants *delivered* -- divided by (1 - p), p being
the medium's loss measured in queue-free rounds, so that retransmissions come on top of the
wanted rate instead of eating into it.  The wire rate never exceeds ``cap`` (default: the
rate itself, i.e. "the link is this fast, fill it").  The window is ``cwnd_gain`` times the
pacing rate times the minimum RTT, so a queue that builds cannot grow past that.

It still yields on a shared link.  The same signals as the model-based controller
(:class:`~lu2k.cc.base.CongestionSignals`) -- loss above the random baseline, or a standing
queue for two rounds -- cut the current rate to ``beta`` times what the last round delivered
(never below ``floor`` of the configured rate); each round without a queue then raises it by
``recovery`` (5 %), so after a competing flow leaves the link is full again within
~ln(rate/current)/ln(1.05) rounds -- about 18 rounds (11 s on GEO) from half the rate.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError
from .base import CongestionController, CongestionSignals, RateSample


class RateController(CongestionController):
    """Pace at a configured rate, compensate for random loss, back off on congestion."""

    name = "rate"

    def __init__(
        self,
        *,
        mss: int,
        rate: float,
        cap: float | None = None,
        initial_rtt: float = 0.1,
        cwnd_gain: float = 2.0,
        beta: float = 0.85,
        floor: float = 0.05,
        recovery: float = 0.05,
        signals: CongestionSignals | None = None,
    ) -> None:
        super().__init__(mss=mss)
        if not rate or rate <= 0 or not math.isfinite(rate):
            raise ConfigError(f"configured-rate congestion control needs a positive rate, got {rate!r}")
        cap = rate if cap is None else cap
        if cap <= 0:
            raise ConfigError(f"rate cap must be positive, got {cap}")
        if initial_rtt <= 0:
            raise ConfigError(f"initial RTT must be positive, got {initial_rtt}")
        if not 0.5 <= beta < 1.0:
            raise ConfigError(f"beta {beta} outside 0.5..1")
        self.rate = rate
        self.cap = cap
        self.cwnd_gain = cwnd_gain
        self.beta = beta
        self.floor = floor
        self.recovery = recovery
        self.signals = signals or CongestionSignals(mss=mss)
        self.min_rtt = math.inf
        self._initial_rtt = initial_rtt
        self.current = rate  # the delivered rate we aim at now (lowered on congestion)
        self.reactions = 0
        self._last_reaction_round = -10
        self._update()

    def _rtt(self) -> float:
        return self.min_rtt if math.isfinite(self.min_rtt) else self._initial_rtt

    def _update(self) -> None:
        p = min(self.signals.baseline_loss, 0.5)
        self.pacing_rate = min(self.cap, self.current / (1 - p))
        self.cwnd = max(int(self.cwnd_gain * self.pacing_rate * self._rtt()), 4 * self.mss)

    def _on_sample(self, now: float, sample: RateSample, round_ended: bool) -> None:
        self.min_rtt = min(self.min_rtt, sample.rtt)
        r = self.sampler.last_round
        if round_ended and r is not None:
            excess, _queue = self.signals.on_round(r, self.min_rtt)
            needed = max(2, math.ceil(0.3 / max(self._rtt(), 1e-3)))  # >= 0.3 s of queue, as bbr
            if (excess or self.signals.queue_rounds >= needed) and r.number - self._last_reaction_round >= 2:
                self._last_reaction_round = r.number
                self.reactions += 1
                delivered = r.max_rate if r.max_rate > 0 else self.current
                self.current = max(self.floor * self.rate, min(self.current, delivered) * self.beta)
            elif not excess and self.signals.queue_rounds == 0 and not _queue:
                # Win back multiplicatively: a few per cent of what gets through now, so
                # the probe toward the configured rate does not overflow a shared queue.
                self.current = min(self.rate, self.current * (1 + self.recovery))
        self._update()

    def on_persistent_congestion(self, now: float) -> None:
        self.current = max(self.floor * self.rate, self.current / 4)
        self._update()

    def state(self) -> dict[str, Any]:
        out = super().state()
        out.update({
            "rate_mbit": round(self.rate * 8 / 1e6, 3),
            "cap_mbit": round(self.cap * 8 / 1e6, 3),
            "current_mbit": round(self.current * 8 / 1e6, 3),
            "min_rtt_ms": round(self.min_rtt * 1e3, 1) if math.isfinite(self.min_rtt) else None,
            "baseline_loss": round(self.signals.baseline_loss, 5),
            "reactions": self.reactions,
        })
        return out
