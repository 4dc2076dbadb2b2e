#!/usr/bin/env python3
"""Shim-only throughput: endpoint -> daemon (loopback handler) -> endpoint, three processes.

This measures the kernel-shim half alone (rings, pools, doorbells, the daemon's copy from
the sender's TX slot into the receiver's RX slot), without TCP; ``lu2k bench loopback``
measures the whole path through two daemons.  Prints a table; asserts nothing.

    python benchmarks/shim_bench.py [--sizes 64,4096,65536,1048576] [--seconds 3] [--window 512]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Any

from lu2k.kernel_shim.endpoint import Endpoint


def receiver(path: str, count: int, q: Any) -> None:
    with Endpoint.attach(path, portal=2) as ep:
        q.put("ready")
        got = nbytes = 0
        while got < count:
            m = ep.recv(timeout=60)
            if m is None:
                q.put(("error", f"no message for 60 s after {got}"))
                return
            nbytes += len(m.payload)
            m.release()
            got += 1
        q.put(("done", time.perf_counter(), nbytes, ep.stats()["kicks"]))


def run(path: str, size: int, count: int, window: int, batch: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rx = ctx.Process(target=receiver, args=(path, count, q), daemon=True)
    rx.start()
    assert q.get(timeout=60) == "ready"
    payload = os.urandom(size)
    pending: deque = deque()
    failed = 0
    with Endpoint.attach(path, portal=1) as ep:
        dst = ep.local_nid.to_bytes()
        start = time.perf_counter()
        for i in range(count):
            pending.append(ep.send(dst, payload, portal=2, flush=(i % batch == batch - 1)))
            while len(pending) > window:
                c = pending.popleft()
                c.wait(60)
                failed += c.status != 0
        ep.flush()
        while pending:
            c = pending.popleft()
            c.wait(60)
            failed += c.status != 0
        tx_kicks = ep.stats()["kicks"]
        daemon = ep.daemon_stats()
    result = q.get(timeout=120)
    rx.join(10)
    if result[0] != "done" or failed:
        raise SystemExit(f"run failed: {result} failed={failed}")
    elapsed = result[1] - start
    return {"size": size, "count": count, "msgs_s": count / elapsed, "MB_s": result[2] / elapsed / 1e6,
            "kicks_per_1k": 1000 * (tx_kicks + result[3]) / count, "notifies_per_1k": 1000 * daemon["notifies_out"] / count}


class _CompleteAtOnce:
    """An engine stand-in that completes every request immediately (measures shim cost only)."""

    def __init__(self, nid: bytes) -> None:
        self.nid = nid

    def local_nid(self) -> bytes:
        return self.nid

    def on_attach(self, port: Any) -> None:
        return None

    def on_detach(self, port: Any) -> None:
        return None

    def on_rx_space(self, port: Any) -> None:
        return None

    def on_submit(self, port: Any, reqs: list[Any]) -> None:
        from lu2k.errors import Status

        for r in reqs:
            port.complete(r, Status.DELIVERED)


async def _cpu_per_message(size: int, count: int) -> float:
    """CPU seconds per message for endpoint (asyncio) + daemon side in one process."""
    from lu2k.kernel_shim.endpoint import AsyncEndpoint
    from lu2k.kernel_shim.server import ShimServer
    from lu2k.nid import parse_nid

    nid = parse_nid("0@lo").to_bytes()
    with tempfile.TemporaryDirectory() as d:
        server = ShimServer(os.path.join(d, "cpu.sock"), _CompleteAtOnce(nid))
        await server.start()
        ep = await AsyncEndpoint.attach(server.path, 1)
        payload = os.urandom(size)
        pending = []
        t0 = time.process_time()
        for i in range(count):
            pending.append(await ep.send(nid, payload, portal=1, flush=(i % 64 == 63)))
            if len(pending) >= 512:
                for c in pending:
                    await c.wait()
                pending.clear()
        for c in pending:
            await c.wait()
        cpu = time.process_time() - t0
        await ep.detach()
        await server.close()
    return cpu / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,4096,65536,1048576")
    ap.add_argument("--seconds", type=float, default=3.0, help="rough duration per size")
    ap.add_argument("--window", type=int, default=512, help="messages in flight")
    ap.add_argument("--batch", type=int, default=64, help="posts per doorbell (flush)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "shim.sock")
        daemon = subprocess.Popen([sys.executable, "-m", "lu2k.kernel_shim.loopback", "--path", path], stdout=subprocess.PIPE)
        try:
            assert daemon.stdout is not None
            daemon.stdout.readline()  # "shim loopback server on ..."
            rows = []
            for size in sizes:
                count = max(2000, min(400_000, int(args.seconds * min(60_000, 2e9 / max(size, 1)))))
                rows.append(run(path, size, count, args.window, args.batch))
        finally:
            daemon.terminate()
            daemon.wait()
    print(f"{'size':>9} {'count':>8} {'msgs/s':>10} {'MB/s':>9} {'kicks/1k':>9} {'notifies/1k':>12}")
    for r in rows:
        print(f"{r['size']:>9} {r['count']:>8} {r['msgs_s']:>10.0f} {r['MB_s']:>9.1f} {r['kicks_per_1k']:>9.2f} {r['notifies_per_1k']:>12.2f}")
    print(f"(cpus: {os.cpu_count()}; load average {os.getloadavg()[0]:.1f} -- other work on the machine makes these noisy)")
    print()
    print("CPU per message, asyncio endpoint + daemon side in one process, engine completing at once:")
    for size in sizes:
        n = max(2000, min(100_000, int(2e8 / max(size, 1))))
        print(f"{size:>9} B: {asyncio.run(_cpu_per_message(size, n)) * 1e6:8.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
