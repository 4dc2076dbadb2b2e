"""The daemon's configuration: lnetctl-shaped YAML plus lu2k's own keys.

The YAML follows ``lnetctl export`` (``net``/``peer``/``route``/``global``/``routing``), so an
operator's file reads as they expect; lu2k's additions live under a ``lu2k:`` key of each net
(backend, port, key, site profile, backend options) and a top-level ``lu2k:`` (shim and
control socket paths).  Every error is collected with its YAML path and the whole config is
rejected at once: a daemon never starts (or reconfigures) half-configured.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .backends.base import BackendSettings, LinkProfile
from .errors import ConfigError, NidError
from .kernel_shim.abi import default_shim_path
from .nid import Net, Nid, parse_net, parse_nid

DEFAULT_PORT = 7988
DEFAULT_MAX_MESSAGE = 4 << 20


def default_control_path() -> str:
    """lu2kctl's socket: beside the shim socket (see :func:`lu2k.kernel_shim.abi.default_shim_path`)."""
    return str(Path(default_shim_path()).with_name("lu2kd.ctl"))


@dataclass
class NetConfig:
    net: Net
    nid: Nid
    backend: str = "tcp"
    port: int = DEFAULT_PORT
    listen: str | None = None  # bind address; default the NI's own address
    key: bytes = b""
    credits: int = 256
    peer_credits: int = 8
    peer_timeout: float = 180.0
    max_message_size: int = DEFAULT_MAX_MESSAGE
    checksum: bool = False
    profile: LinkProfile = field(default_factory=LinkProfile)
    options: dict[str, Any] = field(default_factory=dict)

    def backend_settings(self) -> BackendSettings:
        return BackendSettings(self.net, self.port, self.max_message_size, self.profile, self.key, dict(self.options))


@dataclass
class PeerConfig:
    nid: Nid
    address: str | None = None  # "host:port" override of the NID-derived address


@dataclass
class RouteConfig:
    net: Net
    gateway: Nid
    hops: int | None = None
    priority: int = 0


@dataclass
class GlobalConfig:
    transaction_timeout: float = 50.0  # a message not delivered by then fails
    connect_timeout: float = 10.0
    reconnect_min: float = 0.1
    reconnect_max: float = 10.0
    health_sensitivity: int = 100
    recovery_interval: float = 1.0
    router_buffer_bytes: int = 64 << 20


@dataclass
class ShimConfig:
    path: str = field(default_factory=default_shim_path)
    max_in_flight: int = 1024
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DaemonConfig:
    nets: list[NetConfig] = field(default_factory=list)
    peers: list[PeerConfig] = field(default_factory=list)
    routes: list[RouteConfig] = field(default_factory=list)
    global_: GlobalConfig = field(default_factory=GlobalConfig)
    routing: bool = False
    shim: ShimConfig = field(default_factory=ShimConfig)
    control_path: str = field(default_factory=default_control_path)
    source: str = "<embedded>"

    def net_for(self, net: Net) -> NetConfig | None:
        return next((n for n in self.nets if n.net == net), None)


# The embedded default: one TCP net on loopback, used by ``lu2kd`` without --config and the demo.
DEFAULT_CONFIG_YAML = """\
net:
  - net type: tcp
    local NI(s):
      - nid: 127.0.0.1@tcp
        tunables:
          peer_timeout: 180
          peer_credits: 8
          credits: 256
    lu2k:
      backend: tcp
      port: 7988
      key: lu2k-demo-key-change-me
global:
  transaction_timeout: 50
"""


class _Errors:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, msg: str) -> None:
        self.items.append(f"{where}: {msg}")


