"""The daemon's configuration: lnetctl-shaped YAML plus lu2k's own keys, read in one pass.

The YAML follows ``lnetctl export`` (``net``/``peer``/``route``/``global``/``routing``), so an
operator's file reads as they expect; lu2k's additions live under a ``lu2k:`` key of each net
(backend, port, key, site profile, backend options) and a top-level ``lu2k:`` (shim and
control socket paths, legacy module-parameter strings, defaults for generated nets).

One pass: :func:`lu2k.lnetyaml.parse_data` walks the document once and checks every value
with the validators of :mod:`lu2k.values` (each error with its YAML path); the document is
then applied to this host (:func:`lu2k.lnetyaml.resolve`: interfaces, ``networks=``,
``ip2nets``, ``routes=``), and this module turns the checked result into the daemon's types,
adding what only the daemon knows (one NI per net, no two nets on one address and port,
keys read from ``key_file``, relative paths taken from the config file's directory, credits
derived from the site profile).  Nothing here reads the YAML itself.  A document with any
error is rejected whole: a daemon never starts (or reconfigures) half-configured.

Derived defaults (a net whose config sets only a site profile still fills its link): with a
profile giving ``rate_mbit`` and ``rtt_ms``, the bandwidth-delay product is
``BDP = rate_mbit * 1e6 / 8 * rtt_ms / 1e3`` bytes and, unless the config sets them,

* ``window_bytes = 4 * BDP`` -- the bytes a peer may have assigned and not yet acknowledged
  (one BDP to fill the pipe, one to cover the ACK's way back and jitter, and two for loss
  repair: behind a lost packet an in-order transport holds what arrived until the repair, a
  round trip or two later, and those bytes are not acknowledged meanwhile -- with 2 BDP, udt
  carried 73 % of a GEO link at 1 % loss instead of 95 %) -- ``6 * BDP`` for the tcp backend,
  whose single ordered stream holds more back (``LOSSY_WINDOW_BDPS``); ``2 * BDP`` where the profile
  says the link loses nothing (``loss: 0``); the message core holds the rest in its per-peer
  fair queue (:mod:`lu2k.core.fairq`);
* ``peer_credits = clamp(ceil(window_bytes / 1 KiB), 8, 4096)`` -- enough messages that even
  1 KiB messages fill that window (the byte window, not the count, bounds larger ones); LNet's
  LAN default of 8 is the floor;
* ``credits = clamp(4 * peer_credits, 256, 1 << 20)`` -- the NI's total, room for four such
  peers at once, never below LNet's default of 256;
* ``socket_buffer = 2 * BDP`` is reported with them (the backends size their flow windows and
  UDP socket buffers from the same profile; tcp leaves its socket buffers to autotuning).

The derived values, and which were derived, are in :attr:`NetConfig.derived`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .backends.base import BackendSettings, LinkProfile
from .core.returnpath import PathSettings, parse_path_settings
from .errors import BackendUnavailable, ConfigError, NidError
from .kernel_shim.abi import default_shim_path
from .kernel_shim.config import ShimConfig
from .nid import Net, Nid, parse_net
from .routing import Route
from .values import Problems, parse_key

DEFAULT_PORT = 7988
LNET_ACCEPTOR_PORT = 988  # socklnd nets (kernel LNet nodes) listen where LNet's acceptor does
DEFAULT_MAX_MESSAGE = 4 << 20
DEFAULT_CREDITS = 256
DEFAULT_PEER_CREDITS = 8
DEFAULT_PEER_TIMEOUT = 180.0
# The byte window on a lossy profile, in BDPs, where a backend needs more than four: one TCP
# socket is a single ordered stream, so behind every loss it holds back what arrived after it
# for a round trip -- and a lost retransmission for an RTO.  With 4 BDP lu2k/tcp carried 88 % of
# the lab's GEO link at 1 % loss, with 6 BDP 92 % (docs/measurements/2026-12-04-tcp.md).
LOSSY_WINDOW_BDPS = {"tcp": 6}
TYPICAL_MESSAGE = 64 << 10  # a bulk message (the size 2 x BDP of derived credits carried before the byte window)
SMALL_MESSAGE = 1 << 10  # derived peer credits let messages down to this size fill the byte window
MAX_DERIVED_PEER_CREDITS = 4096

# The transport each backend listens on: two nets may share a port only on different ones.
_TRANSPORT = {"tcp": "tcp", "quic": "udp", "udt": "udp"}
# What a backend cannot start without (its listener refuses to run otherwise).
_REQUIRED_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "quic": (("cert", "key"), "a quic net listens with TLS: it needs the site certificate and key "
                              "(lu2k: {cert: FILE, cert_key: FILE} or options: {cert: FILE, key: FILE}; "
                              "make them with: lu2k keygen site NAME)"),
}
# Net-level lu2k keys that are backend options under another name.
_NET_KEY_OPTIONS = {"cert": "cert", "cert_key": "key", "ca": "ca"}
_PATH_OPTIONS = ("cert", "key", "ca", "cert_key", "key_file")

RouteConfig = Route  # one Route type (lu2k.routing.Route): net, gateway, hops, priority


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
    credits: int = DEFAULT_CREDITS
    peer_credits: int = DEFAULT_PEER_CREDITS
    peer_timeout: float = DEFAULT_PEER_TIMEOUT
    max_message_size: int = DEFAULT_MAX_MESSAGE
    checksum: bool = False
    profile: LinkProfile = field(default_factory=LinkProfile)
    options: dict[str, Any] = field(default_factory=dict)
    paths: PathSettings = field(default_factory=PathSettings)  # return_path, keepalive (lu2k.core.returnpath)
    where: str = field(default="net", compare=False)  # YAML path of the entry it came from
    # Values derived from the profile (name -> value), for ``net show -v``; see the module doc.
    derived: dict[str, int] = field(default_factory=dict, compare=False)

    def backend_settings(self) -> BackendSettings:
        return BackendSettings(self.net, self.port, self.max_message_size, self.profile, self.key, dict(self.options))


@dataclass
class PeerConfig:
    nid: Nid
    address: str | None = None  # "host:port" override of the NID-derived address
    nids: tuple[Nid, ...] = ()  # every NID of the peer, the primary first ("peer ni"): its rails
    multi_rail: bool = True  # False: the peer is only its primary NID (lnetctl's --non_mr)
    paths: PathSettings = field(default_factory=PathSettings)  # return_path, keepalive (lu2k.core.returnpath)

    @property
    def rails(self) -> list[Nid]:
        """The NIDs messages to this peer may take (lu2k.core.rails); one: not multi-rail."""
        return list(dict.fromkeys((self.nid, *self.nids))) if self.multi_rail else [self.nid]


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
class DaemonConfig:
    nets: list[NetConfig] = field(default_factory=list)
    peers: list[PeerConfig] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    global_: GlobalConfig = field(default_factory=GlobalConfig)
    routing: bool = False
    shim: ShimConfig = field(default_factory=ShimConfig)
    control_path: str = field(default_factory=default_control_path)
    metrics: dict[str, Any] = field(default_factory=dict)  # lu2k.metrics, parsed by lu2k.metrics.parse_metrics_config
    source: str = "<embedded>"
    services: list[Any] = field(default_factory=list)  # lu2k.apps.services.ServiceSpec (lu2k: serve:/forward:)

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


# --- derived defaults ----------------------------------------------------------------------------


def derive_link_defaults(profile: LinkProfile, backend: str | None = None) -> dict[str, int]:
    """Credits and windows from a site profile (see the module docstring); {} without rate and RTT."""
    if not profile.rate_mbit or not profile.rtt_ms:
        return {}
    bdp = profile.bdp_bytes()
    window = (2 if profile.loss == 0 else LOSSY_WINDOW_BDPS.get(backend or "", 4)) * bdp
    peer_credits = min(MAX_DERIVED_PEER_CREDITS, max(DEFAULT_PEER_CREDITS, math.ceil(window / SMALL_MESSAGE)))
    credits = min(1 << 20, max(DEFAULT_CREDITS, 4 * peer_credits))
    return {
        "bdp_bytes": bdp,
        "peer_credits": peer_credits,
        "credits": credits,
        "window_bytes": window,
        "socket_buffer": 2 * bdp,
    }


# --- building the daemon's config from the checked document -----------------------------------------


def _path(base_dir: Path, text: str) -> str:
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else base_dir / p)


def _net_paths(data: Mapping[str, Any]) -> dict[Net, str]:
    """net -> YAML path of the first ``net`` entry naming it."""
    out: dict[Net, str] = {}
    items = data.get("net")
    for i, item in enumerate(items if isinstance(items, list) else []):
        if isinstance(item, Mapping) and "net type" in item:
            try:
                out.setdefault(parse_net(str(item["net type"])), f"net[{i}]")
            except NidError:
                pass
    return out


def _key(problems: Problems, where: str, lu: Mapping[str, Any], base_dir: Path) -> bytes:
    if "key_file" in lu:
        path = _path(base_dir, str(lu["key_file"]))
        try:
            raw = Path(path).read_bytes().strip()
        except OSError as e:
            problems.add(f"{where}.key_file", f"cannot read {path}: {e.strerror}")
            return b""
        # ``lu2k keygen psk`` writes "hex:<64 digits>": decoded like a key given inline.
        value: bytes | str = raw.decode("ascii", "replace") if raw.startswith(b"hex:") else raw
        return problems.check(lambda: parse_key(value, f"{where}.key_file ({path})")) or b""
    if "key" not in lu:
        problems.add(f"{where}.key", "every net needs a pre-shared key (key: or key_file:) to authenticate peers")
        return b""
    return problems.check(lambda: parse_key(lu["key"], f"{where}.key")) or b""


def _net_config(problems: Problems, where: str, net: Net, nid: Nid, tun: Mapping[str, Any], lu: Mapping[str, Any],
                base_dir: Path) -> NetConfig:
    cfg = NetConfig(net=net, nid=nid, where=where)
    cfg.backend = str(lu.get("backend", "tcp"))
    lan = cfg.backend == "socklnd"  # kernel LNet nodes: LNet's acceptor port, no lu2k key
    if lan and not nid.is_nid4:
        problems.add(f"{where}.local NI(s)", f"{nid}: the socklnd LAN speaks socklnd protocols V2/V3 with 64-bit NIDs; "
                                             "IPv6 NIDs need V4, which lu2k's socklnd does not speak (give this net an IPv4 NID)")
    cfg.port = int(lu.get("port", LNET_ACCEPTOR_PORT if lan else DEFAULT_PORT))
    cfg.listen = lu.get("listen")  # checked (lu2k.inet.parse_host) and normalised by lnetyaml
    cfg.max_message_size = int(lu.get("max_message_size", DEFAULT_MAX_MESSAGE))
    cfg.checksum = bool(lu.get("checksum", False))
    cfg.key = b"" if lan and not ("key" in lu or "key_file" in lu) else _key(problems, f"{where}.lu2k", lu, base_dir)
    cfg.profile = LinkProfile(**dict(lu.get("profile") or {}))
    opts = dict(lu.get("options") or {})
    for net_key, opt in _NET_KEY_OPTIONS.items():
        if net_key in lu:
            if opt in opts:
                problems.add(f"{where}.lu2k.{net_key}", f"given both here and as options.{opt}")
            opts[opt] = lu[net_key]
    for k in _PATH_OPTIONS:
        if isinstance(opts.get(k), str):
            opts[k] = _path(base_dir, opts[k])
    cfg.options = opts
    cfg.paths = parse_path_settings(lu, f"{where}.lu2k")  # already checked by lnetyaml
    required = _REQUIRED_OPTIONS.get(cfg.backend)
    if required is not None and not all(opts.get(k) for k in required[0]):
        problems.add(f"{where}.lu2k", required[1])
    derived = derive_link_defaults(cfg.profile, cfg.backend)
    cfg.derived = {"bdp_bytes": derived["bdp_bytes"]} if derived else {}
    for k, default in (("credits", DEFAULT_CREDITS), ("peer_credits", DEFAULT_PEER_CREDITS)):
        v = tun.get(k)
        if v is not None and v > 0:
            setattr(cfg, k, int(v))
        elif derived:
            setattr(cfg, k, derived[k])
            cfg.derived[k] = derived[k]
        else:
            setattr(cfg, k, default)
    for k in ("window_bytes", "socket_buffer"):
        if derived:
            cfg.derived[k] = derived[k]
    pt = tun.get("peer_timeout")
    cfg.peer_timeout = float(pt) if pt is not None and pt >= 0 else DEFAULT_PEER_TIMEOUT
    return cfg


def _derive_shim_in_flight(cfg: DaemonConfig, *, explicit: bool) -> None:
    """An endpoint may keep as many messages in flight as a net's derived peer credits.

    The shim's default (1 024 per endpoint) would otherwise cap one application below what
    the profile's window carries: 1 KiB messages on a 600 ms GEO round trip need ~1 950 in
    flight at 80 % of 20 Mbit/s.  Each such net shows the figure as ``shim_max_in_flight``
    under ``derived``; a ``shim: max_in_flight`` in the config wins.
    """
    if explicit:
        return
    for n in cfg.nets:
        need = n.derived.get("peer_credits")
        if need is not None and need > cfg.shim.max_in_flight:
            n.derived["shim_max_in_flight"] = need
    peak = max((n.derived.get("shim_max_in_flight", 0) for n in cfg.nets), default=0)
    if peak:
        cfg.shim.max_in_flight = peak


def parse_config(data: Any, *, source: str = "<string>", base_dir: Path | None = None,
                 interfaces: Iterable[Any] | None = None) -> DaemonConfig:
    """Validate a loaded YAML document; raise ConfigError listing every problem.

    ``base_dir`` is where relative file names (``key_file``, certificates) are taken from: the
    config file's directory (:func:`load_config`), else the working directory.  ``interfaces``
    describe the host for interface-based NIs (default: ``lu2k.interfaces``, else this host's).
    """
    from .config import system_interfaces
    from .lnetyaml import parse_data, resolve

    base_dir = base_dir or Path.cwd()
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("top level must be a mapping", where=source)
    lcfg = parse_data(data, source=source, complete=True)
    lu = lcfg.lu2k
    host_needed = bool(lcfg.ip2nets or lcfg.ip2net or lu.get("networks") or lu.get("ip2nets")
                       or any(ni.interfaces and ni.nid is None for n in lcfg.nets for ni in n.nis))
    if interfaces is None:
        interfaces = lu.get("interfaces") or (system_interfaces() if host_needed else [])
    try:
        res = resolve(lcfg, interfaces)
    except ConfigError as e:
        raise ConfigError(f"{len(e.errors)} error(s) applying the configuration to this host", where=source, errors=e.errors) from None

    problems = Problems()
    cfg = DaemonConfig(source=source)
    paths = _net_paths(data)
    defaults = dict(lu.get("defaults") or {})
    for rn in res.nets:
        where = paths.get(rn.net, f"lu2k ({rn.origin}) net {rn.net}")
        if len(rn.nis) != 1:
            problems.add(f"{where}.local NI(s)", f"net {rn.net} has {len(rn.nis)} NIs; lu2k runs one NI per net")
            continue
        ni = rn.nis[0]
        cfg.nets.append(_net_config(problems, where, rn.net, ni.nid, ni.tunables, {**defaults, **rn.lu2k}, base_dir))
    seen: dict[tuple[str, str, int], NetConfig] = {}
    for n in cfg.nets:
        if n.port == 0:
            continue  # the OS picks a free port for each
        host = n.listen or (n.nid.host if not isinstance(n.nid.addr, int) else str(n.nid))
        place = (_TRANSPORT.get(n.backend, n.backend), host, n.port)
        if place in seen:
            problems.add(f"{n.where}.lu2k.port", f"net {n.net} and net {seen[place].net} both listen on {host} port {n.port}")
        else:
            seen[place] = n
    cfg.peers = [PeerConfig(p.primary_nid, p.lu2k.get("address"), tuple(p.nids), p.multi_rail, parse_path_settings(p.lu2k, "peer.lu2k"))
                 for p in lcfg.peers]
    cfg.routes = list(res.routes)
    for name, value in lcfg.global_.items():
        if hasattr(cfg.global_, name):
            setattr(cfg.global_, name, type(getattr(cfg.global_, name))(value))
    cfg.routing = res.router
    if lcfg.shim is not None:
        cfg.shim = lcfg.shim
    _derive_shim_in_flight(cfg, explicit=lcfg.shim is not None and "max_in_flight" in lcfg.shim.given)
    ctl = lu.get("control") or {}
    if "path" in ctl:
        cfg.control_path = str(ctl["path"])
    if lu.get("metrics") is not None:
        from .metrics import parse_metrics_config

        problems.check(lambda: setattr(cfg, "metrics", parse_metrics_config(lu["metrics"])))
    from .apps.services import parse_services

    cfg.services = parse_services(lu, problems.items)
    if not cfg.nets and not problems.items:
        problems.add("net", "no network configured")
    problems.raise_if_any("in configuration", source)
    return cfg


def load_config(path: str | None) -> DaemonConfig:
    if path is None:
        return parse_config(yaml.safe_load(DEFAULT_CONFIG_YAML), source="<embedded default>")
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", where=str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError("not a text file (UTF-8)", where=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", where=str(p)) from None
    return parse_config(data, source=str(p), base_dir=p.resolve().parent)


def with_overrides(cfg: DaemonConfig, **changes: Any) -> DaemonConfig:
    return replace(cfg, **changes)


def check_backends(config: DaemonConfig) -> list[str]:
    """What would stop this config from starting here beyond its syntax: each net's backend
    is loaded and given its settings, and a refusal is reported at the net's YAML path."""
    from .backends import get_backend

    problems = []
    for n in config.nets:
        where = f"{n.where}.lu2k"
        try:
            get_backend(n.backend)(n.backend_settings())
        except BackendUnavailable as e:
            problems.append(f"{where}.backend: net {n.net}: {e}")
        except ConfigError as e:
            problems.append(f"{where}.options: {e}")
        except (TypeError, ValueError) as e:  # a backend that did not check a value itself
            problems.append(f"{where}.options: bad option value ({e})")
    return problems
