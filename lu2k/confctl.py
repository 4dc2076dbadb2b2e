"""lnetctl-style configuration of a running lu2kd: ``import``, ``export``, ``net add|del``,
``route add|del``, ``peer add|del``, ``set`` (the daemon's side of those lu2kctl commands).

Every command works on the daemon's configuration *document* (the lnetctl-shaped YAML it
was started from, see :mod:`lu2k.lnetyaml`): it builds the whole new document, validates it
exactly as a config file is validated (schema, host resolution, daemon settings), and only
then changes the engine.  Applying is done in an order that can be undone -- nets that go
away or change are stopped first, new ones started, and if starting one fails (its port is
taken, its backend cannot load) the nets started are stopped and the old ones restarted --
so a running daemon is never left half-configured.  Routes, peers and globals are swapped
in one step once the nets are up.  Commands are serialised.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import replace
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from .errors import ConfigError, Lu2kError
from .lnetyaml import SET_ALIASES, apply_set, dumps, parse_data
from .nid import Net, NidList, parse_net, parse_nid
from .settings import DEFAULT_CONFIG_YAML, DaemonConfig, NetConfig, parse_config
from .socklnd.attach import is_lan
from .values import HIDDEN_KEY

if TYPE_CHECKING:
    from .engine import Engine
    from .socklnd.attach import LanNets


class ControlRegistry(Protocol):
    def register(self, name: str, fn: Callable[[dict[str, Any]], Awaitable[Any]]) -> None: ...


class Daemon(Protocol):
    """What the configuration commands need of the daemon that runs them (lu2k.daemon.Daemon
    is one; naming it by shape keeps the daemon -> confctl import one way)."""

    config: DaemonConfig

    @property
    def engine(self) -> "Engine": ...

    @property
    def control(self) -> ControlRegistry: ...

SECRET_KEYS = ("key",)


def document_from_config(cfg: DaemonConfig) -> dict[str, Any]:
    """An lnetctl-shaped document equivalent to a daemon config built without a file."""
    nets = []
    for n in cfg.nets:
        lu: dict[str, Any] = {
            "backend": n.backend, "port": n.port, "key": "hex:" + n.key.hex(),
            "max_message_size": n.max_message_size, "checksum": n.checksum,
        }
        if n.listen:
            lu["listen"] = n.listen
        prof = {k: v for k, v in vars(n.profile).items() if v is not None}
        if prof:
            lu["profile"] = prof
        if n.options:
            lu["options"] = dict(n.options)
        nets.append({
            "net type": str(n.net),
            "local NI(s)": [{"nid": str(n.nid), "tunables": {"peer_timeout": n.peer_timeout, "peer_credits": n.peer_credits, "credits": n.credits}}],
            "lu2k": lu,
        })
    doc: dict[str, Any] = {"net": nets}
    if cfg.peers:
        doc["peer"] = [
            {"primary nid": str(p.nid), "peer ni": [{"nid": str(p.nid)}], **({"lu2k": {"address": p.address}} if p.address else {})}
            for p in cfg.peers
        ]
    if cfg.routes:
        doc["route"] = [
            {"net": str(r.net), "gateway": str(r.gateway), "hop": -1 if r.hops is None else r.hops, "priority": r.priority}
            for r in cfg.routes
        ]
    doc["global"] = dict(vars(cfg.global_))
    doc["routing"] = {"enable": int(cfg.routing)}
    shim = cfg.shim.to_data()
    doc["lu2k"] = {"shim": shim, "control": {"path": cfg.control_path}}
    return doc


def load_document(cfg: DaemonConfig) -> tuple[dict[str, Any], Path | None]:
    """The document ``cfg`` came from: its file if it has one, the embedded default, or one
    rebuilt from ``cfg``; with the paths the daemon actually uses for its sockets."""
    base: Path | None = None
    doc: Any = None
    if cfg.source == "<embedded default>":
        doc = yaml.safe_load(DEFAULT_CONFIG_YAML)
    else:
        p = Path(cfg.source)
        if p.is_file():
            try:
                doc = yaml.safe_load(p.read_text())
                base = p.parent
            except (OSError, yaml.YAMLError):
                doc = None
    if not isinstance(doc, dict):
        doc = document_from_config(cfg)
    lu = doc.setdefault("lu2k", {}) or {}
    doc["lu2k"] = lu
    lu.setdefault("shim", {})
    lu["shim"] = {**(lu["shim"] or {}), "path": cfg.shim.path}
    lu["control"] = {**(lu.get("control") or {}), "path": cfg.control_path}
    return doc, base


def _hide_secrets(doc: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    for n in out.get("net") or []:
        lu = n.get("lu2k") if isinstance(n, dict) else None
        if isinstance(lu, dict):
            for k in SECRET_KEYS:
                if k in lu:
                    lu[k] = HIDDEN_KEY
    defaults = (out.get("lu2k") or {}).get("defaults")
    if isinstance(defaults, dict) and "key" in defaults:
        defaults["key"] = HIDDEN_KEY
    return out


def _restore_hidden_keys(incoming: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """A plain ``export`` shows keys as a placeholder; importing it back keeps the keys the
    daemon has (per net, and for ``lu2k.defaults``) instead of taking the placeholder for one.
    A placeholder with no key to keep stays, and the import is refused saying so."""
    out = copy.deepcopy(incoming)

    def keep(lu: Any, old: Any) -> None:
        if isinstance(lu, dict) and lu.get("key") == HIDDEN_KEY and isinstance(old, dict) and ("key" in old or "key_file" in old):
            del lu["key"]
            lu.update({k: old[k] for k in ("key", "key_file") if k in old})

    for item in out.get("net") or []:
        if not isinstance(item, dict):
            continue
        try:
            net = parse_net(str(item.get("net type")))
        except Lu2kError:
            continue
        old = next((n for n in current.get("net") or [] if _same_net(n, net)), None)
        if old is not None:
            keep(item.get("lu2k"), old.get("lu2k"))
    top = out.get("lu2k")
    if isinstance(top, dict):
        keep(top.get("defaults"), (current.get("lu2k") or {}).get("defaults"))
    return out


def _same_net(item: Any, net: Net) -> bool:
    try:
        return isinstance(item, dict) and parse_net(str(item.get("net type"))) == net
    except Lu2kError:
        return False


def _expand_routes(items: Any) -> list[dict[str, Any]]:
    """Route items with one gateway each (a gateway may be a NID list expression)."""
    out = []
    for item in items or []:
        gw = str(item.get("gateway", ""))
        if any(c in gw for c in "[*") or " " in gw.strip():
            for nid in NidList.parse(gw).expand(limit=1024):
                out.append({**item, "gateway": str(nid)})
        else:
            out.append(dict(item))
    return out


def _route_key(item: Any) -> tuple[str, str]:
    return str(parse_net(str(item.get("net")))), str(parse_nid(str(item.get("gateway"))))


class ConfigController:
    """The configuration commands of one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.doc, self.base_dir = load_document(daemon.config)
        self.lock = asyncio.Lock()

    @property
    def engine(self) -> "Engine":
        return self.daemon.engine

    # -- commands -----------------------------------------------------------------------

    async def export(self, args: dict[str, Any]) -> dict[str, Any]:
        secrets = bool(args.get("secrets"))
        if args.get("raw"):
            return {"yaml": yaml.safe_dump(self.doc if secrets else _hide_secrets(self.doc), sort_keys=False)}
        # Through lnetyaml so the output is in lnetctl's layout and order.
        cfg = parse_data(self.doc, source="export", resolve=False)
        if not secrets:
            for lu in [n.lu2k for n in cfg.nets] + [cfg.lu2k.get("defaults") or {}]:
                if "key" in lu:
                    lu["key"] = HIDDEN_KEY
        return {"yaml": dumps(cfg)}

    async def import_(self, args: dict[str, Any]) -> dict[str, Any]:
        text = args.get("yaml")
        if not isinstance(text, str):
            raise ConfigError("import needs the YAML text", where="import")
        try:
            incoming = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"not valid YAML: {e}", where="import") from None
        if incoming is None:
            incoming = {}
        if not isinstance(incoming, dict):
            raise ConfigError("the top level must be a mapping of sections", where="import")
        incoming = _restore_hidden_keys(incoming, self.doc)
        # The fragment must be valid on its own (every error, with its path) before merging.
        parse_data(incoming, source="import")
        mode = "replace" if args.get("replace") else ("del" if args.get("del") else "add")
        if incoming.get("route"):
            incoming["route"] = _expand_routes(incoming["route"])
        new = self._merge(copy.deepcopy(self.doc), incoming, mode)
        return await self._commit(new, f"import ({mode})")

    async def net_add(self, args: dict[str, Any]) -> dict[str, Any]:
        net = parse_net(str(args.get("net", "")))
        if any(_same_net(n, net) for n in self.doc.get("net") or []):
            raise ConfigError(f"net {net} is already configured (net del it first)", where="net add")
        ni: dict[str, Any] = {}
        if args.get("nid"):
            ni["nid"] = str(args["nid"])
        if args.get("interfaces"):
            ifs = args["interfaces"]
            ni["interfaces"] = {i: v for i, v in enumerate(ifs if isinstance(ifs, list) else str(ifs).split(","))}
        tun = {k: args[k] for k in ("peer_timeout", "peer_credits", "peer_buffer_credits", "credits") if args.get(k) is not None}
        if tun:
            ni["tunables"] = tun
        lu = dict(args.get("lu2k") or {})
        for k in ("backend", "port", "key", "key_file", "listen", "max_message_size"):
            if args.get(k) is not None:
                lu[k] = args[k]
        prof = {k: args[k] for k in ("rtt_ms", "rate_mbit", "loss") if args.get(k) is not None}
        if prof:
            lu["profile"] = prof
        entry: dict[str, Any] = {"net type": str(net), "local NI(s)": [ni]}
        if lu:
            entry["lu2k"] = lu
        new = copy.deepcopy(self.doc)
        new["net"] = list(new.get("net") or []) + [entry]
        return await self._commit(new, f"net add {net}")

    async def net_del(self, args: dict[str, Any]) -> dict[str, Any]:
        net = parse_net(str(args.get("net", "")))
        new = copy.deepcopy(self.doc)
        before = list(new.get("net") or [])
        new["net"] = [n for n in before if not _same_net(n, net)]
        if len(new["net"]) == len(before):
            raise ConfigError(f"net {net} is not configured", where="net del")
        return await self._commit(new, f"net del {net}")

    async def route_add(self, args: dict[str, Any]) -> dict[str, Any]:
        item = {"net": str(args.get("net", "")), "gateway": str(args.get("gateway", ""))}
        for k in ("hop", "priority", "health_sensitivity"):
            if args.get(k) is not None:
                item[k] = args[k]
        parse_data({"route": [item]}, source="route add")
        new = copy.deepcopy(self.doc)
        for one in _expand_routes([item]):
            key = _route_key(one)
            if any(_route_key(r) == key for r in new.get("route") or []):
                raise ConfigError(f"route to {key[0]} via {key[1]} already exists", where="route add")
            new["route"] = list(new.get("route") or []) + [one]
        return await self._commit(new, f"route add {item['net']} {item['gateway']}")

    async def route_del(self, args: dict[str, Any]) -> dict[str, Any]:
        net = str(parse_net(str(args.get("net", ""))))
        gw = str(parse_nid(str(args["gateway"]))) if args.get("gateway") else None
        new = copy.deepcopy(self.doc)
        before = list(new.get("route") or [])
        new["route"] = [r for r in before if not (_route_key(r)[0] == net and (gw is None or _route_key(r)[1] == gw))]
        if len(new["route"]) == len(before):
            raise ConfigError(f"no route to {net}" + (f" via {gw}" if gw else ""), where="route del")
        return await self._commit(new, f"route del {net}")

    async def peer_add(self, args: dict[str, Any]) -> dict[str, Any]:
        prim = str(parse_nid(str(args.get("nid", ""))))
        nids = [str(parse_nid(str(n))) for n in (args.get("nids") or [])]
        item: dict[str, Any] = {"primary nid": prim, "Multi-Rail": not args.get("non_mr", False),
                                "peer ni": [{"nid": n} for n in [prim, *[x for x in nids if x != prim]]]}
        if args.get("address"):
            item["lu2k"] = {"address": str(args["address"])}
        new = copy.deepcopy(self.doc)
        if any(str(parse_nid(str(p.get("primary nid")))) == prim for p in new.get("peer") or []):
            raise ConfigError(f"peer {prim} already exists", where="peer add")
        new["peer"] = list(new.get("peer") or []) + [item]
        return await self._commit(new, f"peer add {prim}")

    async def peer_del(self, args: dict[str, Any]) -> dict[str, Any]:
        prim = str(parse_nid(str(args.get("nid", ""))))
        new = copy.deepcopy(self.doc)
        before = list(new.get("peer") or [])
        new["peer"] = [p for p in before if str(parse_nid(str(p.get("primary nid")))) != prim]
        if len(new["peer"]) == len(before):
            raise ConfigError(f"peer {prim} is not configured", where="peer del")
        return await self._commit(new, f"peer del {prim}")

    async def set(self, args: dict[str, Any]) -> dict[str, Any]:
        name = str(args.get("name", ""))
        value = args.get("value")
        cur = parse_data(self.doc, source="set")
        changed = apply_set(cur, name, value)  # validated: raises ConfigError listing why not
        new = copy.deepcopy(self.doc)
        key = SET_ALIASES.get(name, name)
        if key == "routing":
            new["routing"] = {"enable": int(bool(changed.routing))}
        elif key.endswith("_buffers"):
            new["buffers"] = dict(changed.buffers)
        else:
            new["global"] = {**(new.get("global") or {}), key: changed.global_[key]}
        return await self._commit(new, f"set {key}")

    # -- merging ------------------------------------------------------------------------

    def _merge(self, doc: dict[str, Any], incoming: dict[str, Any], mode: str) -> dict[str, Any]:
        if mode == "replace":
            keep = doc.get("lu2k") or {}
            out = copy.deepcopy(incoming)
            lu = out.setdefault("lu2k", {}) or {}
            out["lu2k"] = lu
            for k in ("shim", "control"):  # sockets cannot move under a running daemon
                if k in keep:
                    lu[k] = keep[k]
            return out
        errors: list[str] = []
        if mode == "del":
            for item in incoming.get("net") or []:
                if "ip2net" in item:
                    before = list(doc.get("net") or [])
                    doc["net"] = [n for n in before if not (isinstance(n, dict) and n.get("ip2net") == item["ip2net"])]
                    if len(doc["net"]) == len(before):
                        errors.append(f"ip2net {item['ip2net']!r} is not configured")
                    continue
                net = parse_net(str(item.get("net type")))
                if net.type == "lo":
                    continue
                if not any(_same_net(n, net) for n in doc.get("net") or []):
                    errors.append(f"net {net} is not configured")
                doc["net"] = [n for n in doc.get("net") or [] if not _same_net(n, net)]
            for item in incoming.get("route") or []:
                key = _route_key(item)
                before = list(doc.get("route") or [])
                doc["route"] = [r for r in before if _route_key(r) != key]
                if len(doc["route"]) == len(before):
                    errors.append(f"no route to {key[0]} via {key[1]}")
            for item in incoming.get("peer") or []:
                prim = str(parse_nid(str(item.get("primary nid"))))
                before = list(doc.get("peer") or [])
                doc["peer"] = [p for p in before if str(parse_nid(str(p.get("primary nid")))) != prim]
                if len(doc["peer"]) == len(before):
                    errors.append(f"peer {prim} is not configured")
        else:
            for item in incoming.get("net") or []:
                if "ip2net" in item:
                    doc["net"] = list(doc.get("net") or []) + [item]
                    continue
                net = parse_net(str(item.get("net type")))
                if net.type == "lo":
                    continue
                if any(_same_net(n, net) for n in doc.get("net") or []):
                    errors.append(f"net {net} is already configured")
                else:
                    doc["net"] = list(doc.get("net") or []) + [item]
            for item in incoming.get("route") or []:
                key = _route_key(item)
                if any(_route_key(r) == key for r in doc.get("route") or []):
                    errors.append(f"route to {key[0]} via {key[1]} already exists")
                else:
                    doc["route"] = list(doc.get("route") or []) + [item]
            for item in incoming.get("peer") or []:
                prim = str(parse_nid(str(item.get("primary nid"))))
                if any(str(parse_nid(str(p.get("primary nid")))) == prim for p in doc.get("peer") or []):
                    errors.append(f"peer {prim} already exists")
                else:
                    doc["peer"] = list(doc.get("peer") or []) + [item]
            for sect in ("global", "routing", "buffers", "numa"):
                if incoming.get(sect):
                    doc[sect] = {**(doc.get(sect) or {}), **incoming[sect]}
            if incoming.get("ip2nets"):
                doc["ip2nets"] = list(doc.get("ip2nets") or []) + list(incoming["ip2nets"])
            for k, v in (incoming.get("lu2k") or {}).items():
                if k in ("shim", "control"):
                    errors.append(f"lu2k.{k} cannot change while the daemon runs")
                else:
                    doc.setdefault("lu2k", {})[k] = v
        if errors:
            raise ConfigError(f"{len(errors)} error(s) in import", where="import", errors=errors)
        return doc

    # -- applying -----------------------------------------------------------------------

    async def _commit(self, new_doc: dict[str, Any], what: str) -> dict[str, Any]:
        async with self.lock:
            old_cfg = self.daemon.config
            new_cfg = parse_config(copy.deepcopy(new_doc), source=old_cfg.source, base_dir=self.base_dir)
            # What the process was started with stays (sockets, command-line overrides).
            new_cfg.shim = old_cfg.shim
            new_cfg.control_path = old_cfg.control_path
            changes = await apply_config(self.engine, old_cfg, new_cfg, getattr(self.daemon, "lan", None))
            self.daemon.config = new_cfg
            self.doc = new_doc
            return {"ok": what, "changes": changes}


