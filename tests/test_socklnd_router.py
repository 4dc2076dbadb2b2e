"""lu2k.socklnd.router: ping replies, discovery pushes, drops -- as the kernel's router checker reads them."""

from __future__ import annotations

from lu2k.nid import parse_nid
from lu2k.socklnd import idl
from lu2k.socklnd.idl import LnetMsgType
from lu2k.socklnd.proto import LnetHdr, PingInfo
from lu2k.socklnd.router import RouterResponder

NODE = idl.nid4_of(parse_nid("192.168.1.2@tcp"))
GW = idl.nid4_of(parse_nid("192.168.1.1@tcp"))
REMOTE = idl.nid4_of(parse_nid("192.168.1.1@tcp1"))


def ping_get(sink: int = 4096, offset: int = 0) -> LnetHdr:
    return LnetHdr(LnetMsgType.GET, GW, NODE, 12345, 12345, 0, (0xAA, 0xBB), idl.LNET_PROTO_PING_MATCHBITS,
                   ptl_index=idl.LNET_RESERVED_PORTAL, offset=offset, sink_length=sink)


def route_alive(info: PingInfo, remote_net: int) -> bool:
    """lnet_router_discovery_ping_reply + lnet_is_route_alive for a single-hop route."""
    if info.features & idl.PING_FEAT_RTE_DISABLED:
        return False
    return any(nid >> 32 == remote_net and st == idl.LNET_NI_STATUS_UP for nid, st in info.nis[1:])


def test_ping_reply_lists_both_sides_and_routes_stay_up() -> None:
    r = RouterResponder()
    a = r.handle(ping_get(), b"", [(GW, True), (REMOTE, True)])
    assert a.reply is not None
    raw, data = a.reply
    hdr = LnetHdr.unpack(raw)
    assert hdr.type is LnetMsgType.REPLY and hdr.dest_nid == NODE and hdr.src_nid == GW
    assert hdr.wmd == (0xAA, 0xBB) and hdr.payload_length == len(data)
    info = PingInfo.unpack(data)
    assert info.nis[0][0] == idl.LNET_NID_LO_0
    assert [n for n, _ in info.nis[1:]] == [GW, REMOTE]
    assert not info.features & idl.PING_FEAT_RTE_DISABLED
    assert info.features & idl.PING_FEAT_MULTI_RAIL and info.features & idl.PING_FEAT_DISCOVERY
    assert route_alive(info, REMOTE >> 32)


def test_dead_satellite_hop_reports_the_remote_ni_down_and_bumps_the_seqno() -> None:
    r = RouterResponder()
    up = PingInfo.unpack(r.handle(ping_get(), b"", [(GW, True), (REMOTE, True)]).reply[1])  # type: ignore[index]
    down = PingInfo.unpack(r.handle(ping_get(), b"", [(GW, True), (REMOTE, False)]).reply[1])  # type: ignore[index]
    assert dict(down.nis)[REMOTE] == idl.LNET_NI_STATUS_DOWN
    assert not route_alive(down, REMOTE >> 32)
    assert down.nis[0][1] == up.nis[0][1] + 1
    same = PingInfo.unpack(r.handle(ping_get(), b"", [(GW, True), (REMOTE, False)]).reply[1])  # type: ignore[index]
    assert same.nis[0][1] == down.nis[0][1]


def test_ping_reply_is_cut_to_the_sink_length() -> None:
    r = RouterResponder()
    a = r.handle(ping_get(sink=20, offset=4), b"", [(GW, True)])
    assert a.reply is not None and len(a.reply[1]) == 20
    assert LnetHdr.unpack(a.reply[0]).payload_length == 20


def test_discovery_push_is_acked() -> None:
    r = RouterResponder()
    pushed = PingInfo(idl.PING_FEAT_NI_STATUS, [(idl.LNET_NID_LO_0, 3), (NODE, idl.LNET_NI_STATUS_UP)]).pack()
    put = LnetHdr(LnetMsgType.PUT, GW, NODE, payload_length=len(pushed), wmd=(5, 6), match_bits=idl.LNET_PROTO_PING_MATCHBITS)
    a = r.handle(put, pushed, [(GW, True)])
    assert a.pushed is not None and a.pushed.nis[1][0] == NODE
    assert a.reply is not None
    ack = LnetHdr.unpack(a.reply[0])
    assert ack.type is LnetMsgType.ACK and ack.wmd == (5, 6) and ack.mlength == len(pushed) and ack.dest_nid == NODE


def test_push_without_ack_and_with_garbage() -> None:
    r = RouterResponder()
    put = LnetHdr(LnetMsgType.PUT, GW, NODE, payload_length=3, wmd=(idl.LNET_WIRE_HANDLE_COOKIE_NONE, 0),
                  match_bits=idl.LNET_PROTO_PING_MATCHBITS)
    a = r.handle(put, b"xyz", [(GW, True)])
    assert a.reply is None and a.pushed is None and "unusable ping info" in a.note


def test_other_messages_for_us_are_dropped_with_a_reason() -> None:
    r = RouterResponder()
    put = LnetHdr(LnetMsgType.PUT, GW, NODE, payload_length=0, wmd=(1, 1), match_bits=5, ptl_index=12)
    a = r.handle(put, b"", [(GW, True)])
    assert a.reply is None and "portal 12 match bits 0x5" in a.note
    ack = LnetHdr(LnetMsgType.ACK, GW, NODE)
    assert r.handle(ack, b"", []).reply is None


def test_discovery_can_be_off() -> None:
    r = RouterResponder(discovery=False)
    assert not r.ping_info([(GW, True)]).features & idl.PING_FEAT_DISCOVERY
