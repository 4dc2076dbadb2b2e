"""The pure half of a shim port: one attached endpoint's rings, slot pools and counters.

No asyncio, no file descriptors, no clock: :class:`PortLogic` works on the shared region
(a memoryview) and reports what the I/O side must do through a few hooks
(``_schedule_flush``, ``_schedule_service``, ``_disconnect``, ``_wake_rx_waiters``,
``_expect_releases``, ``_hand_over``).  :class:`lu2k.kernel_shim.server.ShimPort` fills
those hooks in with the event loop and the eventfds; tests drive it with a bytearray.

Theory of operation (see also :mod:`.abi` and :mod:`.ring`): the endpoint posts SEND_DESCs
in the submit ring; :meth:`PortLogic._drain_submit` takes up to ``batch`` of them while
fewer than ``max_in_flight`` are open, checks each (a TX slot, within its size, not already
in flight -- a bad one completes at once with INVALID) and hands the good ones over as
:class:`SendRequest` (payload = a view of the TX slot).  :meth:`PortLogic.complete` is the
one completion of a request.  Incoming messages take an RX slot (:meth:`PortLogic.rx_alloc`)
and are handed over with :meth:`PortLogic.deliver`; the endpoint's releases
(:meth:`PortLogic._drain_release`) free the slots.  Indices the endpoint corrupted raise
:class:`~lu2k.errors.RemoteProtocolError` out of the ring code: that port is disconnected,
nothing else is touched.
"""

from __future__ import annotations

import collections
import errno
import logging
from typing import Any

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # only the mypyc build needs it (lu2k.hotpath)
    from ..hotpath import mypyc_attr

from ..errors import LocalProtocolError, RemoteProtocolError, ShimError, Status
from ..nid import NID_SIZE
from . import abi
from .ring import RingConsumer, RingProducer, SlotPool

log = logging.getLogger("lu2k.shim")

_STATE_ALLOCATED, _STATE_DELIVERED, _STATE_ABORTED = 0, 1, 2
_EMPTY_REASON = b""


class SendRequest:
    """One message an endpoint handed over; complete it exactly once with ShimPort.complete."""

    # A plain class, not a dataclass: mypyc (lu2k.hotpath) cannot yet name ``memoryview`` in a
    # dataclass's annotations.
    __slots__ = ("cookie", "dst_nid", "dst_portal", "payload", "offset", "port", "done", "msg_id")

    def __init__(self, cookie: int, dst_nid: bytes, dst_portal: int, payload: memoryview, offset: int,
                 port: PortLogic | None = None, done: bool = False, msg_id: int | None = None) -> None:
        self.cookie = cookie
        self.dst_nid = dst_nid  # 20 bytes, packed; NOT validated -- the engine parses it
        self.dst_portal = dst_portal
        self.payload = payload  # the TX slot in shared memory (zero copy)
        self.offset = offset  # region offset of the TX slot
        self.port = port
        self.done = done
        self.msg_id = msg_id  # the application's id for the message (abi.SEND_FLAG_MSG_ID)

    def __repr__(self) -> str:
        return f"SendRequest(cookie={self.cookie}, dst_portal={self.dst_portal}, offset={self.offset}, length={len(self.payload)}, done={self.done})"


class RxBuffer:
    """An RX slot taken for one incoming message; ``view`` is exactly the requested size."""

    __slots__ = ("offset", "capacity", "view", "port", "state")

    def __init__(self, offset: int, capacity: int, view: memoryview, port: PortLogic | None = None, state: int = 0) -> None:
        self.offset = offset
        self.capacity = capacity
        self.view = view
        self.port = port
        self.state = state  # 0 allocated, 1 delivered, 2 aborted

    def __repr__(self) -> str:
        return f"RxBuffer(offset={self.offset}, capacity={self.capacity}, state={self.state})"