def _num(errs: _Errors, where: str, value: Any, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    try:
        if isinstance(value, bool):
            raise ValueError
        v = kind(value)
    except (TypeError, ValueError):
        errs.add(where, f"expected a {kind.__name__}, got {value!r}")
        return None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        errs.add(where, f"{v} out of range {lo}..{hi}")
        return None
    return v


def _key(errs: _Errors, where: str, spec: dict[str, Any], base_dir: Path) -> bytes:
    if "key_file" in spec:
        path = base_dir / str(spec["key_file"])
        try:
            return path.read_bytes().strip()
        except OSError as e:
            errs.add(f"{where}.key_file", f"cannot read {path}: {e.strerror}")
            return b""
    key = spec.get("key")
    if key is None:
        errs.add(f"{where}.key", "every net needs a pre-shared key (key: or key_file:) to authenticate peers")
        return b""
    text = str(key)
    if text.startswith("hex:"):
        try:
            return binascii.unhexlify(text[4:])
        except binascii.Error:
            errs.add(f"{where}.key", "hex: key is not valid hex")
            return b""
    if len(text) < 8:
        errs.add(f"{where}.key", "key shorter than 8 characters")
    return text.encode()


def _parse_net(errs: _Errors, where: str, item: Any, base_dir: Path) -> list[NetConfig]:
    if not isinstance(item, dict):
        errs.add(where, "expected a mapping")
        return []
    try:
        net = parse_net(str(item.get("net type", "")))
    except NidError as e:
        errs.add(f"{where}.net type", str(e))
        return []
    if net.type == "lo":
        return []  # lnetctl exports lo; nothing to configure
    lu = item.get("lu2k") or {}
    if not isinstance(lu, dict):
        errs.add(f"{where}.lu2k", "expected a mapping")
        lu = {}
    nis = item.get("local NI(s)") or []
    if not isinstance(nis, list) or not nis:
        errs.add(f"{where}.local NI(s)", "needs at least one NI with a nid")
        return []
    out = []
    for i, ni in enumerate(nis):
        w = f"{where}.local NI(s)[{i}]"
        if not isinstance(ni, dict) or "nid" not in ni:
            errs.add(w, "each NI needs a nid (e.g. 10.0.0.1@tcp)")
            continue
        try:
            nid = parse_nid(str(ni["nid"]))
        except NidError as e:
            errs.add(f"{w}.nid", str(e))
            continue
        if nid.net != net:
            errs.add(f"{w}.nid", f"NID {nid} is not on net {net}")
            continue
        cfg = NetConfig(net=net, nid=nid)
        tun = ni.get("tunables") or {}
        for key, lo, hi in (("credits", 1, 1 << 20), ("peer_credits", 1, 1 << 16)):
            if key in tun:
                v = _num(errs, f"{w}.tunables.{key}", tun[key], int, lo, hi)
                if v is not None:
                    setattr(cfg, key, v)
        if "peer_timeout" in tun:
            v = _num(errs, f"{w}.tunables.peer_timeout", tun["peer_timeout"], float, 0, 86400)
            if v is not None:
                cfg.peer_timeout = v
        cfg.backend = str(lu.get("backend", "tcp"))
        lan = cfg.backend == "socklnd"  # kernel LNet nodes: LNet's acceptor port, no lu2k key
        if lan:
            cfg.port = 988
        if "port" in lu:
            v = _num(errs, f"{where}.lu2k.port", lu["port"], int, 0, 65535)
            if v is not None:
                cfg.port = v
        if "listen" in lu:
            cfg.listen = str(lu["listen"])
        if "max_message_size" in lu:
            v = _num(errs, f"{where}.lu2k.max_message_size", lu["max_message_size"], int, 0, 64 << 20)
            if v is not None:
                cfg.max_message_size = v
        cfg.checksum = bool(lu.get("checksum", False))
        cfg.key = b"" if lan and not ("key" in lu or "key_file" in lu) else _key(errs, f"{where}.lu2k", lu, base_dir)
        prof = lu.get("profile") or {}
        if not isinstance(prof, dict):
            errs.add(f"{where}.lu2k.profile", "expected a mapping with rtt_ms, rate_mbit, loss")
            prof = {}
        unknown = set(prof) - {"rtt_ms", "rate_mbit", "loss"}
        if unknown:
            errs.add(f"{where}.lu2k.profile", f"unknown keys {sorted(unknown)}")
        cfg.profile = LinkProfile(
            rtt_ms=_num(errs, f"{where}.lu2k.profile.rtt_ms", prof["rtt_ms"], float, 0, 60000) if "rtt_ms" in prof else None,
            rate_mbit=_num(errs, f"{where}.lu2k.profile.rate_mbit", prof["rate_mbit"], float, 0.001, 1e6) if "rate_mbit" in prof else None,
            loss=_num(errs, f"{where}.lu2k.profile.loss", prof["loss"], float, 0, 0.5) if "loss" in prof else None,
        )
        opts = lu.get("options") or {}
        if not isinstance(opts, dict):
            errs.add(f"{where}.lu2k.options", "expected a mapping")
            opts = {}
        cfg.options = dict(opts)
        out.append(cfg)
    return out


def parse_config(data: Any, *, source: str = "<string>", base_dir: Path | None = None) -> DaemonConfig:
    """Validate a loaded YAML document; raise ConfigError listing every problem."""
    errs = _Errors()
    base_dir = base_dir or Path.cwd()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("top level must be a mapping", where=source)
    data = _expand_lnet(data, source)
    known = {"net", "peer", "route", "global", "routing", "buffers", "lu2k", "ip2nets", "numa", "discovery"}
    for key in data:
        if key not in known:
            errs.add(str(key), f"unknown section (known: {', '.join(sorted(known))})")
    cfg = DaemonConfig(source=source)
    for i, item in enumerate(data.get("net") or []):
        cfg.nets.extend(_parse_net(errs, f"net[{i}]", item, base_dir))
    seen: set[Net] = set()
    for n in cfg.nets:
        if n.net in seen:
            errs.add("net", f"net {n.net} configured twice (one NI per net is supported)")
        seen.add(n.net)
    for i, item in enumerate(data.get("peer") or []):
        w = f"peer[{i}]"
        if not isinstance(item, dict) or "primary nid" not in item:
            errs.add(w, "each peer needs a 'primary nid'")
            continue
        try:
            pc = PeerConfig(parse_nid(str(item["primary nid"])))
        except NidError as e:
            errs.add(f"{w}.primary nid", str(e))
            continue
        lu = item.get("lu2k") or {}
        if isinstance(lu, dict) and "address" in lu:
            pc.address = str(lu["address"])
        cfg.peers.append(pc)
    for i, item in enumerate(data.get("route") or []):
        w = f"route[{i}]"
        if not isinstance(item, dict):
            errs.add(w, "expected a mapping with net and gateway")
            continue
        try:
            rnet = parse_net(str(item.get("net", "")))
            gw = parse_nid(str(item.get("gateway", "")))
        except NidError as e:
            errs.add(w, str(e))
            continue
        hop = item.get("hop", -1)
        hops = _num(errs, f"{w}.hop", hop, int, -1, 255)
        prio = _num(errs, f"{w}.priority", item.get("priority", 0), int, 0, 1 << 31)
        cfg.routes.append(RouteConfig(rnet, gw, None if hops in (None, -1) else hops, prio or 0))
    g = data.get("global") or {}
    if not isinstance(g, dict):
        errs.add("global", "expected a mapping")
        g = {}
    for key, kind, lo, hi in (
        ("transaction_timeout", float, 0.001, 86400), ("connect_timeout", float, 0.001, 3600),
        ("reconnect_min", float, 0.001, 3600), ("reconnect_max", float, 0.001, 3600),
        ("health_sensitivity", int, 0, 1000), ("recovery_interval", float, 0.01, 3600),
        ("router_buffer_bytes", int, 0, 1 << 40),
    ):
        if key in g:
            v = _num(errs, f"global.{key}", g[key], kind, lo, hi)
            if v is not None:
                setattr(cfg.global_, key, v)
    # lnetctl knobs we accept and ignore (they have no meaning in lu2k).
    for key in g:
        if not hasattr(cfg.global_, key) and key not in ("numa_range", "max_intf", "discovery", "drop_asym_route", "retry_count", "lnd_timeout", "response_tracking", "recovery_limit", "max_recovery_ping_interval", "router_sensitivity"):
            errs.add(f"global.{key}", "unknown global setting")
    routing = data.get("routing") or {}
    if isinstance(routing, dict):
        cfg.routing = bool(int(routing.get("enable", 0) or 0))
    lu = data.get("lu2k") or {}
    if isinstance(lu, dict):
        shim = lu.get("shim") or {}
        if "path" in shim:
            cfg.shim.path = str(shim["path"])
        if "max_in_flight" in shim:
            v = _num(errs, "lu2k.shim.max_in_flight", shim["max_in_flight"], int, 1, 1 << 20)
            if v:
                cfg.shim.max_in_flight = v
        cfg.shim.options = {k: v for k, v in shim.items() if k not in ("path", "max_in_flight")}
        from .kernel_shim.server import ShimConfig as _ShimServerConfig

        try:  # the shim server owns these keys; validate them now, not at start-up
            _ShimServerConfig(max_in_flight=cfg.shim.max_in_flight, **cfg.shim.options)
        except ConfigError as e:
            errs.items.append(str(e))  # already says where (lu2k.shim.<key>)
        ctl = lu.get("control") or {}
        if "path" in ctl:
            cfg.control_path = str(ctl["path"])
    if not cfg.nets and not errs.items:
        errs.add("net", "no network configured")
    for r in cfg.routes:
        if cfg.net_for(r.gateway.net) is None:
            errs.add("route", f"gateway {r.gateway} is not on a local net")
    if errs.items:
        raise ConfigError(f"{len(errs.items)} error(s) in configuration", where=source, errors=errs.items)
    return cfg


def load_config(path: str | None) -> DaemonConfig:
    if path is None:
        return parse_config(yaml.safe_load(DEFAULT_CONFIG_YAML), source="<embedded default>")
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", where=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", where=str(p)) from None
    return parse_config(data, source=str(p), base_dir=p.parent)


def with_overrides(cfg: DaemonConfig, **changes: Any) -> DaemonConfig:
    return replace(cfg, **changes)


def _expand_lnet(data: dict[str, Any], source: str) -> dict[str, Any]:
    """lnetctl schema check (every error, with its YAML path) and expansion of what needs the
    host: interface-only NIs, ``lu2k.networks``/``ip2nets``/``routes`` module-parameter
    strings and ``ip2nets:`` rules become plain ``net``/``route`` entries (lu2k.lnetyaml)."""
    from .lnetyaml import expand_for_daemon

    return dict(expand_for_daemon(data, source=source))
