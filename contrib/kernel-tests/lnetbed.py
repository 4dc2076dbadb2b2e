"""The LNet test bed, host side: kernel LNet nodes in QEMU guests on bridges in a network namespace.

Topology (every name created here starts with ``lg``)::

    netns lg-<id> (host)                                       lab namespaces (lu2k.lab), optional
    +----------------------------------------------------+
    |  guest a (QEMU, TCG)     bridge lgbra               |    lu2k-<lab>-a: lu2kd-A
    |   eth0 10.203.1.10/16 -- tap lgtapa --+-- lglka ====|==> lgla 10.203.1.1/16
    |                                       |             |        |  satellite link (lab forwarder)
    |                               (lgjoina/lgjoinb,     |        v
    |                                kernel-only tests)   |    lu2k-<lab>-b: lu2kd-B
    |  guest b (QEMU, TCG)     bridge lgbrb |             |
    |   eth0 10.203.2.10/16 -- tap lgtapb --+-- lglkb ====|==> lglb 10.203.2.1/16
    +----------------------------------------------------+

* One namespace ``lg-<id>`` holds two bridges, one tap per guest and nothing with an IP address,
  so nothing is routed there: the guests reach only what is on their own bridge.
* ``join()`` puts a veth pair between the bridges (one LAN, for two kernel nodes talking
  directly); ``attach(side, netns, addr)`` puts a veth from a bridge into another namespace
  (where lu2kd runs) with an address on the guests' /16.
* QEMU runs inside ``lg-<id>`` (``ip netns exec``), started by virtme-ng with
  ``-netdev tap,ifname=lgtap<x>``: the stock Debian kernel booted by contrib/kernel-tests/run,
  the host root shared read-only, 768 MiB and one vCPU per guest.
* Commands and results travel as files in each guest's ``--rwdir``
  (contrib/kernel-tests/lnetagent.py), never over the network under test nor the console.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
AGENT = HERE / "lnetagent.py"
SUBNET = "10.203"
PREFIX_LEN = 16
IFNAMSIZ = 15


class BedError(Exception):
    """The bed could not be built, a guest did not come up, or a guest command failed."""


@dataclass(frozen=True)
class GuestSpec:
    """One kernel LNet node: its side (``a``/``b``), its NIC and its address on the bed's /16."""

    side: str
    mac: str
    ip: str
    tap: str
    bridge: str

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{PREFIX_LEN}"


def guest_spec(side: str) -> GuestSpec:
    """Guest ``a`` is 10.203.1.10 on lgbra, ``b`` 10.203.2.10 on lgbrb (site n+1 of the /16);
    ``r``, the kernel LNet router of the anchor run, is 10.203.1.20 on site a's bridge lgbra."""
    if side == "r":
        return GuestSpec(side, "52:54:00:4c:47:12", f"{SUBNET}.1.20", "lgtapr", "lgbra")
    index = "ab".index(side)
    return GuestSpec(side, f"52:54:00:4c:47:{10 + index:02x}", f"{SUBNET}.{index + 1}.10", f"lgtap{side}", f"lgbr{side}")


def gateway_ip(side: str) -> str:
    """The address lu2kd gets on a side's LAN (``attach``): 10.203.1.1 for a, 10.203.2.1 for b."""
    return f"{SUBNET}.{'ab'.index(side) + 1}.1"


def check_ifname(name: str) -> str:
    if not name.startswith("lg") or len(name) > IFNAMSIZ:
        raise BedError(f"bad device name {name!r}: bed devices start with 'lg' and fit IFNAMSIZ ({IFNAMSIZ})")
    return name


def bridge_commands(ns: str, specs: Sequence[GuestSpec]) -> list[list[str]]:
    """``ip`` commands building the namespace's bridges and taps (no addresses: nothing routes)."""
    cmds = [["ip", "netns", "add", ns], ["ip", "-n", ns, "link", "set", "lo", "up"]]
    bridges: set[str] = set()
    for spec in specs:
        if spec.bridge not in bridges:  # guests may share a bridge (the anchor's router sits on site a's)
            bridges.add(spec.bridge)
            cmds += [["ip", "-n", ns, "link", "add", check_ifname(spec.bridge), "type", "bridge"],
                     ["ip", "-n", ns, "link", "set", spec.bridge, "up"]]
        cmds += [
            ["ip", "-n", ns, "tuntap", "add", "dev", check_ifname(spec.tap), "mode", "tap"],
            ["ip", "-n", ns, "link", "set", spec.tap, "master", spec.bridge],
            ["ip", "-n", ns, "link", "set", spec.tap, "up"],
        ]
    return cmds


