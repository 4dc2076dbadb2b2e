"""The documentation: the mkdocs site builds with no warning (broken links, anchors, pages left
out of the nav), the README stays short and its links resolve, no page tells how the project
was developed, every lu2k/lu2kd/lu2kctl command line written in the docs is accepted by that
command's parser, and the two-site walkthrough runs exactly as written."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
TEXTS = [ROOT / "README.md", *PAGES]


def _mkdocs_config() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "mkdocs.yml").read_text()))


def _nav_files(nav: Any) -> Iterator[str]:
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from _nav_files(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_files(value)


def _prune(nav: Any) -> Any:
    """The nav without entries whose page is not in this checkout."""
    if isinstance(nav, str):
        return nav if (DOCS / nav).is_file() else None
    if isinstance(nav, list):
        return [x for x in (_prune(i) for i in nav) if x not in (None, [], {})]
    if isinstance(nav, dict):
        return {k: v for k, v in ((k, _prune(v)) for k, v in nav.items()) if v not in (None, [], {})}
    return nav


def test_nav_names_only_pages_that_exist() -> None:
    missing = [p for p in _nav_files(_mkdocs_config()["nav"]) if not (DOCS / p).is_file()]
    if missing:
        pytest.skip(f"the nav lists pages that other branches add and this checkout lacks: {', '.join(missing)}")


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install 'lu2k[test]')")
    cfg = _mkdocs_config()
    cfg["nav"] = _prune(cfg["nav"])  # pages still to come are checked by the test above once they exist
    cfg["docs_dir"] = str(DOCS)
    cfg["site_dir"] = str(tmp_path / "site")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml")],
                         capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "WARNING" not in log, log
    assert (tmp_path / "site" / "user" / "two-sites-geo.html").is_file()
    # every fenced block became a code block (an unrecognised fence renders as a paragraph of backticks)
    # and no table cell shows an escaped pipe (inside code spans "\\|" stays as typed)
    # and no list was read as a paragraph (Python-Markdown wants a blank line before a list)
    broken = [str(p.relative_to(tmp_path / "site")) for p in (tmp_path / "site").rglob("*.html")
              if "<p>```" in p.read_text() or "\\|" in p.read_text()
              or any(re.search(r"\n\s*([-*]|\d+\.) \S", m) for m in re.findall(r"<p>(.*?)</p>", p.read_text(), re.S))]
    assert not broken, broken


def test_readme_is_short_and_its_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    nav = set(_nav_files(_mkdocs_config()["nav"]))
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        path = (ROOT / target).resolve()
        pending = path.is_relative_to(DOCS) and str(path.relative_to(DOCS)) in nav
        assert path.exists() or pending, f"README links to {target}, which does not exist"
    # the quick start is the two commands CI and newcomers run
    assert "bash contrib/install.sh && venv/bin/lu2k demo" in text and "bash contrib/run-tests.sh" in text
    for script in ("contrib/install.sh", "contrib/run-tests.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0


DEVELOPMENT_HISTORY = re.compile(
    r"\b(first|second|this|previous|earlier) session\b|\bengineers?\b|\bthe lead\b|\bhelpers?\b|\blab owner\b|"
    r"\bissue \d+\b|\bwhat was wrong\b|\bbefore the fix\b", re.IGNORECASE)


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_development_history(path: Path) -> None:
    hits = [m.group(0) for m in DEVELOPMENT_HISTORY.finditer(path.read_text())]
    assert not hits, f"{path.relative_to(ROOT)} talks about how lu2k was developed: {hits}"


@pytest.mark.parametrize("path", sorted((DOCS / "measurements").glob("20*.md")), ids=lambda p: p.name)
def test_measurements_state_commit_machine_load_and_command(path: Path) -> None:
    head = path.read_text()[:1500].lower()
    for field in ("commit", "machine", "load", "reproduce"):
        assert field in head, f"{path.name} does not state its {field}"


def test_measurements_index_lists_every_page() -> None:
    index = (DOCS / "measurements" / "index.md").read_text()
    for page in sorted((DOCS / "measurements").glob("20*.md")):
        assert page.name in index, f"measurements/index.md does not list {page.name}"


# --- command lines in the docs ---------------------------------------------------------------------

PROGRAMS = {"lu2k": ("lu2k.cli.main", "build_parser"), "lu2kd": ("lu2k.daemon", "build_parser"), "lu2kctl": ("lu2k.cli.ctl", "build_parser")}
SHELL_STOP = {">", ">>", "2>", "2>&1", "|", "||", "&&", ";", "&", "<"}


def _code_blocks(text: str) -> Iterator[tuple[str, str]]:
    for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        yield m.group(1).strip(), m.group(2)


def _command_lines() -> Iterator[tuple[str, str]]:
    for path in TEXTS:
        for lang, body in _code_blocks(path.read_text()):
            if lang.split(" ")[0] not in ("", "sh", "console", "bash"):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                for prefix in ("venv/bin/", "/opt/lu2k/venv/bin/"):
                    line = line.removeprefix(prefix)
                first = line.split(" ", 1)[0]
                # synopsis lines ([optional], a|b, ..., <placeholders>, UPPERCASE words) are not commands
                if first in PROGRAMS and not re.search(r"\[|\||\.\.\.|<|\b[A-Z]{2,}\b(?!@)", line.split("#")[0].replace("$B", "")):
                    yield f"{path.relative_to(ROOT)}: {line}", line


COMMAND_LINES = list(_command_lines())


def test_the_docs_have_commands_to_check() -> None:
    assert len(COMMAND_LINES) > 30


@pytest.mark.parametrize("where, line", COMMAND_LINES, ids=[w for w, _ in COMMAND_LINES])
def test_command_lines_in_the_docs_parse(where: str, line: str) -> None:
    import importlib

    words = shlex.split(line, comments=True)
    for i, w in enumerate(words):
        if w in SHELL_STOP or w.startswith(("2>", ">")):
            words = words[:i]
            break
        if w.endswith(";"):
            words = words[:i] + [w[:-1]]
            break
    module, func = PROGRAMS[words[0]]
    parser = getattr(importlib.import_module(module), func)()
    try:
        parser.parse_args(words[1:])
    except SystemExit as e:
        assert e.code == 0, f"{where}: the {words[0]} parser refuses it"


# --- the two-site walkthrough -------------------------------------------------------------------------


def _walkthrough() -> str:
    text = (DOCS / "user" / "two-sites-geo.md").read_text()
    marker = "<!-- two-sites.sh: tests/test_docs.py runs this block -->\n"
    [body] = [b for _, b in _code_blocks(text[text.index(marker) + len(marker):])][:1]
    return body


def test_walkthrough_block_is_valid_shell() -> None:
    assert subprocess.run(["bash", "-n"], input=_walkthrough(), text=True).returncode == 0


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_sites_over_geo_exactly_as_documented(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists() or shutil.which("ip") is None:
        pytest.skip("needs root, /dev/net/tun and iproute2 (the lab makes network namespaces)")
    pytest.importorskip("aioquic")
    # The documented commands, on PATH as an installed lu2k provides them, running this checkout.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, (module, _) in PROGRAMS.items():
        (bindir / name).write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m {module} \"$@\"\n")
        (bindir / name).chmod(0o755)
    work = tmp_path / "site"
    work.mkdir()
    lab = "op" + secrets.token_hex(3)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "LAB": lab,
           "LU2K_LAB_DIR": str(tmp_path / "labs")}
    try:
        out = subprocess.run(["bash", "-euo", "pipefail"], input=_walkthrough(), cwd=work, env=env,
                             capture_output=True, text=True, timeout=240)  # about 15 s as a rule
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in work.glob("*.log"))
        assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}\n{logs}"
        assert "received intact" in out.stdout
        lines = out.stdout.splitlines()
        start = lines.index("ping:")
        end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" "))
        ping = yaml.safe_load("\n".join(lines[start:end]))["ping"][0]
        assert ping["primary nid"].endswith("@quic") and ping["lu2k"]["rtt_ms"] > 0
        assert (work / "data.bin").read_bytes() == (work / "received.bin").read_bytes()
    finally:
        subprocess.run([str(bindir / "lu2k"), "lab", "down", "--id", lab], env=env, capture_output=True, timeout=60)
