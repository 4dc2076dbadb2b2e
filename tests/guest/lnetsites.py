"""Two lu2kd gateways for the LNet bed: one per site, joined by the lab's emulated satellite link.

lu2kd-A runs in the lab's namespace ``a`` with a leg on guest a's bridge (10.203.1.1, net
``tcp``); lu2kd-B in namespace ``b`` on guest b's bridge (10.203.2.1, net ``tcp1``).  Between
them the hop net ``tcp9`` over an lu2k backend (tcp, quic, udt) on the lab's two addresses,
through the lab forwarder's link model.  Each lu2kd routes the other site's LAN net via the
other's hop NID; the kernel nodes route the far net via their own site's lu2kd, with stock
``lnetctl route add``.

Scale-out (:meth:`Sites.add_gateway`): a second gateway at a site, lu2kd-A2 in the same lab
namespace as lu2kd-A, with its own address on guest a's bridge (10.203.1.2) and its own hop
address (the lab's address of side a with last octet 3, routed to the lab's device in
namespace b); lu2kd-B learns the second route to ``tcp`` at run time (``lu2kctl route add``).
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lu2k.lab.bench import backend_options
from lu2k.lab.netns import Lab, child_env
from lu2k.lab.spec import LinkSpec
from lu2k.localpair import DaemonProcess, daemon_config

HOP_NET = "tcp9"
HOP_BACKENDS = ("tcp", "quic", "udt")
LAN_NETS = {"a": "tcp", "b": "tcp1"}
KEY = "lnet-bed-hop-key-0123456789abcdef"
OTHER = {"a": "b", "b": "a"}


def _with_last_octet(ip: str, octet: int) -> str:
    return ip.rsplit(".", 1)[0] + f".{octet}"


def hop_backends() -> list[str]:
    """The lu2k backends the bed runs its hop over: ``LU2K_LNET_BACKEND`` (a comma-separated
    list), else all three in the long run and tcp alone in the short one."""
    named = os.environ.get("LU2K_LNET_BACKEND", "")
    if named:
        chosen = [b.strip() for b in named.split(",") if b.strip()]
        unknown = [b for b in chosen if b not in HOP_BACKENDS]
        if unknown:
            raise SystemExit(f"LU2K_LNET_BACKEND: unknown backend(s) {', '.join(unknown)}; the bed runs {', '.join(HOP_BACKENDS)}")
        return chosen
    return list(HOP_BACKENDS) if os.environ.get("LU2K_LNET_LONG") == "1" else ["tcp"]


def site_config(side: str, lan_ip: str, hop_ip: str, peer_hop_ip: str, hop_port: int, workdir: Path, *,
                backend: str = "tcp", hop_options: dict[str, Any] | None = None,
                socklnd_options: dict[str, Any] | None = None, profile: dict[str, Any] | None = None) -> dict[str, Any]:
    """lu2kd's YAML for one site: the socklnd LAN net, the lu2k hop net, a route to the far LAN net."""
    hop_nid = f"{hop_ip}@{HOP_NET}"
    extra_net: dict[str, Any] = {"key": KEY, "max_message_size": 2 << 20}
    if hop_options:
        extra_net["options"] = hop_options
    if profile:
        extra_net["profile"] = profile
    cfg = daemon_config(hop_nid, hop_port, workdir, backend=backend, extra_net=extra_net)
    cfg["lu2k"] = {"shim": {"path": str(workdir / f"lu2kd-{side}.shim")}, "control": {"path": str(workdir / f"lu2kd-{side}.ctl")}}
    lan = {
        "net type": LAN_NETS[side],
        "local NI(s)": [{"nid": f"{lan_ip}@{LAN_NETS[side]}", "tunables": {"credits": 256, "peer_credits": 8}}],
        "lu2k": {"backend": "socklnd", "port": 988, "options": dict(socklnd_options or {})},
    }
    cfg["net"] = [lan, *cfg["net"]]
    cfg["route"] = [{"net": LAN_NETS[OTHER[side]], "gateway": f"{peer_hop_ip}@{HOP_NET}"}]
    cfg["routing"] = {"enable": 1}
    return cfg


