"""``lu2k bench transfer``: a row's figures (with the load it ran under), the report (with the
emulator's lateness), and one short run over a fast lab link (root, network namespaces); the
200 MB GEO runs are by hand (docs/measurements/)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lu2k.lab.transfer_bench import _figures, format_transfer, run_transfer


def test_figures_share_of_limit_and_load() -> None:
    f = _figures(200_000_000, 80.0, 19.8e6, load_before=4.5)
    assert f["goodput_mbit"] == 20.0 and f["of_limit"] == round(20e6 / 19.8e6, 4)
    assert f["load"][0] == 4.5 and isinstance(f["load"][1], float)
    assert _figures(1, 1.0, 0.0)["of_limit"] is None


def test_report_has_every_row_its_load_and_the_emulator_lateness() -> None:
    row = {**_figures(200_000_000, 88.0, 19.8e6, load_before=3.0), "verified": True, "queue_drops_ab": 2813, "connections_lost": 7}
    bad = {**_figures(200_000_000, 120.0, 19.8e6, load_before=9.0), "verified": False}
    lat = {"lateness": {"p99_us": 1030.0, "max_us": 28000.0}}
    text = format_transfer({"tcp_backend_congestion": "bbr", "size": 200_000_000, "rate_mbit": 20.0, "rtt_ms": 600.0, "loss": 0.01,
                            "limit_mbit": 19.8, "transfer": {"kernel-bbr": row, "lu2k-tcp warm": bad}, "http": {},
                            "lab": {"links": {"ab": lat, "ba": lat}}})
    assert "lu2k-tcp warm" in text and "NO" in text and "yes" in text and "92%" in text
    assert "3.0/" in text and "9.0/" in text
    assert "queue drops a->b" in text and "2813" in text  # and "-" for the row without the count
    assert "conns lost" in text and " 7 " in text
    assert "ab p99 1.03 ms, max 28.0 ms" in text
    assert "backend options" not in text
    with_options = format_transfer({"tcp_backend_congestion": "bbr", "options": {"notsent_lowat": 0}, "size": 1, "rate_mbit": 20.0,
                                    "rtt_ms": 600.0, "loss": 0.01, "limit_mbit": 19.8, "transfer": {}, "http": {}})
    assert "backend options: notsent_lowat=0" in with_options and "kernel TCP" not in with_options
    tuned = format_transfer({"tcp_backend_congestion": "bbr", "host_tuning": {"initcwnd": 1000, "rmem_default": 8 << 20}, "size": 1,
                             "rate_mbit": 20.0, "rtt_ms": 600.0, "loss": 0.01, "limit_mbit": 19.8, "transfer": {}, "http": {}})
    assert "both sites' kernel TCP: initcwnd 1000, rmem_default 8388608" in tuned


@pytest.mark.netns
@pytest.mark.timeout(300)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_a_short_run_has_every_row_verified_with_its_drops_and_options() -> None:
    from lu2k.lab.spec import build_specs

    r = run_transfer(build_specs("custom", rate="200mbit", rtt="10ms"), size=4_000_000, backends=["tcp"], forward_backends=[],
                     http=False, options={"startup_cap": "off"}, small_files=5, small_size=1000,
                     host_tuning={"initcwnd": 100, "rmem_default": 0})  # the lab's effect: test_lab_netns
    assert set(r["transfer"]) == {"kernel-bbr", "lu2k-tcp cold", "lu2k-tcp warm"}
    assert r["host_tuning"] == {"initcwnd": 100}
    for how in ("inline", "plain"):
        small = r["small"][f"lu2k-tcp {how}"]
        assert small["verified"] and small["files"] == 5 and small["files_per_s"] > 0
    assert "small files, one directory" in format_transfer(r)
    for name, row in r["transfer"].items():
        assert row["verified"], (name, row)
        assert isinstance(row["queue_drops_ab"], int) and row["queue_drops_ab"] >= 0
        # lu2k's rows count the connections the daemons lost (none on a clean link); the kernel's has none to count
        assert row.get("connections_lost") == (None if name == "kernel-bbr" else 0), (name, row)
    assert r["options"] == {"startup_cap": "off"} and "backend options: startup_cap=off" in format_transfer(r)


@pytest.mark.parametrize("args, what", [
    (["--small-files", "-1"], "--small-files"),
    (["--small-files", "5", "--small-size", "-3"], "--small-size"),
    (["--option", "notsent_lowat"], "--option"),
    (["--size", "0"], "--size"),
    (["--initcwnd", "99999"], "initcwnd"),
    (["--rmem-default", "lots"], "--rmem-default"),
    (["--rmem-default", "1k"], "rmem_default"),
])
def test_bad_arguments_are_named_without_a_traceback(args: list[str], what: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-m", "lu2k.cli.main", "bench", "transfer", "--no-http", "--backends", "tcp", *args],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0 and "Traceback" not in out.stderr and what in out.stderr, out.stderr
