"""TCP port forwarding over lu2k: the flow protocol, one flow's state machine, and the allow-list.

Pure: bytes and events in, messages and bytes-to-write out.  :mod:`.forward` runs the TCP
sockets and the endpoint around it.

Theory of operation
-------------------
A TCP connection accepted at one site becomes a *flow*: ``OPEN`` (target ``host:port``)
goes to the far site's forward service, which checks its allow-list, connects, and
answers ``OPENED`` or ``REFUSED`` (with the reason: not allowed, connection refused, no
such host, timeout).  Then each side turns what it reads from its socket into ``DATA``
messages carrying their byte offset, and writes what arrives back in order -- lu2k
delivers each message once but not in order, so the receiver reassembles by offset.

*Flow control.*  Each side grants the other ``window`` bytes: it may send up to
``peer_consumed + window`` where ``peer_consumed`` is the last ``WINDOW`` value received
(bytes the peer has written into its socket).  A side that cannot write (a slow target,
a slow client) stops sending ``WINDOW``; the sender stops reading its socket, and TCP's
own flow control pushes back on the source.  So memory per flow is bounded by the two
windows, and a slow target slows the source.

*Closing.*  EOF on a socket becomes ``FIN`` (carrying the final offset); the far side
shuts down the write half of its socket once every byte before it was written
(half-close).  A socket error or reset becomes ``RST``, and an ``RST`` in aborts the
socket (the TCP peer sees a reset).  A flow is closed when both FINs have been
delivered, or on RST either way.

Rules: a flow's state changes only through :data:`FLOW_TRANSITIONS`; anything a peer sends
that the table or the window does not allow is a :class:`~lu2k.errors.RemoteProtocolError`
(the adapter resets that flow only).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from ..errors import ConfigError, LocalProtocolError, RemoteProtocolError

MAGIC = 0x5746324C  # "L2FW"
VERSION = 1

HDR = struct.Struct("<IBBHQ")  # magic, kind, version, detail (REFUSED: its Refusal cause; else 0), flow id (the opener's random u64)
OPEN = struct.Struct("<IH")  # window the opener grants, target length; then "host:port" (UTF-8)
OPENED = struct.Struct("<I")  # window the service grants
DATA = struct.Struct("<Q")  # byte offset of the payload in this direction
WINDOW = struct.Struct("<Q")  # bytes the sender of this message has consumed (written to its socket)
FIN = struct.Struct("<Q")  # final offset (total bytes) of this direction
TEXT = struct.Struct("<H")  # REFUSED / RST: text length; then UTF-8

DEFAULT_WINDOW = 8 << 20
MAX_WINDOW = 1 << 30
MAX_DATA = 64 * 1024  # payload per DATA message (fits the shim's 128 KiB slot class)


class Kind(enum.IntEnum):
    OPEN = 1
    OPENED = 2
    REFUSED = 3
    DATA = 4
    WINDOW = 5
    FIN = 6
    RST = 7


class Refusal(enum.IntEnum):
    """Why a flow could not be opened; carried in a REFUSED header (0 from a peer that does not say)."""

    FAILURE = 0  # anything else (also: a peer that does not say)
    NOT_ALLOWED = 1
    NO_SUCH_HOST = 2
    CONNECTION_REFUSED = 3
    NETWORK_UNREACHABLE = 4
    HOST_UNREACHABLE = 5
    TIMED_OUT = 6
    TOO_MANY_FLOWS = 7
    FAR_SIDE_UNREACHABLE = 8  # decided at the opener: lu2k could not deliver the OPEN


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    flow: int
    value: int = 0  # window (OPEN/OPENED), offset (DATA/FIN), consumed (WINDOW), Refusal (REFUSED)
    text: str = ""  # target (OPEN), reason (REFUSED/RST)
    payload: bytes | memoryview = b""


def _hdr(kind: Kind, flow: int, detail: int = 0) -> bytes:
    return HDR.pack(MAGIC, kind, VERSION, detail, flow)


def _text(s: str) -> bytes:
    raw = s.encode("utf-8", "replace")[:1024]
    return TEXT.pack(len(raw)) + raw


def encode(m: Message) -> bytes:
    if m.kind is Kind.OPEN:
        t = m.text.encode("utf-8")
        return _hdr(m.kind, m.flow) + OPEN.pack(m.value, len(t)) + t
    if m.kind is Kind.OPENED:
        return _hdr(m.kind, m.flow) + OPENED.pack(m.value)
    if m.kind is Kind.DATA:
        return _hdr(m.kind, m.flow) + DATA.pack(m.value) + bytes(m.payload)
    if m.kind in (Kind.WINDOW, Kind.FIN):
        return _hdr(m.kind, m.flow) + WINDOW.pack(m.value)
    return _hdr(m.kind, m.flow, m.value if m.kind is Kind.REFUSED else 0) + _text(m.text)


def data_header(flow: int, offset: int) -> bytes:
    return _hdr(Kind.DATA, flow) + DATA.pack(offset)


DATA_OVERHEAD = HDR.size + DATA.size


def decode(buf: bytes | memoryview) -> Message:
    view = memoryview(buf)
    if len(view) < HDR.size:
        raise RemoteProtocolError(f"forward message of {len(view)} bytes is shorter than its header")
    magic, kind, version, detail, flow = HDR.unpack_from(view)
    if magic != MAGIC:
        raise RemoteProtocolError(f"not a lu2k forward message (magic 0x{magic:08x})")
    if version != VERSION:
        raise RemoteProtocolError(f"forward protocol version {version}, this side speaks {VERSION}")
    if kind not in Kind._value2member_map_:
        raise RemoteProtocolError(f"unknown forward message kind {kind}")
    k = Kind(kind)
    body = view[HDR.size :]
    try:
        if k is Kind.DATA:
            (off,) = DATA.unpack_from(body)
            return Message(k, flow, off, payload=body[DATA.size :])
        if k is Kind.OPEN:
            win, tlen = OPEN.unpack_from(body)
            raw = bytes(body[OPEN.size : OPEN.size + tlen])
            if len(raw) != tlen:
                raise RemoteProtocolError("OPEN target truncated")
            return Message(k, flow, win, raw.decode("utf-8", "replace"))
        if k is Kind.OPENED:
            return Message(k, flow, OPENED.unpack_from(body)[0])
        if k in (Kind.WINDOW, Kind.FIN):
            return Message(k, flow, WINDOW.unpack_from(body)[0])
        (tlen,) = TEXT.unpack_from(body)
        cause = (detail if detail in Refusal._value2member_map_ else Refusal.FAILURE) if k is Kind.REFUSED else 0
        return Message(k, flow, cause, bytes(body[TEXT.size : TEXT.size + tlen]).decode("utf-8", "replace"))
    except struct.error:
        raise RemoteProtocolError(f"truncated forward {k.name} message ({len(view)} bytes)") from None


# --- one flow -------------------------------------------------------------------------------------


class FlowState(enum.Enum):
    OPENING = "opening"  # OPEN sent (opener) / connecting to the target (service)
    OPEN = "open"
    LOCAL_CLOSED = "local-closed"  # our FIN is out; we still write what arrives
    REMOTE_CLOSED = "remote-closed"  # the peer's FIN arrived in order; we still send
    CLOSED = "closed"


F = FlowState
FLOW_TRANSITIONS: dict[tuple[FlowState, str], FlowState] = {
    (F.OPENING, "opened"): F.OPEN,
    (F.OPENING, "refused"): F.CLOSED,
    (F.OPEN, "fin_out"): F.LOCAL_CLOSED,
    (F.OPEN, "fin_in"): F.REMOTE_CLOSED,
    (F.LOCAL_CLOSED, "fin_in"): F.CLOSED,
    (F.REMOTE_CLOSED, "fin_out"): F.CLOSED,
}
for _s in F:
    if _s is not F.CLOSED:
        FLOW_TRANSITIONS[(_s, "rst")] = F.CLOSED


class Flow:
    """One TCP connection's flow, seen from one side.

    Out: :meth:`sendable` says how many bytes may be read from the socket now,
    :meth:`data` frames them, :meth:`fin` ends the direction.  In: :meth:`on_message`
    returns bytes to write to the socket in order (and sets :attr:`eof_in` once the peer's
    FIN is reached); :meth:`consumed` after writing returns a WINDOW message when one is due.
    """

    def __init__(self, flow_id: int, window: int, *, opener: bool, peer_window: int = 0) -> None:
        if not 0 < window <= MAX_WINDOW:
            raise LocalProtocolError(f"flow window {window} outside 1..{MAX_WINDOW}")
        self.id = flow_id
        self.window = window  # what we grant
        self.peer_window = peer_window  # what the peer grants us
        self.state = F.OPENING
        self.opener = opener
        self.sent = 0  # next offset out
        self.peer_consumed = 0
        self.next_in = 0  # next offset to hand to the socket
        self.held: dict[int, bytes] = {}
        self.held_bytes = 0
        self.consumed_in = 0  # bytes written to our socket
        self.advertised = 0  # consumed_in value in our last WINDOW
        self.fin_in_at: int | None = None
        self.eof_in = False
        self.reason = ""
        self.refusal: Refusal | None = None  # set when the flow was refused (either side)

    def _go(self, event: str) -> None:
        nxt = FLOW_TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise LocalProtocolError(f"flow {self.id:x}: {event} in state {self.state.value}")
        self.state = nxt

    @property
    def closed(self) -> bool:
        return self.state is F.CLOSED

    @property
    def can_send(self) -> bool:
        return self.state in (F.OPEN, F.REMOTE_CLOSED)

    def open_message(self, target: str) -> bytes:
        return encode(Message(Kind.OPEN, self.id, self.window, target))

    def accept(self, peer_window: int) -> bytes:
        """Service side: the target is connected; the OPENED to send."""
        self.peer_window = peer_window
        self._go("opened")
        return encode(Message(Kind.OPENED, self.id, self.window))

    def refuse(self, reason: str, cause: Refusal = Refusal.FAILURE) -> bytes:
        self._go("refused")
        self.reason, self.refusal = reason, cause
        return encode(Message(Kind.REFUSED, self.id, cause, reason))

    def sendable(self) -> int:
        if not self.can_send:
            return 0
        return max(0, self.peer_consumed + self.peer_window - self.sent)

    def data(self, payload: bytes | memoryview) -> bytes:
        """A DATA message for ``payload`` (at most :meth:`sendable` bytes)."""
        n = len(payload)
        if n > self.sendable():
            raise LocalProtocolError(f"flow {self.id:x}: {n} bytes exceed the peer's window ({self.sendable()} open)")
        msg = data_header(self.id, self.sent) + bytes(payload)
        self.sent += n
        return msg

    def fin(self) -> bytes:
        self._go("fin_out")
        return encode(Message(Kind.FIN, self.id, self.sent))

    def rst(self, reason: str) -> bytes:
        """Reset from our side (socket error); the RST to send."""
        if self.state is not F.CLOSED:
            self._go("rst")
        self.reason = reason
        return encode(Message(Kind.RST, self.id, 0, reason))

    def consumed(self, n: int) -> bytes | None:
        """``n`` bytes were written to our socket; a WINDOW message if a quarter window was freed."""
        self.consumed_in += n
        if self.consumed_in - self.advertised >= max(1, self.window // 4) and not self.closed:
            self.advertised = self.consumed_in
            return encode(Message(Kind.WINDOW, self.id, self.consumed_in))
        return None

    def on_message(self, m: Message) -> list[bytes]:
        """A message for this flow from the peer; in-order bytes to write to our socket."""
        if m.kind is Kind.RST:
            if self.state is not F.CLOSED:
                self._go("rst")
                self.reason = m.text or "reset by the far side"
            return []
        if self.state is F.CLOSED:
            return []  # late messages of a reset flow
        if m.kind is Kind.OPENED:
            if not self.opener or self.state is not F.OPENING:
                raise RemoteProtocolError(f"flow {self.id:x}: unexpected OPENED")
            self.peer_window = min(m.value, MAX_WINDOW)
            self._go("opened")
            return []
        if m.kind is Kind.REFUSED:
            if not self.opener or self.state is not F.OPENING:
                raise RemoteProtocolError(f"flow {self.id:x}: unexpected REFUSED")
            self._go("refused")
            self.reason, self.refusal = m.text, Refusal(m.value)
            return []
        if self.state is F.OPENING:
            raise RemoteProtocolError(f"flow {self.id:x}: {m.kind.name} before the flow was opened")
        if m.kind is Kind.WINDOW:
            if m.value > self.sent:
                raise RemoteProtocolError(f"flow {self.id:x}: WINDOW acknowledges {m.value} bytes, only {self.sent} sent")
            self.peer_consumed = max(self.peer_consumed, m.value)
            return []
        if m.kind is Kind.FIN:
            if self.fin_in_at is not None or m.value < self.next_in:
                raise RemoteProtocolError(f"flow {self.id:x}: bad FIN at {m.value}")
            self.fin_in_at = m.value
            return self._deliver()
        if m.kind is Kind.DATA:
            end = m.value + len(m.payload)
            if self.fin_in_at is not None and end > self.fin_in_at:
                raise RemoteProtocolError(f"flow {self.id:x}: DATA beyond FIN")
            if end > self.consumed_in + self.window:
                raise RemoteProtocolError(f"flow {self.id:x}: DATA up to {end} exceeds the window granted ({self.consumed_in + self.window})")
            if m.value < self.next_in or m.value in self.held:
                raise RemoteProtocolError(f"flow {self.id:x}: DATA at {m.value} repeats bytes")
            self.held[m.value] = bytes(m.payload)
            self.held_bytes += len(m.payload)
            return self._deliver()
        raise RemoteProtocolError(f"flow {self.id:x}: unexpected {m.kind.name}")

    def _deliver(self) -> list[bytes]:
        out = []
        while self.next_in in self.held:
            piece = self.held.pop(self.next_in)
            self.held_bytes -= len(piece)
            out.append(piece)
            self.next_in += len(piece)
        if self.fin_in_at is not None and self.next_in == self.fin_in_at and not self.eof_in:
            self.eof_in = True
            self._go("fin_in")
        return out


# --- targets and the allow-list -----------------------------------------------------------------


def parse_hostport(text: str, *, what: str = "--target", any_port: bool = False) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port); ``any_port`` admits port 0 (listen on a free one)."""
    t = text.strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
        ok = bool(sep)
    else:
        host, ok_sep, port_s = t.rpartition(":")
        ok = bool(ok_sep)
    if not ok or not host or not port_s.isdigit() or not (0 if any_port else 1) <= int(port_s) < 65536:
        raise ConfigError(f"{text!r} is not host:port (port {0 if any_port else 1}-65535)", where=what)
    return host, int(port_s)