@mypyc_attr(allow_interpreted_subclasses=True)  # the I/O side (ShimPort) fills in the hooks by subclassing
class PortLogic:
    """One attached endpoint's rings, pools and counters (pure; see the module docstring)."""

    def __init__(self, portal: int, layout: abi.Layout, mem: memoryview, max_in_flight: int, batch: int) -> None:
        self.portal = portal
        self.pid = self.uid = self.gid = -1
        self.layout = layout
        self.max_message_size = layout.max_message_size
        self.max_in_flight = max_in_flight
        self.batch = batch
        self.attached = True
        self._mem = mem
        rings = layout.rings
        self._submit = RingConsumer(mem, rings[abi.RING_SUBMIT], abi.SEND_DESC, "submit")
        self._complete = RingProducer(mem, rings[abi.RING_COMPLETE], abi.COMPLETION, "complete", reset=True)
        self._deliver = RingProducer(mem, rings[abi.RING_DELIVER], abi.RX_DESC, "deliver", reset=True)
        self._release = RingConsumer(mem, rings[abi.RING_RELEASE], abi.RELEASE_DESC, "release")
        self._flags = mem[abi.HDR_DAEMON_FLAGS : abi.HDR_DAEMON_FLAGS + 4].cast("I")
        self._ep_flags = mem[abi.HDR_ENDPOINT_FLAGS : abi.HDR_ENDPOINT_FLAGS + 4].cast("I")
        self._tx = SlotPool(layout.tx)  # only for lookup(): the endpoint allocates TX slots
        self._tx_in_flight: set[int] = set()
        self._rx = SlotPool(layout.rx)
        self._rx_delivered: set[int] = set()
        self._backlog: collections.deque[tuple[int, int, int, bytes]] = collections.deque()
        self._flush_scheduled = False
        self._stalled = False
        self.in_flight = 0
        self.counters = dict.fromkeys(abi.STATS_FIELDS, 0)
        self.detach_reason = ""
        self._failing = ""  # set when a disconnect is scheduled; the views stay valid until then

    # -- hooks: the I/O side fills these in ------------------------------------------------------

    def _schedule_flush(self) -> None:
        """Publish the rings (:meth:`publish`) and notify the endpoint soon."""
        self._flush_scheduled = True

    def _schedule_service(self) -> None:
        """Run a service pass (releases and submissions) soon."""

    def _disconnect(self, reason: str) -> None:
        """The endpoint broke the ABI: drop it (and only it)."""
        self._failing = self._failing or reason

    def _wake_rx_waiters(self) -> None:
        """RX slots were freed."""

    def _expect_releases(self) -> None:
        """A message was delivered: releases will follow."""

    def _hand_over(self, reqs: list[SendRequest]) -> None:
        """Give new requests to the engine (which completes each exactly once)."""
        raise NotImplementedError

    # -- engine-facing -------------------------------------------------------------------------

    def complete(self, req: SendRequest, status: Status, reason: str = "") -> None:
        """Finish ``req`` (exactly once); its TX slot becomes free for the endpoint."""
        if req.done:
            raise LocalProtocolError(f"request cookie {req.cookie} on portal {self.portal} completed twice")
        if req.port is not self:
            raise LocalProtocolError(f"request cookie {req.cookie} does not belong to portal {self.portal}")
        req.done = True
        self._tx_in_flight.discard(req.offset)
        self.in_flight -= 1
        c = self.counters
        c["completed"] += 1
        if status:
            c["failed"] += 1
        else:
            c["tx_bytes"] += len(req.payload)
        if not self.attached or self._failing:
            return
        try:
            if not status and not self._backlog and self._complete.put(req.cookie, 0, 0, _EMPTY_REASON):
                if not self._flush_scheduled:  # the common case, inlined
                    self._schedule_flush()
            else:
                self._post_completion(req.cookie, int(status), 0, abi.encode_reason(reason, abi.COMP_REASON_LEN) if reason else _EMPTY_REASON)
        except RemoteProtocolError as e:
            # The endpoint corrupted its completion ring: that endpoint alone is detached; the
            # caller (the engine finishing a message, maybe from its timer) carries on.
            self._disconnect(str(e))
            return
        if self._stalled and self.in_flight < self.max_in_flight:
            self._stalled = False
            self._schedule_service()

    def rx_alloc(self, size: int) -> RxBuffer | None:
        """An RX slot for ``size`` bytes, or None if none is free now (or size > max)."""
        if not self.attached or size > self.max_message_size or size < 0:
            return None
        got = self._rx.alloc(size)
        if got is None:
            self.counters["rx_full"] += 1
            return None
        offset, cap = got
        return RxBuffer(offset, cap, self._mem[offset : offset + size], self)

    def deliver(self, buf: RxBuffer, src_nid: bytes, src_portal: int, length: int) -> None:
        """Hand ``buf``'s first ``length`` bytes to the endpoint as a message from ``src_nid``."""
        if buf.port is not self or buf.state != _STATE_ALLOCATED:
            raise LocalProtocolError(f"RX buffer at offset {buf.offset} is not an allocated buffer of portal {self.portal}")
        if not 0 <= length <= len(buf.view):
            raise LocalProtocolError(f"deliver length {length} exceeds the {len(buf.view)}-byte RX buffer")
        if type(src_nid) is not bytes:
            src_nid = bytes(src_nid)
        if len(src_nid) != NID_SIZE:
            raise LocalProtocolError(f"source NID must be {NID_SIZE} packed bytes, got {len(src_nid)}")
        if not self.attached:
            raise ShimError(errno.ENOTCONN, f"shim port on portal {self.portal} is detached")
        if self._failing:
            raise ShimError(errno.ENOTCONN, f"shim port on portal {self.portal} is being disconnected: {self._failing}")
        try:
            if not self._deliver.put(buf.offset, length, src_portal, self.portal, src_nid, 0, 0):
                # The ring has an entry for every RX slot and a slot comes back only once its
                # descriptor is consumed: full here means the endpoint released buffers it never consumed.
                raise abi.RingIndexError("deliver ring", "consumer index", self._deliver.shared_consumer(),
                                         f"{self._deliver.entries} unconsumed, their RX buffers released")
        except RemoteProtocolError as e:  # the endpoint broke its deliver ring: detach it alone
            self._disconnect(str(e))
            raise ShimError(errno.ENOTCONN, f"endpoint on portal {self.portal} broke its deliver ring: {e}") from None
        buf.state = _STATE_DELIVERED
        self._rx_delivered.add(buf.offset)
        c = self.counters
        c["delivered"] += 1
        c["rx_bytes"] += length
        if not self._flush_scheduled:
            self._schedule_flush()
        self._expect_releases()

    def rx_abort(self, buf: RxBuffer) -> None:
        """Give back an RX buffer that will not be delivered."""
        if buf.port is not self or buf.state != _STATE_ALLOCATED:
            raise LocalProtocolError(f"RX buffer at offset {buf.offset} cannot be aborted (state {buf.state})")
        buf.state = _STATE_ABORTED
        buf.view.release()
        if self._rx.is_allocated(buf.offset):
            self._rx.free(buf.offset)
            self._wake_rx_waiters()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"portal": self.portal, "pid": self.pid, "uid": self.uid, "attached": self.attached}
        out.update(self.counters)
        out["in_flight"] = self.in_flight
        out["rx_buffers_in_use"] = self._rx.in_use
        out["rx_buffers"] = self._rx.total
        out["tx_buffers"] = self._tx.total
        out["max_message_size"] = self.max_message_size
        if self.detach_reason:
            out["detach_reason"] = self.detach_reason
        return out

    # -- ring service ------------------------------------------------------------------------

    def _post_completion(self, cookie: int, status: int, flags: int, reason: bytes) -> None:
        if self._backlog or not self._complete.put(cookie, status, flags, reason):
            if self._failing:
                return
            self._backlog.append((cookie, status, flags, reason))
            if len(self._backlog) > self._complete.entries:
                self._disconnect("endpoint does not consume its completion ring")
                return
        self._schedule_flush()

    def _post_event(self, status: Status, reason: str) -> None:
        self.counters["events"] += 1
        self._post_completion(0, int(status), abi.COMP_EVENT, abi.encode_reason(reason, abi.COMP_REASON_LEN))

    def publish(self) -> bool:
        """Make what was produced visible to the endpoint; True if anything was (then the
        caller fences and, if :meth:`wants_notify`, kicks the endpoint's eventfd)."""
        self._flush_scheduled = False
        if self._backlog:
            self._drain_backlog()
        published = self._complete.publish()
        return self._deliver.publish() or published

    def wants_notify(self) -> bool:
        return bool(self._ep_flags[0] & abi.FLAG_NEED_WAKEUP)

    def _drain_backlog(self) -> None:
        while self._backlog:
            if not self._complete.put(*self._backlog[0]):
                break
            self._backlog.popleft()

    def _drain_release(self) -> int:
        descs = self._release.take(self._release.entries)
        if not descs:
            return 0
        self._release.commit()
        freed = 0
        delivered, rx = self._rx_delivered, self._rx
        for (offset,) in descs:
            if offset in delivered:
                delivered.discard(offset)
                rx.free(offset)
                freed += 1
            else:
                self.counters["bad_releases"] += 1
                what = "double release" if rx.lookup(offset) is not None else "release of an offset outside the RX slots"
                self._post_event(Status.INVALID, f"{what}: RX offset {offset}")
        self.counters["released"] += freed
        return freed

    def _drain_submit(self) -> tuple[int, bool]:
        """Hand up to ``batch`` submissions to the engine; ``(taken, more_waiting)``."""
        budget = min(self.batch, self.max_in_flight - self.in_flight)
        if budget <= 0:
            if self._submit.available() and not self._stalled:
                self._stalled = True
                self.counters["stalls"] += 1
            return 0, False
        descs = self._submit.take(budget)
        if not descs:
            return 0, False
        self._submit.commit()  # fields are copied out; the payload stays in its TX slot
        reqs: list[SendRequest] = []
        lookup, in_flight, mem, max_size = self._tx.lookup, self._tx_in_flight, self._mem, self.max_message_size
        for cookie, offset, length, dst_portal, dst_nid, flags in descs:
            cap = lookup(offset)
            if cap is None or length > cap or length > max_size or flags:  # the checks below say which field is wrong
                try:
                    self._tx.check_span(offset, length, max_size, "TX")
                    abi.check_send_flags(flags, cookie)
                except abi.DescriptorError as e:
                    self._invalid(cookie, e.reason)
                    continue
            if offset in in_flight:
                self._invalid(cookie, f"TX slot {offset} already in flight")
            else:
                in_flight.add(offset)
                reqs.append(SendRequest(cookie, dst_nid, dst_portal, mem[offset : offset + length], offset, self,
                                        msg_id=cookie if flags & abi.SEND_FLAG_MSG_ID else None))
        c = self.counters
        c["submitted"] += len(descs)
        if reqs:
            self.in_flight += len(reqs)
            try:
                self._hand_over(reqs)
            except Exception as e:  # the engine broke its contract; keep exactly-once anyway
                log.exception("on_submit failed on portal %d", self.portal)
                for r in reqs:
                    if not r.done:
                        self.complete(r, Status.PROTOCOL, f"daemon error: {e}")
        if self.in_flight >= self.max_in_flight and self._submit.available():
            self._stalled = True
            c["stalls"] += 1
            return len(descs), False
        return len(descs), self._submit.available() > 0

    def _invalid(self, cookie: int, reason: str) -> None:
        self.counters["invalid"] += 1
        self.counters["completed"] += 1
        self.counters["failed"] += 1
        self._post_completion(cookie, int(Status.INVALID), 0, abi.encode_reason(reason, abi.COMP_REASON_LEN))

    def counters_struct(self) -> bytes:
        c = dict(self.counters, in_flight=self.in_flight)
        return abi.STATS.pack(*(c[k] for k in abi.STATS_FIELDS))

    def release_views(self) -> None:
        """Drop every view of the region (after detach)."""
        for ring in (self._submit, self._complete, self._deliver, self._release):
            ring.release()
        self._flags.release()
        self._ep_flags.release()
        self._mem.release()
