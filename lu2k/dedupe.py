"""Receive-side duplicate suppression for one sender session.  Pure.

After a reconnect the sender retransmits every message it has no ACK for, so a message
may arrive twice.  Per (sender NID, sender incarnation) we remember the status of each
sequence number we finished: all below ``floor`` are done, and a bounded map holds the
ones above it.  A duplicate of a finished message is answered with the recorded status;
a duplicate of one still in progress (being forwarded) is dropped -- its ACK comes later.
"""

from __future__ import annotations

from collections import OrderedDict

IN_PROGRESS = -1


class RecvWindow:
    def __init__(self, capacity: int = 65536) -> None:
        self.floor = 1  # sequence numbers start at 1
        self.capacity = capacity
        self._seen: OrderedDict[int, int] = OrderedDict()
        self._failed_below: OrderedDict[int, int] = OrderedDict()  # failures compacted below floor

    def check(self, seq: int) -> int | None:
        """None if new; else the recorded status (or IN_PROGRESS)."""
        if seq < self.floor:
            return self._failed_below.get(seq, 0)
        return self._seen.get(seq)

    def start(self, seq: int) -> None:
        self._seen[seq] = IN_PROGRESS

    def finish(self, seq: int, status: int) -> None:
        if seq < self.floor:
            return
        self._seen[seq] = status
        while self._seen.get(self.floor, IN_PROGRESS) != IN_PROGRESS:
            st = self._seen.pop(self.floor)
            if st:
                self._failed_below[self.floor] = st
                if len(self._failed_below) > self.capacity:
                    self._failed_below.popitem(last=False)
            self.floor += 1
        while len(self._seen) > self.capacity:
            old, st = next(iter(self._seen.items()))
            if st == IN_PROGRESS:
                self._seen.move_to_end(old)
                break
            del self._seen[old]