@dataclass(frozen=True)
class AllowRule:
    """``HOST:PORTS``: HOST a name, an address or a CIDR network ('*' any); PORTS a port, a range a-b or '*'."""

    host: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    ports: tuple[int, int]

    def matches(self, name: str, addresses: list[str], port: int) -> bool:
        if not self.ports[0] <= port <= self.ports[1]:
            return False
        if self.host == "*":
            return True
        if self.network is None:
            return name.lower() == self.host.lower()
        ips = []
        for a in addresses:
            try:
                ips.append(ipaddress.ip_address(a))
            except ValueError:
                return False
        return bool(ips) and all(ip.version == self.network.version and ip in self.network for ip in ips)

    def __str__(self) -> str:
        ports = "*" if self.ports == (1, 65535) else str(self.ports[0]) if self.ports[0] == self.ports[1] else f"{self.ports[0]}-{self.ports[1]}"
        host = f"[{self.host}]" if ":" in self.host and "/" not in self.host else self.host
        return f"{host}:{ports}"


def parse_allow(text: str, *, where: str = "--allow") -> AllowRule:
    t = text.strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        ports_s = rest[1:] if rest.startswith(":") else ""
        if not sep:
            raise ConfigError(f"{text!r}: unclosed '['", where=where)
    else:
        host, _sep, ports_s = t.rpartition(":")
    if not host or not ports_s:
        raise ConfigError(f"{text!r} is not HOST:PORT (e.g. 10.0.0.5:22, 10.0.0.0/24:80-443, files.example:*)", where=where)
    if ports_s == "*":
        ports = (1, 65535)
    else:
        lo_s, _d, hi_s = ports_s.partition("-")
        if not lo_s.isdigit() or (hi_s and not hi_s.isdigit()):
            raise ConfigError(f"{text!r}: bad port {ports_s!r}", where=where)
        ports = (int(lo_s), int(hi_s or lo_s))
        if not 1 <= ports[0] <= ports[1] <= 65535:
            raise ConfigError(f"{text!r}: ports must be 1-65535, low to high", where=where)
    network = None
    if host != "*":
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            if "/" in host:
                raise ConfigError(f"{text!r}: bad network {host!r}", where=where) from None
    return AllowRule(host, network, ports)


