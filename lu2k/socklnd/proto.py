"""Codecs for the LNet header, the ping info and the acceptor/hello messages.  Pure.

Bytes in, values out, and the reverse; every decoder checks sizes and limits before it
allocates anything and raises a :class:`~lu2k.errors.RemoteProtocolError` subclass whose
message names what was wrong (magic, version, length, type), never a bare ``struct.error``.
The connection state machine that strings these together is :mod:`lu2k.socklnd.conn`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from ..errors import FrameError, HandshakeError, NidError
from ..nid import Nid
from . import idl
from .idl import ConnType, LnetMsgType

# --- the LNet header (lnet_hdr_nid4, little-endian) ---------------------------------------------


@dataclass
class LnetHdr:
    """One LNet message header.  Only the fields of ``type`` are meaningful (``lnet_cmd_hdr``)."""

    type: LnetMsgType
    dest_nid: int
    src_nid: int
    dest_pid: int = idl.LNET_PID_LUSTRE
    src_pid: int = idl.LNET_PID_LUSTRE
    payload_length: int = 0
    wmd: tuple[int, int] = (0, 0)  # ack_wmd (PUT), return_wmd (GET), dst_wmd (ACK, REPLY)
    match_bits: int = 0
    hdr_data: int = 0  # PUT
    ptl_index: int = 0  # PUT, GET
    offset: int = 0  # PUT offset, GET src_offset
    sink_length: int = 0  # GET
    mlength: int = 0  # ACK
    incarnation: int = 0  # HELLO (V1 only)
    hello_type: int = 0  # HELLO (V1 only)

    def pack(self) -> bytes:
        t = self.type
        if t is LnetMsgType.PUT:
            msg = idl.MSG_PUT.pack(*self.wmd, self.match_bits, self.hdr_data, self.ptl_index, self.offset)
        elif t is LnetMsgType.GET:
            msg = idl.MSG_GET.pack(*self.wmd, self.match_bits, self.ptl_index, self.offset, self.sink_length)
        elif t is LnetMsgType.ACK:
            msg = idl.MSG_ACK.pack(*self.wmd, self.match_bits, self.mlength)
        elif t is LnetMsgType.REPLY:
            msg = idl.MSG_REPLY.pack(*self.wmd)
        else:
            msg = idl.MSG_HELLO.pack(self.incarnation, self.hello_type)
        fixed = idl.LNET_HDR_NID4_FIXED.pack(self.dest_nid, self.src_nid, self.dest_pid, self.src_pid, int(t), self.payload_length)
        return fixed + msg.ljust(idl.LNET_HDR_MSG_SIZE, b"\0")

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "LnetHdr":
        if len(data) != idl.LNET_HDR_NID4_SIZE:
            raise FrameError(f"LNet header must be {idl.LNET_HDR_NID4_SIZE} bytes, got {len(data)}")
        dest, src, dpid, spid, mtype, plen = idl.LNET_HDR_NID4_FIXED.unpack_from(data)
        try:
            t = LnetMsgType(mtype)
        except ValueError:
            raise FrameError(f"unknown LNet message type {mtype} (ACK 0, PUT 1, GET 2, REPLY 3, HELLO 4)") from None
        h = cls(t, dest, src, dpid, spid, plen)
        off = idl.LNET_HDR_NID4_FIXED.size
        if t is LnetMsgType.PUT:
            a, b, h.match_bits, h.hdr_data, h.ptl_index, h.offset = idl.MSG_PUT.unpack_from(data, off)
        elif t is LnetMsgType.GET:
            a, b, h.match_bits, h.ptl_index, h.offset, h.sink_length = idl.MSG_GET.unpack_from(data, off)
        elif t is LnetMsgType.ACK:
            a, b, h.match_bits, h.mlength = idl.MSG_ACK.unpack_from(data, off)
        elif t is LnetMsgType.REPLY:
            a, b = idl.MSG_REPLY.unpack_from(data, off)
        else:
            a = b = 0
            h.incarnation, h.hello_type = idl.MSG_HELLO.unpack_from(data, off)
        h.wmd = (a, b)
        return h

    def describe(self) -> str:
        return f"{self.type.name} {idl.nid4_str(self.src_nid)} -> {idl.nid4_str(self.dest_nid)} ({self.payload_length} bytes)"


def peek_route(raw_header: bytes | memoryview) -> tuple[int, int, int]:
    """(dest_nid, src_nid, payload_length) of a packed header without decoding the rest."""
    dest, src, _, _, _, plen = idl.LNET_HDR_NID4_FIXED.unpack_from(raw_header)
    return dest, src, plen


# --- the ping info (lnet_ping_info) -------------------------------------------------------------


@dataclass
class PingInfo:
    """What a node answers to an LNet ping GET and pushes in a discovery PUT."""

    features: int
    nis: list[tuple[int, int]]  # (nid4, status); the first is 0@lo with the sequence number as status
    pid: int = idl.LNET_PID_LUSTRE

    def pack(self) -> bytes:
        head = idl.PING_INFO_HEAD.pack(idl.LNET_PROTO_PING_MAGIC, self.features, self.pid, len(self.nis))
        return head + b"".join(idl.NI_STATUS.pack(nid, status, 0) for nid, status in self.nis)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, max_nis: int = idl.LNET_INTERFACES_MAX_DEFAULT) -> "PingInfo":
        """Decode and validate as ``lnet_ping_info_validate`` does (either byte order)."""
        if len(data) < idl.PING_INFO_HEAD.size:
            raise FrameError(f"ping info truncated: {len(data)} bytes, the header alone is {idl.PING_INFO_HEAD.size}")
        magic = int.from_bytes(data[:4], "little")
        order = "<" if magic == idl.LNET_PROTO_PING_MAGIC else ">" if idl.swap32(magic) == idl.LNET_PROTO_PING_MAGIC else None
        if order is None:
            raise FrameError(f"bad ping info magic {magic:#010x} (expected {idl.LNET_PROTO_PING_MAGIC:#010x})")
        _, features, pid, nnis = struct.unpack_from(order + "IIII", data)
        if not features & idl.PING_FEAT_NI_STATUS:
            raise FrameError(f"ping info without NI status (features {features:#x})")
        if not 1 <= nnis <= max_nis:
            raise FrameError(f"ping info lists {nnis} NIs (1..{max_nis} allowed)")
        need = idl.PING_INFO_HEAD.size + nnis * idl.NI_STATUS.size
        if len(data) < need:
            raise FrameError(f"ping info truncated: {nnis} NIs need {need} bytes, got {len(data)}")
        nis = [struct.unpack_from(order + "QII", data, idl.PING_INFO_HEAD.size + i * idl.NI_STATUS.size)[:2] for i in range(nnis)]
        if nis[0][0] != idl.LNET_NID_LO_0:
            raise FrameError(f"ping info's first NI is {idl.nid4_str(nis[0][0])}, not 0@lo")
        return cls(features, [(int(n), int(s)) for n, s in nis], pid)


# --- acceptor connection request ----------------------------------------------------------------


def encode_connreq(nid4: int, version: int = idl.LNET_PROTO_ACCEPTOR_VERSION) -> bytes:
    """What ``lnet_connect`` writes right after connecting to a peer's acceptor."""
    return idl.CONNREQ_V1.pack(idl.LNET_PROTO_ACCEPTOR_MAGIC, version, nid4)


