"""``benchmarks/quic_link.py --profile loopback``: the QUIC transport alone, both roles on
127.0.0.1 (no lab, no root).  Checks that the benchmark runs and reports a goodput that moved
data; the speed itself is a measurement (docs/performance.md), never asserted here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lu2k.localpair import free_port

pytest.importorskip("aioquic")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_transport_alone_on_loopback_moves_data() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quic_link.py"), "--profile", "loopback",
                          "--rate-mbit", "100", "--rtt-ms", "40", "--port", str(free_port()),
                          "--warmup", "0.5", "--duration", "1.5"],
                         capture_output=True, text=True, env=env, timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("loopback: ") and "Mbit/s" in line
    mbit = float(line.split()[1])
    assert mbit > 0
