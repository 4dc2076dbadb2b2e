"""lu2k.socklnd.idl / proto: the C struct layouts, byte orders, round trips and bad input."""

from __future__ import annotations

import ipaddress
import struct
import zlib

import pytest

from lu2k.errors import FrameError, HandshakeError, RemoteProtocolError
from lu2k.nid import parse_nid
from lu2k.socklnd import idl, proto
from lu2k.socklnd.idl import ConnType, LnetMsgType
from lu2k.socklnd.proto import Hello, LnetHdr, PingInfo

A = idl.nid4_of(parse_nid("192.168.1.2@tcp"))
B = idl.nid4_of(parse_nid("10.0.0.7@tcp1"))


def test_struct_sizes_match_the_c_headers() -> None:
    # BUILD_BUG_ONs in api-ni.c / socklnd, and sizeof() of the packed structs.
    assert idl.CONNREQ_V1.size == 16  # struct lnet_acceptor_connreq
    assert 8 + idl.CONNREQ_V2_NID_SIZE == 28  # struct lnet_acceptor_connreq_v2
    assert idl.HELLO_SIZE == 56  # struct ksock_hello_msg_nid4 without kshm_ips
    assert idl.KSOCK_MSG_HDR_SIZE == 24  # struct ksock_msg_hdr
    assert idl.LNET_HDR_NID4_SIZE == 72  # struct _lnet_hdr_nid4
    assert idl.MSG_PUT.size == 40 and idl.MSG_GET.size == 36 and idl.MSG_ACK.size == 28
    assert idl.MSG_REPLY.size == 16 and idl.MSG_HELLO.size == 12
    assert idl.PING_INFO_HEAD.size == 16 and idl.NI_STATUS.size == 16


def test_nid4_is_net_shifted_over_a_host_order_ipv4() -> None:
    assert A == (((2 << 16) | 0) << 32) | 0xC0A80102
    assert B == (((2 << 16) | 1) << 32) | 0x0A000007
    assert str(idl.nid_of4(B)) == "10.0.0.7@tcp1"
    assert idl.nid_of4(idl.LNET_NID_LO_0).net.type == "lo"
    assert "0x" in idl.nid4_str((0x7777 << 48) | 5)  # undecodable still prints


def test_nid4_refuses_ipv6() -> None:
    with pytest.raises(Exception, match="IPv6"):
        idl.nid4_of(parse_nid("fd00::1@tcp"))


def test_connreq_layout() -> None:
    raw = proto.encode_connreq(A)
    assert raw[:4] == bytes.fromhex("0071ceac")  # 0xacce7100 little-endian
    assert struct.unpack("<I", raw[4:8]) == (1,)
    assert struct.unpack("<Q", raw[8:]) == (A,)


@pytest.mark.parametrize("magic,needle", [
    (0xDEADBEEF, "unrecognised"),
    (idl.LNET_PROTO_TCP_MAGIC, "old"),
    (idl.LNET_PROTO_MAGIC, "version query"),
])
def test_acceptor_magic_errors_name_the_magic(magic: int, needle: str) -> None:
    with pytest.raises(HandshakeError, match=f"{magic:#010x}.*{needle}|{needle}"):
        proto.acceptor_order(magic)


def test_acceptor_magic_either_order() -> None:
    assert proto.acceptor_order(idl.LNET_PROTO_ACCEPTOR_MAGIC) == "<"
    assert proto.acceptor_order(idl.swap32(idl.LNET_PROTO_ACCEPTOR_MAGIC)) == ">"


def test_privileged_port_rule() -> None:
    assert proto.source_port_allowed(1023, True)
    assert proto.source_port_allowed(512, True)
    assert not proto.source_port_allowed(1024, True)
    assert proto.source_port_allowed(40000, False)


def test_hello_layout_and_round_trip() -> None:
    h = Hello(3, A, B, 12345, 12345, 0x1122334455667788, 0, ConnType.BULK_OUT)
    raw = h.pack()
    assert len(raw) == 56
    magic, version, src, dst, spid, dpid, sinc, dinc, ctype, nips = struct.unpack("<IIQQIIQQII", raw)
    assert (magic, version, src, dst, spid, ctype, nips) == (idl.LNET_PROTO_MAGIC, 3, A, B, 12345, 3, 0)
    assert sinc == 0x1122334455667788
    back = proto.decode_hello_rest("<", 3, raw[8:])
    assert back == h


