"""Tests for lu2k.kernel_shim.ring: SPSC rings and slot pools, synchronously over a bytearray."""

from __future__ import annotations

import struct

import pytest

from lu2k.errors import LocalProtocolError, RemoteProtocolError
from lu2k.kernel_shim import abi
from lu2k.kernel_shim.abi import DescriptorError, RegionError, RingIndexError
from lu2k.kernel_shim.ring import RingConsumer, RingProducer, SlotPool

DESC = struct.Struct("<QI4x")


def make_pair(entries: int = 8) -> tuple[memoryview, RingProducer, RingConsumer]:
    layout = abi.RingLayout(64, 64 + abi.RING_CTRL_SIZE, entries, DESC.size)
    mem = memoryview(bytearray(64 + abi.RING_CTRL_SIZE + entries * DESC.size))
    prod = RingProducer(mem, layout, DESC, "test", reset=True)
    cons = RingConsumer(mem, layout, DESC, "test")
    return mem, prod, cons


def test_batch_produce_is_invisible_until_publish() -> None:
    _mem, prod, cons = make_pair()
    assert prod.put_many((i, i * 10) for i in range(5)) == 5
    assert cons.available() == 0 and prod.pending() == 5
    assert prod.publish() is True
    assert prod.publish() is False
    assert cons.take() == [(i, i * 10) for i in range(5)]
    assert prod.unconsumed() == 5  # not committed yet
    cons.commit()
    assert prod.unconsumed() == 0


def test_full_ring_and_wraparound() -> None:
    _mem, prod, cons = make_pair(4)
    seen: list[int] = []
    for round_ in range(10):
        n = prod.put_many((round_ * 100 + i, 0) for i in range(6))
        assert n == 4  # only four fit
        assert prod.put(1, 1) is False
        prod.publish()
        got = cons.take(limit=3)
        cons.commit()
        got += cons.take()
        cons.commit()
        seen.extend(x for x, _ in got)
        assert prod.space() == 4
    assert seen == [r * 100 + i for r in range(10) for i in range(4)]


def test_indices_wrap_at_u32() -> None:
    mem, _prod, _cons = make_pair(4)
    ctrl = mem[64 : 64 + abi.RING_CTRL_SIZE].cast("I")
    ctrl[0] = ctrl[16] = 0xFFFFFFFE
    layout = abi.RingLayout(64, 64 + abi.RING_CTRL_SIZE, 4, DESC.size)
    prod = RingProducer(mem, layout, DESC, "wrap")
    cons = RingConsumer(mem, layout, DESC, "wrap")
    assert prod.put_many([(1, 1), (2, 2), (3, 3)]) == 3
    prod.publish()
    assert ctrl[0] == 1
    assert [x for x, _ in cons.take()] == [1, 2, 3]
    cons.commit()
    assert prod.space() >= 1  # the cached consumer index is refreshed lazily ...
    assert prod.refresh() == 4  # ... and exactly on demand
    ctrl.release()


def test_consumer_detects_overrun() -> None:
    mem, prod, cons = make_pair(4)
    ctrl = mem[64 : 64 + abi.RING_CTRL_SIZE].cast("I")
    ctrl[0] = 5  # a corrupt producer claims five entries in a four-entry ring
    with pytest.raises(RemoteProtocolError, match="overrun"):
        cons.available()
    ctrl[0] = 0
    ctrl[16] = 3  # consumer index ahead of the producer
    with pytest.raises(RemoteProtocolError, match="not within 4 entries behind"):
        prod.refresh()
    ctrl.release()


def test_ring_layout_validation() -> None:
    mem = memoryview(bytearray(1024))
    with pytest.raises(LocalProtocolError, match="power of two"):
        RingProducer(mem, abi.RingLayout(0, 128, 3, DESC.size), DESC, "x")
    with pytest.raises(LocalProtocolError, match="does not fit"):
        RingConsumer(mem, abi.RingLayout(0, 128, 64, DESC.size), DESC, "x")
    with pytest.raises(LocalProtocolError, match="descriptor size"):
        RingConsumer(mem, abi.RingLayout(0, 128, 4, 8), DESC, "x")


def pool() -> SlotPool:
    classes = (abi.PoolClass(4096, 512, 4), abi.PoolClass(8192, 8192, 2), abi.PoolClass(32768, 65536, 1))
    return SlotPool(abi.PoolLayout(4096, 32768 + 65536 - 4096, classes))


def test_pool_picks_smallest_fitting_class_and_falls_back() -> None:
    p = pool()
    assert p.alloc(0) == (4096, 512)
    assert p.alloc(512) == (4608, 512)
    assert p.alloc(513) == (8192, 8192)
    got = [p.alloc(10) for _ in range(3)]
    assert got[:2] == [(5120, 512), (5632, 512)]
    assert got[2] == (16384, 8192)  # small class exhausted: next class up
    assert p.alloc(65536) == (32768, 65536)
    assert p.alloc(1) is None and p.alloc(65537) is None
    assert p.in_use == p.total == 7
    p.free(4608)
    assert p.can_alloc(100) and not p.can_alloc(600)
    assert p.alloc(100) == (4608, 512)


def test_pool_lookup_and_free_validation() -> None:
    p = pool()
    assert p.lookup(4096 + 512) == 512
    assert p.lookup(4096 + 100) is None
    assert p.lookup(0) is None
    off, _cap = p.alloc(1)  # type: ignore[misc]
    p.free(off)
    with pytest.raises(LocalProtocolError, match="twice"):
        p.free(off)
    with pytest.raises(LocalProtocolError, match="not the start"):
        p.free(4097)
    with pytest.raises(LocalProtocolError):
        p.alloc(-1)


