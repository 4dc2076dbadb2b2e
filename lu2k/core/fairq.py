"""A peer's send queue under saturation: fair between endpoints, bounded in bytes.  Pure.

Theory of operation
-------------------
Messages to one peer wait for credits in the peer's queue, and with credits they go to the
transport, which sends them as fast as the link (and its congestion control) allow.  Two
things decide what another endpoint's message waits behind when one endpoint offers more than
the link carries:

* **Order in the queue.**  A single FIFO puts a paced endpoint's message behind everything a
  saturating one queued before it.  :class:`FairQueue` keeps one FIFO per *owner* (the
  endpoint that submitted the message; forwarded messages share one) and serves the owners by
  deficit round robin over bytes (Shreedhar & Varghese, 1995): each owner with messages waiting
  earns ``quantum`` bytes per round and sends while its deficit covers its head message, so
  every owner gets an equal share of the bytes whatever its message sizes, and an owner that
  offers less than its share sees its messages leave at once.

* **Bytes past the link.**  Credits count messages, not bytes: 256 credits of 64 KiB messages
  are 16 MiB, eleven round trips of a 20 Mbit/s GEO hop, all of it queueing inside the
  transport.  :class:`ByteWindow` bounds the bytes assigned to the peer and not yet
  acknowledged to ``limit`` -- the net's derived ``window_bytes``, four bandwidth-delay
  products: one the link holds, one of queue, two held behind lost packets until their repair
  (two with ``loss: 0``).  A message is assigned only if it fits (or the window is
  empty, so a message larger than the window still goes, alone).  What does not fit stays in
  the fair queue, the endpoints' own in-flight limits fill up, and their sends block: the
  excess becomes back-pressure on the endpoint that offers it.

So a paced endpoint's message waits at most for its turn in one round (one message of each
other owner) and for the window to have room: a bounded wait of about one round trip, never
the saturating endpoint's whole backlog.

Both classes are containers with counters; the message core (:mod:`lu2k.core.node`) decides
when to push, pop, take and give.  ``FairQueue`` offers the deque operations the core uses
(``append``, ``popleft``, ``remove``, ``[0]``, ``len``, iteration) so it drops in for the
peer's deque.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

from ..errors import LocalProtocolError

T = TypeVar("T")
DEFAULT_QUANTUM = 64 << 10  # bytes an owner earns per round: one typical bulk message


class FairQueue(Generic[T]):
    """Per-owner FIFOs served by deficit round robin over bytes.  See the module docstring."""

    def __init__(self, owner: Callable[[T], Hashable], size: Callable[[T], int], quantum: int = DEFAULT_QUANTUM) -> None:
        if quantum < 1:
            raise LocalProtocolError(f"fair queue quantum must be >= 1 byte, got {quantum}")
        self._owner, self._size, self.quantum = owner, size, quantum
        self._queues: dict[Hashable, deque[T]] = {}  # owners with messages, in round order
        self._deficit: dict[Hashable, int] = {}
        self._visiting: set[Hashable] = set()  # the front owner, once it earned this visit's quantum
        self._where: dict[int, Hashable] = {}  # id(item) -> the owner it was queued under
        self._len = 0
        self.bytes = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[T]:
        for q in list(self._queues.values()):
            yield from list(q)

    @property
    def owners(self) -> int:
        return len(self._queues)

    def owner_bytes(self, owner: Hashable) -> int:
        return sum(self._size(m) for m in self._queues.get(owner, ()))

    def append(self, item: T) -> None:
        key = self._owner(item)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
            self._deficit[key] = 0
        q.append(item)
        self._where[id(item)] = key
        self._len += 1
        self.bytes += self._size(item)

    def insert(self, item: T, slot: Callable[[int, Callable[[int], int]], int]) -> None:
        """Queue ``item`` at ``slot(n, size_at)`` among its owner's ``n`` waiting messages
        (``size_at(i)``: the i-th one's size) instead of at the end: a multi-rail peer puts a
        small message ahead of its owner's bulk (core.rails.queue_slot)."""
        key = self._owner(item)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
            self._deficit[key] = 0
        waiting = q
        q.insert(slot(len(q), lambda i: self._size(waiting[i])), item)
        self._where[id(item)] = key
        self._len += 1
        self.bytes += self._size(item)

    def _advance(self) -> Hashable:
        """The owner whose head message goes next: the front owner while its deficit covers its
        head; otherwise it earns ``quantum`` once per visit, and if that is still not enough it
        goes to the back of the round keeping what it earned."""
        queues, deficit, visiting = self._queues, self._deficit, self._visiting
        while True:
            key = next(iter(queues))
            if deficit[key] >= self._size(queues[key][0]):
                return key
            if key not in visiting:
                visiting.add(key)
                deficit[key] += self.quantum
                continue
            visiting.discard(key)
            queues[key] = queues.pop(key)  # to the back of the round

    def __getitem__(self, index: int) -> T:
        """``q[0]``: the message :meth:`popleft` returns next."""
        if index != 0 or not self._len:
            raise IndexError("a fair queue only shows its next message, q[0]")
        return self._queues[self._advance()][0]

    def popleft(self) -> T:
        if not self._len:
            raise IndexError("pop from an empty fair queue")
        key = self._advance()
        q = self._queues[key]
        item = q.popleft()
        del self._where[id(item)]
        n = self._size(item)
        self._deficit[key] -= n
        self._len -= 1
        self.bytes -= n
        if not q:
            del self._queues[key]  # an owner with nothing waiting keeps no credit (DRR's rule)
            del self._deficit[key]
            self._visiting.discard(key)
        return item

    def remove(self, item: T) -> None:
        """Take ``item`` out wherever it waits (it failed or timed out); ValueError if absent."""
        if id(item) not in self._where:
            raise ValueError("message not in the fair queue")
        key = self._where[id(item)]
        q = self._queues.get(key)
        if q is None:
            raise ValueError("message not in the fair queue")
        q.remove(item)
        del self._where[id(item)]
        self._len -= 1
        self.bytes -= self._size(item)
        if not q:
            del self._queues[key]
            del self._deficit[key]
            self._visiting.discard(key)


class ByteWindow:
    """Bytes assigned to a peer and not yet acknowledged, bounded by ``limit`` (0: unbounded)."""

    __slots__ = ("limit", "in_use", "max_in_use")

    def __init__(self, limit: int = 0) -> None:
        if limit < 0:
            raise LocalProtocolError(f"byte window must not be negative, got {limit}")
        self.limit = limit
        self.in_use = 0
        self.max_in_use = 0

    def fits(self, n: int) -> bool:
        """May ``n`` more bytes be assigned?  Always when empty, so an oversized message still goes alone."""
        return not self.limit or not self.in_use or self.in_use + n <= self.limit

    def take(self, n: int) -> None:
        self.in_use += n
        if self.in_use > self.max_in_use:
            self.max_in_use = self.in_use

    def give(self, n: int) -> None:
        if n > self.in_use:
            raise LocalProtocolError(f"{n} bytes returned to a window holding {self.in_use}")
        self.in_use -= n
