"""The one interface every lu2k backend implements (LNet's ``struct lnet_lnd``, socket-shaped).

A backend moves *frames* (see :mod:`lu2k.wire`) between two daemons.  The daemon engine owns
everything above that: hello/authentication, sequence numbers, acks, credits, routing,
retries.  So a backend only has to:

* ``listen(host, port, on_accept)`` and ``connect(host, port, conn_type, timeout)``, giving
  :class:`Transport` objects;
* on a transport, ``send(frames)`` -- each frame an encoded header plus a payload view that
  may point into shared memory (zero copy): ``send`` returns once the payloads are no longer
  referenced -- and ``recv()``, returning whole frames whose payload, where the transport
  can, was written straight into the buffer the engine's ``buffer_for`` callback supplied;
* translate its library's exceptions into :mod:`lu2k.errors` (``ConnectError``,
  ``ReadError``/``ConnectionClosed``, ``WriteError``, ``FrameError``) -- nothing else escapes;
  each backend does it once, with one :func:`map_exceptions` table per phase;
* carry every frame type both ways once the hello is done: the side that accepted a
  connection may send MSG and PING frames on it too (a return path through NAT,
  :mod:`lu2k.core.returnpath`), and the side that opened it then answers on its own direction;
* until :meth:`Transport.on_hello_done`, accept only hello frames (nothing an unauthenticated
  peer sends may make it allocate more than a header); after it, seal every frame with the
  keys the hello derived (:class:`lu2k.crypto.FrameCodec`) unless the backend's own channel
  already does (quic's TLS, udt's AEAD) or the net says ``encryption: none``.

Backends are registered by name (:func:`lu2k.backends.register_backend`), like
``lnet_register_lnd``, and imported lazily so a missing optional dependency only disables the
backend that needs it.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

import structlog

from ..errors import ConfigError, Lu2kError, NidError
from ..values import parse_key
from ..nid import Net, Nid, parse_nid
from ..wire import BufferFor, ConnType, Frame, HelloResult

log = structlog.get_logger("lu2k.backends")

ENCRYPTION_CHOICES = ("aes-256-gcm", "none")
# One table per backend and phase: library exception type -> lu2k error type (httpcore's
# ``map_exceptions``).  The first matching entry wins, so list subclasses before their bases.
ExceptionMap = Mapping[type[BaseException], type[Lu2kError]]


@contextlib.contextmanager
def map_exceptions(table: ExceptionMap, context: str) -> Iterator[None]:
    """Translate a library's exceptions raised inside the block, by type, never by text.

    ``context`` says what was being done ("send to 10.0.0.2:988"); the library's own words
    follow it.  lu2k's own errors and anything not in the table pass through unchanged.
    """
    try:
        yield
    except Lu2kError:
        raise
    except BaseException as exc:  # noqa: BLE001 - re-raised below unless the table names it
        for from_type, to_type in table.items():
            if isinstance(exc, from_type):
                raise to_type(f"{context}: {describe_exception(exc)}") from None
        raise


def describe_exception(exc: BaseException) -> str:
    """The library's words for an error: ``strerror`` for OSError, else its text or type."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def raise_mapped(table: ExceptionMap, context: str, exc: BaseException) -> NoReturn:
    """:func:`map_exceptions` for an exception already caught (e.g. carried from a thread)."""
    with map_exceptions(table, context):
        raise exc
    raise AssertionError("unreachable")  # pragma: no cover

OutFrame = tuple["bytes | bytearray", "bytes | memoryview"]  # (encoded header -- or a run of sealed records --, payload -- may be b"")


def option_int(options: dict[str, Any], name: str, default: int, low: int, high: int, where: str,
               *, what: str = "an integer") -> int:
    """A backend option that must be a whole number in ``low..high`` (``what`` names the unit
    in the error, e.g. "a byte count")."""
    value = options.get(name, default)
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {what}, not {value!r}", where=where) from None
    if not low <= out <= high:
        raise ConfigError(f"{name} {out} outside {low}..{high}", where=where)
    return out


def option_seconds(options: dict[str, Any], name: str, default: float, where: str, *, allow_zero: bool = False) -> float:
    """A backend option that must be a positive number of seconds (or zero, if allowed)."""
    value = options.get(name, default)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}", where=where) from None
    if not math.isfinite(out) or out < 0 or (out == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'zero or ' if allow_zero else ''}positive, not {value!r}", where=where)
    return out


