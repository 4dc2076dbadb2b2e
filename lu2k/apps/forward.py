"""The asyncio side of ``lu2k forward``: TCP sockets and one endpoint around :mod:`.forward_proto`.

* :class:`ForwardClient` -- the listening site: accepts TCP connections (``--listen``) or
  SOCKS5 clients (``--socks``) and opens a flow to the far site's service for each;
* :class:`ForwardService` -- the far site: opens the TCP connection for each allowed
  flow (``--serve --allow HOST:PORT``), on :data:`~.portal.FORWARD_PORTAL`.

Both sides use :class:`_Pump` for an open flow: one task reads the socket as far as the
peer's window allows and sends DATA; one task writes what arrives, in order, and returns
WINDOW as the socket drains.  Many flows share one endpoint and so one lu2k peer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, Lu2kError, RemoteProtocolError, ShimError, Status
from ..kernel_shim.endpoint import AsyncEndpoint, Completion, pack_nid
from ..nid import Nid
from . import forward_proto as fp
from . import portal as portals

log = logging.getLogger("lu2k.forward")

CONNECT_TIMEOUT = 15.0
OPEN_TIMEOUT = 60.0
DEFAULT_MAX_FLOWS = 1024

Key = tuple[bytes, int, int]  # peer NID (packed), peer portal, flow id

# Why connecting to a target failed, by exception type (first match in order), then by errno
# for the plain OSErrors the kernel raises without a subclass.  Never by message text.
CONNECT_REFUSALS: dict[type[BaseException], fp.Refusal] = {
    socket.gaierror: fp.Refusal.NO_SUCH_HOST,
    UnicodeError: fp.Refusal.NO_SUCH_HOST,  # a name IDNA cannot encode
    ConnectionRefusedError: fp.Refusal.CONNECTION_REFUSED,
    TimeoutError: fp.Refusal.TIMED_OUT,  # also asyncio.TimeoutError
}
CONNECT_REFUSALS_BY_ERRNO: dict[int, fp.Refusal] = {
    errno.ENETUNREACH: fp.Refusal.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: fp.Refusal.HOST_UNREACHABLE,
    errno.EHOSTDOWN: fp.Refusal.HOST_UNREACHABLE,
    errno.ETIMEDOUT: fp.Refusal.TIMED_OUT,
    errno.ECONNREFUSED: fp.Refusal.CONNECTION_REFUSED,
}


def refusal_for(exc: BaseException) -> fp.Refusal:
    """The :class:`~.forward_proto.Refusal` for an exception from resolving or connecting."""
    for kind, cause in CONNECT_REFUSALS.items():
        if isinstance(exc, kind):
            return cause
    if isinstance(exc, OSError) and exc.errno is not None:
        return CONNECT_REFUSALS_BY_ERRNO.get(exc.errno, fp.Refusal.FAILURE)
    return fp.Refusal.FAILURE


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), so the application sees a reset, not an EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Pump:
    """Moves one open flow's bytes between its TCP socket and lu2k messages."""

    def __init__(self, owner: "_FlowTable", key: Key, flow: fp.Flow, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, label: str) -> None:
        self.owner, self.key, self.flow = owner, key, flow
        self.reader, self.writer, self.label = reader, writer, label
        self.window_open = asyncio.Event()
        self.incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.done = asyncio.Event()
        self.read_done = self.write_done = False

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._read_side()), asyncio.ensure_future(self._write_side())]

    def on_message(self, m: fp.Message) -> None:
        try:
            pieces = self.flow.on_message(m)
        except RemoteProtocolError as e:
            self.reset(f"protocol error from the far side: {e}", tell_peer=True)
            raise
        for p in pieces:
            self.incoming.put_nowait(p)
        if self.flow.eof_in:
            self.incoming.put_nowait(None)
        if m.kind is fp.Kind.WINDOW and self.flow.sendable():
            self.window_open.set()
        if m.kind is fp.Kind.RST:
            log.info("%s: reset by the far side: %s", self.label, m.text)
            self._finish(abort=True)

    def reset(self, reason: str, *, tell_peer: bool) -> None:
        if self.flow.closed and not tell_peer:
            self._finish(abort=True)
            return
        msg = self.flow.rst(reason)
        if tell_peer:
            self.owner.send(self.key, msg, None)
        log.info("%s: reset: %s", self.label, reason)
        self._finish(abort=True)

    def _finish(self, *, abort: bool) -> None:
        if self.done.is_set():
            return
        self.done.set()
        if abort:
            _abort(self.writer)
        else:
            self.writer.close()
        for t in self.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self.window_open.set()
        self.owner.forget(self.key)

    def _side_done(self, side: str) -> None:
        """One direction finished cleanly (FIN sent / EOF written); both: close the socket."""
        setattr(self, side, True)
        if self.read_done and self.write_done:
            self._finish(abort=False)

    async def _read_side(self) -> None:
        flow = self.flow
        try:
            while flow.can_send:
                n = flow.sendable()
                if n <= 0:
                    self.window_open.clear()
                    if flow.sendable() <= 0:
                        await self.window_open.wait()
                    continue
                data = await self.reader.read(min(n, fp.MAX_DATA))
                if not flow.can_send:
                    return
                if not data:
                    self.owner.send(self.key, flow.fin(), self)
                    self._side_done("read_done")
                    return
                self.owner.send(self.key, flow.data(data), self)
                await self.owner.sent_space()
        except (ConnectionError, OSError) as e:
            self.reset(f"reading the socket: {e.strerror or e}", tell_peer=True)
        except asyncio.CancelledError:
            pass

    async def _write_side(self) -> None:
        try:
            while True:
                piece = await self.incoming.get()
                if piece is None:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    self._side_done("write_done")
                    return
                self.writer.write(piece)
                await self.writer.drain()
                msg = self.flow.consumed(len(piece))
                if msg is not None:
                    self.owner.send(self.key, msg, self)
        except (ConnectionError, OSError) as e:
            self.reset(f"writing the socket: {e.strerror or e}", tell_peer=True)
        except asyncio.CancelledError:
            pass


