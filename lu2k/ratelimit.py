"""Rate limits for repeated log lines.  Pure: the caller passes ``now``.

A hostile or broken peer can make the same line repeat thousands of times a second (refused
connections, an accept loop out of descriptors).  :class:`LogLimiter` lets the first
``burst`` lines of a kind through per ``interval`` and counts the rest; the first line let
through after a quiet spell says how many were suppressed::

    limiter = LogLimiter()
    if (n := limiter.allow("refused", time.monotonic())) is not None:
        log.warning("refused connection", suppressed=n, ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Kind:
    window_start: float
    passed: int = 0
    suppressed: int = 0


@dataclass
class LogLimiter:
    """Per-kind budget of ``burst`` lines per ``interval`` seconds; at most ``max_kinds`` kinds
    are tracked (the oldest is forgotten), so hostile variety cannot grow it."""

    burst: int = 5
    interval: float = 10.0
    max_kinds: int = 256
    _kinds: dict[str, _Kind] = field(default_factory=dict)

    def allow(self, kind: str, now: float) -> int | None:
        """None: suppress this line.  Otherwise log it, noting the returned number of lines
        suppressed since the last one let through."""
        k = self._kinds.get(kind)
        if k is None:
            if len(self._kinds) >= self.max_kinds:
                self._kinds.pop(next(iter(self._kinds)))
            k = self._kinds[kind] = _Kind(now)
        if now - k.window_start >= self.interval:
            k.window_start, k.passed = now, 0
        if k.passed >= self.burst:
            k.suppressed += 1
            return None
        k.passed += 1
        out, k.suppressed = k.suppressed, 0
        return out

    def suppressed(self, kind: str) -> int:
        k = self._kinds.get(kind)
        return k.suppressed if k else 0
