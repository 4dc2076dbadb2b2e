"""lnetctl's YAML configuration schema: parse, validate, resolve, export.

The document is what ``lnetctl export`` prints and ``lnetctl import`` reads::

    net:
        - net type: tcp
          local NI(s):
            - nid: 10.0.0.1@tcp            # or interfaces: {0: eth0}; lnetctl derives the NID
              interfaces: {0: eth0}
              tunables: {peer_timeout: 180, peer_credits: 8, peer_buffer_credits: 0, credits: 256}
              lnd tunables: {conns_per_peer: 1}
              CPT: "[0,1]"
          lu2k:                              # lu2k's additions, per net
            backend: tcp
            port: 7988
            key: ...                        # or key_file:
            profile: {rtt_ms: 600, rate_mbit: 20, loss: 0.01}
    route:
        - {net: tcp1, gateway: 10.0.0.2@tcp, hop: -1, priority: 0}
    peer:
        - primary nid: 10.0.0.3@tcp
          Multi-Rail: True
          peer ni: [{nid: 10.0.0.3@tcp}]
    global: {transaction_timeout: 50, retry_count: 2, health_sensitivity: 100, ...}
    routing: {enable: 0}
    buffers: {tiny: 512, small: 4096, large: 256}
    ip2nets:
        - net-spec: tcp
          interfaces: {0: eth0}
          ip-range: {0: 192.168.*.*}
    lu2k:                                   # lu2k's additions, global
        networks: "tcp0(eth0)"              # legacy module-parameter strings, read as
        ip2nets: "tcp 192.168.*.*"          #   lu2k.config reads them
        routes: "tcp1 10.0.0.2@tcp"
        shim: {...}
        control: {...}

Keys lnetctl only prints (``status``, ``statistics``, ``health stats``, ...) are accepted and
ignored, so an ``lnetctl export`` file imports as is; anything else unknown is an error.
lu2k's keys stay under ``lu2k:`` so a plain lnetctl file still parses here and an lu2k file
still parses in lnetctl (which ignores keys it does not know inside an entry).

This is the one pass over the document: :func:`parse_data` checks every value, lu2k's keys
included, with the validators of :mod:`lu2k.values`, collects *every* problem with its YAML
path (``net[0].local NI(s)[1].nid``) and rejects the document whole with one
:class:`~lu2k.errors.ConfigError` whose ``errors`` lists them.  :func:`resolve` then applies it
to a host (interfaces in detection order, those that are down invisible) to get the concrete
NIs, NIDs and routes, checking what only the host can tell (interfaces exist and are up,
gateways are on a local net).  :mod:`lu2k.settings` builds the daemon's configuration from
the result without reading the YAML again.  Nothing here touches the machine: pure functions
of their arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import yaml

from .config import (
    InterfaceLike,
    Ip2NetsRule,
    NetSpec,
    NiSpec,
    check_ip2nets,
    host_interfaces,
    ip2nets,
    ip2nets_rules,
    parse_interface_item,
    parse_ip_pattern,
    parse_networks,
    parse_routes,
    resolve_interfaces,
    route_text,
)
from .errors import ConfigError, NidError
from .kernel_shim.config import ShimConfig
from .nid import ADDR_IP, ExprList, Net, Nid, NidList, parse_expr_list, parse_net, parse_nid
from .routing import Route
from .inet import parse_host
from .values import Problems, as_address, as_bool, as_float, as_int, as_port, as_str, parse_key, parse_rate

SECTIONS = ("net", "route", "peer", "global", "routing", "buffers", "numa", "discovery", "ip2nets", "udsp", "lu2k")

# lnetctl's global settings (``lnetctl set <name> <value>``) and their bounds, as the kernel
# module parameters check them.  None = unbounded.
LNET_GLOBALS: dict[str, tuple[int | None, int | None]] = {
    "numa_range": (0, None),
    "max_intf": (16, None),
    "discovery": (0, 1),
    "drop_asym_route": (0, 1),
    "retry_count": (0, None),
    "transaction_timeout": (1, None),
    "health_sensitivity": (0, 1000),
    "recovery_interval": (1, None),
    "router_sensitivity": (0, 100),
    "lnd_timeout": (0, None),  # derived by Lustre; exported, accepted, not settable
    "response_tracking": (0, 3),
    "recovery_limit": (0, None),
    "max_recovery_ping_interval": (1, None),
}
# lu2k's own global knobs (the daemon's GlobalConfig, lu2k.settings).
LU2K_GLOBALS: dict[str, tuple[type, float, float]] = {
    "connect_timeout": (float, 0.001, 3600),
    "reconnect_min": (float, 0.001, 3600),
    "reconnect_max": (float, 0.001, 3600),
    "router_buffer_bytes": (int, 0, 1 << 40),
}
READ_ONLY_GLOBALS = {"lnd_timeout"}
# lnetctl takes whole seconds; lu2k's daemon also takes fractions for these (minimum shown).
FRACTIONAL_GLOBALS = {"transaction_timeout": 0.001, "recovery_interval": 0.01}
# ``lnetctl set`` names that differ from the YAML key.
SET_ALIASES = {"max_interfaces": "max_intf", "hsensitivity": "health_sensitivity"}

TUNABLES = ("peer_timeout", "peer_credits", "peer_buffer_credits", "credits")
# Bounds of the tunables (lnetctl's -1/0 mean "the default"; lu2k derives the default credits
# from the site profile, see lu2k.settings).
TUNABLE_BOUNDS: dict[str, tuple[int, int]] = {
    "peer_timeout": (-1, 86400), "peer_credits": (0, 1 << 16), "peer_buffer_credits": (0, 1 << 16), "credits": (0, 1 << 20),
}
# Keys ``lnetctl net show -v``/``export`` prints that carry no configuration.
NI_SHOW_KEYS = {
    "status", "statistics", "sent_stats", "received_stats", "dropped_stats", "health stats",
    "health value", "dev cpt", "tcp bonding", "fatal_error", "interfaces_state", "net state",
    "ni selection priority", "udsp info",
}
NET_SHOW_KEYS = {"net selection priority", "status"}
ROUTE_SHOW_KEYS = {"state", "type"}
PEER_SHOW_KEYS = {"peer state", "Multi-Rail", "peer ni"}
BUFFER_KEYS = ("tiny", "small", "large")
LU2K_NET_KEYS = {
    "backend", "port", "listen", "key", "key_file", "cert", "cert_key", "ca", "max_message_size",
    "checksum", "profile", "options", "return_path", "keepalive",
}
LU2K_TOP_KEYS = {"networks", "ip2nets", "routes", "shim", "control", "metrics", "interfaces", "defaults", "serve", "forward"}
PROFILE_BOUNDS = {"rtt_ms": (0.0, 60000.0), "rate_mbit": (0.001, 1e6), "loss": (0.0, 0.5)}
# Net-level and option keys naming files: relative paths are taken from the config file's
# directory (lu2k.settings resolves them).
PATH_KEYS = ("key_file", "cert", "cert_key", "ca")
PATH_OPTIONS = ("cert", "key", "ca", "cert_key", "key_file")


# --- the model ------------------------------------------------------------------------------------


@dataclass
class NiEntry:
    """One ``local NI(s)`` item."""

    nid: Nid | None = None
    interfaces: list[NiSpec] = field(default_factory=list)
    tunables: dict[str, int] = field(default_factory=dict)
    lnd_tunables: dict[str, Any] = field(default_factory=dict)
    cpt: ExprList | None = None


@dataclass
class NetEntry:
    """One ``net`` item: a net, its NIs, net-level tunables and lu2k's options."""

    net: Net
    nis: list[NiEntry] = field(default_factory=list)
    tunables: dict[str, int] = field(default_factory=dict)
    lu2k: dict[str, Any] = field(default_factory=dict)


