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

Hello (version 2: ephemeral X25519 + the network's pre-shared key; connector proves first)::

    connector -> HELLO        {conn_type, features, backend, src_nid, dst_nid, incarnation, nonce_c, pub_c}
    acceptor  -> HELLO_REPLY  {incarnation, nonce_a, pub_a}           (or REJECT {status} + reason)
    connector -> AUTH         {mac_c}
    acceptor  -> AUTH_OK      {mac_a}                                 (or REJECT)

Both sides compute ``dh = X25519(own ephemeral, peer's ephemeral)`` and, with ``th`` the
SHA-256 of HELLO body | HELLO_REPLY body | channel binding,
``okm = HKDF-SHA256(ikm = dh | network key, salt = nonce_c | nonce_a, info = "lu2k hello v2" | th)``
split into four 32-byte keys: the connector's and the acceptor's MAC keys, then the
connector->acceptor and acceptor->connector frame keys.  ``mac_c = HMAC(mac key c, "C" | th)``,
``mac_a = HMAC(mac key a, "A" | th)``.  Why this is safe against guessing the key:

* the acceptor hands out no MAC before the connector has proven the key, so probing a
  listener yields nothing to test guesses against;
* the MAC keys depend on the ephemeral DH secret, so a passive eavesdropper who records a
  hello cannot test guesses either (nor decrypt the frames later if the network key leaks:
  forward secrecy);
* only an active attacker answering in the acceptor's place (on-path, or owning the peer's
  address) obtains one ``mac_c`` it can test offline -- which is why the network key must be
  at least 128 random bits (``lu2k keygen psk`` makes 256); guessing such a key is
  infeasible.  On quic with ``ca`` the TLS certificate check stops that attacker first.

The source NID, the incarnations and the nonces are all in ``th``: a finished hello has
proven the peer's NID (:attr:`HelloResult.peer_nid`), and the frame keys (used by
:mod:`lu2k.crypto` after the hello) are fresh per connection and per direction.
``channel_binding`` (quic: the hash of the TLS server certificate) ties the hello to the
TLS session it runs in, so a relay terminating TLS with its own certificate cannot pass it
through.  ``features`` bit 0 says the sender seals frames after the hello; both ends must
agree (a mismatch is refused with a reason).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import AuthenticationError, FrameError, HandshakeError, LocalProtocolError, NidError, Status
from .nid import NID_SIZE, Nid

MAGIC = 0x4B32554C  # b"LU2K" read as little-endian u32
PROTOCOL_VERSION = 2  # 2: X25519 hello, connector proves first, frames sealed after it
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


MAX_PONG_NIDS = 64
# Fixed bodies per type.
HELLO_BODY = struct.Struct(f"<BBH16s{NID_SIZE}s{NID_SIZE}sQ32s32s")  # conn_type, features, max_version, backend, src, dst, incarnation, nonce_c, pub_c
HELLO_REPLY_BODY = struct.Struct("<Q32s32s")  # incarnation, nonce_a, pub_a
AUTH_BODY = struct.Struct("<32s")  # mac_c
AUTH_OK_BODY = struct.Struct("<32s")  # mac_a
EMPTY_BODY = struct.Struct("<")
REJECT_BODY = struct.Struct("<I")  # status; payload = reason text
MSG_BODY = struct.Struct(f"<Q{NID_SIZE}s{NID_SIZE}sIII")  # seq, src, dst, src_portal, dst_portal, payload_crc
# The destination NID and portal of a MSG body alone: what a receiver needs to pick the
# buffer, without unpacking the rest per message.
MSG_BODY_DST = struct.Struct(f"<{8 + NID_SIZE}x{NID_SIZE}s4xI")
ACK_BODY = struct.Struct("<I")  # count; payload = count x ACK_ENTRY
ACK_ENTRY = struct.Struct("<QI4x")  # seq, status
NACK_BODY = struct.Struct("<QI")  # seq, status; payload = reason text
PING_BODY = struct.Struct("<Q")  # token

