"""lu2k.socklnd.conn: the connection state machine, driven by pairs of in-memory connections."""

from __future__ import annotations

import struct

import pytest

from lu2k.errors import FrameError, HandshakeError, LocalProtocolError
from lu2k.nid import parse_nid
from lu2k.socklnd import idl, proto
from lu2k.socklnd.conn import ConnConfig, Established, Keepalive, KsockConnection, LnetReceived, State
from lu2k.socklnd.idl import ConnType, LnetMsgType
from lu2k.socklnd.proto import Hello, LnetHdr

NODE = idl.nid4_of(parse_nid("192.168.1.2@tcp"))
GW = idl.nid4_of(parse_nid("192.168.1.1@tcp"))
FAR = idl.nid4_of(parse_nid("10.0.0.7@tcp1"))


def cfg(nid: int, inc: int, **kw: object) -> ConnConfig:
    return ConnConfig(local_nids=frozenset({nid}), incarnation=inc, **kw)  # type: ignore[arg-type]


def pump(a: KsockConnection, b: KsockConnection, chunk: int = 0) -> None:
    """Move bytes both ways until quiet; ``chunk`` > 0 feeds them in pieces of that size."""
    moved = True
    while moved:
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = b"".join(bytes(p) for p in src.data_to_send())
            if data:
                moved = True
                step = chunk or len(data)
                for i in range(0, len(data), step):
                    dst.receive_data(data[i : i + step])


def events(c: KsockConnection) -> list[object]:
    out = []
    while (e := c.next_event()) is not None:
        out.append(e)
    return out


def pair(ctype: ConnType = ConnType.CONTROL, version: int = 3, chunk: int = 0, **kw: object) -> tuple[KsockConnection, KsockConnection]:
    node = KsockConnection(cfg(NODE, 111, version=version, **kw), active=True, local_nid=NODE, peer_nid=GW, ctype=ctype)
    gw = KsockConnection(cfg(GW, 222, **kw), active=False)
    pump(node, gw, chunk)
    return node, gw


@pytest.mark.parametrize("chunk", [0, 1, 7])
@pytest.mark.parametrize("version", [2, 3])
def test_handshake_both_roles(chunk: int, version: int) -> None:
    node, gw = pair(ConnType.BULK_OUT, version, chunk)
    assert node.state is gw.state is State.ESTABLISHED
    (e1,) = events(node)
    (e2,) = events(gw)
    assert e1 == Established(NODE, GW, idl.LNET_PID_LUSTRE, 222, ConnType.BULK_OUT, version)
    assert e2 == Established(GW, NODE, idl.LNET_PID_LUSTRE, 111, ConnType.BULK_IN, version)


def test_active_sends_connreq_then_hello() -> None:
    node = KsockConnection(cfg(NODE, 111), active=True, local_nid=NODE, peer_nid=GW, ctype=ConnType.CONTROL)
    raw = b"".join(bytes(p) for p in node.data_to_send())
    assert raw[:16] == proto.encode_connreq(GW)
    assert raw[16:] == Hello(3, NODE, GW, 12345, 0, 111, 0, ConnType.CONTROL).pack()


def test_v3_refuses_an_active_any_connection() -> None:
    with pytest.raises(LocalProtocolError, match="CONTROL/BULK"):
        KsockConnection(cfg(NODE, 1), active=True, local_nid=NODE, peer_nid=GW, ctype=ConnType.ANY)


@pytest.mark.parametrize("size", [0, 1, 5000, 16 << 10, (1 << 20)])
@pytest.mark.parametrize("chunk", [0, 4093])
def test_lnet_message_both_ways(size: int, chunk: int) -> None:
    node, gw = pair(chunk=chunk)
    events(node), events(gw)
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    hdr = LnetHdr(LnetMsgType.PUT, FAR, NODE, payload_length=size, wmd=(1, 2), match_bits=9, ptl_index=4).pack()
    node.send_lnet(hdr, payload)
    pump(node, gw, chunk)
    (got,) = events(gw)
    assert isinstance(got, LnetReceived)
    assert got.raw_header == hdr and bytes(got.payload) == payload and got.hdr.match_bits == 9
    reply = LnetHdr(LnetMsgType.ACK, NODE, FAR, wmd=(1, 2), mlength=size).pack()
    gw.send_lnet(reply)
    pump(node, gw, chunk)
    (back,) = events(node)
    assert isinstance(back, LnetReceived) and back.hdr.type is LnetMsgType.ACK