class _FlowTable:
    """Flows of one endpoint, and sending on their behalf (failure resets the flow)."""

    def __init__(self, window: int, max_flows: int) -> None:
        self.window, self.max_flows = window, max_flows
        self.pumps: dict[Key, _Pump] = {}
        self.ep: AsyncEndpoint | None = None
        self.counters = {"flows": 0, "refused": 0, "reset": 0}

    def forget(self, key: Key) -> None:
        self.pumps.pop(key, None)

    async def sent_space(self) -> None:
        """Yield so completions and other flows run; the TX pool itself back-pressures ``send``."""
        await asyncio.sleep(0)

    def send(self, key: Key, payload: bytes, pump: _Pump | None) -> None:
        ep = self.ep
        if ep is None:
            if pump is not None:
                pump.reset("local lu2kd not attached", tell_peer=False)
            return

        async def go() -> None:
            try:
                comp = await ep.send(key[0], payload, key[1])
            except ShimError as e:
                if pump is not None:
                    pump.reset(f"local lu2kd: {e}", tell_peer=False)
                return
            if pump is not None:
                comp.add_done_callback(lambda c: self._sent(c, pump))

        asyncio.ensure_future(go())

    def _sent(self, c: Completion, pump: _Pump) -> None:
        if c.status is not Status.DELIVERED:
            st = c.status or Status.PROTOCOL
            pump.reset(f"far side unreachable: {c.reason or st.describe()}", tell_peer=False)


def _peer_name(raw: bytes) -> str:
    try:
        return str(Nid.from_bytes(raw))
    except Lu2kError:
        return raw.hex()


