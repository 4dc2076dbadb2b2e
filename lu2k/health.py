"""Peer/NI health and reconnect backoff, as LNet does health.  Pure: every call takes ``now``.

Health runs 0..1000 (LNet's ``LNET_MAX_HEALTH_VALUE``): a failure subtracts
``sensitivity``; each success adds one back, and while a peer is unhealthy, a recovery step
of one is granted every ``recovery_interval`` seconds of no new failure (LNet recovers by
pinging).  Route selection prefers healthier gateways.

:class:`Backoff` spaces reconnect attempts exponentially between ``low`` and ``high``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_HEALTH = 1000


@dataclass
class Health:
    sensitivity: int = 100
    recovery_interval: float = 1.0
    value: int = MAX_HEALTH
    failures: int = 0
    last_failure: float | None = None
    _last_recovery: float = 0.0

    def failure(self, now: float) -> None:
        self.failures += 1
        self.value = max(0, self.value - self.sensitivity)
        self.last_failure = now
        self._last_recovery = now

    def success(self, n: int = 1) -> None:
        self.value = min(MAX_HEALTH, self.value + n)

    def tick(self, now: float) -> None:
        if self.value < MAX_HEALTH and now - self._last_recovery >= self.recovery_interval:
            steps = int((now - self._last_recovery) / self.recovery_interval)
            self.value = min(MAX_HEALTH, self.value + steps)
            self._last_recovery += steps * self.recovery_interval


@dataclass
class Backoff:
    low: float = 0.1
    high: float = 10.0
    attempts: int = 0
    next_at: float = 0.0
    last_error: str = ""
    _delays: list[float] = field(default_factory=list)

    def ready(self, now: float) -> bool:
        return now >= self.next_at

    def failed(self, now: float, error: str) -> float:
        # The exponent is capped: a peer retried for hours must not overflow the float.
        delay = min(self.high, self.low * float(2 ** min(self.attempts, 60)))
        self.attempts += 1
        self.next_at = now + delay
        self.last_error = error
        return delay

    def succeeded(self) -> None:
        self.attempts = 0
        self.next_at = 0.0
        self.last_error = ""
