"""``lu2kctl``: control a running lu2kd with lnetctl's commands and output.

Show commands print YAML with lnetctl's keys (see :mod:`lu2k.cli.lnetshow`), ``global show`` included:
``net show [--net NET] [-v [LEVEL]]``, ``peer show [--nid NID] [-v [LEVEL]]``,
``route show [--net NET] [--gateway NID] [-v]``, ``stats show``, ``ping NID[,NID...]``,
``discover NID[,NID...]``, ``endpoint show``.  ``--json`` (anywhere on the line) prints the
daemon's own JSON instead, with every field it reports; ``--table`` a table for people.
Configuration commands: ``net|route|peer add|del``, ``set``, ``import``, ``export``.

Bad input is reported on stderr with exit status 1 (2 for usage errors); there is no
traceback and no unbounded wait: every request has a bounded timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..control import request
from ..errors import Lu2kError
from ..settings import default_control_path
from . import lnetshow
from .table import render

MAX_TIMEOUT = 3600.0  # seconds; longer waits are refused rather than left to hang


def timeout_seconds(text: str) -> float:
    """A ping/discover timeout: a finite number of seconds in (0, MAX_TIMEOUT]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"timeout {text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0 or value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"timeout {text!r} must be a finite number of seconds, above 0 and at most {MAX_TIMEOUT:g}")
    return value


def detail_level(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"verbosity {text!r} is not a level 0..4") from None
    if not 0 <= value <= 4:
        raise argparse.ArgumentTypeError(f"verbosity {value} is not a level 0..4")
    return value


# --- show commands ---------------------------------------------------------------------------------


def _table_nets(result: Any, args: argparse.Namespace) -> str:
    rows = [[n["net"], n["nid"], n["status"], n["backend"], n["listen"], n["credits"]["tx"], n["credits"]["min_tx"],
             n["tunables"]["peer_credits"], n["max_message_size"]] for n in result["nets"]]
    return render(["net", "nid", "status", "backend", "listen", "tx_credits", "min_tx", "peer_credits", "max_msg"], rows)


def _table_peers(result: Any, args: argparse.Namespace) -> str:
    rows = [[p["nid"], p["state"], p["health"], p["tx_credits"], p["min_tx_credits"], p["queued"], p["in_flight"],
             p["delivered"], p["failed"]] for p in result["peers"]]
    text = render(["peer nid", "state", "health", "tx_credits", "min_tx", "queued", "in_flight", "delivered", "failed"], rows)
    if args.verbose:
        for p in result["peers"]:
            for ctype, c in p.get("connections", {}).items():
                text += f"\n{p['nid']} {ctype}: " + ", ".join(f"{k}={v}" for k, v in c.items())
            if p.get("last_error"):
                text += f"\n{p['nid']} last error: {p['last_error']}"
    return text


def _table_routes(result: Any, args: argparse.Namespace) -> str:
    return render(["net", "gateway", "hop", "priority", "health"], [[r["net"], r["gateway"], r["hop"], r["priority"], r["health"]] for r in result])


def _table_stats(result: Any, args: argparse.Namespace) -> str:
    return render(["counter", "value"], sorted(result["stats"].items()))


def _table_endpoints(result: Any, args: argparse.Namespace) -> str:
    if not result:
        return "no endpoints attached"
    keys = sorted({k for r in result for k in r if not isinstance(r[k], (dict, list))})
    return render(keys, [[r.get(k) for k in keys] for r in result])


Fetch = Callable[[argparse.Namespace], Any]
Shape = Callable[[Any, argparse.Namespace], Any]


async def _fetch_nets(args: argparse.Namespace) -> Any:
    path = _socket(args)
    return {"nets": await request(path, "net show"), "peers": await request(path, "peer show")}


async def _fetch_peers(args: argparse.Namespace) -> Any:
    return {"peers": await request(_socket(args), "peer show", {"nid": args.nid} if args.nid else {})}


async def _fetch_routes(args: argparse.Namespace) -> Any:
    from ..nid import parse_nid

    net = _net_filter(args)
    gateway = str(parse_nid(args.gateway)) if args.gateway else None  # NidError (a Lu2kError) names a bad NID
    routes = await request(_socket(args), "route show")
    return [r for r in routes if net in (None, r["net"]) and gateway in (None, r["gateway"])]


async def _fetch_stats(args: argparse.Namespace) -> Any:
    path = _socket(args)
    return {"stats": await request(path, "stats"), "peers": await request(path, "peer show")}


