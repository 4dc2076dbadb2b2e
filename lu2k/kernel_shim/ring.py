"""SPSC descriptor rings and slot pools over shared memory.  Pure (no I/O, no event loop).

Theory of operation (the ordering contract is spelled out in :mod:`.abi`):

* A :class:`RingProducer` writes descriptors at its private ``head`` and makes them
  visible with one store of the shared ``producer`` index in :meth:`RingProducer.publish`
  -- so a batch of any size costs one index store, and the peer needs one doorbell for it.
* A :class:`RingConsumer` loads the shared ``producer`` index once per batch, unpacks the
  descriptors and hands the slots back with one store of ``consumer``.
* Indices are free-running ``u32``; they are read and written through
  ``memoryview.cast('I')``, which compiles to single aligned 4-byte loads/stores (unlike
  ``struct.pack_into('<I')``, which writes byte by byte and could be seen half-written).
* The other side's index is never trusted: a fill level above ``entries`` raises
  :class:`~.abi.RingIndexError` naming the ring, the index and its value (the daemon
  detaches such an endpoint, and only it).  A producer that has seen a corrupt consumer
  index stays *broken*: every later call raises the same error, so a caller that missed
  it once cannot write over descriptors the consumer may still be reading.
* Slot offsets and lengths from the other side go through :meth:`SlotPool.check_span`,
  which raises :class:`~.abi.DescriptorError` unless they name the start of a slot and fit it.

:class:`SlotPool` is the buffer pool: slots of a few size classes (see
:func:`.abi.pool_classes`) with a free list per class.  ``alloc(size)`` takes the smallest
class that fits and has a free slot, so 0-byte and 4 MiB messages mix without
fragmentation, and ``lookup(offset)`` validates an offset from the other side in O(1).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable

from ..errors import LocalProtocolError
from .abi import RING_CONSUMER_OFF, RING_CTRL_SIZE, RING_PRODUCER_OFF, DescriptorError, PoolLayout, RingIndexError, RingLayout

_MASK32 = 0xFFFFFFFF
_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier (StoreLoad included) from Python.

    Acquiring an uncontended ``threading.Lock`` runs a locked compare-and-swap
    (``sem_trywait``/pthread mutex in CPython), which on x86-64 orders all earlier loads and
    stores before all later ones -- what the need-wakeup handshake requires.
    """
    _fence_lock.acquire()
    _fence_lock.release()


class _Ring:
    """Common part: the index words and the descriptor array."""

    def __init__(self, mem: memoryview, layout: RingLayout, desc: struct.Struct, name: str) -> None:
        if layout.desc_size != desc.size:
            raise LocalProtocolError(f"{name} ring: descriptor size {layout.desc_size} != struct size {desc.size}")
        if layout.entries < 1 or layout.entries & (layout.entries - 1):
            raise LocalProtocolError(f"{name} ring: {layout.entries} entries is not a power of two")
        if layout.ctrl % 64 or layout.descs + layout.entries * desc.size > len(mem) or layout.ctrl + RING_CTRL_SIZE > len(mem):
            raise LocalProtocolError(f"{name} ring does not fit its memory")
        self.name = name
        self.entries = layout.entries
        self.mask = layout.entries - 1
        self.desc = desc
        self.desc_size = desc.size
        self._mem = mem
        self._descs = layout.descs
        # Two u32 words, each on its own cache line, viewed as native u32 for atomic access.
        ctrl = mem[layout.ctrl : layout.ctrl + RING_CTRL_SIZE].cast("I")
        self._ctrl = ctrl
        self._p = RING_PRODUCER_OFF // 4
        self._c = RING_CONSUMER_OFF // 4

    def shared_producer(self) -> int:
        return self._ctrl[self._p]

    def shared_consumer(self) -> int:
        return self._ctrl[self._c]

    def release(self) -> None:
        """Drop the views into shared memory (so the mapping can be closed)."""
        self._ctrl.release()


class RingProducer(_Ring):
    """The producing side of one ring."""

    def __init__(self, mem: memoryview, layout: RingLayout, desc: struct.Struct, name: str, *, reset: bool = False) -> None:
        super().__init__(mem, layout, desc, name)
        if reset:
            self._ctrl[self._p] = 0
            self._ctrl[self._c] = 0
        self.head = self._ctrl[self._p]  # next slot we write (published up to here on publish())
        self._cached_consumer = self.head
        self.broken: RingIndexError | None = None

    def _load_consumer(self) -> int:
        """The consumer index, checked: it must lie within ``entries`` behind our head."""
        if self.broken is not None:
            raise self.broken
        cons = self._ctrl[self._c]
        used = (self.head - cons) & _MASK32
        if used > self.entries:
            self.broken = RingIndexError(
                f"{self.name} ring", "consumer index", cons,
                f"not within {self.entries} entries behind the producer index {self.head}")
            raise self.broken
        return cons

    def space(self) -> int:
        """Free slots; re-reads the consumer index only when the cached one says full."""
        if self.broken is not None:
            raise self.broken
        free = self.entries - ((self.head - self._cached_consumer) & _MASK32)
        if free > 0:
            return free
        cons = self._load_consumer()
        self._cached_consumer = cons
        return self.entries - ((self.head - cons) & _MASK32)

    def refresh(self) -> int:
        """Free slots after re-reading the consumer index."""
        self._cached_consumer = self.head - self.entries  # force a reload
        return self.space()

    def put(self, *fields: object) -> bool:
        """Write one descriptor (not yet visible); False if the ring is full."""
        head = self.head
        if self.broken is not None:
            raise self.broken
        if (head - self._cached_consumer) & _MASK32 >= self.entries and self.space() <= 0:
            return False
        self.desc.pack_into(self._mem, self._descs + (head & self.mask) * self.desc_size, *fields)
        self.head = (head + 1) & _MASK32
        return True

    def put_many(self, items: Iterable[tuple[object, ...]]) -> int:
        """Write descriptors until the ring is full; returns how many were written."""
        n = 0
        pack, mem, base, size, mask = self.desc.pack_into, self._mem, self._descs, self.desc_size, self.mask
        space = self.space()
        head = self.head
        for item in items:
            if space <= 0:
                self.head = head
                space = self.space()
                if space <= 0:
                    break
            pack(mem, base + (head & mask) * size, *item)
            head = (head + 1) & _MASK32
            space -= 1
            n += 1
        self.head = head
        return n

    def pending(self) -> int:
        """Descriptors written but not yet published."""
        return (self.head - self._ctrl[self._p]) & _MASK32

    def publish(self) -> bool:
        """Make written descriptors visible (release store); True if anything was new."""
        if self._ctrl[self._p] == self.head:
            return False
        self._ctrl[self._p] = self.head
        return True

    def unconsumed(self) -> int:
        """Published descriptors the consumer has not taken yet."""
        return (self.head - self._load_consumer()) & _MASK32