class ForwardService(_FlowTable):
    """The far site: connects allowed targets for flows opened by any peer."""

    def __init__(self, socket_path: str | None, rules: list[fp.AllowRule], *, portal: int = portals.FORWARD_PORTAL,
                 window: int = fp.DEFAULT_WINDOW, max_flows: int = DEFAULT_MAX_FLOWS, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        super().__init__(window, max_flows)
        if not rules:
            raise ConfigError("the forward service needs at least one --allow HOST:PORT (it connects only to allowed targets)",
                              where="--allow")
        self.rules = rules
        self.connect_timeout = connect_timeout
        self.opening: set[Key] = set()
        self.service = portals.Service(socket_path, portal, self._on_message, rx_pool_bytes=256 << 20, tx_pool_bytes=256 << 20,
                                       on_attach=self._attached)

    def _attached(self, ep: AsyncEndpoint) -> None:
        self.ep = ep

    async def run(self) -> None:
        await self.service.run()

    def _on_message(self, src: bytes, src_portal: int, payload: memoryview) -> None:
        m = fp.decode(payload)
        key = (src, src_portal, m.flow)
        if m.kind is fp.Kind.OPEN:
            if key in self.pumps or key in self.opening:
                return
            self.opening.add(key)
            asyncio.ensure_future(self._open(key, m))
            return
        pump = self.pumps.get(key)
        if pump is not None:
            pump.on_message(m)
        elif m.kind not in (fp.Kind.RST, fp.Kind.WINDOW):
            self.send(key, fp.encode(fp.Message(fp.Kind.RST, m.flow, 0, "no such flow here (the forward service restarted?)")), None)

    async def _open(self, key: Key, m: fp.Message) -> None:
        flow = fp.Flow(m.flow, self.window, opener=False)
        peer = _peer_name(key[0])
        try:
            reason, cause = None, fp.Refusal.FAILURE
            try:
                host, port = fp.parse_hostport(m.text, what="OPEN target")
            except ConfigError as e:
                host, port, reason = "", 0, str(e)
            addresses: list[str] = []
            if reason is None and len(self.pumps) >= self.max_flows:
                reason, cause = f"too many flows ({self.max_flows})", fp.Refusal.TOO_MANY_FLOWS
            # A name no rule could admit is refused without asking DNS about it.
            if reason is None and not fp.could_allow(self.rules, host, port):
                reason, cause = f"{m.text} is not allowed by this forward service", fp.Refusal.NOT_ALLOWED
            if reason is None:
                try:
                    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
                    addresses = sorted({str(i[4][0]) for i in infos})
                except (socket.gaierror, UnicodeError) as e:
                    reason, cause = f"{host}: no such host ({e.strerror if isinstance(e, OSError) else e})", refusal_for(e)
            if reason is None and fp.allowed(self.rules, host, addresses, port) is None:
                reason, cause = f"{m.text} is not allowed by this forward service", fp.Refusal.NOT_ALLOWED
            if reason is None:
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(addresses[0], port), self.connect_timeout)
                except asyncio.TimeoutError as e:
                    reason, cause = f"{m.text}: no answer within {self.connect_timeout:.0f} s", refusal_for(e)
                except OSError as e:
                    reason, cause = f"{m.text}: {os.strerror(e.errno) if e.errno else e}", refusal_for(e)
            if reason is not None:
                self.counters["refused"] += 1
                log.warning("flow from %s to %s refused: %s", peer, m.text, reason)
                self.send(key, flow.refuse(reason, cause), None)
                return
            pump = _Pump(self, key, flow, reader, writer, f"{peer} -> {m.text}")
            self.pumps[key] = pump
            self.counters["flows"] += 1
            self.send(key, flow.accept(min(m.value, fp.MAX_WINDOW)), pump)
            pump.start()
        finally:
            self.opening.discard(key)


