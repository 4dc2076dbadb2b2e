"""lu2k.lab.bench: lu2k through the emulated link -- delivery under loss, reordering, a flap.

These are correctness runs: every message must arrive exactly once and intact.  Speed is
the benchmark's business (``lu2k bench link``), never asserted here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from lu2k.lab.bench import HEADER, default_window, format_link, format_matrix, net_type_for, pattern
from lu2k.lab.spec import LinkSpec, build_specs
from e2e_support import check_complete, lab_transfer, lab_transfer_across_outage  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def test_pattern_and_window() -> None:
    assert len(pattern(3, 100)) == 100 - HEADER.size
    assert pattern(1, 64) != pattern(2, 64)
    geo, _ = build_specs("geo")
    # 64 KiB messages on 20 Mbit/s x 600 ms (BDP 1.5 MB), and on a 100 Mbit/s GEO hop.
    assert default_window(geo, 65536) == (8 << 20) // 65536 + 1  # 8 MiB > 4 BDP (6 MB)
    assert default_window(LinkSpec(rate_bps=100e6, delay_s=0.3), 65536) == int(4 * 7_500_000 / 65536) + 1
    assert default_window(LinkSpec(), 65536) >= 16
    # The sender's TX pool has a slot of the message's size for every message of the window.
    from lu2k.kernel_shim.abi import pool_classes
    from lu2k.lab.bench import tx_pool_bytes

    for window in (16, 129, 512):
        pool = tx_pool_bytes(65536, window)
        assert sum(n for s, n in pool_classes(4 << 20, pool) if s >= 65536 + HEADER.size) >= window
    assert tx_pool_bytes(65536, 100_000) == 1 << 30  # the shim's cap; beyond it, back-pressure
    assert net_type_for("tcp") == "tcp" and net_type_for("quic") == "quic" and net_type_for("inproc") == "tcp"


def _result(**kw: Any) -> dict[str, Any]:
    r = {"backend": "tcp", "goodput_mbit": 15.0, "link_mbit": 20.0, "limit_mbit": 19.8, "loss": 0.01, "rtt_ms": 600.0,
         "p50_latency_ms": 700.0, "p99_latency_ms": 900.0, "cpu": {"lu2kd-a": 0.1, "lu2kd-b": 0.05},
         "baselines": {"tcp-cubic": 0.4, "tcp-bbr": 17.0}, "emulator": {"lateness_p99_ms": 1.0, "forwarder_cpu": 0.05},
         "profile": "geo"}
    r.update(kw)
    return r


def test_format_link_and_matrix_tables() -> None:
    text = format_link(_result())
    assert "lu2k/tcp" in text and "kernel tcp-bbr" in text and "75%" in text and "19.80" in text
    rows = [_result(), _result(backend="quic", goodput_mbit=None, baselines={}, error="boom")]
    table = format_matrix(rows)
    assert "FAILED" in table and "0.40" in table
    assert "backend options: streams=2" in format_link(_result(options={"streams": 2}))
    assert "backend options" not in text


def test_backend_option_pairs() -> None:
    """``--option`` of bench link, latency and transfer: one parser (lu2k.lab.args)."""
    from lu2k.errors import ConfigError
    from lu2k.lab.args import parse_backend_options

    assert parse_backend_options(["streams=2", "notsent_lowat=0", "congestion=cubic", "socket_buffer= 1048576"]) == {
        "streams": 2, "notsent_lowat": 0, "congestion": "cubic", "socket_buffer": 1048576}
    assert parse_backend_options(["fec=auto", "rate=20mbit", "ordered=true"]) == {"fec": "auto", "rate": "20mbit", "ordered": True}
    assert parse_backend_options([]) == {} and parse_backend_options(None) == {}
    for bad in ("streams", "=2", "x=[1"):
        with pytest.raises(ConfigError, match="--option"):
            parse_backend_options([bad])


def _usable(backend: str) -> bool:
    from lu2k.backends import availability

    return availability().get(backend) is None


@needs_root
@pytest.mark.netns
@pytest.mark.parametrize("backend", ["tcp", "quic", "udt"])
def test_delivery_under_loss_jitter_and_reordering(daemons_dir: Path, backend: str) -> None:
    if not _usable(backend):
        pytest.skip(f"backend {backend} is not available here")
    specs = build_specs("leo", rate="20mbit", loss="2%", burst_loss="1%", burst_len=3, jitter="2ms", reorder="2%", seed=4)
    r, stats = lab_transfer(backend, specs, daemons_dir, size=16384, window=32, count=300, verify=True, timeout=120)
    check_complete(r, 300)
    ab, ba = stats["links"]["ab"], stats["links"]["ba"]
    # The run really crossed an impaired link: losses and reordering both directions saw.
    assert ab["drops_loss"] > 0 and ba["drops_loss"] > 0
    assert ab["reordered"] > 0


@needs_root
@pytest.mark.netns
@pytest.mark.slow
def test_link_flap_mid_transfer(daemons_dir: Path) -> None:
    specs = build_specs("leo", rate="20mbit", loss="0.5%", seed=5)
    count = 400
    # Down for 3 s once under way: longer than many RTOs on a 40 ms path.
    r, stats = lab_transfer_across_outage("tcp", specs, daemons_dir, 3.0, size=32768, window=16, count=count, verify=True, timeout=180)
    assert stats["links"]["ab"]["drops_down"] >= 5
    check_complete(r, count)
