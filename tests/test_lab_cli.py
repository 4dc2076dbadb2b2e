"""lu2k.cli.lab: ``lu2k lab up|status|exec|link|stats|down`` through the real CLI entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lu2k.cli.main import build_parser, main
from lu2k.lab.netns import list_labs, netns_exists

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def test_parser_knows_lab_and_bench_link() -> None:
    p = build_parser()
    a = p.parse_args(["lab", "up", "--profile", "geo", "--loss", "1%", "--id", "x"])
    assert a.profile == "geo" and a.loss == "1%" and a.id == "x"
    b = p.parse_args(["bench", "link", "--backend", "tcp", "--profile", "geo", "--loss", "2%", "--duration", "5", "--json"])
    assert b.backend == "tcp" and b.loss == "2%" and b.duration == 5.0 and b.json


def test_bad_input_is_a_clear_error(lab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "up", "--rate", "fast"]) == 1
    assert "--rate" in capsys.readouterr().err
    assert main(["lab", "up", "--profile", "custom", "--rtt", "40ms"]) == 1
    assert "custom" in capsys.readouterr().err
    assert main(["lab", "stats"]) == 1
    assert "no lab is up" in capsys.readouterr().err


def test_down_without_labs_is_harmless(lab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "down"]) == 0
    assert "no lab is up" in capsys.readouterr().out
    assert main(["lab", "status"]) == 0
    assert "no labs" in capsys.readouterr().out


@needs_root
@pytest.mark.netns
def test_up_exec_flap_stats_down(lab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "up", "--profile", "leo", "--loss", "1%", "--id", "clit", "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    try:
        assert state["id"] == "clit" and netns_exists("lu2k-clit-a")
        assert main(["lab", "status", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert rows[0]["alive"] is True and rows[0]["specs"]["ab"]["loss"] == pytest.approx(0.01)
        assert main(["lab", "exec", "a", "--", "sh", "-c", 'test "$LU2K_LAB_PEER" = 10.201.1.2 -o -n "$LU2K_LAB_PEER"']) == 0
        assert main(["lab", "exec", "b", "--", "false"]) == 1
        assert main(["lab", "link", "down", "--direction", "ba"]) == 0
        assert json.loads(capsys.readouterr().out) == {"ab": True, "ba": False}
        assert main(["lab", "stats", "--compact"]) == 0
        assert json.loads(capsys.readouterr().out)["up"] == {"ab": True, "ba": False}
    finally:
        assert main(["lab", "down", "--id", "clit"]) == 0
    assert not netns_exists("lu2k-clit-a") and list_labs() == []


@needs_root
@pytest.mark.netns
def test_down_all_takes_every_lab_down_including_stale_ones(lab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import signal

    assert main(["lab", "up", "--profile", "leo", "--id", "all1", "--json"]) == 0
    assert main(["lab", "up", "--profile", "geo", "--id", "all2", "--json"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    os.kill(first["pid"], signal.SIGKILL)  # all1 is now stale
    assert main(["lab", "status"]) == 0
    assert "STALE" in capsys.readouterr().out
    assert main(["lab", "down", "--all"]) == 0
    out = capsys.readouterr().out
    assert "all1" in out and "all2" in out
    assert list_labs() == [] and not netns_exists("lu2k-all1-a") and not netns_exists("lu2k-all2-b")


def test_second_path_options_and_their_errors(lab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lu2k.lab.args import extra_paths_from_args

    p = build_parser()
    a = p.parse_args(["lab", "up", "--profile", "geo", "--loss", "1%", "--second-path", "leo", "--second-loss", "2%", "--ipv6"])
    (ab, ba), = extra_paths_from_args(a)
    assert ab.rate_bps == 50e6 and ab.loss == pytest.approx(0.02) and ab.seed != ba.seed and a.ipv6
    assert extra_paths_from_args(p.parse_args(["lab", "up"])) == []
    for argv, where in (
        (["--second-path", "mars"], "--second-path: unknown profile 'mars'"),
        (["--second-loss", "1%"], "add --second-path"),
        (["--second-path", "leo", "--second-rate", "fast"], "--second-rate"),
        (["--second-path", "custom", "--second-rate", "1mbit"], "--second-rtt"),
        (["--second-path", "leo", "--second-queue", "100"], "--second-queue"),
    ):
        assert main(["lab", "up", *argv]) == 1
        err = capsys.readouterr().err
        assert where in err and "Traceback" not in err
    assert main(["lab", "selftest", "--paths", "9"]) == 1
    assert "--paths: a lab has 1..4 paths" in capsys.readouterr().err
    assert list_labs() == []  # nothing was started


@needs_root
@pytest.mark.netns
def test_two_path_ipv6_lab_status_link_path_stats(lab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "up", "--profile", "geo", "--loss", "1%", "--second-path", "leo", "--second-loss", "2%",
                 "--ipv6", "--id", "mp", "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    try:
        assert [p["addr6"]["a"] for p in state["paths"]] == ["fd6c:7532:1::1", "fd6c:7532:1:1::1"]
        assert state["paths"][1]["specs"]["ab"]["rate_bps"] == 50e6 and state["paths"][1]["specs"]["ab"]["loss"] == 0.02
        assert main(["lab", "status"]) == 0
        out = capsys.readouterr().out
        assert "path 0: 20mbit, RTT 600 ms, loss 1%" in out and "path 1: 50mbit, RTT 40 ms, loss 2%" in out
        assert "10.202.1.1 <-> lu2k-mp-b 10.202.1.2 (fd6c:7532:1:1::1 <-> fd6c:7532:1:1::2)" in out
        assert main(["lab", "link", "down", "--path", "1"]) == 0
        assert json.loads(capsys.readouterr().out) == {"ab": False, "ba": False}
        for bad in ("2", "x", "-1"):
            assert main(["lab", "link", "down", "--path", bad]) == 1
            err = capsys.readouterr().err
            assert "--path" in err and "0..1" in err and "Traceback" not in err
        assert main(["lab", "link", "up", "--path", "all"]) == 0
        assert json.loads(capsys.readouterr().out) == [{"ab": True, "ba": True}] * 2
        assert main(["lab", "stats", "--compact"]) == 0
        stats = json.loads(capsys.readouterr().out)
        assert len(stats["paths"]) == 2 and stats["paths"][1]["queue_limit_bytes"]["ab"] == 250_000
        check = 'test "$LU2K_LAB_PATHS" = 2 -a "$LU2K_LAB_PEER_1" = 10.202.1.2 -a "$LU2K_LAB_PEER6_1" = fd6c:7532:1:1::2'
        assert main(["lab", "exec", "a", "--", "sh", "-c", check]) == 0
    finally:
        assert main(["lab", "down", "--id", "mp"]) == 0
    assert not netns_exists("lu2k-mp-a") and list_labs() == []
