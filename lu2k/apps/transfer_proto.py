"""The file-transfer protocol: message formats and the sender's and receiver's state machines.

Pure: no files, sockets or clock.  Messages (bytes) and ``now`` go in; messages to send,
chunk indices to read or write, and outcomes come out.  The asyncio adapter
(:mod:`.transfer`) does the reading, writing, hashing and sending.

Theory of operation
-------------------
lu2k delivers each message exactly once and tells the sender when it reached the far
endpoint's queue -- but not in order (small and large messages take different
connections) and not that the far *application* did anything with it.  So every file is
its own session, started by the sender and concluded by the receiver:

1. ``OFFER`` (name, size, mode, mtime, chunk size) -> ``ACCEPT`` listing the chunks the
   receiver already holds *verified* (resume), or ``RESULT`` with a refusal.  A file of at
   most one chunk goes out whole in its first offer instead (``OFFER_INLINE``: the OFFER, the
   file's SHA-256 and its bytes), which the receiver takes as OFFER, DATA and END at once and
   answers with the ``RESULT``: one round trip per small file, not two.
2. ``DATA`` per missing chunk: byte offset, SHA-256 of the chunk, the bytes.  The receiver
   checks the chunk's hash before writing it to ``.NAME.lu2k-part`` and records it in its
   state file only after the data is on disk; a chunk that fails its hash is not recorded
   (and will be asked for again).
3. ``END`` (total size, SHA-256 of the whole file) once every chunk was delivered.  The
   receiver, holding every chunk, hashes the partial file *as it is on disk*, compares,
   applies mode and mtime, renames it into place and answers ``RESULT OK``.  Only then
   does the sender count the file as transferred: exit status 0 means "written and
   verified at the destination".

Any message of a session may be repeated: an ``OFFER`` for a session the receiver knows
is answered with its current chunk list, an ``END`` for a finished one with its result.
So after a failure (peer unreachable, receiver daemon restarted, a ``RESULT
UNKNOWN_SESSION`` because the receiving service restarted) the sender waits for its
messages in flight to settle, re-offers, and sends what is still missing; a rerun of the
same command does the same from scratch -- the receiver keys partial files by name, size
and mtime, not by session.

Rules (everything that moves a session lives in the two tables below):

* A session's state changes only through :data:`SENDER_TRANSITIONS` /
  :data:`RECEIVER_TRANSITIONS`; an event not in the table for the current state is a
  :class:`~lu2k.errors.LocalProtocolError` (our bug) when we caused it, and is ignored
  (counted) when a peer's message caused it -- a late duplicate is normal.
* Every outcome the user sees is one :class:`Outcome`; exit statuses derive from it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import LocalProtocolError, RemoteProtocolError

MAGIC = 0x5854324C  # "L2TX"
VERSION = 1

# Every message: magic, kind, version, reserved, session id (the sender's random u64).
HDR = struct.Struct("<IBBHQ")
# OFFER: size, mtime_ns (signed), mode, chunk size, entry kind, name length; then the UTF-8 name.
OFFER = struct.Struct("<QqIIBH")
# ACCEPT: flags, number of ranges; then RANGE per run of held chunks (first index, count).
ACCEPT = struct.Struct("<BI")
RANGE = struct.Struct("<QQ")
# DATA: byte offset, SHA-256 of the chunk; then the bytes.
DATA = struct.Struct("<Q32s")
# END: total size, SHA-256 of the whole file.
END = struct.Struct("<Q32s")
# OFFER_INLINE: OFFER and the name, then the file's SHA-256, then its bytes (``size`` of them).
INLINE_SHA = struct.Struct("<32s")
# RESULT: outcome, text length; then UTF-8 text.  ABORT: text length; then text.
RESULT = struct.Struct("<BH")
ABORT = struct.Struct("<H")

DATA_OVERHEAD = HDR.size + DATA.size
# Chunk payload: a message then fits the shim's 128 KiB slot class, of which the default
# pools have the most slots (see kernel_shim.abi.pool_classes).
DEFAULT_CHUNK = 128 * 1024 - 256
MAX_CHUNK = 4 * 1024 * 1024 - DATA_OVERHEAD
MAX_NAME = 4096
MAX_RANGES = 16384  # an ACCEPT stays under 300 KB; the sender resends what did not fit
# A file goes inline when its bytes and name fit in this (a DATA message of the default chunk).
INLINE_MAX = DEFAULT_CHUNK
ACCEPT_COMPLETE = 1  # the file is already in place with this size and mtime: verify only


class Kind(enum.IntEnum):
    OFFER = 1
    ACCEPT = 2
    DATA = 3
    END = 4
    RESULT = 5
    ABORT = 6
    OFFER_INLINE = 7


class Entry(enum.IntEnum):
    """What an OFFER is for."""

    FILE = 0
    DIR = 1
    STREAM = 2  # unknown size, written in order to a file or stdout; not resumable


class Outcome(enum.IntEnum):
    """How a session ended (RESULT), and the CLI's exit status for it."""

    OK = 0
    REFUSED = 1  # the receiver does not accept this sender or this entry
    BAD_NAME = 2  # absolute, '..', reserved or unencodable name
    DISK_FULL = 3  # no space at the receiver (before or while writing)
    IO_ERROR = 4  # the receiver could not write (permission, not a directory, ...)
    VERIFY_FAILED = 5  # whole-file hash mismatch; the partial file was discarded
    EXISTS_DIFFERS = 6  # a file with this name, size and mtime is there with other content
    BUSY = 7  # another sender is transferring this name right now
    UNKNOWN_SESSION = 8  # the receiver does not know this session (it restarted): re-offer
    ABORTED = 9  # the other side gave up
    PEER_DOWN = 10  # (sender-side only) the receiver could not be reached
    NO_SERVICE = 11  # (sender-side only) nothing listens on the receiver's portal


