"""lu2k.socklnd.ping: lu2kd's own LNet pings of LAN nodes -- the GET as ``lnet_ping`` builds it, the
REPLY matched by its wmd cookie, the ping info decoded or refused with what was wrong.  Pure."""

from __future__ import annotations

import struct

import pytest

from lu2k.errors import FrameError, NetworkError
from lu2k.nid import parse_nid
from lu2k.socklnd import idl
from lu2k.socklnd.idl import LnetMsgType
from lu2k.socklnd.ping import Dropped, LanPinger, PingDone, feature_names, ni_status_name
from lu2k.socklnd.proto import LnetHdr, PingInfo
from lu2k.socklnd.router import RouterResponder

GW = idl.nid4_of(parse_nid("192.168.1.1@tcp"))
NODE = idl.nid4_of(parse_nid("192.168.1.2@tcp"))
NODE_RAIL = idl.nid4_of(parse_nid("192.168.7.2@tcp1"))
IFACE = 0x1234_5678_9ABC_DEF0


def node_answers(get: bytes, nis: list[tuple[int, bool]], *, discovery: bool = True) -> tuple[LnetHdr, bytes]:
    """A node's LNet answering our GET: lu2k's own ping target (RouterResponder) plays the node."""
    hdr = LnetHdr.unpack(get)
    answer = RouterResponder(discovery=discovery).handle(hdr, b"", nis)
    assert answer.reply is not None
    raw, data = answer.reply
    return LnetHdr.unpack(raw), data


def reply_to(cookie: int, data: bytes, *, iface: int = IFACE, src: int = NODE) -> LnetHdr:
    return LnetHdr(LnetMsgType.REPLY, GW, src, payload_length=len(data), wmd=(iface, cookie))


def test_the_get_is_lnet_pings() -> None:
    p = LanPinger(GW, IFACE)
    c1, raw1 = p.start(NODE, now=10.0)
    c2, raw2 = p.start(NODE_RAIL, now=10.0)
    get = LnetHdr.unpack(raw1)
    assert get.type is LnetMsgType.GET and get.dest_nid == NODE and get.src_nid == GW
    assert get.ptl_index == idl.LNET_RESERVED_PORTAL and get.match_bits == idl.LNET_PROTO_PING_MATCHBITS
    assert get.dest_pid == get.src_pid == idl.LNET_PID_LUSTRE and get.payload_length == 0 and get.offset == 0
    assert get.sink_length == idl.LNET_PING_BUFFER_MAX
    assert get.wmd == (IFACE, c1) and LnetHdr.unpack(raw2).wmd == (IFACE, c2) and c1 != c2
    assert set(p.pending) == {c1, c2}


def test_a_nodes_reply_ends_its_ping_with_nis_status_features_and_rtt() -> None:
    p = LanPinger(GW, IFACE)
    cookie, get = p.start(NODE, now=10.0)
    hdr, data = node_answers(get, [(NODE, True), (NODE_RAIL, False)])
    assert hdr.dest_nid == GW and hdr.wmd == (IFACE, cookie)  # the node echoes our wmd
    end = p.handle(hdr, data, now=10.25)
    assert isinstance(end, PingDone) and end.error is None and end.cookie == cookie and end.reply is not None
    r = end.reply
    assert r.nid == NODE and r.rtt == pytest.approx(0.25) and r.nis == [(NODE, idl.LNET_NI_STATUS_UP),
                                                                         (NODE_RAIL, idl.LNET_NI_STATUS_DOWN)]
    assert r.multi_rail and r.discovery and r.primary_nid == NODE and r.seqno == 1
    assert r.describe() == {
        "nid": "192.168.1.2@tcp", "primary_nid": "192.168.1.2@tcp", "rtt_ms": 250.0,
        "peer_nis": ["192.168.1.2@tcp", "192.168.7.2@tcp1"],
        "peer_ni_status": {"192.168.1.2@tcp": "up", "192.168.7.2@tcp1": "down"},
        "multi_rail": True, "discovery": True, "features": ["ni_status", "multi_rail", "discovery"], "seqno": 1,
        "pid": idl.LNET_PID_LUSTRE}
    assert not p.pending


def test_features_come_from_the_ping_info() -> None:
    p = LanPinger(GW, IFACE)
    cookie, _ = p.start(NODE, now=0.0)
    plain = PingInfo(idl.PING_FEAT_NI_STATUS, [(idl.LNET_NID_LO_0, 7), (NODE, idl.LNET_NI_STATUS_UP)]).pack()
    end = p.handle(reply_to(cookie, plain), plain, now=0.0)
    assert isinstance(end, PingDone) and end.reply is not None
    assert not end.reply.multi_rail and not end.reply.discovery and end.reply.seqno == 7


def test_a_big_endian_node_is_read() -> None:
    p = LanPinger(GW, IFACE)
    cookie, _ = p.start(NODE, now=0.0)
    data = struct.pack(">IIII", idl.LNET_PROTO_PING_MAGIC, idl.PING_FEAT_NI_STATUS, 12345, 2)
    data += struct.pack(">QII", idl.LNET_NID_LO_0, 3, 0) + struct.pack(">QII", NODE, idl.LNET_NI_STATUS_UP, 0)
    end = p.handle(reply_to(cookie, data), data, now=0.0)
    assert isinstance(end, PingDone) and end.reply is not None and end.reply.nis == [(NODE, idl.LNET_NI_STATUS_UP)]


