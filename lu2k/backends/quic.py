"""QUIC backend (aioquic): the backend a GEO site chooses.

Setup half of the backend (the data path is :mod:`lu2k.backends.quic_stream`).

* **Transport.**  UDP, ALPN ``lu2k``, TLS 1.3.  The listener presents the site certificate
  (``cert``/``key``, made by ``lu2k keygen site``); the connector verifies it against ``ca``
  (a CA or the peers' certificates; ``server_name`` if the certificate does not name the
  address).  ``mtls: true`` makes the listener demand and verify a client certificate
  against the same ``ca``.  On top, the engine's HMAC hello proves the network's
  pre-shared key on every connection, so a peer without the key is refused even when
  certificates are not verified (no ``ca``).
* **lu2k's model.**  One QUIC connection per direction per peer, opened by the sender; each
  message on its own unidirectional stream (no head-of-line blocking between messages);
  control frames on one ordered stream; see :mod:`lu2k.backends.quic_stream`.
* **Long, lossy links.**  Congestion control per network: ``congestion`` = ``bbr`` (the
  default when the site profile's RTT >= 200 ms or it has loss), ``rate`` (paced at ``rate``,
  capped at ``rate_cap``), or aioquic's ``cubic``/``reno``; see :mod:`lu2k.cc`.  Datagrams
  are full size (``max_datagram_size``, default 1472 for IPv4 / 1452 for IPv6, i.e. a
  1500-byte MTU, less on the connecting side where the route's MTU is lower (see
  :mod:`lu2k.inet`); aioquic's 1200 would cost ~20 % on the wire).  Flow-control windows and the
  send buffer follow the profile's bandwidth-delay product; the initial RTT is the profile's.
* **Reconnects.**  Session tickets are kept per peer address (bounded); a reconnect resumes
  the TLS session, and with ``zero_rtt: true`` (default) the hello goes out as 0-RTT data.
  That is safe because the first flight is only the HELLO frame, whose challenge carries a
  fresh nonce from each side: a replayed HELLO cannot complete the hello, and no message is
  sent before AUTH_OK, which only travels in 1-RTT packets.
* **Before the handshake.**  The listener is aioquic's server behind :mod:`.quic_guard`:
  random Initials open no connection, at most 128 may be half-open, each has
  ``handshake_timeout`` seconds.  Every ended connection is forgotten (an outgoing one
  with its UDP socket).
* **Errors.**  TLS alerts, ALPN and QUIC version mismatches become
  :class:`~lu2k.errors.HandshakeError` / :class:`~lu2k.errors.AuthenticationError`, with
  the reason; unreachable peers :class:`~lu2k.errors.ConnectError` /
  :class:`~lu2k.errors.ConnectTimeout`; a connection that ends, ``ReadError`` /
  ``ConnectionClosed``.  Nothing of aioquic's escapes.

Options (``BackendSettings.options``): ``cert``, ``key``, ``ca``, ``server_name``, ``mtls``,
``congestion``, ``rate`` / ``rate_cap`` (Mbit/s or "20mbit"), ``max_datagram_size``,
``idle_timeout``, ``keepalive``, ``dead_timeout``, ``socket_buffer``, ``max_streams``, ``send_buffer``, ``recv_buffer``,
``ordered``, ``zero_rtt``, ``cid_length``, ``fec``, ``handshake_timeout``.  Unknown options are an error (typos should not pass silently).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import socket
import ssl
from typing import Any

try:
    from aioquic import tls
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet import QuicErrorCode
    from aioquic.tls import Alert, SessionTicket, load_pem_x509_certificates, verify_certificate
    from cryptography.hazmat.primitives.serialization import Encoding
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    from ..errors import BackendUnavailable

    raise BackendUnavailable(f"the quic backend needs aioquic: {e}") from None

from ..cc import default_for
from ..cc.aioquic_adapter import algorithm_name, install_pacer
from ..fec import HEADER_OVERHEAD as FEC_HEADER, parse_fec
from ..errors import (
    AuthenticationError, ConfigError, ConnectError, ConnectionClosed, ConnectTimeout, HandshakeError, Lu2kError, ReadError,
)
from ..values import parse_rate
from ..wire import ConnType
from ..inet import family_of, format_hostport, quic_datagram_size, wildcard
from .base import AcceptCallback, Backend, BackendSettings, ExceptionMap, Listener, Transport, map_exceptions
from .netpath import route_mtu, sockaddr
from .quic_guard import GuardedQuicServer
from .quic_pathwatch import FIGURES as PATHWATCH_FIGURES
from .quic_recovery import tolerate_fec
from .quic_udp import BatchedUdpEndpoint
from .quic_stream import (
    APP_AUTH_REJECTED, APP_NO_ERROR, APP_PROTOCOL_ERROR, Lu2kQuicProtocol, StreamOptions,
)

ALPN = "lu2k"
# Where quic's errors become lu2k's: socket set-up by this table; everything aioquic reports
# about a connection by translate_close (one ConnectionTerminated -> one error, by code).
SOCKET_ERRORS: ExceptionMap = {OSError: ConnectError}


def _binding_of(cert: Any) -> bytes:
    return b"tls-server-end-point:" + hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


KNOWN_OPTIONS = {
    "cert", "key", "ca", "server_name", "mtls", "congestion", "rate", "rate_cap", "max_datagram_size",
    "idle_timeout", "keepalive", "dead_timeout", "socket_buffer", "max_streams", "send_buffer", "recv_buffer", "ordered", "zero_rtt",
    "cid_length", "fec", "encryption", "peer_keys", "peer_keys_only", "handshake_timeout",
}
TICKETS_KEPT = 256
DEAD_TIMEOUT_MIN = 10.0  # s: a peer whose daemon is starved of CPU for a few seconds is slow, not dead
# TLS alert numbers (RFC 8446 section 6) that mean "your certificate is not acceptable".
CERT_ALERTS = {42: "bad certificate", 43: "unsupported certificate", 44: "certificate revoked",
               45: "certificate expired", 46: "certificate unknown", 48: "unknown CA", 49: "access denied"}


def _rate_option(value: Any, where: str) -> float:
    """Mbit/s as a number, or a string with a unit ('20mbit', '500kbit') -> bytes/s."""
    return parse_rate(value, where, number_unit=1e6) / 8


def _bool_option(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("yes", "true", "on", "1", "no", "false", "off", "0"):
        return value.lower() in ("yes", "true", "on", "1")
    raise ConfigError(f"expected true/false, got {value!r}", where=where)


def _number_option(opts: dict[str, Any], key: str, default: float, where: str, *, minimum: float = 0.0) -> float:
    value = opts.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}", where=where) from None
    if number < minimum:
        raise ConfigError(f"{key} must be at least {minimum}, got {value!r}", where=where)
    return number


def translate_close(event: events.ConnectionTerminated, during_handshake: bool) -> Lu2kError:
    """aioquic's ConnectionTerminated -> one lu2k error, worded for the operator."""
    code, reason = event.error_code, event.reason_phrase or ""
    app = event.frame_type is None  # APPLICATION_CLOSE (ours) rather than a transport error
    if 0x100 <= code <= 0x1FF and not app:
        alert = code - 0x100
        if alert in CERT_ALERTS:
            return AuthenticationError(f"TLS certificate check failed ({CERT_ALERTS[alert]}): {reason or 'rejected by peer'}")
        if alert == 120:
            return HandshakeError(f"ALPN mismatch: the peer does not speak {ALPN!r} ({reason or 'no_application_protocol'})")
        if alert == 70:
            return HandshakeError(f"TLS version mismatch: {reason or 'protocol_version alert'}")
        return HandshakeError(f"TLS handshake failed (alert {alert}): {reason}")
    if "common protocol version" in reason or code == QuicErrorCode.VERSION_NEGOTIATION_ERROR:
        return HandshakeError(f"QUIC version mismatch: {reason or 'no common version'}")
    if app and code == APP_AUTH_REJECTED:
        return AuthenticationError(f"peer refused us: {reason}")
    if app and code == APP_PROTOCOL_ERROR:
        return HandshakeError(f"peer closed with a protocol error: {reason}") if during_handshake else ReadError(f"peer closed with a protocol error: {reason}")
    if reason == "Idle timeout":
        if during_handshake:
            return ConnectTimeout("no answer from the peer (QUIC handshake idle timeout)")
        return ReadError("connection idle timeout: the peer stopped answering")
    if during_handshake:
        return HandshakeError(f"QUIC handshake failed (error 0x{code:x}): {reason}")
    if code == APP_NO_ERROR and (app or code == QuicErrorCode.NO_ERROR):
        return ConnectionClosed(f"peer closed the connection{': ' + reason if reason else ''}")
    return ReadError(f"connection failed (error 0x{code:x}): {reason}")


