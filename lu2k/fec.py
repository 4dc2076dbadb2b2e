"""Forward error correction for datagram transports: random loss that costs no round trip.  Pure.

Theory of operation
-------------------
The sender groups the datagrams it sends to one peer.  Every data datagram goes out at once,
behind a 4-byte header (kind, group, index), so FEC never delays a datagram that arrives.  When
a group holds ``k_max`` datagrams, or its oldest is ``max_delay`` old, the encoder closes it
and sends ``r`` *repair* datagrams: a systematic Reed–Solomon code (zfec) over the group's
datagrams, each first prefixed with its length and zero-padded to the longest.  ``max_delay``
follows the path's round trip (an eighth of it, 20..75 ms: :func:`group_delay_for_rtt`).  The receiver
passes every data datagram up as it arrives and keeps the group; once it holds ``k`` distinct
pieces of a group (data or repair) with data missing, it rebuilds the missing datagrams and
passes them up too.  Any ``r`` losses in a group of ``k + r`` are repaired without waiting a
round trip; more are left to the transport's own retransmission.

How much repair: ``ratio`` of the data bytes, on average (a group of ``B`` bytes whose longest
datagram is ``L`` gets ``floor(ratio * B / L + carry)`` repair datagrams of ``L`` bytes; the
fraction left carries to the next group).  ``auto`` takes the ratio from the loss the *peer* measures on what we send:
each side counts the data datagrams missing from the groups it receives (gaps below the
highest index seen, or below ``k`` once a repair told it) and reports ``(received, lost)``
every ``report_interval`` in a REPORT frame; the sender's ratio follows the reported loss
(none on a clean link, so FEC costs nothing there).

Telling FEC frames apart: every QUIC packet sets 0x80 (long header) or the fixed bit 0x40
(short header) in its first byte (RFC 9000, section 17); FEC frames start with 0x10..0x12, with
both clear.  A receiver therefore accepts both, and a peer that does not send FEC interoperates
with one that does.

Frames (little-endian)::

    DATA    u8 0x10 | u16 group | u8 index                      | datagram
    REPAIR  u8 0x11 | u16 group | u8 index (k..k+r-1) | u8 k | u8 r | share
    REPORT  u8 0x12 | u32 received | u32 lost

Bounds: groups of at most 255 pieces; the decoder keeps at most ``max_groups`` groups and
``max_bytes`` of datagrams, dropping the oldest group first.  Malformed frames are dropped and
counted, never raised: a datagram socket takes whatever anyone sends.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from .errors import ConfigError

try:
    import zfec
except ImportError:  # pragma: no cover - only without the quic extra; FEC then refuses to turn on
    zfec = None

KIND_DATA = 0x10
KIND_REPAIR = 0x11
KIND_REPORT = 0x12


DATA_HDR = struct.Struct("<BHB")
REPAIR_HDR = struct.Struct("<BHBBB")
REPORT = struct.Struct("<BII")
LEN = struct.Struct("<H")
# What a transport's datagram size must shrink by so that every FEC frame fits the path MTU: a
# repair frame is the largest (its header, plus the length prefix of the longest datagram of its
# group), 4 bytes more than a data frame's header.  Shrinking by the data header alone would send
# repair frames 4 bytes over the MTU, to be fragmented by IP.
HEADER_OVERHEAD = REPAIR_HDR.size + LEN.size
MAX_PIECES = 255  # zfec's m
MIN_GROUP_DELAY, MAX_GROUP_DELAY = 0.02, 0.075  # how long a group may stay open (see group_delay_for_rtt)
MAX_DATAGRAM = 65535 - REPAIR_HDR.size - LEN.size


def is_fec_frame(datagram: bytes | memoryview) -> bool:
    """A datagram shaped like one of ours (kind byte, long enough for its header).

    No QUIC packet starts with 0x10..0x12: long headers set 0x80, short ones the fixed bit
    0x40.  Anything else goes to the transport untouched, which discards what it cannot read.
    """
    if not datagram:
        return False
    kind = datagram[0]
    if kind == KIND_DATA:
        return len(datagram) >= DATA_HDR.size
    if kind == KIND_REPAIR:
        return len(datagram) > REPAIR_HDR.size
    return kind == KIND_REPORT and len(datagram) == REPORT.size


@dataclass(frozen=True)
class FecSettings:
    """``mode`` off / fixed / auto; ``ratio`` for fixed (repair per data datagram)."""

    mode: str = "off"
    ratio: float = 0.0
    k_max: int = 128
    max_delay: float = MIN_GROUP_DELAY
    report_interval: float = 1.0
    max_ratio: float = 0.25

    def __post_init__(self) -> None:
        if self.mode not in ("off", "fixed", "auto"):
            raise ConfigError(f"fec mode must be off, auto or a ratio, got {self.mode!r}", where="fec")
        if self.mode != "off" and zfec is None:
            raise ConfigError("fec needs the zfec package (pip install zfec, or lu2k[quic] / lu2k[udt])", where="fec")
        if not (0.0 <= self.ratio <= 1.0 and math.isfinite(self.ratio)):
            raise ConfigError(f"fec ratio must be 0..100%, got {self.ratio}", where="fec")
        if not 1 <= self.k_max <= 200:
            raise ConfigError(f"fec group size must be 1..200, got {self.k_max}", where="fec: group")
        if not (0.0 < self.max_delay <= 1.0):
            raise ConfigError(f"fec max_delay must be in (0, 1] s, got {self.max_delay}", where="fec: max_delay")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def group_delay_for_rtt(rtt_s: float | None) -> float:
    """How long a group may stay open on a path of ``rtt_s``: an eighth of the round trip, within
    MIN_GROUP_DELAY .. MAX_GROUP_DELAY (MIN_GROUP_DELAY without an RTT).

    A datagram FEC rebuilds waits for its group to close, so the wait must stay far below the
    retransmission round trip it saves; and the longer the group, the more datagrams share its
    repair, which evens out random loss: at 1 % loss and ~4 % repair, groups of 20 ms of a 20
    Mbit/s link (~34 datagrams, 1 or 2 repair) leave ~0.2 % of all datagrams to the transport's
    retransmission -- a 64 KiB message of ~47 datagrams then waits a round trip about one time
    in ten -- while 75 ms groups (~128 datagrams, 5 repair) leave ~0.01 %.
    """
    if rtt_s is None or not math.isfinite(rtt_s) or rtt_s <= 0:
        return MIN_GROUP_DELAY
    return min(MAX_GROUP_DELAY, max(MIN_GROUP_DELAY, rtt_s / 8))


def parse_fec(value: object, where: str = "fec", rtt_s: float | None = None) -> FecSettings:
    """``off`` / ``false``, ``auto``, or a fixed ratio (``5%``, ``0.05``); groups sized for a path
    of ``rtt_s`` (:func:`group_delay_for_rtt`)."""
    delay = group_delay_for_rtt(rtt_s)
    if value is None or value is False or value == "off":
        return FecSettings()
    if value == "auto" or value is True:
        return FecSettings(mode="auto", max_delay=delay)
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            ratio = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ConfigError(f"bad fec value {value!r}: expected off, auto or a ratio such as 5%", where=where) from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        ratio = float(value)
    else:
        raise ConfigError(f"bad fec value {value!r}: expected off, auto or a ratio such as 5%", where=where)
    if not (math.isfinite(ratio) and 0 < ratio <= 1):
        raise ConfigError(f"fec ratio must be above 0 and at most 100%, got {value!r}", where=where)
    return FecSettings(mode="fixed", ratio=ratio, max_delay=delay)


def ratio_for_loss(loss: float, max_ratio: float = 0.25) -> float:
    """Repair per data datagram for a measured loss rate: none below 0.05 %, else 3p + 1.5 %.

    With groups of ~128 that repairs all but ~0.5 % of lost datagrams at 1 % loss (a group is
    lost to FEC only when more than r of its k + r pieces are: 6 repair here), for ~4.5 % extra
    bytes.  Every failed group costs each message with a datagram lost in it a round trip, so the
    margin above the mean loss (1.5 %) is what keeps those rare enough for a p99.
    """
    if not math.isfinite(loss) or loss < 0.0005:
        return 0.0
    return min(max_ratio, 3 * loss + 0.015)


@dataclass
class _OpenGroup:
    group: int
    opened: float
    blocks: list[bytes] = field(default_factory=list)
    nbytes: int = 0
    longest: int = 0

    def full_size_equivalent(self) -> float:
        """The group's size in datagrams of its longest one (what each repair datagram costs)."""
        return self.nbytes / self.longest if self.longest else 0.0


