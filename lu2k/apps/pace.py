"""The token bucket that enforces ``--rate`` (parsed by :func:`lu2k.values.parse_rate`, the
one rate grammar of configs and command lines), and the rate shown on progress lines.

The cap is applied by the application before a message is handed to the shim, so it means
the same on every backend: payload bits per second leaving this transfer, averaged over
``burst`` bytes.  Pure: the caller passes ``now`` and sleeps for the delay returned.
"""

from __future__ import annotations

from ..errors import ConfigError


def format_throughput(bps: float) -> str:
    """A measured rate for a progress line (``18.20 Mbit/s``); configs use ``values.format_rate``."""
    if bps >= 1e9:
        return f"{bps / 1e9:.2f} Gbit/s"
    if bps >= 1e6:
        return f"{bps / 1e6:.2f} Mbit/s"
    return f"{bps / 1e3:.1f} kbit/s"


class TokenBucket:
    """``rate_bps`` bits per second with a ``burst`` of bytes; ``rate_bps == 0`` never delays."""

    def __init__(self, rate_bps: float, burst: int = 256 * 1024) -> None:
        if rate_bps < 0 or burst <= 0:
            raise ConfigError(f"bad token bucket: rate {rate_bps}, burst {burst}")
        self.rate = rate_bps / 8.0  # bytes per second
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp: float | None = None

    def delay(self, nbytes: int, now: float) -> float:
        """Seconds to wait before ``nbytes`` may go; 0.0 means now (and the bytes are taken)."""
        if not self.rate:
            return 0.0
        if self.stamp is None:
            self.stamp = now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(float(nbytes), self.burst)
        if self.tokens >= need - 1e-6 * self.rate:  # float residue must not turn into endless tiny waits
            self.tokens -= nbytes  # may go negative for a message larger than the burst: paid back later
            return 0.0
        return (need - self.tokens) / self.rate