BODIES: dict[FrameType, struct.Struct] = {
    FrameType.HELLO: HELLO_BODY,
    FrameType.HELLO_REPLY: HELLO_REPLY_BODY,
    FrameType.AUTH: AUTH_BODY,
    FrameType.AUTH_OK: AUTH_OK_BODY,
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
    FrameType.PONG: MAX_PONG_NIDS * NID_SIZE,  # the answering daemon's NIDs (FEATURE_NIDS), for discover
}
MSG_ID_FIELD = struct.Struct("<Q")  # MSG with FLAG_MSG_ID: the application's message id, after MSG_BODY
MAX_HEADER_SIZE = BASE_SIZE + max(max(b.size for b in BODIES.values()), MSG_BODY.size + MSG_ID_FIELD.size)
_TYPES: dict[int, FrameType] = {int(t): t for t in FrameType}  # faster than FrameType(code)
_HEADER_SIZES: dict[FrameType, int] = {t: BASE_SIZE + b.size for t, b in BODIES.items()}
_ZERO_CRC = bytes(4)

FLAG_PAYLOAD_CRC = 0x0001  # MSG: payload_crc field is valid
FLAG_MSG_ID = 0x0002  # MSG: the body is MSG_BODY + MSG_ID_FIELD (the sender's application gave the message an id)
FEATURE_SEALED = 0x01  # HELLO features: this side seals every frame after the hello
FEATURE_MULTIRAIL = 0x02  # HELLO features: the connector's sequence numbers are shared by all its rails to us (lu2k.core.rails)
FEATURE_NIDS = 0x04  # HELLO features: the connector reads a PONG payload listing the acceptor's NIDs (lnetctl discover)

# What a connection may carry before its hello has finished: nothing with a payload a peer
# could inflate, so an unauthenticated peer costs at most one header and a REJECT reason.
HELLO_FRAMES: frozenset[FrameType] = frozenset(
    {FrameType.HELLO, FrameType.HELLO_REPLY, FrameType.AUTH, FrameType.AUTH_OK, FrameType.REJECT}
)


@dataclass(slots=True)
class FrameHeader:
    """A decoded base header plus its type's fixed body (raw, decode with ``fields``)."""

    type: FrameType
    version: int
    flags: int
    payload_len: int
    body: bytes
    token: Any = None  # receive-in-place: the receiver's buffer the payload went into (set by buffer_for)

    def fields(self) -> tuple:  # type: ignore[type-arg]
        return BODIES[self.type].unpack_from(self.body)

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
    magic, _version, ftype, flags, _plen, _crc32 = BASE.unpack(base)
    return _header_size(_check_base(magic, ftype), flags)


