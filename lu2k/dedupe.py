"""Receive-side duplicate suppression for one sender session.  Pure.

After a reconnect the sender retransmits every message it has no ACK for, so a message
may arrive twice.  Per (sender NID, sender incarnation) we remember the status of each
sequence number we finished: all below ``floor`` are done, and a bounded map holds the
ones above it.  A duplicate of a finished message is answered with the recorded status;
a duplicate of one still in progress (being forwarded) is dropped -- its ACK comes later.

Some numbers never arrive: the sender gave them to messages that then timed out before
they were sent, or went to another gateway.  Once ``hole_limit`` later numbers are held
above such a missing one, the floor moves past it and it is remembered as a hole: should
it come after all, it is new (it was never delivered), so nothing is lost; without that
the window would hold every later number up to its capacity and then forget the oldest.
"""

from __future__ import annotations

from collections import OrderedDict

IN_PROGRESS = -1
HOLE = -2  # below the floor: a number that had not arrived when the floor moved past it
HOLE_LIMIT = 1024


class RecvWindow:
    def __init__(self, capacity: int = 65536, hole_limit: int = HOLE_LIMIT) -> None:
        self.floor = 1  # sequence numbers start at 1
        self.capacity = capacity
        self.hole_limit = max(1, min(hole_limit, capacity))
        self._seen: OrderedDict[int, int] = OrderedDict()
        # Below the floor, what is not "delivered": failures, holes, holes that came after all.
        self._below: OrderedDict[int, int] = OrderedDict()

    def check(self, seq: int) -> int | None:
        """None if new; else the recorded status (or IN_PROGRESS)."""
        if seq < self.floor:
            status = self._below.get(seq, 0)
            return None if status == HOLE else status
        return self._seen.get(seq)

    def start(self, seq: int) -> None:
        if seq < self.floor:
            self._note_below(seq, IN_PROGRESS)  # a hole that came after all
        else:
            self._seen[seq] = IN_PROGRESS

    def finish(self, seq: int, status: int) -> None:
        if seq < self.floor:
            if self._below.get(seq) == IN_PROGRESS:
                if status:
                    self._below[seq] = status
                else:
                    del self._below[seq]
            return
        self._seen[seq] = status
        seen = self._seen
        while True:
            st = seen.get(self.floor, HOLE)
            if st == IN_PROGRESS or (st == HOLE and len(seen) < self.hole_limit):
                break
            if st == HOLE:
                self._note_below(self.floor, HOLE)
            else:
                del seen[self.floor]
                if st:
                    self._note_below(self.floor, st)
            self.floor += 1
        while len(seen) > self.capacity:
            old, st = next(iter(seen.items()))
            if st == IN_PROGRESS:
                seen.move_to_end(old)
                break
            del seen[old]

    def _note_below(self, seq: int, status: int) -> None:
        self._below[seq] = status
        if len(self._below) > self.capacity:
            self._below.popitem(last=False)


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
