"""The shim ABI: command numbers, fixed little-endian structs, region layout.  Pure.

This module is the one definition of the kernel-facing ABI; ``contrib/lu2k_shim.h``
mirrors every number and struct here (a test compiles the header and compares).  It is
shaped so a kernel module could implement the endpoint side (as lu2klnd's kernel half
did) or the daemon side.

Control channel
---------------
A ``SOCK_SEQPACKET`` Unix socket (:func:`default_shim_path`).  Each request is one
packet: :data:`CTL_HDR` (``u32 cmd, u32 seq``) followed by exactly ``ioc_size(cmd)``
argument bytes.  Command numbers are encoded like Linux ioctls (asm-generic/ioctl.h:
``dir << 30 | size << 16 | type << 8 | nr``, type ``'L'``), so the argument size and
direction travel in the number and a wrong-size request is detectable.  Each reply is
one packet: :data:`CTL_REPLY` (``u32 cmd, u32 seq, i32 error, u32 arg_len, char
reason[112]``) followed by ``arg_len`` bytes: the updated argument struct for commands
with a read direction when ``error == 0``.  ``error`` is a positive errno (``ENOTTY``
unknown command, ``EINVAL`` wrong size or bad argument, ``EADDRINUSE`` portal taken,
...), ``reason`` a NUL-padded UTF-8 explanation.  The ATTACH reply carries three file
descriptors in ``SCM_RIGHTS``: the region memfd, the *kick* eventfd (endpoint ->
daemon doorbell) and the *notify* eventfd (daemon -> endpoint doorbell).  EOF on the
control socket means the other side is gone: the daemon detaches the port, the endpoint
fails what it has in flight.

Region
------
One memfd per endpoint, mapped shared by both sides.  Offset 0 holds the header
(:data:`REGION_HDR`: magic, ABI version, then the :data:`LAYOUT` struct, also returned
by ATTACH), the two wake-up flag words at :data:`HDR_DAEMON_FLAGS` and
:data:`HDR_ENDPOINT_FLAGS` (each on its own cache line), then four rings and two buffer
pools.  All offsets are from the start of the region.

============  ==================  ==========================================
ring          producer -> consumer  descriptor
============  ==================  ==========================================
submit        endpoint -> daemon   :data:`SEND_DESC` (a message to send)
complete      daemon -> endpoint   :data:`COMPLETION` (one per send, + events)
deliver       daemon -> endpoint   :data:`RX_DESC` (a received message)
release       endpoint -> daemon   :data:`RELEASE_DESC` (an RX buffer is free)
============  ==================  ==========================================

The TX pool is allocated by the endpoint (the daemon only reads it); the RX pool is
allocated by the daemon (the endpoint only reads it, and gives buffers back through the
release ring, each only once its deliver descriptor is consumed: the deliver ring has an entry
for every RX slot, so a daemon that finds it full while an RX slot is free detaches the
endpoint).  Pools are cut into size classes of fixed slots (:data:`POOL_CLASS`) so
both sides can check an offset: a descriptor must name the *start* of a slot of the right
pool and a length that fits the slot.

Memory ordering (the contract for a C or kernel implementer)
------------------------------------------------------------
Each ring has a control block of two ``u32`` free-running indices on separate cache
lines: ``producer`` at +0 (written only by the producer) and ``consumer`` at +64
(written only by the consumer); descriptor ``i`` lives at ``descs + (i & (entries-1)) *
desc_size``; ``entries`` is a power of two.  ``producer - consumer`` (mod 2**32) is the
fill level and must never exceed ``entries``; a daemon that sees otherwise disconnects
the endpoint.

* Producer: write the descriptors, then store ``producer`` with *release* semantics.
* Consumer: load ``producer`` with *acquire* semantics, read the descriptors, then store
  ``consumer`` with *release* semantics (the slots may be overwritten after that).
* Wake-ups (AF_XDP's need_wakeup): a side about to sleep sets ``NEED_WAKEUP`` in its
  flag word (the daemon has one bit per ring it consumes, :data:`FLAG_NEED_WAKEUP` for
  submit and :data:`FLAG_NEED_WAKEUP_RELEASE` for release, so a daemon that stopped
  taking submissions under back-pressure is still woken by releases), issues a *full* fence (``__atomic_thread_fence(__ATOMIC_SEQ_CST)``,
  ``smp_mb()``), re-checks its rings and sleeps on its eventfd only if they are still
  empty.  A producer, after publishing, issues a full fence, loads the other side's flag
  word and writes the eventfd only if ``NEED_WAKEUP`` is set.  The two fences make the
  lost-wake-up interleaving impossible; everything else needs only acquire/release.

The Python implementation relies on x86-64's TSO ordering for acquire/release (indices
are stored with single native ``u32`` stores through ``memoryview.cast('I')``,
descriptors are written first) and on a locked instruction for the full fence (see
:func:`lu2k.kernel_shim.ring.full_fence`).  The ABI is little-endian; importing this
module on a big-endian host raises.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from dataclasses import dataclass

from ..errors import LocalProtocolError, RemoteProtocolError, ShimError
from ..nid import NID_SIZE

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("the lu2k shim ABI is little-endian; this host is big-endian")

ABI_VERSION = 1
# Revisions add meaning to reserved bits only, so a client of an older revision works
# unchanged; a daemon of an older revision refuses the new bits (INVALID, "unknown bits").
#   1: SEND_FLAG_MSG_ID.
ABI_REVISION = 1
REGION_MAGIC = 0x5332554C  # b"LU2S" read as little-endian u32

# --- ioctl-style numbers (asm-generic/ioctl.h) ---------------------------------------------

IOC_NRBITS = 8
IOC_TYPEBITS = 8
IOC_SIZEBITS = 14
IOC_DIRBITS = 2
IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS
IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2
IOC_TYPE = ord("L")


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """Linux's ``_IOC(dir, type, nr, size)``."""
    if not 0 <= direction < 1 << IOC_DIRBITS:
        raise LocalProtocolError(f"ioctl direction {direction} out of range")
    if not 0 <= type_ < 1 << IOC_TYPEBITS or not 0 <= nr < 1 << IOC_NRBITS:
        raise LocalProtocolError(f"ioctl type/nr {type_}/{nr} out of range")
    if not 0 <= size < 1 << IOC_SIZEBITS:
        raise LocalProtocolError(f"ioctl argument size {size} does not fit in {IOC_SIZEBITS} bits")
    return (direction << IOC_DIRSHIFT) | (type_ << IOC_TYPESHIFT) | (nr << IOC_NRSHIFT) | (size << IOC_SIZESHIFT)