def test_zero_copy_request_is_answered_with_its_cookie() -> None:
    node, gw = pair(ConnType.BULK_OUT)
    events(gw)
    hdr = LnetHdr(LnetMsgType.PUT, FAR, NODE, payload_length=20000).pack()
    # A kernel sender marks a >= 16 KiB payload with a ZC request cookie (ksm_zc_cookies[0]).
    gw.receive_data(struct.pack("<IIQQ", 0xC1, 0, 77, 0) + hdr + b"z" * 20000)
    assert isinstance(gw.next_event(), LnetReceived)
    out = b"".join(bytes(p) for p in gw.data_to_send())
    assert out == struct.pack("<IIQQ", 0xC0, 0, 0, 77)  # NOOP, ZC-ACK cookie 77
    assert gw.stats.zc_acks_sent == 1


def test_keepalive_noop() -> None:
    node, gw = pair()
    events(gw)
    node.send_keepalive()
    pump(node, gw)
    assert events(gw) == [Keepalive()]


def test_v2_checksums_are_sent_and_verified() -> None:
    node, gw = pair(ConnType.CONTROL, version=2, send_checksums=True)
    events(gw)
    hdr = LnetHdr(LnetMsgType.PUT, FAR, NODE, payload_length=4).pack()
    node.send_lnet(hdr, b"abcd")
    wire = bytearray(b"".join(bytes(p) for p in node.data_to_send()))
    assert struct.unpack_from("<I", wire, 4)[0] != 0
    gw.receive_data(bytes(wire))
    assert isinstance(gw.next_event(), LnetReceived)
    node.send_lnet(hdr, b"abcd")
    wire = bytearray(b"".join(bytes(p) for p in node.data_to_send()))
    wire[-1] ^= 1
    with pytest.raises(FrameError, match="checksum mismatch"):
        gw.receive_data(bytes(wire))


# -- bad input: every case closes the connection with a reason ---------------------------------


def passive() -> KsockConnection:
    return KsockConnection(cfg(GW, 222), active=False)


