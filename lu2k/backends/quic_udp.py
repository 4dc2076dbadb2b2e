"""QUIC backend, UDP endpoint: reads datagrams in batches and lets connections transmit once per batch.

asyncio's datagram transport reads one datagram per event-loop iteration, and aioquic's
protocol answers every datagram with a full ``datagrams_to_send`` pass (timers, ACK
scheduling, stream walk).  At satellite rates that is thousands of loop iterations and send
passes per second for a few hundred useful ACK packets.  :class:`BatchedUdpEndpoint` reads
up to :data:`BATCH` datagrams per readiness, feeds each to the protocol, and defers the
protocols' ``transmit()`` calls to the end of the batch (one pass per connection per batch).

It offers the part of ``asyncio.DatagramTransport`` that aioquic's ``QuicServer`` and
``QuicConnectionProtocol`` use: ``sendto``, ``close``, ``is_closing``, ``get_extra_info``.
A full socket send buffer drops the datagram (UDP semantics; QUIC recovers it); other send
errors go to the protocol's ``error_received``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

BATCH = 64
MAX_DATAGRAM = 65536


class BatchedUdpEndpoint:
    """A non-blocking UDP socket driven by ``loop.add_reader``; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: Any) -> None:
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._closing = False
        self.batching = False
        self._deferred: dict[int, Any] = {}  # protocols whose transmit waits for the batch end
        self.send_drops = 0
        sock.setblocking(False)
        self._fd = sock.fileno()
        self._extra = {"socket": sock, "sockname": sock.getsockname()}
        try:
            self._extra["peername"] = sock.getpeername()
        except OSError:
            pass
        loop.add_reader(self._fd, self._on_readable)
        protocol.connection_made(self)

    # --- transport API used by aioquic ------------------------------------------------------------

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self._closing:
            return
        try:
            if addr is None:
                self._sock.send(data)
            else:
                self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.send_drops += 1
        except OSError as e:
            self._protocol.error_received(e)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self._loop.remove_reader(self._fd)
        except (ValueError, OSError):
            pass
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    # --- batching -----------------------------------------------------------------------------------

    def defer_transmit(self, protocol: Any) -> bool:
        """Called by a protocol's ``transmit``: True if it should wait for the batch end."""
        if self.batching:
            self._deferred[id(protocol)] = protocol
            return True
        return False

    def _on_readable(self) -> None:
        self.batching = True
        try:
            for _ in range(BATCH):
                try:
                    data, addr = self._sock.recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:  # ICMP errors on a connected socket, mostly
                    self._protocol.error_received(e)
                    break
                try:
                    self._protocol.datagram_received(data, addr)
                except Exception as e:  # a bug in one datagram's handling must not stop the endpoint
                    self._loop.call_exception_handler({"message": "QUIC datagram handling failed", "exception": e})
                if self._closing:
                    break
        finally:
            self.batching = False
            deferred, self._deferred = self._deferred, {}
            for protocol in deferred.values():
                protocol.transmit()
