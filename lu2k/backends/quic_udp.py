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

Forward error correction (:mod:`lu2k.fec`) sits here, under QUIC: with ``fec`` on, every
datagram to a peer goes out wrapped and each closed group is followed by its repair; FEC
frames from a peer are always understood (whatever our own setting), their datagrams and any
rebuilt ones passed to QUIC, and the loss seen in them reported back once a second so that a
peer in ``auto`` mode can size its repair.
"""

from __future__ import annotations

import asyncio
import socket
from collections import OrderedDict
from typing import Any

from ..fec import FecDecoder, FecEncoder, FecSettings, is_fec_frame

BATCH = 64
MAX_DATAGRAM = 65536
MAX_FEC_PEERS = 1024  # addresses with FEC state; the least recently used is forgotten first


class _FecPeer:
    def __init__(self, addr: Any, settings: FecSettings | None, now: float) -> None:
        self.addr = addr  # as the socket gave it (an IPv6 address keeps its scope)
        self.encoder = FecEncoder(settings) if settings is not None else None
        self.decoder = FecDecoder()
        self.next_report = now + (settings.report_interval if settings is not None else 1.0)
        self.heard = False  # FEC frames came from this peer: it wants our loss reports


class BatchedUdpEndpoint:
    """A non-blocking UDP socket driven by ``loop.add_reader``; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: Any, fec: FecSettings | None = None) -> None:
        self._loop = loop
        self._fec = fec if fec is not None and fec.enabled else None
        self._fec_peers: OrderedDict[Any, _FecPeer] = OrderedDict()
        self._fec_timer: asyncio.TimerHandle | None = None
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
        if self._fec is not None:
            peer = self._fec_peer(addr)
            assert peer.encoder is not None
            for frame in peer.encoder.wrap(data, self._loop.time()):
                self._send(frame, addr)
            self._arm_fec_timer()
            return
        self._send(data, addr)

    def _send(self, data: bytes, addr: Any) -> None:
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
        if self._fec_timer is not None:
            self._fec_timer.cancel()
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
                    if is_fec_frame(data):
                        self._fec_received(data, addr)
                    else:
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

    # --- forward error correction --------------------------------------------------------------------

    def _fec_peer(self, addr: Any) -> _FecPeer:
        key = addr if addr is None else tuple(addr[:2])
        peer = self._fec_peers.get(key)
        if peer is None:
            peer = self._fec_peers[key] = _FecPeer(addr, self._fec, self._loop.time())
            while len(self._fec_peers) > MAX_FEC_PEERS:
                self._fec_peers.popitem(last=False)
        else:
            self._fec_peers.move_to_end(key)
        return peer

    def _fec_received(self, frame: bytes, addr: Any) -> None:
        peer = self._fec_peer(None if self._extra.get("peername") is not None else addr)
        peer.heard = True
        datagrams, report = peer.decoder.receive(frame)
        if report is not None and peer.encoder is not None:
            peer.encoder.on_report(*report)
        for d in datagrams:
            self._protocol.datagram_received(d, addr)
        self._arm_fec_timer()

    def _arm_fec_timer(self) -> None:
        if self._closing:
            return
        deadlines = []
        for peer in self._fec_peers.values():
            if peer.encoder is not None and (d := peer.encoder.next_deadline()) is not None:
                deadlines.append(d)
            if peer.heard:
                deadlines.append(peer.next_report)
        if not deadlines:
            return
        when = min(deadlines)
        if self._fec_timer is not None:
            if self._fec_timer.when() <= when:
                return
            self._fec_timer.cancel()
        self._fec_timer = self._loop.call_at(when, self._on_fec_timer)

    def _on_fec_timer(self) -> None:
        self._fec_timer = None
        now = self._loop.time()
        interval = self._fec.report_interval if self._fec is not None else 1.0
        for peer in list(self._fec_peers.values()):
            if peer.encoder is not None:
                for frame in peer.encoder.handle_timer(now):
                    self._send(frame, peer.addr)
            if peer.heard and now >= peer.next_report:
                peer.next_report = now + interval
                report = peer.decoder.take_report()
                if report is not None:
                    self._send(report, peer.addr)
        self._arm_fec_timer()

    def fec_stats(self) -> dict[str, int]:
        """Summed over peers: what FEC sent, rebuilt and measured."""
        out: dict[str, int] = {}
        for peer in self._fec_peers.values():
            for src in ((peer.encoder.stats if peer.encoder else {}), peer.decoder.stats):
                for k, v in src.items():
                    out[k] = out.get(k, 0) + v
        return out
