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
    for obj in ("net", "peer", "route", "endpoint"):
        sp = sub.add_parser(obj, help=f"{obj} commands").add_subparsers(dest="action", metavar="ACTION")
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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    key = tuple(x for x in (args.object, getattr(args, "action", None)) if x)
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


if __name__ == "__main__":
    sys.exit(main())
