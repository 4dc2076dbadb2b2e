"""Per-message CPU cost of each stage on the ``lu2k bench loopback`` path.

Runs two daemons on loopback (as ``lu2k bench loopback`` does), sends ``--count`` messages of
``--size`` bytes from an application process to one in another process, and reports:

* each process's CPU time per message (sender app, daemon A, daemon B, receiver app), read
  from ``/proc/<pid>/stat`` and ``os.times()``; with ``--app c`` the two applications are
  ``contrib/shim_stream.c`` child processes and are reported together;
* with ``--py-spy`` (``pip install py-spy``), each daemon's CPU split by the lu2k module that
  was running (innermost lu2k frame of every sample; samples waiting in ``epoll`` are idle and
  left out), scaled to microseconds per message.

It prints a table; ``--json`` adds the figures as the last line.  A measurement, not a test.

    PYTHONPATH=$PWD python benchmarks/loopback_profile.py --size 64 --count 150000 --py-spy
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from lu2k import hotpath
from lu2k.cli import bench
from lu2k.errors import Lu2kError
from lu2k.localpair import daemons

# (stage, frame fragments), first match from the innermost frame outwards.  A module compiled by
# mypyc (lu2k.hotpath) shows up in --native samples as its C functions, CPyDef_<module>___<name>.
STAGES = [
    ("framing/crypto (wire, crypto)", ("lu2k/wire.py", "lu2k/crypto.py", "CPyDef_wire___", "CPyDef_crypto___")),
    ("tcp backend", ("lu2k/backends/tcp.py",)),
    ("shim server (server, ports, ring)", ("lu2k/kernel_shim/", "CPyDef_ports___", "CPyDef_ring___")),
    ("core (node, credits, dedupe, states)", ("lu2k/core/", "lu2k/credits.py", "lu2k/dedupe.py", "CPyDef_node___", "CPyDef_fairq___",
                                              "CPyDef_states___", "CPyDef_rails___", "CPyDef_returnpath___", "CPyDef_credits___",
                                              "CPyDef_dedupe___")),
    ("engine pump", ("lu2k/engine.py",)),
]
OTHER = "event loop and other"


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _stage_of(stack: list[str]) -> str | None:
    """The stage of one sample (None: idle in epoll)."""
    if "select (selectors.py" in stack[-1] or stack[-1].startswith("select (") or any("epoll_wait" in f for f in stack[-3:]):
        return None
    for frame in reversed(stack):
        for stage, frags in STAGES:
            if any(f in frame for f in frags):
                return stage
    return OTHER


def _split(raw_path: str) -> dict[str, int]:
    out: collections.Counter[str] = collections.Counter()
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            stage = _stage_of(stack.split(";"))
            if stage is not None:
                out[stage] += int(n)
    return dict(out)


def run(size: int, count: int, encryption: str, spy: bool, window: int = 512, app: str = "python",
        peer_credits: int = 256) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="lu2k-prof-")
    exe = bench.build_c_app(tmp) if app == "c" else ""

    def one_run(n: int) -> float:
        return bench._c_run(exe, a, b, size, n, window) if app == "c" else bench._lu2k_run(a, b, size, n, window)[0]

    try:
        with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"], tunables={"peer_credits": peer_credits, "credits": 4 * peer_credits},
                     extra_net={"options": {"encryption": encryption}}) as (a, b):
            one_run(min(count, 2000))  # warm-up
            assert a.proc is not None and b.proc is not None
            spies = []
            if spy:
                dur = str(max(2, int(count / 30000)))
                for name, d in (("a", a), ("b", b)):
                    assert d.proc is not None
                    native = ["--native"] if hotpath.compiled() else []  # compiled modules are C functions
                    spies.append(subprocess.Popen(["py-spy", "record", *native, "-r", "400", "-d", dur, "-f", "raw", "-o", f"{tmp}/{name}.txt",
                                                   "-p", str(d.proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                time.sleep(0.3)
            ca, cb, t0 = _cpu(a.proc.pid), _cpu(b.proc.pid), os.times()
            secs = one_run(count)
            ca, cb, t1 = _cpu(a.proc.pid) - ca, _cpu(b.proc.pid) - cb, os.times()
            for s in spies:
                s.wait()
        per = 1e6 / count
        children = (t1.children_user - t0.children_user + t1.children_system - t0.children_system) * per
        apps = {"both C apps (sender, receiver)": round(children, 2)} if app == "c" else {
            "sender app": round((t1.user - t0.user + t1.system - t0.system) * per, 2),
            "receiver app (incl. its start-up)": round(children, 2)}
        out: dict[str, Any] = {
            "size": size, "count": count, "encryption": encryption, "app": app, "window": window,
            "peer_credits": peer_credits, "msgs_per_s": round(count / secs),
            "hot_path": "compiled" if hotpath.compiled() else f"pure ({hotpath.why_pure})",
            "us_per_msg": {**apps, "daemon A (sending)": round(ca * per, 2), "daemon B (receiving)": round(cb * per, 2)},
        }
        if spy:
            for name, cpu in (("a", ca), ("b", cb)):
                split = _split(f"{tmp}/{name}.txt")
                total = sum(split.values()) or 1
                out[f"daemon {name.upper()} stages"] = {k: round(cpu * per * v / total, 2) for k, v in sorted(split.items())}
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--count", type=int, default=150_000)
    p.add_argument("--encryption", choices=("aes-256-gcm", "none"), default="aes-256-gcm")
    p.add_argument("--app", choices=("python", "c"), default="python", help="the applications at both ends (as in lu2k bench loopback)")
    p.add_argument("--window", type=int, default=512, help="messages the sender keeps in flight")
    p.add_argument("--peer-credits", type=int, default=256, help="the daemons' peer_credits (credits: four times as many)")
    p.add_argument("--py-spy", action="store_true", help="split each daemon's CPU by stage (needs py-spy on PATH)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.py_spy and shutil.which("py-spy") is None:
        print("py-spy not found on PATH (pip install py-spy)", file=sys.stderr)
        return 2
    if min(args.size, args.count, args.window, args.peer_credits) < 1:
        print("--size, --count, --window and --peer-credits must be at least 1", file=sys.stderr)
        return 2
    try:
        r = run(args.size, args.count, args.encryption, args.py_spy, args.window, args.app, args.peer_credits)
    except Lu2kError as e:
        print(f"loopback_profile: {e}", file=sys.stderr)
        return 1
    print(f"{r['size']} B x {r['count']} ({r['encryption']}, {r['app']} apps, window {r['window']}, peer_credits {r['peer_credits']}, "
          f"hot path {r['hot_path']}): {r['msgs_per_s']:,} msgs/s; load {os.getloadavg()[0]:.2f}")
    for section in [k for k in r if isinstance(r[k], dict)]:
        print(f"  {section}:")
        for k, v in r[section].items():
            print(f"    {k:40s} {v:6.2f} us/msg")
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
