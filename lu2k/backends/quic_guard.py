"""The quic listener's guard: what a sender who has proven nothing can make it hold.

aioquic's server makes a connection for every datagram of 1200 bytes or more whose header
says Initial and whose destination connection ID it does not know -- before decrypting
anything -- and keeps it until the idle timeout (60 s by default).  One costs about 48 KB:
5 000 datagrams of random bytes took a listening lu2kd from 45 MB to 287 MB.

:class:`GuardedQuicServer` stands in front of aioquic's server:

* **An Initial must open.**  A datagram that would make a new connection must begin with an
  Initial packet that decrypts under the Initial keys derived from its destination
  connection ID -- as every real client's first datagram does.  Anything else makes no
  connection (``initials_dropped``).  Cost: a key derivation and one AEAD open per such
  datagram, far less than the connection it would have made.
* **Few half-open connections.**  At most :data:`MAX_HALF_OPEN` connections whose TLS
  handshake has not completed; a new one beyond that ends the oldest at once, sending
  nothing (``half_open_evicted``).  The newest are kept: a real client's handshake takes a
  round trip or two, a flood's connections never finish.
* **A deadline.**  A connection whose TLS handshake has not completed within
  ``handshake_timeout`` seconds is ended the same way (``handshakes_timed_out``), instead of
  living until the idle timeout.

After the TLS handshake the engine's hello has ``connect_timeout`` to prove the network key,
as on every backend.

Short-header (1-RTT) packets, nearly all of a connection's datagrams, can make nothing: they
go straight to the connection their destination connection ID names, which is all aioquic's
server would do with them, without its header parse (and ours) per datagram.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.crypto import CryptoError, CryptoPair
from aioquic.quic.packet import QuicHeader, QuicPacketType, pull_quic_header

from .quic_stream import Lu2kQuicProtocol

# Enough for a site's peers all reconnecting at once (a handshake takes one or two round
# trips); a half-open connection that has answered a real ClientHello holds ~175 KB (TLS
# state, the server's first flight), so the most a flood can make the listener hold is ~22 MB.
MAX_HALF_OPEN = 128


def initial_opens(data: bytes, header: QuicHeader, encrypted_offset: int) -> bool:
    """Does the Initial packet at the start of ``data`` decrypt with the keys its
    destination connection ID gives (what a server can check before keeping any state)?"""
    crypto = CryptoPair()
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version or 0)
    try:
        crypto.decrypt_packet(data[: header.packet_length], encrypted_offset, 0)
    except CryptoError:
        return False
    return True


class GuardedQuicServer(QuicServer):
    """aioquic's server with the guard of the module docstring in front."""

    def __init__(self, *, create_protocol: Callable[..., Lu2kQuicProtocol], handshake_timeout: float,
                 max_half_open: int = MAX_HALF_OPEN, **kwargs: Any) -> None:
        super().__init__(create_protocol=self._create, **kwargs)
        self._make_protocol = create_protocol
        self.handshake_timeout = handshake_timeout
        self.max_half_open = max_half_open
        self._half_open: OrderedDict[Lu2kQuicProtocol, asyncio.TimerHandle] = OrderedDict()  # oldest first
        self.stats: Counter[str] = Counter()

    @property
    def half_open(self) -> int:
        return len(self._half_open)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        assert isinstance(data, bytes)
        if data and not data[0] & 0x80:
            # Short header: the destination connection ID follows the first byte.  An unknown
            # one is dropped, as aioquic's server drops it; the connection checks the rest.
            protocol = self._protocols.get(data[1:1 + self._configuration.connection_id_length])
            if protocol is not None:
                protocol.datagram_received(data, addr)
            return
        if len(data) >= SMALLEST_MAX_DATAGRAM_SIZE:  # aioquic makes connections of these only
            buf = Buffer(data=data)
            try:
                header = pull_quic_header(buf, host_cid_length=self._configuration.connection_id_length)
            except ValueError:
                return  # aioquic would drop it too
            if (header.packet_type == QuicPacketType.INITIAL and header.destination_cid not in self._protocols
                    and header.version in self._configuration.supported_versions):
                if not initial_opens(data, header, buf.tell()):
                    self.stats["initials_dropped"] += 1
                    return
                while len(self._half_open) >= self.max_half_open:
                    oldest = next(iter(self._half_open))
                    self.stats["half_open_evicted"] += 1
                    self._end(oldest, "too many handshakes in progress")
        super().datagram_received(data, addr)

    def _create(self, quic: Any, stream_handler: Any = None) -> Lu2kQuicProtocol:
        protocol = self._make_protocol(quic, stream_handler=stream_handler)
        self._half_open[protocol] = asyncio.get_running_loop().call_later(self.handshake_timeout, self._expire, protocol)
        return protocol

    def _expire(self, protocol: Lu2kQuicProtocol) -> None:
        if protocol in self._half_open:
            self.stats["handshakes_timed_out"] += 1
            self._end(protocol, "TLS handshake not finished in time")

    def _end(self, protocol: Lu2kQuicProtocol, reason: str) -> None:
        self.settled(protocol)
        protocol.abandon(reason)

    def settled(self, protocol: Lu2kQuicProtocol) -> None:
        """``protocol`` finished its TLS handshake or ended: no longer half-open."""
        timer = self._half_open.pop(protocol, None)
        if timer is not None:
            timer.cancel()