def io(nr: int) -> int:
    return ioc(IOC_NONE, IOC_TYPE, nr, 0)


def ior(nr: int, size: int) -> int:
    return ioc(IOC_READ, IOC_TYPE, nr, size)


def iow(nr: int, size: int) -> int:
    return ioc(IOC_WRITE, IOC_TYPE, nr, size)


def iowr(nr: int, size: int) -> int:
    return ioc(IOC_READ | IOC_WRITE, IOC_TYPE, nr, size)


def ioc_dir(cmd: int) -> int:
    return (cmd >> IOC_DIRSHIFT) & ((1 << IOC_DIRBITS) - 1)


def ioc_type(cmd: int) -> int:
    return (cmd >> IOC_TYPESHIFT) & ((1 << IOC_TYPEBITS) - 1)


def ioc_nr(cmd: int) -> int:
    return (cmd >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)


def ioc_size(cmd: int) -> int:
    return (cmd >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)


# --- control packets --------------------------------------------------------------------------

CTL_HDR = struct.Struct("<II")  # cmd, seq
REASON_LEN = 112
CTL_REPLY = struct.Struct(f"<IIiI{REASON_LEN}s")  # cmd, seq, error (positive errno), arg_len, reason
MAX_CTL_PACKET = CTL_REPLY.size + (1 << IOC_SIZEBITS)

# --- region layout structs --------------------------------------------------------------------

MAX_CLASSES = 8
POOL_CLASS = struct.Struct("<QII")  # offset, slot_size, count
POOL = struct.Struct(f"<IIQQ{POOL_CLASS.size * MAX_CLASSES}s")  # nclasses, reserved, offset, size, classes[8]
RING_OFF = struct.Struct("<QQII")  # ctrl offset, descs offset, entries, desc_size
LAYOUT = struct.Struct(f"<QII{POOL.size}s{POOL.size}s{RING_OFF.size * 4}s")
# region_size, max_message_size, reserved, tx pool, rx pool, rings[submit, complete, deliver, release]
REGION_HDR = struct.Struct(f"<II{LAYOUT.size}s")  # magic, abi_version, layout

