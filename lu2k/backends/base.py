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
  ``ReadError``/``ConnectionClosed``, ``WriteError``, ``FrameError``) -- nothing else escapes.

Backends are registered by name (:func:`lu2k.backends.register_backend`), like
``lnet_register_lnd``, and imported lazily so a missing optional dependency only disables the
backend that needs it.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError
from ..nid import Net
from ..wire import BufferFor, ConnType, Frame

OutFrame = tuple[bytes, "bytes | memoryview"]  # (encoded header, payload -- may be b"")


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

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings

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