def could_allow(rules: list[AllowRule], name: str, port: int) -> bool:
    """Whether some rule may admit ``name:port`` once resolved (so resolving is worth it)."""
    try:
        literal = [str(ipaddress.ip_address(name))]
    except ValueError:
        literal = []
    for r in rules:
        if not r.ports[0] <= port <= r.ports[1]:
            continue
        if r.host == "*" or (r.network is None and r.host.lower() == name.lower()):
            return True
        if r.network is not None and (not literal or r.matches(name, literal, port)):
            return True
    return False


def allowed(rules: list[AllowRule], name: str, addresses: list[str], port: int) -> AllowRule | None:
    """The first rule letting ``name:port`` (resolved to ``addresses``) through, or None."""
    for r in rules:
        if r.matches(name, addresses, port):
            return r
    return None


# --- SOCKS5 (RFC 1928), CONNECT only, no authentication ----------------------------------------

SOCKS_VERSION = 5
SOCKS_REPLY = {"ok": 0, "failure": 1, "not_allowed": 2, "net_unreachable": 3, "host_unreachable": 4, "refused": 5,
               "ttl": 6, "command": 7, "address_type": 8}

# The SOCKS5 reply for each way a flow can fail to open (RFC 1928 section 6).
SOCKS_REPLY_FOR: dict[Refusal, str] = {
    Refusal.FAILURE: "failure",
    Refusal.NOT_ALLOWED: "not_allowed",
    Refusal.NO_SUCH_HOST: "host_unreachable",
    Refusal.CONNECTION_REFUSED: "refused",
    Refusal.NETWORK_UNREACHABLE: "net_unreachable",
    Refusal.HOST_UNREACHABLE: "host_unreachable",
    Refusal.TIMED_OUT: "ttl",
    Refusal.TOO_MANY_FLOWS: "failure",
    Refusal.FAR_SIDE_UNREACHABLE: "net_unreachable",
}


