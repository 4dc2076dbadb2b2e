"""lu2k.lab.baseline: the goodput meter (pure) and kernel TCP baselines in a lab."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lu2k.errors import LocalProtocolError
from lu2k.lab.baseline import GoodputMeter, build_parser, tcp_baseline, udp_blast
from lu2k.lab.netns import Lab
from lu2k.lab.spec import build_specs

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def test_meter_counts_only_the_window_after_warmup() -> None:
    m = GoodputMeter(start=100.0, warmup=2.0, duration=4.0, bin_s=1.0)
    m.add(1000, 100.5)  # warm-up
    m.add(2000, 102.0)  # first instant of the window
    m.add(3000, 105.9)
    m.add(4000, 106.0)  # after the window
    r = m.result()
    assert r["bytes_total"] == 10_000 and r["bytes_window"] == 5000
    assert r["goodput_bps"] == pytest.approx(5000 * 8 / 4.0)
    assert r["series_mbit"][0] == pytest.approx(1000 * 8 / 1e6)
    assert len(r["series_mbit"]) == 7
    assert m.end == 106.0


def test_parser_requires_addresses() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tcp-send", "--port", "1"])


@needs_root
@pytest.mark.netns
def test_tcp_baselines_and_udp_blast_run_in_the_lab(lab_dir: Path) -> None:
    with Lab(build_specs("leo", rate="10mbit")) as lab:
        with pytest.raises(LocalProtocolError):
            tcp_baseline(lab, "vegas-9000", warmup=0.5, duration=1)
        for cc in ("cubic", "bbr"):
            r = tcp_baseline(lab, cc, warmup=1.0, duration=2.0)
            assert r["cc"] == cc
            assert 0 < r["bytes_window"] <= r["bytes_total"]
            # Physically impossible to beat the emulated link (plus slack for read bursts).
            assert r["goodput_bps"] < 10e6 * 1.3
        u = udp_blast(lab, warmup=0.5, duration=1.0, rate_bps=5e6)
        assert u["packets_sent"] > 0 and u["pps"] > 0
