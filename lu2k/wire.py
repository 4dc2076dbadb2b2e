"""lu2k's wire protocol: frames and the authenticated hello.  Pure (sans-I/O).

Frame layout (little-endian).  Every frame starts with the 16-byte base header::

    u32 magic        'LU2K' -- catches desynchronised streams at once
    u8  version      protocol version of the sender
    u8  type         FrameType
    u16 flags        per-type flags
    u32 payload_len  bytes of payload after the type's fixed body
    u32 header_crc   CRC32 of the base header (with this field zero) and the fixed body

then the type's fixed body (its size is fixed by the type: a frame whose body would not
match is corrupt), then ``payload_len`` bytes of payload.  Hard limits are checked before
any payload is read, so a hostile length never makes us allocate.

Connections carry messages one way (the connector sends MSG frames); the reverse
direction carries only the hello reply and ACK/NACK frames for those messages.

Hello (HMAC-SHA256 challenge on the network's pre-shared key)::

    connector -> HELLO        {conn_type, backend, src_nid, dst_nid, incarnation, nonce_c}
    acceptor  -> HELLO_REPLY  {incarnation, nonce_a, mac_a = H(key, "A" | hello | nonce_a)}
                 (or REJECT {status} + reason)
    connector -> AUTH         {mac_c = H(key, "C" | hello | reply-without-mac)}
    acceptor  -> AUTH_OK      (or REJECT)

Both sides prove the key; nonces from both sides stop replays.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
import zlib
from dataclasses import dataclass, field

from .errors import AuthenticationError, FrameError, HandshakeError, LocalProtocolError, Status
from .nid import NID_SIZE, Nid, NidError

MAGIC = 0x4B32554C  # b"LU2K" read as little-endian u32
PROTOCOL_VERSION = 1
MAX_PAYLOAD_HARD = 64 << 20  # no configuration may allow more than this
MAX_REASON = 256

BASE = struct.Struct("<IBBHII")
BASE_SIZE = BASE.size  # 16


class FrameType(enum.IntEnum):
    HELLO = 1
    HELLO_REPLY = 2
    AUTH = 3
    AUTH_OK = 4
    REJECT = 5
    MSG = 6
    ACK = 7
    NACK = 8
    PING = 9
    PONG = 10


class ConnType(enum.IntEnum):
    """socklnd's connection types: one connection, or small messages apart from bulk."""

    ANY = 0
    CONTROL = 1
    BULK = 2


# Fixed bodies per type.
HELLO_BODY = struct.Struct(f"<BxH16s{NID_SIZE}s{NID_SIZE}sQ32s")  # conn_type, max_version, backend, src, dst, incarnation, nonce
HELLO_REPLY_BODY = struct.Struct("<Q32s32s")  # incarnation, nonce_a, mac_a
AUTH_BODY = struct.Struct("<32s")  # mac_c
EMPTY_BODY = struct.Struct("<")
REJECT_BODY = struct.Struct("<I")  # status; payload = reason text
MSG_BODY = struct.Struct(f"<Q{NID_SIZE}s{NID_SIZE}sIII")  # seq, src, dst, src_portal, dst_portal, payload_crc
ACK_BODY = struct.Struct("<I")  # count; payload = count x ACK_ENTRY
ACK_ENTRY = struct.Struct("<QI4x")  # seq, status
NACK_BODY = struct.Struct("<QI")  # seq, status; payload = reason text
PING_BODY = struct.Struct("<Q")  # token

BODIES: dict[FrameType, struct.Struct] = {
    FrameType.HELLO: HELLO_BODY,
    FrameType.HELLO_REPLY: HELLO_REPLY_BODY,
    FrameType.AUTH: AUTH_BODY,
    FrameType.AUTH_OK: EMPTY_BODY,
    FrameType.REJECT: REJECT_BODY,
    FrameType.MSG: MSG_BODY,
    FrameType.ACK: ACK_BODY,
    FrameType.NACK: NACK_BODY,
    FrameType.PING: PING_BODY,
    FrameType.PONG: PING_BODY,
}
# Payload limits for the frame types that are not messages.
SMALL_PAYLOAD_LIMIT: dict[FrameType, int] = {
    FrameType.HELLO: 0,
    FrameType.HELLO_REPLY: 0,
    FrameType.AUTH: 0,
    FrameType.AUTH_OK: 0,
    FrameType.REJECT: MAX_REASON,
    FrameType.ACK: 4096 * ACK_ENTRY.size,
    FrameType.NACK: MAX_REASON,
    FrameType.PING: 0,
    FrameType.PONG: 0,
}
MAX_HEADER_SIZE = BASE_SIZE + max(b.size for b in BODIES.values())
_TYPES: dict[int, FrameType] = {int(t): t for t in FrameType}  # faster than FrameType(code)
_HEADER_SIZES: dict[FrameType, int] = {t: BASE_SIZE + b.size for t, b in BODIES.items()}
_ZERO_CRC = bytes(4)

