"""Run real ``lu2kd`` processes side by side on loopback (demo, benchmarks, tests).

Each daemon gets its own NID on the loopback net (127.0.0.1@tcp, 127.0.0.2@tcp, ... --
Linux routes all of 127/8 to lo), its own shim and control sockets in a private directory,
and a config derived from the embedded default, so the demo really runs "on the embedded
defaults" with only the addresses changed.
"""

from __future__ import annotations

import contextlib
import copy
import os
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
from .settings import DEFAULT_CONFIG_YAML


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
    """Start one lu2kd per NID (all on one port, different loopback addresses)."""
    own = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="lu2k-"))
    port = port or free_port()
    procs = []
    try:
        for nid in nids:
            cfg = daemon_config(nid, port, wd, backend=backend, extra_net=extra_net, extra=extra, tunables=tunables)
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
