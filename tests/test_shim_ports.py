"""lu2k.kernel_shim.ports: the pure half of a shim port, driven over a bytearray region
(no event loop, no eventfds): the test plays the endpoint through its own ring views."""

from __future__ import annotations

import errno

import pytest

from lu2k.errors import LocalProtocolError, ShimError, Status
from lu2k.kernel_shim import abi
from lu2k.kernel_shim.ports import PortLogic, SendRequest
from lu2k.kernel_shim.ring import RingConsumer, RingProducer, SlotPool
from lu2k.nid import parse_nid

LO = parse_nid("0@lo").to_bytes()


class Port(PortLogic):
    """Records what the I/O side would be asked to do."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.handed: list[SendRequest] = []
        self.disconnects: list[str] = []
        self.services = 0

    def _hand_over(self, reqs: list[SendRequest]) -> None:
        self.handed.extend(reqs)

    def _disconnect(self, reason: str) -> None:
        super()._disconnect(reason)
        self.disconnects.append(reason)

    def _schedule_service(self) -> None:
        self.services += 1


class Endpoint:
    """The endpoint's side of the same region."""

    def __init__(self, mem: memoryview, layout: abi.Layout) -> None:
        r = layout.rings
        self.submit = RingProducer(mem, r[abi.RING_SUBMIT], abi.SEND_DESC, "submit")
        self.complete = RingConsumer(mem, r[abi.RING_COMPLETE], abi.COMPLETION, "complete")
        self.deliver = RingConsumer(mem, r[abi.RING_DELIVER], abi.RX_DESC, "deliver")
        self.release = RingProducer(mem, r[abi.RING_RELEASE], abi.RELEASE_DESC, "release")
        self.tx = SlotPool(layout.tx)
        self.mem = mem

    def post(self, payload: bytes, cookie: int, offset: int | None = None, length: int | None = None) -> int:
        if offset is None:
            got = self.tx.alloc(len(payload))
            assert got is not None
            offset = got[0]
        self.mem[offset : offset + len(payload)] = payload
        assert self.submit.put(cookie, offset, len(payload) if length is None else length, 7, LO, 0)
        self.submit.publish()
        return offset

    def completions(self) -> list[tuple[int, int, str]]:
        out = [(c, s, abi.decode_reason(r)) for c, s, _f, r in self.complete.take()]
        self.complete.commit()
        return out


def make(max_in_flight: int = 2) -> tuple[Port, Endpoint]:
    layout = abi.build_layout(1 << 16, abi.MIN_POOL_BYTES, abi.MIN_POOL_BYTES, max_in_flight)
    mem = memoryview(bytearray(layout.region_size))
    header = abi.pack_region_header(layout)
    mem[: len(header)] = header
    port = Port(3, layout, mem, max_in_flight, 256)
    return port, Endpoint(mem, layout)


def test_submissions_are_checked_bounded_and_completed_once() -> None:
    port, ep = make(max_in_flight=2)
    good = ep.post(b"one", 1)
    ep.post(b"bad", 2, offset=12345)  # not a TX slot
    ep.post(b"one", 3, offset=good, length=1 << 20)  # longer than the slot
    ep.post(b"two", 4)
    ep.post(b"three", 5)
    passes = []
    while True:  # each pass takes at most max_in_flight - in_flight descriptors
        taken, more = port._drain_submit()
        passes.append(taken)
        if not more:
            break
    assert passes == [2, 1, 1] and port._stalled  # two handed over, the fifth waits
    assert [r.cookie for r in port.handed] == [1, 4] and bytes(port.handed[0].payload) == b"one"
    assert port.counters["invalid"] == 2 and port.in_flight == 2
    assert port.publish()
    assert [(c, s) for c, s, _ in ep.completions()] == [(2, Status.INVALID), (3, Status.INVALID)]
    port.complete(port.handed[0], Status.DELIVERED)
    assert port.services == 1 and not port._stalled  # room again: a service pass is asked for
    with pytest.raises(LocalProtocolError, match="completed twice"):
        port.complete(port.handed[0], Status.DELIVERED)
    port.publish()
    assert ep.completions() == [(1, 0, "")]
    assert port._drain_submit() == (1, False) and [r.cookie for r in port.handed] == [1, 4, 5]


def test_a_corrupted_completion_ring_disconnects_the_port_and_not_the_caller() -> None:
    port, ep = make()
    ep.post(b"m", 1)
    port._drain_submit()
    req = port.handed[0]
    ctrl = port._mem[port.layout.rings[abi.RING_COMPLETE].ctrl :][: abi.RING_CTRL_SIZE].cast("I")
    ctrl[abi.RING_CONSUMER_OFF // 4] = 999_999  # the endpoint scribbles over its consumer index
    ctrl.release()
    ring = port._complete
    ring._cached_consumer = ring.head - ring.entries  # the next put must re-read it
    port.complete(req, Status.TIMED_OUT, "late")  # no exception reaches the engine's timer
    assert req.done and port.in_flight == 0 and port.counters["completed"] == 1
    assert len(port.disconnects) == 1 and "consumer index" in port.disconnects[0]
    port.complete(SendRequest(9, LO, 0, memoryview(b""), 0, port), Status.DELIVERED)  # while failing: accepted, not written
    assert len(port.disconnects) == 1


def test_rx_slots_deliver_release_and_double_release_event() -> None:
    port, ep = make()
    buf = port.rx_alloc(5)
    assert buf is not None
    buf.view[:] = b"hello"
    port.deliver(buf, LO, 11, 5)
    port.publish()
    (offset, length, sport, dport, src, _f, _r), = ep.deliver.take()
    ep.deliver.commit()
    assert (length, sport, dport, src) == (5, 11, 3, LO) and bytes(port._mem[offset : offset + 5]) == b"hello"
    with pytest.raises(LocalProtocolError):
        port.deliver(buf, LO, 11, 5)  # delivered once only
    ep.release.put(offset)
    ep.release.put(offset)  # again: a buggy endpoint
    ep.release.publish()
    assert port._drain_release() == 1 and port.counters["bad_releases"] == 1 and port.counters["events"] == 1
    other = port.rx_alloc(5)
    assert other is not None
    port.rx_abort(other)
    assert port.stats()["rx_buffers_in_use"] == 0


def test_releasing_rx_buffers_without_consuming_them_detaches_the_endpoint() -> None:
    port, ep = make()
    entries = port._deliver.entries
    for _ in range(entries):  # each message read and released, the deliver ring's consumer index never moved
        buf = port.rx_alloc(4)
        assert buf is not None
        port.deliver(buf, LO, 11, 4)
        port.publish()
        ((offset, *_rest),) = ep.deliver.take()
        ep.release.put(offset)
        ep.release.publish()
        assert port._drain_release() == 1
    buf = port.rx_alloc(4)
    assert buf is not None  # RX slots are free, the ring is not
    with pytest.raises(ShimError) as e:
        port.deliver(buf, LO, 11, 4)
    assert e.value.code == errno.ENOTCONN
    assert port.disconnects == [f"deliver ring consumer index 0: {entries} unconsumed, their RX buffers released"]
