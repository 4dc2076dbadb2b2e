"""``lu2kctl``: control a running lu2kd, in the manner of ``lnetctl``.

``net show``, ``peer show [--nid NID]``, ``route show``, ``stats``, ``ping NID``,
``endpoint show``.  Tables by default, ``--json`` for scripts.  The daemon is found through
its control socket (``--socket``, default as lu2kd's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from ..control import request
from ..errors import Lu2kError
from ..settings import default_control_path
from .table import render

Printer = Callable[[Any, argparse.Namespace], str]


def _nets(result: Any, args: argparse.Namespace) -> str:
    rows = [[n["net"], n["nid"], n["status"], n["backend"], n["listen"], n["credits"]["tx"], n["credits"]["min_tx"],
             n["tunables"]["peer_credits"], n["max_message_size"]] for n in result]
    text = render(["net", "nid", "status", "backend", "listen", "tx_credits", "min_tx", "peer_credits", "max_msg"], rows)
    if args.verbose:
        for n in result:
            extra = {**n.get("backend_settings", {}), **{f"profile.{k}": v for k, v in n.get("profile", {}).items()}}
            text += f"\n{n['net']}: " + ", ".join(f"{k}={v}" for k, v in extra.items())
    return text


def _peers(result: Any, args: argparse.Namespace) -> str:
    rows = [[p["nid"], p["state"], p["health"], p["tx_credits"], p["min_tx_credits"], p["queued"], p["in_flight"],
             p["delivered"], p["failed"]] for p in result]
    text = render(["peer nid", "state", "health", "tx_credits", "min_tx", "queued", "in_flight", "delivered", "failed"], rows)
    if args.verbose:
        for p in result:
            for ctype, c in p.get("connections", {}).items():
                text += f"\n{p['nid']} {ctype}: " + ", ".join(f"{k}={v}" for k, v in c.items())
            if p.get("last_error"):
                text += f"\n{p['nid']} last error: {p['last_error']}"
    return text


def _routes(result: Any, args: argparse.Namespace) -> str:
    return render(["net", "gateway", "hop", "priority", "health"], [[r["net"], r["gateway"], r["hop"], r["priority"], r["health"]] for r in result])


def _stats(result: Any, args: argparse.Namespace) -> str:
    return render(["counter", "value"], sorted(result.items()))


def _ping(result: Any, args: argparse.Namespace) -> str:
    via = f" via {result['via']}" if result.get("via") and result["via"] != result["nid"] else ""
    return f"{result['nid']}{via}: rtt {result['rtt_ms']:.3f} ms"


def _endpoints(result: Any, args: argparse.Namespace) -> str:
    if not result:
        return "no endpoints attached"
    keys = sorted({k for r in result for k in r if not isinstance(r[k], (dict, list))})
    return render(keys, [[r.get(k) for k in keys] for r in result])


COMMANDS: dict[tuple[str, ...], tuple[str, Printer]] = {
    ("net", "show"): ("net show", _nets),
    ("peer", "show"): ("peer show", _peers),
    ("route", "show"): ("route show", _routes),
    ("stats",): ("stats", _stats),
    ("ping",): ("ping", _ping),
    ("endpoint", "show"): ("endpoint show", _endpoints),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lu2kctl", description="control a running lu2kd (lnetctl-style)")
    p.add_argument("--socket", default=None, help=f"control socket (default {default_control_path()})")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = p.add_subparsers(dest="object", metavar="OBJECT")
    actions: dict[str, Any] = {}
    for obj in ("net", "peer", "route", "endpoint"):
        sp = actions[obj] = sub.add_parser(obj, help=f"{obj} commands").add_subparsers(dest="action", metavar="ACTION")
        show = sp.add_parser("show", help=f"show {obj}s")
        show.add_argument("-v", "--verbose", action="store_true")
        if obj == "peer":
            show.add_argument("--nid", help="only this peer")
    st = sub.add_parser("stats", help="daemon counters")
    st.add_argument("-v", "--verbose", action="store_true")
    pg = sub.add_parser("ping", help="round trip to a peer through its connection")
    pg.add_argument("nid")
    pg.add_argument("--timeout", type=float, default=5.0)
    pg.add_argument("-v", "--verbose", action="store_true")
    _add_config_parsers(sub, actions)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    key = tuple(x for x in (args.object, getattr(args, "action", None)) if x)
    if key in CONFIG_COMMANDS:
        return _run_config_command(key, args)
    if key not in COMMANDS:
        parser.print_help()
        return 2
    cmd, printer = COMMANDS[key]
    req: dict[str, Any] = {}
    if getattr(args, "nid", None):
        req["nid"] = args.nid
    if key == ("ping",):
        req["timeout"] = args.timeout
    try:
        result = asyncio.run(request(args.socket or default_control_path(), cmd, req, timeout=max(30.0, req.get("timeout", 0) + 5)))
    except Lu2kError as e:
        print(f"lu2kctl: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else printer(result, args))
    return 0


# --- configuration commands (import/export, net|route|peer add|del, set) -------------------------


def _add_config_parsers(sub: Any, actions: dict[str, Any]) -> None:
    """lnetctl's configuration commands, with lnetctl's option names."""
    na = actions["net"].add_parser("add", help="add a net (validated and applied whole)")
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
    nd = actions["net"].add_parser("del", help="delete a net")
    nd.add_argument("--net", required=True)
    ra = actions["route"].add_parser("add", help="add a route")
    ra.add_argument("--net", required=True, help="remote net")
    ra.add_argument("--gateway", required=True, help="gateway NID (or NID list expression)")
    ra.add_argument("--hop", type=int, help="hop count 1..255 (default undefined)")
    ra.add_argument("--priority", type=int)
    ra.add_argument("--health-sensitivity", dest="health_sensitivity", type=int)
    rd = actions["route"].add_parser("del", help="delete routes to a net (through one gateway)")
    rd.add_argument("--net", required=True)
    rd.add_argument("--gateway")
    pa = actions["peer"].add_parser("add", help="add a peer")
    pa.add_argument("--prim_nid", "--prim-nid", dest="prim_nid", required=True, help="primary NID")
    pa.add_argument("--nid", dest="peer_nids", help="more NIDs of the peer, comma separated")
    pa.add_argument("--non_mr", "--non-mr", dest="non_mr", action="store_true")
    pa.add_argument("--address", help="host:port to reach it at (overrides the NID's address)")
    pd = actions["peer"].add_parser("del", help="delete a peer")
    pd.add_argument("--prim_nid", "--prim-nid", dest="prim_nid", required=True)
    im = sub.add_parser("import", help="add (or --del, or --replace) configuration from a YAML file")
    im.add_argument("file", nargs="?", default="-", help="YAML file (default: stdin)")
    g = im.add_mutually_exclusive_group()
    g.add_argument("--del", dest="delete", action="store_true", help="delete what the file lists")
    g.add_argument("--replace", action="store_true", help="make the file the whole configuration")
    ex = sub.add_parser("export", help="print the configuration as YAML (lnetctl layout)")
    ex.add_argument("file", nargs="?", help="write to this file instead of stdout")
    ex.add_argument("--secrets", action="store_true", help="include pre-shared keys (for a backup)")
    st = sub.add_parser("set", help="set a global: transaction_timeout, retry_count, health_sensitivity, routing, ...")
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
            raise Lu2kError(f"cannot read {args.file}: {e.strerror}") from None
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


def _run_config_command(key: tuple[str, ...], args: argparse.Namespace) -> int:
    try:
        cmd, req = _config_request(key, args)
        result = asyncio.run(request(args.socket or default_control_path(), cmd, req))
    except Lu2kError as e:
        print(f"lu2kctl: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    elif key == ("export",):
        if args.file:
            with open(args.file, "w", encoding="utf-8") as f:
                f.write(result["yaml"])
        else:
            print(result["yaml"], end="")
    else:
        changes = [f"  {c}" for c in result.get("changes", [])] or ["  (nothing changed)"]
        print("\n".join([result["ok"] + ": done", *changes]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