FLAG_PAYLOAD_CRC = 0x0001  # MSG: payload_crc field is valid


@dataclass(slots=True)
class FrameHeader:
    """A decoded base header plus its type's fixed body (raw, decode with ``fields``)."""

    type: FrameType
    version: int
    flags: int
    payload_len: int
    body: bytes
    token: object = None  # receive-in-place: the receiver's buffer the payload went into (set by buffer_for)

    def fields(self) -> tuple:  # type: ignore[type-arg]
        return BODIES[self.type].unpack(self.body)

    @property
    def size(self) -> int:
        return BASE_SIZE + len(self.body)


@dataclass(slots=True)
class Frame:
    header: FrameHeader
    payload: memoryview | bytes = b""


def _crc(base: bytes, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(base)) & 0xFFFFFFFF


def encode_header(ftype: FrameType, body: bytes, payload_len: int, flags: int = 0, version: int = PROTOCOL_VERSION) -> bytes:
    """Base header + fixed body, ready to be followed by ``payload_len`` bytes."""
    base = BASE.pack(MAGIC, version, ftype, flags, payload_len, 0)
    crc = _crc(base, body)
    return BASE.pack(MAGIC, version, ftype, flags, payload_len, crc) + body


def encode_frame(ftype: FrameType, body: bytes = b"", payload: bytes = b"", flags: int = 0) -> bytes:
    return encode_header(ftype, body, len(payload), flags) + payload


def peek_header_size(base: bytes | memoryview) -> int:
    """Validate a 16-byte base header and return the size of base + fixed body."""
    magic, _version, ftype, _flags, _plen, _crc32 = BASE.unpack(base)
    return _HEADER_SIZES[_check_base(magic, ftype)]


def _check_base(magic: int, ftype: int) -> FrameType:
    if magic != MAGIC:
        raise FrameError(f"bad magic 0x{magic:08x} (stream out of sync or not lu2k)")
    t = _TYPES.get(ftype)
    if t is None:
        raise FrameError(f"unknown frame type {ftype}")
    return t


def _decode_at(buf: bytes | bytearray | memoryview, pos: int, max_payload: int) -> FrameHeader | None:
    """Decode the header starting at ``pos`` if it is complete in ``buf``, else None."""
    if len(buf) - pos < BASE_SIZE:
        return None
    magic, version, ftype, flags, plen, crc = BASE.unpack_from(buf, pos)
    t = _check_base(magic, ftype)
    end = pos + _HEADER_SIZES[t]
    if len(buf) < end:
        return None
    mv = memoryview(buf)
    expect = zlib.crc32(mv[pos + BASE_SIZE : end], zlib.crc32(_ZERO_CRC, zlib.crc32(mv[pos : pos + 12]))) & 0xFFFFFFFF
    if crc != expect:
        raise FrameError(f"header checksum mismatch on {t.name} frame")
    limit = max_payload if t is FrameType.MSG else SMALL_PAYLOAD_LIMIT[t]
    if plen > limit:
        raise FrameError(f"{t.name} frame payload of {plen} bytes exceeds limit {limit}")
    body = bytes(mv[pos + BASE_SIZE : end])
    if t is FrameType.ACK:
        (count,) = ACK_BODY.unpack(body)
        if plen != count * ACK_ENTRY.size:
            raise FrameError(f"ACK frame announces {count} entries but carries {plen} bytes")
    return FrameHeader(t, version, flags, plen, body)