class FecEncoder:
    """One peer's outgoing side: wraps datagrams, closes groups, emits repair and reports."""

    def __init__(self, settings: FecSettings) -> None:
        self.settings = settings
        self.ratio = settings.ratio if settings.mode == "fixed" else 0.0
        self._next_group = 0
        self._open: _OpenGroup | None = None
        self._credit = 0.0  # repair owed from earlier groups (a fraction of a datagram)
        self.stats = {"data": 0, "repair": 0, "repair_bytes": 0, "data_bytes": 0}

    def wrap(self, datagram: bytes, now: float) -> list[bytes]:
        """Frames to send for one datagram: the data frame, then any repair that closes its group."""
        if len(datagram) > MAX_DATAGRAM:
            return [datagram]  # cannot be protected; sent as is (the peer passes non-FEC frames up)
        g = self._open
        if g is None:
            g = self._open = _OpenGroup(self._next_group, now)
            self._next_group = (self._next_group + 1) & 0xFFFF
        index = len(g.blocks)
        g.blocks.append(datagram)
        g.nbytes += len(datagram)
        g.longest = max(g.longest, len(datagram))
        self.stats["data"] += 1
        self.stats["data_bytes"] += len(datagram)
        out = [DATA_HDR.pack(KIND_DATA, g.group, index) + datagram]
        if len(g.blocks) >= self.settings.k_max or len(g.blocks) + self._repair_count(g) >= MAX_PIECES:
            out += self._close()
        return out

    def next_deadline(self) -> float | None:
        return self._open.opened + self.settings.max_delay if self._open is not None else None

    def handle_timer(self, now: float) -> list[bytes]:
        if self._open is not None and now >= self._open.opened + self.settings.max_delay:
            return self._close()
        return []

    def on_report(self, received: int, lost: int) -> None:
        if self.settings.mode == "auto" and received + lost > 0:
            self.ratio = ratio_for_loss(lost / (received + lost), self.settings.max_ratio)

    def _repair_count(self, g: _OpenGroup) -> int:
        # ``ratio`` of the group's bytes: a repair datagram is as long as the group's longest, so
        # a group with short datagrams (ACK-only packets) gets fewer, and the extra bytes stay
        # ``ratio`` of the data whatever the mix.  The fractional part carries over to the next
        # group, so over time that holds however the groups fall (a ceiling per group would send
        # 2 for a group of 26 at 4 %).
        if self.ratio <= 0:
            return 0
        return min(MAX_PIECES - len(g.blocks), int(self._credit + self.ratio * g.full_size_equivalent() + 1e-9))

    def _close(self) -> list[bytes]:
        g, self._open = self._open, None
        assert g is not None
        k = len(g.blocks)
        r = self._repair_count(g)
        self._credit = max(0.0, self._credit + self.ratio * g.full_size_equivalent() - r)
        if r <= 0:
            return []
        size = max(len(b) for b in g.blocks) + LEN.size
        padded = [LEN.pack(len(b)) + b + bytes(size - LEN.size - len(b)) for b in g.blocks]
        shares = zfec.Encoder(k, k + r).encode(padded, list(range(k, k + r)))
        self.stats["repair"] += r
        self.stats["repair_bytes"] += r * size
        return [REPAIR_HDR.pack(KIND_REPAIR, g.group, k + j, k, r) + bytes(share) for j, share in enumerate(shares)]


