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


# The window of application message ids (see AppIds): how many and for how long.
APP_IDS_CAPACITY = 65536
APP_IDS_LIFETIME = 3600.0

AppKey = tuple[bytes, int, int]  # (source NID packed, source portal, application message id)


class AppIds:
    """Receive-side memory of application message ids, across sender restarts.  Pure.

    Sequence-number dedupe (:class:`RecvWindow`) lives in one sender *session*: a sending
    daemon that restarts starts a new one, so a message its application resends after the
    crash looks new.  An application that gives its messages ids (``Endpoint.send(...,
    msg_id=...)``) makes them recognisable: the receiver remembers each (source NID,
    source portal, id) it finished, with its status, and answers a later copy with that
    status instead of delivering it again.  The memory holds the most recent ``capacity``
    ids delivered, each for at most ``lifetime`` seconds; a resend after either is
    delivered again, as is one whose first copy failed (no receiver, ...).  A copy arriving
    while the first is still being delivered waits for its outcome.
    """

    def __init__(self, capacity: int = APP_IDS_CAPACITY, lifetime: float = APP_IDS_LIFETIME) -> None:
        self.capacity, self.lifetime = capacity, lifetime
        self._done: OrderedDict[AppKey, tuple[int, float]] = OrderedDict()  # key -> (status, finished at), oldest first
        self._busy: dict[AppKey, list[object]] = {}  # being delivered -> copies waiting for the outcome

    def __len__(self) -> int:
        return len(self._done) + len(self._busy)

    def check(self, key: AppKey, now: float) -> int | None:
        """None if ``key`` is new (then call :meth:`start`); IN_PROGRESS if it is being
        delivered; else the status it finished with."""
        done = self._done
        while done:
            oldest = next(iter(done.values()))
            if now - oldest[1] <= self.lifetime:
                break
            done.popitem(last=False)
        if key in self._busy:
            return IN_PROGRESS
        got = done.get(key)
        return None if got is None else got[0]

    def start(self, key: AppKey) -> None:
        self._busy[key] = []

    def wait(self, key: AppKey, waiter: object) -> None:
        """A copy of ``key`` arrived while it is being delivered: hand ``waiter`` back from finish()."""
        self._busy[key].append(waiter)

    def finish(self, key: AppKey, status: int, now: float) -> list[object]:
        """Record ``key``'s outcome; returns the copies that waited for it."""
        waiters = self._busy.pop(key, [])
        if status == 0:  # a failed delivery (no receiver, ...) may be tried again
            self._done[key] = (status, now)
            self._done.move_to_end(key)
            while len(self._done) > self.capacity:
                self._done.popitem(last=False)
        return waiters
