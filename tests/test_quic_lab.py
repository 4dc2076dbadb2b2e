"""QUIC through two lu2kd over the emulated satellite link: long RTT with loss, and an outage.

Correctness only (every message exactly once, intact); speed is for
``lu2k bench link --backend quic`` and ``benchmarks/quic_link.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("aioquic")

from lu2k.lab.spec import build_specs  # noqa: E402
from e2e_support import check_complete, lab_transfer, lab_transfer_across_outage  # noqa: E402

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="needs root and TUN for the lab"),
    pytest.mark.timeout(300),
]


@pytest.mark.slow
def test_geo_link_with_loss_delivers_everything(daemons_dir: Path) -> None:
    specs = build_specs("geo", loss="2%", seed=9)
    r, stats = lab_transfer("quic", specs, daemons_dir, size=65536, window=48, count=120, verify=True, timeout=180)
    check_complete(r, 120)
    assert stats["links"]["ab"]["drops_loss"] > 0 and stats["links"]["ba"]["drops_loss"] > 0


@pytest.mark.slow
def test_outage_longer_than_dead_timeout_reconnects(daemons_dir: Path) -> None:
    # dead_timeout 3 s; the link stays down well past it (5 s), so the QUIC connection is
    # declared dead and the engine reconnects and resends.
    specs = build_specs("leo", rate="20mbit", loss="0.5%", seed=6)
    count = 300
    r, stats = lab_transfer_across_outage("quic", specs, daemons_dir, 5.0, options={"dead_timeout": 3}, size=32768, window=16,
                                          count=count, verify=True, timeout=200)
    assert stats["links"]["ab"]["drops_down"] >= 5
    check_complete(r, count)
    # The sender's daemon saw the connection declared dead and made a new one.
    log = (daemons_dir / "lu2kd-a.log").read_text(errors="replace")
    assert "stopped answering" in log and log.count("connected") >= 2, log[-3000:]