async def _fetch_globals(args: argparse.Namespace) -> Any:
    import yaml

    doc = yaml.safe_load((await request(_socket(args), "export"))["yaml"]) or {}
    return dict(doc.get("global") or {})


async def _fetch_endpoints(args: argparse.Namespace) -> Any:
    return await request(_socket(args), "endpoint show")


def _net_filter(args: argparse.Namespace) -> str | None:
    if args.net is None:
        return None
    from ..nid import parse_net

    return str(parse_net(args.net))  # NidError (a Lu2kError) names a bad net


SHOWS: dict[tuple[str, ...], tuple[Any, Shape, Any, Any]] = {
    # key: (fetch, lnetctl shape, json view, table printer)
    ("net", "show"): (_fetch_nets, lambda r, a: lnetshow.net_show(r["nets"], r["peers"], a.verbose, _net_filter(a)),
                      lambda r, a: [n for n in r["nets"] if _net_filter(a) in (None, n["net"])], _table_nets),
    ("peer", "show"): (_fetch_peers, lambda r, a: lnetshow.peer_show(r["peers"], a.verbose), lambda r, a: r["peers"], _table_peers),
    ("route", "show"): (_fetch_routes, lambda r, a: lnetshow.route_show(r, a.verbose), lambda r, a: r, _table_routes),
    ("stats", "show"): (_fetch_stats, lambda r, a: lnetshow.stats_show(r["stats"], r["peers"]), lambda r, a: r["stats"], _table_stats),
    ("global", "show"): (_fetch_globals, lambda r, a: {"global": r}, lambda r, a: r,
                         lambda r, a: render(["name", "value"], sorted(r.items()))),
    ("endpoint", "show"): (_fetch_endpoints, lambda r, a: {"endpoint": r}, lambda r, a: r, _table_endpoints),
}


def _socket(args: argparse.Namespace) -> str:
    return getattr(args, "socket", None) or default_control_path()


def _run_show(key: tuple[str, ...], args: argparse.Namespace) -> int:
    fetch, shape, json_view, table = SHOWS[key]
    result = asyncio.run(fetch(args))
    if getattr(args, "json", False):
        print(json.dumps(json_view(result, args), indent=2))
    elif getattr(args, "table", False):
        print(table(result, args))
    else:
        print(lnetshow.dump(shape(result, args)), end="")
    return 0


async def _probe_all(args: argparse.Namespace, cmd: str) -> tuple[list[Any], list[str]]:
    nids = [n for n in args.nids.split(",") if n.strip()]
    if not nids:
        raise Lu2kError(f"{cmd}: no NID given")
    ok: list[Any] = []
    failed: list[str] = []
    for nid in nids:
        req: dict[str, Any] = {"nid": nid.strip(), "timeout": args.timeout}
        if cmd == "discover":
            req["force"] = args.force
        try:
            ok.append(await request(_socket(args), cmd, req, timeout=args.timeout + 10))
        except Lu2kError as e:
            failed.append(f"{cmd} {nid.strip()}: {e}")
    return ok, failed


def _run_probe(cmd: str, args: argparse.Namespace) -> int:
    ok, failed = asyncio.run(_probe_all(args, cmd))
    if getattr(args, "json", False):
        print(json.dumps(ok, indent=2))
    elif ok:
        print(lnetshow.dump({cmd: [lnetshow.ping_result(r, args.verbose) for r in ok]}), end="")
    for f in failed:
        print(f"lu2kctl: {f}", file=sys.stderr)
    return 1 if failed else 0


# --- the parser ------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    """Options accepted on every (sub)command, before or after it: ``--json``, ``--socket``."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print lu2kd's own JSON (every field it reports)")
    c.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS, help=f"lu2kd's control socket (default {default_control_path()})")
    return c