HDR_DAEMON_FLAGS = 512  # u32 written by the daemon, read by the endpoint
HDR_ENDPOINT_FLAGS = 576  # u32 written by the endpoint, read by the daemon
HEADER_SIZE = 4096
FLAG_NEED_WAKEUP = 0x1  # endpoint word: "notify me after you publish"; daemon word: "kick me after a submit"
FLAG_NEED_WAKEUP_RELEASE = 0x2  # daemon word: "kick me after you publish a release"

RING_CTRL_SIZE = 128
RING_PRODUCER_OFF = 0
RING_CONSUMER_OFF = 64

RING_SUBMIT, RING_COMPLETE, RING_DELIVER, RING_RELEASE = range(4)
RING_NAMES = ("submit", "complete", "deliver", "release")

# --- ring descriptors --------------------------------------------------------------------------

SEND_DESC = struct.Struct(f"<QQII{NID_SIZE}sI")  # cookie, offset, length, dst_portal, dst_nid, flags
COMP_REASON_LEN = 48
COMPLETION = struct.Struct(f"<QiI{COMP_REASON_LEN}s")  # cookie, status, flags, reason
RX_DESC = struct.Struct(f"<QIII{NID_SIZE}sII")  # offset, length, src_portal, dst_portal, src_nid, flags, reserved
RELEASE_DESC = struct.Struct("<Q")  # offset

COMP_EVENT = 0x1  # completion flag: not a send completion but an error event (cookie 0)
# SEND_DESC.flags.  SEND_FLAG_MSG_ID: the cookie is also the application's id for the
# message (1 .. 2**63 - 1, unique among its messages): the receiving daemon remembers the
# ids it delivered (lu2k.dedupe.AppIds) and answers a copy sent again -- say after this
# daemon crashed and the application resent what completed CANCELLED -- without delivering
# it twice.  Any other bit is refused.
SEND_FLAG_MSG_ID = 0x1
SEND_FLAGS_KNOWN = SEND_FLAG_MSG_ID
MAX_MSG_ID = (1 << 63) - 1
RX_FLAGS_KNOWN = 0  # RX_DESC.flags likewise
DESC_STRUCTS = (SEND_DESC, COMPLETION, RX_DESC, RELEASE_DESC)

# --- commands ----------------------------------------------------------------------------------

ATTACH_IN = struct.Struct("<IIIIQQ")  # abi_version, portal, flags, reserved, tx_pool_bytes, rx_pool_bytes
ATTACH = struct.Struct(f"<{ATTACH_IN.size}s{NID_SIZE}sI{LAYOUT.size}s")  # in, local_nid, max_in_flight, layout
INFO = struct.Struct(f"<IIII{NID_SIZE}sII")  # abi_version, portal, daemon_pid, nports, local_nid, max_message_size, max_in_flight
STATS_FIELDS = (
    "submitted", "completed", "failed", "invalid", "delivered", "released",
    "tx_bytes", "rx_bytes", "in_flight", "kicks_in", "notifies_out", "events",
    "stalls", "rx_full", "bad_releases", "reserved",
)
STATS = struct.Struct(f"<{len(STATS_FIELDS)}Q")

CMD_ATTACH = iowr(1, ATTACH.size)
CMD_DETACH = io(2)
CMD_INFO = ior(3, INFO.size)
CMD_STATS = ior(4, STATS.size)
COMMANDS: dict[int, str] = {CMD_ATTACH: "ATTACH", CMD_DETACH: "DETACH", CMD_INFO: "INFO", CMD_STATS: "STATS"}
COMMAND_NRS: dict[int, int] = {ioc_nr(c): c for c in COMMANDS}

DEFAULT_MAX_MESSAGE = 4 << 20
MIN_POOL_BYTES = 64 << 10


# --- what an application wrote into its region -----------------------------------------------
#
# The daemon reads four kinds of values an application controls: the producer index of
# the submit and release rings, the consumer index of the complete and deliver rings, the
# fields of SEND_DESC and RELEASE_DESC, and its flag word.  Every one is checked before use
# (ring.py for indices and slot offsets, here for flags); a failed check raises one of these,
# which say exactly what was wrong.  A RingIndexError means the region can no longer be
# trusted: the daemon detaches that endpoint with ``reason`` and nothing else.  A
# DescriptorError concerns one descriptor: that request completes with Status.INVALID (a
# bad release becomes an error event) and the endpoint carries on.