EXIT_STATUS = {Outcome.OK: 0, Outcome.PEER_DOWN: 3, Outcome.NO_SERVICE: 3, Outcome.REFUSED: 4, Outcome.BAD_NAME: 4,
               Outcome.BUSY: 4, Outcome.EXISTS_DIFFERS: 4, Outcome.DISK_FULL: 5, Outcome.IO_ERROR: 5,
               Outcome.VERIFY_FAILED: 6, Outcome.ABORTED: 1, Outcome.UNKNOWN_SESSION: 1}
"""Exit status per outcome: 0 verified; 3 peer down/no service; 4 refused; 5 cannot write
(disk full, I/O); 6 verify failed; 1 anything else (the worst one wins for several files)."""


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offer:
    sid: int
    name: str
    size: int
    mtime_ns: int
    mode: int
    chunk: int
    entry: Entry
    inline: memoryview | bytes | None = None  # OFFER_INLINE: the whole file (one chunk at most)
    sha: bytes = b""  # OFFER_INLINE: its SHA-256


@dataclass(frozen=True, slots=True)
class Accept:
    sid: int
    have: tuple[tuple[int, int], ...]  # (first chunk, count) runs, ascending
    complete: bool = False


@dataclass(frozen=True, slots=True)
class Data:
    sid: int
    offset: int
    sha: bytes
    payload: memoryview | bytes


@dataclass(frozen=True, slots=True)
class End:
    sid: int
    size: int
    sha: bytes


@dataclass(frozen=True, slots=True)
class Result:
    sid: int
    outcome: Outcome
    text: str = ""


@dataclass(frozen=True, slots=True)
class Abort:
    sid: int
    text: str = ""


Message = Offer | Accept | Data | End | Result | Abort


def _hdr(kind: Kind, sid: int) -> bytes:
    return HDR.pack(MAGIC, kind, VERSION, 0, sid)


def _text(text: str, limit: int = 1024) -> bytes:
    return text.encode("utf-8", "replace")[:limit]


def encode_offer(m: Offer) -> bytes:
    name = m.name.encode("utf-8", "surrogateescape")
    if len(name) > MAX_NAME:
        raise LocalProtocolError(f"name of {len(name)} bytes exceeds {MAX_NAME}: {m.name[:80]}...")
    fields = OFFER.pack(m.size, m.mtime_ns, m.mode, m.chunk, m.entry, len(name)) + name
    if m.inline is None:
        return _hdr(Kind.OFFER, m.sid) + fields
    if len(m.inline) != m.size or m.size > m.chunk or m.entry is not Entry.FILE or len(m.sha) != 32:
        raise LocalProtocolError(f"{m.name}: an inline offer carries a whole file of at most one chunk, and its SHA-256")
    return _hdr(Kind.OFFER_INLINE, m.sid) + fields + INLINE_SHA.pack(m.sha) + bytes(m.inline)