def test_hello_from_a_big_endian_sender() -> None:
    h = Hello(2, A, B, 12345, 0, 99, 0, ConnType.CONTROL)
    raw = struct.pack(">IIQQIIQQII", idl.LNET_PROTO_MAGIC, 2, A, B, 12345, 0, 99, 0, 1, 0)
    order = proto.hello_order(int.from_bytes(raw[:4], "little"))
    assert order == ">"
    assert proto.decode_hello_rest(order, 2, raw[8:]) == h


def test_hello_bad_input() -> None:
    with pytest.raises(HandshakeError, match="bad hello magic 0x12345678"):
        proto.hello_order(0x12345678)
    with pytest.raises(HandshakeError, match="V1"):
        proto.hello_order(idl.LNET_PROTO_TCP_MAGIC)
    for v in (1, 4, 99):
        with pytest.raises(HandshakeError, match=f"version {v} not supported"):
            proto.check_hello_version(v)
    rest = struct.pack("<QQIIQQII", A, B, 1, 1, 1, 1, 7, 0)
    with pytest.raises(HandshakeError, match="unknown connection type 7"):
        proto.decode_hello_rest("<", 3, rest)
    rest = struct.pack("<QQIIQQII", A, B, 1, 1, 1, 1, 1, 17)
    with pytest.raises(HandshakeError, match="17 IPs"):
        proto.decode_hello_rest("<", 3, rest)
    rest = struct.pack("<QQIIQQII", idl.LNET_NID_ANY, B, 1, 1, 1, 1, 1, 0)
    with pytest.raises(HandshakeError, match="source NID"):
        proto.decode_hello_rest("<", 3, rest)


def test_conn_type_none_round_trips_as_minus_one() -> None:
    raw = Hello(3, A, 0, 1, 0, 1, 0, ConnType.NONE).pack()
    assert struct.unpack_from("<I", raw, 48) == (0xFFFFFFFF,)
    assert proto.decode_hello_rest("<", 3, raw[8:]).ctype is ConnType.NONE


def test_inverted_types() -> None:
    assert ConnType.BULK_IN.inverted() is ConnType.BULK_OUT
    assert ConnType.BULK_OUT.inverted() is ConnType.BULK_IN
    assert ConnType.CONTROL.inverted() is ConnType.CONTROL


@pytest.mark.parametrize("hdr", [
    LnetHdr(LnetMsgType.PUT, A, B, 12345, 12345, 4096, (1, 2), 0xAB, 0xCD, 4, 8),
    LnetHdr(LnetMsgType.GET, A, B, payload_length=0, wmd=(3, 4), match_bits=idl.LNET_PROTO_PING_MATCHBITS, ptl_index=0, offset=0, sink_length=4096),
    LnetHdr(LnetMsgType.ACK, A, B, wmd=(5, 6), match_bits=7, mlength=100),
    LnetHdr(LnetMsgType.REPLY, A, B, payload_length=48, wmd=(7, 8)),
    LnetHdr(LnetMsgType.HELLO, A, B, incarnation=9, hello_type=1),
])
def test_lnet_header_round_trip(hdr: LnetHdr) -> None:
    raw = hdr.pack()
    assert len(raw) == 72
    assert LnetHdr.unpack(raw) == hdr
    assert proto.peek_route(raw) == (A, B, hdr.payload_length)


def test_lnet_put_header_offsets() -> None:
    raw = LnetHdr(LnetMsgType.PUT, A, B, 1, 2, 3, (4, 5), 6, 7, 8, 9).pack()
    # dest_nid@0 src_nid@8 dest_pid@16 src_pid@20 type@24 payload_length@28 msg@32
    assert struct.unpack_from("<QQIIII", raw) == (A, B, 1, 2, 1, 3)
    # lnet_put: ack_wmd@32 match_bits@48 hdr_data@56 ptl_index@64 offset@68
    assert struct.unpack_from("<QQQQII", raw, 32) == (4, 5, 6, 7, 8, 9)


