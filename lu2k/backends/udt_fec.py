"""Forward error correction under UDT: a relay between libudt and the wire, on the event loop.

libudt owns its UDP socket and offers no hook on the packets it sends, so with ``fec`` on the
udt backend puts a relay between the two (one relay per listener, one per outgoing
connection):

* the relay's *wire* socket is the one the network sees: bound to the net's address and port
  on a listener, to an ephemeral port on a connector;
* for every peer address there is a *leg*: a UDP socket on the loopback address, which stands
  for that peer towards libudt.  libudt's socket lives on loopback too (a listener binds there;
  a connector connects to the leg's address), so each peer is a distinct address to libudt and
  accepted connections can be told apart and named after the real peer (:meth:`peer_of`).

Everything libudt sends to a leg goes out on the wire through that peer's
:class:`~lu2k.fec.FecPeer` (data frames at once, repair when a group closes); every frame
from the wire goes through the same peer's decoder, and what it yields -- the datagram and
any rebuilt ones -- is handed to libudt from the leg.  A loss that FEC repairs therefore
reaches libudt a group's wait after the original instead of a retransmission round trip
later (libudt may still have asked for it: the retransmission then arrives as a duplicate,
which libudt drops).  The coding is :mod:`lu2k.fec`'s, shared with the quic backend.

UDT packets, unlike QUIC's, can start with any byte, so FEC frames cannot be told from bare
UDT packets: with ``fec`` on every datagram on the wire is an FEC frame, and both ends of a
udt net must have ``fec`` on (``auto`` costs 4 bytes a packet on a clean link).  A datagram
that is not an FEC frame is dropped and counted (``foreign``).  The UDT packet size is
reduced by :data:`lu2k.fec.MAX_OVERHEAD`, so repair datagrams fit the path MTU too.

Bounds: at most ``max_peers`` legs per relay (the least recently active is closed first) and
a leg silent for ``idle_timeout`` seconds is closed (libudt sends keep-alives every second on
a live connection).  Socket errors on one datagram are counted, never raised: UDT recovers a
lost packet, and the relay must not stop for one.
"""

from __future__ import annotations

import asyncio
import socket
from collections import OrderedDict
from typing import Any

from ..fec import FecPeer, FecSettings, is_fec_frame

MAX_DATAGRAM = 65536
READ_BATCH = 64  # datagrams read per readiness before yielding to the loop
DEFAULT_MAX_PEERS = 256  # each is a socket: keep well inside a daemon's file limit


def loopback_for(family: int) -> str:
    return "::1" if family == socket.AF_INET6 else "127.0.0.1"


def _key(addr: Any) -> tuple[str, int]:
    return (str(addr[0]), int(addr[1]))


