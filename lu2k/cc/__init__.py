"""lu2k's congestion controllers: pure, sans-I/O, registered by name.

* ``bbr`` -- :class:`~lu2k.cc.bbr.BbrController`, model-based (bottleneck bandwidth and min
  RTT, paced); does not read random loss as congestion, backs off on excess loss / queueing.
* ``rate`` -- :class:`~lu2k.cc.rate.RateController`, paces at the operator's configured rate,
  compensates for measured loss, never exceeds a cap, yields when a queue builds.

Controllers know nothing about QUIC; :mod:`lu2k.cc.aioquic_adapter` plugs them into
aioquic's congestion-control registry (as ``lu2k-bbr`` / ``lu2k-rate``) and its pacer.
:func:`default_for` is the per-site-profile default the QUIC backend uses.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigError
from .base import CongestionController

_CONTROLLERS: dict[str, "str | type[CongestionController]"] = {
    "bbr": "lu2k.cc.bbr:BbrController",
    "rate": "lu2k.cc.rate:RateController",
}

# Below this RTT and without configured loss, aioquic's stock CUBIC is fine; on a long or
# lossy hop it collapses (~0.3 Mbit/s at 600 ms and 1 % loss), so the model-based one is default.
LONG_RTT_MS = 200.0
LOSSY = 0.001


def register_controller(name: str, cls: "type[CongestionController] | str") -> None:
    _CONTROLLERS[name] = cls


def controller_names() -> list[str]:
    return sorted(_CONTROLLERS)


def get_controller(name: str) -> type[CongestionController]:
    entry = _CONTROLLERS.get(name)
    if entry is None:
        raise ConfigError(f"unknown congestion controller {name!r} (known: {', '.join(controller_names())})")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        _CONTROLLERS[name] = entry
    return entry


def create_controller(name: str, *, mss: int, **params: Any) -> CongestionController:
    """A new controller; bad parameters raise :class:`ConfigError` naming them."""
    cls = get_controller(name)
    try:
        return cls(mss=mss, **params)
    except TypeError as e:
        raise ConfigError(f"bad parameters for congestion controller {name!r}: {e}") from None


def default_for(rtt_ms: float | None, loss: float | None) -> str:
    """The controller a site profile gets when the config names none.

    Returns ``"bbr"`` for long (RTT >= 200 ms) or lossy hops, else ``"cubic"`` (aioquic's own).
    """
    if (rtt_ms is not None and rtt_ms >= LONG_RTT_MS) or (loss is not None and loss >= LOSSY):
        return "bbr"
    return "cubic"


__all__ = ["CongestionController", "controller_names", "create_controller", "default_for", "get_controller", "register_controller"]
