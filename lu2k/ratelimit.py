"""Rate limits for repeated log lines: the one limiter every part of the daemon uses.

A hostile or broken peer, client or application can make the same line repeat thousands
of times a second (refused connections and attaches, an accept loop out of descriptors,
failing connects).  Two layers:

* :class:`LogLimiter` (pure: the caller passes ``now``) -- a token bucket per *kind* (what
  repeats: ``"accept"``, ``("refused", uid)``): ``burst`` lines at once, refilled at
  ``burst`` per ``interval`` seconds; the rest are counted, and the first line let through
  after a suppressed stretch says how many were dropped.  At most ``max_kinds`` kinds get
  a bucket of their own; further kinds share one overflow bucket, so varying what repeats
  grows neither memory nor the log.
* :class:`RateLimitedLog` -- the same, wrapped around a logger and a clock::

      refusals = RateLimitedLog(log)
      refusals.warning(("refused", uid), "shim attach refused for uid %d", uid)

  or, for structured loggers that take the count as a field::

      limiter = LogLimiter()
      if (n := limiter.allow("accept", time.monotonic())) is not None:
          log.warning("accept failed", suppressed=n)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

OVERFLOW = "<other>"  # the bucket kinds share beyond max_kinds


@dataclass
class _Bucket:
    tokens: float
    last: float
    suppressed: int = 0


@dataclass
class LogLimiter:
    """Per-kind token bucket: ``burst`` lines, refilled at ``burst`` per ``interval`` seconds."""

    burst: int = 5
    interval: float = 10.0
    max_kinds: int = 256
    _kinds: dict[Hashable, _Bucket] = field(default_factory=dict)

    def allow(self, kind: Hashable, now: float) -> int | None:
        """None: suppress this line.  Otherwise log it, noting the returned number of lines
        of this kind suppressed since the last one let through."""
        b = self._kinds.get(kind)
        if b is None:
            if len(self._kinds) >= self.max_kinds - 1:
                kind = OVERFLOW
                b = self._kinds.get(kind)
            if b is None:
                b = self._kinds[kind] = _Bucket(float(self.burst), now)
        b.tokens = min(float(self.burst), b.tokens + max(0.0, now - b.last) * self.burst / self.interval)
        b.last = now
        if b.tokens < 1.0:
            b.suppressed += 1
            return None
        b.tokens -= 1.0
        out, b.suppressed = b.suppressed, 0
        return out

    def suppressed(self, kind: Hashable) -> int:
        b = self._kinds.get(kind)
        return b.suppressed if b else 0


class RateLimitedLog:
    """A :class:`LogLimiter` in front of a logger (stdlib or structlog: keyword fields pass
    through).  ``clock`` is injectable so tests need no sleeping."""

    def __init__(self, logger: Any, *, burst: int = 5, per_seconds: float = 60.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.limiter = LogLimiter(burst=burst, interval=per_seconds, max_kinds=max_keys)
        self.clock = clock
        self.logged = 0
        self.suppressed = 0

    def log(self, level: int, key: Hashable, msg: str, *args: object, **fields: object) -> bool:
        """Log ``msg % args`` unless ``key`` is over its budget; True if it was logged."""
        dropped = self.limiter.allow(key, self.clock())
        if dropped is None:
            self.suppressed += 1
            return False
        self.logged += 1
        if dropped:
            msg += " (%d similar lines suppressed)"
            args = (*args, dropped)
        self.logger.log(level, msg, *args, **fields)
        return True

    def warning(self, key: Hashable, msg: str, *args: object, **fields: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args, **fields)
