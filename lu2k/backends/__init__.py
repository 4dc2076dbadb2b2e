"""Backend registry: backends by name, imported on first use (cf. ``lnet_register_lnd``).

A backend whose optional dependency is missing stays listed, with the reason, so
``lu2kctl net show`` and ``lu2kd --check`` can say what to install.
"""

from __future__ import annotations

import importlib

from ..errors import BackendUnavailable
from .base import Backend, BackendSettings, LinkProfile, Listener, OutFrame, Transport

# name -> "module:Class" (lazy) or the class itself once registered/imported.
_BACKENDS: dict[str, "str | type[Backend]"] = {
    "tcp": "lu2k.backends.tcp:TcpBackend",
    "inproc": "lu2k.backends.inproc:InprocBackend",
    "quic": "lu2k.backends.quic:QuicBackend",
    "udt": "lu2k.backends.udt:UdtBackend",
    "rds": "lu2k.backends.rds:RdsBackend",
    "o2ib": "lu2k.backends.verbs:VerbsBackend",
    "socklnd": "lu2k.socklnd.tunables:SocklndNet",  # a LAN of kernel LNet nodes (engine.attach_lan)
}
# What to install when a backend's import fails.
_HINTS: dict[str, str] = {
    "quic": "pip install 'lu2k[quic]' (aioquic)",
    "udt": "apt-get install libudt-dev and reinstall lu2k, or pip install 'lu2k[udt]'",
    "rds": "a kernel with AF_RDS (modprobe rds_tcp)",
    "o2ib": "Debian's python3-pyverbs and an RDMA device (rdma_rxe for soft-RoCE)",
}


def register_backend(name: str, cls: "type[Backend] | str") -> None:
    """Make a backend available under ``name`` (a class, or a lazy ``"module:Class"``)."""
    _BACKENDS[name] = cls


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> type[Backend]:
    """The backend class for ``name``; ``BackendUnavailable`` says why it cannot be had."""
    entry = _BACKENDS.get(name)
    if entry is None:
        raise BackendUnavailable(f"unknown backend {name!r} (known: {', '.join(backend_names())})")
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            hint = _HINTS.get(name, "")
            raise BackendUnavailable(f"backend {name!r} is unavailable: {e}" + (f"; needs {hint}" if hint else "")) from None
        except BackendUnavailable:
            raise
        entry = getattr(module, attr)
        _BACKENDS[name] = entry
    return entry


def availability() -> dict[str, str | None]:
    """name -> None if usable here, else the reason it is not."""
    out: dict[str, str | None] = {}
    for name in backend_names():
        try:
            cls = get_backend(name)
            probe = getattr(cls, "probe", None)
            out[name] = probe() if callable(probe) else None
        except BackendUnavailable as e:
            out[name] = str(e)
    return out


__all__ = [
    "Backend", "BackendSettings", "LinkProfile", "Listener", "OutFrame", "Transport",
    "availability", "backend_names", "get_backend", "register_backend",
]