@dataclass
class _RxGroup:
    data: dict[int, bytes] = field(default_factory=dict)
    repair: dict[int, bytes] = field(default_factory=dict)
    k: int | None = None
    r: int | None = None
    highest: int = -1
    done: bool = False
    nbytes: int = 0


class FecDecoder:
    """One peer's incoming side: unwraps data, rebuilds lost datagrams, measures loss."""

    def __init__(self, max_groups: int = 64, max_bytes: int = 4 << 20) -> None:
        self.max_groups, self.max_bytes = max_groups, max_bytes
        self._groups: OrderedDict[int, _RxGroup] = OrderedDict()
        self._bytes = 0
        self._received = self._lost = 0  # since the last report
        self.stats = {"data": 0, "repair": 0, "recovered": 0, "unrecovered_groups": 0, "malformed": 0, "lost": 0, "reports": 0}

    def receive(self, frame: bytes) -> tuple[list[bytes], tuple[int, int] | None]:
        """Datagrams to pass up (this one and any it made recoverable), and a peer report if it was one."""
        if len(frame) < 1:
            self.stats["malformed"] += 1
            return [], None
        kind = frame[0]
        if kind == KIND_DATA and len(frame) >= DATA_HDR.size:
            _, group, index = DATA_HDR.unpack_from(frame)
            payload = bytes(frame[DATA_HDR.size:])
            self.stats["data"] += 1
            g = self._group(group)
            if g.k is not None and index >= g.k:
                self.stats["malformed"] += 1  # beyond the group's size as its repair declared it
                return [], None
            if g.done:
                return [payload], None  # after the group was settled: pass it up, the transport dedupes
            if index in g.data:
                return [], None  # a duplicate datagram
            g.data[index] = payload
            g.highest = max(g.highest, index)
            self._account(g, len(payload))
            return [payload] + self._try_recover(g), None
        if kind == KIND_REPAIR and len(frame) > REPAIR_HDR.size:
            _, group, index, k, r = REPAIR_HDR.unpack_from(frame)
            if not (1 <= k and 1 <= r and k + r <= MAX_PIECES and k <= index < k + r):
                self.stats["malformed"] += 1
                return [], None
            g = self._group(group)
            if g.done:
                return [], None
            if (g.k is not None and (g.k, g.r) != (k, r)) or g.highest >= k:
                self.stats["malformed"] += 1  # contradicts what this group said before
                return [], None
            share = bytes(frame[REPAIR_HDR.size:])
            if g.repair and len(share) != len(next(iter(g.repair.values()))):
                self.stats["malformed"] += 1
                return [], None
            g.k, g.r = k, r
            if index not in g.repair:
                g.repair[index] = share
                self.stats["repair"] += 1
                self._account(g, len(share))
            return self._try_recover(g), None
        if kind == KIND_REPORT and len(frame) == REPORT.size:
            _, received, lost = REPORT.unpack(frame)
            self.stats["reports"] += 1
            return [], (received, lost)
        self.stats["malformed"] += 1
        return [], None

    def take_report(self) -> bytes | None:
        """A REPORT frame with what arrived and was lost since the last one (None if nothing did)."""
        self._settle_old()
        if self._received == 0 and self._lost == 0:
            return None
        frame = REPORT.pack(KIND_REPORT, min(self._received, 0xFFFFFFFF), min(self._lost, 0xFFFFFFFF))
        self._received = self._lost = 0
        return frame

    # -- internals ---------------------------------------------------------------------------

    def _group(self, group: int) -> _RxGroup:
        g = self._groups.get(group)
        if g is not None:
            return g
        g = self._groups[group] = _RxGroup()
        while len(self._groups) > self.max_groups:
            self._evict()
        return g

    def _account(self, g: _RxGroup, n: int) -> None:
        g.nbytes += n
        self._bytes += n
        while self._bytes > self.max_bytes and len(self._groups) > 1:
            self._evict()

    def _evict(self) -> None:
        _, g = self._groups.popitem(last=False)
        self._bytes -= g.nbytes
        self._close_count(g)

    def _close_count(self, g: _RxGroup) -> None:
        expected = g.k if g.k is not None else g.highest + 1
        got = len(g.data)
        missing = max(0, expected - got)
        if not g.done:
            self._received += got
            self._lost += missing
            self.stats["lost"] += missing
            if missing and g.k is not None:
                self.stats["unrecovered_groups"] += 1
        g.done = True

    def _settle_old(self) -> None:
        # Groups well behind the newest are as complete as they will get: count them now.
        while len(self._groups) > 4:
            self._evict()

    def _try_recover(self, g: _RxGroup) -> list[bytes]:
        if g.done or g.k is None or g.r is None or zfec is None:
            return []
        k = g.k
        if len(g.data) >= k:
            self._finish(g, recovered=0)
            return []
        if len(g.data) + len(g.repair) < k:
            return []
        size = len(next(iter(g.repair.values())))
        nums, blocks = [], []
        for i, d in g.data.items():
            if len(d) + LEN.size > size:
                self.stats["malformed"] += 1
                self._finish(g, recovered=0)
                return []
            nums.append(i)
            blocks.append(LEN.pack(len(d)) + d + bytes(size - LEN.size - len(d)))
        for i, s in g.repair.items():
            if len(nums) == k:
                break
            nums.append(i)
            blocks.append(s)
        primary = zfec.Decoder(k, k + g.r).decode(blocks[:k], nums[:k])
        out = []
        for i in range(k):
            if i in g.data:
                continue
            block = bytes(primary[i])
            (n,) = LEN.unpack_from(block)
            if n > size - LEN.size:
                self.stats["malformed"] += 1
                continue
            out.append(block[LEN.size : LEN.size + n])
        self._finish(g, recovered=len(out), lost=k - len(g.data))
        self.stats["recovered"] += len(out)
        return out

    def _finish(self, g: _RxGroup, recovered: int, lost: int = 0) -> None:
        self._received += len(g.data)
        self._lost += lost
        self.stats["lost"] += lost
        g.done = True
        g.data.clear()
        g.repair.clear()
        self._bytes -= g.nbytes
        g.nbytes = 0


