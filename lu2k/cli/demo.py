"""``lu2k demo``: two daemons on loopback, a few hundred MB of mixed-size messages, verified.

Starts two ``lu2kd`` processes from the embedded default config (127.0.0.1@tcp and
127.0.0.2@tcp), attaches a sender endpoint to the first and a receiver (in its own
process) to the second, streams messages of mixed sizes (64 B to 4 MiB) whose contents
both sides derive from a seed, checks every byte of every message and every completion,
and prints a short table.
"""

from __future__ import annotations

import argparse
import errno
import json
import multiprocessing as mp
import random
import struct
import sys
import time
from collections import Counter, deque
from typing import Any

from ..errors import Lu2kError, ShimError
from ..localpair import daemons
from .table import render

HDR = struct.Struct("<QII")  # index, size, offset in the pattern block
PATTERN_BYTES = 8 << 20
SIZE_CLASSES = [(64, 4096, 0.45), (4096, 65536, 0.30), (65536, 1 << 20, 0.17), (1 << 20, 4 << 20, 0.08)]


def pattern(seed: int) -> bytes:
    return random.Random(seed).randbytes(PATTERN_BYTES)


def plan(seed: int, total_bytes: int) -> list[int]:
    """Message sizes (header included) adding up to about ``total_bytes``."""
    rnd = random.Random(seed + 1)
    sizes, total = [], 0
    while total < total_bytes:
        r, acc = rnd.random(), 0.0
        for lo, hi, p in SIZE_CLASSES:
            acc += p
            if r <= acc:
                break
        size = max(HDR.size, int(lo * (hi / lo) ** rnd.random()))
        sizes.append(size)
        total += size
    return sizes


def size_class(n: int) -> str:
    for lo, hi, _ in SIZE_CLASSES:
        if n < hi:
            return f"{_fmt(lo)}-{_fmt(hi)}"
    return f">={_fmt(SIZE_CLASSES[-1][1])}"


def _fmt(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K" if n >= 1024 else f"{n}B"


def receiver(shim_path: str, seed: int, count: int, results: Any) -> None:
    from ..kernel_shim.endpoint import Endpoint

    block = memoryview(pattern(seed))
    seen: set[int] = set()
    bad = 0
    nbytes = 0
    try:
        with Endpoint.attach(shim_path, portal=0) as ep:
            results.put(("ready", None))
            while len(seen) < count:
                msg = ep.recv(timeout=60)
                if msg is None:
                    raise ShimError(errno.ETIMEDOUT, f"no message for 60 s ({len(seen)} of {count} received)")
                with msg:
                    p = msg.payload
                    index, size, off = HDR.unpack_from(p)
                    body = p[HDR.size :]
                    if size != len(p) or index in seen or body != block[off : off + len(body)]:
                        bad += 1
                    seen.add(index)
                    nbytes += len(p)
        results.put(("done", {"received": len(seen), "bad": bad, "bytes": nbytes}))
    except Exception as e:  # reported to the parent, which fails the demo with it
        results.put(("error", f"{type(e).__name__}: {e}"))


def run_demo(megabytes: int, seed: int, window: int, quiet: bool = False) -> dict[str, Any]:
    from ..kernel_shim.endpoint import Endpoint

    sizes = plan(seed, megabytes * 1_000_000)
    block = pattern(seed)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"]) as (a, b):
        rx = ctx.Process(target=receiver, args=(b.shim_path, seed, len(sizes), results), daemon=True)
        rx.start()
        kind, info = results.get(timeout=60)
        if kind != "ready":
            raise Lu2kError(f"receiver failed to start: {info}")
        statuses: Counter[str] = Counter()
        per_class: Counter[str] = Counter()
        pending: deque = deque()
        rnd = random.Random(seed + 2)
        start = time.perf_counter()
        with Endpoint.attach(a.shim_path, portal=1) as ep:

            def settle(limit: int) -> None:
                while len(pending) > limit:
                    comp = pending.popleft()
                    comp.wait(120)
                    statuses["delivered" if comp.status == 0 else f"failed: {comp.reason}"] += 1

            for index, size in enumerate(sizes):
                body = size - HDR.size
                off = rnd.randrange(0, PATTERN_BYTES - body + 1)
                slot = ep.reserve(size)
                HDR.pack_into(slot.view, 0, index, size, off)
                slot.view[HDR.size :] = block[off : off + body]
                pending.append(slot.post(b.nid, portal=0))
                per_class[size_class(size)] += 1
                settle(window)
            settle(0)
        elapsed = time.perf_counter() - start
        kind, info = results.get(timeout=120)
        rx.join(10)
        if kind != "done":
            raise Lu2kError(f"receiver failed: {info}")
    total = sum(sizes)
    return {
        "messages": len(sizes), "bytes": total, "seconds": round(elapsed, 3),
        "mbytes_per_s": round(total / elapsed / 1e6, 1), "msgs_per_s": round(len(sizes) / elapsed, 1),
        "completions": dict(statuses), "received": info["received"], "corrupt": info["bad"],
        "size_classes": dict(per_class),
        "ok": statuses.get("delivered", 0) == len(sizes) and info["received"] == len(sizes) and info["bad"] == 0,
    }


def cmd_demo(args: argparse.Namespace) -> int:
    r = run_demo(args.megabytes, args.seed, args.window)
    if args.json:
        print(json.dumps(r))
    else:
        print("lu2k demo: two lu2kd on loopback (127.0.0.1@tcp -> 127.0.0.2@tcp), backend tcp, embedded default config\n")
        print(render(["size class", "messages"], sorted(r["size_classes"].items(), key=lambda kv: kv[0])))
        print()
        rows = [["messages", r["messages"]], ["payload MB", round(r["bytes"] / 1e6, 1)], ["seconds", r["seconds"]],
                ["MB/s", r["mbytes_per_s"]], ["msgs/s", r["msgs_per_s"]],
                ["completions", ", ".join(f"{k}: {v}" for k, v in r["completions"].items())],
                ["received", r["received"]], ["corrupt", r["corrupt"]], ["verdict", "every byte verified" if r["ok"] else "FAILED"]]
        print(render(["", "result"], rows))
    return 0 if r["ok"] else 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="two daemons on loopback, verified mixed-size transfer")
    p.add_argument("--megabytes", type=int, default=300, help="payload to move (default 300)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--window", type=int, default=64, help="messages in flight")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)


if __name__ == "__main__":
    sys.exit(cmd_demo(argparse.Namespace(megabytes=300, seed=1, window=64, json=False)))
