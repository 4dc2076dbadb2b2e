"""The long fuzz run: every property of a hypothesis fuzz module to N cases, in shards.

Properties are taken in the order given (``--only``, else the module's), each to
``--cases`` before the next starts, so a run cut short by its deadline leaves whole
properties done rather than every property part-way.  Each shard is one pytest run of one property with ``LU2K_FUZZ_EXAMPLES=<shard>`` and its own
``--hypothesis-seed``, so a property's cases add up across shards and across machines, and
an interrupted run keeps what it finished.  Shards run ``--jobs`` at a time (each on one
core), cheapest property first, and stop being started at ``--deadline`` (seconds from now).
One JSON line per finished shard goes to ``--log``; the last line printed is the summary:
cases per property and whether every shard passed.

    PYTHONPATH=$PWD python tests/fuzz_long.py --cases 1000000 --jobs 2 --log fuzz.jsonl tests/test_fuzz_wire.py
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path


def properties(module: Path) -> list[str]:
    tree = ast.parse(module.read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
            and any(isinstance(d, ast.Name) and d.id == "FUZZ" for d in n.decorator_list)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("module", type=Path)
    p.add_argument("--cases", type=int, default=1_000_000, help="cases per property")
    p.add_argument("--shard", type=int, default=25_000, help="cases per pytest run")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--deadline", type=float, default=0.0, help="start no shard after this many seconds (0: none)")
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--only", nargs="*", default=None, help="property names (default: all of the module's)")
    args = p.parse_args(argv)
    props = args.only or properties(args.module)
    done: dict[str, int] = {name: 0 for name in props}
    failed: list[dict[str, object]] = []
    if args.log.exists():  # resume: count what earlier runs finished
        for line in args.log.read_text().splitlines():
            r = json.loads(line)
            if r["property"] in done and r["passed"]:
                done[r["property"]] += r["cases"]
    lock = threading.Lock()
    seed_base = int(time.time())
    counter = iter(range(1 << 30))
    stop_at = time.monotonic() + args.deadline if args.deadline else float("inf")

    def next_job() -> tuple[str, int] | None:
        with lock:
            left = [n for n in props if done[n] < args.cases]
            if not left or time.monotonic() > stop_at:
                return None
            name = left[0]  # in the order given: each property complete before the next
            done[name] += args.shard  # reserved; corrected on completion
            return name, seed_base + next(counter)

    def worker() -> None:
        while (job := next_job()) is not None:
            name, seed = job
            t0 = time.monotonic()
            env = dict(os.environ, LU2K_FUZZ_EXAMPLES=str(args.shard))
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=0",
                                   "--hypothesis-show-statistics", f"--hypothesis-seed={seed}", f"{args.module}::{name}"],
                                  env=env, capture_output=True, text=True)
            # The cases hypothesis actually ran (its statistics), not the number asked for.
            ran = sum(int(n) for n in re.findall(r"(\d+) passing", proc.stdout))
            rec = {"property": name, "seed": seed, "cases": ran, "passed": proc.returncode == 0,
                   "seconds": round(time.monotonic() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            with lock:
                done[name] += ran - args.shard
                if proc.returncode != 0:
                    done[name] -= ran
                    rec["output"] = proc.stdout[-4000:]
                    failed.append(rec)
                with args.log.open("a") as f:
                    f.write(json.dumps(rec) + "\n")

    threads = [threading.Thread(target=worker) for _ in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"cases_per_property": done, "failed_shards": len(failed)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
