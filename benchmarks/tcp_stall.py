"""Connections the tcp backend ends by itself on a lossy link that never went down.  Needs root.

Runs ``--runs`` transfers through two ``lu2kd`` over the emulated link (a fresh lab and fresh
daemons each run, a different loss seed each run), and counts, from both daemons' logs up to
the end of the transfer, how many connections were ended or lost: stall detections (a
connection declared dead) and the resets the other side then saw.  On a link with steady
random loss and no outage the right count is 0; the stall detector may only act on a peer or
path that has gone quiet.

    python benchmarks/tcp_stall.py --rtt 100ms --loss 5% --dead-timeout 3 --runs 4
    python benchmarks/tcp_stall.py --rtt 600ms --loss 1% --dead-timeout 10 --count 1000

Prints one line per run and a total; ``--json`` adds them as JSON.  Not a speed measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EVENTS = ("connection lost", "closing connection", "connect failed")


def one_run(rtt: str, loss: str, rate: str, dead_timeout: float, count: int, seed: int) -> dict[str, Any]:
    from lu2k.lab.bench import LabDaemons, transfer
    from lu2k.lab.netns import Lab
    from lu2k.lab.spec import build_specs

    specs = build_specs("custom", rate=rate, rtt=rtt, loss=loss, seed=seed)
    with tempfile.TemporaryDirectory(prefix="lu2k-tcp-stall-") as d:
        workdir = Path(d)
        t0 = time.monotonic()
        with Lab(specs, lab_id="ts" + secrets.token_hex(2)) as lab:
            with LabDaemons(lab, "tcp", workdir, extra_options={"dead_timeout": dead_timeout}) as daemons:
                r = transfer(lab, daemons, size=65536, window=64, count=count, verify=True, timeout=max(300.0, count / 5))
                lines = [line for side in ("a", "b") for line in (workdir / f"lu2kd-{side}.log").read_text(errors="replace").splitlines()
                         if any(e in line for e in EVENTS)]
    return {"seed": seed, "seconds": round(time.monotonic() - t0, 1), "messages": count,
            "delivered_once": r["messages"] == count and r["duplicates"] == 0 and r["corrupt"] == 0 and r["sender"]["delivered"] == count,
            "connections_ended": len(lines), "events": lines}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rtt", default="100ms")
    ap.add_argument("--loss", default="5%")
    ap.add_argument("--rate", default="20mbit")
    ap.add_argument("--dead-timeout", type=float, default=3.0, help="the tcp backend's dead_timeout, seconds")
    ap.add_argument("--count", type=int, default=600, help="64 KiB messages per run")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("tcp_stall.py: needs root (network namespaces for the lab)", file=sys.stderr)
        return 2
    rows = []
    for seed in range(1, args.runs + 1):
        row = one_run(args.rtt, args.loss, args.rate, args.dead_timeout, args.count, seed)
        rows.append(row)
        print(f"run {seed}: {row['seconds']} s, {row['messages']} messages, delivered once: {row['delivered_once']}, "
              f"connections ended: {row['connections_ended']}", flush=True)
        for line in row["events"]:
            print(f"    {line[:200]}")
    total = sum(r["connections_ended"] for r in rows)
    print(f"{args.rate}, {args.rtt} RTT, {args.loss} loss, dead_timeout {args.dead_timeout:g} s: "
          f"{total} connection(s) ended in {len(rows)} runs; runs with one or more: {sum(1 for r in rows if r['connections_ended'])}")
    if args.json:
        print(json.dumps({"rate": args.rate, "rtt": args.rtt, "loss": args.loss, "dead_timeout": args.dead_timeout, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
