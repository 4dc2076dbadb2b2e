"""How the daemon brings up its socklnd nets: split them from the lu2k nets, attach, detach.

The engine runs the lu2k nets (backends carrying lu2k frames); every net whose backend is a
LAN driver (``lan_driver`` in the registry: ``socklnd``) is left out of the engine's config
and attached after the engine started, with ``engine.attach_lan(net, driver)``.  Each driver
learns the remote nets it routes to over lu2k (the configured routes whose gateway is on an
lu2k net): it shows one NI on each in its ping replies, up while that gateway answers.

At run time (``lu2kctl net add|del``, ``import``) :func:`lu2k.confctl.apply_config` adds and
removes LAN nets here (:meth:`LanNets.add`, :meth:`LanNets.remove`) and hands over every new
configuration (:meth:`LanNets.reconfigure`), so the drivers follow route changes and the
engine's config never holds a LAN net.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import structlog

from ..backends import get_backend
from ..errors import BackendUnavailable, ConfigError
from ..nid import Net, Nid
from ..settings import DaemonConfig, NetConfig
from .driver import SocklndDriver

log = structlog.get_logger("lu2k.socklnd")


def is_lan(nc: NetConfig) -> bool:
    try:
        return bool(getattr(get_backend(nc.backend), "lan_driver", False))
    except BackendUnavailable:
        return False  # the engine reports the unknown backend


class LanNets:
    """The daemon's LAN drivers (zero or more socklnd nets)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.nets = [n for n in config.nets if is_lan(n)]
        self.drivers: dict[Net, SocklndDriver] = {}

    def core_config(self) -> DaemonConfig:
        """The configuration the engine runs: everything but the LAN nets."""
        if not self.nets:
            return self.config
        return replace(self.config, nets=[n for n in self.config.nets if n not in self.nets])

    def remote_gateways(self) -> dict[Net, list[Nid]]:
        """Each net routed over lu2k and its lu2k gateways (routes whose gateway is not on a LAN)."""
        lan = {n.net for n in self.nets}
        out: dict[Net, list[Nid]] = {}
        for r in self.config.routes:
            if r.gateway.net not in lan and r.net not in lan:
                out.setdefault(r.net, []).append(r.gateway)
        return out

    async def start(self, engine: Any) -> None:
        try:
            for nc in self.nets:
                await self._attach(engine, nc)
        except BaseException:
            await self.stop(engine)
            raise

    async def _attach(self, engine: Any, nc: NetConfig) -> None:
        peer_addresses = {p.nid: p.address for p in self.config.peers if p.address}
        driver = SocklndDriver(nc, engine, remote_gateways=self.remote_gateways(), peer_addresses=peer_addresses,
                               next_hop=engine.next_hop)
        await driver.start()  # raises (a port in use...) with nothing attached
        self.drivers[nc.net] = driver
        engine.attach_lan(nc.net, driver)

    async def add(self, engine: Any, nc: NetConfig) -> None:
        """Bring up one LAN net on a running daemon (``net add``); raises and leaves nothing on failure."""
        if nc.net in self.drivers:
            raise ConfigError(f"LAN net {nc.net} is already up", where="net add")
        await self._attach(engine, nc)
        self.nets.append(nc)

    async def remove(self, engine: Any, net: Net, reason: str) -> None:
        """Take one LAN net down: what its driver still holds ends CANCELLED with ``reason``."""
        driver = self.drivers.pop(net, None)
        self.nets = [n for n in self.nets if n.net != net]
        if driver is not None:
            engine.detach_lan(net)
            await driver.close(reason)

    def reconfigure(self, config: DaemonConfig) -> None:
        """Adopt a new daemon configuration whose LAN nets are already up: the drivers learn
        the remote nets now routed over lu2k (and forget the ones no longer routed)."""
        self.config = config
        self.nets = [n for n in config.nets if n.net in self.drivers]
        gateways = self.remote_gateways()
        for driver in self.drivers.values():
            driver.set_remote_gateways(gateways)

    async def stop(self, engine: Any) -> None:
        for net, driver in list(self.drivers.items()):
            engine.detach_lan(net)
            await driver.close("lu2kd stopping")
            del self.drivers[net]

    def describe(self) -> list[dict[str, Any]]:
        return [d.describe() for d in self.drivers.values()]