def test_lnet_header_bad_input() -> None:
    raw = bytearray(LnetHdr(LnetMsgType.PUT, A, B).pack())
    raw[24:28] = (9).to_bytes(4, "little")
    with pytest.raises(FrameError, match="unknown LNet message type 9"):
        LnetHdr.unpack(raw)
    with pytest.raises(FrameError, match="72 bytes"):
        LnetHdr.unpack(raw[:50])


def test_ping_info_layout_and_round_trip() -> None:
    info = PingInfo(idl.PING_FEAT_NI_STATUS | idl.PING_FEAT_MULTI_RAIL, [(idl.LNET_NID_LO_0, 5), (A, idl.LNET_NI_STATUS_UP)])
    raw = info.pack()
    assert len(raw) == 16 + 2 * 16
    assert struct.unpack_from("<IIII", raw) == (idl.LNET_PROTO_PING_MAGIC, info.features, 12345, 2)
    assert struct.unpack_from("<QII", raw, 32) == (A, idl.LNET_NI_STATUS_UP, 0)
    assert PingInfo.unpack(raw) == info


def test_ping_info_byte_swapped() -> None:
    raw = struct.pack(">IIII", idl.LNET_PROTO_PING_MAGIC, 2, 12345, 1) + struct.pack(">QII", idl.LNET_NID_LO_0, 1, 0)
    assert PingInfo.unpack(raw).nis == [(idl.LNET_NID_LO_0, 1)]


def test_ping_info_bad_input() -> None:
    good = PingInfo(idl.PING_FEAT_NI_STATUS, [(idl.LNET_NID_LO_0, 1), (A, idl.LNET_NI_STATUS_UP)]).pack()
    with pytest.raises(FrameError, match="truncated"):
        PingInfo.unpack(good[:8])
    with pytest.raises(FrameError, match="truncated: 2 NIs"):
        PingInfo.unpack(good[:-1])
    with pytest.raises(FrameError, match="bad ping info magic"):
        PingInfo.unpack(b"\0" * 4 + good[4:])
    with pytest.raises(FrameError, match="without NI status"):
        PingInfo.unpack(good[:4] + b"\1\0\0\0" + good[8:])
    with pytest.raises(FrameError, match="not 0@lo"):
        PingInfo.unpack(PingInfo(idl.PING_FEAT_NI_STATUS, [(A, 1)]).pack())
    with pytest.raises(FrameError, match="lists 0 NIs"):
        PingInfo.unpack(good[:12] + b"\0\0\0\0")


def test_checksum_is_the_kernels_crc32_le_without_final_inversion() -> None:
    data = b"hello ksocklnd"
    # crc32_le(~0, p, n) as the kernel computes it, bit by bit.
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    assert proto.ksock_csum(data[:5], data[5:]) == crc == zlib.crc32(data) ^ 0xFFFFFFFF


def test_ksock_headers() -> None:
    noop = proto.encode_noop()
    assert struct.unpack("<IIQQ", noop) == (0xC0, 0, 0, 1)
    hdr = LnetHdr(LnetMsgType.PUT, A, B, payload_length=3).pack()
    msg = proto.encode_lnet(hdr, 3)
    assert msg[:24] == struct.pack("<IIQQ", 0xC1, 0, 0, 0) and msg[24:] == hdr
    summed = proto.encode_lnet(hdr, 3, checksum_payload=b"abc")
    csum = struct.unpack_from("<I", summed, 4)[0]
    assert csum == proto.ksock_csum(struct.pack("<IIQQ", 0xC1, 0, 0, 0), hdr, b"abc")


def test_large_nid_connreq() -> None:
    raw = parse_nid("192.168.1.2@tcp").to_bytes()
    assert proto.nid4_of_large(raw) == A
    with pytest.raises(HandshakeError, match="unusable NID"):
        proto.nid4_of_large(ipaddress.IPv6Address("fd00::1").packed + bytes(4))
    assert issubclass(HandshakeError, RemoteProtocolError)
