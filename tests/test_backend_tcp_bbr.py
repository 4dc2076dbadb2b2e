"""lu2k.backends.tcp_bbr: the start-up cap and the ProbeRTT skip, decided from TCP_CC_INFO.

The decisions are checked against their table with made-up readings; one lab test then runs
kernel BBR over an emulated long path and watches ``ss -tin``: a plain BBR socket enters
ProbeRTT there, and lu2k's bulk socket, whose model the watch restarts, never does.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lu2k.backends import tcp, tcp_bbr
from lu2k.backends.tcp import TcpTransport, available_congestion_controls
from lu2k.backends.tcp_bbr import PACING_UNLIMITED, RESTART_AFTER, BbrReading, BbrWatch, bbr_phase, read_bbr

from e2e_support import check_complete

BW = 2_500_000  # bytes/s: 20 Mbit/s
GEO_RTT = 0.6


def reading(phase: str, bandwidth: int = BW, min_rtt: float = GEO_RTT, unacked: int = 100) -> BbrReading:
    return BbrReading(phase, bandwidth, min_rtt, unacked)


def test_bbr_phase_is_read_from_its_cc_info() -> None:
    info = tcp_bbr.BBR_INFO.pack  # bw_lo, bw_hi, min_rtt, pacing_gain, cwnd_gain (x 256)
    assert bbr_phase(info(1250, 0, 600_000, 739, 739)) == "startup"  # 2.885
    assert bbr_phase(info(1250, 0, 600_000, 88, 739)) == "later"  # DRAIN
    assert bbr_phase(info(1250, 0, 600_000, 320, 512)) == "later"  # PROBE_BW, probing
    assert bbr_phase(info(0, 0, 23, 256, 256)) == "unknown"  # no ACK yet (as a fresh socket reads), or PROBE_RTT
    assert bbr_phase(b"") is None and bbr_phase(bytes(16)) is None  # not BBR's answer
    assert read_bbr(info(1250, 1, 600_000, 320, 512), 7) == BbrReading("later", (1 << 32) + 1250, 0.6, 7)
    assert read_bbr(b"", 7) is None


def test_the_startup_cap_lifts_when_bbr_leaves_startup() -> None:
    watch = BbrWatch(0.0, 2_750_000, 0, "kernel")
    assert watch.start() == [("pace", 2_750_000)] and watch.capped
    assert watch.tick(0.3, reading("unknown", 0)) == []  # no ACK yet
    assert watch.tick(0.6, reading("startup")) == []
    assert watch.tick(0.9, reading("later")) == [("pace", PACING_UNLIMITED)] and not watch.capped
    assert not watch.active  # kernel ProbeRTT, no cap: nothing more to do
    capped_to_rate = BbrWatch(0.0, 2_750_000, 1_000_000, "kernel")
    capped_to_rate.start()
    assert capped_to_rate.tick(0.5, reading("later")) == [("pace", 1_000_000)]  # rate_cap stays
    not_bbr = BbrWatch(0.0, 2_750_000, 0, "kernel")
    assert not_bbr.tick(0.5, None) == [("pace", PACING_UNLIMITED)]  # nothing says when: lift now


def test_a_probe_rtt_inside_startup_keeps_the_cap() -> None:
    """BBR goes back to STARTUP after a ProbeRTT that came before it had found the plateau;
    lifting the cap there would let that STARTUP overshoot."""
    watch = BbrWatch(0.0, 2_750_000, 0, "kernel")
    assert watch.tick(0.5, reading("startup")) == []
    assert watch.tick(10.5, reading("unknown")) == [] and watch.capped  # PROBE_RTT from STARTUP
    assert watch.tick(11.5, reading("startup")) == [] and watch.capped
    assert watch.tick(12.0, reading("later")) == [("pace", PACING_UNLIMITED)]


def test_no_restart_while_capped() -> None:
    """The first STARTUP, and a restarted one, run to their end: a restart there would cap the
    new STARTUP at a bandwidth still ramping up."""
    watch = BbrWatch(0.0, 2_750_000, 0, "skip")
    assert watch.tick(RESTART_AFTER + 3, reading("unknown", bandwidth=BW // 4)) == []
    assert watch.tick(RESTART_AFTER + 4, reading("startup", bandwidth=BW // 2)) == [] and watch.restarts == 0


def test_the_model_restarts_before_bbr_would_probe_rtt() -> None:
    watch = BbrWatch(0.0, 0, 0, "auto")
    assert watch.start() == [] and not watch.capped and watch.active
    assert watch.tick(RESTART_AFTER - 0.5, reading("later")) == []  # not due yet
    actions = watch.tick(RESTART_AFTER, reading("later"))
    assert actions == [("pace", int(BW * tcp_bbr.STARTUP_CAP_SHARE)), ("restart", 0)]  # capped first, then restarted
    assert watch.capped and watch.restarts == 1
    assert watch.tick(RESTART_AFTER + 0.5, reading("startup", 0)) == []  # the new STARTUP, capped
    assert watch.tick(RESTART_AFTER + 1.5, reading("unknown")) == []  # and a ProbeRTT inside it keeps the cap
    assert watch.tick(RESTART_AFTER + 3, reading("later")) == [("pace", PACING_UNLIMITED)]
    assert watch.tick(2 * RESTART_AFTER - 0.1, reading("later")) == []  # counted from the restart
    assert watch.tick(2 * RESTART_AFTER, reading("later"))[1] == ("restart", 0) and watch.restarts == 2


def test_a_restart_is_due_only_with_data_in_flight_and_a_bandwidth() -> None:
    due = RESTART_AFTER + 1
    assert BbrWatch(0.0, 0, 0, "auto").tick(due, reading("later", unacked=0)) == []  # idle: its next ACK renews the min RTT
    assert BbrWatch(0.0, 0, 0, "auto").tick(due, reading("later", bandwidth=0)) == []  # nothing to cap the new STARTUP at
    assert BbrWatch(0.0, 0, 0, "auto").tick(due, reading("startup")) == []  # still in the first STARTUP
    assert BbrWatch(0.0, 0, 0, "auto").tick(due, reading("unknown"))[1] == ("restart", 0)  # in ProbeRTT: end it
    assert BbrWatch(0.0, 0, 0, "auto").tick(due, None) == []  # not BBR


def test_auto_skips_probe_rtt_only_on_long_paths() -> None:
    due = RESTART_AFTER + 1
    leo = tcp_bbr.PROBE_RTT_SKIP_MIN_RTT - 0.001
    assert BbrWatch(0.0, 0, 0, "auto").tick(due, reading("later", min_rtt=leo)) == []
    assert BbrWatch(0.0, 0, 0, "skip").tick(due, reading("later", min_rtt=leo))[1] == ("restart", 0)
    kernel = BbrWatch(0.0, 0, 0, "kernel")
    assert kernel.tick(due, reading("later")) == [] and not kernel.active


def test_the_restarted_startup_stays_under_rate_cap() -> None:
    watch = BbrWatch(0.0, 0, 1_000_000, "skip")
    assert watch.tick(RESTART_AFTER, reading("later"))[0] == ("pace", 1_000_000)
    assert watch.tick(RESTART_AFTER + 2, reading("later")) == [("pace", 1_000_000)]


def test_a_refused_restart_ends_restarts_and_lifts_its_ceiling() -> None:
    watch = BbrWatch(0.0, 0, 1_000_000, "skip")
    assert watch.tick(RESTART_AFTER, reading("later"))[1] == ("restart", 0)
    assert watch.restart_refused() == [("pace", 1_000_000)] and not watch.capped and watch.restarts == 0
    assert watch.tick(3 * RESTART_AFTER, reading("later")) == [] and not watch.active


class NoRenoSocket(socket.socket):
    """A socket that refuses to switch to reno, as a kernel without it would."""

    def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:  # type: ignore[override]
        if option == socket.TCP_CONGESTION and value == b"reno":
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        super().setsockopt(level, option, value, *rest)


async def test_a_socket_that_refuses_the_restart_keeps_bbr_and_no_ceiling() -> None:
    if "bbr" not in available_congestion_controls():
        pytest.skip("kernel lacks bbr")
    sock = NoRenoSocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"bbr")
    transport = TcpTransport(sock, 1 << 20)
    try:
        watch = BbrWatch(0.0, 0, 0, "skip")
        transport.watch_bbr(watch, 0.5)
        transport._apply(watch.tick(RESTART_AFTER, reading("later")))
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0") == b"bbr"
        assert sock.getsockopt(socket.SOL_SOCKET, tcp.SO_MAX_PACING_RATE) in (-1, PACING_UNLIMITED)
        assert watch.probe_rtt == "kernel" and not transport.startup_capped
    finally:
        transport.close()


# --- over the lab -------------------------------------------------------------------------

SS_SOCKET = re.compile(r"^(\S+)\s+\d+\s+\d+\s+\S+:(\d+)\s+\S+:(\d+)")
SS_BBR = re.compile(r"bbr:\(bw:[^,]*,mrtt:[^,]*(?:,pacing_gain:([\d.]+))?(?:,cwnd_gain:([\d.]+))?\)")
SS_ACKED = re.compile(r"bytes_acked:(\d+)")


def bbr_phases_from_ss(text: str) -> dict[tuple[int, int], tuple[str, int]]:
    """(local port, remote port) -> (BBR phase, bytes acked) for each socket in ``ss -tinH``."""
    out: dict[tuple[int, int], tuple[str, int]] = {}
    key: tuple[int, int] | None = None
    for line in text.splitlines():
        if m := SS_SOCKET.match(line):
            key = (int(m.group(2)), int(m.group(3))) if m.group(1) == "ESTAB" else None
        elif key is not None and (b := SS_BBR.search(line)):
            pacing, cwnd = float(b.group(1) or 0), float(b.group(2) or 0)
            phase = "startup" if pacing >= 2 else ("probe_rtt" if pacing == 1 and cwnd == 1 else "later")
            acked = int(a.group(1)) if (a := SS_ACKED.search(line)) else 0
            out[key] = (phase, acked)
    return out


def test_ss_lines_are_read_per_socket() -> None:
    text = ("ESTAB 0      682008 10.201.1.1:42746 10.201.1.2:5010\n"
            "\t bbr wscale:11,11 rtt:603.1/0.2 cwnd:4 bytes_acked:141905 bbr:(bw:1487936bps,mrtt:600.755,pacing_gain:1,cwnd_gain:1) x\n"
            "ESTAB 0      0 10.201.1.1:42748 10.201.1.2:7988\n"
            "\t bbr bbr:(bw:19Mbps,mrtt:600.7,pacing_gain:2.88672,cwnd_gain:2.88672) bytes_acked:9\n")
    assert bbr_phases_from_ss(text) == {(42746, 5010): ("probe_rtt", 141905), (42748, 7988): ("startup", 9)}


def _watch_phases(ns: str, stop: threading.Event, seen: dict[tuple[int, int], list[tuple[str, int]]]) -> None:
    while not stop.is_set():
        r = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tinH"], capture_output=True, text=True)
        for key, sample in bbr_phases_from_ss(r.stdout).items():
            seen.setdefault(key, []).append(sample)
        time.sleep(0.1)  # a ProbeRTT lasts at least 200 ms plus a round trip


def _probe_rtts(samples: list[tuple[str, int]]) -> int:
    """ProbeRTT episodes after the socket's first ACK of data (before it, the gains read 1 too; the SYN counts one byte)."""
    episodes, before = 0, "later"
    for phase, acked in samples:
        if phase == "probe_rtt" and before != "probe_rtt" and acked > 1:
            episodes += 1
        before = phase
    return episodes