def feed_fails(c: KsockConnection, data: bytes, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        c.receive_data(data)
    assert c.state is State.CLOSED
    with pytest.raises(exc, match=match):  # sticky
        c.receive_data(b"x")


def test_wrong_acceptor_magic() -> None:
    feed_fails(passive(), struct.pack("<IIQ", 0x11223344, 1, GW), HandshakeError, "bad acceptor magic 0x11223344")


def test_lnet_magic_on_the_acceptor_is_told_our_version() -> None:
    c = passive()
    feed_fails(c, struct.pack("<II", idl.LNET_PROTO_MAGIC, 3), HandshakeError, "version query")
    assert b"".join(bytes(p) for p in c.data_to_send()) == struct.pack("<IIQ", idl.LNET_PROTO_ACCEPTOR_MAGIC, 1, 0)


def test_wrong_acceptor_version() -> None:
    c = passive()
    feed_fails(c, struct.pack("<II", idl.LNET_PROTO_ACCEPTOR_MAGIC, 7), HandshakeError, "acceptor protocol version 7")
    assert b"".join(bytes(p) for p in c.data_to_send())[:8] == struct.pack("<II", idl.LNET_PROTO_ACCEPTOR_MAGIC, 1)


def test_byte_swapped_connreq_is_accepted() -> None:
    c = passive()
    c.receive_data(struct.pack(">IIQ", idl.LNET_PROTO_ACCEPTOR_MAGIC, 1, GW))
    assert c.state is State.HELLO


def test_connreq_for_a_nid_we_do_not_have() -> None:
    feed_fails(passive(), proto.encode_connreq(FAR), HandshakeError, "10.0.0.7@tcp1: no matching NI")


def test_wrong_hello_magic() -> None:
    feed_fails(passive(), proto.encode_connreq(GW) + struct.pack("<II", 0xCAFEF00D, 3), HandshakeError, "bad hello magic 0xcafef00d")


@pytest.mark.parametrize("version", [1, 4, 9])
def test_wrong_hello_version_gets_our_hello_then_close(version: int) -> None:
    c = passive()
    feed_fails(c, proto.encode_connreq(GW) + struct.pack("<II", idl.LNET_PROTO_MAGIC, version), HandshakeError,
               f"version {version} not supported")
    told = b"".join(bytes(p) for p in c.data_to_send())
    assert struct.unpack_from("<II", told) == (idl.LNET_PROTO_MAGIC, 3)
    assert struct.unpack_from("<i", told, 48) == (-1,)  # ctype NONE


def test_truncated_hello_leaves_the_connection_waiting_and_says_where() -> None:
    c = passive()
    raw = proto.encode_connreq(GW) + Hello(3, NODE, GW, 1, 0, 1, 0, ConnType.CONTROL).pack()
    c.receive_data(raw[:-5])
    assert c.state is State.HELLO and c.expecting() == "hello body"
    assert c.next_event() is None


def test_hello_dst_nid_is_not_checked_as_in_the_kernel() -> None:
    c = passive()
    c.receive_data(proto.encode_connreq(GW) + Hello(3, NODE, FAR, 1, 0, 1, 0, ConnType.CONTROL).pack())
    assert c.state is State.ESTABLISHED


def test_hello_with_a_zero_ip() -> None:
    h = Hello(2, NODE, GW, 1, 0, 1, 0, ConnType.ANY, [0x0A000001, 0])
    feed_fails(passive(), proto.encode_connreq(GW) + h.pack(), HandshakeError, "zero IP")


def test_active_side_checks_who_answered() -> None:
    node = KsockConnection(cfg(NODE, 1), active=True, local_nid=NODE, peer_nid=GW, ctype=ConnType.CONTROL)
    node.data_to_send()
    feed_fails(node, Hello(3, FAR, NODE, 1, 0, 2, 0, ConnType.CONTROL).pack(), HandshakeError, "says it is 10.0.0.7@tcp1")
    node = KsockConnection(cfg(NODE, 1), active=True, local_nid=NODE, peer_nid=GW, ctype=ConnType.BULK_OUT)
    feed_fails(node, Hello(3, GW, NODE, 1, 0, 2, 0, ConnType.BULK_OUT).pack(), HandshakeError, "mismatched connection types")
    node = KsockConnection(cfg(NODE, 1), active=True, local_nid=NODE, peer_nid=GW, ctype=ConnType.CONTROL)
    feed_fails(node, Hello(3, GW, NODE, 1, 0, 2, 0, ConnType.NONE).pack(), HandshakeError, "refused the connection")
    node = KsockConnection(cfg(NODE, 1), active=True, local_nid=NODE, peer_nid=GW, ctype=ConnType.CONTROL)
    feed_fails(node, Hello(2, GW, NODE, 1, 0, 2, 0, ConnType.CONTROL).pack(), HandshakeError, "offered socklnd V3, peer answered V2")


def established() -> KsockConnection:
    node, gw = pair()
    events(gw)
    return gw


def test_absurd_payload_length_is_refused_before_allocating() -> None:
    gw = established()
    hdr = bytearray(LnetHdr(LnetMsgType.PUT, FAR, NODE).pack())
    hdr[28:32] = (0xFFFFFFF0).to_bytes(4, "little")
    feed_fails(gw, struct.pack("<IIQQ", 0xC1, 0, 0, 0) + bytes(hdr), FrameError, "claims a 4294967280-byte payload")


def test_unknown_ksock_type() -> None:
    feed_fails(established(), struct.pack("<IIQQ", 0xC7, 0, 0, 0), FrameError, "unknown ksock message type 0xc7")


def test_zc_ack_we_never_asked_for() -> None:
    feed_fails(established(), struct.pack("<IIQQ", 0xC0, 0, 0, 55), FrameError, "never requested")


def test_lnet_hello_after_handshake() -> None:
    hdr = LnetHdr(LnetMsgType.HELLO, GW, NODE).pack()
    feed_fails(established(), struct.pack("<IIQQ", 0xC1, 0, 0, 0) + hdr, FrameError, "HELLO message after")


def test_sending_before_established_is_local_misuse() -> None:
    with pytest.raises(LocalProtocolError, match="state connreq"):
        passive().send_lnet(bytes(72))


def test_our_zero_copy_requests_are_matched_to_their_acks() -> None:
    from lu2k.socklnd.conn import ZcAcked

    node, gw = pair(ConnType.BULK_OUT)
    events(node), events(gw)
    hdr = LnetHdr(LnetMsgType.PUT, FAR, NODE, payload_length=16 << 10).pack()
    c1 = node.send_lnet(hdr, b"a" * (16 << 10), zero_copy=True)
    c2 = node.send_lnet(hdr, b"b" * (16 << 10), zero_copy=True)
    assert (c1, c2) == (2, 3)  # cookie 1 is the keepalive ping
    pump(node, gw)
    assert [type(e) for e in events(gw)] == [LnetReceived, LnetReceived]
    assert events(node) == [ZcAcked(frozenset({2})), Keepalive(), ZcAcked(frozenset({3})), Keepalive()]
    # A range ack for cookies never requested is refused.
    feed_fails(node, struct.pack("<IIQQ", 0xC0, 0, 4, 9), FrameError, "4..9")