def acceptor_order(magic: int) -> str:
    """Byte order of a connection request from its first word; HandshakeError if it is not one."""
    if magic == idl.LNET_PROTO_ACCEPTOR_MAGIC:
        return "<"
    if idl.swap32(magic) == idl.LNET_PROTO_ACCEPTOR_MAGIC:
        return ">"
    if idl.LNET_PROTO_TCP_MAGIC in (magic, idl.swap32(magic)):
        kind = "an 'old' socknal/tcpnal"
    elif idl.LNET_PROTO_MAGIC in (magic, idl.swap32(magic)):
        kind = "an LNet version query, not a"
    else:
        kind = "an unrecognised"
    raise HandshakeError(f"bad acceptor magic {magic:#010x}: {kind} connection request (expected {idl.LNET_PROTO_ACCEPTOR_MAGIC:#010x})")


def nid4_of_large(raw: bytes | memoryview) -> int:
    """The u64 of a ``struct lnet_nid`` from a version-2 connection request."""
    try:
        nid = Nid.from_bytes(bytes(raw))
        return idl.nid4_of(nid)
    except NidError as e:
        raise HandshakeError(f"connection request for an unusable NID: {e}") from None


def source_port_allowed(port: int, secure: bool) -> bool:
    """The acceptor's rule: with secure accept, only privileged source ports (<= 1023)."""
    return not secure or port <= idl.LNET_ACCEPTOR_MAX_RESERVED_PORT


# --- socklnd hello (V2/V3: ksock_hello_msg_nid4) ----------------------------------------------------