@dataclass
class Sites:
    """The lab, lu2kd-A and lu2kd-B (started in the lab's namespaces) and their configs."""

    lab: Lab
    backend: str
    workdir: Path
    lan_ips: dict[str, str]
    configs: dict[str, dict[str, Any]]
    daemons: dict[str, DaemonProcess] = field(default_factory=dict)
    hop_ips: dict[str, str] = field(default_factory=dict)  # a second gateway's hop address
    namespaces: dict[str, str] = field(default_factory=dict)  # a second gateway's lab namespace

    @classmethod
    def up(cls, specs: tuple[LinkSpec, LinkSpec], bed: Any, workdir: Path, *, backend: str = "tcp", hop_port: int = 7988,
           socklnd_options: dict[str, Any] | None = None, hop_options: dict[str, Any] | None = None,
           spare_hop_octets: dict[str, list[int]] | None = None) -> "Sites":
        """``spare_hop_octets``: last octets of hop addresses a second gateway of a site will
        take (:meth:`add_gateway`); the site's certificate names them too."""
        lab = Lab(specs, lab_id=f"lg{secrets.token_hex(3)}").up()
        try:
            lan_ips = {s: bed.attach(s, lab.ns(s)) for s in ("a", "b")}
            spec = specs[0]
            profile = {"rtt_ms": spec.rtt_s * 1e3, "rate_mbit": spec.rate_bps / 1e6 if spec.rate_bps else 1e5,
                       "loss": min(spec.mean_loss, 0.5)}
            spare = {side: [_with_last_octet(lab.state.addr[side], o) for o in octets]
                     for side, octets in (spare_hop_octets or {}).items()}
            options = backend_options(backend, lab, workdir, extra_addresses=spare)
            for side in options:
                options[side].update(hop_options or {})
            configs = {
                s: site_config(s, lan_ips[s], lab.state.addr[s], lab.state.addr[OTHER[s]], hop_port, workdir, backend=backend,
                               hop_options=options[s] or None, socklnd_options=socklnd_options, profile=profile)
                for s in ("a", "b")
            }
            sites = cls(lab, backend, workdir, lan_ips, configs)
            for s in ("a", "b"):
                sites.start(s)
            return sites
        except BaseException:
            for s in ("a", "b"):
                bed.detach(s)
            lab.down()
            raise

    def lan_nid(self, side: str) -> str:
        return f"{self.lan_ips[side]}@{LAN_NETS[side[0]]}"

    def hop_ip(self, side: str) -> str:
        return self.hop_ips.get(side) or self.lab.state.addr[side]

    def hop_nid(self, side: str) -> str:
        return f"{self.hop_ip(side)}@{HOP_NET}"

    def add_gateway(self, side: str, name: str, lan_ip: str, hop_last_octet: int) -> None:
        """Another lu2kd at ``side``'s site (``name``, e.g. ``a2``) beside the first, in the same
        lab namespace: its own LAN address and hop address, the same far net routed; the far
        lu2kd gets a route back through it (equal priority) at run time."""
        ns, other = self.lab.ns(side), OTHER[side]
        hop_ip = _with_last_octet(self.lab.state.addr[side], hop_last_octet)
        run = [["ip", "-n", ns, "addr", "add", f"{lan_ip}/16", "dev", f"lgl{side}"],
               ["ip", "-n", ns, "addr", "add", f"{hop_ip}/32", "dev", self.lab.state.dev[side]],
               ["ip", "-n", self.lab.ns(other), "route", "add", f"{hop_ip}/32", "dev", self.lab.state.dev[other]]]
        for argv in run:
            res = subprocess.run(argv, capture_output=True, text=True)
            if res.returncode != 0:
                raise AssertionError(f"{' '.join(argv)}: {res.stderr.strip()}")
        cfg = copy.deepcopy(self.configs[side])
        cfg["net"][0]["local NI(s)"][0]["nid"] = f"{lan_ip}@{LAN_NETS[side]}"
        cfg["net"][1]["local NI(s)"][0]["nid"] = f"{hop_ip}@{HOP_NET}"
        cfg["lu2k"] = {"shim": {"path": str(self.workdir / f"lu2kd-{name}.shim")},
                       "control": {"path": str(self.workdir / f"lu2kd-{name}.ctl")}}
        self.configs[name], self.lan_ips[name], self.hop_ips[name], self.namespaces[name] = cfg, lan_ip, hop_ip, ns
        self.start(name)
        self.ctl(other, "route", "add", "--net", LAN_NETS[side], "--gateway", self.hop_nid(name))

    def ctl(self, side: str, *args: str) -> Any:
        """``lu2kctl --json <args>`` on one lu2kd."""
        cfg = self.configs[side]
        res = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", cfg["lu2k"]["control"]["path"], "--json", *args],
                             capture_output=True, text=True, timeout=30, env=child_env())
        if res.returncode != 0:
            raise AssertionError(f"lu2kctl {' '.join(args)} on lu2kd-{side} failed: {res.stderr or res.stdout}")
        try:
            return json.loads(res.stdout)
        except ValueError:
            return res.stdout

    def socklnd_stats(self, side: str) -> dict[str, int]:
        """The LAN driver's counters of one lu2kd (forwarded, lan_rx_msgs, ...)."""
        return next(dict(n.get("stats") or {}) for n in self.net_show(side) if n.get("backend") == "socklnd")

    def kill(self, side: str) -> None:
        """SIGKILL one lu2kd: no goodbye to anyone."""
        d = self.daemons.pop(side)
        d.kill()

    def start(self, side: str) -> None:
        path = self.workdir / f"lu2kd-{side}.yaml"
        path.write_text(yaml.safe_dump(copy.deepcopy(self.configs[side]), sort_keys=False))
        cfg = self.configs[side]
        d = DaemonProcess(self.lan_nid(side), path, cfg["lu2k"]["shim"]["path"], cfg["lu2k"]["control"]["path"],
                          self.workdir / f"lu2kd-{side}.log")
        try:
            d.start(netns=self.namespaces.get(side) or self.lab.ns(side), timeout=30)
        except BaseException:
            d.stop()  # closes its log file too
            raise
        self.daemons[side] = d

    def stop(self, side: str) -> int | None:
        d = self.daemons.pop(side, None)
        return d.stop() if d is not None else None

    def net_show(self, side: str) -> list[dict[str, Any]]:
        """``lu2kctl net show`` of one lu2kd (its nets, and for socklnd nets the remote NIs it advertises)."""
        return list(self.ctl(side, "net", "show"))

    def remote_ni_status(self, side: str) -> dict[str, str]:
        """What lu2kd tells the kernel about its NIs on the far nets: NID -> up/down."""
        return {ni["nid"]: ni["status"] for net in self.net_show(side) for ni in net.get("remote_nis") or []}

    def hop_sockets(self, side: str) -> str:
        """``ss -tin`` of the hop's TCP connections in a site's namespace (state, RTO, retransmits)."""
        res = self.lab.run(side, ["ss", "-tin"], capture_output=True, text=True, timeout=30)
        return str(res.stdout)

    def log_tail(self, side: str) -> str:
        d = self.daemons.get(side)
        return d.log_tail(60) if d is not None else ""

    def close(self, bed: Any) -> None:
        for s in list(self.daemons):
            self.stop(s)
        for s in ("a", "b"):
            bed.detach(s)
        self.lab.down()