MAX_OVERHEAD = HEADER_OVERHEAD  # the same, under the name the udt backend uses


class FecPeer:
    """Both directions of FEC with one peer, and when to act next: the part every adapter needs.

    ``send`` wraps an outgoing datagram (with ``settings`` off it is returned as is);
    ``receive`` takes an FEC frame from the peer and returns the datagrams to pass up (and
    feeds the peer's loss reports to our encoder); ``on_timer`` closes a group that waited
    ``max_delay`` and emits a loss report every ``report_interval`` once the peer has sent us
    FEC frames.  ``deadline`` is when ``on_timer`` wants to run next (None: nothing pending).
    """

    def __init__(self, settings: FecSettings | None, now: float) -> None:
        self.encoder = FecEncoder(settings) if settings is not None and settings.enabled else None
        self.decoder = FecDecoder()
        self.report_interval = settings.report_interval if settings is not None else 1.0
        self.next_report = now + self.report_interval
        self.heard = False  # FEC frames came from this peer: it wants our loss reports
        self.last_active = now

    def send(self, datagram: bytes, now: float) -> list[bytes]:
        self.last_active = now
        if self.encoder is None:
            return [datagram]
        return self.encoder.wrap(datagram, now)

    def receive(self, frame: bytes, now: float) -> list[bytes]:
        self.heard = True
        self.last_active = now
        datagrams, report = self.decoder.receive(frame)
        if report is not None and self.encoder is not None:
            self.encoder.on_report(*report)
        return datagrams

    def on_timer(self, now: float) -> list[bytes]:
        out = self.encoder.handle_timer(now) if self.encoder is not None else []
        if self.heard and now >= self.next_report:
            self.next_report = now + self.report_interval
            report = self.decoder.take_report()
            if report is not None:
                out.append(report)
        return out

    def deadline(self) -> float | None:
        d = self.encoder.next_deadline() if self.encoder is not None else None
        if self.heard and (d is None or self.next_report < d):
            d = self.next_report
        return d

    def stats(self) -> dict[str, int]:
        """The decoder's counters as they are (what came in), the encoder's as ``sent_*``."""
        out = dict(self.decoder.stats)
        for k, v in (self.encoder.stats if self.encoder is not None else {}).items():
            out[f"sent_{k}"] = v
        return out