class RingConsumer(_Ring):
    """The consuming side of one ring."""

    def __init__(self, mem: memoryview, layout: RingLayout, desc: struct.Struct, name: str) -> None:
        super().__init__(mem, layout, desc, name)
        self.tail = self._ctrl[self._c]

    def available(self) -> int:
        """Published descriptors not yet consumed (acquire load of the producer index)."""
        prod = self._ctrl[self._p]
        n = (prod - self.tail) & _MASK32
        if n > self.entries:
            raise RingIndexError(f"{self.name} ring", "producer index", prod,
                                 f"overrun: {n} ahead of the consumer index {self.tail} in a ring of {self.entries}")
        return n

    def take(self, limit: int | None = None) -> list[tuple]:  # type: ignore[type-arg]
        """Unpack up to ``limit`` descriptors; call :meth:`commit` once they are processed."""
        n = self.available()
        if limit is not None and n > limit:
            n = limit
        if n == 0:
            return []
        unpack, mem, base, size, mask, tail = self.desc.unpack_from, self._mem, self._descs, self.desc_size, self.mask, self.tail
        out = [unpack(mem, base + ((tail + i) & mask) * size) for i in range(n)]
        self.tail = (tail + n) & _MASK32
        return out

    def commit(self) -> None:
        """Hand consumed slots back to the producer (release store)."""
        self._ctrl[self._c] = self.tail


class SlotPool:
    """Fixed slots of a few size classes, with validation of offsets from the other side.

    The allocating side uses :meth:`alloc`/:meth:`free`; the other side uses
    :meth:`lookup` to turn an offset it was given into a slot capacity (or ``None``).
    """

    def __init__(self, layout: PoolLayout) -> None:
        self.layout = layout
        self.classes = sorted(layout.classes, key=lambda c: c.slot_size)
        self._capacity: dict[int, int] = {}
        self._free: list[list[int]] = []
        for c in self.classes:
            offsets = [c.offset + i * c.slot_size for i in range(c.count)]
            for o in offsets:
                self._capacity[o] = c.slot_size
            self._free.append(offsets[::-1])  # pop() hands out the lowest offsets first
        self._sizes = [c.slot_size for c in self.classes]
        self._free_of = {c.slot_size: f for c, f in zip(self.classes, self._free)}
        self.max_size = self._sizes[-1]
        self.total = len(self._capacity)
        self._used: set[int] = set()

    @property
    def in_use(self) -> int:
        return len(self._used)

    def alloc(self, size: int) -> tuple[int, int] | None:
        """``(offset, capacity)`` of a free slot of at least ``size`` bytes, or None."""
        if size < 0:
            raise LocalProtocolError(f"cannot allocate a buffer of {size} bytes")
        for i, slot_size in enumerate(self._sizes):
            if slot_size >= size and self._free[i]:
                offset = self._free[i].pop()
                self._used.add(offset)
                return offset, slot_size
        return None

    def can_alloc(self, size: int) -> bool:
        return any(s >= size and f for s, f in zip(self._sizes, self._free))

    def free(self, offset: int) -> None:
        cap = self._capacity.get(offset)
        if cap is None:
            raise LocalProtocolError(f"offset {offset} is not the start of a slot of this pool")
        if offset not in self._used:
            raise LocalProtocolError(f"slot at offset {offset} freed twice")
        self._used.discard(offset)
        self._free_of[cap].append(offset)

    def is_allocated(self, offset: int) -> bool:
        return offset in self._used

    def lookup(self, offset: int) -> int | None:
        """Capacity of the slot starting at ``offset``, or None if no slot starts there."""
        return self._capacity.get(offset)

    def check_span(self, offset: int, length: int, max_length: int, what: str = "TX") -> int:
        """The capacity of the slot ``offset`` names, if ``length`` fits it and ``max_length``;
        else DescriptorError saying which field is wrong (short: it travels in a 48-byte reason)."""
        cap = self._capacity.get(offset)
        if cap is None:
            inside = any(c.offset <= offset < c.end for c in self.classes)
            raise DescriptorError(what, "offset", offset, f"not a {what} slot" + (" (inside one)" if inside else ""))
        if length > cap or length > max_length:
            raise DescriptorError(what, "length", length, f"exceeds slot {cap}/max {max_length}")
        return cap

    def free_counts(self) -> dict[int, int]:
        return {s: len(f) for s, f in zip(self._sizes, self._free)}