def _header_size(t: FrameType, flags: int) -> int:
    size = _HEADER_SIZES[t]
    return size + MSG_ID_FIELD.size if flags & FLAG_MSG_ID and t is FrameType.MSG else size


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
    end = pos + (_HEADER_SIZES[t] if not flags & FLAG_MSG_ID else _header_size(t, flags))
    if len(buf) < end:
        return None
    mv = buf if type(buf) is bytes else memoryview(buf)  # slices of bytes are cheaper than views for a header
    body = bytes(mv[pos + BASE_SIZE : end])
    expect = zlib.crc32(body, zlib.crc32(_ZERO_CRC, zlib.crc32(mv[pos : pos + 12]))) & 0xFFFFFFFF
    if crc != expect:
        raise FrameError(f"header checksum mismatch on {t.name} frame")
    limit = max_payload if t is FrameType.MSG else SMALL_PAYLOAD_LIMIT[t]
    if plen > limit:
        raise FrameError(f"{t.name} frame payload of {plen} bytes exceeds limit {limit}")
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

    ``accept`` limits the frame types (a connection's hello phase uses :data:`HELLO_FRAMES`):
    any other type is a :class:`FrameError` as soon as its header is complete, before a
    byte of its payload is allocated.  :meth:`take_pending` hands the bytes read past the
    last frame to the decoder that replaces this one when the hello is done.
    """

    def __init__(self, max_payload: int, buffer_for: "BufferFor | None" = None, *, accept: frozenset[FrameType] | None = None) -> None:
        if not 0 <= max_payload <= MAX_PAYLOAD_HARD:
            raise LocalProtocolError(f"max_payload {max_payload} outside 0..{MAX_PAYLOAD_HARD}")
        self.max_payload = max_payload
        self._buffer_for = buffer_for
        self._accept = accept
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

    def take_pending(self) -> bytes:
        """Bytes received after the last whole frame (the start of what follows the hello)."""
        if self._payload is not None or self._ready:
            raise LocalProtocolError("decoder replaced in the middle of a frame or with frames not yet taken")
        out = bytes(self._head)
        self._head.clear()
        return out

    def _start(self, header: FrameHeader) -> None:
        if self._accept is not None and header.type not in self._accept:
            raise FrameError(f"{header.type.name} frame before the hello finished")
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

    __slots__ = ("seq", "src_raw", "dst_raw", "src_portal", "dst_portal", "payload_crc", "msg_id")

    def __init__(self, seq: int, src_raw: bytes, dst_raw: bytes, src_portal: int, dst_portal: int, payload_crc: int | None,
                 msg_id: int | None = None) -> None:
        self.seq, self.src_raw, self.dst_raw = seq, src_raw, dst_raw
        self.src_portal, self.dst_portal, self.payload_crc = src_portal, dst_portal, payload_crc
        self.msg_id = msg_id  # the sending application's id for the message, if it gave one

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
    seq: int, src: bytes, dst: bytes, src_portal: int, dst_portal: int, payload: bytes | memoryview, checksum: bool,
    msg_id: int | None = None,
) -> bytes:
    """Header of one MSG frame; ``src``/``dst`` are packed NIDs (the shim already has them so).
    ``msg_id``: the application's id for the message (FLAG_MSG_ID), which the receiver
    remembers so a resend after the sending daemon restarted is not delivered twice."""
    crc = zlib.crc32(payload) & 0xFFFFFFFF if checksum else 0
    body = MSG_BODY.pack(seq, src, dst, src_portal, dst_portal, crc)
    flags = FLAG_PAYLOAD_CRC if checksum else 0
    if msg_id is not None:
        body += MSG_ID_FIELD.pack(msg_id)
        flags |= FLAG_MSG_ID
    return encode_header(FrameType.MSG, body, len(payload), flags)


def decode_msg(header: FrameHeader) -> MsgInfo:
    seq, src, dst, sport, dport, crc = MSG_BODY.unpack_from(header.body)
    flags = header.flags
    msg_id = MSG_ID_FIELD.unpack_from(header.body, MSG_BODY.size)[0] if flags & FLAG_MSG_ID else None
    return MsgInfo(seq, src, dst, sport, dport, crc if flags & FLAG_PAYLOAD_CRC else None, msg_id)


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


def encode_nids(nids: list[bytes]) -> bytes:
    """A PONG payload: packed NIDs (at most :data:`MAX_PONG_NIDS`)."""
    return b"".join(nids[:MAX_PONG_NIDS])


def decode_nids(payload: bytes | memoryview) -> list[Nid]:
    """The NIDs of a PONG payload; FrameError if it is not a whole number of valid NIDs."""
    data = bytes(payload)
    if len(data) % NID_SIZE:
        raise FrameError(f"PONG payload of {len(data)} bytes is not a list of NIDs")
    out = []
    for i in range(0, len(data), NID_SIZE):
        try:
            out.append(Nid.from_bytes(data[i : i + NID_SIZE]))
        except NidError as e:
            raise FrameError(f"PONG payload with a bad NID: {e}") from None
    return out


def encode_reject(status: Status, reason: str) -> bytes:
    return encode_frame(FrameType.REJECT, REJECT_BODY.pack(int(status)), reason.encode()[:MAX_REASON])


# --- hello ---------------------------------------------------------------------------------

_HELLO_LABEL = b"lu2k hello v2"
KEY_SIZE = 32  # each derived key


def _backend_field(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > 16:
        raise LocalProtocolError(f"backend name {name!r} longer than 16 bytes")
    return raw.ljust(16, b"\0")


def _ephemeral() -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a low-order point: the peer is trying to force a known secret
        raise HandshakeError("hello with an invalid ephemeral key") from None


@dataclass(frozen=True, slots=True)
class HelloKeys:
    """The four keys one hello derives (see the module docstring)."""

    mac_c: bytes
    mac_a: bytes
    frames_c2a: bytes
    frames_a2c: bytes
    th: bytes  # transcript hash

    @classmethod
    def derive(cls, network_key: bytes, dh: bytes, hello_body: bytes, reply_body: bytes, binding: bytes) -> "HelloKeys":
        nonce_c = hello_body[-64:-32]
        nonce_a = reply_body[8:40]
        th = hashlib.sha256(hello_body + reply_body + binding).digest()
        okm = HKDF(algorithm=hashes.SHA256(), length=4 * KEY_SIZE, salt=nonce_c + nonce_a, info=_HELLO_LABEL + th).derive(dh + network_key)
        return cls(okm[:32], okm[32:64], okm[64:96], okm[96:], th)

    def proof(self, side: bytes) -> bytes:
        return hmac.new(self.mac_c if side == b"C" else self.mac_a, side + self.th, hashlib.sha256).digest()


@dataclass(slots=True)
class HelloResult:
    """What a finished hello established about the peer.

    ``peer_nid`` is proven (it is in the transcript both MACs cover): the core may refuse a
    MSG frame on this connection whose source claims another NID.  ``tx_key``/``rx_key``
    are this side's frame keys (see :mod:`lu2k.crypto`); ``sealed`` says both ends agreed
    to seal frames with them.
    """

    peer_nid: Nid
    local_nid: Nid
    conn_type: ConnType
    peer_incarnation: int
    peer_version: int
    tx_key: bytes = b""
    rx_key: bytes = b""
    sealed: bool = False
    multirail: bool = False  # the connector numbers its messages per daemon, not per NID (FEATURE_MULTIRAIL)
    pong_nids: bool = False  # the connector wants our NIDs in PONG payloads (FEATURE_NIDS)


def _check_key(key: bytes, peer: Nid) -> None:
    if not key:  # only with peer_keys_only and no entry for this peer: settings require a network key
        raise AuthenticationError(f"no key to authenticate with {peer} (not in peer_keys, and peer_keys_only is set)")


@dataclass
class HelloInitiator:
    """Connector side.  ``start()`` -> bytes; ``receive(frame)`` -> bytes to send or None; ``done``.

    ``sealed`` is this side's wish to seal frames after the hello (``encryption`` setting);
    ``channel_binding`` is what the transport under the hello offers to bind to (quic: the
    TLS server certificate hash), ``b""`` for none.
    """

    key: bytes
    backend: str
    src: Nid
    dst: Nid
    conn_type: ConnType
    incarnation: int
    nonce: bytes = field(default_factory=lambda: os.urandom(32))
    sealed: bool = True
    channel_binding: bytes = b""
    multirail: bool = False
    result: HelloResult | None = None
    _hello_body: bytes = b""
    _keys: HelloKeys | None = None
    _private: X25519PrivateKey | None = None
    _peer_version: int = 0

    def start(self) -> bytes:
        _check_key(self.key, self.dst)
        self._private, public = _ephemeral()
        features = (FEATURE_SEALED if self.sealed else 0) | (FEATURE_MULTIRAIL if self.multirail else 0) | FEATURE_NIDS
        self._hello_body = HELLO_BODY.pack(
            int(self.conn_type), features, PROTOCOL_VERSION, _backend_field(self.backend),
            self.src.to_bytes(), self.dst.to_bytes(), self.incarnation, self.nonce, public,
        )
        return encode_frame(FrameType.HELLO, self._hello_body)

    def receive(self, frame: Frame) -> bytes | None:
        t = frame.header.type
        if t is FrameType.REJECT:
            (status,) = REJECT_BODY.unpack(frame.header.body)
            reason = bytes(frame.payload).decode(errors="replace")
            if status == Status.AUTH_FAILED:  # the short form first: completions carry a bounded reason
                raise AuthenticationError(f"auth failed, wrong network key? {self.dst} says: {reason}")
            raise HandshakeError(f"{self.dst} refused the connection: {reason}")
        if self._keys is None and self._private is not None and t is FrameType.HELLO_REPLY:
            body = frame.header.body
            incarnation, _nonce_a, public_a = HELLO_REPLY_BODY.unpack(body)
            self._keys = HelloKeys.derive(self.key, _dh(self._private, public_a), self._hello_body, body, self.channel_binding)
            self._private = None
            self._peer_version = frame.header.version
            self._incarnation_a = incarnation
            return encode_frame(FrameType.AUTH, AUTH_BODY.pack(self._keys.proof(b"C")))
        if self._keys is not None and self.result is None and t is FrameType.AUTH_OK:
            (mac_a,) = AUTH_OK_BODY.unpack(frame.header.body)
            if not hmac.compare_digest(mac_a, self._keys.proof(b"A")):
                raise AuthenticationError(f"{self.dst} failed to prove the network key")
            k = self._keys
            self.result = HelloResult(self.dst, self.src, self.conn_type, self._incarnation_a, self._peer_version,
                                      k.frames_c2a, k.frames_a2c, self.sealed)
            return None
        raise HandshakeError(f"unexpected {t.name} frame during hello with {self.dst}")

    @property
    def done(self) -> bool:
        return self.result is not None


@dataclass
class HelloResponder:
    """Acceptor side.  Checks the hello against our NIDs/backend and the peer's MAC.

    ``receive(frame)`` returns the bytes to send; raises HandshakeError (after which the
    caller should send :attr:`reject_frame` if set, then close).  Nothing it sends before the
    connector's AUTH verifies depends on the network key.
    """

    key: bytes
    backend: str
    local_nids: frozenset[Nid]
    incarnation: int
    nonce: bytes = field(default_factory=lambda: os.urandom(32))
    sealed: bool = True
    channel_binding: bytes = b""
    # Per-peer keys: a peer listed here must prove its own key instead of the network's, so
    # it cannot claim another listed peer's NID, and removing its entry (with
    # ``peer_keys_only``) revokes it without rekeying the net.
    peer_keys: Mapping[Nid, bytes] = field(default_factory=dict)
    peer_keys_only: bool = False
    result: HelloResult | None = None
    reject_frame: bytes | None = None
    authenticated: bool = False
    _keys: HelloKeys | None = None
    _pending: HelloResult | None = None

    def _refuse(self, status: Status, reason: str, exc: type[HandshakeError] = HandshakeError) -> HandshakeError:
        self.reject_frame = encode_reject(status, reason)
        return exc(reason)

    def receive(self, frame: Frame) -> bytes:
        t = frame.header.type
        if self._pending is None and t is FrameType.HELLO:
            body = frame.header.body
            conn_type, features, _maxv, backend, src, dst, incarnation, _nonce, public_c = HELLO_BODY.unpack(body)
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
            key = self.peer_keys.get(src_nid)
            if key is None:
                if self.peer_keys_only or not self.key:
                    raise self._refuse(Status.AUTH_FAILED, f"no key for peer {src_nid} (peer_keys_only)", AuthenticationError)
                key = self.key
            peer_sealed = bool(features & FEATURE_SEALED)
            if peer_sealed != self.sealed:
                mine = "encrypts frames" if self.sealed else "has encryption: none"
                theirs = "encrypts" if peer_sealed else "has encryption: none"
                raise self._refuse(Status.PROTOCOL, f"encryption mismatch: {src_nid} {theirs}, this net {mine}")
            private, public_a = _ephemeral()
            reply_body = HELLO_REPLY_BODY.pack(self.incarnation, self.nonce, public_a)
            try:
                dh = _dh(private, public_c)
            except HandshakeError as e:
                raise self._refuse(Status.PROTOCOL, str(e)) from None
            self._keys = HelloKeys.derive(key, dh, body, reply_body, self.channel_binding)
            self._pending = HelloResult(src_nid, dst_nid, ctype, incarnation, frame.header.version,
                                        self._keys.frames_a2c, self._keys.frames_c2a, self.sealed,
                                        bool(features & FEATURE_MULTIRAIL), bool(features & FEATURE_NIDS))
            return encode_frame(FrameType.HELLO_REPLY, reply_body)
        if self._pending is not None and self._keys is not None and self.result is None and t is FrameType.AUTH:
            (mac_c,) = AUTH_BODY.unpack(frame.header.body)
            if not hmac.compare_digest(mac_c, self._keys.proof(b"C")):
                raise self._refuse(Status.AUTH_FAILED, f"{self._pending.peer_nid} failed authentication (wrong network key)", AuthenticationError)
            self.result = self._pending
            self.authenticated = True
            return encode_frame(FrameType.AUTH_OK, AUTH_OK_BODY.pack(self._keys.proof(b"A")))
        raise self._refuse(Status.PROTOCOL, f"unexpected {t.name} frame during hello")

    @property
    def done(self) -> bool:
        return self.result is not None
