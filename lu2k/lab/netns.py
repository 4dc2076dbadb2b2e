"""Lab plumbing: namespaces, TUN devices, state files, stale-lab cleanup, and the ``Lab`` handle.

A lab ``<id>`` is two network namespaces, ``lu2k-<id>-a`` and ``lu2k-<id>-b``, joined by one
or more *paths*.  Each path is a pair of TUN devices, one in each namespace (path 0:
``lu2k<id>a`` / ``lu2k<id>b``; path ``i`` > 0: ``lu2k<id>a<i>`` / ``lu2k<id>b<i>``; MTU 1500),
with point-to-point addresses of its own: IPv4 ``10.<201+i>.<n>.1`` in a and ``.2`` in b, and,
in a lab made with ``ipv6=True``, IPv6 ``fd6c:7532:<n>:<i>::1`` / ``::2`` (a fixed ULA prefix,
``n`` the lab's number in hex).  All the TUN file descriptors belong to one forwarder process
(:mod:`lu2k.lab.forwarder`) that carries packets between each pair through that path's own
link models (rate, delay, loss, queue, counters).  Since every address is a /32 (/128) with
a peer route, a socket bound to (or connecting to) a path's address uses that path and no
other.  The namespaces hold nothing else but ``lo``: there is no route anywhere, so traffic
can only ever flow between the lab's own two ends.

Lifecycle and cleanup -- one owner, several safety nets:

* the *forwarder* creates the namespaces and devices and, when it exits for any catchable
  reason (SIGTERM, SIGINT, its parent dying via ``PR_SET_PDEATHSIG``, an exception), kills
  what still runs inside them, deletes them and removes the state file;
* if the forwarder is killed outright, the TUN devices vanish with its file descriptors
  (they are not persistent) and the state file names a dead pid: every ``Lab.up``,
  ``lu2k lab up|down|status`` first runs :func:`cleanup_stale`, which finishes the job;
* ``lu2k lab down`` asks the forwarder to stop and falls back to doing the cleanup itself.

The state file ``<state_dir>/<id>.json`` (default ``/run/lu2k-lab``, or ``$LU2K_LAB_DIR``) is
written before any namespace exists, so a namespace of ours never lacks one.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LocalProtocolError, Lu2kError, NetworkError
from .spec import LinkSpec

DEFAULT_STATE_DIR = "/run/lu2k-lab"
SUBNET_PREFIX = "10.201"  # path 0; path i uses 10.<201+i>
IPV6_PREFIX = "fd6c:7532"  # ULA (fd00::/8); lab n, path i: fd6c:7532:<n>:<i>::/64
MAX_PATHS = 4
# Host tuning a site may apply for TCP over a long path (kernel TCP's own knobs, not lu2k's):
# the initial congestion and receive windows of the route to the far site (``ip route ...
# initcwnd N initrwnd N``) and the receive buffer a new TCP socket starts with (the middle value
# of ``net.ipv4.tcp_rmem``), which bounds the first window it advertises.
MAX_INITCWND = 10000  # packets
RMEM_DEFAULT_RANGE = (4096, 64 << 20)  # bytes; the lab's tcp_rmem maximum is 64 MiB
_ID_RE = re.compile(r"[a-z0-9]{1,8}")
FORWARDER_MODULE = "lu2k.lab.forwarder"


class LabError(Lu2kError):
    """The lab could not be set up, reached or torn down (the message says which step)."""


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for helper processes (forwarder, baselines, daemons) started by the lab.

    They run ``python -m lu2k...``; from a source checkout that is not installed, the package
    is only importable if its parent directory is on ``PYTHONPATH``, so put it there.
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    if extra:
        env.update(extra)
    return env


def state_dir() -> Path:
    return Path(os.environ.get("LU2K_LAB_DIR", DEFAULT_STATE_DIR))


def check_lab_id(lab_id: str) -> str:
    if not _ID_RE.fullmatch(lab_id):
        raise ConfigError(f"bad lab id {lab_id!r}: 1-8 characters of a-z and 0-9 (it becomes part of device names)", where="--id")
    return lab_id


def ns_name(lab_id: str, side: str) -> str:
    return f"lu2k-{lab_id}-{side}"


def dev_name(lab_id: str, side: str, path: int = 0) -> str:
    # IFNAMSIZ: at most 15 characters, so ids stay short (8 + 4 + 1 + 1).
    return f"lu2k{lab_id}{side}" + (str(path) if path else "")


def path_addr(subnet: int, path: int, side: str) -> str:
    """The IPv4 address of ``side`` on ``path`` in lab number ``subnet``."""
    net = int(SUBNET_PREFIX.split(".")[1]) + path
    return f"{SUBNET_PREFIX.split('.')[0]}.{net}.{subnet}.{1 if side == 'a' else 2}"


def path_addr6(subnet: int, path: int, side: str) -> str:
    """The IPv6 (ULA) address of ``side`` on ``path`` in lab number ``subnet``."""
    return str(ipaddress.IPv6Address(f"{IPV6_PREFIX}:{subnet:x}:{path:x}::{1 if side == 'a' else 2}"))  # canonical, as ip shows it


def control_address(lab_id: str) -> str:
    # Abstract socket: it disappears with the forwarder, so a crash leaves no stale file.
    return f"\0lu2k-lab-{lab_id}"


def run_ip(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip ARGS``; a failure becomes a LabError naming the command and iproute2's message."""
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise LabError("the 'ip' command (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"'ip {' '.join(args)}' hung for 30 s") from None
    if check and proc.returncode != 0:
        raise LabError(f"'ip {' '.join(args)}' failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def netns_pids(name: str) -> list[int]:
    proc = run_ip(["netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_netns_processes(name: str, grace: float = 1.0) -> None:
    """SIGTERM what runs inside a lab namespace, SIGKILL what is still there after ``grace``."""
    pids = [p for p in netns_pids(name) if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def delete_netns(name: str) -> None:
    if netns_exists(name):
        kill_netns_processes(name)
        run_ip(["netns", "del", name], check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def forwarder_alive(pid: int | None) -> bool:
    """Is ``pid`` a live lab forwarder (not just any process that reused the number)?"""
    if not pid or not _alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return FORWARDER_MODULE.encode() in f.read()
    except OSError:
        return False


Specs = tuple[LinkSpec, LinkSpec]  # one path: (a->b, b->a)


def check_host_tuning(initcwnd: int, rmem_default: int) -> None:
    """The host tuning a lab may get (0: leave that knob alone); ConfigError naming the bad one."""
    if not 0 <= initcwnd <= MAX_INITCWND:
        raise ConfigError(f"{initcwnd} packets: must be 1..{MAX_INITCWND} (or 0: the kernel's default)", where="initcwnd")
    low, high = RMEM_DEFAULT_RANGE
    if rmem_default and not low <= rmem_default <= high:
        raise ConfigError(f"{rmem_default} bytes: must be {low}..{high} (or 0: the lab's default)", where="rmem_default")


@dataclass
class LabState:
    """What a state file records about one lab.

    ``specs`` is path 0; ``extra_paths`` the others, in order (path 1, 2, ...).  The
    per-path views (``paths``, ``devs``, ``addrs``, ``addrs6``) are lists indexed by path;
    ``dev``/``addr``/``addr6`` are path 0's.
    """

    lab_id: str
    subnet: int
    specs: Specs
    pid: int | None = None
    ready: bool = False
    created: float = field(default_factory=time.time)
    profile: dict[str, Any] = field(default_factory=dict)  # what the user asked for, for status
    extra_paths: tuple[Specs, ...] = ()
    ipv6: bool = False
    initcwnd: int = 0  # packets, on the routes between the sites (0: the kernel's default, 10)
    rmem_default: int = 0  # bytes, tcp_rmem's middle value in both namespaces (0: the lab's 128 KiB)

    def __post_init__(self) -> None:
        if 1 + len(self.extra_paths) > MAX_PATHS:
            raise ConfigError(f"a lab has at most {MAX_PATHS} paths, not {1 + len(self.extra_paths)}", where="paths")
        check_host_tuning(self.initcwnd, self.rmem_default)

    @property
    def paths(self) -> list[Specs]:
        return [self.specs, *self.extra_paths]

    @property
    def ns(self) -> dict[str, str]:
        return {"a": ns_name(self.lab_id, "a"), "b": ns_name(self.lab_id, "b")}

    @property
    def devs(self) -> list[dict[str, str]]:
        return [{s: dev_name(self.lab_id, s, i) for s in ("a", "b")} for i in range(len(self.paths))]

    @property
    def addrs(self) -> list[dict[str, str]]:
        return [{s: path_addr(self.subnet, i, s) for s in ("a", "b")} for i in range(len(self.paths))]

    @property
    def addrs6(self) -> list[dict[str, str]]:
        """IPv6 addresses per path; empty when the lab was made without IPv6."""
        if not self.ipv6:
            return []
        return [{s: path_addr6(self.subnet, i, s) for s in ("a", "b")} for i in range(len(self.paths))]

    @property
    def dev(self) -> dict[str, str]:
        return self.devs[0]

    @property
    def addr(self) -> dict[str, str]:
        return self.addrs[0]

    @property
    def addr6(self) -> dict[str, str]:
        return self.addrs6[0] if self.ipv6 else {}

    def path(self, directory: Path | None = None) -> Path:
        return (directory or state_dir()) / f"{self.lab_id}.json"

    def to_dict(self) -> dict[str, Any]:
        devs, addrs, addrs6 = self.devs, self.addrs, self.addrs6
        paths = [
            {"path": i, "dev": devs[i], "addr": addrs[i], **({"addr6": addrs6[i]} if self.ipv6 else {}),
             "specs": {"ab": ab.to_dict(), "ba": ba.to_dict()}}
            for i, (ab, ba) in enumerate(self.paths)
        ]
        return {
            "id": self.lab_id, "subnet": self.subnet, "pid": self.pid, "ready": self.ready,
            "created": self.created, "profile": self.profile, "ipv6": self.ipv6,
            "initcwnd": self.initcwnd, "rmem_default": self.rmem_default,
            "ns": self.ns, "dev": self.dev, "addr": self.addr, **({"addr6": self.addr6} if self.ipv6 else {}),
            "specs": paths[0]["specs"], "paths": paths,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabState":
        try:
            extra = tuple(
                (LinkSpec.from_dict(p["specs"]["ab"]), LinkSpec.from_dict(p["specs"]["ba"])) for p in (d.get("paths") or [])[1:]
            )
            return cls(
                lab_id=d["id"], subnet=int(d["subnet"]), pid=d.get("pid"), ready=bool(d.get("ready")),
                created=float(d.get("created", 0.0)), profile=dict(d.get("profile") or {}),
                specs=(LinkSpec.from_dict(d["specs"]["ab"]), LinkSpec.from_dict(d["specs"]["ba"])),
                extra_paths=extra, ipv6=bool(d.get("ipv6", False)),
                initcwnd=int(d.get("initcwnd", 0)), rmem_default=int(d.get("rmem_default", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"corrupt lab state: {e}", where="state file") from None

    def save(self, directory: Path | None = None) -> None:
        path = self.path(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)  # readers never see half a file

    @classmethod
    def load(cls, path: Path) -> "LabState":
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read lab state: {e}", where=str(path)) from None


def list_labs(directory: Path | None = None) -> list[LabState]:
    d = directory or state_dir()
    out = []
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            out.append(LabState.load(path))
        except ConfigError:
            continue
    return out


def teardown(state: LabState, directory: Path | None = None) -> None:
    """Remove everything a lab made: processes in its namespaces, the namespaces, the state file."""
    for side in ("a", "b"):
        delete_netns(state.ns[side])
    try:
        state.path(directory).unlink()
    except FileNotFoundError:
        pass


def remove_lab_files(lab_id: str, directory: Path | None = None) -> None:
    d = directory or state_dir()
    for suffix in (".json", ".stats.json", ".log", ".tmp", ".stats.tmp"):
        try:
            (d / f"{lab_id}{suffix}").unlink()
        except FileNotFoundError:
            pass


def cleanup_stale(directory: Path | None = None, *, min_age: float = 30.0) -> list[str]:
    """Tear down labs whose forwarder is gone; returns their ids.

    A lab whose forwarder has not written its pid yet is only stale once ``min_age`` seconds
    old, so a lab that is just starting up is left alone.
    """
    removed = []
    for st in list_labs(directory):
        if forwarder_alive(st.pid):
            continue
        if st.pid is None and time.time() - st.created < min_age:
            continue
        teardown(st, directory)
        remove_lab_files(st.lab_id, directory)
        removed.append(st.lab_id)
    return removed


def _free_subnet(directory: Path | None) -> int:
    used = {st.subnet for st in list_labs(directory)}
    for n in range(1, 255):
        if n not in used:
            return n
    raise LabError(f"all 254 lab subnets of {SUBNET_PREFIX}.0.0/16 are in use; run 'lu2k lab down --all'")


class Lab:
    """A handle on one lab: bring it up, run things in its namespaces, read counters, flap it.

    ``Lab(specs).up()`` starts a forwarder that dies with this process (tests, benchmarks);
    ``up(detach=True)`` starts one that outlives it (``lu2k lab up``).  ``Lab.attach(id)``
    gives a handle on a lab that is already up.

    ``specs`` describe path 0; ``extra_paths=[(ab, ba), ...]`` adds paths 1, 2, ... between
    the same two namespaces, each with its own devices, addresses, link models and counters.
    ``ipv6=True`` gives both sides an IPv6 address on every path too.
    """

    def __init__(
        self,
        specs: Specs,
        lab_id: str | None = None,
        *,
        directory: Path | None = None,
        profile: dict[str, Any] | None = None,
        extra_paths: Sequence[Specs] = (),
        ipv6: bool = False,
        initcwnd: int = 0,
        rmem_default: int = 0,
    ) -> None:
        self.directory = directory or state_dir()
        self.lab_id = check_lab_id(lab_id) if lab_id else secrets.token_hex(3)
        self.state = LabState(self.lab_id, subnet=0, specs=specs, profile=dict(profile or {}),
                              extra_paths=tuple(extra_paths), ipv6=ipv6, initcwnd=initcwnd, rmem_default=rmem_default)
        self._proc: subprocess.Popen[bytes] | None = None

    # --- names ---------------------------------------------------------------------------

    @property
    def ns_a(self) -> str:
        return self.state.ns["a"]

    @property
    def ns_b(self) -> str:
        return self.state.ns["b"]

    @property
    def addr_a(self) -> str:
        return self.state.addr["a"]

    @property
    def addr_b(self) -> str:
        return self.state.addr["b"]

    def ns(self, side: str) -> str:
        if side not in ("a", "b"):
            raise LocalProtocolError(f"lab side must be 'a' or 'b', not {side!r}")
        return self.state.ns[side]

    @property
    def n_paths(self) -> int:
        return len(self.state.paths)

    def address(self, side: str, path: int = 0, *, ipv6: bool = False) -> str:
        """``side``'s address on ``path`` (IPv6 only in a lab made with ``ipv6=True``)."""
        self.ns(side)
        self._check_path(path)
        if ipv6 and not self.state.ipv6:
            raise LocalProtocolError(f"lab {self.lab_id!r} has no IPv6 addresses (made without ipv6=True / --ipv6)")
        return (self.state.addrs6 if ipv6 else self.state.addrs)[path][side]

    def _check_path(self, path: int) -> None:
        if not 0 <= path < self.n_paths:
            raise LocalProtocolError(f"lab {self.lab_id!r} has paths 0..{self.n_paths - 1}, not {path}")

    # --- lifecycle -----------------------------------------------------------------------

    @classmethod
    def attach(cls, lab_id: str, directory: Path | None = None) -> "Lab":
        d = directory or state_dir()
        path = d / f"{check_lab_id(lab_id)}.json"
        if not path.exists():
            raise LabError(f"no lab {lab_id!r} (no {path}); 'lu2k lab status' lists the labs that are up")
        st = LabState.load(path)
        if not forwarder_alive(st.pid):
            raise LabError(f"lab {lab_id!r} is not running (its forwarder is gone); 'lu2k lab down --id {lab_id}' cleans up")
        lab = cls(st.specs, st.lab_id, directory=d, profile=st.profile, extra_paths=st.extra_paths, ipv6=st.ipv6)
        lab.state = st
        return lab

    def up(self, *, detach: bool = False, timeout: float = 20.0) -> "Lab":
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces and TUN devices)")
        if not Path("/dev/net/tun").exists():
            raise LabError("/dev/net/tun is missing: the kernel has no TUN support (modprobe tun)")
        cleanup_stale(self.directory)
        if self.state.path(self.directory).exists():
            raise LabError(f"lab {self.lab_id!r} is already up; 'lu2k lab down --id {self.lab_id}' first")
        self.state.subnet = _free_subnet(self.directory)
        self.state.save(self.directory)
        log_path = self.directory / f"{self.lab_id}.log"
        ready_r, ready_w = os.pipe()
        argv = [sys.executable, "-m", FORWARDER_MODULE, str(self.state.path(self.directory)), "--ready-fd", str(ready_w)]
        argv.append("--detach" if detach else "--die-with-parent")
        try:
            with open(log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(ready_w,),
                    start_new_session=detach, env=child_env(),
                )
        except OSError as e:
            teardown(self.state, self.directory)
            raise LabError(f"cannot start the lab forwarder: {e}") from None
        finally:
            os.close(ready_w)
        try:
            message = _read_ready(ready_r, timeout)
        finally:
            os.close(ready_r)
        if message != "ok":
            self._stop_proc()
            teardown(self.state, self.directory)
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise LabError(f"lab forwarder failed to start: {message}" + (f"\n{tail}" if tail and message != tail else ""))
        self.state = LabState.load(self.state.path(self.directory))
        if detach:
            self._proc.wait()  # the intermediate process; the forwarder is state.pid
            self._proc = None
        return self

    def down(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """Stop the forwarder (it cleans up; clean up ourselves if it does not).

        Returns the forwarder's final counters, if it got to write them.
        """
        pid = self._proc.pid if self._proc else self.state.pid
        if pid and forwarder_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    break
                if self._proc is None and not forwarder_alive(pid):
                    break
                time.sleep(0.05)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        teardown(self.state, self.directory)
        final = None
        stats_path = self.directory / f"{self.lab_id}.stats.json"
        try:
            final = json.loads(stats_path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
        remove_lab_files(self.lab_id, self.directory)
        return final

    def _stop_proc(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> "Lab":
        if self._proc is None:
            self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- running things inside ---------------------------------------------------------

    def exec_argv(self, side: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(side), *argv]

    def popen(self, side: str, argv: Sequence[str], **kwargs: Any) -> "subprocess.Popen[Any]":
        return subprocess.Popen(self.exec_argv(side, argv), **kwargs)

    def run(self, side: str, argv: Sequence[str], **kwargs: Any) -> "subprocess.CompletedProcess[Any]":
        return subprocess.run(self.exec_argv(side, argv), **kwargs)

    # --- control -------------------------------------------------------------------------

    def control(self, command: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        return send_control(self.lab_id, command, timeout)

    def stats(self) -> dict[str, Any]:
        return self.control({"cmd": "stats"})

    def set_link(self, up: bool, direction: str = "both", path: int | str = 0) -> dict[str, Any]:
        """Set one path's link (or ``path="all"``: every path) up or down, one direction or both.

        The reply's ``up`` is the state of that path (path 0 for ``"all"``), ``paths`` every path's.
        """
        return self.control({"cmd": "up" if up else "down", "direction": direction, "path": path})


def _read_ready(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"no answer within {timeout:.0f} s"
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode(errors="replace").strip() or "forwarder exited before it was ready"
        data += chunk
        if data.endswith(b"\n"):
            return data.decode(errors="replace").strip()


def send_control(lab_id: str, command: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request/reply on a forwarder's control socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(f"\0lu2k-lab-client-{os.getpid()}-{secrets.token_hex(4)}")
        sock.settimeout(timeout)
        sock.sendto(json.dumps(command).encode(), control_address(lab_id))
        data = sock.recv(1 << 20)
    except (ConnectionRefusedError, FileNotFoundError):
        raise LabError(f"lab {lab_id!r} is not running (no forwarder on its control socket)") from None
    except socket.timeout:
        raise NetworkError(f"lab {lab_id!r} forwarder did not answer within {timeout} s") from None
    except OSError as e:
        raise LabError(f"lab {lab_id!r} control socket: {e}") from None
    finally:
        sock.close()
    reply = json.loads(data)
    if "error" in reply:
        raise LabError(f"lab {lab_id!r}: {reply['error']}")
    return dict(reply)
