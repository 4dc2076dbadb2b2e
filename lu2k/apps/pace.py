"""Rates: ``--rate 5mbit`` parsed once, and the token bucket that enforces it.

The cap is applied by the application before a message is handed to the shim, so it means
the same on every backend: payload bits per second leaving this transfer, averaged over
``burst`` bytes.  Pure: the caller passes ``now`` and sleeps for the delay returned.
"""

from __future__ import annotations

import re

from ..errors import ConfigError

_BITS = {"": 1.0, "bit": 1.0, "kbit": 1e3, "k": 1e3, "kbps": 1e3, "mbit": 1e6, "m": 1e6, "mbps": 1e6,
         "gbit": 1e9, "g": 1e9, "gbps": 1e9}
_BYTES = {"b": 8.0, "kb": 8e3, "mb": 8e6, "gb": 8e9, "kib": 8 * 1024.0, "mib": 8 * 1048576.0, "gib": 8 * 1073741824.0}
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)(?:/s)?\s*$")


def parse_rate(text: str, *, what: str = "--rate") -> float:
    """Bits per second from ``5mbit``/``5m``/``5mbps`` (bits) or ``2MB``/``2MiB`` (bytes, capital B);
    ``0``/``unlimited`` -> 0 (no cap)."""
    t = text.strip()
    if t.lower() in ("0", "unlimited", "none"):
        return 0.0
    m = _RATE.match(t)
    factor = None
    if m:
        unit = m.group(2)
        factor = _BYTES.get(unit.lower()) if unit.endswith("B") else _BITS.get(unit.lower())
    if m is None or factor is None:
        raise ConfigError(f"bad rate {text!r}: expected a number with a unit (e.g. 5mbit, 500kbit, 2MB) or 'unlimited'", where=what)
    bps = float(m.group(1)) * factor
    if bps <= 0:
        raise ConfigError(f"bad rate {text!r}: must be positive (or 'unlimited')", where=what)
    return bps


def format_rate(bps: float) -> str:
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
