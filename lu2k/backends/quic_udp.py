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

Segmentation offload: while a protocol transmits (:meth:`holding`), datagrams are queued and
then sent in runs of equal size to one address as a single ``sendmsg`` with ``UDP_SEGMENT``
(GSO: the kernel cuts the buffer into datagrams), and ``UDP_GRO`` lets the kernel hand us such
runs whole on receive.  Either falls back to one datagram per call where the kernel refuses it.

Forward error correction (:mod:`lu2k.fec`) sits here, under QUIC: with ``fec`` on, every
datagram to a peer goes out wrapped and each closed group is followed by its repair; FEC
frames from a peer are always understood (whatever our own setting), their datagrams and any
rebuilt ones passed to QUIC, and the loss seen in them reported back once a second so that a
peer in ``auto`` mode can size its repair.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from ..fec import FecDecoder, FecEncoder, FecSettings, is_fec_frame

BATCH = 64
MAX_DATAGRAM = 65536
MAX_FEC_PEERS = 1024  # addresses with FEC state; the least recently used is forgotten first
UDP_SEGMENT = 103  # linux/udp.h; not in Python's socket module
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
GSO_MAX_BYTES = 65000
GSO_SIZE = struct.Struct("@H")
_CMSG_SPACE = socket.CMSG_SPACE(GSO_SIZE.size)
GSO_UNSUPPORTED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}


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
        self._holding = 0
        self._out: list[tuple[bytes, Any]] = []
        self.gso = True
        self.gro = _enable_gro(sock)
        self.stats = {"sendmsg_calls": 0, "datagrams_sent": 0, "gro_reads": 0, "datagrams_received": 0}
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
            # Keyed as _fec_received keys it (None on a connected socket): the peer's loss
            # reports must reach the encoder that sends to it, or auto never turns repair on.
            peer = self._fec_peer(None if self._extra.get("peername") is not None else addr)
            assert peer.encoder is not None
            for frame in peer.encoder.wrap(data, self._loop.time()):
                self._send(frame, addr)
            self._arm_fec_timer()
            return
        self._send(data, addr)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Queue what is sent inside; send it in GSO runs at the end (a protocol's transmit)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if not self._holding:
                self._flush()

    def _send(self, data: bytes, addr: Any) -> None:
        self._out.append((data, addr))
        if not self._holding or len(self._out) >= 4 * GSO_MAX_SEGMENTS:
            self._flush()

    def _flush(self) -> None:
        out, self._out = self._out, []
        i = 0
        while i < len(out):
            data, addr = out[i]
            size = len(data)
            j, total = i + 1, size
            if self.gso:
                # A run: same address, same size; only its last datagram may be shorter.
                while (j < len(out) and j - i < GSO_MAX_SEGMENTS and out[j][1] == addr and len(out[j - 1][0]) == size
                       and len(out[j][0]) <= size and total + len(out[j][0]) <= GSO_MAX_BYTES):
                    total += len(out[j][0])
                    j += 1
            if j - i == 1:
                self._send_one(data, addr)
            else:
                self._send_run([d for d, _ in out[i:j]], size, addr)
            i = j

    def _send_one(self, data: bytes, addr: Any) -> None:
        try:
            if addr is None:
                self._sock.send(data)
            else:
                self._sock.sendto(data, addr)
            self.stats["sendmsg_calls"] += 1
            self.stats["datagrams_sent"] += 1
        except (BlockingIOError, InterruptedError):
            self.send_drops += 1
        except OSError as e:
            self._protocol.error_received(e)

    def _send_run(self, run: list[bytes], size: int, addr: Any) -> None:
        try:
            self._sock.sendmsg([b"".join(run)], [(socket.SOL_UDP, UDP_SEGMENT, GSO_SIZE.pack(size))], 0, *(() if addr is None else (addr,)))
            self.stats["sendmsg_calls"] += 1
            self.stats["datagrams_sent"] += len(run)
        except (BlockingIOError, InterruptedError):
            self.send_drops += len(run)
        except OSError as e:
            if e.errno not in GSO_UNSUPPORTED:
                self._protocol.error_received(e)
                return
            self.gso = False  # this kernel or device will not segment for us: one datagram per call
            for d in run:
                self._send_one(d, addr)

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
                    if self.gro:
                        buf, anc, _flags, addr = self._sock.recvmsg(MAX_DATAGRAM, _CMSG_SPACE)
                        datagrams = _split_gro(buf, anc)
                        self.stats["gro_reads"] += len(datagrams) > 1
                    else:
                        buf, addr = self._sock.recvfrom(MAX_DATAGRAM)
                        datagrams = [buf]
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:  # ICMP errors on a connected socket, mostly
                    self._protocol.error_received(e)
                    break
                self.stats["datagrams_received"] += len(datagrams)
                for data in datagrams:
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


def _enable_gro(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
        return True
    except OSError:
        return False


def _split_gro(buf: bytes, ancdata: list[tuple[int, int, bytes]]) -> list[bytes]:
    """One read with UDP_GRO: the datagrams it holds (a run of ``size`` bytes, the last shorter)."""
    for level, kind, value in ancdata:
        if level == socket.SOL_UDP and kind == UDP_GRO and len(value) >= GSO_SIZE.size:
            (size,) = GSO_SIZE.unpack_from(value)
            if 0 < size < len(buf):
                return [buf[i : i + size] for i in range(0, len(buf), size)]
    return [buf]