def decode_header(data: bytes | memoryview, max_payload: int) -> FrameHeader:
    """Decode base header + body (exactly ``peek_header_size`` bytes) and check the limits."""
    if len(data) < BASE_SIZE:
        raise FrameError(f"truncated header ({len(data)} bytes)")
    size = peek_header_size(data[:BASE_SIZE])
    if len(data) != size:
        raise FrameError(f"header of {len(data)} bytes, type needs {size}")
    header = _decode_at(data, 0, max_payload)
    assert header is not None
    return header


class FrameDecoder:
    """Incremental decoder for stream transports, with an in-place payload path.

    Feed bytes with :meth:`feed`.  When a header is complete, the decoder asks its
    ``buffer_for`` callback (given the header) for the memoryview the payload goes into,
    so a stream adapter can ``recv_into`` :meth:`payload_target` directly: large payloads
    go from the socket straight into shared memory.  ``buffer_for`` may return ``None`` to
    let the decoder keep the payload in a private bytearray.
    """

    def __init__(self, max_payload: int, buffer_for: "BufferFor | None" = None) -> None:
        if not 0 <= max_payload <= MAX_PAYLOAD_HARD:
            raise LocalProtocolError(f"max_payload {max_payload} outside 0..{MAX_PAYLOAD_HARD}")
        self.max_payload = max_payload
        self._buffer_for = buffer_for
        self._head = bytearray()
        self._need = BASE_SIZE
        self._header: FrameHeader | None = None
        self._payload: memoryview | None = None
        self._filled = 0
        self._ready: list[Frame] = []

    @property
    def in_payload(self) -> bool:
        return self._payload is not None

    def payload_target(self) -> memoryview | None:
        """Where the rest of the current payload must go, for a direct ``recv_into``."""
        if self._payload is None:
            return None
        return self._payload[self._filled :]

    def payload_filled(self, n: int) -> None:
        """``n`` bytes were written straight into :meth:`payload_target`."""
        assert self._payload is not None and self._header is not None
        self._filled += n
        if self._filled == len(self._payload):
            self._finish_payload()

    def _finish_payload(self) -> None:
        assert self._header is not None and self._payload is not None
        self._ready.append(Frame(self._header, self._payload))
        self._header, self._payload, self._filled = None, None, 0
        self._need = BASE_SIZE

    def _start(self, header: FrameHeader) -> None:
        if header.payload_len == 0:
            self._ready.append(Frame(header, b""))
            self._need = BASE_SIZE
            return
        target = self._buffer_for(header) if self._buffer_for else None
        if target is None:
            target = memoryview(bytearray(header.payload_len))
        elif len(target) != header.payload_len:
            raise LocalProtocolError("buffer_for returned a buffer of the wrong size")
        self._header, self._payload, self._filled = header, target, 0

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        pos, n = 0, len(view)
        if self._head:  # a header split across reads: join just this bit
            self._head += view
            buf: bytes | memoryview = bytes(self._head)
            self._head.clear()
            n = len(buf)
        else:
            buf = view
        while pos < n:
            if self._payload is not None:
                take = min(n - pos, len(self._payload) - self._filled)
                self._payload[self._filled : self._filled + take] = buf[pos : pos + take]
                pos += take
                self.payload_filled(take)
                continue
            header = _decode_at(buf, pos, self.max_payload)
            if header is None:
                self._head += buf[pos:]
                return
            pos += header.size
            self._start(header)

    def frames(self) -> list[Frame]:
        out, self._ready = self._ready, []
        return out

    def at_boundary(self) -> bool:
        """True between frames: a close here is clean, anywhere else it is truncation."""
        return not self._head and self._payload is None


from collections.abc import Callable  # noqa: E402  (after the class that documents it)

BufferFor = Callable[[FrameHeader], "memoryview | None"]


# --- message frames ----------------------------------------------------------------------


class MsgInfo:
    """A MSG frame's fixed body.  NIDs stay packed (what the engine and shim use); the
    :class:`Nid` forms are decoded only when asked for."""

    __slots__ = ("seq", "src_raw", "dst_raw", "src_portal", "dst_portal", "payload_crc")

    def __init__(self, seq: int, src_raw: bytes, dst_raw: bytes, src_portal: int, dst_portal: int, payload_crc: int | None) -> None:
        self.seq, self.src_raw, self.dst_raw = seq, src_raw, dst_raw
        self.src_portal, self.dst_portal, self.payload_crc = src_portal, dst_portal, payload_crc

    @property
    def src(self) -> Nid:
        return _unpack_nid(self.src_raw)

    @property
    def dst(self) -> Nid:
        return _unpack_nid(self.dst_raw)


