"""lu2k.backends.tcp stall detection: ``dead_timeout`` (TCP_USER_TIMEOUT + keepalive).

After an outage TCP's retransmission timer has backed off (up to two minutes), so a connection
with data in flight can stay silent long after the link is back.  The lab test takes the
emulated link down with a transfer under way, longer than ``dead_timeout``, and checks that the
sender's daemon ended the stalled connection itself, reconnected, and that every message then
arrived exactly once.  Correctness only; nothing here is timed.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lu2k.backends.tcp import DEAD_TIMEOUT_MIN, dead_timeout_option, set_dead_timeout
from lu2k.errors import ConfigError

from e2e_support import check_complete


def test_dead_timeout_defaults_to_eight_rtts_with_a_floor() -> None:
    assert dead_timeout_option({}, None, "net tcp") == DEAD_TIMEOUT_MIN
    assert dead_timeout_option({}, 600.0, "net tcp") == DEAD_TIMEOUT_MIN  # GEO: 8 x 0.6 s < 10 s
    assert dead_timeout_option({}, 2000.0, "net tcp") == 16.0
    assert dead_timeout_option({"dead_timeout": 0}, 600.0, "net tcp") == 0.0
    assert dead_timeout_option({"dead_timeout": 2.5}, None, "net tcp") == 2.5


@pytest.mark.parametrize("bad", ["10s", True, -1, 0.5, 7200])
def test_dead_timeout_bad_values_are_named(bad: Any) -> None:
    with pytest.raises(ConfigError, match="dead_timeout") as e:
        dead_timeout_option({"dead_timeout": bad}, None, "net tcp")
    assert "net tcp" in str(e.value)


def test_dead_timeout_sets_user_timeout_and_keepalive() -> None:
    with socket.socket() as s:
        set_dead_timeout(s, 6.0)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 6000
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 3
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4


@pytest.mark.netns
@pytest.mark.timeout(180)
@pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="needs root and TUN for the lab")
def test_outage_longer_than_dead_timeout_reconnects_and_resumes(daemons_dir: Path) -> None:
    from lu2k.lab.bench import LabDaemons, transfer
    from lu2k.lab.netns import Lab
    from lu2k.lab.spec import build_specs

    dead_timeout = 2.0
    outage_s = 3 * dead_timeout  # long enough for the user timeout to fire, short for a test
    specs = build_specs("leo", rate="20mbit", seed=4)
    count = 240
    out: dict[str, Any] = {}
    with Lab(specs, lab_id="ln" + secrets.token_hex(2)) as lab:
        with LabDaemons(lab, "tcp", daemons_dir, extra_options={"dead_timeout": dead_timeout}) as daemons:
            def run() -> None:
                try:
                    out["r"] = transfer(lab, daemons, size=65536, window=32, count=count, verify=True, timeout=150)
                except Exception as e:  # handed to the test thread below
                    out["e"] = e

            t = threading.Thread(target=run)
            t.start()
            while lab.stats()["links"]["ab"]["packets_out"] < 300 and t.is_alive():
                time.sleep(0.05)
            lab.set_link(False)  # mid-transfer: the BULK connection has data in flight
            while lab.stats()["links"]["ab"]["drops_down"] < 5 and t.is_alive():
                time.sleep(0.05)
            time.sleep(outage_s)
            lab.set_link(True)
            t.join(160)
            assert not t.is_alive()
    if "e" in out:
        raise out["e"]
    check_complete(out["r"], count)
    log = (daemons_dir / "lu2kd-a.log").read_text(errors="replace")
    # The stalled connection was ended by lu2k (not left to TCP's backed-off retransmissions),
    # and a new one carried the rest.
    assert f"nothing acknowledged for dead_timeout {dead_timeout:g} s" in log, log[-4000:]
    assert log.count("connected") >= 2, log[-4000:]