class RegionError(RemoteProtocolError):
    """An application wrote an impossible value into its shared region."""

    def __init__(self, part: str, field: str, value: int, problem: str) -> None:
        self.part = part  # "complete ring", "TX" (a submit descriptor), ...
        self.field = field  # "consumer index", "offset", "flags", ...
        self.value = value
        self.problem = problem
        super().__init__(f"{part} {field} {value}: {problem}")

    @property
    def reason(self) -> str:
        """What to tell the application (and log) when it is detached or its request refused."""
        return str(self)


class RingIndexError(RegionError):
    """A producer or consumer index the application controls is impossible: detach the endpoint."""


class DescriptorError(RegionError):
    """One descriptor is malformed: refuse that request, keep the endpoint."""


def check_send_flags(flags: int, cookie: int = 1) -> None:
    if flags & ~SEND_FLAGS_KNOWN:
        raise DescriptorError("TX", "flags", flags, f"unknown bits 0x{flags & ~SEND_FLAGS_KNOWN:x}")
    if flags & SEND_FLAG_MSG_ID and not 1 <= cookie <= MAX_MSG_ID:
        # 0 and bit 63 are not ids: the library's own cookies have bit 63 set.
        raise DescriptorError("TX", "cookie", cookie, f"a message id is 1 .. {MAX_MSG_ID}")


# --- paths -------------------------------------------------------------------------------------


def default_shim_path() -> str:
    """``<runtime dir>/lu2kd.sock`` (see :func:`lu2k.kernel_shim.access.secure_runtime_dir`):
    ``$XDG_RUNTIME_DIR/lu2k``, ``/run/lu2k`` for root, ``/run/user/$UID/lu2k``, else ``~/.lu2k/run``."""
    from .access import secure_runtime_dir

    return os.path.join(secure_runtime_dir(), "lu2kd.sock")


# --- control packet helpers --------------------------------------------------------------------


def encode_request(cmd: int, seq: int, arg: bytes = b"") -> bytes:
    if len(arg) != ioc_size(cmd):
        raise LocalProtocolError(f"command 0x{cmd:08x} takes {ioc_size(cmd)} argument bytes, got {len(arg)}")
    return CTL_HDR.pack(cmd, seq) + arg


def decode_request(packet: bytes) -> tuple[int, int, bytes]:
    """``(cmd, seq, arg)``; raises ShimError(ENOTTY/EINVAL) naming what was wrong."""
    if len(packet) < CTL_HDR.size:
        raise ShimError(errno.EINVAL, f"control packet of {len(packet)} bytes is shorter than its {CTL_HDR.size}-byte header")
    cmd, seq = CTL_HDR.unpack_from(packet)
    if cmd not in COMMANDS:
        if ioc_type(cmd) == IOC_TYPE and ioc_nr(cmd) in COMMAND_NRS:
            want = COMMAND_NRS[ioc_nr(cmd)]
            raise ShimError(errno.EINVAL, f"command 0x{cmd:08x} ({COMMANDS[want]}) has the wrong size/direction; expected 0x{want:08x}")
        raise ShimError(errno.ENOTTY, f"unknown command 0x{cmd:08x}")
    arg = packet[CTL_HDR.size :]
    if len(arg) != ioc_size(cmd):
        raise ShimError(errno.EINVAL, f"{COMMANDS[cmd]} argument is {len(arg)} bytes, expected {ioc_size(cmd)}")
    return cmd, seq, arg


def encode_reply(cmd: int, seq: int, error: int = 0, reason: str = "", arg: bytes = b"") -> bytes:
    return CTL_REPLY.pack(cmd, seq, error, len(arg), encode_reason(reason, REASON_LEN)) + arg


def decode_reply(packet: bytes) -> tuple[int, int, int, str, bytes]:
    """``(cmd, seq, error, reason, arg)``; raises ShimError(EPROTO) on a malformed reply."""
    if len(packet) < CTL_REPLY.size:
        raise ShimError(errno.EPROTO, f"control reply of {len(packet)} bytes is shorter than {CTL_REPLY.size}")
    cmd, seq, error, arg_len, reason = CTL_REPLY.unpack_from(packet)
    arg = packet[CTL_REPLY.size :]
    if len(arg) != arg_len:
        raise ShimError(errno.EPROTO, f"control reply announces {arg_len} argument bytes but carries {len(arg)}")
    return cmd, seq, error, decode_reason(reason), arg