def encode_accept(m: Accept) -> bytes:
    have = m.have[:MAX_RANGES]
    return _hdr(Kind.ACCEPT, m.sid) + ACCEPT.pack(ACCEPT_COMPLETE if m.complete else 0, len(have)) + b"".join(RANGE.pack(a, n) for a, n in have)


def data_header(sid: int, offset: int, sha: bytes) -> bytes:
    """The first :data:`DATA_OVERHEAD` bytes of a DATA message (the adapter writes the chunk after it in place)."""
    return _hdr(Kind.DATA, sid) + DATA.pack(offset, sha)


def encode_end(m: End) -> bytes:
    return _hdr(Kind.END, m.sid) + END.pack(m.size, m.sha)


def encode_result(m: Result) -> bytes:
    t = _text(m.text)
    return _hdr(Kind.RESULT, m.sid) + RESULT.pack(m.outcome, len(t)) + t


def encode_abort(m: Abort) -> bytes:
    t = _text(m.text)
    return _hdr(Kind.ABORT, m.sid) + ABORT.pack(len(t)) + t


def encode(m: Message) -> bytes:
    if isinstance(m, Offer):
        return encode_offer(m)
    if isinstance(m, Accept):
        return encode_accept(m)
    if isinstance(m, Data):
        return data_header(m.sid, m.offset, m.sha) + bytes(m.payload)
    if isinstance(m, End):
        return encode_end(m)
    if isinstance(m, Result):
        return encode_result(m)
    return encode_abort(m)


def decode(buf: bytes | memoryview) -> Message:
    """One message; RemoteProtocolError naming what is wrong with it.  DATA's payload is a view of ``buf``."""
    view = memoryview(buf)
    if len(view) < HDR.size:
        raise RemoteProtocolError(f"transfer message of {len(view)} bytes is shorter than its {HDR.size}-byte header")
    magic, kind, version, _res, sid = HDR.unpack_from(view)
    if magic != MAGIC:
        raise RemoteProtocolError(f"not a lu2k transfer message (magic 0x{magic:08x})")
    if version != VERSION:
        raise RemoteProtocolError(f"transfer protocol version {version}, this side speaks {VERSION}")
    body = view[HDR.size :]
    try:
        if kind == Kind.DATA:
            offset, sha = DATA.unpack_from(body)
            return Data(sid, offset, sha, body[DATA.size :])
        if kind in (Kind.OFFER, Kind.OFFER_INLINE):
            size, mtime_ns, mode, chunk, entry, nlen = OFFER.unpack_from(body)
            raw = bytes(body[OFFER.size : OFFER.size + nlen])
            if len(raw) != nlen:
                raise RemoteProtocolError("OFFER name truncated")
            if entry not in Entry._value2member_map_:
                raise RemoteProtocolError(f"OFFER of unknown entry kind {entry}")
            if not 0 < chunk <= MAX_CHUNK:
                raise RemoteProtocolError(f"OFFER chunk size {chunk} outside 1..{MAX_CHUNK}")
            name = raw.decode("utf-8", "surrogateescape")
            if kind == Kind.OFFER:
                return Offer(sid, name, size, mtime_ns, mode, chunk, Entry(entry))
            (sha,) = INLINE_SHA.unpack_from(body, OFFER.size + nlen)
            content = body[OFFER.size + nlen + INLINE_SHA.size :]
            if entry != Entry.FILE or size > chunk or len(content) != size:
                raise RemoteProtocolError(f"inline OFFER of {name!r}: {len(content)} bytes for a file of {size} "
                                          f"(entry kind {entry}, chunk {chunk}); it carries one whole file of at most one chunk")
            return Offer(sid, name, size, mtime_ns, mode, chunk, Entry.FILE, content, sha)
        if kind == Kind.ACCEPT:
            flags, n = ACCEPT.unpack_from(body)
            if len(body) != ACCEPT.size + n * RANGE.size:
                raise RemoteProtocolError(f"ACCEPT announces {n} ranges in {len(body)} bytes")
            have = tuple(RANGE.unpack_from(body, ACCEPT.size + i * RANGE.size) for i in range(n))
            return Accept(sid, have, bool(flags & ACCEPT_COMPLETE))
        if kind == Kind.END:
            size, sha = END.unpack_from(body)
            return End(sid, size, sha)
        if kind == Kind.RESULT:
            code, tlen = RESULT.unpack_from(body)
            if code not in Outcome._value2member_map_:
                raise RemoteProtocolError(f"RESULT with unknown outcome {code}")
            return Result(sid, Outcome(code), bytes(body[RESULT.size : RESULT.size + tlen]).decode("utf-8", "replace"))
        if kind == Kind.ABORT:
            (tlen,) = ABORT.unpack_from(body)
            return Abort(sid, bytes(body[ABORT.size : ABORT.size + tlen]).decode("utf-8", "replace"))
    except struct.error:
        raise RemoteProtocolError(f"truncated transfer message of kind {kind} ({len(view)} bytes)") from None
    raise RemoteProtocolError(f"unknown transfer message kind {kind}")


