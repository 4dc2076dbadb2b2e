"""Two lu2kd gateways for the LNet bed: one per site, joined by the lab's emulated satellite link.

lu2kd-A runs in the lab's namespace ``a`` with a leg on guest a's bridge (10.203.1.1, net
``tcp``); lu2kd-B in namespace ``b`` on guest b's bridge (10.203.2.1, net ``tcp1``).  Between
them the hop net ``tcp9`` over an lu2k backend (tcp, quic, udt) on the lab's two addresses,
through the lab forwarder's link model.  Each lu2kd routes the other site's LAN net via the
other's hop NID; the kernel nodes route the far net via their own site's lu2kd, with stock
``lnetctl route add``.
"""

from __future__ import annotations

import copy
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lu2k.lab.bench import backend_options
from lu2k.lab.netns import Lab
from lu2k.lab.spec import LinkSpec
from lu2k.localpair import DaemonProcess, daemon_config

HOP_NET = "tcp9"
LAN_NETS = {"a": "tcp", "b": "tcp1"}
KEY = "lnet-bed-hop-key-0123456789abcdef"
OTHER = {"a": "b", "b": "a"}


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
    workdir: Path
    lan_ips: dict[str, str]
    configs: dict[str, dict[str, Any]]
    daemons: dict[str, DaemonProcess] = field(default_factory=dict)

    @classmethod
    def up(cls, specs: tuple[LinkSpec, LinkSpec], bed: Any, workdir: Path, *, backend: str = "tcp", hop_port: int = 7988,
           socklnd_options: dict[str, Any] | None = None) -> "Sites":
        lab = Lab(specs, lab_id=f"lg{secrets.token_hex(3)}").up()
        try:
            lan_ips = {s: bed.attach(s, lab.ns(s)) for s in ("a", "b")}
            spec = specs[0]
            profile = {"rtt_ms": spec.rtt_s * 1e3, "rate_mbit": spec.rate_bps / 1e6 if spec.rate_bps else 1e5,
                       "loss": min(spec.mean_loss, 0.5)}
            options = backend_options(backend, lab, workdir)
            configs = {
                s: site_config(s, lan_ips[s], lab.state.addr[s], lab.state.addr[OTHER[s]], hop_port, workdir, backend=backend,
                               hop_options=options[s] or None, socklnd_options=socklnd_options, profile=profile)
                for s in ("a", "b")
            }
            sites = cls(lab, workdir, lan_ips, configs)
            for s in ("a", "b"):
                sites.start(s)
            return sites
        except BaseException:
            for s in ("a", "b"):
                bed.detach(s)
            lab.down()
            raise

    def lan_nid(self, side: str) -> str:
        return f"{self.lan_ips[side]}@{LAN_NETS[side]}"

    def hop_nid(self, side: str) -> str:
        return f"{self.lab.state.addr[side]}@{HOP_NET}"

    def start(self, side: str) -> None:
        path = self.workdir / f"lu2kd-{side}.yaml"
        path.write_text(yaml.safe_dump(copy.deepcopy(self.configs[side]), sort_keys=False))
        cfg = self.configs[side]
        d = DaemonProcess(self.lan_nid(side), path, cfg["lu2k"]["shim"]["path"], cfg["lu2k"]["control"]["path"],
                          self.workdir / f"lu2kd-{side}.log")
        try:
            d.start(netns=self.lab.ns(side), timeout=30)
        except BaseException:
            d.stop()  # closes its log file too
            raise
        self.daemons[side] = d

    def stop(self, side: str) -> int | None:
        d = self.daemons.pop(side, None)
        return d.stop() if d is not None else None

    def log_tail(self, side: str) -> str:
        d = self.daemons.get(side)
        return d.log_tail(60) if d is not None else ""

    def close(self, bed: Any) -> None:
        for s in list(self.daemons):
            self.stop(s)
        for s in ("a", "b"):
            bed.detach(s)
        self.lab.down()
