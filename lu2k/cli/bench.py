"""``lu2k bench``: measurements that print tables (never assertions).

``bench loopback``: messages of 64 B, 4 KiB and 1 MiB through the full path
shim -> lu2kd -> TCP -> lu2kd -> shim between two daemons on loopback, next to a raw Python
TCP socket moving the same messages in the same run (the ratio is the figure).  Each side
runs in its own process, as an application and the daemons would.

The applications are Python (``lu2k.kernel_shim.endpoint``) or C (``contrib/shim_stream.c`` on
``contrib/lu2k_endpoint.h``, compiled with the system's C compiler at the start of the run; the
sources are looked for in the checkout lu2k runs from, then in ``./contrib``);
``--app both`` (the default when a compiler and the C sources are there) measures the same
daemons with each.  A C endpoint is what LNet's kernel half is; the Python one costs about
2 us of CPU per message at each end, which the daemons share two cores with here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from ..errors import Lu2kError
from ..localpair import daemons, free_port
from .table import render

DEFAULT_SIZES = [64, 4096, 1 << 20]
LEN = struct.Struct("<I")


def default_count(size: int, seconds_budget: float = 3.0) -> int:
    # Enough messages to run a few seconds at the targets (1 GB/s, 100k msgs/s).
    return max(2000, min(300_000, int(seconds_budget * min(100_000, 1e9 / max(size, 1)))))


# --- lu2k path -------------------------------------------------------------------------------


def _lu2k_receiver(shim_path: str, count: int, q: Any) -> None:
    from ..kernel_shim.endpoint import Endpoint

    try:
        with Endpoint.attach(shim_path, portal=0) as ep:
            q.put("ready")
            got = nbytes = 0
            while got < count:
                msg = ep.recv(timeout=60)
                if msg is None:
                    raise Lu2kError(f"no message for 60 s after {got} of {count}")
                nbytes += len(msg.payload)
                msg.release()
                got += 1
            q.put(("done", time.perf_counter(), nbytes))
    except Exception as e:
        q.put(("error", f"{type(e).__name__}: {e}", 0))


def _lu2k_run(a: Any, b: Any, size: int, count: int, window: int) -> tuple[float, float]:
    from ..kernel_shim.endpoint import Endpoint

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rx = ctx.Process(target=_lu2k_receiver, args=(b.shim_path, count, q), daemon=True)
    rx.start()
    if q.get(timeout=60) != "ready":
        raise Lu2kError("benchmark receiver failed to attach")
    payload = bytes(size)
    pending: deque = deque()
    failures = 0
    with Endpoint.attach(a.shim_path, portal=1) as ep:
        start = time.perf_counter()
        for i in range(count):
            # Post in batches and ring the doorbell once per batch, as a busy application would.
            pending.append(ep.send(b.nid, payload, portal=0, flush=(i % 64 == 63)))
            while len(pending) > window:
                c = pending.popleft()
                c.wait(60)
                failures += c.status != 0
        ep.flush()
        while pending:
            c = pending.popleft()
            c.wait(60)
            failures += c.status != 0
    kind, end, nbytes = q.get(timeout=120)
    rx.join(10)
    if kind != "done" or failures:
        raise Lu2kError(f"benchmark run failed: {end if kind != 'done' else f'{failures} failed completions'}")
    return end - start, nbytes


# --- C applications (contrib/shim_stream.c) ---------------------------------------------------------

# Where the C sources are: the checkout this lu2k runs from, else ./contrib (an installed lu2k
# run from its checkout, as after contrib/install.sh).
CONTRIB_DIRS = [Path(__file__).resolve().parent.parent.parent / "contrib", Path("contrib")]
STREAM_SOURCE = "shim_stream.c"
APPS = ("python", "c", "both")


def _contrib() -> Path | None:
    return next((d for d in CONTRIB_DIRS if (d / STREAM_SOURCE).is_file()), None)


def c_app_unavailable() -> str | None:
    """Why the C applications cannot be built here, or None."""
    if _contrib() is None:
        return f"no {STREAM_SOURCE} in {' or '.join(str(d) for d in CONTRIB_DIRS)} (the C sources are in a checkout's contrib/)"
    if not (shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler (cc or gcc) on PATH"
    return None


def build_c_app(directory: str) -> str:
    """Compile contrib/shim_stream.c into ``directory``; returns the executable's path."""
    why = c_app_unavailable()
    contrib = _contrib()
    if why or contrib is None:
        raise Lu2kError(f"cannot build the C benchmark application: {why}")
    exe = os.path.join(directory, "shim_stream")
    cc = shutil.which("cc") or shutil.which("gcc") or "cc"
    done = subprocess.run([cc, "-std=c11", "-O2", "-Wall", f"-I{contrib}", "-o", exe, str(contrib / STREAM_SOURCE)],
                          capture_output=True, text=True)
    if done.returncode:
        raise Lu2kError(f"compiling {STREAM_SOURCE} failed: {done.stderr.strip()[-400:]}")
    return exe