@pytest.mark.netns
@pytest.mark.timeout(240)
@pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="needs root and TUN for the lab")
@pytest.mark.skipif("bbr" not in available_congestion_controls(), reason="kernel lacks bbr")
def test_over_a_long_path_a_plain_bbr_socket_probes_rtt_and_lu2ks_never_does(daemons_dir: Path) -> None:
    from lu2k.lab.baseline import tcp_baseline
    from lu2k.lab.bench import LabDaemons, transfer
    from lu2k.lab.netns import Lab
    from lu2k.lab.spec import build_specs

    seconds = 24.0  # two of BBR's ten-second min-RTT windows, and the start
    count = 1000  # 64 KiB messages: about 27 s at 20 Mbit/s
    specs = build_specs("custom", rate="20mbit", rtt="300ms", seed=3)
    with Lab(specs, lab_id="lp" + secrets.token_hex(2)) as lab:
        seen: dict[tuple[int, int], list[tuple[str, int]]] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_phases, args=(lab.ns_a, stop, seen), daemon=True)
        watcher.start()
        try:
            tcp_baseline(lab, "bbr", warmup=0.0, duration=seconds, port=5201)  # the control: kernel BBR alone
            plain = {k: v for k, v in seen.items() if k[1] == 5201}
            seen.clear()
            with LabDaemons(lab, "tcp", daemons_dir) as daemons:  # the backend's defaults: probe_rtt auto
                r = transfer(lab, daemons, size=65536, window=64, count=count, verify=True, timeout=150)
                lu2k = {k: v for k, v in seen.items() if k[1] != 5201}
        finally:
            stop.set()
            watcher.join(5)
    assert plain and max(_probe_rtts(v) for v in plain.values()) >= 1, f"the control never entered ProbeRTT: {plain}"
    check_complete(r, count)
    bulk = max(lu2k.values(), key=lambda samples: samples[-1][1])  # the BULK socket carried the bytes
    assert bulk[-1][1] > 20_000_000, bulk[-5:]
    phases = [p for p, _ in bulk]
    assert _probe_rtts(bulk) == 0, phases
    restarts = sum(1 for (p0, acked), (p1, _) in zip(bulk, bulk[1:]) if p0 != "startup" and p1 == "startup" and acked > 1)
    assert restarts >= 2, phases  # the model was restarted, not left alone by luck
