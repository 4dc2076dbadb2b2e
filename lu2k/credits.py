"""LNet-style credits.  Pure.

A :class:`Credits` pool starts at ``limit``; each message in flight holds one.  As in LNet,
the pool's value may go negative: ``-value`` is the number of messages queued waiting for a
credit, and ``min_value`` (lnetctl's ``min_tx_credits``) records the deepest queue seen.
Messages that cannot get a credit wait in a bounded queue owned by the caller; the bound is
what turns congestion into back-pressure on the shim instead of memory growth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import LocalProtocolError


@dataclass
class Credits:
    limit: int
    value: int = field(init=False)
    min_value: int = field(init=False)
    in_use: int = 0

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise LocalProtocolError(f"credit limit must be >= 1, got {self.limit}")
        self.value = self.limit
        self.min_value = self.limit

    @property
    def available(self) -> bool:
        return self.in_use < self.limit

    def take(self, n: int = 1) -> None:
        if self.in_use + n > self.limit:
            raise LocalProtocolError("no credit available")
        self.in_use += n

    def give(self, n: int = 1) -> None:
        if self.in_use < n:
            raise LocalProtocolError("credit returned that was never taken")
        self.in_use -= n

    def note_queue(self, queued: int) -> None:
        """Record the current queue depth so ``value``/``min_value`` read like LNet's."""
        self.value = self.limit - self.in_use - queued
        self.min_value = min(self.min_value, self.value)