class ForwardClient(_FlowTable):
    """The listening site: each accepted connection becomes a flow to ``dst``'s forward service."""

    def __init__(self, socket_path: str | None, dst: str, *, portal: int = portals.FORWARD_PORTAL, window: int = fp.DEFAULT_WINDOW,
                 max_flows: int = DEFAULT_MAX_FLOWS, say: Callable[[str], None] | None = None) -> None:
        super().__init__(window, max_flows)
        self.socket_path, self.dst, self.portal = socket_path, dst, portal
        self.dst_raw = pack_nid(dst)
        self.openers: dict[int, asyncio.Future[None]] = {}
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.servers: list[asyncio.base_events.Server] = []

    async def start(self) -> None:
        self.ep = await portals.attach(self.socket_path, None, tx_pool_bytes=256 << 20, rx_pool_bytes=256 << 20)
        self.rx = asyncio.ensure_future(portals.receive_loop(self.ep, self._on_message))

    async def listen(self, host: str, port: int, target: str | None) -> tuple[str, int]:
        """Accept on host:port; each connection goes to ``target`` (or SOCKS5 picks, when None)."""
        handler = self._socks if target is None else (lambda r, w: self._connection(r, w, target))
        try:
            server = await asyncio.start_server(handler, host, port)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}", where="--socks" if target is None else "--listen") from None
        self.servers.append(server)
        addr = server.sockets[0].getsockname()
        return str(addr[0]), int(addr[1])

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for p in list(self.pumps.values()):
            p.reset("forwarder shutting down", tell_peer=True)
        await asyncio.sleep(0.2)
        if self.ep is not None:
            self.rx.cancel()
            await self.ep.detach()

    def _on_message(self, src: bytes, src_portal: int, payload: memoryview) -> None:
        m = fp.decode(payload)
        pump = self.pumps.get((src, src_portal, m.flow))
        if pump is None:
            return
        pump.on_message(m)
        fut = self.openers.get(m.flow)
        if fut is not None and not fut.done() and m.kind in (fp.Kind.OPENED, fp.Kind.REFUSED, fp.Kind.RST):
            fut.set_result(None)

    async def _open_flow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         target: str) -> _Pump | tuple[str, fp.Refusal]:
        """Open a flow to ``target``; the started pump, or why it could not be opened."""
        if len(self.pumps) >= self.max_flows:
            return f"too many flows ({self.max_flows})", fp.Refusal.TOO_MANY_FLOWS
        flow_id = int.from_bytes(os.urandom(8), "little") or 1
        flow = fp.Flow(flow_id, self.window, opener=True)
        key = (self.dst_raw, self.portal, flow_id)
        peer = writer.get_extra_info("peername")
        pump = _Pump(self, key, flow, reader, writer, f"{peer[0]}:{peer[1]} -> {target}" if peer else target)
        self.pumps[key] = pump
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.openers[flow_id] = fut
        self.send(key, flow.open_message(target), pump)
        gone: asyncio.Future[Any] = asyncio.ensure_future(pump.done.wait())
        try:
            await asyncio.wait([fut, gone], timeout=OPEN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.openers.pop(flow_id, None)
            gone.cancel()
        if flow.state is fp.FlowState.OPEN:
            self.counters["flows"] += 1
            pump.start()
            return pump
        self.pumps.pop(key, None)
        if flow.refusal is not None:
            return flow.reason, flow.refusal
        if not pump.done.is_set():
            return f"no answer from {self.dst} within {OPEN_TIMEOUT:.0f} s", fp.Refusal.TIMED_OUT
        return flow.reason or "far side unreachable", fp.Refusal.FAR_SIDE_UNREACHABLE

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str) -> None:
        got = await self._open_flow(reader, writer, target)
        if isinstance(got, tuple):
            self.counters["refused"] += 1
            self.say(f"lu2k forward: connection to {target} via {self.dst} failed: {got[0]}")
            _abort(writer)

    async def _socks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readexactly(2), 30)
            methods = await reader.readexactly(head[1])
            reply, ok = fp.socks_greeting_reply(head + methods)
            writer.write(reply)
            if not ok:
                writer.close()
                return
            req = await asyncio.wait_for(reader.readexactly(5), 30)
            total = fp.socks_request_length(req) or 10
            req += await reader.readexactly(total - 5)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            writer.close()
            return
        parsed = fp.socks_parse_request(req)
        if isinstance(parsed, str):
            writer.write(fp.socks_reply(parsed))
            writer.close()
            return
        host, port = parsed
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        got = await self._open_flow(reader, writer, target)
        if isinstance(got, tuple):
            self.counters["refused"] += 1
            self.say(f"lu2k forward: SOCKS connection to {target} via {self.dst} failed: {got[0]}")
            writer.write(fp.socks_reply(fp.SOCKS_REPLY_FOR[got[1]]))
            writer.close()
            return
        writer.write(fp.socks_reply("ok"))


def stats(table: _FlowTable) -> dict[str, Any]:
    return {**table.counters, "open": len(table.pumps)}