def _verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", nargs="?", const=1, default=0, type=detail_level, metavar="LEVEL",
                   help="detail level as lnetctl's (1 if given alone): 1 statistics and tunables, 2 health, 3 peer state")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    p = argparse.ArgumentParser(prog="lu2kctl", description="control a running lu2kd with lnetctl's commands", parents=[common])
    p.add_argument("--version", action="version", version=f"lu2kctl (lu2k) {__version__}")
    sub = p.add_subparsers(dest="object", metavar="COMMAND")
    objs: dict[str, Any] = {}
    helps = {"net": "local NIs", "peer": "peers", "route": "routes", "endpoint": "attached shim endpoints", "stats": "daemon counters",
             "global": "global settings"}
    for obj in ("net", "peer", "route", "global", "endpoint", "stats"):
        op = sub.add_parser(obj, help=f"{helps[obj]}: show" + ("" if obj in ("endpoint", "stats", "global") else ", add, del"), parents=[common])
        objs[obj] = op.add_subparsers(dest="action", metavar="ACTION")
        show = objs[obj].add_parser("show", help=f"show {helps[obj]}", parents=[common])
        show.add_argument("--table", action="store_true", help="a table for people instead of YAML")
        if obj not in ("endpoint", "stats", "global"):
            _verbose(show)
        else:
            show.set_defaults(verbose=0)
        if obj == "net":
            show.add_argument("--net", help="only this net (e.g. tcp1)")
        if obj == "peer":
            show.add_argument("--nid", help="only this peer")
        if obj == "route":
            show.add_argument("--net", help="only routes to this net")
            show.add_argument("--gateway", help="only routes through this gateway")
    for cmd, text in (("ping", "check that NIDs answer (lnetctl ping)"), ("discover", "connect to NIDs and show what they are (lnetctl discover)")):
        pg = sub.add_parser(cmd, help=text, parents=[common])
        pg.add_argument("nids", metavar="NID[,NID...]")
        pg.add_argument("--timeout", type=timeout_seconds, default=5.0, help=f"seconds per NID (default 5, at most {MAX_TIMEOUT:g})")
        if cmd == "ping":
            pg.add_argument("--source", metavar="NID", help="accepted for lnetctl compatibility; lu2k picks the NI by route")
        else:
            pg.add_argument("--force", action="store_true", help="accepted for lnetctl compatibility (lu2k always probes)")
        _verbose(pg)
    _add_config_parsers(sub, objs, common)
    return p


def _add_config_parsers(sub: Any, actions: dict[str, Any], common: argparse.ArgumentParser) -> None:
    """lnetctl's configuration commands, with lnetctl's option names."""
    na = actions["net"].add_parser("add", help="add a net (validated and applied whole)", parents=[common])
    na.add_argument("--net", required=True, help="net name, e.g. tcp1")
    na.add_argument("--nid", help="the NI's NID (default: from --if)")
    na.add_argument("--if", dest="interfaces", help="interface(s), comma separated: eth0,eth1[0]")
    na.add_argument("--backend", help="lu2k backend (tcp, quic, udt, rds, o2ib)")
    na.add_argument("--port", type=int)
    na.add_argument("--key", help="the net's pre-shared key")
    na.add_argument("--key-file", dest="key_file")
    na.add_argument("--listen", help="bind address")
    na.add_argument("--peer-timeout", dest="peer_timeout", type=int)
    na.add_argument("--peer-credits", dest="peer_credits", type=int)
    na.add_argument("--peer-buffer-credits", dest="peer_buffer_credits", type=int)
    na.add_argument("--credits", type=int)
    na.add_argument("--rtt-ms", dest="rtt_ms", type=float, help="site profile: expected RTT")
    na.add_argument("--rate-mbit", dest="rate_mbit", type=float, help="site profile: link rate")
    na.add_argument("--loss", type=float, help="site profile: loss fraction (0.01 = 1 %%)")
    nd = actions["net"].add_parser("del", help="delete a net", parents=[common])
    nd.add_argument("--net", required=True)
    ra = actions["route"].add_parser("add", help="add a route", parents=[common])
    ra.add_argument("--net", required=True, help="remote net")
    ra.add_argument("--gateway", required=True, help="gateway NID (or NID list expression)")
    ra.add_argument("--hop", type=int, help="hop count 1..255 (default undefined)")
    ra.add_argument("--priority", type=int)
    ra.add_argument("--health-sensitivity", dest="health_sensitivity", type=int)
    rd = actions["route"].add_parser("del", help="delete routes to a net (through one gateway)", parents=[common])
    rd.add_argument("--net", required=True)
    rd.add_argument("--gateway")
    pa = actions["peer"].add_parser("add", help="add a peer", parents=[common])
    pa.add_argument("--prim_nid", "--prim-nid", dest="prim_nid", required=True, help="primary NID")
    pa.add_argument("--nid", dest="peer_nids", help="more NIDs of the peer, comma separated")
    pa.add_argument("--non_mr", "--non-mr", dest="non_mr", action="store_true")
    pa.add_argument("--address", help="host:port to reach it at (overrides the NID's address)")
    pd = actions["peer"].add_parser("del", help="delete a peer", parents=[common])
    pd.add_argument("--prim_nid", "--prim-nid", dest="prim_nid", required=True)
    im = sub.add_parser("import", help="add (or --del, or --replace) configuration from a YAML file", parents=[common])
    im.add_argument("file", nargs="?", default="-", help="YAML file (default: stdin)")
    g = im.add_mutually_exclusive_group()
    g.add_argument("--del", dest="delete", action="store_true", help="delete what the file lists")
    g.add_argument("--replace", action="store_true", help="make the file the whole configuration")
    ex = sub.add_parser("export", help="print the configuration as YAML (lnetctl layout)", parents=[common])
    ex.add_argument("file", nargs="?", help="write to this file instead of stdout")
    ex.add_argument("--backup", action="store_true", help="lnetctl's spelling: configuration only (lu2k's export always is)")
    ex.add_argument("--secrets", action="store_true", help="include pre-shared keys (otherwise marked hidden; import keeps the running key)")
    st = sub.add_parser("set", help="set a global: transaction_timeout, retry_count, health_sensitivity, routing, ...", parents=[common])
    st.add_argument("name")
    st.add_argument("value")