async def _start_net(eng: "Engine", nc: NetConfig, lan: "LanNets | None") -> None:
    if not is_lan(nc):
        await eng.add_net(nc)
    elif lan is None:
        raise ConfigError(f"net {nc.net}: {nc.backend} nets need the daemon's LAN drivers", where="apply")
    else:
        await lan.add(eng, nc)


async def _stop_net(eng: "Engine", nc: NetConfig, reason: str, lan: "LanNets | None") -> None:
    if is_lan(nc):
        if lan is not None:
            await lan.remove(eng, nc.net, reason)
    else:
        await eng.remove_net(nc.net, reason)


async def apply_config(eng: "Engine", old: DaemonConfig, new: DaemonConfig, lan: "LanNets | None" = None) -> list[str]:
    """Move a running engine from ``old`` to ``new`` (both already validated), all or nothing
    for the nets; returns what changed.  LAN (socklnd) nets are brought up and down through
    ``lan``, the daemon's LAN drivers, and never enter the engine's config."""
    old_nets = {n.net: n for n in old.nets}
    new_nets = {n.net: n for n in new.nets}
    going = [n for net, n in old_nets.items() if net not in new_nets or new_nets[net] != n]
    coming = [n for net, n in new_nets.items() if net not in old_nets or old_nets[net] != n]
    changes: list[str] = []
    stopped: list[NetConfig] = []
    started: list[NetConfig] = []
    try:
        for nc in going:
            await _stop_net(eng, nc, f"net {nc.net} reconfigured", lan)
            stopped.append(nc)
        for nc in coming:
            await _start_net(eng, nc, lan)
            started.append(nc)
    except BaseException as e:
        # Undo: stop what we started, restart what we stopped.
        undo_errors = []
        for nc in started:
            await _stop_net(eng, nc, "rolled back", lan)
        for nc in stopped:
            try:
                await _start_net(eng, nc, lan)
            except Lu2kError as e2:
                undo_errors.append(f"could not restore net {nc.net}: {e2}")
        if isinstance(e, Lu2kError):
            msg = f"configuration not applied: {e}"
            raise ConfigError(msg + ("; " + "; ".join(undo_errors) if undo_errors else ""), where="apply") from None
        raise
    for nc in going:
        changes.append(f"net {nc.net} {'reconfigured' if nc.net in new_nets else 'removed'}")
    for nc in coming:
        if nc.net not in old_nets:
            changes.append(f"net {nc.net} added ({nc.nid}, {nc.backend})")
    # Routes, peers and globals: one swap each, nothing here can fail half way.
    eng.set_routes(list(new.routes))
    old_routes = {(r.net, r.gateway) for r in old.routes}
    new_routes = {(r.net, r.gateway) for r in new.routes}
    changes += [f"route {n} {g} added" for n, g in sorted(new_routes - old_routes, key=str)]
    changes += [f"route {n} {g} removed" for n, g in sorted(old_routes - new_routes, key=str)]
    old_peers = {p.nid: p.address for p in old.peers}
    new_peers = {p.nid: p.address for p in new.peers}
    eng.set_peer_addresses({nid: addr for nid, addr in new_peers.items() if addr})
    for nid, addr in old_peers.items():
        if nid not in new_peers or new_peers[nid] != addr:
            eng.drop_peer(nid, "peer deleted" if nid not in new_peers else "peer address changed")
            changes.append(f"peer {nid} {'removed' if nid not in new_peers else 'changed'}")
    changes += [f"peer {nid} added" for nid in new_peers if nid not in old_peers]
    old_rails = {p.nid: p.rails for p in old.peers}
    for p in new.peers:  # multi-rail: the engine drops a peer whose rails change (Engine.apply_rails)
        if p.nid in old_rails and old_rails[p.nid] != p.rails:
            changes.append(f"peer {p.nid} rails {', '.join(map(str, p.rails))}")
    if vars(old.global_) != vars(new.global_):
        changes += [f"global {k} = {v}" for k, v in vars(new.global_).items() if vars(old.global_).get(k) != v]
    if old.routing != new.routing:
        changes.append(f"routing {'enabled' if new.routing else 'disabled'}")
    if lan is not None:
        lan.reconfigure(new)
    eng.config = replace(new, nets=[n for n in new.nets if not is_lan(n)])  # the engine runs lu2k nets only
    return changes


def register(daemon: Daemon) -> ConfigController:
    """Add the configuration commands to a daemon's control socket."""
    ctl = ConfigController(daemon)
    for name, fn in (
        ("export", ctl.export), ("import", ctl.import_), ("net add", ctl.net_add), ("net del", ctl.net_del),
        ("route add", ctl.route_add), ("route del", ctl.route_del), ("peer add", ctl.peer_add),
        ("peer del", ctl.peer_del), ("set", ctl.set),
    ):
        daemon.control.register(name, fn)
    return ctl
