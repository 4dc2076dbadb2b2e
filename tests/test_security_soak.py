"""Soak: two lu2kd over an emulated GEO hop with loss, traffic without pause, every message accounted for.

A sender endpoint keeps a window of messages of mixed sizes (small frames and bulk
payloads) in flight from namespace a to namespace b for the whole run; the receiver checks
each payload's CRC and that no index arrives twice.  At the end every message sent has
exactly one completion, every ``DELIVERED`` one arrived exactly once, nothing else arrived,
and no message failed.  The resident memory of both daemons is sampled through the run and
must stay flat: the median of the last third of the samples may exceed the median of the
second quarter by at most ``MEMORY_SLACK``.

In CI the run is short (``LU2K_SOAK_SECONDS``, default 30).  The full hour::

    LU2K_SOAK_SECONDS=3600 LU2K_SOAK_REPORT=/tmp/soak.json PYTHONPATH=$PWD \\
        python -m pytest -q -p no:cacheprovider tests/test_security_soak.py

``LU2K_SOAK_BACKEND`` picks the backend (default tcp), ``LU2K_SOAK_LOSS`` the loss each way
(default 2%).  The report (JSON) holds the counts, the link's counters and the memory samples.
"""

from __future__ import annotations

import json
import os
import sys
import random
import statistics
import threading
import time
import zlib
from collections import Counter, deque
from pathlib import Path
from typing import Any

import pytest

from lu2k.errors import Status
from lu2k.kernel_shim.endpoint import Completion, Endpoint
from lu2k.lab.bench import LabDaemons, tx_pool_bytes
from lu2k.lab.netns import Lab
from lu2k.lab.spec import build_specs

sys.path.insert(0, str(Path(__file__).parent))
from e2e_support import HDR  # noqa: E402

SOAK_SECONDS = float(os.environ.get("LU2K_SOAK_SECONDS", "30"))

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.netns,
    # The run, then up to 6 min to settle and drain (below), then the lab's set-up and teardown.
    pytest.mark.timeout(SOAK_SECONDS + 900),
]

SIZES = (256, 4096, 65536, 262144)
WINDOW = 32
MEMORY_SLACK = 16 << 20


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class _Receiver(threading.Thread):
    def __init__(self, ep: Endpoint, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.ep, self.stop = ep, stop
        self.seen: Counter[int] = Counter()
        self.corrupt = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                msg = self.ep.recv(timeout=0.5)
                if msg is None:
                    continue
                with msg:
                    index, crc = HDR.unpack_from(msg.payload)
                    if zlib.crc32(msg.payload[HDR.size:]) != crc:
                        self.corrupt += 1
                    self.seen[index] += 1
        except BaseException as e:
            self.error = e


def test_soak_geo_with_loss(tmp_path: Path) -> None:
    seconds = SOAK_SECONDS
    backend = os.environ.get("LU2K_SOAK_BACKEND", "tcp")
    loss = os.environ.get("LU2K_SOAK_LOSS", "2%")
    sample_every = max(1.0, min(30.0, seconds / 40))
    rnd = random.Random(13)
    bodies = {size: rnd.randbytes(size - HDR.size) for size in SIZES}
    crcs = {size: zlib.crc32(body) for size, body in bodies.items()}
    specs = build_specs("geo", loss=loss, seed=13)
    report: dict[str, Any] = {"backend": backend, "loss": loss, "seconds": seconds, "sizes": SIZES, "window": WINDOW}
    with Lab(specs, lab_id="sc" + os.urandom(2).hex()) as lab, LabDaemons(lab, backend, tmp_path) as daemons:
        pids = daemons.pids()
        stop = threading.Event()
        rx = _Receiver(Endpoint.attach(daemons.shim("b"), portal=0), stop)
        rx.start()
        ep = Endpoint.attach(daemons.shim("a"), portal=1, tx_pool_bytes=tx_pool_bytes(max(SIZES), WINDOW))
        pending: deque[tuple[int, Completion]] = deque()
        delivered: set[int] = set()
        failed: Counter[str] = Counter()
        completions = 0
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        next_sample = t0
        sent = 0

        def settle(limit: int) -> None:
            nonlocal completions
            while len(pending) > limit:
                index, comp = pending[0]
                if not comp.wait(5.0):
                    return
                pending.popleft()
                completions += 1
                if comp.status == Status.DELIVERED:
                    delivered.add(index)
                else:
                    failed[getattr(comp.status, "name", str(comp.status))] += 1

        try:
            while time.monotonic() - t0 < seconds:
                size = rnd.choice(SIZES)
                slot = ep.reserve(size, timeout=120)
                HDR.pack_into(slot.view, 0, sent, crcs[size])
                slot.view[HDR.size:] = bodies[size]
                pending.append((sent, slot.post(daemons.nids["b"], portal=0)))
                sent += 1
                settle(WINDOW)
                now = time.monotonic()
                if now >= next_sample:
                    next_sample = now + sample_every
                    samples.append({"t": round(now - t0, 1), "sent": sent, "received": len(rx.seen),
                                    **{f"rss_{s}": _rss(p) for s, p in pids.items()}})
            deadline = time.monotonic() + 300
            while pending and time.monotonic() < deadline:
                settle(0)
            deadline = time.monotonic() + 60
            while len(rx.seen) < len(delivered) and time.monotonic() < deadline and rx.error is None:
                time.sleep(0.2)
            samples.append({"t": round(time.monotonic() - t0, 1), "sent": sent, "received": len(rx.seen),
                            **{f"rss_{s}": _rss(p) for s, p in pids.items()}})
        finally:
            stop.set()
            rx.join(10)
            ep.detach()
            rx.ep.detach()
        link = lab.stats()["links"]
    dups = sum(n - 1 for n in rx.seen.values() if n > 1)
    report.update({"elapsed_s": round(time.monotonic() - t0, 1), "sent": sent, "completions": completions,
                   "delivered": len(delivered), "failed": dict(failed), "unsettled": len(pending),
                   "received": len(rx.seen), "duplicates": dups, "corrupt": rx.corrupt,
                   "received_not_delivered": len(set(rx.seen) - delivered), "delivered_not_received": len(delivered - set(rx.seen)),
                   "link": {d: {k: link[d][k] for k in ("packets_out", "drops_loss")} for d in ("ab", "ba")},
                   "memory_samples": samples})
    growth = {}
    n = len(samples)
    for side in pids:
        base = statistics.median(s[f"rss_{side}"] for s in samples[n // 4 : max(n // 2, n // 4 + 1)])
        late = statistics.median(s[f"rss_{side}"] for s in samples[2 * n // 3 :])
        growth[side] = late - base
    report["rss_growth"] = growth
    if os.environ.get("LU2K_SOAK_REPORT"):
        Path(os.environ["LU2K_SOAK_REPORT"]).write_text(json.dumps(report, indent=1))
    assert rx.error is None, rx.error
    assert not pending and completions == sent, report
    assert not failed, report
    assert dups == 0 and rx.corrupt == 0, report
    assert set(rx.seen) == delivered == set(range(sent)), {k: v for k, v in report.items() if k != "memory_samples"}
    assert report["link"]["ab"]["drops_loss"] > 0 and report["link"]["ba"]["drops_loss"] > 0  # the link really lost packets
    assert all(g <= MEMORY_SLACK for g in growth.values()), growth
