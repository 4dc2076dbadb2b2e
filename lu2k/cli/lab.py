"""``lu2k lab ...``: bring emulated satellite links up and down, run things on them, flap them.

    lu2k lab up --profile geo --loss 1%          # prints the lab id, namespaces, addresses
    lu2k lab up --profile geo --loss 1% --second-path leo --second-loss 1% --ipv6
                                                 # two paths (GEO and LEO), IPv6 on both
    lu2k lab exec a -- python3 -m http.server    # run in namespace a (or b) of the lab
    lu2k lab link down; lu2k lab link up         # flap the link (path 0, both directions)
    lu2k lab link down --path 1                  # cut the second path only (or --path all)
    lu2k lab stats                               # the forwarder's counters (JSON)
    lu2k lab status                              # labs that are up
    lu2k lab down [--all]
    lu2k lab selftest                            # the emulator's own ceiling

Commands that act on one lab take ``--id``; without it they use the only lab that is up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from ..errors import ConfigError
from ..lab.netns import Lab, LabError, cleanup_stale, forwarder_alive, list_labs, remove_lab_files, teardown
from ..lab.args import (
    add_host_tuning, add_link_options, add_path_options, extra_paths_from_args, host_tuning_from_args, profile_summary,
    second_path_summary, specs_from_args,
)
from ..lab.spec import LinkSpec, format_rate


def _pick(lab_id: str | None) -> Lab:
    if lab_id:
        return Lab.attach(lab_id)
    live = [st for st in list_labs() if forwarder_alive(st.pid)]
    if not live:
        raise LabError("no lab is up ('lu2k lab up' starts one)")
    if len(live) > 1:
        raise ConfigError(f"{len(live)} labs are up ({', '.join(s.lab_id for s in live)}): say which with --id", where="--id")
    return Lab.attach(live[0].lab_id)


def _link_summary(ab: LinkSpec) -> str:
    loss = f"{ab.loss * 100:g}%" + (f" + bursts {ab.burst.mean_loss * 100:g}%" if ab.burst else "")
    return (f"{format_rate(ab.rate_bps)} per direction, RTT {ab.rtt_s * 1e3:g} ms, loss {loss} each way, "
            f"queue {ab.effective_queue_bytes()} bytes")


def _describe(lab: Lab) -> str:
    st = lab.state
    lines = [f"lab {st.lab_id}: {len(st.paths)} path(s); netns a: {st.ns['a']}, netns b: {st.ns['b']}"]
    for i, (ab, _) in enumerate(st.paths):
        lines.append(f"  path {i}: {_link_summary(ab)}")
        for side in ("a", "b"):
            v6 = f"  {st.addrs6[i][side]}" if st.ipv6 else ""
            lines.append(f"    {side}: dev {st.devs[i][side]}  {st.addrs[i][side]}{v6}")
    if st.initcwnd or st.rmem_default:
        tuned = [f"initcwnd/initrwnd {st.initcwnd}" if st.initcwnd else "", f"tcp_rmem default {st.rmem_default}" if st.rmem_default else ""]
        lines.append("  both sites' kernel TCP: " + ", ".join(t for t in tuned if t))
    lines += [
        f"  run:  lu2k lab exec --id {st.lab_id} a -- COMMAND   (or: ip netns exec {st.ns['a']} COMMAND)",
        f"  stop: lu2k lab down --id {st.lab_id}",
    ]
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    tuning = host_tuning_from_args(args)
    lab = Lab(specs_from_args(args), args.id, profile={**profile_summary(args), **second_path_summary(args)},
              extra_paths=extra_paths_from_args(args), ipv6=args.ipv6, initcwnd=tuning["initcwnd"],
              rmem_default=tuning["rmem_default"])
    lab.up(detach=True)
    if args.json:
        print(json.dumps(lab.state.to_dict()))
    else:
        print(_describe(lab))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    removed = cleanup_stale(min_age=0.0)
    for lab_id in removed:
        print(f"lab {lab_id}: forwarder was gone; cleaned up")
    if args.all:
        for st in list_labs():
            if forwarder_alive(st.pid):
                Lab.attach(st.lab_id).down()
            else:
                teardown(st)
            remove_lab_files(st.lab_id)
            print(f"lab {st.lab_id}: down")
        return 0
    if args.id is None and not any(forwarder_alive(s.pid) for s in list_labs()):
        print("no lab is up")
        return 0
    lab = _pick(args.id)
    final = lab.down()
    print(f"lab {lab.lab_id}: down")
    if final and args.stats:
        print(json.dumps(final))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    labs = list_labs()
    rows = []
    for st in labs:
        alive = forwarder_alive(st.pid)
        rows.append({**st.to_dict(), "alive": alive})
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no labs")
    for r in rows:
        state = "up" if r["alive"] else "STALE (forwarder gone; 'lu2k lab down' cleans up)"
        for p in r["paths"]:
            ab = p["specs"]["ab"]
            v6 = f" ({p['addr6']['a']} <-> {p['addr6']['b']})" if "addr6" in p else ""
            print(f"{r['id']}: {state}, pid {r['pid']}, path {p['path']}: {format_rate(ab['rate_bps'])}, "
                  f"RTT {ab['delay_s'] * 2e3:g} ms, loss {ab['loss'] * 100:g}%, "
                  f"{r['ns']['a']} {p['addr']['a']} <-> {r['ns']['b']} {p['addr']['b']}{v6}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    lab = _pick(args.id)
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ConfigError("nothing to run: lu2k lab exec a -- COMMAND ...", where="exec")
    env = dict(os.environ, **exec_env(lab, args.side))
    return subprocess.call(lab.exec_argv(args.side, argv), env=env)


def exec_env(lab: Lab, side: str) -> dict[str, str]:
    """``LU2K_LAB_SELF``/``_PEER`` (path 0), ``..._<i>`` per path, ``..._6`` for IPv6."""
    st, peer = lab.state, "b" if side == "a" else "a"
    env = {"LU2K_LAB_ID": lab.lab_id, "LU2K_LAB_PATHS": str(len(st.paths)),
           "LU2K_LAB_SELF": st.addr[side], "LU2K_LAB_PEER": st.addr[peer]}
    for i, addr in enumerate(st.addrs):
        env[f"LU2K_LAB_SELF_{i}"], env[f"LU2K_LAB_PEER_{i}"] = addr[side], addr[peer]
    for i, addr in enumerate(st.addrs6):
        env[f"LU2K_LAB_SELF6_{i}"], env[f"LU2K_LAB_PEER6_{i}"] = addr[side], addr[peer]
        if i == 0:
            env["LU2K_LAB_SELF6"], env["LU2K_LAB_PEER6"] = addr[side], addr[peer]
    return env


def _path_option(text: str, lab: Lab) -> int | str:
    if text == "all":
        return "all"
    if not text.isdigit() or int(text) >= lab.n_paths:
        raise ConfigError(f"lab {lab.lab_id} has path(s) 0..{lab.n_paths - 1} (or all), not {text!r}", where="--path")
    return int(text)


def cmd_link(args: argparse.Namespace) -> int:
    lab = _pick(args.id)
    reply = lab.set_link(args.state == "up", args.direction, _path_option(args.path, lab))
    print(json.dumps(reply["paths"] if args.path == "all" else reply["up"]))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    lab = _pick(args.id)
    print(json.dumps(lab.stats(), indent=None if args.compact else 1))
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from ..lab.netns import MAX_PATHS
    from ..lab.selftest import format_table, run_multipath_selftest, run_selftest

    if not 1 <= args.paths <= MAX_PATHS:
        raise ConfigError(f"a lab has 1..{MAX_PATHS} paths, not {args.paths}", where="--paths")
    rows = run_selftest(duration=args.duration)
    if args.paths > 1:
        rows += run_multipath_selftest(args.paths, duration=args.duration)
    print(format_table(rows))
    if args.json:
        print(json.dumps(rows))
    return 0


def register(subparsers: Any) -> None:
    lab = subparsers.add_parser("lab", help="emulated satellite links between network namespaces",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)

    up = sub.add_parser("up", help="create a lab: two namespaces joined by an emulated link")
    add_link_options(up)
    add_path_options(up)
    add_host_tuning(up)
    up.add_argument("--id", help="lab id (1-8 of a-z0-9; default random)")
    up.add_argument("--json", action="store_true", help="print the lab state as JSON")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="tear a lab down (and any stale ones)")
    down.add_argument("--id")
    down.add_argument("--all", action="store_true", help="every lab in the state directory")
    down.add_argument("--stats", action="store_true", help="print the forwarder's final counters")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="list labs")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    ex = sub.add_parser("exec", help="run a command in namespace a or b (env: LU2K_LAB_SELF, LU2K_LAB_PEER)")
    ex.add_argument("--id")
    ex.add_argument("side", choices=["a", "b"])
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_exec)

    link = sub.add_parser("link", help="set the emulated link down or up (a flap)")
    link.add_argument("--id")
    link.add_argument("state", choices=["up", "down"])
    link.add_argument("--direction", choices=["ab", "ba", "both"], default="both")
    link.add_argument("--path", default="0", help="which path: 0 (default), 1, ... or all")
    link.set_defaults(func=cmd_link)

    stats = sub.add_parser("stats", help="the forwarder's counters: packets, queue/loss drops, lateness")
    stats.add_argument("--id")
    stats.add_argument("--compact", action="store_true")
    stats.set_defaults(func=cmd_stats)

    st = sub.add_parser("selftest", help="measure the emulator's own ceiling (UDP blast through an uncapped link)")
    st.add_argument("--duration", type=float, default=5.0)
    st.add_argument("--paths", type=int, default=1, help="also blast every path of a lab with this many paths at once (2..4)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_selftest)


if __name__ == "__main__":  # pragma: no cover - convenience
    from .main import main

    sys.exit(main(["lab", *sys.argv[1:]]))
