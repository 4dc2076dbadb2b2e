"""A socklnd net's options, validated once (``lu2kd --check`` and start-up).  Pure.

Configured in lnetctl YAML like any net, with ``backend: socklnd``::

    net:
      - net type: tcp
        local NI(s):
          - nid: 192.168.1.1@tcp
            tunables: {peer_credits: 8, credits: 256}
        lu2k:
          backend: socklnd
          port: 988                      # LNet's acceptor port (the default for socklnd nets)
          options:
            secure_accept: true          # refuse source ports > 1023, as accept=secure does
            privileged_connect: true     # connect from ports 1023..512, as lnet_connect does
            peer_port: 988               # the kernel nodes' acceptor port
            protocol: 3                  # 3 (the kernel's default for IPv4) or 2
            timeout: 50                  # seconds a queued message may wait for the node
            connect_timeout: 5           # seconds for connect + connreq + hello (accept_timeout)
            keepalive: 30                # seconds of idle before a NOOP (V3)
            min_bulk: 1024               # messages of this many bytes or more go on BULK
            max_queued: 1024             # messages waiting for one node before new ones fail
            remote_nids: [192.168.1.1@tcp1]  # NIDs this router shows on its remote nets
            discovery: true              # advertise discovery and accept pushes
            probe_interval: 5            # seconds between checks that the lu2k hop is up
            tx_buffer_size: 0            # SO_SNDBUF / SO_RCVBUF of LAN sockets, as ksocklnd's
            rx_buffer_size: 0            #   tunables of that name (0: kernel autotuning)

The registry entry (``lu2k.backends`` name ``socklnd``) is :class:`SocklndNet`: constructing
it validates the options, which is all ``lu2kd --check`` needs; the daemon attaches the
asyncio driver (:mod:`lu2k.socklnd.driver`) with ``engine.attach_lan`` instead of treating
the net as an lu2k backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..backends.base import BackendSettings, option_int, option_seconds
from ..errors import ConfigError, NidError
from ..nid import Nid, parse_nid
from . import idl

KNOWN_OPTIONS = frozenset({
    "secure_accept", "privileged_connect", "peer_port", "protocol", "timeout", "connect_timeout", "keepalive",
    "min_bulk", "max_queued", "remote_nids", "discovery", "probe_interval", "rx_window_bytes", "tx_buffer_size",
    "rx_buffer_size",
})


@dataclass(frozen=True)
class SocklndTunables:
    port: int = idl.LNET_ACCEPTOR_PORT
    peer_port: int = idl.LNET_ACCEPTOR_PORT
    secure_accept: bool = True
    privileged_connect: bool = True
    protocol: int = idl.KSOCK_PROTO_V3
    timeout: float = 50.0
    connect_timeout: float = 5.0
    keepalive: float = 30.0
    min_bulk: int = 1024
    max_queued: int = 1024
    remote_nids: tuple[Nid, ...] = ()
    discovery: bool = True
    probe_interval: float = 5.0
    rx_window_bytes: int = 64 << 20  # LNet bytes from the LAN not yet finished by lu2k
    rx_window_msgs: int = 256  # the NI's credits: LAN messages not yet finished by lu2k
    tx_buffer_size: int = 0  # SO_SNDBUF of LAN sockets (ksocklnd's tx_buffer_size); 0 = kernel autotuning
    rx_buffer_size: int = 0  # SO_RCVBUF of LAN sockets (rx_buffer_size); 0 = kernel autotuning
    peer_credits: int = 8
    checksum: bool = False

    @classmethod
    def from_settings(cls, s: BackendSettings, *, credits: int = 256, peer_credits: int = 8) -> "SocklndTunables":
        where = f"net {s.net}.lu2k.options"
        o = dict(s.options)
        unknown = sorted(set(o) - KNOWN_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown socklnd option(s) {unknown} (known: {', '.join(sorted(KNOWN_OPTIONS))})", where=where)
        if s.net.type != "tcp":
            raise ConfigError(f"socklnd carries LNet's tcp nets, not {s.net}", where=f"net {s.net}")
        protocol = option_int(o, "protocol", idl.KSOCK_PROTO_V3, 2, 3, where, what="2 or 3")
        nids = []
        raw = o.get("remote_nids", [])
        if not isinstance(raw, list):
            raise ConfigError(f"remote_nids must be a list of NIDs, not {raw!r}", where=where)
        for i, text in enumerate(raw):
            try:
                nid = parse_nid(str(text))
                idl.nid4_of(nid)
            except NidError as e:
                raise ConfigError(str(e), where=f"{where}.remote_nids[{i}]") from None
            if nid.net == s.net:
                raise ConfigError(f"{nid} is on this net; remote_nids name NIDs on the nets routed over lu2k", where=f"{where}.remote_nids[{i}]")
            nids.append(nid)
        return cls(
            port=s.port,
            peer_port=option_int(o, "peer_port", s.port, 1, 65535, where),
            secure_accept=_bool(o, "secure_accept", True, where),
            privileged_connect=_bool(o, "privileged_connect", True, where),
            protocol=protocol,
            timeout=option_seconds(o, "timeout", 50.0, where),
            connect_timeout=option_seconds(o, "connect_timeout", 5.0, where),
            keepalive=option_seconds(o, "keepalive", 30.0, where),
            min_bulk=option_int(o, "min_bulk", 1024, 0, idl.LNET_MTU, where),
            max_queued=option_int(o, "max_queued", 1024, 1, 1 << 20, where),
            remote_nids=tuple(nids),
            discovery=_bool(o, "discovery", True, where),
            probe_interval=option_seconds(o, "probe_interval", 5.0, where),
            rx_window_bytes=option_int(o, "rx_window_bytes", 64 << 20, idl.LNET_MTU + idl.LNET_HDR_NID4_SIZE, 1 << 40, where),
            rx_window_msgs=credits,
            tx_buffer_size=option_int(o, "tx_buffer_size", 0, 0, 1 << 30, where, what="a byte count"),
            rx_buffer_size=option_int(o, "rx_buffer_size", 0, 0, 1 << 30, where, what="a byte count"),
            peer_credits=peer_credits,
        )


def _bool(o: dict[str, Any], name: str, default: bool, where: str) -> bool:
    v = o.get(name, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be true or false, not {v!r}", where=where)
    return v


class SocklndNet:
    """The ``socklnd`` entry of the backend registry: a LAN of kernel LNet nodes, not an lu2k link."""

    name: ClassVar[str] = "socklnd"
    lan_driver: ClassVar[bool] = True  # the daemon attaches it with engine.attach_lan
    typed_connections: ClassVar[bool] = True

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings
        self.tunables = SocklndTunables.from_settings(settings)

    @staticmethod
    def probe() -> str:
        """Why it is not in ``availability()``'s list of link backends (so benches skip it)."""
        return "socklnd is a LAN of kernel LNet nodes, not a link between lu2k daemons"

    async def listen(self, host: str, port: int, on_accept: Any) -> Any:
        raise ConfigError("a socklnd net is attached when lu2kd starts (engine.attach_lan); restart lu2kd to add one",
                          where=f"net {self.settings.net}")

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"lan": "socklnd"}
