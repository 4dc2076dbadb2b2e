"""One ksocklnd connection as a state machine.  Pure (sans-I/O): bytes in, events and bytes out.

Rules (everything that moves the state lives in this file):

1. A *passive* connection (one we accepted on the acceptor port) first reads LNet's
   acceptor connection request (``lnet_accept``): magic ``0xacce7100`` in either byte order,
   version 1 (a u64 NID) or 2 (a ``struct lnet_nid``), and the NID the connector wants,
   which must be one of ours.  An LNet-magic or unknown-version request is answered with our
   magic and version 1, then refused, as the kernel does.
2. Then the socklnd hello (``ksocknal_recv_hello``): the passive side reads the peer's hello
   and answers with its own (same protocol version, the inverted connection type, the
   incarnation of this LND instance); the *active* side sends the connection request and its
   hello at once and reads the answer.  V2 and V3 are spoken; an unsupported version gets
   our V3 hello with type NONE, then the connection closes (the kernel's "tell peer my
   protocol").  V1 and V4 (IPv6, large NIDs) are refused with that reason.
3. Established: the stream is ``ksock_msg``s.  A NOOP is a keepalive (ZC-ACK cookie 1) or a
   ZC-ACK; an LNET message is a 72-byte LNet header and ``payload_length`` bytes, checked
   against ``max_payload`` *before* anything is allocated.  A message whose ZC-request
   cookie is set is answered with a NOOP carrying that cookie as soon as its payload is in:
   a kernel sender holds every payload of ``zc_min_payload`` (16 KiB) or more until then.
4. Anything else -- wrong magic, wrong version, truncated or inconsistent hello, unknown
   message type, absurd length, bad V2 checksum, a ZC-ACK we never asked for -- raises a
   :class:`~lu2k.errors.RemoteProtocolError` naming it; the connection is then CLOSED and
   every later call raises the same error.  Bytes queued before the error (a refusal hello)
   can still be sent.

Checksums: the kernel only sends them with V2 (``ksocknal_lib_csum_tx`` asserts V2); we verify
them there and ignore the field with V3, where the kernel itself checks only page payloads.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ..errors import FrameError, HandshakeError, LocalProtocolError, RemoteProtocolError
from . import idl, proto
from .idl import ConnType, KsockMsgType
from .proto import Hello, LnetHdr


class State(enum.Enum):
    CONNREQ = "connreq"  # passive, reading the acceptor connection request
    HELLO = "hello"  # reading the peer's hello
    ESTABLISHED = "established"  # exchanging ksock messages
    CLOSED = "closed"  # after a protocol error or close()


class Rx(enum.Enum):
    """What the next bytes of the stream are."""

    CONNREQ_HEAD = "connreq magic+version"
    CONNREQ_NID = "connreq nid"
    HELLO_HEAD = "hello magic+version"
    HELLO_REST = "hello body"
    HELLO_IPS = "hello IP list"
    KSM_HDR = "ksock message header"
    LNET_HDR = "LNet header"
    PAYLOAD = "LNet payload"


# Which reads each state may be in; the handlers below move between them.
STATE_READS: dict[State, frozenset[Rx]] = {
    State.CONNREQ: frozenset({Rx.CONNREQ_HEAD, Rx.CONNREQ_NID}),
    State.HELLO: frozenset({Rx.HELLO_HEAD, Rx.HELLO_REST, Rx.HELLO_IPS}),
    State.ESTABLISHED: frozenset({Rx.KSM_HDR, Rx.LNET_HDR, Rx.PAYLOAD}),
    State.CLOSED: frozenset(),
}


@dataclass(frozen=True)
class ConnConfig:
    local_nids: frozenset[int]  # the nid4s of ours a peer may ask for
    incarnation: int  # of this LND instance; a new one tells peers we restarted
    max_payload: int = idl.LNET_MTU
    version: int = idl.KSOCK_PROTO_V3  # what an active connection offers
    pid: int = idl.LNET_PID_LUSTRE
    send_checksums: bool = False  # V2 only, as in the kernel (enable_csum)


@dataclass(frozen=True)
class Established:
    local_nid: int
    peer_nid: int
    peer_pid: int
    incarnation: int  # the peer's
    ctype: ConnType  # from our side
    version: int


@dataclass
class LnetReceived:
    hdr: LnetHdr
    wire: bytearray  # the 72-byte LNet header as received, then the payload: forwarded untouched

    @property
    def raw_header(self) -> bytes:
        return bytes(self.wire[: idl.LNET_HDR_NID4_SIZE])

    @property
    def payload(self) -> memoryview:
        return memoryview(self.wire)[idl.LNET_HDR_NID4_SIZE :]


@dataclass(frozen=True)
class Keepalive:
    pass


@dataclass(frozen=True)
class ZcAcked:
    cookies: frozenset[int]  # the ZC requests of ours the peer acknowledged


Event = Established | LnetReceived | Keepalive | ZcAcked


@dataclass
class ConnStats:
    rx_msgs: int = 0
    rx_bytes: int = 0
    tx_msgs: int = 0
    tx_bytes: int = 0
    noops_rx: int = 0
    zc_acks_sent: int = 0


class KsockConnection:
    """Drive with :meth:`receive_data`; collect :meth:`next_event` and :meth:`data_to_send`."""

    def __init__(self, config: ConnConfig, *, active: bool, local_nid: int = 0, peer_nid: int = 0,
                 ctype: ConnType = ConnType.ANY) -> None:
        self.config = config
        self.active = active
        self.local_nid, self.peer_nid, self.ctype = local_nid, peer_nid, ctype
        self.version = config.version
        self.peer_pid = 0
        self.peer_incarnation = 0
        self.error: RemoteProtocolError | None = None
        self.stats = ConnStats()
        self._order = "<"  # the peer's byte order (hello magic decides)
        self._out: list[bytes | memoryview] = []
        self._events: list[Event] = []
        self._head = bytearray()
        self._hello: Hello | None = None
        self._ksm: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._ksm_raw = b""
        self._hdr: LnetHdr | None = None
        self._payload: bytearray | None = None  # header + payload of the message being read
        self._filled = 0
        self._zc_pending: set[int] = set()
        self._zc_next = idl.SOCKNAL_KEEPALIVE_PING + 1
        if active:
            if config.version not in idl.SUPPORTED_VERSIONS:
                raise LocalProtocolError(f"cannot offer socklnd version {config.version}")
            if ctype is ConnType.NONE or (config.version >= idl.KSOCK_PROTO_V3 and ctype is ConnType.ANY):
                raise LocalProtocolError(f"an active V{config.version} connection needs a CONTROL/BULK type, not {ctype.name}")
            self.state = State.HELLO
            self._rx, self._need = Rx.HELLO_HEAD, idl.HELLO_HEAD.size
            self._out.append(proto.encode_connreq(peer_nid))
            self._out.append(self._my_hello(peer_nid, 0, 0, ctype).pack())
        else:
            self.state = State.CONNREQ
            self._rx, self._need = Rx.CONNREQ_HEAD, idl.CONNREQ_HEAD.size

    # -- output --------------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes | memoryview]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None

    def send_lnet(self, raw_header: bytes, payload: bytes | memoryview = b"", *, zero_copy: bool = False) -> int:
        """Queue one LNet message (header as packed, payload after it).

        With ``zero_copy`` the message carries a ZC request cookie, as a kernel sender marks
        payloads of 16 KiB or more; the cookie is returned and a :class:`ZcAcked` event
        reports its acknowledgement.  Otherwise returns 0.
        """
        self._check_open()
        if self.state is not State.ESTABLISHED:
            raise LocalProtocolError(f"cannot send on a connection in state {self.state.value}")
        if len(raw_header) != idl.LNET_HDR_NID4_SIZE:
            raise LocalProtocolError(f"LNet header must be {idl.LNET_HDR_NID4_SIZE} bytes")
        cookie = 0
        if zero_copy:
            cookie, self._zc_next = self._zc_next, self._zc_next + 1
            self._zc_pending.add(cookie)
        csum_over = payload if (self.config.send_checksums and self.version == idl.KSOCK_PROTO_V2) else None
        if cookie:
            head = proto.encode_ksock_hdr(KsockMsgType.LNET, 0, cookie) + raw_header
            if csum_over is not None:
                csum = proto.ksock_csum(head, csum_over)
                head = proto.encode_ksock_hdr(KsockMsgType.LNET, csum, cookie) + raw_header
            self._out.append(head)
        else:
            self._out.append(proto.encode_lnet(raw_header, len(payload), checksum_payload=csum_over))
        if len(payload):
            self._out.append(payload)
        self.stats.tx_msgs += 1
        self.stats.tx_bytes += len(payload)
        return cookie

    def send_keepalive(self) -> None:
        """V3 keepalive NOOP (the kernel takes cookie 1 as a ping only from V3 peers)."""
        self._check_open()
        if self.state is State.ESTABLISHED and self.version >= idl.KSOCK_PROTO_V3:
            self._out.append(proto.encode_noop(idl.SOCKNAL_KEEPALIVE_PING))

    def close(self) -> None:
        self.state = State.CLOSED

    # -- input -----------------------------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview) -> None:
        self._check_open()
        try:
            self._feed(memoryview(data))
        except RemoteProtocolError as e:
            self.error = e
            self.state = State.CLOSED
            raise

    def expecting(self) -> str:
        """What a truncated stream stopped in (for the log line when the peer closes)."""
        return self._rx.value

    def at_boundary(self) -> bool:
        """Established and between messages: an EOF here is a clean close, not a truncation."""
        return self.state is State.ESTABLISHED and self._rx is Rx.KSM_HDR and not self._head

    def _check_open(self) -> None:
        if self.error is not None:
            raise self.error
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection closed")

    def _feed(self, view: memoryview) -> None:
        pos, n = 0, len(view)
        while pos < n and self.state is not State.CLOSED:
            if self._rx is Rx.PAYLOAD:
                assert self._payload is not None
                take = min(n - pos, len(self._payload) - self._filled)
                self._payload[self._filled : self._filled + take] = view[pos : pos + take]
                self._filled += take
                pos += take
                if self._filled == len(self._payload):
                    self._payload_done()
                continue
            take = min(n - pos, self._need - len(self._head))
            self._head += view[pos : pos + take]
            pos += take
            if len(self._head) == self._need:
                chunk = bytes(self._head)
                self._head.clear()
                assert self._rx in STATE_READS[self.state], (self._rx, self.state)
                _HANDLERS[self._rx](self, chunk)

    def _expect(self, rx: Rx, need: int) -> None:
        self._rx, self._need = rx, need

    # -- acceptor connection request (passive) -------------------------------------------------

    def _on_connreq_head(self, chunk: bytes) -> None:
        magic = int.from_bytes(chunk[:4], "little")
        if idl.LNET_PROTO_MAGIC in (magic, idl.swap32(magic)):
            self._out.append(idl.CONNREQ_V1.pack(idl.LNET_PROTO_ACCEPTOR_MAGIC, idl.LNET_PROTO_ACCEPTOR_VERSION, 0))
        order = proto.acceptor_order(magic)
        (version,) = struct.unpack_from(order + "I", chunk, 4)
        self._order = order
        if version == idl.LNET_PROTO_ACCEPTOR_VERSION:
            self._expect(Rx.CONNREQ_NID, 8)
        elif version == idl.LNET_PROTO_ACCEPTOR_VERSION_16:
            self._expect(Rx.CONNREQ_NID, idl.CONNREQ_V2_NID_SIZE)
        else:
            self._out.append(idl.CONNREQ_V1.pack(idl.LNET_PROTO_ACCEPTOR_MAGIC, idl.LNET_PROTO_ACCEPTOR_VERSION, 0))
            raise HandshakeError(f"acceptor protocol version {version} not supported (1 or 2)")

    def _on_connreq_nid(self, chunk: bytes) -> None:
        if len(chunk) == 8:
            (nid,) = struct.unpack(self._order + "Q", chunk)
        else:
            nid = proto.nid4_of_large(chunk)
        if nid not in self.config.local_nids:
            raise HandshakeError(f"connection request for {idl.nid4_str(nid)}: no matching NI here")
        self.local_nid = nid
        self.state = State.HELLO
        self._expect(Rx.HELLO_HEAD, idl.HELLO_HEAD.size)

    # -- hello ------------------------------------------------------------------------------------

    def _my_hello(self, dst_nid: int, dst_pid: int, dst_incarnation: int, ctype: ConnType) -> Hello:
        return Hello(self.version, self.local_nid, dst_nid, self.config.pid, dst_pid, self.config.incarnation, dst_incarnation, ctype)

    def _on_hello_head(self, chunk: bytes) -> None:
        magic = int.from_bytes(chunk[:4], "little")
        self._order = proto.hello_order(magic)
        (version,) = struct.unpack_from(self._order + "I", chunk, 4)
        try:
            proto.check_hello_version(version)
        except HandshakeError:
            if not self.active:  # tell the peer what we speak (ksocknal_recv_hello does)
                self.version = idl.KSOCK_PROTO_V3
                self._out.append(self._my_hello(0, 0, 0, ConnType.NONE).pack())
            raise
        if self.active and version != self.version:
            raise HandshakeError(f"offered socklnd V{self.version}, peer answered V{version}")
        self.version = version
        self._expect(Rx.HELLO_REST, idl.HELLO_REST.size)

    def _on_hello_rest(self, chunk: bytes) -> None:
        self._hello = proto.decode_hello_rest(self._order, self.version, chunk)
        if self._hello.ips:
            self._expect(Rx.HELLO_IPS, 4 * len(self._hello.ips))
        else:
            self._hello_done()

    def _on_hello_ips(self, chunk: bytes) -> None:
        assert self._hello is not None
        ips = list(struct.unpack(self._order + f"{len(chunk) // 4}I", chunk))
        if 0 in ips:
            raise HandshakeError(f"hello lists a zero IP (entry {ips.index(0)})")
        self._hello.ips = ips
        self._hello_done()

    def _hello_done(self) -> None:
        h = self._hello
        assert h is not None
        if self.active:
            if h.ctype is ConnType.NONE:
                raise HandshakeError(f"{idl.nid4_str(self.peer_nid)} refused the connection (lost a connection race or wants another protocol version)")
            if h.src_nid != self.peer_nid:
                raise HandshakeError(f"connected to {idl.nid4_str(self.peer_nid)} but it says it is {idl.nid4_str(h.src_nid)}")
            if h.ctype.inverted() is not self.ctype:
                raise HandshakeError(f"mismatched connection types: ours {self.ctype.name}, peer's {h.ctype.name}")
        else:
            if h.ctype is ConnType.NONE:
                raise HandshakeError("hello with connection type NONE")
            # kshm_dst_nid is not checked (the kernel does not either): the connection request named our NID.
            self.peer_nid, self.ctype = h.src_nid, h.ctype.inverted()
            self._out.append(self._my_hello(h.src_nid, h.src_pid, h.src_incarnation, h.ctype.inverted()).pack())
        self.peer_pid, self.peer_incarnation = h.src_pid, h.src_incarnation
        self.state = State.ESTABLISHED
        self._events.append(Established(self.local_nid, self.peer_nid, self.peer_pid, self.peer_incarnation, self.ctype, self.version))
        self._expect(Rx.KSM_HDR, idl.KSOCK_MSG_HDR_SIZE)

    # -- established ----------------------------------------------------------------------------

    def _on_ksm_hdr(self, chunk: bytes) -> None:
        mtype, csum, zc_req, zc_ack = struct.unpack(self._order + "IIQQ", chunk)
        if zc_ack:
            # ksocknal_handle_zcack: a NOOP may acknowledge the range [zc_req, zc_ack] (or the two
            # cookies when zc_req > zc_ack); cookie 1 alone is a V3 keepalive.
            first = zc_req if mtype == KsockMsgType.NOOP and zc_req else zc_ack
            if first == zc_ack == idl.SOCKNAL_KEEPALIVE_PING:
                pass
            else:
                if first > zc_ack:
                    acked = {first, zc_ack}
                elif zc_ack - first < len(self._zc_pending):
                    acked = set(range(first, zc_ack + 1))
                else:
                    acked = {0}  # more cookies than we have pending: cannot all be ours
                if not acked <= self._zc_pending:
                    raise FrameError(f"ZC-ACK for cookies {first}..{zc_ack} that were never requested")
                self._zc_pending -= acked
                self._events.append(ZcAcked(frozenset(acked)))
        if mtype == KsockMsgType.NOOP:
            if csum and self.version == idl.KSOCK_PROTO_V2:
                plain = bytearray(chunk)
                plain[4:8] = b"\0\0\0\0"
                if proto.ksock_csum(plain) != csum:
                    raise FrameError(f"NOOP checksum mismatch (wire {csum:#010x})")
            self.stats.noops_rx += 1
            self._events.append(Keepalive())
            return
        if mtype != KsockMsgType.LNET:
            raise FrameError(f"unknown ksock message type {mtype:#x} (NOOP 0xc0, LNET 0xc1)")
        self._ksm = (mtype, csum, zc_req, zc_ack)
        self._ksm_raw = chunk
        self._expect(Rx.LNET_HDR, idl.LNET_HDR_NID4_SIZE)

    def _on_lnet_hdr(self, chunk: bytes) -> None:
        hdr = LnetHdr.unpack(chunk)
        if hdr.type is idl.LnetMsgType.HELLO:
            raise FrameError("LNet HELLO message after the socklnd handshake")
        if hdr.payload_length > self.config.max_payload:
            raise FrameError(f"LNet {hdr.type.name} header claims a {hdr.payload_length}-byte payload, "
                             f"more than the {self.config.max_payload} allowed")
        self._hdr = hdr
        self._payload = bytearray(idl.LNET_HDR_NID4_SIZE + hdr.payload_length)
        self._payload[: idl.LNET_HDR_NID4_SIZE] = chunk
        self._filled = idl.LNET_HDR_NID4_SIZE
        if hdr.payload_length == 0:
            self._payload_done()
        else:
            self._rx = Rx.PAYLOAD

    def _payload_done(self) -> None:
        assert self._hdr is not None and self._payload is not None
        _, csum, zc_req, _ = self._ksm
        if csum and self.version == idl.KSOCK_PROTO_V2:
            plain = bytearray(self._ksm_raw)
            plain[4:8] = b"\0\0\0\0"
            got = proto.ksock_csum(plain, self._payload)
            if got != csum:
                raise FrameError(f"checksum mismatch on {self._hdr.describe()}: wire {csum:#010x}, data {got:#010x}")
        self._events.append(LnetReceived(self._hdr, self._payload))
        self.stats.rx_msgs += 1
        self.stats.rx_bytes += self._hdr.payload_length
        if zc_req:
            self._out.append(proto.encode_noop(zc_ack=zc_req))
            self.stats.zc_acks_sent += 1
        self._hdr, self._payload, self._filled = None, None, 0
        self._expect(Rx.KSM_HDR, idl.KSOCK_MSG_HDR_SIZE)


_HANDLERS = {
    Rx.CONNREQ_HEAD: KsockConnection._on_connreq_head,
    Rx.CONNREQ_NID: KsockConnection._on_connreq_nid,
    Rx.HELLO_HEAD: KsockConnection._on_hello_head,
    Rx.HELLO_REST: KsockConnection._on_hello_rest,
    Rx.HELLO_IPS: KsockConnection._on_hello_ips,
    Rx.KSM_HDR: KsockConnection._on_ksm_hdr,
    Rx.LNET_HDR: KsockConnection._on_lnet_hdr,
}

__all__ = ["ConnConfig", "ConnStats", "Established", "Event", "Keepalive", "KsockConnection", "LnetReceived", "Rx", "State", "ZcAcked"]
