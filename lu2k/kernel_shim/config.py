"""The shim server's settings (``lu2k: shim:`` in the daemon config): the one ShimConfig.

Pure.  The daemon config reads it in its single pass (every bad key reported with its YAML
path, ``lu2k.shim.<key>``); the shim server takes the same object.  ``path`` is where the
shim socket lives; the other keys are the server's tunables:

``max_in_flight``     requests per port handed to the engine and not yet completed
``max_message_size``  largest message an endpoint may post
``tx_pool_bytes``     TX pool of an endpoint that asks for 0
``rx_pool_bytes``     RX pool of an endpoint that asks for 0
``max_pool_bytes``    largest pool an endpoint may ask for
``max_ports``         endpoints attached at once
``batch``             descriptors taken per port per loop iteration
``socket_mode``       permissions of the socket file (YAML int, or an octal string "0660")
``idle_poll_us``      after activity, poll a port's rings this often ...
``idle_polls``        ... this many times before asking for kicks again (0: no polling)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..values import Problems, as_int, as_mode, as_str
from .abi import DEFAULT_MAX_MESSAGE, MIN_POOL_BYTES, default_shim_path
from .access import AccessPolicy, parse_access

_HARD_MAX_POOL = 4 << 30  # offsets are u64 but keep one endpoint from asking for the moon

# key -> (default, lo, hi); the pool sizes are further bounded by max_pool_bytes.
_LIMITS: dict[str, tuple[int, int, int]] = {
    "max_in_flight": (1024, 1, 1 << 20),
    "max_message_size": (DEFAULT_MAX_MESSAGE, 0, 64 << 20),
    "max_pool_bytes": (1 << 30, MIN_POOL_BYTES, _HARD_MAX_POOL),
    "tx_pool_bytes": (64 << 20, MIN_POOL_BYTES, _HARD_MAX_POOL),
    "rx_pool_bytes": (64 << 20, MIN_POOL_BYTES, _HARD_MAX_POOL),
    "max_ports": (256, 1, 1 << 16),
    "batch": (256, 1, 1 << 16),
    "socket_mode": (0o600, 0, 0o777),
    "idle_poll_us": (200, 0, 1_000_000),
    "idle_polls": (4, 0, 1_000_000),
}


class ShimConfig:
    """Shim socket path and server tunables, validated on construction.

    ``ShimConfig(max_in_flight=8, batch=32)`` raises :class:`ConfigError` naming
    ``lu2k.shim.<key>`` for the first bad key; :meth:`from_mapping` checks a whole YAML
    mapping and records every problem.
    """

    KEYS = tuple(_LIMITS)
    path: str
    max_in_flight: int
    max_message_size: int
    max_pool_bytes: int
    tx_pool_bytes: int
    rx_pool_bytes: int
    max_ports: int
    batch: int
    socket_mode: int
    idle_poll_us: int
    idle_polls: int
    access: AccessPolicy  # lu2k.shim.access: who may attach, which portals (kernel_shim.access)
    given: frozenset[str]  # the keys set explicitly (the rest are defaults)

    def __init__(self, max_in_flight: int = 1024, *, path: str | None = None, **options: Any) -> None:
        problems = Problems()
        access = options.pop("access", None)
        self._fill({"max_in_flight": max_in_flight, **options}, problems, "lu2k.shim")
        self.path = default_shim_path() if path is None else path
        self.access = access if isinstance(access, AccessPolicy) else AccessPolicy()
        if problems.items:
            raise ConfigError(problems.items[0].split(": ", 1)[-1], where=problems.items[0].split(": ", 1)[0],
                              errors=problems.items[1:])

    def _fill(self, data: Mapping[str, Any], problems: Problems, where: str) -> None:
        # What the config set itself, so that defaults derived elsewhere (a profile's window)
        # only replace what it left out.
        self.given = frozenset(k for k in data if k in _LIMITS)
        unknown = sorted(str(k) for k in data if k not in _LIMITS and k not in ("path", "access"))
        if unknown:
            problems.add(where, f"unknown shim option(s) {', '.join(unknown)} (known: path, access, {', '.join(self.KEYS)})")
        for key, (default, lo, hi) in _LIMITS.items():
            w = f"{where}.{key}"
            value = data.get(key, default)
            if key == "socket_mode":
                got = problems.check(lambda: as_mode(value, w, hi))
            else:
                if key in ("tx_pool_bytes", "rx_pool_bytes"):
                    hi = min(hi, getattr(self, "max_pool_bytes", hi))
                got = problems.check(lambda: as_int(value, w, lo, hi))
            setattr(self, key, default if got is None else got)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], problems: Problems, where: str = "lu2k.shim") -> "ShimConfig":
        """Read a YAML ``shim:`` mapping; problems go to ``problems`` (defaults stand in)."""
        self = cls.__new__(cls)
        self._fill(data, problems, where)
        self.access = AccessPolicy()
        if data.get("access") is not None:
            try:
                self.access = parse_access(data["access"], where=f"{where}.access")
            except ConfigError as e:
                problems.items.extend(e.errors or [str(e)])
        self.path = default_shim_path()
        if "path" in data:
            got = problems.check(lambda: as_str(data["path"], f"{where}.path", what="a socket path"))
            if got is not None:
                self.path = got
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The tunables other than ``max_in_flight``, as keyword arguments."""
        return {k: getattr(self, k) for k in self.KEYS if k != "max_in_flight"}

    def to_data(self) -> dict[str, Any]:
        return {"path": self.path, **{k: getattr(self, k) for k in self.KEYS}}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShimConfig) and self.to_data() == other.to_data()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "ShimConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_data().items()) + ")"


__all__ = ["ShimConfig"]
