"""lu2k.socklnd.driver (+ attach, engine.attach_lan): two lu2kd sites joined by the inproc backend,
each with a socklnd LAN on loopback, and a pure-Python stand-in for a kernel node at each site
(tests/socklnd_node.py -- not the kernel; the guest tier runs Lustre's modules).

Site A: node 127.83.1.2@tcp -- lu2kd-A 127.83.1.1@tcp ==inproc 10.83.0.1@tcp9 -- 10.83.0.2@tcp9 lu2kd-B
127.83.2.1@tcp1 -- node 127.83.2.2@tcp1.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import structlog

from lu2k.localpair import free_port
from lu2k.engine import Engine
from lu2k.errors import ConnectError, ConnectTimeout, ReadError, Status
from lu2k.nid import Net, parse_nid
from lu2k.settings import parse_config
from lu2k.socklnd import idl, proto
from lu2k.socklnd.attach import LanNets
from lu2k.socklnd.driver import _CONNECT_ERRORS, _IO_ERRORS, SocklndDriver, _translate
from lu2k.socklnd.idl import ConnType, LnetMsgType
from lu2k.socklnd.proto import Hello, LnetHdr

from socklnd_node import FakeNode, open_from, privileged

pytestmark = pytest.mark.timeout(20)  # a hang guard; nothing here measures time

_hop_ports = itertools.count(41830)
GW_A, GW_B = parse_nid("127.83.1.1@tcp"), parse_nid("127.83.2.1@tcp1")
NODE_A, NODE_B = parse_nid("127.83.1.2@tcp"), parse_nid("127.83.2.2@tcp1")
HOP_A, HOP_B = parse_nid("10.83.0.1@tcp9"), parse_nid("10.83.0.2@tcp9")


def site_config(lan: str, hop: str, route_net: str, gw: str, port: int, hop_port: int, **opts: Any) -> Any:
    options = {"secure_accept": privileged(), "privileged_connect": privileged(), "timeout": 5, "connect_timeout": 2,
               "keepalive": 1, "probe_interval": 0.2, **opts}
    return parse_config({
        "net": [
            {"net type": lan.rpartition("@")[2], "local NI(s)": [{"nid": lan, "tunables": {"credits": 4, "peer_credits": 8}}],
             "lu2k": {"backend": "socklnd", "port": port, "options": options}},
            {"net type": "tcp9", "local NI(s)": [{"nid": hop}],
             "lu2k": {"backend": "inproc", "port": hop_port, "key": "socklnd-test-key", "max_message_size": 2 << 20}},
        ],
        "route": [{"net": route_net, "gateway": gw}],
        "routing": {"enable": 1},
        "global": {"transaction_timeout": 5, "connect_timeout": 1, "reconnect_min": 0.05, "reconnect_max": 0.2},
    })


@dataclass
class Site:
    engine: Engine
    lan: LanNets
    node: FakeNode

    @property
    def driver(self) -> SocklndDriver:
        return next(iter(self.lan.drivers.values()))

    async def stop(self) -> None:
        await self.node.close()
        await self.lan.stop(self.engine)
        await self.engine.stop()


async def start_site(cfg: Any, node_nid: Any, gw_nid: Any, port: int) -> Site:
    lan = LanNets(cfg)
    engine = Engine(lan.core_config())
    await engine.start(with_shim=False)
    await lan.start(engine)
    node = FakeNode(node_nid, port, gw_nid)
    await node.start()
    return Site(engine, lan, node)


async def until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.02)


@pytest.fixture
async def sites(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Site, Site]]:
    opts = getattr(request, "param", {})
    port, hop_port = free_port(GW_A.host, NODE_A.host, GW_B.host, NODE_B.host), next(_hop_ports)  # each LAN party on its own address
    a = await start_site(site_config(str(GW_A), str(HOP_A), "tcp1", str(HOP_B), port, hop_port, **opts), NODE_A, GW_A, port)
    b = await start_site(site_config(str(GW_B), str(HOP_B), "tcp", str(HOP_A), port, hop_port, **opts), NODE_B, GW_B, port)
    await a.node.connect_gateway()
    yield a, b
    await a.stop()
    await b.stop()


async def test_put_and_get_across_the_lu2k_hop(sites: tuple[Site, Site]) -> None:
    a, b = sites
    data = bytes(range(256)) * 400  # 100 KiB: the sender marks it zero-copy and waits for its ZC-ACK
    ack = await a.node.put(NODE_B, 5, data)
    assert ack is not None and ack.hdr.type is LnetMsgType.ACK and ack.hdr.mlength == len(data)
    assert ack.hdr.src_nid == idl.nid4_of(NODE_B)
    assert b.node.portals[5] == data
    reply = await a.node.get(NODE_B, 5, len(data))
    assert reply.hdr.type is LnetMsgType.REPLY and bytes(reply.payload) == data
    # lu2kd-B connected to node B itself: typed V3 connections, from a privileged port when it may.
    await until(lambda: len(b.driver.peers[idl.nid4_of(NODE_B)].conns) == 3)
    assert sorted(c.ctype.name for c in b.driver.peers[idl.nid4_of(NODE_B)].conns) == ["BULK_IN", "BULK_OUT", "CONTROL"]
    small = await a.node.put(NODE_B, 6, b"tiny")
    assert small is not None and b.node.portals[6] == b"tiny"
    assert a.driver.stats["forwarded"] == 3 and a.driver.rx_msgs == 0


async def test_ping_the_gateway_lists_both_sides_up(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    await until(lambda: a.driver.remote_up.get(Net("tcp", 1), False))
    info = await a.node.ping(GW_A)
    nis = dict(info.nis)
    assert nis[idl.nid4_of(GW_A)] == idl.LNET_NI_STATUS_UP
    assert nis[idl.nid4_of(parse_nid("127.83.1.1@tcp1"))] == idl.LNET_NI_STATUS_UP
    assert not info.features & idl.PING_FEAT_RTE_DISABLED


async def test_ping_the_far_gateway_across(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    info = await a.node.ping(GW_B)  # answered by lu2kd-B, the reply crosses back over lu2k
    assert idl.nid4_of(GW_B) in dict(info.nis)


async def test_discovery_push_is_acked(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    pushed = proto.PingInfo(idl.PING_FEAT_NI_STATUS, [(idl.LNET_NID_LO_0, 1), (idl.nid4_of(NODE_A), idl.LNET_NI_STATUS_UP)]).pack()
    cookie, fut = a.node._expect()
    hdr = LnetHdr(LnetMsgType.PUT, idl.nid4_of(GW_A), idl.nid4_of(NODE_A), payload_length=len(pushed), wmd=(7, cookie),
                  match_bits=idl.LNET_PROTO_PING_MATCHBITS, ptl_index=0)
    await a.node.send(hdr.pack(), pushed)
    ack = await fut
    assert ack.hdr.type is LnetMsgType.ACK
    assert a.driver.pushed[idl.nid4_of(NODE_A)][1][0] == idl.nid4_of(NODE_A)


async def test_dead_satellite_hop_reports_the_remote_ni_down(sites: tuple[Site, Site]) -> None:
    a, b = sites
    await until(lambda: a.driver.remote_up.get(Net("tcp", 1), False))
    # The satellite hop goes down: lu2kd-B's lu2k net is gone and lu2kd-A's connection with it.
    await b.engine.remove_net(Net("tcp", 9), "satellite hop down")
    a.engine.drop_peer(HOP_B, "satellite hop down")
    await until(lambda: not a.driver.remote_up[Net("tcp", 1)])
    info = await a.node.ping(GW_A)
    assert dict(info.nis)[idl.nid4_of(parse_nid("127.83.1.1@tcp1"))] == idl.LNET_NI_STATUS_DOWN
    assert dict(info.nis)[idl.nid4_of(GW_A)] == idl.LNET_NI_STATUS_UP
    # Traffic for the dead net is dropped at once (as a router with a dead remote NI), not held.
    assert await a.node.put(NODE_B, 5, b"lost", ack=False) is None
    await until(lambda: a.driver.stats["dropped_remote_down"] == 1)
    assert a.driver.rx_msgs == 0


@pytest.mark.parametrize("sites", [{"max_queued": 64, "tx_buffer_size": 65536, "rx_buffer_size": 65536}], indirect=True)
async def test_back_pressure_reaches_the_sending_node(sites: tuple[Site, Site]) -> None:
    a, b = sites
    await a.node.put(NODE_B, 5, b"warm-up")  # lu2kd-B has its connections to node B
    b.node.read_paused.clear()  # node B stops reading: lu2kd-B cannot write, lu2k cannot finish
    # 12 MiB: far more than the window (4 messages) and the 64 KiB socket buffers on the way
    # (node A -> lu2kd-A, lu2kd-B -> node B), so the sender cannot finish before node B reads again.
    msgs = [bytes([i]) * (512 << 10) for i in range(24)]

    async def blast() -> None:
        for i, m in enumerate(msgs):
            await a.node.put(NODE_B, 10 + i, m, ack=False)

    sender = asyncio.ensure_future(blast())
    bulk = a.driver.windows["bulk"]
    await until(lambda: not bulk.space.is_set())  # lu2kd-A stopped reading node A's bulk sockets
    assert bulk.msgs <= bulk.max_msgs + 1
    # ... but still reads its CONTROL connections: the node's ping of its gateway is answered.
    info = await a.node.ping(GW_A)
    assert dict(info.nis)[idl.nid4_of(GW_A)] == idl.LNET_NI_STATUS_UP
    assert not sender.done() and not bulk.space.is_set()
    b.node.read_paused.set()
    await sender
    await until(lambda: all(10 + i in b.node.portals for i in range(len(msgs))))
    assert all(b.node.portals[10 + i] == m for i, m in enumerate(msgs))
    await until(lambda: a.driver.rx_msgs == 0)


# -- bad input from the LAN: refused or closed with a logged reason, nothing else affected ---------


async def raw_conn(privileged_port: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await open_from(NODE_A.host, GW_A.host, GW_ACCEPT_PORT[0], privileged_port)


GW_ACCEPT_PORT: list[int] = [0]


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    """Everything until lu2kd closes (a close with our bytes unread arrives as a reset)."""
    got = b""
    try:
        while chunk := await reader.read(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


STRANGER = parse_nid("127.83.1.9@tcp")  # the raw connections claim their own NID, not node A's


def good_prefix() -> bytes:
    return proto.encode_connreq(idl.nid4_of(GW_A)) + Hello(3, idl.nid4_of(STRANGER), idl.nid4_of(GW_A), 12345, 0, 77, 0,
                                                          ConnType.CONTROL).pack()


BAD_CASES = ["wrong magic", "wrong acceptor version", "wrong hello version", "truncated hello", "absurd payload length"]


def bad_bytes(case: str) -> tuple[bytes, str]:
    gw4 = idl.nid4_of(GW_A)
    if case == "wrong hello version":
        return proto.encode_connreq(gw4) + struct.pack("<II", idl.LNET_PROTO_MAGIC, 7), "hello version 7 not supported"
    if case == "truncated hello":
        return good_prefix()[:40], "in the middle of the hello body"
    if case == "absurd payload length":
        hdr = bytearray(LnetHdr(LnetMsgType.PUT, idl.nid4_of(NODE_B), idl.nid4_of(STRANGER)).pack())
        hdr[28:32] = (4_000_000_000).to_bytes(4, "little")
        return good_prefix() + struct.pack("<IIQQ", 0xC1, 0, 0, 0) + bytes(hdr), "claims a 4000000000-byte payload"
    if case == "wrong magic":
        return struct.pack("<IIQ", 0x0BADF00D, 1, 0), "bad acceptor magic 0x0badf00d"
    return struct.pack("<IIQ", idl.LNET_PROTO_ACCEPTOR_MAGIC, 9, 0), "acceptor protocol version 9"


@pytest.mark.parametrize("case", BAD_CASES)
async def test_bad_lan_input_closes_only_that_connection(sites: tuple[Site, Site], case: str) -> None:
    a, b = sites
    GW_ACCEPT_PORT[0] = a.driver.address[1]
    data, reason = bad_bytes(case)
    with structlog.testing.capture_logs() as logs:
        reader, writer = await raw_conn(privileged())
        writer.write(data)
        await writer.drain()
        if case == "truncated hello":
            writer.write_eof()
        await read_to_close(reader)  # lu2kd closes it (after a refusal hello, for a version it does not speak)
        writer.close()
        await until(lambda: any(reason in str(e.get("reason", "")) for e in logs))
    assert a.driver.stats["conns_refused"] + a.driver.stats["bad_frames"] == 1
    ack = await a.node.put(NODE_B, 5, b"still fine")  # the node's own connections carry on
    assert ack is not None and b.node.portals[5] == b"still fine"


@pytest.mark.skipif(not privileged(), reason="secure accept needs a privileged port to compare with (run as root)")
async def test_unprivileged_source_port_is_refused_with_secure_accept(sites: tuple[Site, Site]) -> None:
    a, b = sites
    GW_ACCEPT_PORT[0] = a.driver.address[1]
    with structlog.testing.capture_logs() as logs:
        reader, writer = await raw_conn(False)
        writer.write(good_prefix())
        await writer.drain()
        assert await read_to_close(reader) == b""  # closed before a hello reply
        writer.close()
        await until(lambda: any("insecure source port" in str(e.get("reason", "")) for e in logs))
    assert a.driver.stats["conns_refused"] == 1
    assert await a.node.put(NODE_B, 5, b"ok") is not None


async def test_transmit_checks_the_encapsulation(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    done: list[tuple[Status, str]] = []
    d = a.driver
    node4 = idl.nid4_of(NODE_A)
    hdr = LnetHdr(LnetMsgType.PUT, node4, idl.nid4_of(NODE_B), payload_length=5).pack()
    d.transmit(NODE_B.to_bytes(), NODE_A.to_bytes(), 0, 3, hdr + b"12345", lambda s, r: done.append((s, r)))
    d.transmit(NODE_B.to_bytes(), NODE_A.to_bytes(), 0, idl.LNET_PORTAL, hdr + b"1234", lambda s, r: done.append((s, r)))
    d.transmit(NODE_B.to_bytes(), NODE_A.to_bytes(), 0, idl.LNET_PORTAL, b"short", lambda s, r: done.append((s, r)))
    d.transmit(NODE_B.to_bytes(), GW_A.to_bytes(), 0, idl.LNET_PORTAL, hdr + b"12345", lambda s, r: done.append((s, r)))
    assert [s for s, _ in done] == [Status.INVALID, Status.PROTOCOL, Status.PROTOCOL, Status.PROTOCOL]
    assert "portal 3" in done[0][1] and "says 5 payload bytes" in done[1][1] and "differs" in done[3][1]


@pytest.mark.parametrize("sites", [{"protocol": 2}], indirect=True)
async def test_protocol_v2_towards_the_node(sites: tuple[Site, Site]) -> None:
    a, b = sites
    data = b"v2" * 20000
    assert await a.node.put(NODE_B, 7, data) is not None
    assert b.node.portals[7] == data
    conns = b.driver.peers[idl.nid4_of(NODE_B)].conns
    assert conns and all(c.core.version == 2 for c in conns)


@pytest.mark.parametrize("sites", [{"connect_timeout": 0.3}], indirect=True)
async def test_a_stalled_hello_is_closed_after_connect_timeout(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    GW_ACCEPT_PORT[0] = a.driver.address[1]
    with structlog.testing.capture_logs() as logs:
        reader, writer = await raw_conn(privileged())
        writer.write(good_prefix()[:30])  # and then nothing, connection left open
        await writer.drain()
        await read_to_close(reader)
        writer.close()
        await until(lambda: any("no hello within" in str(e.get("reason", "")) for e in logs))
    assert a.driver.stats["conns_refused"] == 1


async def test_messages_before_bad_bytes_are_still_forwarded(sites: tuple[Site, Site]) -> None:
    a, b = sites
    GW_ACCEPT_PORT[0] = a.driver.address[1]
    put = LnetHdr(LnetMsgType.PUT, idl.nid4_of(NODE_B), idl.nid4_of(STRANGER), payload_length=5,
                  wmd=(idl.LNET_WIRE_HANDLE_COOKIE_NONE, 0), ptl_index=8).pack()
    with structlog.testing.capture_logs() as logs:
        reader, writer = await raw_conn(privileged())
        writer.write(good_prefix() + proto.encode_lnet(put, 5) + b"hello" + struct.pack("<IIQQ", 0xC9, 0, 0, 0))
        await writer.drain()
        await read_to_close(reader)
        writer.close()
        await until(lambda: any("unknown ksock message type 0xc9" in str(e.get("reason", "")) for e in logs))
    await until(lambda: 8 in b.node.portals)
    assert b.node.portals[8] == b"hello" and a.driver.stats["conns_refused"] + a.driver.stats["bad_frames"] == 1


def test_socket_errors_are_worded_by_errno() -> None:
    # asyncio's sock_connect raises OSError(errno, "Connect call failed (addr)"): the reason is the errno's
    refused = OSError(errno.ECONNREFUSED, "Connect call failed ('127.83.1.9', 988)")
    e = _translate(refused, _CONNECT_ERRORS, "connect to 127.83.1.9:988")
    assert type(e) is ConnectError and str(e) == "connect to 127.83.1.9:988: Connection refused"
    e = _translate(OSError(errno.EHOSTUNREACH, "Connect call failed ('10.0.0.9', 988)"), _CONNECT_ERRORS, "connect to 10.0.0.9:988")
    assert str(e) == "connect to 10.0.0.9:988: No route to host"
    assert isinstance(_translate(asyncio.TimeoutError(), _CONNECT_ERRORS, "connect"), ConnectTimeout)
    e = _translate(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), _IO_ERRORS, "read from x")
    assert type(e) is ReadError and str(e) == "read from x: Connection reset by peer"
    assert str(_translate(OSError("no errno"), _IO_ERRORS, "read from x")) == "read from x: no errno"
