"""A pure-Python stand-in for a kernel LNet node on a socklnd LAN, built from lu2k.socklnd's codecs.

It is NOT the kernel: it speaks what lu2k's codecs speak, so it proves the driver's plumbing
(acceptor, typed connections, routing, ping answers, back-pressure, bad-input handling), not
compatibility with ksocklnd.  The guest tier runs Lustre's own modules for that.

Like a kernel node it: accepts connections on its acceptor port; connects to its gateway from
a privileged port (when it may) with CONTROL, BULK_IN and BULK_OUT; marks payloads of 16 KiB
or more with a ZC request and counts a send complete only when the ZC-ACK comes back;
answers PUTs on its portals with an ACK (when asked) and GETs with a REPLY of what was PUT there;
answers a ping GET (portal 0, LNET_PROTO_PING_MATCHBITS) with a REPLY of its ping info, cut to
the GET's offset and sink length, as its ping target MD does (``ping_nis`` adds NIs to it,
``ping_reply`` replaces it with raw bytes, ``answer_pings = False`` drops ping GETs silently as
an LNet whose ping target does not match).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from dataclasses import dataclass, field

from lu2k.nid import Nid
from lu2k.socklnd import idl
from lu2k.socklnd.conn import ConnConfig, Established, KsockConnection, LnetReceived, ZcAcked
from lu2k.socklnd.idl import ConnType, LnetMsgType
from lu2k.socklnd.proto import LnetHdr, PingInfo

ZC_MIN = 16 << 10
_cookies = itertools.count(1000)


def privileged() -> bool:
    return os.geteuid() == 0


@dataclass(eq=False)
class NodeConn:
    core: KsockConnection
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    zc_waiters: dict[int, asyncio.Future[None]] = field(default_factory=dict)

    async def flush(self) -> None:
        out = self.core.data_to_send()
        if out:
            self.writer.writelines(out)
            await self.writer.drain()


def small_buffers(writer: asyncio.StreamWriter) -> None:
    """64 KiB socket buffers, so back-pressure shows after a few messages, not tens of MiB."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)


