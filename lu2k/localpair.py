"""Run real ``lu2kd`` processes side by side on loopback (demo, benchmarks, tests).

Each daemon gets its own NID on the loopback net (127.0.0.1@tcp, 127.0.0.2@tcp, ... --
Linux routes all of 127/8 to lo), its own shim and control sockets in a private directory,
and a config derived from the embedded default, so the demo really runs "on the embedded
defaults" with only the addresses changed.

IPv6 has one loopback address, and Lustre refuses it (and link-local ones) as a NID.  So with
IPv6 NIDs (``fd00::1@tcp``, ``fd00::2@tcp``, any routable addresses) every daemon listens on
``::1`` on a port of its own, and each one's config names the others' ``[::1]:port`` as peer
addresses (``peer: - primary nid: ... lu2k: {address: ...}``) -- what an operator writes when a
NID's address is not where the peer is reached.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import Lu2kError, NetworkError
from .inet import family_of, format_hostport
from .settings import DEFAULT_CONFIG_YAML


IPV6_LOOPBACK = "::1"


# Ports are picked below the kernel's ephemeral range: a port taken from that range (bind to port
# 0, then close) can be handed to any other socket bound to port 0 -- a client, another daemon
# started beside this one -- before the daemon binds it.
FREE_PORT_FLOOR = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(hosts: tuple[str, ...], port: int) -> bool:
    """Free on every one of ``hosts`` for TCP and UDP alike (the backends use either)."""
    try:
        for host in hosts:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(family_of(host), kind) as s:
                    s.bind((host, port))
    except OSError:
        return False
    return True


def free_port(*hosts: str) -> int:
    """A port free for TCP and UDP on each of ``hosts`` (default 127.0.0.1), outside the
    ephemeral range when the kernel leaves room below it."""
    hosts = hosts or ("127.0.0.1",)
    low = _ephemeral_low()
    rng = random.SystemRandom()
    if low - FREE_PORT_FLOOR >= 1000:
        for _ in range(100):
            port = rng.randrange(FREE_PORT_FLOOR, low)
            if _bindable(hosts, port):
                return port
    for _ in range(100):  # a kernel whose ephemeral range starts low: any port the kernel picks
        with socket.socket(family_of(hosts[0])) as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        if _bindable(hosts, port):
            return port
    raise NetworkError(f"no port free for both TCP and UDP on {', '.join(hosts)}")


def ipv6_loopback_problem() -> str | None:
    """None if this kernel can bind ``::1``, else why not (IPv6 disabled or compiled out)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind((IPV6_LOOPBACK, 0))
    except OSError as e:
        return f"no IPv6 loopback here: {e.strerror or e}"
    return None


def is_ipv6_nid(nid: str) -> bool:
    return ":" in nid.rpartition("@")[0]


def daemon_config(nid: str, port: int, workdir: Path, *, backend: str = "tcp", extra_net: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None, tunables: dict[str, Any] | None = None) -> dict[str, Any]:
    """The embedded default config with this daemon's NID, port and socket paths."""
    cfg = yaml.safe_load(DEFAULT_CONFIG_YAML)
    net = cfg["net"][0]
    net["net type"] = nid.rpartition("@")[2]
    net["local NI(s)"][0]["nid"] = nid
    net["local NI(s)"][0]["tunables"].update(tunables or {})
    net["lu2k"].update({"backend": backend, "port": port})
    net["lu2k"].update(copy.deepcopy(extra_net or {}))
    name = nid.replace("@", "_")
    cfg["lu2k"] = {"shim": {"path": str(workdir / f"{name}.shim")}, "control": {"path": str(workdir / f"{name}.ctl")}}
    _merge(cfg, copy.deepcopy(extra or {}))
    return cfg


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """Recursive dict update: ``extra`` wins, nested mappings are merged, not replaced."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _answers(path: str) -> bool:
    """True once something accepts connections on the Unix socket (a stale file does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


@dataclass
class DaemonProcess:
    nid: str
    config_path: Path
    shim_path: str
    control_path: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0, netns: str | None = None) -> None:
        cmd = [sys.executable, "-m", "lu2k.daemon", "--config", str(self.config_path)]
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (os.path.exists(self.shim_path) and _answers(self.control_path)):
            if self.proc.poll() is not None:
                raise Lu2kError(f"lu2kd for {self.nid} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise NetworkError(f"lu2kd for {self.nid} did not come up within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """Abrupt death (SIGKILL), for failure tests."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self._log.close()


@contextlib.contextmanager
def daemons(nids: list[str], *, backend: str = "tcp", workdir: str | None = None, port: int | None = None,
            extra_net: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
            tunables: dict[str, Any] | None = None, start: bool = True) -> Iterator[list[DaemonProcess]]:
    """Start one lu2kd per NID: IPv4 NIDs all on one port at different loopback addresses,
    IPv6 NIDs each on a port of its own at ``::1`` (see the module docstring)."""
    own = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="lu2k-"))
    v6 = [nid for nid in nids if is_ipv6_nid(nid)]
    ports = {nid: free_port(IPV6_LOOPBACK) for nid in v6}  # UDP-based backends: the same number is free on udp too
    port = port or free_port()
    procs = []
    try:
        for nid in nids:
            net_extra = copy.deepcopy(extra_net or {})
            more = copy.deepcopy(extra or {})
            if nid in ports:
                net_extra.update({"listen": IPV6_LOOPBACK})
                peers = [{"primary nid": other, "lu2k": {"address": format_hostport(IPV6_LOOPBACK, ports[other])}}
                         for other in v6 if other != nid]
                more["peer"] = list(more.get("peer") or []) + peers
            cfg = daemon_config(nid, ports.get(nid, port), wd, backend=backend, extra_net=net_extra, extra=more,
                                tunables=tunables)
            name = nid.replace("@", "_")
            path = wd / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            d = DaemonProcess(nid, path, cfg["lu2k"]["shim"]["path"], cfg["lu2k"]["control"]["path"], wd / f"{name}.log")
            procs.append(d)
            if start:
                d.start()
        yield procs
    finally:
        for d in procs:
            d.stop()
        if own:
            shutil.rmtree(wd, ignore_errors=True)
