"""QUIC through two lu2kd over the emulated satellite link: long RTT with loss, and an outage.

Correctness only (every message exactly once, intact); speed is for
``lu2k bench link --backend quic`` and ``benchmarks/quic_link.py``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aioquic")

from lu2k.lab.bench import LabDaemons, transfer  # noqa: E402
from lu2k.lab.netns import Lab  # noqa: E402
from lu2k.lab.spec import build_specs  # noqa: E402
from e2e_support import check_complete  # noqa: E402

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="needs root and TUN for the lab"),
    pytest.mark.timeout(300),
]


@pytest.fixture
def lab_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LU2K_LAB_DIR", str(tmp_path / "labs"))
    return tmp_path


@pytest.mark.slow
def test_geo_link_with_loss_delivers_everything(lab_dir: Path) -> None:
    specs = build_specs("geo", loss="2%", seed=9)
    with Lab(specs) as lab:
        with LabDaemons(lab, "quic", lab_dir) as daemons:
            r = transfer(lab, daemons, size=65536, window=48, count=120, verify=True, timeout=180)
        stats = lab.stats()
    check_complete(r, 120)
    assert stats["links"]["ab"]["drops_loss"] > 0 and stats["links"]["ba"]["drops_loss"] > 0


@pytest.mark.slow
def test_outage_longer_than_dead_timeout_reconnects(lab_dir: Path) -> None:
    # LEO RTT: dead_timeout is max(3 s, 8 RTT) = 3 s; the link stays down well past it, so the
    # QUIC connection is declared dead and the engine reconnects and resends.
    specs = build_specs("leo", rate="20mbit", loss="0.5%", seed=6)
    count = 300
    with Lab(specs) as lab:
        with LabDaemons(lab, "quic", lab_dir) as daemons:
            out: dict[str, Any] = {}

            def run() -> None:
                try:
                    out["r"] = transfer(lab, daemons, size=32768, window=16, count=count, verify=True, timeout=200)
                except Exception as e:  # handed to the test thread below
                    out["e"] = e

            t = threading.Thread(target=run)
            t.start()
            while lab.stats()["links"]["ab"]["packets_out"] < 200 and t.is_alive():
                time.sleep(0.05)
            lab.set_link(False)
            while lab.stats()["links"]["ab"]["drops_down"] < 5 and t.is_alive():
                time.sleep(0.05)
            time.sleep(5.0)  # an outage longer than dead_timeout
            lab.set_link(True)
            t.join(240)
            assert not t.is_alive()
        stats = lab.stats()
    if "e" in out:
        raise out["e"]
    assert stats["links"]["ab"]["drops_down"] >= 5
    check_complete(out["r"], count)
    # The sender's daemon saw the connection declared dead and made a new one.
    log = (lab_dir / "lu2kd-a.log").read_text(errors="replace")
    assert "stopped answering" in log and log.count("connected") >= 2, log[-3000:]