def encode_reason(text: str, size: int) -> bytes:
    """UTF-8, cut on a character boundary to leave room for a terminating NUL."""
    raw = text.encode()
    if len(raw) >= size:
        raw = raw[: size - 1]
        while raw and (raw[-1] & 0xC0) == 0x80:  # do not split a multi-byte character
            raw = raw[:-1]
        if raw and raw[-1] >= 0xC0:
            raw = raw[:-1]
    return raw.ljust(size, b"\0")


def decode_reason(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


# --- layout ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolClass:
    offset: int
    slot_size: int
    count: int

    @property
    def end(self) -> int:
        return self.offset + self.slot_size * self.count


@dataclass(frozen=True)
class PoolLayout:
    offset: int
    size: int
    classes: tuple[PoolClass, ...]

    def pack(self) -> bytes:
        raw = b"".join(POOL_CLASS.pack(c.offset, c.slot_size, c.count) for c in self.classes)
        return POOL.pack(len(self.classes), 0, self.offset, self.size, raw.ljust(POOL_CLASS.size * MAX_CLASSES, b"\0"))

    @classmethod
    def unpack(cls, raw: bytes) -> "PoolLayout":
        n, _res, offset, size, classes = POOL.unpack(raw)
        if not 1 <= n <= MAX_CLASSES:
            raise ShimError(errno.EPROTO, f"pool with {n} size classes (1..{MAX_CLASSES} allowed)")
        out = tuple(PoolClass(*POOL_CLASS.unpack_from(classes, i * POOL_CLASS.size)) for i in range(n))
        return cls(offset, size, out)

    @property
    def slots(self) -> int:
        return sum(c.count for c in self.classes)


@dataclass(frozen=True)
class RingLayout:
    ctrl: int
    descs: int
    entries: int
    desc_size: int

    def pack(self) -> bytes:
        return RING_OFF.pack(self.ctrl, self.descs, self.entries, self.desc_size)


@dataclass(frozen=True)
class Layout:
    """Where everything lives in a region (what ATTACH returns and the header repeats)."""

    region_size: int
    max_message_size: int
    tx: PoolLayout
    rx: PoolLayout
    rings: tuple[RingLayout, RingLayout, RingLayout, RingLayout]  # submit, complete, deliver, release

    def pack(self) -> bytes:
        return LAYOUT.pack(self.region_size, self.max_message_size, 0, self.tx.pack(), self.rx.pack(),
                           b"".join(r.pack() for r in self.rings))

    @classmethod
    def unpack(cls, raw: bytes) -> "Layout":
        """Decode and check a layout (an endpoint must not trust offsets blindly either)."""
        size, max_msg, _res, tx, rx, rings_raw = LAYOUT.unpack(raw)
        rings = tuple(RingLayout(*RING_OFF.unpack_from(rings_raw, i * RING_OFF.size)) for i in range(4))
        layout = cls(size, max_msg, PoolLayout.unpack(tx), PoolLayout.unpack(rx), rings)  # type: ignore[arg-type]
        layout.check()
        return layout

    def check(self) -> None:
        """Raise ShimError(EPROTO) unless every part lies inside the region without overlap."""
        parts: list[tuple[int, int, str]] = [(0, HEADER_SIZE, "header")]
        for i, (ring, desc) in enumerate(zip(self.rings, DESC_STRUCTS)):
            name = RING_NAMES[i]
            if ring.entries < 1 or ring.entries & (ring.entries - 1) or ring.entries > 1 << 24:
                raise ShimError(errno.EPROTO, f"{name} ring has {ring.entries} entries (power of two up to 2**24 required)")
            if ring.desc_size != desc.size:
                raise ShimError(errno.EPROTO, f"{name} ring descriptor size {ring.desc_size}, ABI says {desc.size}")
            if ring.ctrl % 64 or ring.descs % 8:
                raise ShimError(errno.EPROTO, f"{name} ring is misaligned")
            parts.append((ring.ctrl, RING_CTRL_SIZE, f"{name} ring control"))
            parts.append((ring.descs, ring.entries * ring.desc_size, f"{name} ring descriptors"))
        for label, pool in (("tx", self.tx), ("rx", self.rx)):
            class_end = pool.offset
            for c in sorted(pool.classes, key=lambda c: c.offset):
                if c.slot_size < 1 or c.count < 1 or c.offset % 64:
                    raise ShimError(errno.EPROTO, f"{label} pool class {c} is empty or misaligned")
                if c.offset < pool.offset or c.end > pool.offset + pool.size:
                    raise ShimError(errno.EPROTO, f"{label} pool class {c} lies outside its pool")
                if c.offset < class_end:  # two slots sharing bytes: one message would overwrite another
                    raise ShimError(errno.EPROTO, f"{label} pool class {c} overlaps the class before it")
                class_end = c.end
            if max(c.slot_size for c in pool.classes) < self.max_message_size:
                raise ShimError(errno.EPROTO, f"{label} pool has no slot for a {self.max_message_size}-byte message")
            parts.append((pool.offset, pool.size, f"{label} pool"))
        parts.sort()
        end = 0
        for start, length, name in parts:
            if start < end:
                raise ShimError(errno.EPROTO, f"{name} at {start} overlaps the part before it")
            end = start + length
        if end > self.region_size:
            raise ShimError(errno.EPROTO, f"layout needs {end} bytes but the region has {self.region_size}")


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def pool_classes(max_message_size: int, pool_bytes: int, max_slots: int = 4096) -> list[tuple[int, int]]:
    """Slot sizes and counts for one pool: classes x16 apart from 512 B up to the max message.

    Each class gets an equal share of the byte budget (small classes capped at
    ``max_slots``), and every class has at least two slots, so any message up to the
    maximum always fits and small messages never eat large slots while small ones are free.
    """
    if not 0 <= max_message_size:
        raise LocalProtocolError(f"max_message_size {max_message_size} is negative")
    sizes = []
    s = 512
    while s < max_message_size:
        sizes.append(s)
        s *= 16
    top = _align(max(max_message_size, 64), 64)
    sizes.append(top)
    share = max(pool_bytes // len(sizes), 0)
    return [(size, max(2, min(max_slots, share // size))) for size in sizes]


def build_layout(max_message_size: int, tx_pool_bytes: int, rx_pool_bytes: int, max_in_flight: int) -> Layout:
    """The layout the daemon hands out for one ATTACH.

    Rings are sized so that they cannot overflow for a well-behaved endpoint: every
    submitted message holds a TX slot until its completion is consumed, and every
    delivery holds an RX slot until it is released.  The complete ring gets twice that
    to leave room for error events.
    """
    off = HEADER_SIZE
    tx_classes = pool_classes(max_message_size, tx_pool_bytes)
    rx_classes = pool_classes(max_message_size, rx_pool_bytes)
    tx_slots = sum(n for _s, n in tx_classes)
    rx_slots = sum(n for _s, n in rx_classes)
    entries = (
        _pow2_at_least(tx_slots),
        _pow2_at_least(max(tx_slots, max_in_flight) * 2),
        _pow2_at_least(rx_slots),
        _pow2_at_least(rx_slots),
    )
    rings = []
    for n, desc in zip(entries, DESC_STRUCTS):
        ctrl = _align(off, 64)
        descs = ctrl + RING_CTRL_SIZE
        rings.append(RingLayout(ctrl, descs, n, desc.size))
        off = descs + n * desc.size
    pools = []
    for classes in (tx_classes, rx_classes):
        start = _align(off, 4096)
        out = []
        p = start
        for size, count in classes:
            p = _align(p, 4096 if size >= 4096 else 64)
            out.append(PoolClass(p, size, count))
            p += size * count
        pools.append(PoolLayout(start, p - start, tuple(out)))
        off = p
    layout = Layout(_align(off, 4096), max_message_size, pools[0], pools[1], tuple(rings))  # type: ignore[arg-type]
    layout.check()
    return layout


def pack_region_header(layout: Layout) -> bytes:
    return REGION_HDR.pack(REGION_MAGIC, ABI_VERSION, layout.pack())


def check_region_header(raw: bytes | memoryview, layout: Layout) -> None:
    magic, version, packed = REGION_HDR.unpack_from(raw)
    if magic != REGION_MAGIC:
        raise ShimError(errno.EPROTO, f"region magic 0x{magic:08x} is not lu2k's")
    if version != ABI_VERSION:
        raise ShimError(errno.EPROTO, f"region ABI version {version}, this side speaks {ABI_VERSION}")
    if Layout.unpack(packed) != layout:
        raise ShimError(errno.EPROTO, "region header layout differs from the ATTACH reply")