def socks_greeting_reply(greeting: bytes) -> tuple[bytes, bool]:
    """(reply, ok) for the client's method list: we offer 'no authentication' only."""
    if len(greeting) < 2 or greeting[0] != SOCKS_VERSION or len(greeting) != 2 + greeting[1]:
        return b"\x05\xff", False
    return (b"\x05\x00", True) if 0 in greeting[2:] else (b"\x05\xff", False)


def socks_parse_request(req: bytes) -> tuple[str, int] | str:
    """The CONNECT target ``(host, port)``, or the SOCKS_REPLY key of the error."""
    if len(req) < 7 or req[0] != SOCKS_VERSION:
        return "failure"
    if req[1] != 1:
        return "command"
    atyp = req[3]
    if atyp == 1 and len(req) == 10:
        return str(ipaddress.IPv4Address(req[4:8])), int.from_bytes(req[8:10], "big")
    if atyp == 4 and len(req) == 22:
        return str(ipaddress.IPv6Address(req[4:20])), int.from_bytes(req[20:22], "big")
    if atyp == 3 and len(req) == 7 + req[4]:
        try:
            host = req[5 : 5 + req[4]].decode("ascii")
        except UnicodeDecodeError:
            return "address_type"  # clients send IDNA (ASCII) names
        return host, int.from_bytes(req[5 + req[4] : 7 + req[4]], "big")
    return "address_type"


def socks_request_length(head: bytes) -> int | None:
    """Total length of a CONNECT request once its first 5 bytes are known (None: need more)."""
    if len(head) < 5:
        return None
    atyp = head[3]
    return {1: 10, 4: 22}.get(atyp, 7 + head[4] if atyp == 3 else 10)


def socks_reply(code: str) -> bytes:
    return bytes([SOCKS_VERSION, SOCKS_REPLY[code], 0, 1, 0, 0, 0, 0, 0, 0])