class QuicListener(Listener):
    def __init__(self, server: GuardedQuicServer, address: tuple[str, int]) -> None:
        self._server = server
        self._address = address

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    def close(self) -> None:
        try:
            self._server.close()
        except (OSError, AttributeError):
            pass


class QuicBackend(Backend):
    """lu2k over QUIC; see the module docstring."""

    name = "quic"
    typed_connections = False  # streams already keep small messages from waiting behind bulk
    uses_frame_sealing = False  # TLS 1.3 protects every packet; the hello is bound to it

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        opts = dict(settings.options)
        self._where = f"net {settings.net}"
        unknown = set(opts) - KNOWN_OPTIONS
        if unknown:
            raise ConfigError(f"unknown quic option(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(KNOWN_OPTIONS))})", where=self._where)
        profile = settings.profile
        self.cert = self._path(opts.get("cert"), "cert")
        self.key = self._path(opts.get("key"), "key")
        self.ca = self._path(opts.get("ca"), "ca")
        if bool(self.cert) != bool(self.key):
            raise ConfigError("cert and key must be given together", where=self._where)
        self.mtls = _bool_option(opts.get("mtls", False), f"{self._where}: mtls")
        if self.mtls and not self.ca:
            raise ConfigError("mtls needs ca (to verify the peers' certificates)", where=self._where)
        self.server_name: str | None = opts.get("server_name")
        self._check_cert_pair()

        self.rtt = (profile.rtt_ms or 100.0) / 1e3
        link_rate = profile.rate_mbit * 1e6 / 8 if profile.rate_mbit else None
        congestion = str(opts.get("congestion") or default_for(profile.rtt_ms, profile.loss))
        params: dict[str, Any] = {"initial_rtt": self.rtt}
        if congestion == "bbr":
            if "rate_cap" in opts:
                params["max_rate"] = _rate_option(opts["rate_cap"], f"{self._where}: rate_cap")
            if "rate" in opts:
                params["initial_rate"] = _rate_option(opts["rate"], f"{self._where}: rate")
            elif link_rate:
                params["initial_rate"] = link_rate
            self.algorithm = algorithm_name("bbr", params)
        elif congestion == "rate":
            rate = opts.get("rate") or profile.rate_mbit
            if not rate:
                raise ConfigError("congestion: rate needs a rate (option rate, or the site profile's rate_mbit)", where=self._where)
            params["rate"] = _rate_option(rate, f"{self._where}: rate")
            if "rate_cap" in opts:
                params["cap"] = _rate_option(opts["rate_cap"], f"{self._where}: rate_cap")
            self.algorithm = algorithm_name("rate", params)
        elif congestion in ("cubic", "reno"):
            self.algorithm = congestion
        else:
            raise ConfigError(f"unknown congestion control {congestion!r} (bbr, rate, cubic, reno)", where=self._where)
        self.congestion = congestion

        self.max_datagram_size = int(_number_option(opts, "max_datagram_size", 0, self._where))
        if self.max_datagram_size and not 1200 <= self.max_datagram_size <= 65000:
            raise ConfigError(f"max_datagram_size must be 1200..65000, got {self.max_datagram_size}", where=self._where)
        # Every packet carries the receiver's connection ID.  aioquic's 8 bytes are 0.5 % of a
        # 1500-byte packet; 4 random bytes still tell a site's few dozen peers apart (the
        # listener routes datagrams by them), and 4 more payload bytes per packet is what
        # separates QUIC's header ceiling from kernel TCP's.
        self.fec = parse_fec(opts.get("fec", "off"), f"{self._where}: fec", rtt_s=self.rtt)
        self.cid_length = int(_number_option(opts, "cid_length", 4, self._where))
        if not 4 <= self.cid_length <= 20:
            raise ConfigError(f"cid_length must be 4..20 bytes, got {self.cid_length}", where=self._where)
        self.idle_timeout = _number_option(opts, "idle_timeout", 60.0, self._where, minimum=1.0)
        self.handshake_timeout = _number_option(opts, "handshake_timeout", 10.0, self._where, minimum=0.1)
        # A PING every couple of round trips of silence: an idle connection to a peer that died
        # (a gateway killed, no RST in QUIC) then has a PING outstanding, and the liveness check
        # below fails it within dead_timeout instead of only when the next message goes out.
        self.keepalive = _number_option(opts, "keepalive", min(self.idle_timeout / 3, max(1.0, 2 * self.rtt)), self._where)
        # Long enough for a PTO backoff or two on the profile's RTT, short enough that a
        # restarted peer is noticed in seconds (GEO: 8 x 0.6 s = 4.8 s).
        # At least DEAD_TIMEOUT_MIN (as tcp's), 8 RTTs on longer paths.
        self.dead_timeout = _number_option(opts, "dead_timeout", max(DEAD_TIMEOUT_MIN, 8 * self.rtt), self._where)
        self.max_streams = int(_number_option(opts, "max_streams", 1024, self._where, minimum=16))
        bdp = profile.bdp_bytes(default=4 << 20)
        self.send_buffer = int(_number_option(opts, "send_buffer", max(8 << 20, 4 * bdp), self._where, minimum=64 << 10))
        self.recv_buffer = int(_number_option(opts, "recv_buffer", max(16 << 20, 4 * settings.max_message_size, 4 * bdp), self._where,
                                              minimum=settings.max_message_size + 4096))
        self.socket_buffer = int(_number_option(opts, "socket_buffer", max(4 << 20, bdp), self._where, minimum=64 << 10))
        self.flow_window = max(16 << 20, 4 * bdp, 2 * settings.max_message_size)
        self.stream_window = max(1 << 20, settings.max_message_size + 4096)
        self.ordered = _bool_option(opts.get("ordered", False), f"{self._where}: ordered")
        self.zero_rtt = _bool_option(opts.get("zero_rtt", True), f"{self._where}: zero_rtt")
        self.stream_options = StreamOptions(
            max_payload=settings.max_message_size, send_buffer=self.send_buffer, recv_buffer=self.recv_buffer,
            keepalive=self.keepalive, ordered=self.ordered, dead_timeout=self.dead_timeout,
        )
        # Per peer address: the session ticket and the channel binding of the handshake it came from.
        self._client_tickets: collections.OrderedDict[tuple[str, int], tuple[SessionTicket, bytes]] = collections.OrderedDict()
        self._server_tickets: collections.OrderedDict[bytes, SessionTicket] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._protocols: set[Lu2kQuicProtocol] = set()  # connections not yet ended, both directions
        self._endpoints: list[BatchedUdpEndpoint] = []  # listeners' sockets, and each open connect's own
        self._servers: list[GuardedQuicServer] = []
        self._fec_closed: dict[str, int] = {}  # FEC counters of connects' sockets already closed
        self._pathwatch_closed: dict[str, int] = {}  # path-watch figures of connections already ended

    # --- configuration ----------------------------------------------------------------------------

    def _path(self, value: Any, key: str) -> str | None:
        if value in (None, ""):
            return None
        path = os.path.expanduser(str(value))
        if not os.path.isfile(path):
            raise ConfigError(f"{key} file {path!r} does not exist (make one with: lu2k keygen site NAME)", where=self._where)
        return path

    def _check_cert_pair(self) -> None:
        """Load the site cert/key and the CA once now, so a bad file is a config error."""
        try:
            if self.cert and self.key:
                probe = QuicConfiguration(is_client=False)
                probe.load_cert_chain(self.cert, self.key)
                if _public_der(probe.certificate.public_key()) != _public_der(probe.private_key.public_key()):
                    raise ConfigError(f"cannot load the site certificate/key: {self.key} is not the key of {self.cert}", where=self._where)
            if self.ca:
                with open(self.ca, "rb") as f:
                    if not load_pem_x509_certificates(f.read()):
                        raise ConfigError(f"ca file {self.ca!r} holds no PEM certificate", where=self._where)
        except ConfigError:
            raise
        except (ValueError, TypeError, OSError) as e:
            raise ConfigError(f"cannot load the site certificate/key: {e}", where=self._where) from None

    def _datagram_size(self, family: int, route_mtu: int | None = None) -> int:
        size = quic_datagram_size(family, route_mtu, self.max_datagram_size)
        # FEC frames ride in the same UDP datagrams (a repair frame is the largest): QUIC gets that much less.
        return size - FEC_HEADER if self.fec.enabled else size

    def _configuration(self, *, is_client: bool, family: int, server_name: str | None = None,
                       route_mtu: int | None = None) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            congestion_control_algorithm=self.algorithm,
            max_datagram_size=self._datagram_size(family, route_mtu),
            idle_timeout=self.idle_timeout,
            initial_rtt=self.rtt,
            max_data=self.flow_window,
            max_stream_data=self.stream_window,
            connection_id_length=self.cid_length,
        )
        if is_client:
            config.server_name = server_name
            if self.ca:
                config.load_verify_locations(cafile=self.ca)
                config.verify_mode = ssl.CERT_REQUIRED
            else:
                # No CA configured: the engine's PSK hello is the authentication.
                config.verify_mode = ssl.CERT_NONE
            if self.cert and self.key:
                config.load_cert_chain(self.cert, self.key)
        else:
            if not (self.cert and self.key):
                raise ConfigError("listening on quic needs cert and key (make them with: lu2k keygen site NAME)", where=self._where)
            config.load_cert_chain(self.cert, self.key)
        return config

    def _tune(self, quic: QuicConnection) -> None:
        """Per-connection settings aioquic has no configuration for (see lu2k.cc.aioquic_adapter)."""
        limit = quic._local_max_streams_uni
        limit.value = limit.sent = self.max_streams
        # aioquic acks 1 ms after the first unacked packet: at 4000 packets/s that is an ACK
        # every few packets, each costing a packet build + encryption here and a decryption
        # there.  RTT/8 (at most 10 ms, within the 25 ms max_ack_delay aioquic advertises)
        # cuts that several-fold and is noise next to a satellite RTT.
        quic._ack_delay = max(0.001, min(0.010, self.rtt / 8))
        install_pacer(quic)
        # With FEC, a lost datagram is rebuilt up to a group's wait later: do not declare it
        # lost (retransmit it, and tell the controller) before that (lu2k.backends.quic_recovery).
        tolerate_fec(quic._loss, self.fec, quic._ack_delay)
        adapter = quic._loss._cc
        if hasattr(adapter, "app_limited"):
            adapter.app_limited = _AppLimitedProbe(quic)
        if self.mtls and not quic._is_client:
            original = quic._initialize

            def initialize(peer_cid: bytes) -> None:
                original(peer_cid)
                quic.tls._request_client_certificate = True

            quic._initialize = initialize  # type: ignore[method-assign]

    # --- listen -----------------------------------------------------------------------------------

    async def listen(self, host: str, port: int, on_accept: AcceptCallback) -> Listener:
        family = family_of(host)
        config = self._configuration(is_client=False, family=family)

        def on_connected(protocol: Lu2kQuicProtocol) -> None:
            server.settled(protocol)
            if self.mtls:
                problem = self._check_client_certificate(protocol)
                if problem:
                    protocol.close_connection(APP_AUTH_REJECTED, problem)
                    return
            assert protocol.transport_obj is not None
            task = asyncio.ensure_future(on_accept(protocol.transport_obj))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def on_closed(protocol: Lu2kQuicProtocol) -> None:
            server.settled(protocol)
            self._retire(protocol)

        def create_protocol(quic: QuicConnection, stream_handler: Any = None) -> Lu2kQuicProtocol:
            self._tune(quic)
            protocol = Lu2kQuicProtocol(quic, stream_options=self.stream_options, translate=translate_close, on_connected=on_connected,
                                        on_closed=on_closed)
            self._protocols.add(protocol)
            return protocol

        with map_exceptions(SOCKET_ERRORS, f"cannot listen on udp {format_hostport(host, port)}"):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind(sockaddr(host, port))
                self._size_socket(sock)
                server = GuardedQuicServer(
                    configuration=config, create_protocol=create_protocol, handshake_timeout=self.handshake_timeout,
                    session_ticket_fetcher=self._fetch_ticket, session_ticket_handler=self._store_server_ticket,
                )
                endpoint = BatchedUdpEndpoint(asyncio.get_running_loop(), sock, server, fec=self.fec)
                self._endpoints.append(endpoint)
                self._servers.append(server)
            except BaseException:
                sock.close()
                raise
        sockname = endpoint.get_extra_info("sockname")
        return QuicListener(server, (sockname[0], sockname[1]))

    def _size_socket(self, sock: Any) -> None:
        """Big UDP buffers: a Python receiver that stalls 30 ms (GC, a busy core) at 50 Mbit/s
        overflows the default 208 KiB, and those kernel drops look like congestion to the peer."""
        for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                             (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
            for opt in (force, plain):
                if opt is None:
                    continue
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, self.socket_buffer)
                    break
                except OSError:
                    continue  # FORCE needs CAP_NET_ADMIN; the plain one is capped by rmem_max

    def _check_client_certificate(self, protocol: Lu2kQuicProtocol) -> str | None:
        tls = protocol._quic.tls
        cert = getattr(tls, "_peer_certificate", None)
        if cert is None:
            return "mutual TLS: the client presented no certificate"
        try:
            verify_certificate(certificate=cert, chain=list(getattr(tls, "_peer_certificate_chain", [])), cafile=self.ca)
        except Alert as e:
            return f"mutual TLS: client certificate rejected: {e}"
        return None

    def _fetch_ticket(self, label: bytes) -> SessionTicket | None:
        return self._server_tickets.get(label)

    def _store_server_ticket(self, ticket: SessionTicket) -> None:
        self._server_tickets[ticket.ticket] = ticket
        while len(self._server_tickets) > TICKETS_KEPT:
            self._server_tickets.popitem(last=False)

    # --- connect ----------------------------------------------------------------------------------

    async def connect(self, host: str, port: int, conn_type: ConnType, timeout: float) -> Transport:
        loop = asyncio.get_running_loop()
        with map_exceptions(SOCKET_ERRORS, f"cannot resolve {host}"):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        server_name = self.server_name or host.partition("%")[0]
        # Datagrams sized by the route's MTU where the kernel knows it (never above 1500).
        mtu = route_mtu(host if "%" in host else str(addr[0]), port)  # no I/O on the wire, no blocking
        config = self._configuration(is_client=True, family=family, server_name=server_name, route_mtu=mtu)
        key = (host, port)
        stored = self._client_tickets.get(key)
        ticket, resumed_binding = stored if stored is not None else (None, b"")
        if ticket is not None:
            config.session_ticket = ticket

        def store_ticket(t: SessionTicket) -> None:
            # The binding of this session: its server certificate, or on a resumed session
            # the one remembered from the handshake that issued the resumed ticket.
            transport = protocol.transport_obj
            binding = transport.channel_binding if transport is not None else resumed_binding
            if not binding:
                cert = getattr(quic.tls, "_peer_certificate", None)
                binding = _binding_of(cert) if cert is not None else resumed_binding
            self._client_tickets[key] = (t, binding)
            self._client_tickets.move_to_end(key)
            while len(self._client_tickets) > TICKETS_KEPT:
                self._client_tickets.popitem(last=False)

        quic = QuicConnection(configuration=config, session_ticket_handler=store_ticket)
        self._tune(quic)
        with map_exceptions(SOCKET_ERRORS, f"cannot open a UDP socket for {format_hostport(host, port)}"):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind((wildcard(family), 0))
                # Connected, so the kernel reports ICMP port-unreachable: "nobody listens" fails
                # the connect at once instead of after the timeout.
                sock.connect(addr)
                self._size_socket(sock)
                protocol = Lu2kQuicProtocol(quic, stream_options=self.stream_options, translate=translate_close,
                                            on_closed=lambda p: self._forget_connect(p, endpoint))
                endpoint = BatchedUdpEndpoint(loop, sock, protocol, fec=self.fec)
            except BaseException:
                sock.close()
                raise
        protocol.peer = format_hostport(host, port)
        self._protocols.add(protocol)
        self._endpoints.append(endpoint)
        protocol.connect(addr)
        if ticket is not None and self.zero_rtt and quic._cryptos[tls.Epoch.ZERO_RTT].send.is_valid():
            # Resumed with early data allowed: the hello goes out as 0-RTT (see module docstring).
            early = protocol.early_transport()
            early.resumed_binding = resumed_binding
            return early
        try:
            await asyncio.wait_for(asyncio.shield(protocol.handshake_waiter), timeout)
        except asyncio.TimeoutError:
            protocol.close_connection(APP_NO_ERROR, "connect timeout")
            endpoint.close()
            raise ConnectTimeout(f"no QUIC handshake with {format_hostport(host, port)} within {timeout:g} s") from None
        except Lu2kError:
            endpoint.close()
            raise
        assert protocol.transport_obj is not None
        protocol.transport_obj.resumed_binding = resumed_binding
        return protocol.transport_obj

    def _forget_connect(self, protocol: Lu2kQuicProtocol, endpoint: BatchedUdpEndpoint) -> None:
        """An outgoing connection ended: its own UDP socket goes with it."""
        self._retire(protocol)
        if endpoint in self._endpoints:
            self._endpoints.remove(endpoint)
            _add(self._fec_closed, endpoint.fec_stats())
        endpoint.close()

    async def close(self) -> None:
        for protocol in list(self._protocols):
            protocol.close_connection(APP_NO_ERROR, "backend shutting down")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)
        for endpoint in self._endpoints:
            endpoint.close()
        self._protocols.clear()
        self._endpoints.clear()
        self._servers.clear()

    def describe(self) -> dict[str, Any]:
        return {
            "congestion": self.congestion, "aioquic_algorithm": self.algorithm, "alpn": ALPN,
            "max_datagram_size": self.max_datagram_size or "1472 (IPv4) / 1452 (IPv6), less where the route's MTU is lower",
            "mtls": self.mtls, "verify_server": bool(self.ca), "idle_timeout": self.idle_timeout,
            "keepalive": self.keepalive, "dead_timeout": self.dead_timeout, "socket_buffer": self.socket_buffer,
            "max_streams": self.max_streams, "send_buffer": self.send_buffer,
            "recv_buffer": self.recv_buffer, "ordered": self.ordered, "zero_rtt": self.zero_rtt,
            "cid_length": self.cid_length, "handshake_timeout": self.handshake_timeout,
            "fec": self.fec.mode if self.fec.mode != "fixed" else f"{self.fec.ratio * 100:g}%",
            **({f"fec_{k}": v for k, v in self._fec_totals().items()}),
            **self._guard_totals(),
            **self._pathwatch_totals(),
        }

    def _retire(self, protocol: Lu2kQuicProtocol) -> None:
        if protocol in self._protocols:
            self._protocols.discard(protocol)
            _add(self._pathwatch_closed, protocol.pathwatch.figures())

    def _pathwatch_totals(self) -> dict[str, int]:
        """Silent paths (:mod:`.quic_pathwatch`), every connection this backend had: PINGs sent
        into a silence, and probes sent before a backed-off timeout."""
        totals = dict.fromkeys(PATHWATCH_FIGURES, 0)
        _add(totals, self._pathwatch_closed)
        for protocol in self._protocols:
            _add(totals, protocol.pathwatch.figures())
        return totals

    def _guard_totals(self) -> dict[str, int]:
        """The listeners' guard (:mod:`.quic_guard`): what it refused, and what is half-open now."""
        totals = {"half_open": 0, "initials_dropped": 0, "half_open_evicted": 0, "handshakes_timed_out": 0}
        for server in self._servers:
            totals["half_open"] += server.half_open
            for k, v in server.stats.items():
                totals[k] += v
        return totals

    def _fec_totals(self) -> dict[str, int]:
        totals = dict(self._fec_closed)
        for endpoint in self._endpoints:
            _add(totals, endpoint.fec_stats())
        return totals


def _add(totals: dict[str, int], figures: dict[str, int]) -> None:
    for k, v in figures.items():
        totals[k] = totals.get(k, 0) + v


def _public_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class _AppLimitedProbe:
    """Is the sender out of data?  Checked at most once per millisecond of send time: the walk
    over the streams per packet is too dear, and so is asking the event loop for the time."""

    def __init__(self, quic: QuicConnection) -> None:
        self._quic = quic
        self._at = -1.0
        self._value = False

    def __call__(self, now: float) -> bool:
        if now - self._at >= 0.001:
            self._at = now
            self._value = all(s.sender.buffer_is_empty for s in self._quic._streams.values())
        return self._value
