"""lu2k.lab.selftest: the emulator's ceiling is measured and sits above the emulated rates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lu2k.lab.selftest import format_table, run_selftest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def test_table_format() -> None:
    rows = [{"case": "x", "pps": 1000.0, "mbit": 12.0, "forwarder_cpu": 0.5, "lateness_p50_us": 500.0,
             "lateness_p99_us": 1500.0, "lateness_max_us": 3000.0, "us_per_packet": 12.0}]
    text = format_table(rows)
    assert "1.50ms" in text and "50%" in text and "~1,000 Mbit/s" in text


@needs_root
@pytest.mark.netns
@pytest.mark.slow
def test_selftest_reports_a_ceiling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LU2K_LAB_DIR", str(tmp_path))
    rows = run_selftest(duration=1.5, warmup=0.5)
    assert [r["case"] for r in rows] == ["blast, no delay", "blast, 300 ms", "50 Mbit, 300 ms", "200 Mbit, 15 ms"]
    for r in rows:
        assert r["pps"] > 0 and r["forwarder_packets"] > 0
    # The paced cases go through a 50 and a 200 Mbit/s cap: what arrives cannot exceed it.
    assert rows[2]["mbit"] <= 50 * 1.05
    assert rows[3]["mbit"] <= 200 * 1.05


@needs_root
@pytest.mark.netns
def test_multipath_selftest_reports_every_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lu2k.lab.selftest import run_multipath_selftest

    monkeypatch.setenv("LU2K_LAB_DIR", str(tmp_path))
    rows = run_multipath_selftest(2, duration=1.0, warmup=0.3)
    assert [r["case"] for r in rows] == ["path 0 of 2", "path 1 of 2"]
    for r in rows:
        assert r["pps"] > 0 and r["forwarder_packets"] > 0 and r["us_per_packet"] > 0
    assert "path 1 of 2" in format_table(rows)
