#!/usr/bin/env python3
"""Run many seeded simulations of lu2k's message layer and check every invariant.

    python benchmarks/sim_sweep.py --seeds 1000000 --jobs 2      # the long sweep
    python benchmarks/sim_sweep.py --seeds 20000 --start 500000  # another range
    python benchmarks/sim_sweep.py --replay 1773                  # one seed, in detail
    python benchmarks/sim_sweep.py --seeds 20000 --nat            # A behind NAT (docs/nat.md)

A progress line goes to stderr every few seconds; the summary (seeds, fault mix, outcome
mix, wall time, failing seeds) to stdout, as JSON with ``--json``.  Exit status 1 if any
seed broke an invariant.  See docs/simulation.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lu2k.sim.world import FAULTS, Violation, World  # noqa: E402

CHUNK = 500
NAT = False  # --nat: the world where A cannot be connected to (set before the workers fork)


def run_chunk(bounds: tuple[int, int]) -> dict[str, Any]:
    """Run seeds [start, end); return counts and the failures (seed, text)."""
    start, end = bounds
    faults: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[tuple[int, str]] = []
    events = messages = liveness = two_gateways = rerouted = rerouted_worlds = 0
    for seed in range(start, end):
        w = World(seed, nat=NAT)
        for f in w.faults.enabled:
            faults[f] += 1
        liveness += w.liveness
        two_gateways += w.two_gateways
        try:
            r = w.run()
        except Violation as e:
            failures.append((seed, str(e)))
            continue
        except Exception as e:  # a crash of the core is a failure of the seed too
            failures.append((seed, f"seed {seed}: {type(e).__name__}: {e}"))
            continue
        events += r.events
        messages += r.messages
        rerouted += r.rerouted
        rerouted_worlds += r.rerouted > 0
        outcomes.update(r.completions)
    return {"seeds": end - start, "faults": faults, "outcomes": outcomes, "failures": failures, "events": events,
            "messages": messages, "liveness": liveness, "two_gateways": two_gateways, "rerouted": rerouted,
            "rerouted_worlds": rerouted_worlds}


def replay(seed: int) -> int:
    w = World(seed, nat=NAT)
    print(f"seed {seed}: faults {w.faults.label()}, liveness run {w.liveness}, latency {w.latency}, "
          f"multi-rail {w.multirail}, two gateways {w.two_gateways}, params {w.params}")
    try:
        r = w.run()
    except Violation as e:
        print(f"VIOLATION: {e}")
        return 1
    print(f"ok: {r.messages} messages, {r.events} events, {r.sim_time:.2f} simulated seconds, outcomes {r.completions}, "
          f"{r.rerouted} moved to the other gateway")
    for mid, rec in sorted(w.records.items()):
        status = rec.status.name if rec.status is not None else "CRASHED"
        print(f"  {mid:4d} {rec.origin} portal {rec.portal}: {status} ({rec.reason}){' received' if mid in w.received else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10_000, help="number of seeds to run")
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    ap.add_argument("--replay", type=int, metavar="SEED", help="run one seed and print what happened")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--nat", action="store_true", help="A sits behind NAT: G reaches it over A's own connection")
    ap.add_argument("--progress", type=float, default=10.0, metavar="S", help="seconds between progress lines")
    args = ap.parse_args(argv)
    global NAT
    NAT = args.nat
    if args.replay is not None:
        return replay(args.replay)
    if args.seeds < 1 or args.jobs < 1:
        ap.error("--seeds and --jobs must be positive")
    chunks = [(s, min(s + CHUNK, args.start + args.seeds)) for s in range(args.start, args.start + args.seeds, CHUNK)]
    total: dict[str, Any] = {"seeds": 0, "faults": collections.Counter(), "outcomes": collections.Counter(), "failures": [],
                             "events": 0, "messages": 0, "liveness": 0, "two_gateways": 0, "rerouted": 0, "rerouted_worlds": 0}
    t0 = last = time.monotonic()
    with multiprocessing.Pool(args.jobs) as pool:
        for part in pool.imap_unordered(run_chunk, chunks):
            for key in ("seeds", "events", "messages", "liveness", "two_gateways", "rerouted", "rerouted_worlds"):
                total[key] += part[key]
            total["faults"].update(part["faults"])
            total["outcomes"].update(part["outcomes"])
            total["failures"].extend(part["failures"])
            for _seed, text in part["failures"]:
                print(f"FAILED {text}", file=sys.stderr, flush=True)
            now = time.monotonic()
            if now - last >= args.progress:
                last = now
                rate = total["seeds"] / (now - t0)
                eta = (args.seeds - total["seeds"]) / rate if rate else 0
                print(f"[{now - t0:7.0f}s] {total['seeds']:,}/{args.seeds:,} seeds, {rate:,.0f}/s, "
                      f"{len(total['failures'])} failures, eta {eta:,.0f}s", file=sys.stderr, flush=True)
    wall = time.monotonic() - t0
    failures = sorted(total["failures"])
    summary = {
        "seeds": total["seeds"], "first_seed": args.start, "jobs": args.jobs, "wall_s": round(wall, 1),
        "ms_per_seed_per_job": round(wall * args.jobs / max(1, total["seeds"]) * 1000, 3),
        "messages": total["messages"], "events": total["events"], "liveness_runs": total["liveness"],
        "two_gateway_worlds": total["two_gateways"], "rerouted_messages": total["rerouted"],
        "worlds_with_reroutes": total["rerouted_worlds"],
        "fault_mix": {f: total["faults"][f] for f in FAULTS}, "outcomes": dict(total["outcomes"]),
        "failures": len(failures), "failing_seeds": [s for s, _ in failures[:50]],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"seeds {summary['seeds']:,} (from {args.start}) in {wall:,.0f} s on {args.jobs} jobs "
              f"({summary['ms_per_seed_per_job']} ms/seed/job); {summary['messages']:,} messages, {summary['events']:,} events")
        print(f"two-gateway worlds {summary['two_gateway_worlds']:,}; messages moved to the other gateway before "
              f"they were sent {summary['rerouted_messages']:,}, in {summary['worlds_with_reroutes']:,} worlds")
        print(f"liveness runs {summary['liveness_runs']:,}; fault mix (seeds with each fault): "
              + ", ".join(f"{f} {n:,}" for f, n in summary["fault_mix"].items()))
        print("outcomes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(summary["outcomes"].items())))
        print(f"failures: {len(failures)}")
        for _seed, text in failures[:10]:
            print(f"  {text}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
