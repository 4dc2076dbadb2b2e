"""``lu2k lab ...``: bring emulated satellite links up and down, run things on them, flap them.

    lu2k lab up --profile geo --loss 1%          # prints the lab id, namespaces, addresses
    lu2k lab exec a -- python3 -m http.server    # run in namespace a (or b) of the lab
    lu2k lab link down; lu2k lab link up         # flap the link (both directions)
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
from ..lab.args import add_link_options, profile_summary, specs_from_args
from ..lab.spec import format_rate


def _pick(lab_id: str | None) -> Lab:
    if lab_id:
        return Lab.attach(lab_id)
    live = [st for st in list_labs() if forwarder_alive(st.pid)]
    if not live:
        raise LabError("no lab is up ('lu2k lab up' starts one)")
    if len(live) > 1:
        raise ConfigError(f"{len(live)} labs are up ({', '.join(s.lab_id for s in live)}): say which with --id", where="--id")
    return Lab.attach(live[0].lab_id)


def _describe(lab: Lab) -> str:
    st = lab.state
    ab = st.specs[0]
    loss = f"{ab.loss * 100:g}%" + (f" + bursts {ab.burst.mean_loss * 100:g}%" if ab.burst else "")
    return (
        f"lab {st.lab_id}: {format_rate(ab.rate_bps)} per direction, RTT {ab.rtt_s * 1e3:g} ms, loss {loss} each way, "
        f"queue {ab.effective_queue_bytes()} bytes\n"
        f"  a: netns {st.ns['a']}  dev {st.dev['a']}  {st.addr['a']}\n"
        f"  b: netns {st.ns['b']}  dev {st.dev['b']}  {st.addr['b']}\n"
        f"  run:  lu2k lab exec --id {st.lab_id} a -- COMMAND   (or: ip netns exec {st.ns['a']} COMMAND)\n"
        f"  stop: lu2k lab down --id {st.lab_id}"
    )


def cmd_up(args: argparse.Namespace) -> int:
    lab = Lab(specs_from_args(args), args.id, profile=profile_summary(args))
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
        ab = r["specs"]["ab"]
        state = "up" if r["alive"] else "STALE (forwarder gone; 'lu2k lab down' cleans up)"
        print(f"{r['id']}: {state}, pid {r['pid']}, {format_rate(ab['rate_bps'])}, RTT {ab['delay_s'] * 2e3:g} ms, "
              f"loss {ab['loss'] * 100:g}%, {r['ns']['a']} {r['addr']['a']} <-> {r['ns']['b']} {r['addr']['b']}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    lab = _pick(args.id)
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ConfigError("nothing to run: lu2k lab exec a -- COMMAND ...", where="exec")
    env = dict(os.environ, LU2K_LAB_ID=lab.lab_id, LU2K_LAB_SELF=lab.state.addr[args.side],
               LU2K_LAB_PEER=lab.state.addr["b" if args.side == "a" else "a"])
    return subprocess.call(lab.exec_argv(args.side, argv), env=env)


def cmd_link(args: argparse.Namespace) -> int:
    lab = _pick(args.id)
    reply = lab.set_link(args.state == "up", args.direction)
    print(json.dumps(reply["up"]))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    lab = _pick(args.id)
    print(json.dumps(lab.stats(), indent=None if args.compact else 1))
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from ..lab.selftest import format_table, run_selftest

    rows = run_selftest(duration=args.duration)
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
    link.set_defaults(func=cmd_link)

    stats = sub.add_parser("stats", help="the forwarder's counters: packets, queue/loss drops, lateness")
    stats.add_argument("--id")
    stats.add_argument("--compact", action="store_true")
    stats.set_defaults(func=cmd_stats)

    st = sub.add_parser("selftest", help="measure the emulator's own ceiling (UDP blast through an uncapped link)")
    st.add_argument("--duration", type=float, default=5.0)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_selftest)


if __name__ == "__main__":  # pragma: no cover - convenience
    from .main import main

    sys.exit(main(["lab", *sys.argv[1:]]))
