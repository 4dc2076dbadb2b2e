"""lu2k.lab.latency: the pacing, percentile and stream-framing arithmetic, and one short real run.

The real run checks completeness and that every figure is present and ordered; the figures
themselves are the benchmark's business (``lu2k bench latency``), never asserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lu2k.errors import ConfigError, NetworkError
from lu2k.lab.latency import (
    RECORD, STAMP, RecordDecoder, Schedule, cdf, credits_for, encode_record, floor_ms, format_latency, parse_loads, parse_sizes,
    percentiles, run_latency, send_interval,
)
from lu2k.lab.spec import LinkSpec, build_specs

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def test_send_interval_offers_the_load() -> None:
    # 1 KiB at 80 % of 20 Mbit/s: 16 Mbit/s of 8192-bit messages = 1953.125 per second.
    assert send_interval(1024, 20e6, 0.8) == pytest.approx(1 / 1953.125)
    assert send_interval(65536, 20e6, 0.5) == pytest.approx(65536 * 8 / 10e6)
    for bad in ((0, 20e6, 0.5), (1024, 0.0, 0.5), (1024, 20e6, 0.0), (1024, 20e6, 1.5)):
        with pytest.raises(ConfigError):
            send_interval(*bad)


def test_floor_is_delay_plus_serialization() -> None:
    geo, _ = build_specs("geo")
    assert floor_ms(geo, 0) == pytest.approx(300.0)
    assert floor_ms(geo, 65536) == pytest.approx(300.0 + 65536 * 8 / 20e6 * 1e3)
    assert floor_ms(LinkSpec(rate_bps=0.0, delay_s=0.02), 1000) == pytest.approx(20.0)


def test_percentiles_nearest_rank() -> None:
    samples = [i / 1000 for i in range(1, 1001)]  # 1 .. 1000 ms
    p = percentiles(samples)
    assert p == {"p50_ms": pytest.approx(500.0), "p99_ms": pytest.approx(990.0), "p999_ms": pytest.approx(999.0),
                 "max_ms": pytest.approx(1000.0)}
    assert percentiles([]) == {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    assert percentiles([0.25]) == {"p50_ms": 250.0, "p99_ms": 250.0, "p999_ms": 250.0, "max_ms": 250.0}


def test_cdf_is_monotone_and_ends_at_one() -> None:
    samples = [0.3 + (i % 17) / 1000 for i in range(5000)]
    points = cdf(samples, points=50)
    assert points[-1][1] == 1.0
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in zip(points, points[1:]))
    assert len(points) <= 52
    assert cdf([]) == []


def test_record_stream_split_anywhere() -> None:
    stream = b"".join(encode_record(k, 100.0 + k, size) for k, size in enumerate((RECORD.size, 40, 1000, 65536)))
    for cut in (1, 3, RECORD.size, 999, 4096):
        dec = RecordDecoder()
        got = []
        for i in range(0, len(stream), cut):
            got += dec.feed(stream[i : i + cut])
        assert got == [(0, 100.0), (1, 101.0), (2, 102.0), (3, 103.0)]
    # A record shorter than its own header is clamped up, never written short.
    assert len(encode_record(1, 0.0, 3)) == RECORD.size


def test_record_stream_rejects_corrupt_lengths() -> None:
    for length in (RECORD.size - 1, 1 << 30):
        with pytest.raises(NetworkError, match="record length"):
            RecordDecoder().feed(RECORD.pack(length, 0, 0.0))


def test_credits_for_fill_the_link() -> None:
    geo, _ = build_specs("geo")
    assert credits_for(geo, 1024) == int(2 * 20e6 * 0.6 / 8 / 1024)  # 2 BDPs of 1 KiB messages
    assert credits_for(geo, 1 << 20) == 256
    assert credits_for(LinkSpec(rate_bps=10e9, delay_s=0.3), 64) == 1 << 16


def test_schedule() -> None:
    s = Schedule(start=10.0, interval=0.25)
    assert [s.due(k) for k in range(3)] == [10.0, 10.25, 10.5]
    assert s.count(2.0) == 8 and s.count(0.0) == 1


def test_parse_loads_and_sizes() -> None:
    assert parse_loads(["50%", "0.8", "100%"]) == (0.5, 0.8, 1.0)
    assert parse_sizes(["1k", "64k", "100"]) == (1024, 65536, 100)
    for bad in (["0"], ["150%"], ["fast"], []):
        with pytest.raises(ConfigError):
            parse_loads(bad)
    for bad in ([str(STAMP.size - 1)], ["5m"], ["x"], []):
        with pytest.raises(ConfigError):
            parse_sizes(bad)


def test_format_table() -> None:
    cell = {"path": "lu2k/quic", "size": 1024, "load": 0.8, "floor_ms": 300.4, "p50_ms": 310.0, "p99_ms": 360.0,
            "p999_ms": 900.0, "max_ms": 950.0, "missing": 0}
    text = format_latency({"link_mbit": 20.0, "rtt_ms": 600.0, "loss": 0.01, "cells": [cell],
                           "emulator": {"lateness_p99_ms": 0.5}, "load_average": (0.4, 0.3, 0.2)})
    assert "lu2k/quic" in text and "+60" in text and "80%" in text and "load average 0.40" in text
    beside = {**cell, "path": "lu2k/quic +saturating", "saturator": {"offered_mbit": 31.0, "backpressure_waits": 115,
                                                                      "blocked_s": 13.2, "wall_s": 13.3},
              "sink": {"carried_mbit": 11.8}}
    text = format_latency({"link_mbit": 20.0, "rtt_ms": 600.0, "loss": 0.0, "cells": [cell, beside],
                           "emulator": {"lateness_p99_ms": 0.5}, "load_average": (0.4, 0.3, 0.2)})
    assert "offered 31.0 Mbit/s, carried 11.8; blocked 115 times, 13.2 s of 13.3 s" in text


def test_cli_rejects_bad_arguments_without_a_traceback() -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-m", "lu2k.cli.main", "bench", "latency", "--loads", "150%"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "--loads" in out.stderr


@needs_root
@pytest.mark.netns
def test_short_run_every_message_once(daemons_dir: Path) -> None:
    specs = build_specs("leo", rate="10mbit", loss="1%", seed=3)
    r = run_latency("tcp", specs, sizes=(4096,), loads=(0.5,), duration=2.0, warmup=0.5)
    assert [c["path"] for c in r["cells"]] == ["lu2k/tcp", "kernel tcp-bbr"]
    for c in r["cells"]:
        assert c["missing"] == 0 and c["duplicates"] == 0
        assert c["samples"] > 0
        assert c["floor_ms"] <= c["p50_ms"] <= c["p99_ms"] <= c["p999_ms"] <= c["max_ms"]
    lu2k = r["cells"][0]
    assert lu2k["sender"]["delivered"] == lu2k["received"] and not lu2k["sender"]["failed"]
    assert r["emulator"]["drops_loss"] > 0  # the run really crossed a lossy link


@needs_root
@pytest.mark.netns
def test_saturating_endpoint_is_pushed_back_and_paced_one_stays_near_its_floor(daemons_dir: Path) -> None:
    """Under saturation: one endpoint offers far more than the link, a
    second (paced, below its fair share) shares the peer.  The saturating one must be pushed
    back (its sends block); the paced one's tail may grow by lu2k's bounded queue -- the
    profile's window, two BDPs -- and a round trip, not by the saturating backlog (1024
    messages of 64 KiB: 27 s of link time).  Bounds are relative to the same run's own
    unloaded cell and link, never a wall-clock constant.
    """
    from lu2k.settings import LinkProfile, derive_link_defaults

    specs = build_specs("custom", rate="20mbit", rtt="100ms", seed=5)
    r = run_latency("tcp", specs, sizes=(16384,), loads=(0.2,), duration=4.0, warmup=1.0, baseline=None, saturate=True)
    alone, beside = r["cells"]
    assert (alone["path"], beside["path"]) == ("lu2k/tcp", "lu2k/tcp +saturating")
    for c in (alone, beside):
        assert c["missing"] == 0 and c["duplicates"] == 0 and c["samples"] > 0
    sat, sink = beside["saturator"], beside["sink"]
    assert sat["backpressure_waits"] > 0 and sat["blocked_s"] > 0.5 * sat["wall_s"]  # pushed back, most of the time
    assert sink["received"] > 0 and not sat["failed"]
    window = derive_link_defaults(LinkProfile(rtt_ms=100, rate_mbit=20))["window_bytes"]
    drain_ms = window * 8 / 20e6 * 1e3  # lu2k's whole bounded queue, at the link's rate
    allowance = 2 * drain_ms + 2 * r["rtt_ms"]
    assert beside["p99_ms"] <= alone["p99_ms"] + allowance, (alone["p99_ms"], beside["p99_ms"], allowance)


def test_fec_summary_line() -> None:
    from lu2k.lab.latency import fec_summary

    quic = {"a": {"fec": "auto", "fec_data_bytes": 1_000_000, "fec_repair_bytes": 40_000},
            "b": {"fec": "auto", "fec_recovered": 90, "fec_lost": 95, "fec_unrecovered_groups": 2}}
    line = fec_summary(quic)
    assert line is not None and "repair 4.0 % of the data bytes" in line and "95 datagrams missing, 90 of them rebuilt" in line
    udt = {"a": {"fec": "5%", "fec_sent_data_bytes": 200, "fec_sent_repair_bytes": 10}, "b": {"fec": "5%"}}
    assert "repair 5.0 %" in (fec_summary(udt) or "")
    assert fec_summary({}) is None and fec_summary({"a": quic["a"]}) is None


class _Completion:
    """A message's completion as the paced sender sees it: done once ``wait`` (or time) settled it."""

    def __init__(self, settles_on_wait: bool = True) -> None:
        self.done = False
        self.status: int | None = None
        self.waited = 0
        self._settles = settles_on_wait

    def finish(self) -> None:
        self.done, self.status = True, 0

    def wait(self, timeout: float) -> bool:
        self.waited += 1
        if self._settles:
            self.finish()
        return self.done


