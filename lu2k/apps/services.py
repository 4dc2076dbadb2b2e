"""Application services run by ``lu2kd`` itself: the ``serve:`` and ``forward:`` keys of the
config's top-level ``lu2k:`` section.

```yaml
lu2k:
  serve:                  # = lu2k recv --serve DIR
    dir: /srv/incoming
    allow_from: [10.0.0.1@tcp]   # optional
    portal: 0                    # optional
  forward:                # = lu2k forward --serve
    allow: ["10.9.0.5:22", "10.9.0.0/24:80-443"]
    window: 8m                   # optional
    portal: 2                    # optional
```

Each service is the same program an operator would start by hand, run as a child process
of the daemon (so file and socket I/O never stalls the daemon's event loop), attached to
the daemon's own shim socket, and restarted with back-off if it exits.  Its messages go to
the daemon's log (inherited stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, NidError
from ..nid import parse_nid
from . import forward_proto as fp

log = logging.getLogger("lu2k.services")

RESTART_MIN, RESTART_MAX = 1.0, 30.0


@dataclass(frozen=True)
class ServiceSpec:
    """One service: its name and the ``lu2k`` command line (the shim socket is added at start)."""

    name: str
    argv: tuple[str, ...]


def _portal(errors: list[str], where: str, value: Any) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        errors.append(f"{where}: must be a portal number (0..4294967295), got {value!r}")
        return []
    return ["--portal", str(value)]


def parse_services(lu: dict[str, Any], errors: list[str]) -> list[ServiceSpec]:
    """The services in a config's ``lu2k:`` mapping; problems appended to ``errors`` with where."""
    out: list[ServiceSpec] = []
    serve = lu.get("serve")
    if serve is not None:
        w = "lu2k.serve"
        if not isinstance(serve, dict):
            errors.append(f"{w}: expected a mapping with 'dir'")
        else:
            unknown = sorted(set(serve) - {"dir", "allow_from", "portal"})
            if unknown:
                errors.append(f"{w}: unknown key(s) {', '.join(unknown)} (known: dir, allow_from, portal)")
            d = serve.get("dir")
            argv = ["recv", "--serve", str(d)]
            if not isinstance(d, str) or not d:
                errors.append(f"{w}.dir: the receiving directory is required")
            elif not os.path.isdir(d):
                errors.append(f"{w}.dir: {d} does not exist or is not a directory")
            for i, nid in enumerate(serve.get("allow_from") or []):
                try:
                    argv += ["--allow-from", str(parse_nid(str(nid), resolve=False))]
                except NidError as e:
                    errors.append(f"{w}.allow_from[{i}]: {e}")
            if "portal" in serve:
                argv += _portal(errors, f"{w}.portal", serve["portal"])
            out.append(ServiceSpec("serve", tuple(argv)))
    fwd = lu.get("forward")
    if fwd is not None:
        w = "lu2k.forward"
        if not isinstance(fwd, dict):
            errors.append(f"{w}: expected a mapping with 'allow'")
        else:
            unknown = sorted(set(fwd) - {"allow", "window", "portal", "max_flows"})
            if unknown:
                errors.append(f"{w}: unknown key(s) {', '.join(unknown)} (known: allow, window, portal, max_flows)")
            argv = ["forward", "--serve"]
            rules = fwd.get("allow") or []
            if not isinstance(rules, list) or not rules:
                errors.append(f"{w}.allow: a list of HOST:PORTS targets is required (the service connects only to these)")
                rules = []
            for i, r in enumerate(rules):
                try:
                    argv += ["--allow", str(fp.parse_allow(str(r), where=f"{w}.allow[{i}]"))]
                except ConfigError as e:
                    errors.append(str(e))
            if "window" in fwd:
                argv += ["--window", str(fwd["window"])]
            if "max_flows" in fwd:
                argv += ["--max-flows", str(fwd["max_flows"])]
            if "portal" in fwd:
                argv += _portal(errors, f"{w}.portal", fwd["portal"])
            out.append(ServiceSpec("forward", tuple(argv)))
    return out


class Supervisor:
    """Runs the configured services as children of the daemon; restarts them when they exit."""

    def __init__(self, specs: list[ServiceSpec], shim_path: str) -> None:
        self.specs, self.shim_path = specs, shim_path
        self.tasks: list[asyncio.Task[None]] = []
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.restarts: dict[str, int] = {}

    async def start(self) -> None:
        for spec in self.specs:
            self.tasks.append(asyncio.ensure_future(self._keep(spec)))

    async def _keep(self, spec: ServiceSpec) -> None:
        delay = RESTART_MIN
        while True:
            argv = [sys.executable, "-m", "lu2k.cli.main", *spec.argv, "--socket", self.shim_path]
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL)
            self.procs[spec.name] = proc
            log.info("service %s started (pid %d)", spec.name, proc.pid)
            started = asyncio.get_running_loop().time()
            rc = await proc.wait()
            if asyncio.get_running_loop().time() - started > 60:
                delay = RESTART_MIN
            self.restarts[spec.name] = self.restarts.get(spec.name, 0) + 1
            log.warning("service %s exited with status %d; restarting in %.0f s", spec.name, rc, delay)
            await asyncio.sleep(delay)
            delay = min(RESTART_MAX, delay * 2)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
