"""TCP backend, after socklnd: typed connections, BDP-sized buffers, per-net congestion control.

* Typed connections: the engine opens a CONTROL connection (TCP_NODELAY) for messages below
  ``min_bulk`` and a BULK connection for the rest, so a 4 MiB transfer never sits in front of
  a small RPC (socklnd's ``typed_conns``/``min_bulk``).
* Socket buffers: when the site profile gives rate and RTT, SO_SNDBUF/SO_RCVBUF are set to
  twice the bandwidth-delay product (the kernel halves what it reports); otherwise the
  kernel's autotuning is left alone.  ``options.socket_buffer`` overrides.
* Congestion control: ``options.congestion`` (e.g. ``bbr``, ``cubic``) per network; the
  default is ``bbr`` where the kernel offers it, else the system default.
* Zero copy: frames go out with one ``sendmsg`` of header/payload iovecs straight from
  shared memory; large payloads are ``recv_into`` the buffer the engine supplies.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError, ConnectError, ConnectionClosed, ConnectTimeout, ReadError, WriteError
from ..wire import BufferFor, ConnType, Frame, FrameDecoder
from .base import AcceptCallback, Backend, BackendSettings, Listener, OutFrame, Transport, option_int

IOV_MAX = 1024
RECV_CHUNK = 256 << 10
DIRECT_RECV_MIN = 16 << 10  # payload remainder above this is received straight into place
KNOWN_OPTIONS = frozenset({"min_bulk", "congestion", "socket_buffer"})


def available_congestion_controls() -> list[str]:
    try:
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
            return f.read().split()
    except OSError:
        return []


class TcpTransport(Transport):
    backend_name = "tcp"

    def __init__(self, sock: socket.socket, max_payload: int) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(max_payload)
        self._scratch = bytearray(RECV_CHUNK)
        self._closed = False
        self._send_lock = asyncio.Lock()
        try:
            peer = sock.getpeername()
            self._peer = f"{peer[0]}:{peer[1]}"
        except OSError:
            self._peer = "?"
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def peer_address(self) -> str:
        return self._peer

    def set_buffer_for(self, buffer_for: BufferFor | None) -> None:
        self._decoder._buffer_for = buffer_for

    async def _wait(self, writable: bool) -> None:
        fut = self._loop.create_future()
        fd = self._sock.fileno()
        add, remove = (self._loop.add_writer, self._loop.remove_writer) if writable else (self._loop.add_reader, self._loop.remove_reader)
        add(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            remove(fd)

    async def send(self, frames: Sequence[OutFrame]) -> None:
        iov: list[memoryview] = []
        for header, payload in frames:
            iov.append(memoryview(header))
            if len(payload):
                iov.append(memoryview(payload).cast("B"))
        async with self._send_lock:
            while iov:
                if self._closed:
                    raise WriteError(f"connection to {self._peer} closed")
                try:
                    sent = self._sock.sendmsg(iov[:IOV_MAX])
                except (BlockingIOError, InterruptedError):
                    await self._wait(writable=True)
                    continue
                except OSError as e:
                    raise WriteError(f"send to {self._peer} failed: {e.strerror or e}") from None
                self.bytes_sent += sent
                # Drop what went out; keep the rest as views (no copy).
                while sent and iov:
                    if sent >= len(iov[0]):
                        sent -= len(iov[0])
                        iov.pop(0)
                    else:
                        iov[0] = iov[0][sent:]
                        sent = 0

    async def recv(self) -> list[Frame]:
        decoder = self._decoder
        while True:
            frames = decoder.frames()
            if frames:
                return frames
            if self._closed:
                raise ReadError(f"connection to {self._peer} closed locally")
            target = decoder.payload_target()
            direct = target is not None and len(target) >= DIRECT_RECV_MIN
            try:
                n = self._sock.recv_into(target if direct else self._scratch)  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except OSError as e:
                raise ReadError(f"receive from {self._peer} failed: {e.strerror or e}") from None
            if n == 0:
                if decoder.at_boundary():
                    raise ConnectionClosed(f"{self._peer} closed the connection")
                raise ReadError(f"{self._peer} closed the connection in the middle of a frame")
            self.bytes_received += n
            if direct:
                decoder.payload_filled(n)
            else:
                decoder.feed(memoryview(self._scratch)[:n])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._sock.close()
            except OSError:
                pass

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}
        if not self._closed:
            try:
                out["congestion"] = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
            except OSError:
                pass
        return out


class TcpListener(Listener):
    def __init__(self, sock: socket.socket, on_ready: Any) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), on_ready)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def close(self) -> None:
        try:
            self._loop.remove_reader(self._sock.fileno())
        except (ValueError, OSError):
            pass
        self._sock.close()


class TcpBackend(Backend):
    name = "tcp"
    typed_connections = True

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        opts = settings.options
        where = f"net {settings.net}"
        unknown = sorted(set(opts) - KNOWN_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown tcp option(s) {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_OPTIONS))})", where=where)
        self.min_bulk = option_int(opts, "min_bulk", 1024, 0, 1 << 30, where, what="a byte count")
        cc = opts.get("congestion")
        available = available_congestion_controls()
        if cc is None:
            cc = "bbr" if "bbr" in available else None
        elif available and cc not in available:
            raise ConfigError(f"congestion control {cc!r} is not offered by this kernel (have: {', '.join(available)})", where=f"net {settings.net}")
        self.congestion: str | None = cc
        buf = opts.get("socket_buffer")
        if buf is None and settings.profile.rate_mbit and settings.profile.rtt_ms:
            buf = 2 * settings.profile.bdp_bytes()
        self.socket_buffer: int | None = option_int({} if buf is None else {"socket_buffer": buf}, "socket_buffer", 0, 0, 1 << 30, where,
                                                    what="a byte count") or None
        self._tasks: set[asyncio.Task[None]] = set()

    def _tune(self, sock: socket.socket, conn_type: ConnType) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # we batch ourselves
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self.socket_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.socket_buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.socket_buffer)
        if self.congestion:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.congestion.encode())
            except OSError as e:
                raise ConfigError(f"cannot set congestion control {self.congestion!r}: {e.strerror}", where=f"net {self.settings.net}") from None

    def _family(self, host: str) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in host else socket.AF_INET

    async def listen(self, host: str, port: int, on_accept: AcceptCallback) -> Listener:
        sock = socket.socket(self._family(host), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.socket_buffer:  # must be set before listen() to size the window scale
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.socket_buffer)
        try:
            sock.bind((host, port))
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise ConnectError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        sock.setblocking(False)

        def ready() -> None:
            while True:
                try:
                    conn, _addr = sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    return
                conn.setblocking(False)
                try:
                    self._tune(conn, ConnType.ANY)
                except (ConfigError, OSError):
                    conn.close()
                    continue
                task = asyncio.ensure_future(on_accept(TcpTransport(conn, self.settings.max_message_size)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        return TcpListener(sock, ready)

    async def connect(self, host: str, port: int, conn_type: ConnType, timeout: float) -> Transport:
        sock = socket.socket(self._family(host), socket.SOCK_STREAM)
        try:
            self._tune(sock, conn_type)
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
        except asyncio.TimeoutError:
            sock.close()
            raise ConnectTimeout(f"connect to {host}:{port} timed out after {timeout:g}s") from None
        except OSError as e:
            sock.close()
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise ConnectError(f"connect to {host}:{port} failed: {reason}") from None
        except BaseException:
            sock.close()
            raise
        return TcpTransport(sock, self.settings.max_message_size)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def describe(self) -> dict[str, Any]:
        return {
            "congestion": self.congestion or "system default",
            "socket_buffer": self.socket_buffer or "autotuned",
            "min_bulk": self.min_bulk,
        }