class _Leg:
    """One peer: its loopback socket towards libudt and its FEC state."""

    def __init__(self, relay: "FecRelay", peer: tuple[Any, ...], now: float) -> None:
        self.peer = peer  # the wire address, as the socket gave it (an IPv6 address keeps its scope)
        self.fec = FecPeer(relay.settings, now)
        self.sock = socket.socket(relay.family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.bind((loopback_for(relay.family), 0))
        except OSError:
            self.sock.close()
            raise
        self.address = _key(self.sock.getsockname())
        self.udt_side: tuple[Any, ...] | None = relay.udt_address  # where libudt listens; learned on a connector


class FecRelay:
    """Relays one wire socket's peers to libudt through FEC; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wire: socket.socket, settings: FecSettings, *,
                 udt_address: tuple[str, int] | None = None, max_peers: int = DEFAULT_MAX_PEERS,
                 idle_timeout: float = 120.0) -> None:
        self._loop = loop
        self.wire = wire
        self.settings = settings
        self.family = wire.family
        self.udt_address = udt_address  # a listener's libudt socket; None on a connector (learned)
        self.max_peers = max_peers
        self.idle_timeout = idle_timeout
        self._legs: OrderedDict[tuple[str, int], _Leg] = OrderedDict()  # by wire address
        self._by_leg: dict[tuple[str, int], _Leg] = {}  # by leg (loopback) address
        self._timer: asyncio.TimerHandle | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False
        self.stats = {"foreign": 0, "send_errors": 0, "wire_datagrams_in": 0, "wire_datagrams_out": 0, "legs_expired": 0}
        wire.setblocking(False)
        loop.add_reader(wire.fileno(), self._on_wire)
        self._sweep = loop.call_later(idle_timeout, self._expire_idle)

    @classmethod
    def open(cls, loop: asyncio.AbstractEventLoop, bind: tuple[str, int], settings: FecSettings, *,
             udp_buffer: int = 0, udt_address: tuple[str, int] | None = None, **kw: Any) -> "FecRelay":
        """A relay whose wire socket is bound to ``bind``; OSError if it cannot be."""
        family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        wire = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if udp_buffer:
                for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                    wire.setsockopt(socket.SOL_SOCKET, opt, udp_buffer)
            wire.bind(bind)
        except OSError:
            wire.close()
            raise
        return cls(loop, wire, settings, udt_address=udt_address, **kw)

    @property
    def address(self) -> tuple[str, int]:
        return _key(self.wire.getsockname())

    # --- peers --------------------------------------------------------------------------------------

    def leg_for(self, peer: tuple[Any, ...]) -> tuple[str, int]:
        """The loopback address that stands for wire address ``peer`` (a connector dials it)."""
        return self._leg(peer).address

    def peer_of(self, host: str, port: int) -> tuple[str, int] | None:
        """The wire address behind a leg address libudt reports (an accepted connection's peer)."""
        leg = self._by_leg.get((host, port))
        return _key(leg.peer) if leg is not None else None

    def _leg(self, peer: tuple[Any, ...]) -> _Leg:
        key = _key(peer)
        leg = self._legs.get(key)
        if leg is not None:
            self._legs.move_to_end(key)
            return leg
        leg = _Leg(self, peer, self._loop.time())
        self._legs[key] = leg
        self._by_leg[leg.address] = leg
        self._loop.add_reader(leg.sock.fileno(), self._on_leg, leg)
        while len(self._legs) > self.max_peers:
            self._drop(next(iter(self._legs)))
        return leg

    def _drop(self, key: tuple[str, int]) -> None:
        leg = self._legs.pop(key, None)
        if leg is None:
            return
        self._by_leg.pop(leg.address, None)
        self._loop.remove_reader(leg.sock.fileno())
        leg.sock.close()

    def _expire_idle(self) -> None:
        self._sweep = None
        if self.closed:
            return
        now = self._loop.time()
        for key, leg in list(self._legs.items()):
            if now - leg.fec.last_active > self.idle_timeout:
                self._drop(key)
                self.stats["legs_expired"] += 1
        self._sweep = self._loop.call_later(self.idle_timeout / 2, self._expire_idle)

    # --- the data path ------------------------------------------------------------------------------

    def _send_wire(self, frames: list[bytes], peer: tuple[Any, ...]) -> None:
        for frame in frames:
            try:
                self.wire.sendto(frame, peer)
                self.stats["wire_datagrams_out"] += 1
            except (BlockingIOError, InterruptedError):
                self.stats["send_errors"] += 1  # a full socket buffer drops it: UDT recovers the packet
            except OSError:
                self.stats["send_errors"] += 1

    def _on_leg(self, leg: _Leg) -> None:
        """libudt sent something to this peer: FEC-wrap it onto the wire."""
        now = self._loop.time()
        for _ in range(READ_BATCH):
            try:
                data, addr = leg.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if leg.udt_side is None:
                leg.udt_side = addr  # a connector's libudt socket: the only one that knows this leg
            elif _key(addr) != _key(leg.udt_side):
                self.stats["foreign"] += 1
                continue
            self._send_wire(leg.fec.send(data, now), leg.peer)
        self._arm_timer()

    def _on_wire(self) -> None:
        """Frames from the network: decode, hand the datagrams to libudt from the peer's leg."""
        now = self._loop.time()
        for _ in range(READ_BATCH):
            try:
                frame, addr = self.wire.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # ICMP errors for a peer gone away, mostly
            self.stats["wire_datagrams_in"] += 1
            if not is_fec_frame(frame):
                self.stats["foreign"] += 1
                continue
            try:
                leg = self._leg(addr)
            except OSError:
                self.stats["send_errors"] += 1
                continue
            datagrams = leg.fec.receive(frame, now)
            if leg.udt_side is None:
                continue  # libudt has not used this leg yet: nothing to hand over to
            for d in datagrams:
                try:
                    leg.sock.sendto(d, leg.udt_side)
                except OSError:
                    self.stats["send_errors"] += 1
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self.closed:
            return
        deadlines = [d for leg in self._legs.values() if (d := leg.fec.deadline()) is not None]
        if not deadlines:
            return
        when = min(deadlines)
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._loop.time()
        for leg in list(self._legs.values()):
            d = leg.fec.deadline()
            if d is not None and d <= now:
                self._send_wire(leg.fec.on_timer(now), leg.peer)
        self._arm_timer()

    # --- lifecycle and figures -------------------------------------------------------------------

    def fec_stats(self) -> dict[str, int]:
        out = dict(self.stats)
        for leg in self._legs.values():
            for k, v in leg.fec.stats().items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for handle in (self._timer, self._sweep):
            if handle is not None:
                handle.cancel()
        for key in list(self._legs):
            self._drop(key)
        self._loop.remove_reader(self.wire.fileno())
        self.wire.close()