def leg_mac(addr: str) -> str:
    """The MAC of the leg that holds ``addr``: the same each time that address is attached, so
    a guest's neighbour entry from an earlier set of sites stays right (with a new random MAC
    the guest answered the new gateway's SYNs to the old one for a minute)."""
    octets = [int(x) for x in addr.split(".")]
    return "02:1c:" + ":".join(f"{o:02x}" for o in octets)


def attach_commands(ns: str, bridge: str, side: str, other_ns: str, addr: str) -> list[list[str]]:
    """A veth from ``bridge`` into ``other_ns``, where it is ``lgl<side>`` with ``addr``/16."""
    here, there = check_ifname(f"lglk{side}"), check_ifname(f"lgl{side}")
    return [
        ["ip", "-n", ns, "link", "add", here, "type", "veth", "peer", "name", there, "netns", other_ns],
        ["ip", "-n", ns, "link", "set", here, "master", bridge],
        ["ip", "-n", ns, "link", "set", here, "up"],
        ["ip", "-n", other_ns, "link", "set", there, "address", leg_mac(addr)],
        ["ip", "-n", other_ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", there],
        ["ip", "-n", other_ns, "link", "set", there, "up"],
    ]


def vng_argv(vng: str, vmlinuz: Path, rwdir: Path, repo: Path, spec: GuestSpec, python: str, agent_env: Sequence[str],
             memory: str = "768M", cpus: int = 1) -> list[str]:
    """The vng command for one guest: TCG, 9p root read-only, one virtio NIC on the guest's tap."""
    qemu_opts = (f"-netdev tap,id=lgnet,ifname={spec.tap},script=no,downscript=no "
                 f"-device virtio-net-pci,netdev=lgnet,mac={spec.mac}")
    agent = " ".join(shlex.quote(a) for a in [python, str(AGENT), str(rwdir), *agent_env])
    return [vng, "--run", str(vmlinuz), "--disable-kvm", "--force-9p", "--memory", memory, "--cpus", str(cpus),
            "--name", f"lg-{spec.side}", "--rwdir", str(rwdir), "--cwd", str(repo), f"--qemu-opts={qemu_opts}",  # "=": the value starts with "-"
            "--exec", agent]


def _ip(argv: Sequence[str]) -> None:
    res = subprocess.run(list(argv), capture_output=True, text=True)
    if res.returncode != 0:
        raise BedError(f"{' '.join(argv)} failed: {res.stderr.strip()}")


@dataclass
class CommandResult:
    """What a guest command did."""

    script: str
    rc: int
    out: str
    err: str
    seconds: float
    timed_out: bool = False

    def check(self) -> "CommandResult":
        if self.rc != 0:
            what = "timed out" if self.timed_out else f"exit {self.rc}"
            raise BedError(f"guest command {self.script!r} failed ({what}):\n{self.out}{self.err}")
        return self


@dataclass
class Guest:
    """One booted guest and its command channel."""

    spec: GuestSpec
    rwdir: Path
    proc: "subprocess.Popen[bytes] | None" = None
    iface: str = ""
    info: dict[str, object] = field(default_factory=dict)
    _seq: int = 0

    @property
    def console(self) -> Path:
        return self.rwdir.parent / f"console-{self.spec.side}.log"

    def console_tail(self, n: int = 3000) -> str:
        try:
            return self.console.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ready = self.rwdir / "ready.json"
        while not ready.exists():
            if self.proc is not None and self.proc.poll() is not None:
                raise BedError(f"guest {self.spec.side} exited (vng {self.proc.returncode}) before its agent was up:\n"
                               f"{self.console_tail()}")
            if time.monotonic() > deadline:
                raise BedError(f"guest {self.spec.side}: agent not up after {timeout:.0f} s:\n{self.console_tail()}")
            time.sleep(0.5)
        self.info = json.loads(ready.read_text())

    def sh(self, script: str, timeout: float = 120.0, check: bool = True) -> CommandResult:
        """Run ``script`` with bash in the guest; wait for it (plus slack for a slow TCG guest)."""
        return self.wait(self.submit(script, timeout), check)

    def submit(self, script: str, timeout: float = 120.0) -> tuple[int, str, float]:
        """Queue ``script`` (the agent runs one command at a time, in order); :meth:`wait` for it."""
        self._seq += 1
        name = f"{self._seq}.json"
        tmp = self.rwdir / "cmd" / f".{name}.tmp"
        tmp.write_text(json.dumps({"sh": script, "timeout": timeout}))
        os.replace(tmp, self.rwdir / "cmd" / name)
        return self._seq, script, timeout

    def wait(self, ticket: tuple[int, str, float], check: bool = True) -> CommandResult:
        seq, script, timeout = ticket
        res_path = self.rwdir / "res" / f"{seq}.json"
        deadline = time.monotonic() + timeout + 60.0
        while not res_path.exists():
            if self.proc is not None and self.proc.poll() is not None:
                raise BedError(f"guest {self.spec.side} died while running {script!r}:\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise BedError(f"guest {self.spec.side}: no answer to {script!r} after {timeout + 60:.0f} s")
            time.sleep(0.05)
        data = json.loads(res_path.read_text())
        res = CommandResult(script, int(data["rc"]), data["out"], data["err"], float(data["seconds"]), bool(data.get("timed_out")))
        return res.check() if check else res

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and (self.rwdir / "ready.json").exists():
            self._seq += 1
            (self.rwdir / "cmd" / f"{self._seq}.json").write_text(json.dumps({"exit": True}))
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class Bed:
    """The namespace, its bridges and taps, and one guest per side; ``close()`` removes all of it."""

    def __init__(self, *, vng: str, vmlinuz: Path, repo: Path, python: str, build: dict[str, object], workdir: Path,
                 sides: Sequence[str] = ("a", "b"), memory: str = "768M", cpus: int = 1) -> None:
        self.ns = f"lg-{secrets.token_hex(2)}"
        self.vng, self.vmlinuz, self.repo, self.python = vng, vmlinuz, repo, python
        self.build = build
        self.workdir = workdir
        self.memory, self.cpus = memory, cpus
        self.guests = {s: Guest(guest_spec(s), workdir / f"guest-{s}") for s in sides}
        self.joined = False
        self.attached: dict[str, str] = {}

    # --- network ---------------------------------------------------------------------------

    def create(self) -> None:
        if os.geteuid() != 0:
            raise BedError("the LNet bed needs root (network namespaces, taps)")
        for argv in bridge_commands(self.ns, [g.spec for g in self.guests.values()]):
            _ip(argv)

    def join(self) -> None:
        """One LAN: a veth pair between the two bridges."""
        if self.joined:
            return
        _ip(["ip", "-n", self.ns, "link", "add", "lgjoina", "type", "veth", "peer", "name", "lgjoinb"])
        for dev, side in (("lgjoina", "a"), ("lgjoinb", "b")):
            _ip(["ip", "-n", self.ns, "link", "set", dev, "master", self.guests[side].spec.bridge])
            _ip(["ip", "-n", self.ns, "link", "set", dev, "up"])
        self.joined = True

    def split(self) -> None:
        if self.joined:
            _ip(["ip", "-n", self.ns, "link", "del", "lgjoina"])
            self.joined = False

    def attach(self, side: str, other_ns: str, addr: str | None = None) -> str:
        """Give ``other_ns`` a leg on side's LAN; returns its address there."""
        addr = addr or gateway_ip(side)
        for argv in attach_commands(self.ns, self.guests[side].spec.bridge, side, other_ns, addr):
            _ip(argv)
        self.attached[side] = other_ns
        return addr

    def detach(self, side: str) -> None:
        if self.attached.pop(side, None) is not None:
            subprocess.run(["ip", "-n", self.ns, "link", "del", f"lglk{side}"], capture_output=True)

    # --- guests ----------------------------------------------------------------------------

    def boot(self, timeout: float = 600.0) -> None:
        """Boot every guest (concurrently), wait for the agents, bring up each guest's NIC."""
        agent_env = [f"PATH={self.build['bin']}:/usr/sbin:/usr/bin:/sbin:/bin", f"LD_LIBRARY_PATH={self.build['lib']}"]
        for g in self.guests.values():
            if g.rwdir.exists():
                shutil.rmtree(g.rwdir)
            g.rwdir.mkdir(parents=True)
            argv = ["ip", "netns", "exec", self.ns,
                    *vng_argv(self.vng, self.vmlinuz, g.rwdir, self.repo, g.spec, self.python, agent_env, self.memory, self.cpus)]
            env = dict(os.environ)
            env["PATH"] = f"{Path(self.vng).parent}:{env.get('PATH', '/usr/bin:/bin')}"
            with open(g.console, "wb") as console:
                g.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True)
        for g in self.guests.values():
            g.wait_ready(timeout)
        found = on_all(list(self.guests.values()), lambda g: g.sh(
            "modprobe virtio_net && for d in /sys/class/net/*; do "
            f"[ \"$(cat $d/address)\" = {g.spec.mac} ] && basename $d; done; true", timeout=60).out.split())
        for g, names in zip(self.guests.values(), found):
            if len(names) != 1:
                raise BedError(f"guest {g.spec.side}: no single NIC with MAC {g.spec.mac} (found {names})")
            g.iface = names[0]
        on_all(list(self.guests.values()), lambda g: g.sh(
            f"ip link set lo up && ip addr add {g.spec.cidr} dev {g.iface} && ip link set {g.iface} up", timeout=60))

    def close(self) -> None:
        for g in self.guests.values():
            try:
                g.stop()
            except (OSError, BedError):
                pass
        subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


def on_all(guests: Sequence[Guest], fn: Callable[[Guest], T]) -> list[T]:
    """``fn`` on every guest at once (TCG guests are slow; each has its own command queue)."""
    with ThreadPoolExecutor(max_workers=max(1, len(guests))) as pool:
        return list(pool.map(fn, guests))


# --- LNet in a guest ------------------------------------------------------------------------------


def load_lnet(g: Guest, modules: dict[str, str]) -> None:
    """sunrpc (lnet needs it), then libcfs, lnet, ksocklnd from the build; not lnet_selftest yet."""
    g.sh("modprobe sunrpc && " + " && ".join(
        f"{{ grep -q '^{name} ' /proc/modules || insmod {shlex.quote(modules[name])}; }}"
        for name in ("libcfs", "lnet", "ksocklnd")), timeout=180)


def configure_lnet(g: Guest, net: str, modules: dict[str, str], selftest: bool = True) -> str:
    """A fresh LNet with one NI on ``net`` over the guest's NIC; returns the NID.

    lnet_selftest holds LNet up, so it is unloaded before and loaded after (it needs a net).
    """
    g.sh("if grep -q '^lnet_selftest ' /proc/modules; then rmmod lnet_selftest; fi; "
         "lnetctl lnet unconfigure >/dev/null 2>&1; lnetctl lnet configure && "
         f"lnetctl net add --net {net} --if {g.iface}", timeout=180)
    if selftest:
        g.sh(f"insmod {shlex.quote(modules['lnet_selftest'])}", timeout=120)
    return f"{g.spec.ip}@{net}"


def module_paths(build: dict[str, object]) -> dict[str, str]:
    return {Path(str(p)).stem: str(p) for p in build["modules"]}  # type: ignore[attr-defined]


# --- lnet_selftest ------------------------------------------------------------------------------

_BW_RE = re.compile(r"^\[LNet Bandwidth of (\S+)\]\n\[R\] Avg: ([0-9.]+)\s+MiB/s.*\n\[W\] Avg: ([0-9.]+)\s+MiB/s", re.M)
_RATE_RE = re.compile(r"^\[LNet Rates of (\S+)\]\n\[R\] Avg: ([0-9.]+)\s+RPC/s.*\n\[W\] Avg: ([0-9.]+)\s+RPC/s", re.M)
_ERR_RE = re.compile(r"^Total (\d+) error nodes in (\S+)$", re.M)
_STAT_RE = re.compile(r"^\s*(send_count|recv_count|drop_count|send_length|recv_length|drop_length|route_count|route_length):\s*(\d+)\s*$", re.M)


@dataclass(frozen=True)
class LstPlan:
    """One lnet_selftest session: bulk write and read with full data checks, and pings, from ``c`` to ``s``."""

    client: str
    server: str
    size: str = "1M"
    loops: int = 32
    concurrency: int = 4
    pings: int = 100
    stat_samples: int = 3
    stat_delay: int = 5
    session_timeout: int = 300
    wait_s: int = 600
    # Take the nodes over from another console session: after a fault the previous session's
    # end may never have reached a node, which then refuses new sessions (EBUSY) until its
    # session times out (session_timeout).
    force: bool = False

    def script(self) -> str:
        """The lst commands (one bash script, run on the console node)."""
        return "\n".join([
            "export LST_SESSION=$$",
            "set -e",
            f"lst new_session --timeout {self.session_timeout}{' --force' if self.force else ''} lu2k",
            f"lst add_group c {self.client}",
            f"lst add_group s {self.server}",
            "lst add_batch bulk",
            f"lst add_test --batch bulk --loop {self.loops} --concurrency {self.concurrency} --from c --to s "
            f"brw write check=full size={self.size}",
            f"lst add_test --batch bulk --loop {self.loops} --concurrency {self.concurrency} --from c --to s "
            f"brw read check=full size={self.size}",
            f"lst add_test --batch bulk --loop {self.pings} --from c --to s ping",
            "lst run bulk",
            "echo '### stat'",
            f"lst stat --count {self.stat_samples} --delay {self.stat_delay} c s || true",  # may fail during a fault
            "echo '### query'",
            f"end=$((SECONDS + {self.wait_s}))",
            # Until every node says its tests are done ("is stopped", or "running: 0" when some failed).
            "until lst query bulk | grep -q 'is stopped\\|running: 0,'; do",
            "  if [ $SECONDS -ge $end ]; then echo 'batch still running'; lst stop bulk || true; break; fi; sleep 2; done",
            "lst query bulk",
            "echo '### errors'",
            # This session's brw and ping errors (a failed test RPC counts as one) and nodes that cannot be asked;
            # exits non-zero when a node cannot be asked (a fault).
            "lst show_error --session c s 2>&1 || true",
            # For the record: the nodes' RPC counters, which count since lnet_selftest was loaded.
            "echo '### rpc'",
            "lst show_error c s 2>&1 || true",
            "lst end_session || true",
        ])

    def bytes_each_way(self) -> int:
        unit = {"K": 1 << 10, "M": 1 << 20}.get(self.size[-1:], 1)
        number = self.size[:-1] if self.size[-1:] in ("K", "M") else self.size
        return int(number) * unit * self.loops * self.concurrency


def parse_lst_output(text: str) -> dict[str, object]:
    """Figures and verdicts from :meth:`LstPlan.script`'s output.

    ``error_nodes`` counts, per group, the nodes with brw or ping errors in *this* session or
    that could not be asked (``lst show_error --session``); ``rpc_lines`` keeps the nodes'
    lifetime RPC counters (plain ``lst show_error``), which stay non-zero after any fault.
    """
    stat = text.split("### stat", 1)[-1].split("### query", 1)[0]
    query = text.split("### query", 1)[-1].split("### errors", 1)[0]
    errors = text.split("### errors", 1)[-1].split("### rpc", 1)[0]
    rpc = text.split("### rpc", 1)[1] if "### rpc" in text else ""
    bandwidth: dict[str, list[tuple[float, float]]] = {}
    for group, r, w in _BW_RE.findall(stat):
        bandwidth.setdefault(group, []).append((float(r), float(w)))
    rates: dict[str, list[tuple[float, float]]] = {}
    for group, r, w in _RATE_RE.findall(stat):
        rates.setdefault(group, []).append((float(r), float(w)))
    return {
        "bandwidth_mib_s": bandwidth,
        "rpc_s": rates,
        "error_nodes": {group: int(n) for n, group in _ERR_RE.findall(errors)},
        "stopped": ("is stopped" in query or "running: 0," in query) and "still running" not in query,
        "error_lines": _detail_lines(errors),
        "rpc_lines": _detail_lines(rpc),
    }


def _detail_lines(block: str) -> list[str]:
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("Total ") and not ln.endswith(":")]


CORRUPTION_RE = re.compile(r"Bad data in page|is corrupted")


def corruption_reports(g: Guest) -> list[str]:
    """lnet_selftest's own data-check failures (brw_test.c logs them with CERROR) in the kernel log."""
    return [ln for ln in g.sh("dmesg", timeout=60).out.splitlines() if CORRUPTION_RE.search(ln)]


def lnet_counters(g: Guest) -> dict[str, int]:
    """``lnetctl stats show``: LNet's message and byte counters on this node."""
    return {k: int(v) for k, v in _STAT_RE.findall(g.sh("lnetctl stats show", timeout=60).out)}