def _unpack_nid(raw: bytes) -> Nid:
    try:
        return Nid.from_bytes(raw)
    except NidError as e:
        raise FrameError(f"MSG frame with bad NID: {e}") from None


def encode_msg_header(
    seq: int, src: bytes, dst: bytes, src_portal: int, dst_portal: int, payload: bytes | memoryview, checksum: bool
) -> bytes:
    """Header of one MSG frame; ``src``/``dst`` are packed NIDs (the shim already has them so)."""
    crc = zlib.crc32(payload) & 0xFFFFFFFF if checksum else 0
    body = MSG_BODY.pack(seq, src, dst, src_portal, dst_portal, crc)
    return encode_header(FrameType.MSG, body, len(payload), FLAG_PAYLOAD_CRC if checksum else 0)


def decode_msg(header: FrameHeader) -> MsgInfo:
    seq, src, dst, sport, dport, crc = MSG_BODY.unpack(header.body)
    return MsgInfo(seq, src, dst, sport, dport, crc if header.flags & FLAG_PAYLOAD_CRC else None)


def check_payload(info: MsgInfo, payload: bytes | memoryview) -> None:
    if info.payload_crc is not None and zlib.crc32(payload) & 0xFFFFFFFF != info.payload_crc:
        raise FrameError(f"payload checksum mismatch on message seq {info.seq} from {info.src}")


def encode_acks(entries: list[tuple[int, int]]) -> bytes:
    payload = b"".join(ACK_ENTRY.pack(seq, status) for seq, status in entries)
    return encode_frame(FrameType.ACK, ACK_BODY.pack(len(entries)), payload)


def decode_acks(frame: Frame) -> list[tuple[int, int]]:
    return [(s, st) for s, st in ACK_ENTRY.iter_unpack(bytes(frame.payload))]


def encode_nack(seq: int, status: Status, reason: str) -> bytes:
    text = reason.encode()[:MAX_REASON]
    return encode_frame(FrameType.NACK, NACK_BODY.pack(seq, int(status)), text)


def decode_nack(frame: Frame) -> tuple[int, Status, str]:
    seq, status = NACK_BODY.unpack(frame.header.body)
    return seq, Status.from_code(status), bytes(frame.payload).decode(errors="replace")


def encode_reject(status: Status, reason: str) -> bytes:
    return encode_frame(FrameType.REJECT, REJECT_BODY.pack(int(status)), reason.encode()[:MAX_REASON])


# --- hello ---------------------------------------------------------------------------------


def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, label + b"".join(parts), hashlib.sha256).digest()


