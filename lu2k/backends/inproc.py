"""In-process backend: the reference backend, the size of LNet's ``lo.c``.

Daemons in one process reach each other through a registry of listeners keyed by
(host, port); frames travel over asyncio queues.  Used by the engine's tests and as the
smallest complete example of the backend API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..crypto import FrameCodec
from ..errors import ConnectError, ConnectionClosed, WriteError
from ..wire import BufferFor, ConnType, Frame, HelloResult
from .base import AcceptCallback, Backend, Listener, OutFrame, Transport

_LISTENERS: dict[tuple[str, int], "InprocListener"] = {}
_EOF = b""


class InprocTransport(Transport):
    backend_name = "inproc"

    def __init__(self, inbox: asyncio.Queue[bytes], outbox: asyncio.Queue[bytes], peer: str, max_payload: int) -> None:
        self._inbox, self._outbox, self._peer = inbox, outbox, peer
        self._codec = FrameCodec(max_payload, peer)
        self._closed = False

    @property
    def peer_address(self) -> str:
        return self._peer

    def set_buffer_for(self, buffer_for: BufferFor | None) -> None:
        self._codec.set_buffer_for(buffer_for)

    def on_hello_done(self, result: HelloResult) -> None:
        self._codec.hello_done(result)

    async def send(self, frames: Sequence[OutFrame]) -> None:
        if self._closed:
            raise WriteError(f"inproc connection to {self._peer} closed")
        # Copy: the payload buffers must be free again when send returns.  (No await before
        # the put, so sealing happens in the order the frames are queued.)
        self._outbox.put_nowait(b"".join(bytes(h) + bytes(p) for h, p in self._codec.outgoing(frames)))

    async def recv(self) -> list[Frame]:
        while not (frames := self._codec.decoder.frames()):
            data = await self._inbox.get()
            if data is _EOF:
                raise ConnectionClosed(f"inproc peer {self._peer} closed")
            self._codec.decoder.feed(data)
        return frames

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._outbox.put_nowait(_EOF)
            self._inbox.put_nowait(_EOF)


class InprocListener(Listener):
    def __init__(self, key: tuple[str, int], on_accept: AcceptCallback) -> None:
        self.key, self.on_accept = key, on_accept

    @property
    def address(self) -> tuple[str, int]:
        return self.key

    def close(self) -> None:
        _LISTENERS.pop(self.key, None)


class InprocBackend(Backend):
    name = "inproc"

    async def listen(self, host: str, port: int, on_accept: AcceptCallback) -> Listener:
        if (host, port) in _LISTENERS:
            raise ConnectError(f"inproc address {host}:{port} already in use")
        _LISTENERS[(host, port)] = listener = InprocListener((host, port), on_accept)
        return listener

    async def connect(self, host: str, port: int, conn_type: ConnType, timeout: float) -> Transport:
        listener = _LISTENERS.get((host, port))
        if listener is None:
            raise ConnectError(f"inproc connect to {host}:{port}: connection refused")
        a: asyncio.Queue[bytes] = asyncio.Queue()
        b: asyncio.Queue[bytes] = asyncio.Queue()
        limit = self.settings.max_message_size
        asyncio.ensure_future(listener.on_accept(InprocTransport(a, b, f"{host}:{port}<-client", limit)))
        return InprocTransport(b, a, f"{host}:{port}", limit)