class FakeNode:
    def __init__(self, nid: Nid, port: int, gateway: Nid, *, gateway_port: int | None = None) -> None:
        self.nid, self.port, self.gateway = nid, port, gateway
        self.gateway_port = gateway_port or port
        self.nid4 = idl.nid4_of(nid)
        self.config = ConnConfig(local_nids=frozenset({self.nid4}), incarnation=int.from_bytes(os.urandom(7), "little"))
        self.conns: list[NodeConn] = []
        self.portals: dict[int, bytes] = {}  # what was PUT on each portal
        self.waiters: dict[int, asyncio.Future[LnetReceived]] = {}  # by the wmd object cookie we sent
        self.received: list[LnetReceived] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.read_paused = asyncio.Event()
        self.read_paused.set()  # set = reading
        self.features = idl.PING_FEAT_NI_STATUS | idl.PING_FEAT_MULTI_RAIL | idl.PING_FEAT_DISCOVERY
        self.ping_nis: list[tuple[int, int]] = []  # (nid4, status) listed after our own NID
        self.ping_reply: bytes | None = None
        self.answer_pings = True
        self.ping_gets: list[LnetHdr] = []  # every ping GET received
        self.accepted_from: list[int] = []  # source ports of the connections we accepted

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, self.nid.host, self.port, reuse_address=True)

    async def close(self) -> None:
        if self.server:
            self.server.close()
        for c in self.conns:
            c.writer.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        t = asyncio.ensure_future(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted_from.append(int(writer.get_extra_info("peername")[1]))
        small_buffers(writer)
        c = NodeConn(KsockConnection(self.config, active=False), reader, writer)
        self.conns.append(c)
        await self._read(c)

    async def connect_gateway(self, host: str | None = None) -> None:
        """CONTROL, BULK_IN and BULK_OUT to the gateway, as ksocknal_connect opens them for V3."""
        for ctype in idl.V3_CONN_TYPES:
            reader, writer = await open_from(self.nid.host, host or self.gateway.host, self.gateway_port, privileged())
            small_buffers(writer)
            c = NodeConn(KsockConnection(self.config, active=True, local_nid=self.nid4, peer_nid=idl.nid4_of(self.gateway),
                                         ctype=ctype), reader, writer)
            self.conns.append(c)
            await c.flush()
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._spawn(self._read(c, ready))
            await ready

    async def _read(self, c: NodeConn, ready: asyncio.Future[None] | None = None) -> None:
        try:
            while True:
                await self.read_paused.wait()
                data = await c.reader.read(65536)
                if not data:
                    return
                c.core.receive_data(data)
                await c.flush()
                while (ev := c.core.next_event()) is not None:
                    if isinstance(ev, Established) and ready is not None and not ready.done():
                        ready.set_result(None)
                    elif isinstance(ev, ZcAcked):
                        for cookie in ev.cookies:
                            fut = c.zc_waiters.pop(cookie, None)
                            if fut and not fut.done():
                                fut.set_result(None)
                    elif isinstance(ev, LnetReceived):
                        await self._on_lnet(ev)
        finally:
            if ready is not None and not ready.done():
                ready.set_exception(ConnectionError("gateway connection failed"))

    async def _on_lnet(self, ev: LnetReceived) -> None:
        self.received.append(ev)
        h = ev.hdr
        if h.type in (LnetMsgType.ACK, LnetMsgType.REPLY):
            fut = self.waiters.pop(h.wmd[1], None)
            if fut and not fut.done():
                fut.set_result(ev)
        elif h.type is LnetMsgType.PUT:
            self.portals[h.ptl_index] = bytes(ev.payload)
            if h.wmd[0] != idl.LNET_WIRE_HANDLE_COOKIE_NONE:
                ack = LnetHdr(LnetMsgType.ACK, h.src_nid, self.nid4, wmd=h.wmd, match_bits=h.match_bits, mlength=h.payload_length)
                await self.send(ack.pack(), b"")
        elif h.type is LnetMsgType.GET and h.ptl_index == idl.LNET_RESERVED_PORTAL and h.match_bits == idl.LNET_PROTO_PING_MATCHBITS:
            self.ping_gets.append(h)
            if not self.answer_pings:
                return
            info = self.ping_info_bytes()
            data = info[h.offset : h.offset + h.sink_length]
            reply = LnetHdr(LnetMsgType.REPLY, h.src_nid, self.nid4, dest_pid=h.src_pid, payload_length=len(data), wmd=h.wmd)
            await self.send(reply.pack(), data)
        elif h.type is LnetMsgType.GET:
            data = self.portals.get(h.ptl_index, b"")[h.offset : h.offset + h.sink_length]
            reply = LnetHdr(LnetMsgType.REPLY, h.src_nid, self.nid4, payload_length=len(data), wmd=h.wmd)
            await self.send(reply.pack(), data)

    def ping_info_bytes(self) -> bytes:
        """What our ping target holds: 0@lo (sequence number 1), our NID UP, then ``ping_nis``."""
        if self.ping_reply is not None:
            return self.ping_reply
        nis = [(idl.LNET_NID_LO_0, 1), (self.nid4, idl.LNET_NI_STATUS_UP), *self.ping_nis]
        return PingInfo(self.features, nis).pack()

    async def reply(self, dst: Nid, wmd: tuple[int, int], data: bytes) -> None:
        """A REPLY nobody asked for (a stale or forged wmd)."""
        hdr = LnetHdr(LnetMsgType.REPLY, idl.nid4_of(dst), self.nid4, payload_length=len(data), wmd=wmd)
        await self.send(hdr.pack(), data)

    def _conn_for(self, size: int) -> NodeConn:
        want = ConnType.BULK_OUT if size >= 1024 else ConnType.CONTROL
        live = [c for c in self.conns if c.core.state.value == "established"]
        for c in live:
            if c.core.ctype is want:
                return c
        return live[0]

    async def send(self, raw_header: bytes, payload: bytes) -> None:
        """Send one LNet message; returns when the gateway took it (its ZC-ACK, for big payloads)."""
        c = self._conn_for(len(payload))
        cookie = c.core.send_lnet(raw_header, payload, zero_copy=len(payload) >= ZC_MIN)
        fut: asyncio.Future[None] | None = None
        if cookie:
            fut = c.zc_waiters[cookie] = asyncio.get_running_loop().create_future()
        await c.flush()
        if fut is not None:
            await fut  # the kernel holds the payload until the ZC-ACK

    def _expect(self) -> tuple[int, asyncio.Future[LnetReceived]]:
        cookie = next(_cookies)
        fut: asyncio.Future[LnetReceived] = asyncio.get_running_loop().create_future()
        self.waiters[cookie] = fut
        return cookie, fut

    async def put(self, dst: Nid, portal: int, data: bytes, *, ack: bool = True) -> LnetReceived | None:
        cookie, fut = self._expect()
        wmd = (7, cookie) if ack else (idl.LNET_WIRE_HANDLE_COOKIE_NONE, 0)
        hdr = LnetHdr(LnetMsgType.PUT, idl.nid4_of(dst), self.nid4, payload_length=len(data), wmd=wmd, match_bits=1, ptl_index=portal)
        await self.send(hdr.pack(), data)
        if not ack:
            self.waiters.pop(cookie, None)
            return None
        return await fut

    async def get(self, dst: Nid, portal: int, length: int, *, match_bits: int = 1) -> LnetReceived:
        cookie, fut = self._expect()
        hdr = LnetHdr(LnetMsgType.GET, idl.nid4_of(dst), self.nid4, wmd=(7, cookie), match_bits=match_bits, ptl_index=portal,
                      sink_length=length)
        await self.send(hdr.pack(), b"")
        return await fut

    async def ping(self, dst: Nid) -> PingInfo:
        got = await self.get(dst, idl.LNET_RESERVED_PORTAL, 4096, match_bits=idl.LNET_PROTO_PING_MATCHBITS)
        return PingInfo.unpack(got.payload)


async def open_from(local: str, host: str, port: int, privileged_port: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect from a privileged source port (1023 down) when allowed, else an ephemeral one."""
    loop = asyncio.get_running_loop()
    for lport in (range(1023, 511, -1) if privileged_port else (0,)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        try:
            sock.bind((local, lport))
            await loop.sock_connect(sock, (host, port))
        except OSError as e:
            sock.close()
            if e.errno in (98, 99):
                continue
            raise
        return await asyncio.open_connection(sock=sock)
    raise OSError("no privileged port free")