def _backend_field(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > 16:
        raise LocalProtocolError(f"backend name {name!r} longer than 16 bytes")
    return raw.ljust(16, b"\0")


@dataclass(slots=True)
class HelloResult:
    """What a finished hello established about the peer."""

    peer_nid: Nid
    local_nid: Nid
    conn_type: ConnType
    peer_incarnation: int
    peer_version: int


@dataclass
class HelloInitiator:
    """Connector side.  ``start()`` -> bytes; ``receive(frame)`` -> bytes to send or None; ``done``."""

    key: bytes
    backend: str
    src: Nid
    dst: Nid
    conn_type: ConnType
    incarnation: int
    nonce: bytes = field(default_factory=lambda: os.urandom(32))
    result: HelloResult | None = None
    _hello_body: bytes = b""

    def start(self) -> bytes:
        self._hello_body = HELLO_BODY.pack(
            int(self.conn_type), PROTOCOL_VERSION, _backend_field(self.backend),
            self.src.to_bytes(), self.dst.to_bytes(), self.incarnation, self.nonce,
        )
        return encode_frame(FrameType.HELLO, self._hello_body)

    def receive(self, frame: Frame) -> bytes | None:
        t = frame.header.type
        if t is FrameType.REJECT:
            (status,) = REJECT_BODY.unpack(frame.header.body)
            reason = bytes(frame.payload).decode(errors="replace")
            err = AuthenticationError if status == Status.AUTH_FAILED else HandshakeError
            raise err(f"{self.dst} refused the connection: {reason}")
        if self.result is None and t is FrameType.HELLO_REPLY:
            incarnation, nonce_a, mac_a = HELLO_REPLY_BODY.unpack(frame.header.body)
            expect = _mac(self.key, b"A", self._hello_body, nonce_a, struct.pack("<Q", incarnation))
            if not hmac.compare_digest(mac_a, expect):
                raise AuthenticationError(f"{self.dst} failed to prove the network key")
            self.result = HelloResult(self.dst, self.src, self.conn_type, incarnation, frame.header.version)
            mac_c = _mac(self.key, b"C", self._hello_body, nonce_a, struct.pack("<Q", incarnation))
            return encode_frame(FrameType.AUTH, AUTH_BODY.pack(mac_c))
        if self.result is not None and t is FrameType.AUTH_OK:
            return None
        raise HandshakeError(f"unexpected {t.name} frame during hello with {self.dst}")

    @property
    def done(self) -> bool:
        return self.result is not None


@dataclass
class HelloResponder:
    """Acceptor side.  Checks the hello against our NIDs/backend and the peer's MAC.

    ``receive(frame)`` returns the bytes to send; raises HandshakeError (after which the
    caller should send :attr:`reject_frame` if set, then close).
    """

    key: bytes
    backend: str
    local_nids: frozenset[Nid]
    incarnation: int
    nonce: bytes = field(default_factory=lambda: os.urandom(32))
    result: HelloResult | None = None
    reject_frame: bytes | None = None
    authenticated: bool = False
    _transcript: bytes = b""
    _pending: HelloResult | None = None

    def _refuse(self, status: Status, reason: str, exc: type[HandshakeError] = HandshakeError) -> HandshakeError:
        self.reject_frame = encode_reject(status, reason)
        return exc(reason)

    def receive(self, frame: Frame) -> bytes:
        t = frame.header.type
        if self._pending is None and t is FrameType.HELLO:
            conn_type, _maxv, backend, src, dst, incarnation, _nonce = HELLO_BODY.unpack(frame.header.body)
            if frame.header.version != PROTOCOL_VERSION:
                raise self._refuse(Status.PROTOCOL, f"protocol version {frame.header.version} not supported (this daemon speaks {PROTOCOL_VERSION})")
            try:
                src_nid, dst_nid = Nid.from_bytes(src), Nid.from_bytes(dst)
                ctype = ConnType(conn_type)
            except (NidError, ValueError) as e:
                raise self._refuse(Status.PROTOCOL, f"malformed hello: {e}") from None
            name = backend.rstrip(b"\0").decode(errors="replace")
            if name != self.backend:
                raise self._refuse(Status.PROTOCOL, f"backend mismatch: peer {src_nid} uses {name!r}, this network uses {self.backend!r}")
            if dst_nid not in self.local_nids:
                raise self._refuse(Status.NO_ROUTE, f"hello for {dst_nid}, which is not a NID of this daemon")
            if src_nid.net != dst_nid.net:
                raise self._refuse(Status.PROTOCOL, f"hello from {src_nid} for {dst_nid}: nets differ")
            reply_body_prefix = struct.pack("<Q", self.incarnation)
            self._transcript = frame.header.body
            mac_a = _mac(self.key, b"A", self._transcript, self.nonce, reply_body_prefix)
            self._pending = HelloResult(src_nid, dst_nid, ctype, incarnation, frame.header.version)
            return encode_frame(FrameType.HELLO_REPLY, HELLO_REPLY_BODY.pack(self.incarnation, self.nonce, mac_a))
        if self._pending is not None and self.result is None and t is FrameType.AUTH:
            (mac_c,) = AUTH_BODY.unpack(frame.header.body)
            expect = _mac(self.key, b"C", self._transcript, self.nonce, struct.pack("<Q", self.incarnation))
            if not hmac.compare_digest(mac_c, expect):
                raise self._refuse(Status.AUTH_FAILED, f"{self._pending.peer_nid} failed authentication (wrong network key)", AuthenticationError)
            self.result = self._pending
            return encode_frame(FrameType.AUTH_OK)
        raise self._refuse(Status.PROTOCOL, f"unexpected {t.name} frame during hello")

    @property
    def done(self) -> bool:
        return self.result is not None
