"""``lu2kd``: the lu2k daemon.

Loads the configuration (``--config FILE``, else the embedded default), brings up one NI per
configured net with its backend, the shim socket for local endpoints and the control socket
for ``lu2kctl``, and runs until SIGTERM/SIGINT.  ``--check`` validates the configuration
(and that each net's backend can be loaded here) without starting anything.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import structlog

from . import logs
from .backends import get_backend
from .control import ControlServer
from .engine import Engine
from .errors import BackendUnavailable, ConfigError, Lu2kError
from .nid import parse_nid
from .settings import DaemonConfig, load_config

log = structlog.get_logger("lu2k.daemon")


class Daemon:
    """Engine + control socket; what ``lu2kd`` runs and what tests and the demo embed."""

    def __init__(self, config: DaemonConfig) -> None:
        from .socklnd.attach import LanNets

        self.config = config
        self.lan = LanNets(config)  # socklnd nets: attached to the engine, not run by it
        self.engine = Engine(self.lan.core_config())
        self.control = ControlServer(config.control_path)
        self._register()
        # import/export, net|route|peer add|del, set (lnetctl-style, applied atomically)
        from .confctl import register as register_config_commands

        self.config_ctl = register_config_commands(self)

    def _register(self) -> None:
        eng, reg = self.engine, self.control.register

        async def net_show(args: dict[str, Any]) -> Any:
            return eng.describe_nets() + self.lan.describe()

        async def peer_show(args: dict[str, Any]) -> Any:
            peers = eng.describe_peers()
            if args.get("nid"):
                want = str(parse_nid(str(args["nid"])))
                peers = [p for p in peers if p["nid"] == want]
            return peers

        async def route_show(args: dict[str, Any]) -> Any:
            return eng.describe_routes()

        async def stats(args: dict[str, Any]) -> Any:
            return eng.describe_stats()

        async def ping(args: dict[str, Any]) -> Any:
            return await eng.ping(parse_nid(str(args["nid"])), float(args.get("timeout", 5.0)))

        async def endpoints(args: dict[str, Any]) -> Any:
            shim = eng.shim
            return [p.stats() for p in shim.ports.values()] if shim else []

        for name, fn in (("net show", net_show), ("peer show", peer_show), ("route show", route_show),
                         ("stats", stats), ("ping", ping), ("endpoint show", endpoints)):
            reg(name, fn)

    async def start(self) -> None:
        await self.engine.start()
        try:
            await self.lan.start(self.engine)
            await self.control.start()
        except BaseException:
            await self.lan.stop(self.engine)
            await self.engine.stop()
            raise

    async def stop(self) -> None:
        await self.control.close()
        await self.lan.stop(self.engine)
        await self.engine.stop()

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        log.info("lu2kd running", nid=str(self.engine.primary_nid()), shim=self.config.shim.path, control=self.config.control_path)
        try:
            await stop.wait()
        finally:
            log.info("lu2kd stopping")
            await self.stop()


def check(config: DaemonConfig) -> list[str]:
    """Problems that would stop this config from starting here (beyond syntax)."""
    problems = []
    for n in config.nets:
        try:
            get_backend(n.backend)(n.backend_settings())
        except BackendUnavailable as e:
            problems.append(f"net {n.net}: {e}")
        except ConfigError as e:
            problems.append(f"net {n.net}: {e}")
    return problems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lu2kd", description="lu2k daemon: LNet-style transport gateway")
    p.add_argument("--config", "-c", metavar="FILE", help="YAML configuration (default: the embedded loopback config)")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of key=value")
    p.add_argument("--shim-socket", metavar="PATH", help="override the shim socket path")
    p.add_argument("--control-socket", metavar="PATH", help="override the control socket path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_json)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"lu2kd: {e}", file=sys.stderr)
        return 2
    if args.shim_socket:
        config.shim.path = args.shim_socket
    if args.control_socket:
        config.control_path = args.control_socket
    if args.check:
        problems = check(config)
        for pr in problems:
            print(f"lu2kd: {pr}", file=sys.stderr)
        if not problems:
            nets = ", ".join(f"{n.nid} ({n.backend})" for n in config.nets)
            print(f"{config.source}: OK: {len(config.nets)} net(s): {nets}; {len(config.routes)} route(s); {len(config.peers)} peer(s)")
        return 1 if problems else 0
    try:
        asyncio.run(Daemon(config).run_until_signalled())
    except Lu2kError as e:
        print(f"lu2kd: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