def _config_request(key: tuple[str, ...], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if key == ("import",):
        try:
            if args.file == "-":
                text = sys.stdin.read()
            else:
                with open(args.file, encoding="utf-8") as f:
                    text = f.read()
        except OSError as e:
            raise Lu2kError(f"cannot read {args.file}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise Lu2kError(f"cannot read {args.file}: not UTF-8 text") from None
        return "import", {"yaml": text, "del": args.delete, "replace": args.replace}
    if key == ("export",):
        return "export", {"secrets": args.secrets}
    if key == ("set",):
        return "set", {"name": args.name, "value": args.value}
    if key == ("net", "add"):
        req = {k: getattr(args, k) for k in ("net", "nid", "backend", "port", "key", "key_file", "listen", "peer_timeout",
                                              "peer_credits", "peer_buffer_credits", "credits", "rtt_ms", "rate_mbit", "loss")}
        if args.interfaces:
            req["interfaces"] = args.interfaces.split(",")
        return "net add", {k: v for k, v in req.items() if v is not None}
    if key == ("net", "del"):
        return "net del", {"net": args.net}
    if key == ("route", "add"):
        req = {k: getattr(args, k) for k in ("net", "gateway", "hop", "priority", "health_sensitivity")}
        return "route add", {k: v for k, v in req.items() if v is not None}
    if key == ("route", "del"):
        return "route del", {k: v for k, v in (("net", args.net), ("gateway", args.gateway)) if v}
    if key == ("peer", "add"):
        req = {"nid": args.prim_nid, "non_mr": args.non_mr}
        if args.peer_nids:
            req["nids"] = args.peer_nids.split(",")
        if args.address:
            req["address"] = args.address
        return "peer add", req
    return "peer del", {"nid": args.prim_nid}


CONFIG_COMMANDS = {("import",), ("export",), ("set",), ("net", "add"), ("net", "del"), ("route", "add"),
                   ("route", "del"), ("peer", "add"), ("peer", "del")}


def _write_export(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise Lu2kError(f"cannot write {path}: {e.strerror or e}") from None


def _run_config_command(key: tuple[str, ...], args: argparse.Namespace) -> int:
    cmd, req = _config_request(key, args)
    if key == ("export",) and args.file:
        _check_writable(args.file)  # before asking the daemon, so a bad path costs nothing
    result = asyncio.run(request(_socket(args), cmd, req))
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif key == ("export",):
        if args.file:
            _write_export(args.file, result["yaml"])
        else:
            print(result["yaml"], end="")
    else:
        changes = [f"  {c}" for c in result.get("changes", [])] or ["  (nothing changed)"]
        print("\n".join([result["ok"] + ": done", *changes]))
    return 0


def _check_writable(path: str) -> None:
    import os

    if os.path.isdir(path):
        raise Lu2kError(f"cannot write {path}: it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise Lu2kError(f"cannot write {path}: no directory {parent}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _autocomplete(parser)
    args = parser.parse_args(argv)
    obj, action = args.object, getattr(args, "action", None)
    if obj == "stats" and action is None:
        action = "show"  # lu2k's earlier spelling, kept
    key = tuple(x for x in (obj, action) if x)
    try:
        if key in CONFIG_COMMANDS:
            return _run_config_command(key, args)
        if key in SHOWS:
            return _run_show(key, args)
        if key in (("ping",), ("discover",)):
            return _run_probe(key[0], args)
    except Lu2kError as e:
        print(f"lu2kctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.print_help(sys.stderr)
    return 2


def _autocomplete(parser: argparse.ArgumentParser) -> None:
    """Shell completion when argcomplete is installed and the shell asked for it."""
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


if __name__ == "__main__":
    sys.exit(main())