def expand(m: Message) -> list[Message]:
    """An inline OFFER as the OFFER, DATA (none for an empty file) and END it stands for; any
    other message as itself.  Receivers handle the parts in this order."""
    if not isinstance(m, Offer) or m.inline is None:
        return [m]
    plain = Offer(m.sid, m.name, m.size, m.mtime_ns, m.mode, m.chunk, m.entry)
    data: list[Message] = [Data(m.sid, 0, m.sha, m.inline)] if m.size else []
    return [plain, *data, End(m.sid, m.size, m.sha)]


# --- chunk sets ---------------------------------------------------------------------------------


def chunk_count(size: int, chunk: int) -> int:
    return max(1, -(-size // chunk)) if size else 0


def to_ranges(indices: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Sorted runs ``(first, count)`` of a set of chunk indices."""
    out: list[tuple[int, int]] = []
    for i in sorted(indices):
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return tuple(out)


def from_ranges(ranges: Iterable[tuple[int, int]], limit: int) -> set[int]:
    out: set[int] = set()
    for first, count in ranges:
        out.update(range(first, min(first + count, limit)))
    return out


# --- names ------------------------------------------------------------------------------------

PART_SUFFIX = ".lu2k-part"
STATE_SUFFIX = ".lu2k-state"


def check_name(name: str) -> str | None:
    """Why ``name`` may not be written under a receiving directory, or None if it may."""
    if not name or "\0" in name:
        return "empty name or NUL in name"
    if name.startswith("/") or "\\" in name:
        return f"{name!r} is absolute or uses backslashes"
    parts = name.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            return f"{name!r} has an empty, '.' or '..' component"
        if p.endswith(PART_SUFFIX) or p.endswith(STATE_SUFFIX):
            return f"{name!r} uses lu2k's reserved suffixes"
    return None


# --- the sender's session -----------------------------------------------------------------------


class SendState(enum.Enum):
    IDLE = "idle"
    OFFERED = "offered"  # OFFER out, waiting for ACCEPT/RESULT
    SENDING = "sending"  # DATA going out
    SETTLING = "settling"  # something failed: waiting for DATA in flight to settle before re-offering
    ENDED = "ended"  # END out, waiting for RESULT
    DONE = "done"
    FAILED = "failed"


S = SendState
SENDER_TRANSITIONS: dict[tuple[SendState, str], SendState] = {
    (S.IDLE, "offer"): S.OFFERED,
    (S.IDLE, "offer_inline"): S.ENDED,  # the whole file, its hash and the OFFER in one message
    (S.OFFERED, "accept"): S.SENDING,
    (S.OFFERED, "result"): S.FAILED,  # a refusal (or OK for a directory/verify-only entry: see handle())
    (S.OFFERED, "offer"): S.OFFERED,  # reply timeout: ask again
    (S.OFFERED, "transient"): S.SETTLING,
    (S.SENDING, "transient"): S.SETTLING,
    (S.SENDING, "end"): S.ENDED,
    (S.SENDING, "result"): S.FAILED,  # e.g. DISK_FULL while writing
    (S.SETTLING, "offer"): S.OFFERED,
    (S.SETTLING, "transient"): S.SETTLING,
    (S.SETTLING, "result"): S.FAILED,
    (S.ENDED, "result"): S.DONE,  # OK; any other outcome -> FAILED (handle())
    (S.ENDED, "transient"): S.SETTLING,
    (S.ENDED, "end"): S.ENDED,  # reply timeout: ask again
}
for _s in (S.IDLE, S.OFFERED, S.SENDING, S.SETTLING, S.ENDED):
    SENDER_TRANSITIONS[(_s, "fail")] = S.FAILED
    SENDER_TRANSITIONS[(_s, "abort")] = S.FAILED


@dataclass
class SendSession:
    """One entry on its way out.  The adapter asks :meth:`next_chunk` what to read and send,
    reports each DATA's completion, feeds replies to :meth:`handle`, and ends with
    :meth:`end` once :meth:`ready_to_end`."""

    sid: int
    name: str
    size: int
    mtime_ns: int
    mode: int
    entry: Entry = Entry.FILE
    chunk: int = DEFAULT_CHUNK
    state: SendState = SendState.IDLE
    outcome: Outcome | None = None
    text: str = ""
    cursor: int = 0  # next chunk to read for the first time (the whole-file hash follows it)
    have: set[int] = field(default_factory=set)  # chunks the receiver reported held
    repair: set[int] = field(default_factory=set)  # chunks below the cursor to send again
    in_flight: set[int] = field(default_factory=set)
    delivered: set[int] = field(default_factory=set)  # DATA completed DELIVERED since the last ACCEPT
    resent: int = 0
    offers: int = 0
    ignored: int = 0
    complete_at_receiver: bool = False
    end_sent: bool = False

    @property
    def nchunks(self) -> int:
        return chunk_count(self.size, self.chunk) if self.entry == Entry.FILE else 0

    def _go(self, event: str) -> None:
        nxt = SENDER_TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise LocalProtocolError(f"{self.name}: event {event!r} in state {self.state.value}")
        self.state = nxt

    @property
    def inline_eligible(self) -> bool:
        """Whether the first offer may carry the whole file (:meth:`offer_inline`).  Only the
        first: a re-offer is a plain OFFER, which any receiver answers (one that predates
        inline offers drops them, so its sender goes on after one reply timeout)."""
        return (self.state is SendState.IDLE and self.entry is Entry.FILE and self.size <= self.chunk
                and self.size + len(self.name.encode("utf-8", "surrogateescape")) <= INLINE_MAX)

    def offer_inline(self, content: bytes, sha: bytes) -> bytes:
        """The first OFFER with the whole file in it: END is then as good as sent."""
        if not self.inline_eligible:
            raise LocalProtocolError(f"{self.name}: not a first offer of a file of at most one chunk")
        if len(content) != self.size:
            raise LocalProtocolError(f"{self.name}: {len(content)} bytes inline for a file of {self.size}")
        msg = encode_offer(Offer(self.sid, self.name, self.size, self.mtime_ns, self.mode, self.chunk, self.entry, content, sha))
        self._go("offer_inline")
        self.offers += 1
        self.cursor = self.nchunks
        self.end_sent = True
        return msg

    def offer(self) -> bytes:
        """The OFFER to send (first time, after a reply timeout, or after settling)."""
        if self.state is SendState.SETTLING and self.in_flight:
            raise LocalProtocolError(f"{self.name}: re-offer with {len(self.in_flight)} chunks in flight")
        self._go("offer")
        self.offers += 1
        return encode_offer(Offer(self.sid, self.name, self.size, self.mtime_ns, self.mode, self.chunk, self.entry))

    def handle(self, msg: Message) -> None:
        """A reply from the receiver."""
        if isinstance(msg, Accept):
            if self.state is not SendState.OFFERED:
                self.ignored += 1  # a late answer to an earlier OFFER
                return
            self._go("accept")
            self.have = from_ranges(msg.have, self.nchunks)
            self.complete_at_receiver = msg.complete
            if msg.complete:
                self.have = set(range(self.nchunks))
            self.repair = {i for i in range(self.cursor) if i not in self.have}
            self.resent += len(self.repair - self.delivered) if self.offers > 1 else 0
            self.delivered.clear()
        elif isinstance(msg, Result):
            if msg.outcome is Outcome.UNKNOWN_SESSION:
                if self.state in (SendState.SENDING, SendState.ENDED, SendState.OFFERED):
                    self._go("transient")
                return
            if (self.state, "result") not in SENDER_TRANSITIONS:
                self.ignored += 1
                return
            ok = msg.outcome is Outcome.OK
            # OK is only ever sent after the receiver matched our END's whole-file hash: final in any state.
            if ok and (self.state is SendState.ENDED or self.end_sent or (self.state is SendState.OFFERED and self.entry == Entry.DIR)):
                self.state = SendState.DONE
                self.outcome = Outcome.OK
                return
            if ok:
                self.ignored += 1  # an OK for an earlier END of this session
                return
            self.state = SendState.FAILED
            self.outcome, self.text = msg.outcome, msg.text
        elif isinstance(msg, Abort):
            self._go("abort")
            self.outcome, self.text = Outcome.ABORTED, msg.text or "receiver aborted the transfer"
        else:
            raise RemoteProtocolError(f"{type(msg).__name__} is not a reply a sender expects")

    def next_chunk(self) -> tuple[int, bool, bool] | None:
        """``(index, first_read, must_send)`` of the next chunk to handle, or None for now.

        ``first_read``: the adapter feeds the bytes to the whole-file hash (in index order);
        ``must_send``: the receiver lacks it, so it goes out as DATA.
        """
        if self.state is not SendState.SENDING:
            return None
        if self.repair:
            i = min(self.repair)
            self.repair.discard(i)
            return i, False, True
        if self.cursor < self.nchunks:
            i = self.cursor
            self.cursor += 1
            return i, True, i not in self.have
        return None

    def chunk_posted(self, i: int) -> None:
        self.in_flight.add(i)

    def chunk_delivered(self, i: int) -> None:
        self.in_flight.discard(i)
        self.delivered.add(i)

    def chunk_failed(self, i: int, reason: str, *, transient: bool, outcome: Outcome = Outcome.PEER_DOWN) -> None:
        self.in_flight.discard(i)
        self.transient_failure(reason, transient=transient, outcome=outcome)

    def transient_failure(self, reason: str, *, transient: bool, outcome: Outcome = Outcome.PEER_DOWN) -> None:
        """A message of this session failed or a reply did not come."""
        if self.state in (SendState.DONE, SendState.FAILED):
            return
        self.text = reason
        if transient:
            self._go("transient")
        else:
            self._go("fail")
            self.outcome = outcome

    def settled(self) -> bool:
        """In SETTLING with nothing in flight: time to re-offer."""
        return self.state is SendState.SETTLING and not self.in_flight

    def ready_to_end(self) -> bool:
        """Every chunk read (so the whole-file hash is known) and posted.  END does not wait for
        the DATA still in flight: the receiver verifies once it holds every chunk, and a chunk
        that fails after END sends the session through a re-offer as usual (saves a round trip)."""
        return self.state is SendState.SENDING and self.cursor >= self.nchunks and not self.repair

    def end(self, sha: bytes) -> bytes:
        self._go("end")
        self.end_sent = True
        return encode_end(End(self.sid, self.size, sha))

    def give_up(self, outcome: Outcome, reason: str) -> None:
        if self.state not in (SendState.DONE, SendState.FAILED):
            self._go("fail")
            self.outcome, self.text = outcome, reason

    @property
    def finished(self) -> bool:
        return self.state in (SendState.DONE, SendState.FAILED)


# --- the receiver's session ---------------------------------------------------------------------


class RecvState(enum.Enum):
    RECEIVING = "receiving"
    VERIFYING = "verifying"  # every chunk held and END seen: the adapter hashes the file
    DONE = "done"
    FAILED = "failed"


R = RecvState
RECEIVER_TRANSITIONS: dict[tuple[RecvState, str], RecvState] = {
    (R.RECEIVING, "complete"): R.VERIFYING,
    (R.RECEIVING, "fail"): R.FAILED,
    (R.VERIFYING, "verified"): R.DONE,
    (R.VERIFYING, "fail"): R.FAILED,
}


@dataclass
class RecvSession:
    """One entry coming in.  The adapter writes the chunks :meth:`on_data` accepts and tells
    :meth:`written` once they are on disk; :meth:`on_end` and :meth:`written` say when to
    verify; :meth:`verified` / :meth:`fail` conclude with the RESULT to send."""

    sid: int
    src: str
    offer: Offer
    held: set[int] = field(default_factory=set)  # verified chunks on disk (or in the OS's hands)
    state: RecvState = RecvState.RECEIVING
    end: End | None = None
    outcome: Outcome | None = None
    text: str = ""
    bad_chunks: int = 0
    duplicates: int = 0
    last_activity: float = 0.0
    existing: bool = False  # the final file is already there (verify only)

    @property
    def nchunks(self) -> int:
        return chunk_count(self.offer.size, self.offer.chunk)

    def _go(self, event: str) -> None:
        nxt = RECEIVER_TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise LocalProtocolError(f"{self.offer.name}: receiver event {event!r} in state {self.state.value}")
        self.state = nxt

    def accept(self) -> bytes:
        return encode_accept(Accept(self.sid, to_ranges(self.held), self.existing))

    def on_data(self, m: Data, sha_ok: bool) -> int | None:
        """The chunk index to write, or None (bad hash, duplicate, out of range, wrong state)."""
        chunk = self.offer.chunk
        if self.state is not RecvState.RECEIVING:
            self.duplicates += 1
            return None
        if m.offset % chunk or m.offset >= max(self.offer.size, 1):
            raise RemoteProtocolError(f"DATA at offset {m.offset} is not a chunk boundary of {self.offer.name}")
        i = m.offset // chunk
        want = min(chunk, self.offer.size - m.offset)
        if len(m.payload) != want:
            raise RemoteProtocolError(f"DATA chunk {i} of {self.offer.name} has {len(m.payload)} bytes, expected {want}")
        if not sha_ok:
            self.bad_chunks += 1
            return None
        if i in self.held or self.existing:  # existing: the file is in place, nothing to write
            self.duplicates += 1
            return None
        return i

    def written(self, i: int) -> bool:
        """Chunk ``i`` is written; True when the file is now ready to verify."""
        self.held.add(i)
        return self._maybe_complete()

    def on_end(self, m: End) -> bool:
        """END received; True when the file is ready to verify now."""
        if m.size != self.offer.size:
            raise RemoteProtocolError(f"END says {m.size} bytes, OFFER said {self.offer.size} for {self.offer.name}")
        if self.state is not RecvState.RECEIVING:
            return False
        self.end = m
        return self._maybe_complete()

    def _maybe_complete(self) -> bool:
        if self.state is RecvState.RECEIVING and self.end is not None and (self.existing or len(self.held) >= self.nchunks):
            self._go("complete")
            return True
        return False

    def verified(self, sha: bytes) -> bytes:
        """The file on disk hashes to ``sha``: the RESULT to send (OK, or VERIFY_FAILED)."""
        assert self.end is not None
        if sha == self.end.sha:
            self._go("verified")
            self.outcome = Outcome.OK
        else:
            self._go("fail")
            self.outcome = Outcome.EXISTS_DIFFERS if self.existing else Outcome.VERIFY_FAILED
            self.text = (f"{self.offer.name}: the file already at the destination has this size and mtime but other content"
                         if self.existing else f"{self.offer.name}: whole-file SHA-256 mismatch; partial file discarded")
        return self.result()

    def fail(self, outcome: Outcome, text: str) -> bytes:
        if self.state in (RecvState.RECEIVING, RecvState.VERIFYING):
            self._go("fail")
        self.outcome, self.text = outcome, text
        return self.result()

    def result(self) -> bytes:
        assert self.outcome is not None
        return encode_result(Result(self.sid, self.outcome, self.text))


class StreamReassembly:
    """Puts a stream's DATA back in order (offsets are byte offsets; chunks vary in size).

    Holds at most ``limit`` bytes out of order: the sender's window bounds what can be
    ahead of the gap, so exceeding it is a protocol violation, not a reason to grow.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.next = 0
        self.held: dict[int, bytes] = {}
        self.held_bytes = 0

    def feed(self, offset: int, payload: bytes | memoryview) -> list[bytes]:
        """In-order pieces ready to write (possibly none)."""
        if offset < self.next or offset in self.held:
            raise RemoteProtocolError(f"stream DATA at offset {offset} repeats bytes already received")
        if offset > self.next:
            if self.held_bytes + len(payload) > self.limit:
                raise RemoteProtocolError(f"stream data more than {self.limit} bytes ahead of offset {self.next}")
            self.held[offset] = bytes(payload)
            self.held_bytes += len(payload)
            return []
        out = [bytes(payload)]
        self.next += len(payload)
        while self.next in self.held:
            piece = self.held.pop(self.next)
            self.held_bytes -= len(piece)
            out.append(piece)
            self.next += len(piece)
        return out