@dataclass
class Hello:
    version: int
    src_nid: int
    dst_nid: int
    src_pid: int
    dst_pid: int
    src_incarnation: int
    dst_incarnation: int
    ctype: ConnType
    ips: list[int] = field(default_factory=list)

    def pack(self) -> bytes:
        head = idl.HELLO_HEAD.pack(idl.LNET_PROTO_MAGIC, self.version)
        rest = idl.HELLO_REST.pack(self.src_nid, self.dst_nid, self.src_pid, self.dst_pid, self.src_incarnation,
                                   self.dst_incarnation, self.ctype & 0xFFFFFFFF, len(self.ips))
        return head + rest + b"".join(ip.to_bytes(4, "little") for ip in self.ips)


def hello_order(magic: int) -> str:
    if magic == idl.LNET_PROTO_MAGIC:
        return "<"
    if idl.swap32(magic) == idl.LNET_PROTO_MAGIC:
        return ">"
    if idl.LNET_PROTO_TCP_MAGIC in (magic, idl.swap32(magic)):
        raise HandshakeError(f"socklnd protocol V1 hello (magic {magic:#010x}) is not supported; V2 and V3 are")
    raise HandshakeError(f"bad hello magic {magic:#010x} (expected {idl.LNET_PROTO_MAGIC:#010x})")


def check_hello_version(version: int) -> None:
    if version not in idl.SUPPORTED_VERSIONS:
        raise HandshakeError(f"socklnd hello version {version} not supported ({' or '.join(map(str, idl.SUPPORTED_VERSIONS))} expected)")


def decode_hello_rest(order: str, version: int, rest: bytes | memoryview) -> Hello:
    """The 48 bytes after magic and version; the IP list (``ips``) is read by the caller."""
    src, dst, spid, dpid, sinc, dinc, ctype, nips = struct.unpack(order + "QQIIQQII", rest)
    if src in (idl.LNET_NID_ANY, 0):
        raise HandshakeError("hello without a source NID")
    signed = ctype - (1 << 32) if ctype & 0x80000000 else ctype
    try:
        ct = ConnType(signed)
    except ValueError:
        raise HandshakeError(f"hello with unknown connection type {signed}") from None
    if nips > idl.LNET_INTERFACES_NUM:
        raise HandshakeError(f"hello lists {nips} IPs (at most {idl.LNET_INTERFACES_NUM})")
    return Hello(version, src, dst, spid, dpid, sinc, dinc, ct, [0] * nips)


# --- ksock message header --------------------------------------------------------------------


def encode_ksock_hdr(mtype: idl.KsockMsgType, csum: int = 0, zc_req: int = 0, zc_ack: int = 0) -> bytes:
    return idl.KSOCK_MSG_HDR.pack(int(mtype), csum, zc_req, zc_ack)


def encode_noop(zc_ack: int = idl.SOCKNAL_KEEPALIVE_PING, zc_req: int = 0) -> bytes:
    """A NOOP: a keepalive (cookie 1) or the ZC-ACK of a payload the sender holds."""
    return encode_ksock_hdr(idl.KsockMsgType.NOOP, 0, zc_req, zc_ack)


def ksock_csum(*parts: bytes | bytearray | memoryview) -> int:
    """The kernel's V2 checksum: ``crc32_le(~0, ...)`` with no final inversion, never 0."""
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return crc ^ 0xFFFFFFFF  # (a sum of 0 reads as "no checksum", as in the kernel)


def encode_lnet(raw_header: bytes, payload_len: int, *, checksum_payload: bytes | memoryview | None = None) -> bytes:
    """The ksock header + LNet header of an LNET message (payload goes after it).

    With ``checksum_payload`` the header carries the V2 checksum over header and payload.
    """
    if checksum_payload is None:
        return encode_ksock_hdr(idl.KsockMsgType.LNET) + raw_header
    plain = encode_ksock_hdr(idl.KsockMsgType.LNET) + raw_header
    csum = ksock_csum(plain, checksum_payload)
    return encode_ksock_hdr(idl.KsockMsgType.LNET, csum) + raw_header


__all__ = [
    "Hello", "LnetHdr", "PingInfo", "acceptor_order", "check_hello_version", "decode_hello_rest", "encode_connreq",
    "encode_ksock_hdr", "encode_lnet", "encode_noop", "hello_order", "ksock_csum", "nid4_of_large", "peek_route",
    "source_port_allowed",
]
