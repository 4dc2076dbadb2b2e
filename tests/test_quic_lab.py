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


@pytest.mark.slow
def test_short_outage_is_a_blackout_not_congestion(daemons_dir: Path) -> None:
    # A LEO-like hand-over: the link is down 0.4 s mid-transfer (well under dead_timeout).  The
    # same QUIC connection carries on; its BBR controller saw a blackout, and every message
    # arrives once.  The bench's view of the sending daemon's connections reports it.
    import threading
    import time

    from lu2k.lab.bench import LabDaemons, transfer
    from lu2k.lab.netns import Lab

    specs = build_specs("leo", rate="20mbit", loss="0.5%", seed=4)  # loss: bbr is the default controller
    count = 400
    with Lab(specs) as lab:
        with LabDaemons(lab, "quic", daemons_dir) as daemons:
            out: dict[str, object] = {}

            def run() -> None:
                out["r"] = transfer(lab, daemons, size=32768, window=32, count=count, verify=True, timeout=120)

            t = threading.Thread(target=run, daemon=True)  # a test stopped at its limit does not wait for it
            t.start()
            while lab.stats()["links"]["ab"]["packets_out"] < 300 and t.is_alive():
                time.sleep(0.02)
            lab.set_link(False)
            time.sleep(0.4)
            lab.set_link(True)
            t.join(150)
            assert not t.is_alive()
            conns = daemons.connections("a")
            # net show: the backend's totals over every connection, accepted ones included.
            nets = {side: daemons.backend_figures(side) for side in "ab"}
    check_complete(out["r"], count)  # type: ignore[arg-type]
    congestion = next(c["congestion"] for c in conns.values() if "congestion" in c)
    assert congestion["controller"] == "bbr" and congestion["blackouts"] >= 1, conns
    # The receiving side PINGed into the silence, and the sender, its probe timeout backed
    # off by then, probed as soon as a PING got through instead of waiting it out.
    assert nets["b"]["silence_pings"] >= 1, nets
    assert nets["a"]["early_probes"] >= 1, nets