def _fields(line: str, first: str) -> dict[str, int]:
    words = line.split()
    if not words or words[0] != first:
        raise Lu2kError(f"C benchmark application printed {line.strip()!r}, expected a '{first} ...' line")
    try:
        return {k: int(v) for k, v in (w.split("=", 1) for w in words[1:])}
    except ValueError:
        raise Lu2kError(f"C benchmark application printed {line.strip()!r}") from None


def _c_run(exe: str, a: Any, b: Any, size: int, count: int, window: int) -> float:
    """Seconds from the C sender's first message to the C receiver's last (one monotonic clock)."""
    from ..kernel_shim.endpoint import pack_nid

    rx = subprocess.Popen([exe, "recv", b.shim_path, "0", str(size), str(count)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        assert rx.stdout is not None
        _fields(rx.stdout.readline() or rx.communicate(timeout=10)[1], "ready")
        tx = subprocess.run([exe, "send", a.shim_path, "1", pack_nid(b.nid).hex(), "0", str(size), str(count), str(window)],
                            capture_output=True, text=True, timeout=600)
        out, err = rx.communicate(timeout=120)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    if tx.returncode or rx.returncode:
        raise Lu2kError(f"C benchmark run failed: {(tx.stderr + err).strip()[-400:]}")
    sent, received = _fields(tx.stdout, "sent"), _fields(out, "received")
    if sent.get("count") != count or received.get("count") != count or sent.get("failed"):
        raise Lu2kError(f"C benchmark run incomplete: sender {sent}, receiver {received}")
    return (received["last_ns"] - sent["start_ns"]) / 1e9


# --- raw socket baseline ----------------------------------------------------------------------------


def _raw_receiver(port: int, count: int, size: int, q: Any) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.2", port))
    srv.listen(1)
    q.put("ready")
    conn, _ = srv.accept()
    buf = bytearray(max(size + LEN.size, 1 << 20) * 2)
    view = memoryview(buf)
    have = got = 0
    while got < count:
        n = conn.recv_into(view[have:])
        if not n:
            break
        have += n
        pos = 0
        while have - pos >= LEN.size:
            (length,) = LEN.unpack_from(buf, pos)
            if have - pos < LEN.size + length:
                break
            pos += LEN.size + length
            got += 1
        buf[: have - pos] = buf[pos:have]
        have -= pos
    q.put(("done", time.perf_counter()))
    conn.close()
    srv.close()


def _raw_run(size: int, count: int) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port("127.0.0.2")
    rx = ctx.Process(target=_raw_receiver, args=(port, count, size, q), daemon=True)
    rx.start()
    q.get(timeout=30)
    s = socket.create_connection(("127.0.0.2", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = LEN.pack(size) + bytes(size)
    start = time.perf_counter()
    for _ in range(count):
        s.sendall(msg)
    kind, end = q.get(timeout=120)
    s.close()
    rx.join(10)
    return end - start


def run_loopback(sizes: list[int], counts: dict[int, int], window: int,
                 encryption: str = "aes-256-gcm", apps: tuple[str, ...] = ("python",)) -> list[dict[str, Any]]:
    """One row per size and application: lu2k's rate with that application at both ends, and the raw baseline."""
    out = []
    with tempfile.TemporaryDirectory(prefix="lu2k-bench-") as tmp, \
            daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"], tunables={"peer_credits": 256, "credits": 1024},
                    extra_net={"options": {"encryption": encryption}}) as (a, b):
        exe = build_c_app(tmp) if "c" in apps else ""
        for size in sizes:
            count = counts.get(size) or default_count(size)
            for app in apps:
                if app == "c":
                    _c_run(exe, a, b, size, min(count, 1000), window)  # warm-up: connections, caches
                    secs = _c_run(exe, a, b, size, count, window)
                else:
                    _lu2k_run(a, b, size, min(count, 1000), window)
                    secs, _ = _lu2k_run(a, b, size, count, window)
                out.append({"size": size, "count": count, "app": app, "msgs_per_s": round(count / secs, 1),
                            "mbytes_per_s": round(count * size / secs / 1e6, 1)})
            base = _raw_run(size, count)
            for row in out[-len(apps):]:
                row["baseline_msgs_per_s"] = round(count / base, 1)
                row["baseline_mbytes_per_s"] = round(count * size / base / 1e6, 1)
    return out


def loopback_apps(choice: str | None) -> tuple[str, ...]:
    """The applications a run uses: ``both`` when not chosen and the C one can be built."""
    if choice is None:
        return ("python", "c") if c_app_unavailable() is None else ("python",)
    if choice == "c" and (why := c_app_unavailable()):
        raise Lu2kError(f"--app c: {why}")
    return ("python", "c") if choice == "both" else (choice,)


def cmd_loopback(args: argparse.Namespace) -> int:
    sizes = args.sizes or DEFAULT_SIZES
    bad = [s for s in sizes if s < 1] + ([args.count] if args.count is not None and args.count < 1 else []) + \
        ([args.window] if args.window < 1 else [])
    if bad:
        raise Lu2kError(f"--sizes, --count and --window must be at least 1, not {bad[0]}")
    apps = loopback_apps(getattr(args, "app", None))
    results = run_loopback(sizes, {s: args.count for s in sizes} if args.count else {}, args.window, args.encryption, apps)
    rows = [[r["size"], r["app"], r["count"], r["msgs_per_s"], r["mbytes_per_s"], r["baseline_mbytes_per_s"],
             f"{r['mbytes_per_s'] / r['baseline_mbytes_per_s']:.2f}" if r["baseline_mbytes_per_s"] else "-"] for r in results]
    print(render(["size B", "app", "messages", "lu2k msgs/s", "lu2k MB/s", "raw TCP MB/s", "ratio"], rows))
    print(f"hot path: {hot_path()}")
    if apps == ("python",) and getattr(args, "app", None) is None:
        print(f"C application: not run ({c_app_unavailable()})")
    if args.json:
        print(json.dumps({"results": results, "hot_path": hot_path()}))
    return 0


def hot_path() -> str:
    """Whether the daemons run the compiled per-message modules (they load what this process does)."""
    from .. import hotpath

    return "compiled" if hotpath.compiled() else f"pure ({hotpath.why_pure})"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = sub.add_parser("bench", help="benchmarks (printed tables)")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    lb = bsub.add_parser("loopback", help="full path between two daemons on loopback vs raw TCP")
    lb.add_argument("--sizes", type=int, nargs="*", help="message sizes in bytes (default 64 4096 1048576)")
    lb.add_argument("--count", type=int, help="messages per size (default: a few seconds' worth)")
    lb.add_argument("--window", type=int, default=512, help="messages in flight")
    lb.add_argument("--app", choices=APPS, help="the applications at both ends: python (lu2k.kernel_shim.endpoint), "
                    "c (contrib/shim_stream.c, built with cc) or both (default when a C compiler is there)")
    lb.add_argument("--encryption", choices=("aes-256-gcm", "none"), default="aes-256-gcm",
                    help="frame encryption on the tcp hop (default aes-256-gcm, the daemon's default)")
    lb.add_argument("--json", action="store_true", help="last line: JSON results")
    lb.set_defaults(func=cmd_loopback)
    # Other benchmarks (the link lab's ``link``, ``matrix``, ``latency`` and ``transfer``) register themselves here.
    for name in ("lu2k.lab.bench", "lu2k.lab.latency", "lu2k.lab.transfer_bench", "lu2k.lab.rails_bench"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register_bench(bsub)  # def register_bench(bench_subparsers) -> None


if __name__ == "__main__":
    sys.exit(cmd_loopback(argparse.Namespace(sizes=None, count=None, window=512, encryption="aes-256-gcm", app=None, json=False)))
