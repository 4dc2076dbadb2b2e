"""lu2k's one error hierarchy.

Every layer raises these and nothing else; a library's own exceptions (``OSError``,
aioquic's, libudt's) are translated once, at the backend boundary.  The split follows h11
and httpcore:

* :class:`LocalProtocolError` -- *we* misused something (bad argument, wrong state);
* :class:`RemoteProtocolError` -- the *peer* violated the protocol (bad frame, failed
  authentication, version mismatch); the connection is closed, the daemon carries on;
* :class:`ConfigError` / :class:`NidError` -- bad operator input, with *where*;
* :class:`NetworkError` by phase (connect / read / write) and :class:`NetworkTimeout`;
* :class:`ShimError` -- a shim command rejected, carrying the errno the ABI returns.

:class:`Status` is the completion vocabulary shared by the shim ABI and the wire
protocol: ``0`` is "delivered", anything else is an errno-style failure reason.
"""

from __future__ import annotations

import enum
import errno as _errno


class Lu2kError(Exception):
    """Base of every error lu2k raises on purpose."""


# --- misuse and protocol -------------------------------------------------------------------


class LocalProtocolError(Lu2kError):
    """The local caller broke a rule (wrong state, bad argument)."""


class RemoteProtocolError(Lu2kError):
    """The peer broke the protocol; the connection it came on must be closed."""


class FrameError(RemoteProtocolError):
    """A frame from a peer was truncated, oversized, of unknown type or corrupt."""


class IntegrityError(FrameError):
    """A sealed frame failed authentication (altered, injected, replayed or reordered) or was
    malformed under a valid tag.  The connection is closed; engines count these apart."""


class HandshakeError(RemoteProtocolError):
    """The hello exchange failed (version, NID, backend or network mismatch)."""


class AuthenticationError(HandshakeError):
    """The peer could not prove it holds the network's key (or certificate)."""


# --- operator input ---------------------------------------------------------------------------


class ConfigError(Lu2kError, ValueError):
    """Bad configuration.  ``where`` says where: a YAML path, a string position, a file."""

    def __init__(self, message: str, *, where: str | None = None, errors: list[str] | None = None) -> None:
        self.where = where
        self.errors = list(errors) if errors else []
        text = f"{where}: {message}" if where else message
        if self.errors:
            text += "".join(f"\n  - {e}" for e in self.errors)
        super().__init__(text)


class NidError(Lu2kError, ValueError):
    """A NID, net or NID expression that does not parse; the message names the bad part."""


# --- network, by phase -----------------------------------------------------------------------


class NetworkError(Lu2kError):
    """A transport failed.  Subclasses say in which phase."""


class ConnectError(NetworkError):
    """Could not establish a connection."""


class ReadError(NetworkError):
    """Receiving failed (reset, unexpected close)."""


class WriteError(NetworkError):
    """Sending failed."""


class ConnectionClosed(ReadError):
    """The peer closed the connection cleanly between frames."""


class NetworkTimeout(NetworkError, TimeoutError):
    """A network operation did not finish in time."""


class ConnectTimeout(NetworkTimeout, ConnectError):
    """Connecting took too long."""


# --- components -------------------------------------------------------------------------------


class BackendUnavailable(Lu2kError):
    """A backend is unknown or its optional dependency is missing (message says which)."""


class ShimError(Lu2kError):
    """A shim command was rejected.  ``code`` is the errno the ABI returned."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(f"[{_errno.errorcode.get(code, code)}] {message}")


class MessageFailed(Lu2kError):
    """Raised by ``Completion.result()`` for a message that failed; ``status`` says why."""

    def __init__(self, status: "Status", reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status.name}: {reason}")


class Status(enum.IntEnum):
    """Completion of one message.  Values are errnos so a C shim can use them as-is."""

    DELIVERED = 0
    NO_ROUTE = _errno.EHOSTUNREACH  # no route / peer unreachable until the timeout
    TIMED_OUT = _errno.ETIMEDOUT  # transaction timeout expired while queued or in flight
    NO_RECEIVER = _errno.ECONNREFUSED  # destination daemon has no endpoint on that portal
    PEER_RESTARTED = _errno.ECONNABORTED  # peer restarted mid-flight; delivery unknown
    TOO_LARGE = _errno.EMSGSIZE  # larger than the path's max message size
    PROTOCOL = _errno.EPROTO  # a peer or gateway sent something we could not accept
    AUTH_FAILED = _errno.EACCES  # authentication with the next hop failed
    CANCELLED = _errno.ECANCELED  # endpoint detached or daemon shutting down
    INVALID = _errno.EINVAL  # request itself was malformed

    @classmethod
    def from_code(cls, code: int) -> "Status":
        try:
            return cls(code)
        except ValueError:
            return cls.PROTOCOL

    def describe(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: dict[Status, str] = {
    Status.DELIVERED: "delivered",
    Status.NO_ROUTE: "peer unreachable",
    Status.TIMED_OUT: "timed out",
    Status.NO_RECEIVER: "no receiver attached at destination",
    Status.PEER_RESTARTED: "peer restarted; delivery unknown",
    Status.TOO_LARGE: "message too large",
    Status.PROTOCOL: "protocol error",
    Status.AUTH_FAILED: "authentication failed",
    Status.CANCELLED: "cancelled",
    Status.INVALID: "invalid request",
}
