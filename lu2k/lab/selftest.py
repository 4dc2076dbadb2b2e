"""``lu2k lab selftest``: measure the emulator's own ceiling, so its figures can be trusted.

An emulated link's numbers only mean something if the forwarder is far from its own limit
at the emulated rate.  The self-test blasts 1500-byte UDP packets through a lab whose link
has no rate cap -- once with no delay and once with a GEO one-way delay (a deep timer heap)
-- and reports what came through (packets/s, Mbit/s), the forwarder's CPU share, and the
lateness of its releases against their schedule.  If the forwarder's CPU is near 100 %, the
packets/s figure is its ceiling; otherwise the UDP sender (also Python, on the same cores)
was the limit and the forwarder's ceiling is higher still: the table's ``us/pkt`` (forwarder
CPU per packet) and ``ceiling`` (1500-byte packets one core could forward at that cost)
estimate it.

With ``paths=N`` (``lu2k lab selftest --paths N``) one more lab is made with ``N`` uncapped
paths, and all of them are blasted at once, one sender and receiver per path: a row per path
(what that path carried while the others were busy too) and the forwarder's CPU for all of
them together, since one loop serves every path.
"""

from __future__ import annotations

import threading
from typing import Any

from .baseline import udp_blast
from .netns import Lab
from .spec import LinkSpec

# (name, link rate bit/s (0: no cap), one-way delay s, sender rate bit/s (0: flat out)).
# The first two find the ceiling; the others are realistic loads, for lateness at work: a
# GEO-like link, and the leo-fast profile's 200 Mbit/s at its 30 ms RTT, offered 95 %.
CASES: list[tuple[str, float, float, float]] = [
    ("blast, no delay", 0.0, 0.0, 0.0),
    ("blast, 300 ms", 0.0, 0.3, 0.0),
    ("50 Mbit, 300 ms", 50e6, 0.3, 45e6),
    ("200 Mbit, 15 ms", 200e6, 0.015, 190e6),
]


def run_selftest(duration: float = 5.0, warmup: float = 1.0) -> list[dict[str, Any]]:
    results = []
    for name, rate, delay, send_rate in CASES:
        spec = LinkSpec(rate_bps=rate, delay_s=delay)
        with Lab((spec, spec)) as lab:
            before = lab.stats()
            blast = udp_blast(lab, warmup=warmup + delay, duration=duration, rate_bps=send_rate)
            stats = lab.stats()
        ab = stats["links"]["ab"]
        busy = stats["cpu_s"] - before["cpu_s"]
        wall = stats["uptime_s"] - before["uptime_s"]
        results.append({
            "case": name,
            "link_rate_mbit": rate / 1e6,
            "delay_ms": delay * 1e3,
            "send_rate_mbit": send_rate / 1e6,
            "pps": blast["pps"],
            "mbit": blast["goodput_bps"] / 1e6,
            "forwarder_cpu": busy / wall if wall > 0 else 0.0,
            # CPU per forwarded packet (both directions' work is in ``busy``; the reverse
            # direction carries nothing here), and the packet rate one core would sustain.
            "us_per_packet": busy / max(ab["packets_in"] - before["links"]["ab"]["packets_in"], 1) * 1e6,
            "forwarder_packets": ab["packets_out"],
            "lateness_p50_us": ab["lateness"]["p50_us"],
            "lateness_p99_us": ab["lateness"]["p99_us"],
            "lateness_max_us": ab["lateness"]["max_us"],
            "max_batch": stats["max_batch"],
        })
    return results


class _PathView:
    """A lab as :func:`udp_blast` sees it, with path ``path``'s addresses as the ends."""

    def __init__(self, lab: Lab, path: int) -> None:
        self.lab, self.addr_a, self.addr_b = lab, lab.address("a", path), lab.address("b", path)

    def popen(self, side: str, argv: Any, **kwargs: Any) -> Any:
        return self.lab.popen(side, argv, **kwargs)


def run_multipath_selftest(paths: int, duration: float = 5.0, warmup: float = 1.0) -> list[dict[str, Any]]:
    """Blast every path of an ``paths``-path lab (no rate cap, no delay) at once; a row per path."""
    spec = LinkSpec()
    with Lab((spec, spec), extra_paths=[(spec, spec)] * (paths - 1)) as lab:
        before = lab.stats()
        blasts: list[dict[str, Any]] = [{} for _ in range(paths)]
        errors: list[BaseException] = []

        def blast(i: int) -> None:
            try:
                blasts[i] = udp_blast(_PathView(lab, i), warmup=warmup, duration=duration, port=5202 + i)
            except BaseException as e:  # reported below, in the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=blast, args=(i,)) for i in range(paths)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        stats = lab.stats()
    busy = stats["cpu_s"] - before["cpu_s"]
    wall = stats["uptime_s"] - before["uptime_s"]
    packets = sum(p["links"]["ab"]["packets_in"] - q["links"]["ab"]["packets_in"] for p, q in zip(stats["paths"], before["paths"]))
    rows = []
    for i, (b, p) in enumerate(zip(blasts, stats["paths"])):
        ab = p["links"]["ab"]
        rows.append({
            "case": f"path {i} of {paths}",
            "link_rate_mbit": 0.0,
            "delay_ms": 0.0,
            "send_rate_mbit": 0.0,
            "pps": b["pps"],
            "mbit": b["goodput_bps"] / 1e6,
            "forwarder_cpu": busy / wall if wall > 0 else 0.0,  # all paths together: one loop
            "us_per_packet": busy / max(packets, 1) * 1e6,
            "forwarder_packets": ab["packets_out"],
            "lateness_p50_us": ab["lateness"]["p50_us"],
            "lateness_p99_us": ab["lateness"]["p99_us"],
            "lateness_max_us": ab["lateness"]["max_us"],
            "max_batch": stats["max_batch"],
        })
    return rows


def _ceiling(us_per_packet: float) -> str:
    """Mbit/s of 1500-byte packets one core could forward at this cost per packet."""
    if us_per_packet <= 0:
        return "-"
    return f"~{1e6 / us_per_packet * 1500 * 8 / 1e6:,.0f} Mbit/s"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'case':<16} {'pps':>8} {'Mbit/s':>8} {'fwd CPU':>8} {'us/pkt':>7} {'ceiling':>12} "
            f"{'late p50':>9} {'late p99':>9} {'late max':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:<16} {r['pps']:>8.0f} {r['mbit']:>8.1f} {r['forwarder_cpu'] * 100:>7.0f}% "
            f"{r.get('us_per_packet', 0.0):>7.1f} {_ceiling(r.get('us_per_packet', 0.0)):>12} "
            f"{r['lateness_p50_us'] / 1e3:>7.2f}ms {r['lateness_p99_us'] / 1e3:>7.2f}ms {r['lateness_max_us'] / 1e3:>7.2f}ms"
        )
    return "\n".join(lines)