def test_pool_from_built_layout_mixed_sizes() -> None:
    layout = abi.build_layout(4 << 20, 32 << 20, 32 << 20, 1024)
    p = SlotPool(layout.tx)
    sizes = [0, 64, 4 << 20, 1 << 20, 9000, 511, 200_000]
    got = [p.alloc(s) for s in sizes]
    assert all(g is not None and g[1] >= s for g, s in zip(got, sizes))
    for g in got:
        assert g is not None
        assert p.lookup(g[0]) == g[1]
        p.free(g[0])
    assert p.in_use == 0


# --- corrupt values from the other side: one test per field --------------------------------


@pytest.mark.parametrize("bad", [5, 9, 0x80000000, 0xFFFFFFFF])
def test_corrupt_producer_index_is_a_ring_index_error(bad: int) -> None:
    # submit and release rings: the daemon consumes what the application produced
    mem, _prod, cons = make_pair(4)
    ctrl = mem[64 : 64 + abi.RING_CTRL_SIZE].cast("I")
    ctrl[0] = bad
    with pytest.raises(RingIndexError) as e:
        cons.take()
    err = e.value
    assert isinstance(err, RegionError) and isinstance(err, RemoteProtocolError)
    assert (err.part, err.field, err.value) == ("test ring", "producer index", bad)
    assert f"test ring producer index {bad}: overrun" in err.reason
    assert cons.tail == 0  # nothing was taken
    ctrl.release()


@pytest.mark.parametrize("bad", [1, 3, 0x7FFFFFFF, 0xFFFFFFFB])
def test_corrupt_consumer_index_breaks_the_producer_for_good(bad: int) -> None:
    # complete and deliver rings: the daemon produces, the application moves the consumer index
    mem, prod, cons = make_pair(4)
    ctrl = mem[64 : 64 + abi.RING_CTRL_SIZE].cast("I")
    for i in range(4):
        assert prod.put(i, i)
    prod.publish()
    ctrl[16] = (prod.head + bad) & 0xFFFFFFFF  # ahead of the producer, or more than a ring behind
    with pytest.raises(RingIndexError) as e:
        prod.put(9, 9)  # the ring looks full: the producer must re-read the index
    assert (e.value.part, e.value.field) == ("test ring", "consumer index")
    assert "not within 4 entries behind the producer index 4" in e.value.reason
    # Sticky: even after the index is "repaired", nothing more is written into this region.
    ctrl[16] = 4
    for call in (lambda: prod.put(9, 9), prod.space, prod.refresh, prod.unconsumed, lambda: prod.put_many([(1, 1)])):
        with pytest.raises(RingIndexError):
            call()
    assert [x for x, _ in cons.take()] == [0, 1, 2, 3]  # what was published stays intact
    ctrl.release()


def test_consumer_index_garbage_is_found_on_the_next_reload_not_used_before() -> None:
    # Until the producer needs the index, it only uses its last checked copy: garbage never
    # makes it overwrite descriptors the consumer may still be reading.
    mem, prod, cons = make_pair(4)
    ctrl = mem[64 : 64 + abi.RING_CTRL_SIZE].cast("I")
    assert prod.put(1, 1) and prod.publish()
    ctrl[16] = 0x12345678
    assert prod.put(2, 2) and prod.put(3, 3) and prod.put(4, 4)  # 4 entries, cached consumer 0: fits
    with pytest.raises(RingIndexError):
        prod.put(5, 5)
    ctrl.release()


def test_check_span_names_the_bad_field() -> None:
    p = pool()
    assert p.check_span(4096, 512, 4 << 20) == 512
    assert p.check_span(32768, 0, 100) == 65536
    cases = [
        (4097, 1, 1 << 20, "offset", "not a TX slot (inside one)"),
        (0, 1, 1 << 20, "offset", "not a TX slot"),
        (1 << 40, 1, 1 << 20, "offset", "not a TX slot"),
        (4096, 513, 1 << 20, "length", "exceeds slot 512/max 1048576"),
        (32768, 65536, 1000, "length", "exceeds slot 65536/max 1000"),
        (4096, 0xFFFFFFFF, 1 << 20, "length", "exceeds slot 512"),
    ]
    for offset, length, max_len, field, what in cases:
        with pytest.raises(DescriptorError) as e:
            p.check_span(offset, length, max_len)
        assert e.value.field == field and what in e.value.reason, e.value.reason
        assert len(abi.encode_reason(e.value.reason, abi.COMP_REASON_LEN).rstrip(b"\0")) <= abi.COMP_REASON_LEN - 1
    with pytest.raises(DescriptorError, match="not a RX slot"):
        p.check_span(3, 1, 1, "RX")


def test_send_flags_must_be_known() -> None:
    abi.check_send_flags(0)
    abi.check_send_flags(abi.SEND_FLAG_MSG_ID)
    for bad in (2, 0x80000000, 0xFFFFFFFF):
        with pytest.raises(DescriptorError, match="TX flags") as e:
            abi.check_send_flags(bad)
        assert e.value.field == "flags" and e.value.value == bad


def test_a_message_id_must_be_in_its_range() -> None:
    abi.check_send_flags(abi.SEND_FLAG_MSG_ID, 1)
    abi.check_send_flags(abi.SEND_FLAG_MSG_ID, abi.MAX_MSG_ID)
    abi.check_send_flags(0, 1 << 63)  # a library cookie, not an id
    for bad in (0, 1 << 63, (1 << 64) - 1):
        with pytest.raises(DescriptorError, match="message id") as e:
            abi.check_send_flags(abi.SEND_FLAG_MSG_ID, bad)
        assert e.value.field == "cookie" and e.value.value == bad