def test_a_pushed_back_sender_waits_for_one_completion_not_the_whole_window() -> None:
    from lu2k.lab.latency import Completions

    done = Completions()
    window = [_Completion() for _ in range(5)]
    done.pending.extend(window)
    window[1].finish()  # already in: counted along with the oldest
    done.settle(block=True)
    assert done.delivered == 2 and [c.waited for c in window] == [1, 0, 0, 0, 0] and len(done.pending) == 3
    done.settle(block=False)  # nothing more is in: nothing waited for
    assert done.delivered == 2 and sum(c.waited for c in window) == 1
    done.drain()
    assert done.delivered == 5 and not done.pending


def test_a_completion_that_does_not_come_stops_the_wait() -> None:
    from lu2k.lab.latency import Completions

    done = Completions()
    stuck = _Completion(settles_on_wait=False)
    done.pending.extend([stuck, _Completion()])
    done.settle(block=True)
    assert stuck.waited == 1 and done.delivered == 0 and len(done.pending) == 2


def test_cpu_per_message_per_daemon() -> None:
    from lu2k.lab.latency import cpu_per_message

    assert cpu_per_message({"a": 1.0, "b": 2.0}, {"a": 1.5, "b": 2.25}, 1000) == {"lu2kd-a": 500.0, "lu2kd-b": 250.0}
    assert cpu_per_message({"a": 1.0}, {"a": 1.0, "b": 3.0}, 0) == {"lu2kd-a": 0.0}


def test_lab_endpoints_may_use_every_peer_credit(tmp_path: Path) -> None:
    """The shim's per-port limit of messages in flight must not be below the lab's peer credits
    (it was 1 024 by default: 1 KiB messages then could not fill a GEO round trip)."""
    import yaml

    from lu2k.lab.bench import LabDaemons

    class _State:
        specs = build_specs("geo")
        addr = {"a": "10.9.0.1", "b": "10.9.0.2"}

    class _Lab:
        state = _State()

    credits = credits_for(_State.specs[0], 1024)
    LabDaemons(_Lab(), "tcp", tmp_path, peer_credits=credits)  # type: ignore[arg-type]
    for side in ("a", "b"):
        cfg = yaml.safe_load((tmp_path / f"lu2kd-{side}.yaml").read_text())
        assert cfg["lu2k"]["shim"]["max_in_flight"] == credits > 1024
