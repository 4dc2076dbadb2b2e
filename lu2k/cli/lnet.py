"""``lu2k lnet``: read LNet names and configuration strings the way Lustre does, offline.

For checking what an operator's strings mean before giving them to lu2kd::

    lu2k lnet nid 010.1.1.1@tcp0 '*@lo'          # canonical NIDs (one per line)
    lu2k lnet net tcp01 o2ib
    lu2k lnet nidlist '10.0.[1-4].*@tcp *@o2ib' [--match NID ...] [--expand]
    lu2k lnet networks 'tcp0(eth0,eth1)[0,1],o2ib' [--resolve]
    lu2k lnet ip2nets 'tcp(eth1) 192.168.*.*; o2ib 10.*.*.*' [--if eth0=10.0.0.2 ...]
    lu2k lnet routes 'o2ib [1-2] 10.0.0.[1-3]@tcp:2' [--local NID ...]
    lu2k lnet check lnet.yaml [--if ...]         # validate + resolve an lnetctl/lu2kd YAML file

Interfaces default to this host's (``--if name=ipv4[,down]`` describes another one).
Exit status 0 when everything parsed, 1 with the error(s) on stderr otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import (
    ip2nets,
    ip2nets_networks,
    networks_string,
    parse_networks,
    parse_routes,
    resolve_interfaces,
    system_interfaces,
)
from ..errors import ConfigError, NidError
from ..lnetyaml import dumps, load, resolve
from ..nid import NidList, parse_net, parse_nid


def _without_keys(text: str) -> str:
    """The checked file as YAML with every pre-shared key hidden (a check is no reason to print one)."""
    import yaml

    from ..confctl import _hide_secrets

    return str(yaml.safe_dump(_hide_secrets(yaml.safe_load(text)), sort_keys=False, width=1000))


def _interfaces(args: argparse.Namespace) -> list[Any]:
    if not args.interfaces:
        return list(system_interfaces())
    out: list[Any] = []
    for item in args.interfaces:
        name, _, rest = item.partition("=")
        ip, _, state = rest.partition(",")
        if not name or not ip or state not in ("", "up", "down"):
            raise ConfigError(f"--if {item!r}: expected name=ipv4[,down]", where="lu2k lnet")
        out.append((name, ip, state != "down"))
    return out


def _nid(args: argparse.Namespace) -> int:
    rc = 0
    for text in args.text:
        try:
            print(parse_nid(text, resolve=not args.no_resolve))
        except NidError as e:
            print(f"{text}: {e}", file=sys.stderr)
            rc = 1
    return rc


def _net(args: argparse.Namespace) -> int:
    rc = 0
    for text in args.text:
        try:
            print(parse_net(text))
        except NidError as e:
            print(f"{text}: {e}", file=sys.stderr)
            rc = 1
    return rc


def _nidlist(args: argparse.Namespace) -> int:
    nl = NidList.parse(args.text)
    print(nl)
    rc = 0
    for nid in args.match or []:
        hit = nl.match(nid)
        print(f"{parse_nid(nid)}: {'matches' if hit else 'no match'}")
        rc = rc if hit else 1
    if args.expand:
        for n in nl.expand(limit=args.limit):
            print(n)
    return rc


def _networks(args: argparse.Namespace) -> int:
    specs = parse_networks(args.text)
    if args.resolve:
        specs = resolve_interfaces(specs, _interfaces(args))
    print(networks_string(specs))
    return 0


def _ip2nets(args: argparse.Namespace) -> int:
    ifaces = _interfaces(args)
    print(f"networks={ip2nets_networks(args.text, ifaces)}")
    print(networks_string(ip2nets(args.text, ifaces)))
    return 0


def _routes(args: argparse.Namespace) -> int:
    routes = parse_routes(args.text, args.local or [])
    for r in routes:
        print(r)
    if routes.router:
        print("# a gateway is one of our NIDs: this node is a router")
    if args.local:
        _, dropped = routes.installable(args.local)
        for r, why in dropped:
            print(f"# not installed: {r} ({why})")
    return 0


def _check(args: argparse.Namespace) -> int:
    cfg = load(args.file)
    res = resolve(cfg, _interfaces(args))
    print(_without_keys(dumps(cfg)), end="")
    for n in res.nets:
        print(f"# net {n.net} ({n.origin}): " + ", ".join(f"{ni.nid}" + (f" on {ni.interface}" if ni.interface else "") for ni in n.nis))
    for r in res.routes:
        print(f"# route {r.net} via {r.gateway}")
    for note in res.notes:
        print(f"# note: {note}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("lnet", help="read LNet names and configuration strings as Lustre does")
    sub = p.add_subparsers(dest="lnet_command", metavar="WHAT")

    def add(name: str, func: Any, help_text: str, *, text: bool = True, ifs: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text)
        if text:
            sp.add_argument("text", help="the string, as written in Lustre's configuration")
        if ifs:
            sp.add_argument("--if", dest="interfaces", action="append", metavar="NAME=IPV4[,down]",
                            help="a host interface, in detection order (default: this host's)")
        sp.set_defaults(func=func)
        return sp

    sp = sub.add_parser("nid", help="canonical NIDs")
    sp.add_argument("text", nargs="+")
    sp.add_argument("--no-resolve", action="store_true", help="refuse host names instead of looking them up")
    sp.set_defaults(func=_nid)
    sp = sub.add_parser("net", help="canonical nets")
    sp.add_argument("text", nargs="+")
    sp.set_defaults(func=_net)
    sp = add("nidlist", _nidlist, "a NID list: canonical form, matching, expansion")
    sp.add_argument("--match", action="append", metavar="NID")
    sp.add_argument("--expand", action="store_true")
    sp.add_argument("--limit", type=int, default=65536)
    sp = add("networks", _networks, "a networks= string", ifs=True)
    sp.add_argument("--resolve", action="store_true", help="name the interface each NI will use")
    add("ip2nets", _ip2nets, "an ip2nets= string applied to the host's interfaces", ifs=True)
    sp = add("routes", _routes, "a routes= string")
    sp.add_argument("--local", action="append", metavar="NID", help="one of this node's NIDs")
    sp = add("check", _check, "validate an lnetctl/lu2kd YAML file and resolve it on the host", text=False, ifs=True)
    sp.add_argument("file")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

