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
