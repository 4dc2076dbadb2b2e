"""contrib/gen-manpages.py: a man page per program, generated from the parsers the programs run,
documenting every subcommand and rendering without groff warnings; and shell completion
(argcomplete) answering from the same parsers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_manpages", ROOT / "contrib" / "gen-manpages.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_page_per_program_with_every_subcommand(tmp_path: Path) -> None:
    written = _generator().build(tmp_path)
    assert set(written) == {"lu2k.1", "lu2kd.8", "lu2kctl.8"}
    ctl = written["lu2kctl.8"]
    for cmd in ("net show", "peer show", "route show", "stats show", "ping", "discover", "export", "import", "set", "net add", "peer del"):
        assert f"lu2kctl {cmd}" in ctl
    assert {"lu2k send", "lu2k recv", "lu2k demo", "lu2k lab up", "lu2k keygen psk", "lu2k lnet check"} <= set(written["lu2k.1"])
    page = (tmp_path / "lu2kctl.8").read_text()
    assert page.startswith(".TH LU2KCTL 8") and "\\-\\-timeout" in page and ".SS lu2kctl ping" in page
    assert "\\-\\-log\\-json" in (tmp_path / "lu2kd.8").read_text()


@pytest.mark.skipif(shutil.which("man") is None, reason="man(1) is not installed")
def test_pages_render_without_warnings(tmp_path: Path) -> None:
    _generator().build(tmp_path)
    for page in tmp_path.iterdir():
        out = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat"})
        assert out.returncode == 0 and out.stderr == "", (page.name, out.stderr)
        assert "SYNOPSIS" in out.stdout


def test_the_script_runs(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "contrib" / "gen-manpages.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "lu2kctl.8" in out.stdout and (tmp_path / "lu2k.1").exists()


@pytest.mark.parametrize("module, line, expected", [
    ("lu2k.cli.ctl", "lu2kctl net sh", {"show"}),
    ("lu2k.cli.ctl", "lu2kctl di", {"discover"}),
    ("lu2k.cli.ctl", "lu2kctl peer show --n", {"--nid"}),
    ("lu2k.cli.main", "lu2k la", {"lab"}),
    ("lu2k.daemon", "lu2kd --log-j", {"--log-json"}),
])
def test_shell_completion(tmp_path: Path, module: str, line: str, expected: set[str]) -> None:
    pytest.importorskip("argcomplete")
    out_file = tmp_path / "completions"
    env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line, "COMP_POINT": str(len(line)),
           "_ARGCOMPLETE_STDOUT_FILENAME": str(out_file), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", module], env=env, capture_output=True, timeout=60)
    got = {w.strip() for w in out_file.read_text().split("\n") if w.strip()}
    assert expected <= got, got
