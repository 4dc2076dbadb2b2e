#!/usr/bin/env python3
"""Cross-check lu2k's own link emulator (lu2k.lab, host) against the kernel's netem (guest).

The same lu2k transfer -- two ``lu2kd`` with the TCP backend, a sender endpoint in namespace a
streaming 64 KiB messages to a receiver endpoint in b (``lu2k.lab.bench.transfer``) -- runs
over one link description twice:

* ``host``: through the lab's TUN forwarder (``lu2k.lab.netns.Lab``), on the host kernel,
  which has no netem;
* ``guest``: through ``sch_netem`` on a veth pair between two namespaces, inside the QEMU
  guest booted by ``contrib/kernel-tests/run`` (:class:`NetemLab` mirrors the lab's link:
  rate cap, one-way delay, Bernoulli loss per direction, drop-tail queue of one BDP).

Each writes ``{"goodput_mbit": ...}`` as JSON; tests/guest/test_netem_crosscheck.py compares
the two (10 % tolerance).  The link is slow (2 Mbit/s) on purpose: under TCG the guest's CPU
is 20-100x slower, and the comparison must measure the links, not the CPU.

usage: crosscheck.py host|guest OUT.json
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lu2k.lab.bench import LabDaemons, default_window, transfer  # noqa: E402
from lu2k.lab.spec import MTU, LinkSpec, build_specs  # noqa: E402

LINK = {"rate": "2mbit", "rtt": "100ms", "loss": "0.5%"}
SIZE = 64 << 10
WARMUP = 5.0
DURATION = 40.0  # s: one loss-recovery episode more or less must not move the mean by the tolerance
TOLERANCE = 0.10


def specs() -> tuple[LinkSpec, LinkSpec]:
    return build_specs("custom", **LINK)


def netem_args(spec: LinkSpec) -> list[str]:
    """tc netem arguments equivalent to one lab direction.

    netem's ``limit`` counts every packet it holds, those still in the delay line too, so
    it is the lab's queue (one BDP by default) plus what the delay line holds at full rate.
    """
    in_flight = spec.rate_bps * spec.delay_s / 8
    limit = math.ceil((spec.effective_queue_bytes() + in_flight) / MTU)
    return ["netem", "delay", f"{spec.delay_s * 1e3:g}ms", "rate", f"{int(spec.rate_bps)}bit",
            "loss", f"{spec.loss * 100:g}%", "limit", str(limit)]


def _sh(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")


class NetemLab:
    """Enough of ``lu2k.lab.netns.Lab`` for ``LabDaemons``/``transfer``, built on veth + netem."""

    def __init__(self, link: tuple[LinkSpec, LinkSpec], prefix: str = "lu2kx") -> None:
        ns = {"a": f"{prefix}-a", "b": f"{prefix}-b"}
        self.state = SimpleNamespace(specs=link, ns=ns, addr={"a": "10.202.0.1", "b": "10.202.0.2"},
                                     dev={"a": f"{prefix}a0", "b": f"{prefix}b0"})

    def ns(self, side: str) -> str:
        return str(self.state.ns[side])

    def exec_argv(self, side: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(side), *argv]

    def popen(self, side: str, argv: Sequence[str], **kwargs: Any) -> "subprocess.Popen[Any]":
        return subprocess.Popen(self.exec_argv(side, argv), **kwargs)

    def up(self) -> "NetemLab":
        self.down()
        st = self.state
        _sh("ip", "netns", "add", st.ns["a"])
        _sh("ip", "netns", "add", st.ns["b"])
        _sh("ip", "link", "add", st.dev["a"], "netns", st.ns["a"], "type", "veth", "peer", "name", st.dev["b"], "netns", st.ns["b"])
        for side, spec in (("a", st.specs[0]), ("b", st.specs[1])):
            _sh("ip", "-n", st.ns[side], "addr", "add", f"{st.addr[side]}/24", "dev", st.dev[side])
            _sh("ip", "-n", st.ns[side], "link", "set", st.dev[side], "up")
            _sh("ip", "-n", st.ns[side], "link", "set", "lo", "up")
            # The lab's TUN devices have no offloads; neither may the veth, or netem would
            # shape 64 KiB GSO super-packets instead of wire-sized ones.
            subprocess.run(["ip", "netns", "exec", st.ns[side], "ethtool", "-K", st.dev[side], "tso", "off", "gso", "off",
                            "gro", "off"], capture_output=True)
            _sh("ip", "netns", "exec", st.ns[side], "tc", "qdisc", "add", "dev", st.dev[side], "root", *netem_args(spec))
        return self

    def down(self) -> None:
        for ns in self.state.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self) -> "NetemLab":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def measure(lab: Any, start_timeout: float) -> dict[str, Any]:
    """One lu2k/tcp transfer a -> b through ``lab``; goodput in Mbit/s and what produced it."""
    link = lab.state.specs[0]
    with tempfile.TemporaryDirectory(prefix="lu2k-xcheck-") as wd:
        daemons = LabDaemons(lab, "tcp", Path(wd))
        try:
            for side in ("a", "b"):
                daemons.procs[side].start(timeout=start_timeout, netns=lab.ns(side))
            r = transfer(lab, daemons, size=SIZE, window=default_window(link, SIZE), warmup=WARMUP,
                         duration=DURATION, timeout=WARMUP + DURATION + 300)
        finally:
            daemons.stop()
    return {"goodput_mbit": r["goodput_bps"] / 1e6, "link": LINK, "messages": r.get("messages"),
            "message_size": SIZE, "warmup_s": WARMUP, "duration_s": DURATION, "cpu": r.get("cpu")}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("host", "guest"):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    where, out = argv[1], Path(argv[2])
    started = time.monotonic()
    if where == "host":
        from lu2k.lab.netns import Lab

        with Lab(specs()) as lab:
            result = measure(lab, start_timeout=30)
        result["emulator"] = "lu2k.lab (TUN forwarder), host kernel " + os.uname().release
    else:
        with NetemLab(specs()) as lab:
            result = measure(lab, start_timeout=180)
        result["emulator"] = "sch_netem on veth, guest kernel " + os.uname().release
    result["wall_s"] = time.monotonic() - started
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{where}: lu2k/tcp goodput {result['goodput_mbit']:.3f} Mbit/s over {LINK} ({result['emulator']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