# A route is :class:`lu2k.routing.Route` (net, gateway, hops, priority): one type for the
# route section, ``routes=`` strings, the daemon settings and the router.
RouteEntry = Route


@dataclass
class PeerEntry:
    primary_nid: Nid
    nids: list[Nid] = field(default_factory=list)
    multi_rail: bool = True
    lu2k: dict[str, Any] = field(default_factory=dict)


@dataclass
class LnetConfig:
    """A validated lnetctl document (plus lu2k's keys)."""

    nets: list[NetEntry] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    route_sensitivity: dict[tuple[Net, Nid], int] = field(default_factory=dict)  # lnetctl's per-route health_sensitivity
    peers: list[PeerEntry] = field(default_factory=list)
    global_: dict[str, int | float] = field(default_factory=dict)
    routing: bool | None = None
    buffers: dict[str, int] = field(default_factory=dict)
    numa_range: int | None = None
    ip2nets: list[Ip2NetsRule] = field(default_factory=list)
    ip2net: list[str] = field(default_factory=list)  # ``net: [{ip2net: "..."}]`` module-parameter strings
    lu2k: dict[str, Any] = field(default_factory=dict)
    shim: ShimConfig | None = None  # lu2k.shim, validated (None: not given)

    def net(self, net: Net) -> NetEntry | None:
        return next((n for n in self.nets if n.net == net), None)


# --- validation helpers ----------------------------------------------------------------------------


_Errors = Problems  # one collector of "<YAML path>: <problem>" for the whole pass


def _int(errs: Problems, where: str, value: Any, lo: int | None = None, hi: int | None = None) -> int | None:
    return errs.check(lambda: as_int(value, where, lo, hi))


def _float(errs: Problems, where: str, value: Any, lo: float, hi: float) -> float | None:
    return errs.check(lambda: as_float(value, where, lo, hi))


def _bool(errs: Problems, where: str, value: Any) -> bool | None:
    return errs.check(lambda: as_bool(value, where))


def _mapping(errs: _Errors, where: str, value: Any) -> Mapping[Any, Any] | None:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errs.add(where, f"expected a mapping, got {type(value).__name__}")
        return None
    return value


def _seq(errs: _Errors, where: str, value: Any) -> list[Any] | None:
    if value is None:
        return []
    if isinstance(value, Mapping):
        # lnetctl writes lists of scalars as {0: a, 1: b}; lists of entries as YAML sequences.
        return [value[k] for k in sorted(value, key=lambda k: (str(type(k)), k))]
    if not isinstance(value, list):
        errs.add(where, f"expected a list, got {type(value).__name__}")
        return None
    return value


def _unknown(errs: _Errors, where: str, m: Mapping[Any, Any], known: Iterable[str]) -> None:
    extra = [k for k in m if k not in set(known)]
    for k in extra:
        errs.add(f"{where}.{k}", "unknown key")


def _net(errs: _Errors, where: str, value: Any) -> Net | None:
    if not isinstance(value, str):
        errs.add(where, f"expected a net name like tcp1, got {value!r}")
        return None
    try:
        return parse_net(value)
    except NidError as e:
        errs.add(where, str(e))
        return None


def _nid(errs: _Errors, where: str, value: Any, resolve: bool) -> Nid | None:
    if not isinstance(value, str):
        errs.add(where, f"expected a NID like 10.0.0.1@tcp, got {value!r}")
        return None
    try:
        return parse_nid(value, resolve=resolve)
    except NidError as e:
        errs.add(where, str(e))
        return None


def _tunables(errs: _Errors, where: str, value: Any) -> dict[str, int]:
    m = _mapping(errs, where, value)
    if m is None:
        return {}
    out: dict[str, int] = {}
    for k, v in m.items():
        if k == "CPT":
            continue  # handled by the caller (a CPT expression, not a number)
        if k not in TUNABLES:
            errs.add(f"{where}.{k}", f"unknown tunable (known: {', '.join(TUNABLES)})")
            continue
        if k == "peer_timeout" and isinstance(v, float):
            fv = _float(errs, f"{where}.{k}", v, 0.0, 86400.0)  # lu2k takes fractions of a second
            if fv is not None:
                out[k] = fv  # type: ignore[assignment]
            continue
        iv = _int(errs, f"{where}.{k}", v, *TUNABLE_BOUNDS[k])
        if iv is not None:
            out[k] = iv
    return out


