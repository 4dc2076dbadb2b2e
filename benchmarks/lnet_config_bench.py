"""How fast lu2k reads LNet names and configuration strings (lu2k.nid, lu2k.config,
lu2k.lnetyaml).  Pure CPU: no sockets.  Prints a table of operations per second.

    /work/venv/bin/python benchmarks/lnet_config_bench.py [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

from lu2k.config import ip2nets, parse_networks, parse_routes
from lu2k.lnetyaml import dumps, loads
from lu2k.nid import NidList, parse_nid

HOST = [("lo", "127.0.0.1"), ("eth0", "10.70.3.4"), ("eth1", "192.168.1.20")]
NIDLIST = NidList.parse("10.0.[0-3].[1-254/2]@tcp 192.168.0.0/16@tcp *@o2ib1 [1-100]@gni")
YAML = """\
net:
  - net type: tcp
    local NI(s):
      - nid: 10.0.0.1@tcp
        interfaces: {0: eth0}
        tunables: {peer_timeout: 180, peer_credits: 8, peer_buffer_credits: 0, credits: 256}
    lu2k: {backend: tcp, port: 7988, key: a-long-enough-key, profile: {rtt_ms: 600, rate_mbit: 20, loss: 0.01}}
route:
  - {net: o2ib1, gateway: 10.0.0.2@tcp, hop: -1, priority: 0}
peer:
  - {primary nid: 10.0.0.3@tcp, Multi-Rail: True, peer ni: [{nid: 10.0.0.3@tcp}]}
global: {transaction_timeout: 50, retry_count: 2}
"""
CFG = loads(YAML)

CASES: list[tuple[str, Callable[[], object]]] = [
    ("parse_nid 10.0.0.1@tcp", lambda: parse_nid("10.0.0.1@tcp")),
    ("parse_nid 2001:db8::1@tcp", lambda: parse_nid("2001:db8::1@tcp")),
    ("NidList.parse (4 ranges)", lambda: NidList.parse("10.0.[0-3].[1-254/2]@tcp 192.168.0.0/16@tcp *@o2ib1 [1-100]@gni")),
    ("NidList.match (hit, 2nd range)", lambda: NIDLIST.match("192.168.7.7@tcp")),
    ("NidList.match (miss)", lambda: NIDLIST.match("10.9.9.9@tcp")),
    ("parse_networks tcp0(eth0,eth1)[0,1],o2ib", lambda: parse_networks("tcp0(eth0,eth1)[0,1],o2ib")),
    ("ip2nets 3 rules", lambda: ip2nets("tcp(eth1) 192.168.*.*; tcp1 10.70.*.*; o2ib 172.16.*.*", HOST)),
    ("parse_routes 2 rules, 6 routes", lambda: parse_routes("tcp[1-2] 10.0.0.[1-2]@tcp:1; o2ib 3 10.0.0.9@tcp")),
    ("lnetyaml.loads (export-sized doc)", lambda: loads(YAML)),
    ("lnetyaml.dumps", lambda: dumps(CFG)),
]


def rate(fn: Callable[[], object], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="time per case")
    args = ap.parse_args()
    width = max(len(name) for name, _ in CASES)
    print(f"{'operation':<{width}}  {'ops/s':>10}  {'us/op':>8}")
    for name, fn in CASES:
        r = rate(fn, args.seconds)
        print(f"{name:<{width}}  {r:>10.0f}  {1e6 / r:>8.1f}")


if __name__ == "__main__":
    main()