# accept() failing with these means the process or the system is out of something: retrying at
# once spins (the listening socket stays readable), so the accept loop pauses instead.
EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass
class AcceptBackoff:
    """How long an accept loop pauses after running out of descriptors or memory: ``low``
    seconds, doubling per consecutive failure up to ``high``; reset by a successful accept."""

    low: float = 0.05
    high: float = 2.0
    failures: int = 0

    def failed(self) -> float:
        self.failures += 1
        return min(self.high, self.low * (2 ** (self.failures - 1)))

    def succeeded(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class LinkProfile:
    """What the operator tells us about a site's link; sizes buffers and picks controllers."""

    rtt_ms: float | None = None
    rate_mbit: float | None = None
    loss: float | None = None  # fraction, 0.01 == 1 %

    def bdp_bytes(self, default: int = 4 << 20) -> int:
        if self.rtt_ms is None or self.rate_mbit is None:
            return default
        return int(self.rate_mbit * 1e6 / 8 * self.rtt_ms / 1e3)


@dataclass(frozen=True)
class BackendSettings:
    """Everything a backend is told about the network it serves."""

    net: Net
    port: int
    max_message_size: int
    profile: LinkProfile = field(default_factory=LinkProfile)
    key: bytes = b""  # the network's pre-shared key (for backends that derive transport keys)
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific config keys

    @property
    def peer_keys(self) -> dict[Nid, bytes]:
        """``options.peer_keys``: ``{peer NID: key}``, keys shared with one peer each (``hex:`` +
        at least 32 hex digits, or text of at least 16 characters).  Such a peer proves its own
        key in the hello, in both directions, instead of the network's."""
        where = f"net {self.net}: options.peer_keys"
        raw = self.options.get("peer_keys") or {}
        if not isinstance(raw, dict):
            raise ConfigError("expected a mapping of peer NID to key", where=where)
        out: dict[Nid, bytes] = {}
        for nid_text, key_text in raw.items():
            try:
                nid = parse_nid(str(nid_text), resolve=False)
            except NidError as e:
                raise ConfigError(f"bad peer NID {nid_text!r}: {e}", where=where) from None
            if nid.net != self.net:
                raise ConfigError(f"peer {nid} is not on net {self.net}", where=where)
            out[nid] = parse_key(str(key_text), f"{where}.{nid_text}")
        return out

    @property
    def peer_keys_only(self) -> bool:
        """``options.peer_keys_only``: refuse peers without an entry in ``peer_keys`` (the
        network key is then not accepted from anyone: revoking a peer is deleting its entry)."""
        value = self.options.get("peer_keys_only", False)
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, not {value!r}", where=f"net {self.net}: options.peer_keys_only")
        return value

    def key_for(self, peer: Nid) -> bytes:
        """The key the hello with ``peer`` proves: its own if it has one, else the network's."""
        own = self.peer_keys.get(peer)
        if own is None and self.peer_keys_only:
            return b""  # the hello refuses to start without a key: nobody to talk to
        return own if own is not None else self.key

    @property
    def encryption(self) -> str:
        """``options.encryption``: ``aes-256-gcm`` (default) or ``none`` (plaintext frames)."""
        value = self.options.get("encryption", "aes-256-gcm")
        if value not in ENCRYPTION_CHOICES:
            raise ConfigError(f"encryption must be one of {', '.join(ENCRYPTION_CHOICES)}, not {value!r}",
                              where=f"net {self.net}: options.encryption")
        return str(value)


class Transport(abc.ABC):
    """One established connection between two daemons, carrying frames."""

    backend_name: ClassVar[str] = "?"

    @abc.abstractmethod
    async def send(self, frames: Sequence[OutFrame]) -> None:
        """Queue frames in order; returns when the payload buffers are free again."""

    @abc.abstractmethod
    async def recv(self) -> list[Frame]:
        """At least one whole frame.  ``ConnectionClosed`` at a clean end."""

    @abc.abstractmethod
    def set_buffer_for(self, buffer_for: BufferFor | None) -> None:
        """Where received MSG payloads should be placed (engine-provided)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Start closing; pending sends fail with WriteError."""

    def on_hello_done(self, result: HelloResult) -> None:
        """The hello on this connection has finished, on this side, and no MSG/ACK frame has
        flowed yet: switch from hello frames to the frames the hello agreed on (sealed with
        ``result``'s keys, or plaintext).  Called once per connection by the engine."""
        return None

    def carry_requests(self, conn_type: ConnType) -> None:
        """Accepting end: the engine now also sends its own messages of ``conn_type`` on this
        connection's reverse direction (a return path, :mod:`lu2k.core.returnpath`).  A backend
        whose sending side is tuned per connection (tcp's BBR watch) tunes it here as on a
        connection it opened itself.  Called once per adoption; calling again does nothing."""
        return None

    @property
    def channel_binding(self) -> bytes:
        """What the hello should bind to in the secure channel under it (quic: the TLS server
        certificate's hash); empty for transports without one."""
        return b""

    async def wait_closed(self) -> None:
        return None

    @property
    @abc.abstractmethod
    def peer_address(self) -> str:
        """Printable address of the other end (for logs)."""

    def stats(self) -> dict[str, Any]:
        """Transport figures (RTT, retransmissions, ...) for ``lu2kctl peer show``."""
        return {}


AcceptCallback = Callable[[Transport], Awaitable[None]]


class Listener(abc.ABC):
    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def address(self) -> tuple[str, int]: ...


class Backend(abc.ABC):
    """A transport implementation, instantiated once per network that uses it."""

    name: ClassVar[str]
    # socklnd-style typed connections: small messages on CONTROL, >= min_bulk on BULK.
    typed_connections: ClassVar[bool] = False
    # Frames are sealed by lu2k.crypto after the hello (False where the backend's own
    # channel encrypts everything: quic's TLS, udt's per-connection AEAD).
    uses_frame_sealing: ClassVar[bool] = True

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings
        settings.peer_keys, settings.peer_keys_only  # noqa: B018 - bad keys are refused at start, with where
        encryption = settings.encryption
        if encryption == "none" and self.uses_frame_sealing:
            log.warning("encryption: none -- frames on this net travel in plaintext and unauthenticated after the hello; "
                        "anyone on the path can read, alter and inject messages", net=str(settings.net), backend=self.name)
        elif encryption == "none":
            log.warning("encryption: none has no effect on this backend: its channel is always encrypted",
                        net=str(settings.net), backend=self.name)

    @property
    def seal_frames(self) -> bool:
        """Whether this net's connections seal frames after the hello (the hello's ``sealed``)."""
        return self.uses_frame_sealing and self.settings.encryption != "none"

    @abc.abstractmethod
    async def listen(self, host: str, port: int, on_accept: AcceptCallback) -> Listener: ...

    @abc.abstractmethod
    async def connect(self, host: str, port: int, conn_type: ConnType, timeout: float) -> Transport: ...

    async def close(self) -> None:
        """Release backend-wide resources (threads, contexts)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Effective settings, for ``lu2kctl net show``."""
        return {}
