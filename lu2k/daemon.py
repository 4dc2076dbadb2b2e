"""``lu2kd``: the lu2k daemon.

Loads the configuration (``--config FILE``, else the embedded default), brings up one NI per
configured net with its backend, the shim socket for local endpoints and the control socket
for ``lu2kctl``, and runs until SIGTERM/SIGINT.  ``--check`` validates the configuration
(and that each net's backend can be loaded here) without starting anything.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

import structlog

from . import __version__, gcpolicy, logs
from .control import ControlServer
from .engine import Engine
from .errors import ConfigError, Lu2kError, NetworkError
from .nid import parse_nid
from .sdnotify import SystemdNotifier, watchdog_interval
from .settings import DaemonConfig, check_backends, load_config

if TYPE_CHECKING:
    from .apps.services import Supervisor
    from .metrics import MetricsServer

log = structlog.get_logger("lu2k.daemon")

MAX_CONTROL_TIMEOUT = 3600.0


def control_timeout(value: Any) -> float:
    """A timeout from a control request: finite seconds in (0, 3600], else a ConfigError."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"timeout {value!r} is not a number of seconds", where="control") from None
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_CONTROL_TIMEOUT:
        raise ConfigError(f"timeout {value!r} must be finite, above 0 and at most {MAX_CONTROL_TIMEOUT:g} s", where="control")
    return seconds


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
        self.metrics: MetricsServer | None = None
        self.services: Supervisor | None = None  # lu2k: serve:/forward: -- children on our shim socket

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
            nid = parse_nid(str(args["nid"]))
            timeout = control_timeout(args.get("timeout", 5.0))
            lan = self.lan.drivers.get(nid.net)
            if lan is not None:  # a kernel node on one of our socklnd LANs: an LNet ping (GET, REPLY)
                return (await lan.ping_lan(nid, timeout)).describe()
            res = await eng.ping(nid, timeout)
            via = res.get("via")
            if via and via != res["nid"] and not res.get("end_to_end"):
                # The engine's ping is answered by the next hop; a gateway's answer says nothing
                # about the NID behind it, so it must not be reported as the NID's.
                raise NetworkError(f"{res['nid']} is behind gateway {via}, which answered in {res['rtt_ms']} ms; lu2k's ping "
                                   f"reaches next hops only, so whether {res['nid']} exists is not known (ping {via}, or send to it)")
            return res

        async def discover(args: dict[str, Any]) -> Any:
            target = parse_nid(str(args["nid"]))
            lan = self.lan.drivers.get(target.net)
            if lan is not None:  # a kernel node: its ping info lists its NIs; the LAN driver keeps them
                reply = await lan.discover_lan(target, control_timeout(args.get("timeout", 5.0)))
                peer = lan.peers.get(reply.nid)
                return {**reply.describe(), "peer": lan.describe_peer(peer) if peer is not None else None}
            # lnetctl discover: reach the peer; its PONG lists its NIDs.  Those on our nets become
            # its rails (lu2k.core.rails) unless the configuration says otherwise.
            res = await ping(args)
            nid = parse_nid(res["nid"])
            nids = [parse_nid(n) for n in res.get("peer_nis") or [res["nid"]]]
            local = [n for n in nids if n == nid or n.net in eng.nis]
            if len(local) > 1 and nid in local:
                eng.discovered[nid] = [nid, *[n for n in local if n != nid]]
                eng.apply_rails()
                for n in local:
                    eng.peer(n)  # each rail shows in peer show from now on
            rails = {str(n) for n in local}
            described = [p for p in eng.describe_peers() if p["nid"] in rails]
            return {**res, "peer_nis": [str(n) for n in nids], "peer": described[0] if described else None,
                    "rails": described if len(described) > 1 else None}

        async def endpoints(args: dict[str, Any]) -> Any:
            shim = eng.shim
            return [p.stats() for p in shim.ports.values()] if shim else []

        for name, fn in (("net show", net_show), ("peer show", peer_show), ("route show", route_show),
                         ("stats", stats), ("ping", ping), ("discover", discover), ("endpoint show", endpoints)):
            reg(name, fn)

    async def start(self) -> None:
        await self.engine.start()
        try:
            await self.lan.start(self.engine)
            await self.control.start()  # a failure here must not remove another daemon's socket: no close()
        except BaseException:
            await self.lan.stop(self.engine)
            await self.engine.stop()
            raise
        try:
            listen = self.config.metrics.get("listen")
            if listen:
                from .metrics import MetricsServer

                self.metrics = MetricsServer(self.engine, listen)
                await self.metrics.start()
        except BaseException:
            await self.control.close()
            await self.lan.stop(self.engine)
            await self.engine.stop()
            raise
        from .apps.services import Supervisor

        self.services = Supervisor(self.config.services, self.config.shim.path)
        await self.services.start()

    async def stop(self) -> None:
        if self.services is not None:
            await self.services.stop()
        if self.metrics is not None:
            self.metrics.close()
        await self.control.close()
        await self.lan.stop(self.engine)
        await self.engine.stop()

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        gcpolicy.settle()  # what start-up made is never garbage: keep the collector off it
        # A daemon may run LAN (socklnd) nets only: the engine then has no lu2k NID of its own.
        nid = self.engine.primary_nid() if self.engine.config.nets else self.config.nets[0].nid
        log.info("lu2kd running", nid=str(nid), shim=self.config.shim.path, control=self.config.control_path,
                 metrics=self.metrics.address if self.metrics else None)
        notifier = SystemdNotifier.from_environment()
        watchdog: asyncio.Task[None] | None = None
        if notifier is not None:
            notifier.notify(f"READY=1\nSTATUS=serving {nid}\nMAINPID={os.getpid()}")
            interval = watchdog_interval()
            if interval is not None:
                watchdog = asyncio.create_task(self._watchdog(notifier, interval))
        try:
            await stop.wait()
        finally:
            log.info("lu2kd stopping")
            if notifier is not None:
                notifier.notify("STOPPING=1")
            if watchdog is not None:
                watchdog.cancel()
            await self.stop()
            if notifier is not None:
                notifier.close()

    async def _watchdog(self, notifier: "SystemdNotifier", interval: float) -> None:
        """Pet systemd's watchdog from the event loop: a loop that stops turning stops the pets."""
        while True:
            notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def check(config: DaemonConfig) -> list[str]:
    """Problems that would stop this config from starting here (beyond syntax)."""
    return check_backends(config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lu2kd", description="lu2k daemon: LNet-style transport gateway")
    p.add_argument("--version", action="version", version=f"lu2kd (lu2k) {__version__}")
    p.add_argument("--config", "-c", metavar="FILE", help="YAML configuration (default: the embedded loopback config)")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of key=value")
    p.add_argument("--shim-socket", metavar="PATH", help="override the shim socket path")
    p.add_argument("--control-socket", metavar="PATH", help="override the control socket path")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        import argcomplete

        argcomplete.autocomplete(parser)
    except ImportError:
        pass
    args = parser.parse_args(argv)
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