def _cpt(errs: _Errors, where: str, value: Any) -> ExprList | None:
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if text is None:
        errs.add(where, f"expected a CPT expression like \"[0,1]\", got {value!r}")
        return None
    try:
        el = parse_expr_list(text, 0, 0xFFFFFFFF)
    except NidError as e:
        errs.add(where, str(e))
        return None
    if el.count() == 0:
        errs.add(where, f"{text} names no CPT")
        return None
    return el


# --- sections -----------------------------------------------------------------------------------------


def _finite_options(errs: Problems, where: str, value: Any) -> None:
    """Backend options are the backend's to check, but no number read from the config may
    be NaN or infinite, whoever reads it."""
    if isinstance(value, float):
        errs.check(lambda: as_float(value, where))
    elif isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        errs.add(where, f"expected a finite number, got {value!r}")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _finite_options(errs, f"{where}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite_options(errs, f"{where}[{i}]", v)


def _return_path_keys(errs: Problems, where: str, m: Mapping[str, Any]) -> dict[str, Any]:
    """``return_path`` and ``keepalive`` (a net's or a peer's; see lu2k.core.returnpath)."""
    from .core.returnpath import parse_path_settings

    if errs.check(lambda: parse_path_settings(m, where)) is None:
        return {}
    return {k: m[k] for k in ("return_path", "keepalive") if k in m}


def _lu2k_net(errs: Problems, where: str, value: Any) -> dict[str, Any]:
    """A net's ``lu2k:`` block (or ``lu2k.defaults``), every value checked once, here."""
    m = _mapping(errs, where, value)
    if m is None:
        return {}
    _unknown(errs, where, m, LU2K_NET_KEYS)
    out: dict[str, Any] = {}
    out.update(_return_path_keys(errs, where, m))
    if "backend" in m:
        # Only the shape here: whether the backend exists and loads on this host is
        # ``lu2kd --check``'s question (it may need an optional dependency).
        if not isinstance(m["backend"], str) or not m["backend"]:
            errs.add(f"{where}.backend", f"expected a backend name like tcp, got {m['backend']!r}")
        else:
            out["backend"] = m["backend"]
    if "port" in m:
        v = errs.check(lambda: as_port(m["port"], f"{where}.port"))
        if v is not None:
            out["port"] = v
    if "max_message_size" in m:
        v = _int(errs, f"{where}.max_message_size", m["max_message_size"], 0, 64 << 20)
        if v is not None:
            out["max_message_size"] = v
    if "listen" in m:
        bind = errs.check(lambda: parse_host(m["listen"], f"{where}.listen", what="a bind address (an IP address such as 0.0.0.0, :: or fd00::1)"))
        if bind is not None:
            out["listen"] = str(bind)
    for k in PATH_KEYS:
        if k in m:
            t = errs.check(lambda: as_str(m[k], f"{where}.{k}"))
            if t is not None:
                out[k] = t
    if "key" in m:
        if errs.check(lambda: parse_key(m["key"], f"{where}.key")) is not None:
            out["key"] = m["key"]
    if "key" in m and "key_file" in m:
        errs.add(where, "give key or key_file, not both")
    if "checksum" in m:
        b = _bool(errs, f"{where}.checksum", m["checksum"])
        if b is not None:
            out["checksum"] = b
    if "profile" in m:
        p = _mapping(errs, f"{where}.profile", m["profile"])
        if p is not None:
            _unknown(errs, f"{where}.profile", p, PROFILE_BOUNDS)
            prof: dict[str, float] = {}
            for k, (lo, hi) in PROFILE_BOUNDS.items():
                if k not in p:
                    continue
                w = f"{where}.profile.{k}"
                if k == "rate_mbit":
                    # a number of Mbit/s, or a rate with its unit ("20mbit", "500kbit")
                    bps = errs.check(lambda: parse_rate(p[k], w, number_unit=1e6))
                    f = None if bps is None else _float(errs, w, bps / 1e6, lo, hi)
                else:
                    f = _float(errs, w, p[k], lo, hi)
                if f is not None:
                    prof[k] = f
            out["profile"] = prof
    if "options" in m:
        o = _mapping(errs, f"{where}.options", m["options"])
        if o is not None:
            _finite_options(errs, f"{where}.options", o)
            for k in PATH_OPTIONS:
                if k in o:
                    errs.check(lambda: as_str(o[k], f"{where}.options.{k}", what="a file path"))
            out["options"] = dict(o)
    return out


def _parse_ni(errs: _Errors, where: str, item: Any, net: Net | None, resolve: bool) -> NiEntry | None:
    m = _mapping(errs, where, item)
    if m is None:
        return None
    _unknown(errs, where, m, {"nid", "interfaces", "tunables", "lnd tunables", "CPT"} | NI_SHOW_KEYS)
    ni = NiEntry()
    if "nid" in m:
        ni.nid = _nid(errs, f"{where}.nid", m["nid"], resolve)
        if ni.nid is not None and net is not None and ni.nid.net != net:
            errs.add(f"{where}.nid", f"NID {ni.nid} is not on net {net}")
    if "interfaces" in m:
        items = _seq(errs, f"{where}.interfaces", m["interfaces"])
        for i, it in enumerate(items or []):
            try:
                ni.interfaces.append(parse_interface_item(it))
            except NidError as e:
                errs.add(f"{where}.interfaces[{i}]", str(e))
        if items == []:
            errs.add(f"{where}.interfaces", "empty interface list")
    if net is not None and net.type != "lo" and "nid" not in m and "interfaces" not in m:
        if net.info.addr == ADDR_IP:
            errs.add(where, "an NI needs a nid or interfaces")
    if "tunables" in m:
        ni.tunables = _tunables(errs, f"{where}.tunables", m["tunables"])
        tm = m["tunables"] if isinstance(m["tunables"], Mapping) else {}
        if "CPT" in tm:
            ni.cpt = _cpt(errs, f"{where}.tunables.CPT", tm["CPT"])
    if "lnd tunables" in m:
        lt = _mapping(errs, f"{where}.lnd tunables", m["lnd tunables"])
        for k, v in (lt or {}).items():
            if isinstance(v, (Mapping, list)):
                errs.add(f"{where}.lnd tunables.{k}", "expected a scalar")
            else:
                ni.lnd_tunables[str(k)] = v
    if "CPT" in m:
        ni.cpt = _cpt(errs, f"{where}.CPT", m["CPT"])
    return ni


def _parse_net(errs: _Errors, where: str, item: Any, resolve: bool) -> NetEntry | None:
    m = _mapping(errs, where, item)
    if m is None:
        return None
    _unknown(errs, where, m, {"net type", "local NI(s)", "tunables", "lu2k", "ip2net"} | NET_SHOW_KEYS)
    if "ip2net" in m and "net type" not in m:
        return None  # an lnetctl ``ip2net:`` string entry; parse_data reads it
    if "net type" not in m:
        errs.add(where, "missing 'net type'")
        return None
    net = _net(errs, f"{where}.net type", m["net type"])
    entry = NetEntry(net) if net is not None else None
    nis = _seq(errs, f"{where}.local NI(s)", m.get("local NI(s)"))
    if nis == [] and net is not None and net.type != "lo":
        errs.add(f"{where}.local NI(s)", "needs at least one NI (nid or interfaces)")
    for i, it in enumerate(nis or []):
        ni = _parse_ni(errs, f"{where}.local NI(s)[{i}]", it, net, resolve)
        if ni is not None and entry is not None:
            entry.nis.append(ni)
    if "tunables" in m:
        t = _tunables(errs, f"{where}.tunables", m["tunables"])
        if entry is not None:
            entry.tunables = t
    if "lu2k" in m:
        opts = _lu2k_net(errs, f"{where}.lu2k", m["lu2k"])
        if entry is not None:
            entry.lu2k = opts
    return entry


def _is_expression(gw: str) -> bool:
    return any(c in gw for c in "[*") or " " in gw.strip()


def _parse_route(errs: Problems, where: str, item: Any, resolve: bool,
                 sensitivity: dict[tuple[Net, Nid], int] | None = None) -> list[Route]:
    m = _mapping(errs, where, item)
    if m is None:
        return []
    _unknown(errs, where, m, {"net", "gateway", "hop", "priority", "health_sensitivity"} | ROUTE_SHOW_KEYS)
    net = _net(errs, f"{where}.net", m["net"]) if "net" in m else None
    if "net" not in m:
        errs.add(where, "missing 'net'")
    elif net is not None and net.type == "lo":
        errs.add(f"{where}.net", "no routes to 'lo'")
        net = None
    gateways: list[Nid] = []
    if "gateway" not in m:
        errs.add(where, "missing 'gateway'")
    elif not isinstance(m["gateway"], str):
        errs.add(f"{where}.gateway", f"expected a NID, got {m['gateway']!r}")
    else:
        gw = m["gateway"]
        try:
            if _is_expression(gw):
                # lnetctl route add --gateway takes a NID list expression
                gateways = NidList.parse(gw).expand(limit=1024)
            else:
                gateways = [parse_nid(gw, resolve=resolve)]
        except NidError as e:
            errs.add(f"{where}.gateway", str(e))
        for g in gateways:
            if g.net.type == "lo":
                errs.add(f"{where}.gateway", "a gateway cannot be on 'lo'")
                gateways = []
                break
            if net is not None and g.net == net:
                # lnet_add_route refuses it: "LNET_NID_NET(gateway) == net" is -EINVAL.
                errs.add(f"{where}.gateway", f"gateway {g} is on {net}, the net the route leads to")
                gateways = []
                break
    hop: int | None = None
    if "hop" in m:
        h = _int(errs, f"{where}.hop", m["hop"], -1, 255)
        if h == 0:
            errs.add(f"{where}.hop", "invalid hop count 0, must be between 1 and 255 (or -1)")
        elif h is not None and h != -1:
            hop = h
    prio = 0
    if "priority" in m:
        p = _int(errs, f"{where}.priority", m["priority"], -1, 0x7FFFFFFF)
        prio = 0 if p in (None, -1) else p
    hs = None
    if "health_sensitivity" in m:
        hs = _int(errs, f"{where}.health_sensitivity", m["health_sensitivity"], 0, 1000)
    if net is None:
        return []
    if hs is not None and sensitivity is not None:
        for g in gateways:
            sensitivity[(net, g)] = hs
    return [Route(net, g, hop, prio) for g in gateways]


def _parse_peer(errs: _Errors, where: str, item: Any, resolve: bool) -> PeerEntry | None:
    m = _mapping(errs, where, item)
    if m is None:
        return None
    _unknown(errs, where, m, {"primary nid", "non_mr", "lu2k"} | PEER_SHOW_KEYS)
    if "primary nid" not in m:
        errs.add(where, "missing 'primary nid'")
        return None
    prim = _nid(errs, f"{where}.primary nid", m["primary nid"], resolve)
    mr = True
    if "Multi-Rail" in m:
        b = _bool(errs, f"{where}.Multi-Rail", m["Multi-Rail"])
        mr = True if b is None else b
    if "non_mr" in m:
        mr = False
    nids: list[Nid] = []
    items = _seq(errs, f"{where}.peer ni", m.get("peer ni"))
    for i, it in enumerate(items or []):
        w = f"{where}.peer ni[{i}]"
        if isinstance(it, Mapping):
            if "nid" not in it:
                errs.add(w, "missing 'nid'")
                continue
            n = _nid(errs, f"{w}.nid", it["nid"], resolve)
        else:
            n = _nid(errs, w, it, resolve)
        if n is not None and n not in nids:
            nids.append(n)
    lu = {}
    if "lu2k" in m:
        lm = _mapping(errs, f"{where}.lu2k", m["lu2k"])
        if lm is not None:
            _unknown(errs, f"{where}.lu2k", lm, {"address", "return_path", "keepalive"})
            lu.update(_return_path_keys(errs, f"{where}.lu2k", lm))
            if "address" in lm:
                if errs.check(lambda: as_address(lm["address"], f"{where}.lu2k.address")) is not None:
                    lu["address"] = lm["address"]
    if prim is None:
        return None
    if prim not in nids:
        nids.insert(0, prim)
    return PeerEntry(prim, nids, mr, lu)


def _parse_ip2nets_rule(errs: _Errors, where: str, item: Any) -> Ip2NetsRule | None:
    m = _mapping(errs, where, item)
    if m is None:
        return None
    _unknown(errs, where, m, {"net-spec", "interfaces", "ip-range", "tunables", "lnd tunables", "CPT"})
    if "net-spec" not in m:
        errs.add(where, "missing 'net-spec'")
        return None
    net = _net(errs, f"{where}.net-spec", m["net-spec"])
    nis: list[NiSpec] = []
    for i, it in enumerate(_seq(errs, f"{where}.interfaces", m.get("interfaces")) or []):
        try:
            nis.append(parse_interface_item(it))
        except NidError as e:
            errs.add(f"{where}.interfaces[{i}]", str(e))
    ranges, texts = [], []
    for i, it in enumerate(_seq(errs, f"{where}.ip-range", m.get("ip-range")) or []):
        if not isinstance(it, str):
            errs.add(f"{where}.ip-range[{i}]", f"expected an IP range like 192.168.*.*, got {it!r}")
            continue
        try:
            ranges.append(parse_ip_pattern(it))
            texts.append(it)
        except NidError as e:
            errs.add(f"{where}.ip-range[{i}]", str(e))
    if "tunables" in m:
        _tunables(errs, f"{where}.tunables", m["tunables"])
    if net is None:
        return None
    return Ip2NetsRule(net, tuple(nis), tuple(ranges), tuple(texts))


def _parse_globals(errs: _Errors, where: str, value: Any) -> dict[str, int | float]:
    m = _mapping(errs, where, value)
    out: dict[str, int | float] = {}
    for k, v in (m or {}).items():
        if k in FRACTIONAL_GLOBALS and isinstance(v, float) and not v.is_integer():
            fv = _float(errs, f"{where}.{k}", v, FRACTIONAL_GLOBALS[k], 86400.0)
            if fv is not None:
                out[k] = fv
        elif k in LNET_GLOBALS:
            lo, hi = LNET_GLOBALS[k]
            iv = _int(errs, f"{where}.{k}", v, lo, hi)
            if iv is not None:
                out[k] = iv
        elif k in LU2K_GLOBALS:
            kind, flo, fhi = LU2K_GLOBALS[k]
            fv = _float(errs, f"{where}.{k}", v, flo, fhi)
            if fv is not None:
                out[k] = int(fv) if kind is int else fv
        else:
            errs.add(f"{where}.{k}", f"unknown global setting (known: {', '.join(sorted(LNET_GLOBALS) + sorted(LU2K_GLOBALS))})")
    rc, tt = out.get("retry_count"), out.get("transaction_timeout")
    if rc is not None and tt is not None and rc >= tt:
        errs.add(f"{where}.retry_count", f"retry_count {rc} must be less than transaction_timeout {tt}")
    rmin, rmax = out.get("reconnect_min"), out.get("reconnect_max")
    if rmin is not None and rmax is not None and rmin > rmax:
        errs.add(f"{where}.reconnect_min", "reconnect_min is larger than reconnect_max")
    return out


def _parse_lu2k_top(errs: _Errors, where: str, value: Any) -> dict[str, Any]:
    m = _mapping(errs, where, value)
    if m is None:
        return {}
    _unknown(errs, where, m, LU2K_TOP_KEYS)
    out: dict[str, Any] = {}
    for k in ("networks", "ip2nets", "routes"):
        if k not in m or m[k] is None:
            continue
        text = m[k]
        if not isinstance(text, str):
            errs.add(f"{where}.{k}", f"expected a string like a module parameter, got {text!r}")
            continue
        try:
            if k == "networks":
                parse_networks(text)
            elif k == "ip2nets":
                check_ip2nets(text)
            else:
                parse_routes(text)
            out[k] = text
        except ConfigError as e:
            errs.add(f"{where}.{k}", str(e).replace("\n", " ").replace("  ", " "))
    if out.get("networks") and out.get("ip2nets"):
        errs.add(where, "Please specify EITHER 'networks' or 'ip2nets' but not both at once")
    if "defaults" in m:
        # lu2k options for the nets the legacy strings and ip2nets rules create
        out["defaults"] = _lu2k_net(errs, f"{where}.defaults", m["defaults"])
    for k in ("shim", "control", "metrics", "serve", "forward"):  # serve/forward: checked by lu2k.apps.services
        if k in m:
            sm = _mapping(errs, f"{where}.{k}", m[k])
            if sm is not None:
                out[k] = dict(sm)
    if "interfaces" in m:
        # A host description for resolving on another machine (tests, lu2kctl import --dry-run).
        items = _seq(errs, f"{where}.interfaces", m["interfaces"])
        pairs = []
        for i, it in enumerate(items or []):
            if isinstance(it, Mapping) and "name" in it and "ip" in it:
                pairs.append((it["name"], it["ip"], it.get("up", True)))
            else:
                errs.add(f"{where}.interfaces[{i}]", "expected {name: eth0, ip: 10.0.0.1}")
        try:
            host_interfaces(pairs)
            out["interfaces"] = pairs
        except ConfigError as e:
            errs.add(f"{where}.interfaces", str(e))
    return out


def parse_data(data: Any, *, source: str = "<yaml>", resolve: bool = True, complete: bool = False) -> LnetConfig:
    """Validate a loaded YAML document; raise ConfigError listing every problem.

    ``resolve=False`` refuses host names in NIDs instead of looking them up.  ``complete``
    says the document is a node's whole configuration (not a fragment to import into one):
    then routes must go through a gateway on one of its nets, when its nets are all explicit.
    """
    errs = _Errors()
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("the top level must be a mapping of sections", where=source)
    cfg = LnetConfig()
    for key in data:
        if key not in SECTIONS:
            errs.add(str(key), f"unknown section (known: {', '.join(SECTIONS)})")
    for i, item in enumerate(_seq(errs, "net", data.get("net")) or []):
        if isinstance(item, Mapping) and "ip2net" in item:
            # lnetctl's handle_yaml_config_ni passes this string to the kernel's ip2nets parser
            text = item["ip2net"]
            if not isinstance(text, str):
                errs.add(f"net[{i}].ip2net", f"expected an ip2nets string, got {text!r}")
            else:
                try:
                    check_ip2nets(text)
                    cfg.ip2net.append(text)
                except ConfigError as e:
                    errs.add(f"net[{i}].ip2net", str(e).replace("\n", " "))
            if "net type" in item:
                errs.add(f"net[{i}]", "give either 'net type' or 'ip2net'")
            continue
        entry = _parse_net(errs, f"net[{i}]", item, resolve)
        if entry is None:
            continue
        if entry.net.type == "lo":
            continue  # lnetctl exports lo; it is implicit
        if cfg.net(entry.net) is not None:
            # lnetctl import adds the NIs of a repeated net to it
            cfg.net(entry.net).nis.extend(entry.nis)  # type: ignore[union-attr]
            if entry.lu2k:
                errs.add(f"net[{i}].lu2k", f"net {entry.net} already has lu2k options in an earlier entry")
        else:
            cfg.nets.append(entry)
    for i, item in enumerate(_seq(errs, "route", data.get("route")) or []):
        cfg.routes.extend(_parse_route(errs, f"route[{i}]", item, resolve, cfg.route_sensitivity))
    for i, item in enumerate(_seq(errs, "peer", data.get("peer")) or []):
        p = _parse_peer(errs, f"peer[{i}]", item, resolve)
        if p is not None:
            cfg.peers.append(p)
    if "global" in data:
        cfg.global_ = _parse_globals(errs, "global", data["global"])
    for sect, key in (("routing", "enable"), ("discovery", "enable")):
        if sect in data:
            m = _mapping(errs, sect, data[sect])
            if m is not None:
                _unknown(errs, sect, m, {key, "seq_no"})
                if key in m:
                    b = _bool(errs, f"{sect}.{key}", m[key])
                    if b is not None and sect == "routing":
                        cfg.routing = b
                    elif b is not None:
                        cfg.global_["discovery"] = int(b)
    if "buffers" in data:
        m = _mapping(errs, "buffers", data["buffers"])
        if m is not None:
            _unknown(errs, "buffers", m, BUFFER_KEYS)
            for k in BUFFER_KEYS:
                if k in m:
                    v = _int(errs, f"buffers.{k}", m[k], 0, 1 << 24)
                    if v is not None:
                        cfg.buffers[k] = v
    if "numa" in data:
        m = _mapping(errs, "numa", data["numa"])
        if m is not None:
            _unknown(errs, "numa", m, {"range"})
            if "range" in m:
                cfg.numa_range = _int(errs, "numa.range", m["range"], 0, None)
    if data.get("udsp"):
        errs.add("udsp", "UDSP rules are not supported by lu2k")
    for i, item in enumerate(_seq(errs, "ip2nets", data.get("ip2nets")) or []):
        rule = _parse_ip2nets_rule(errs, f"ip2nets[{i}]", item)
        if rule is not None:
            cfg.ip2nets.append(rule)
    if "lu2k" in data:
        cfg.lu2k = _parse_lu2k_top(errs, "lu2k", data["lu2k"])
        if "shim" in cfg.lu2k:
            cfg.shim = ShimConfig.from_mapping(cfg.lu2k["shim"], errs, "lu2k.shim")
        if "control" in cfg.lu2k:
            ctl = cfg.lu2k["control"]
            _unknown(errs, "lu2k.control", ctl, {"path"})
            if "path" in ctl:
                errs.check(lambda: as_str(ctl["path"], "lu2k.control.path", what="a socket path"))
    _check_duplicates(errs, cfg)
    if complete and not (cfg.ip2nets or cfg.ip2net or cfg.lu2k.get("networks") or cfg.lu2k.get("ip2nets")):
        for r in cfg.routes:
            if cfg.net(r.gateway.net) is None:
                errs.add("route", f"route to {r.net}: gateway {r.gateway} is not on a local net")
    if errs.items:
        raise ConfigError(f"{len(errs.items)} error(s) in configuration", where=source, errors=errs.items)
    return cfg


def _check_duplicates(errs: _Errors, cfg: LnetConfig) -> None:
    for i, n in enumerate(cfg.nets):
        nids: set[Nid] = set()
        ifs: set[str] = set()
        for j, ni in enumerate(n.nis):
            if ni.nid is not None:
                if ni.nid in nids:
                    errs.add(f"net[{i}].local NI(s)[{j}].nid", f"NID {ni.nid} configured twice")
                nids.add(ni.nid)
            for it in ni.interfaces:
                if it.interface in ifs:
                    errs.add(f"net[{i}].local NI(s)[{j}].interfaces", f"interface {it.interface} used twice on net {n.net}")
                ifs.add(it.interface or "")
    seen: set[tuple[Net, Nid]] = set()
    for r in cfg.routes:
        if (r.net, r.gateway) in seen:
            errs.add("route", f"route to {r.net} via {r.gateway} given twice")
        seen.add((r.net, r.gateway))
        if cfg.net(r.net) is not None:
            errs.add("route", f"route to {r.net}, which is a local net")
    prims: set[Nid] = set()
    owner: dict[Nid, Nid] = {}  # a NID is one peer's: else the daemon could not tell whose session it is
    for p in cfg.peers:
        if p.primary_nid in prims:
            errs.add("peer", f"peer {p.primary_nid} given twice")
        prims.add(p.primary_nid)
        for pn in p.nids:
            if owner.setdefault(pn, p.primary_nid) != p.primary_nid:
                errs.add("peer", f"NID {pn} is a peer ni of both {owner[pn]} and {p.primary_nid}")


def loads(text: str, *, source: str = "<yaml>", resolve: bool = True) -> LnetConfig:
    """Parse and validate YAML text."""
    try:
        # libyaml's loader when PyYAML was built with it: same results, ~10x faster.
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", where=source) from None
    return parse_data(data, source=source, resolve=resolve)


def load(path: str, *, resolve: bool = True) -> LnetConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", where=path) from None
    return loads(text, source=path, resolve=resolve)


# --- export -------------------------------------------------------------------------------------------


def _indexed(items: Sequence[str]) -> dict[int, str]:
    return {i: s for i, s in enumerate(items)}


def _cpt_str(el: ExprList) -> str:
    s = str(el)
    return s if s.startswith("[") else f"[{s}]"


def to_data(cfg: LnetConfig) -> dict[str, Any]:
    """The document as plain data, in lnetctl's shape (what :func:`dumps` prints)."""
    out: dict[str, Any] = {}
    if cfg.nets or cfg.ip2net:
        nets: list[dict[str, Any]] = [{"ip2net": text} for text in cfg.ip2net]
        for n in cfg.nets:
            entry: dict[str, Any] = {"net type": str(n.net)}
            nis = []
            for ni in n.nis:
                d: dict[str, Any] = {}
                if ni.nid is not None:
                    d["nid"] = str(ni.nid)
                if ni.interfaces:
                    d["interfaces"] = _indexed(
                        [(x.interface or "") + (_cpt_str(x.cpts) if x.cpts is not None else "") for x in ni.interfaces]
                    )
                if ni.tunables:
                    d["tunables"] = dict(ni.tunables)
                if ni.lnd_tunables:
                    d["lnd tunables"] = dict(ni.lnd_tunables)
                if ni.cpt is not None:
                    d["CPT"] = _cpt_str(ni.cpt)
                nis.append(d)
            entry["local NI(s)"] = nis
            if n.tunables:
                entry["tunables"] = dict(n.tunables)
            if n.lu2k:
                entry["lu2k"] = dict(n.lu2k)
            nets.append(entry)
        out["net"] = nets
    if cfg.routes:
        routes = []
        for r in cfg.routes:
            d = {"net": str(r.net), "gateway": str(r.gateway), "hop": -1 if r.hops is None else r.hops, "priority": r.priority}
            if (r.net, r.gateway) in cfg.route_sensitivity:
                d["health_sensitivity"] = cfg.route_sensitivity[(r.net, r.gateway)]
            routes.append(d)
        out["route"] = routes
    if cfg.peers:
        peers = []
        for p in cfg.peers:
            d2: dict[str, Any] = {
                "primary nid": str(p.primary_nid),
                "Multi-Rail": p.multi_rail,
                "peer ni": [{"nid": str(n)} for n in p.nids],
            }
            if p.lu2k:
                d2["lu2k"] = dict(p.lu2k)
            peers.append(d2)
        out["peer"] = peers
    if cfg.routing is not None:
        out["routing"] = {"enable": int(cfg.routing)}
    if cfg.buffers:
        out["buffers"] = dict(cfg.buffers)
    if cfg.numa_range is not None:
        out["numa"] = {"range": cfg.numa_range}
    if cfg.global_:
        out["global"] = dict(cfg.global_)
    if cfg.ip2nets:
        rules = []
        for rule in cfg.ip2nets:
            d3: dict[str, Any] = {"net-spec": str(rule.net)}
            if rule.interfaces:
                d3["interfaces"] = _indexed(
                    [(x.interface or "") + (_cpt_str(x.cpts) if x.cpts is not None else "") for x in rule.interfaces]
                )
            if rule.range_texts:
                d3["ip-range"] = _indexed(list(rule.range_texts))
            rules.append(d3)
        out["ip2nets"] = rules
    if cfg.lu2k:
        out["lu2k"] = dict(cfg.lu2k)
    return out


def dumps(cfg: LnetConfig) -> str:
    """YAML in ``lnetctl export``'s layout; :func:`loads` reads it back to an equal config."""
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(to_data(cfg), Dumper=dumper, sort_keys=False, default_flow_style=False, width=1000)


# --- resolution against a host ----------------------------------------------------------------------------


@dataclass
class ResolvedNi:
    nid: Nid
    interface: str | None = None
    cpts: ExprList | None = None
    tunables: dict[str, int] = field(default_factory=dict)


@dataclass
class ResolvedNet:
    net: Net
    nis: list[ResolvedNi] = field(default_factory=list)
    lu2k: dict[str, Any] = field(default_factory=dict)
    origin: str = "net"  # "net", "networks", "ip2nets" (string) or "ip2nets rules"


@dataclass
class Resolved:
    """What the configuration means on one host."""

    nets: list[ResolvedNet]
    routes: list[Route]
    router: bool
    notes: list[str]

    def local_nids(self) -> list[Nid]:
        return [ni.nid for n in self.nets for ni in n.nis]


def resolve(cfg: LnetConfig, interfaces: Iterable[InterfaceLike] | None = None, *, cpt_count: int | None = None) -> Resolved:
    """Apply the config to a host whose interfaces are ``(name, ipv4[, up])`` in detection
    order (default: ``lu2k.interfaces`` of the document, else none).  Raises ConfigError
    listing every problem; returns the concrete NIs (with NIDs) and routes."""
    if interfaces is None:
        interfaces = cfg.lu2k.get("interfaces", [])
    ifaces = host_interfaces(interfaces)
    by_name = {h.name: h for h in ifaces}
    errors: list[str] = []
    notes: list[str] = []
    nets: list[ResolvedNet] = []

    def get(net: Net, origin: str) -> ResolvedNet:
        for n in nets:
            if n.net == net:
                return n
        rn = ResolvedNet(net, origin=origin)
        nets.append(rn)
        return rn

    def add(rn: ResolvedNet, ni: ResolvedNi, where: str) -> None:
        for other in rn.nis:
            if other.nid == ni.nid:
                errors.append(f"{where}: NID {ni.nid} already configured")
                return
        rn.nis.append(ni)

    for i, n in enumerate(cfg.nets):
        rn = get(n.net, "net")
        rn.lu2k = dict(n.lu2k)
        for j, ni in enumerate(n.nis):
            where = f"net[{i}].local NI(s)[{j}]"
            tun = {**n.tunables, **ni.tunables}
            if not ni.interfaces:
                if ni.nid is not None:
                    add(rn, ResolvedNi(ni.nid, None, ni.cpt, tun), where)
                continue
            if n.net.info.addr != ADDR_IP:
                errors.append(f"{where}: net {n.net} has no IP interfaces")
                continue
            for it in ni.interfaces:
                h = by_name.get(it.interface or "")
                if h is None:
                    errors.append(f"{where}.interfaces: interface {it.interface!r} does not exist on this host")
                    continue
                if not h.up:
                    # the LND's lnet_inet_select: "failed to find UP interface <name>"
                    errors.append(f"{where}.interfaces: interface {it.interface!r} is down (LNet uses only UP interfaces)")
                    continue
                # lnetctl derives the NID from the interface's address; a given NID must agree.
                nid = Nid(h.ip, n.net)
                if ni.nid is not None and ni.nid != nid and len(ni.interfaces) == 1:
                    errors.append(f"{where}.nid: {ni.nid} is not the address of {it.interface} ({h.ip})")
                    continue
                add(rn, ResolvedNi(nid, it.interface, it.cpts or ni.cpt, tun), where)

    legacy: list[tuple[str, list[NetSpec]]] = []
    try:
        if cfg.lu2k.get("networks"):
            legacy.append(("networks", resolve_interfaces(parse_networks(cfg.lu2k["networks"], cpt_count=cpt_count), ifaces)))
        if cfg.lu2k.get("ip2nets"):
            legacy.append(("ip2nets", ip2nets(cfg.lu2k["ip2nets"], ifaces, cpt_count=cpt_count)))
        for text in cfg.ip2net:
            legacy.append(("ip2net", ip2nets(text, ifaces, cpt_count=cpt_count)))
    except ConfigError as e:
        errors.append(f"lu2k: {e}".replace("\n", " "))
        errors.extend(e.errors)
    if cfg.ip2nets:
        try:
            specs, rule_notes = ip2nets_rules(cfg.ip2nets, ifaces)
            notes.extend(rule_notes)
            legacy.append(("ip2nets rules", specs))
        except ConfigError as e:
            errors.append(str(e).split("\n")[0])
            errors.extend(e.errors)
    for origin, specs in legacy:
        for spec in specs:
            rn = get(spec.net, origin)
            for nis in spec.nis:
                if nis.interface is None or spec.net.info.addr != ADDR_IP:
                    errors.append(f"{origin}: net {spec.net} needs an IP interface (numeric-address nets are not supported)")
                    continue
                add(rn, ResolvedNi(Nid(by_name[nis.interface].ip, spec.net), nis.interface, nis.cpts or spec.cpts), origin)

    for rn in nets:
        if not rn.nis:
            errors.append(f"net {rn.net}: no NI could be configured")

    local = [ni.nid for n in nets for ni in n.nis]
    local_nets = {n.net for n in nets}
    routes: list[Route] = []
    router = bool(cfg.routing)
    for r in cfg.routes:
        if r.gateway in local:
            router = True
            continue
        if r.net in local_nets:
            errors.append(f"route to {r.net} via {r.gateway}: {r.net} is a local net")
        elif r.gateway.net not in local_nets:
            errors.append(f"route to {r.net} via {r.gateway}: the gateway is not on a local net")
        else:
            routes.append(r)
    if cfg.lu2k.get("routes"):
        try:
            parsed = parse_routes(cfg.lu2k["routes"], local)
        except ConfigError as e:
            errors.append(f"lu2k.routes: {e}".replace("\n", " "))
        else:
            router = router or parsed.router
            keep, dropped = parsed.installable(local)
            for route, why in dropped:
                notes.append(f"lu2k.routes: {route_text(route)} ignored: {why}")
            for route in keep:
                if any(x.net == route.net and x.gateway == route.gateway for x in routes):
                    continue
                routes.append(route)
    if errors:
        raise ConfigError(f"{len(errors)} error(s) applying the configuration to this host", where="resolve", errors=errors)
    return Resolved(nets, routes, router, notes)


def apply_set(cfg: LnetConfig, name: str, value: Any) -> LnetConfig:
    """``lnetctl set <name> <value>`` on a copy of ``cfg``: validated, never half-applied.

    Besides the ``global`` keys this takes ``routing`` (0/1), ``tiny_buffers``,
    ``small_buffers``, ``large_buffers`` and lnetctl's alias names."""
    import copy

    name = SET_ALIASES.get(name, name)
    new = copy.deepcopy(cfg)
    errs = _Errors()
    if name == "routing":
        b = _bool(errs, "routing", value)
        if b is not None:
            new.routing = b
    elif name in ("tiny_buffers", "small_buffers", "large_buffers"):
        v = _int(errs, name, value, 0, 1 << 24)
        if v is not None:
            new.buffers[name.split("_")[0]] = v
    elif name in READ_ONLY_GLOBALS:
        errs.add(name, "is derived by Lustre and cannot be set")
    elif name in LNET_GLOBALS or name in LU2K_GLOBALS:
        merged = {**new.global_, name: value}
        new.global_ = _parse_globals(errs, "global", merged)
    else:
        errs.add(name, "unknown setting")
    if errs.items:
        raise ConfigError(f"cannot set {name}", where="set", errors=errs.items)
    return new


__all__ = [
    "LnetConfig", "NetEntry", "NiEntry", "PeerEntry", "Resolved", "ResolvedNet", "ResolvedNi", "RouteEntry",
    "apply_set", "dumps", "load", "loads", "parse_data", "resolve", "to_data",
]