@pytest.mark.parametrize("iface, known", [(IFACE, False), (IFACE ^ 1, True)])
def test_replies_for_no_ping_of_ours_are_dropped_with_a_reason(iface: int, known: bool) -> None:
    p = LanPinger(GW, IFACE)
    cookie, get = p.start(NODE, now=0.0)
    _, data = node_answers(get, [(NODE, True)])
    stray = reply_to(cookie if known else cookie + 99, data, iface=iface)
    out = p.handle(stray, data, now=0.0)
    assert isinstance(out, Dropped) and "no ping of ours" in out.note and "192.168.1.2@tcp" in out.note
    assert cookie in p.pending  # the real ping still waits


def test_a_second_reply_and_a_reply_after_a_timeout_are_dropped() -> None:
    p = LanPinger(GW, IFACE)
    cookie, get = p.start(NODE, now=0.0)
    hdr, data = node_answers(get, [(NODE, True)])
    assert isinstance(p.handle(hdr, data, now=0.0), PingDone)
    assert isinstance(p.handle(hdr, data, now=0.0), Dropped)
    late, get = p.start(NODE, now=0.0)
    p.forget(late)  # its caller gave up
    hdr, data = node_answers(get, [(NODE, True)])
    assert isinstance(p.handle(hdr, data, now=0.0), Dropped)


def test_other_messages_are_not_pings() -> None:
    p = LanPinger(GW, IFACE)
    p.start(NODE, now=0.0)
    ack = LnetHdr(LnetMsgType.ACK, GW, NODE, wmd=(IFACE, 1))
    out = p.handle(ack, b"", now=0.0)
    assert isinstance(out, Dropped) and "ACK" in out.note


def _info(features: int, nis: list[tuple[int, int]], magic: int = idl.LNET_PROTO_PING_MAGIC) -> bytes:
    head = struct.pack("<IIII", magic, features, 12345, len(nis))
    return head + b"".join(struct.pack("<QII", n, s, 0) for n, s in nis)


LO = (idl.LNET_NID_LO_0, 1)
UP = (NODE, idl.LNET_NI_STATUS_UP)
GARBAGE = [
    (b"", "truncated: 0 bytes"),
    (b"this is not a ping info at all", "bad ping info magic"),
    (_info(idl.PING_FEAT_NI_STATUS, [LO, UP], magic=0x12345678), "bad ping info magic 0x12345678"),
    (_info(idl.PING_FEAT_BASE, [LO, UP]), "without NI status"),
    (_info(idl.PING_FEAT_NI_STATUS, [UP, LO]), "first NI is 192.168.1.2@tcp, not 0@lo"),
    (_info(idl.PING_FEAT_NI_STATUS, []), "lists 0 NIs"),
    (_info(idl.PING_FEAT_NI_STATUS, [LO, UP])[:-4], "truncated: 2 NIs need 48 bytes, got 44"),
    (_info(idl.PING_FEAT_NI_STATUS, [LO] + [UP] * 300), "lists 301 NIs"),
]


@pytest.mark.parametrize("data, what", GARBAGE, ids=[w for _, w in GARBAGE])
def test_garbage_ping_info_ends_the_ping_with_what_was_wrong(data: bytes, what: str) -> None:
    p = LanPinger(GW, IFACE)
    cookie, _ = p.start(NODE, now=0.0)
    end = p.handle(reply_to(cookie, data), data, now=0.0)
    assert isinstance(end, PingDone) and end.reply is None and isinstance(end.error, FrameError)
    assert what in str(end.error) and "192.168.1.2@tcp answered the ping with unusable ping info" in str(end.error)
    assert not p.pending


def test_a_reply_longer_than_the_sink_is_read_only_up_to_it() -> None:
    # LNET_MD_TRUNCATE: bytes beyond the MD are not read, so a node listing more NIs than fit is refused
    p = LanPinger(GW, IFACE, sink_length=idl.PING_INFO_HEAD.size + 2 * idl.NI_STATUS.size)
    cookie, _ = p.start(NODE, now=0.0)
    data = _info(idl.PING_FEAT_NI_STATUS, [LO, UP, (NODE_RAIL, idl.LNET_NI_STATUS_UP)])
    end = p.handle(reply_to(cookie, data), data, now=0.0)
    assert isinstance(end, PingDone) and "3 NIs need 64 bytes, got 48" in str(end.error)


def test_a_get_that_could_not_be_sent_ends_its_ping_once() -> None:
    p = LanPinger(GW, IFACE)
    cookie, _ = p.start(NODE, now=0.0)
    end = p.fail(cookie, NetworkError("connection refused"))
    assert end is not None and end.nid == NODE and str(end.error) == "connection refused"
    assert p.fail(cookie, NetworkError("again")) is None


def test_names() -> None:
    assert feature_names(idl.PING_FEAT_NI_STATUS | idl.PING_FEAT_RTE_DISABLED | 0x300) == ["ni_status", "rte_disabled", "0x300"]
    assert [ni_status_name(s) for s in (idl.LNET_NI_STATUS_UP, idl.LNET_NI_STATUS_DOWN, 0, 7)] == ["up", "down", "invalid",
                                                                                                   "0x00000007"]
