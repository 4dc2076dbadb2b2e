"""Packaging: the installed package must contain every module (pytest runs from the checkout, which
would hide a directory that setuptools does not see as a package); sdist and wheel build cleanly and
carry what they must; the install script's options and dpkg-lock wait; LICENSE; --version."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_directory_is_a_package() -> None:
    found = set(find_packages(str(ROOT), include=["lu2k", "lu2k.*"]))
    dirs = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "lu2k").rglob("*.py")}
    assert dirs <= found, f"not packaged (missing __init__.py): {sorted(dirs - found)}"


def test_console_scripts_point_at_real_functions() -> None:
    import importlib

    text = (ROOT / "setup.cfg").read_text()
    scripts = text.split("console_scripts =", 1)[1].split("\n\n", 1)[0].split("\n")
    entries = [line.split("=", 1)[1].strip() for line in scripts if "=" in line]
    assert len(entries) == 3
    for entry in entries:
        module, _, func = entry.partition(":")
        assert callable(getattr(importlib.import_module(module), func))


# --- building, installing, licensing -------------------------------------------------------------

def _checkout_copy(dest: Path) -> Path:
    """The files git would commit (tracked and new, ignored ones left out): a clean clone's tree."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(name))
    return dest


@pytest.mark.timeout(600)
def test_sdist_and_wheel_build_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("build")
    src = _checkout_copy(tmp_path / "src")
    out = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "is absent from the `packages` configuration" not in log and "BuildBackendWarning" not in log
    [sdist] = (tmp_path / "dist").glob("lu2k-*.tar.gz")
    [wheel] = (tmp_path / "dist").glob("lu2k-*.whl")  # built from the sdist, as pip would
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "setup.py", "setup.cfg", "contrib/lu2kd.yaml", "contrib/systemd/lu2kd.service",
            "lu2k/backends/_udt/udtcore.cpp", "lu2k/backends/_udt/rate_law.h", "lu2k/backends/_udt/packet_auth.h", "lu2k/py.typed"} <= names
    with zipfile.ZipFile(wheel) as z:
        wnames = set(z.namelist())
    assert {"lu2k/py.typed", "lu2k/daemon.py", "lu2k/metrics.py", "lu2k/backends/_udt/rate_law.h", "lu2k/backends/_udt/packet_auth.h"} <= wnames
    if Path("/usr/include/udt/udt.h").exists() and shutil.which("g++"):
        # the binding must build from the sdist alone (its header travels with it)
        assert "NOT building the UDT binding" not in log, log[-3000:]
        assert any(n.startswith("lu2k/backends/_udtcore") and n.endswith(".so") for n in wnames)


def test_license_is_gpl2_full_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 2, June 1991" in text and "END OF TERMS AND CONDITIONS" in text
    assert "license = GPL-2.0-only" in (ROOT / "setup.cfg").read_text()


@pytest.mark.parametrize("module, prog", [("lu2k.cli.main", "lu2k"), ("lu2k.daemon", "lu2kd"), ("lu2k.cli.ctl", "lu2kctl")])
def test_version_on_every_command(module: str, prog: str) -> None:
    from lu2k import __version__

    out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith(prog) and __version__ in out.stdout


def test_udt_hint_names_the_debian_package() -> None:
    from lu2k.backends import _HINTS

    assert "apt-get install libudt-dev" in _HINTS["udt"] and "pip install" not in _HINTS["udt"]


INSTALL = ["bash", str(ROOT / "contrib" / "install.sh")]


def test_install_help_and_bad_options() -> None:
    out = subprocess.run(INSTALL + ["--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: bash contrib/install.sh" in out.stdout and out.stderr == ""
    bad = subprocess.run(INSTALL + ["--frobnicate"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown option --frobnicate" in bad.stderr
    bad = subprocess.run(INSTALL + ["--lock-timeout", "soon", "--wait-for-lock"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "whole seconds" in bad.stderr


def test_install_waits_for_the_dpkg_lock_then_goes_on(tmp_path: Path) -> None:
    lock = tmp_path / "lock-frontend"
    env = {**os.environ, "LU2K_DPKG_LOCKS": f"{tmp_path / 'absent'} {lock}"}
    with open(lock, "a") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)  # as dpkg does
        gave_up = subprocess.run(INSTALL + ["--wait-for-lock", "--lock-timeout", "1"], capture_output=True, text=True, env=env, timeout=60)
        assert gave_up.returncode == 1 and "still held after 1s" in gave_up.stderr
        waiting = subprocess.Popen(INSTALL + ["--wait-for-lock", "--lock-timeout", "120"], stderr=subprocess.PIPE, text=True, env=env)
        assert waiting.stderr is not None
        assert "waiting up to 120s" in waiting.stderr.readline()  # it saw the lock and said so
        fcntl.lockf(held, fcntl.LOCK_UN)
        assert waiting.wait(60) == 0
        waiting.stderr.close()
    free = subprocess.run(INSTALL + ["--wait-for-lock"], capture_output=True, text=True, env=env, timeout=60)
    assert free.returncode == 0 and free.stdout == "" and free.stderr == ""  # quiet when there is nothing to say


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_install_script_end_to_end_then_the_demo(tmp_path: Path) -> None:
    """The quick start on a copy of the checkout: quiet install (one line), /etc files, then `lu2k demo`."""
    src = _checkout_copy(tmp_path / "src")
    etc = tmp_path / "etc"
    out = subprocess.run(["bash", "contrib/install.sh", "--no-apt", "--etc", str(etc)], cwd=src, capture_output=True, text=True,
                         timeout=900, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.splitlines() == [f"installed: lu2k {__import__('lu2k').__version__} in venv"] and out.stderr == ""
    if os.geteuid() == 0:
        assert (etc / "lu2kd.yaml").read_text() == (ROOT / "contrib" / "lu2kd.yaml").read_text()
        key = (etc / "net.key").read_text().strip()
        assert key.startswith("hex:") and len(key) == 4 + 64 and (etc / "net.key").stat().st_mode & 0o077 == 0
    demo = subprocess.run([str(src / "venv" / "bin" / "lu2k"), "demo", "--megabytes", "5"], cwd=src, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert demo.returncode == 0 and "every byte verified" in demo.stdout, demo.stdout[-2000:] + demo.stderr[-2000:]


SERVICE_CHECKS = r"""
set -e
getent passwd lu2k | grep -q nologin && echo "user ok"
/opt/lu2k/venv/bin/lu2kd --version
cmp /etc/systemd/system/lu2kd.service contrib/systemd/lu2kd.service && echo "unit ok"
[ "$(stat -c %G:%a /etc/lu2k/net.key)" = lu2k:640 ] && echo "key ok"
/usr/local/bin/lu2kctl --version
MANPATH=/usr/local/share/man man -w lu2kd lu2kctl lu2k >/dev/null && echo "man ok"
if [ -d /etc/bash_completion.d ]; then grep -q "_python_argcomplete" /etc/bash_completion.d/lu2k; fi
echo "completion ok"
if command -v systemd-analyze >/dev/null; then systemd-analyze verify /etc/systemd/system/lu2kd.service && echo "verify ok"; else echo "verify ok"; fi
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_install_service_in_a_private_mount_namespace(tmp_path: Path) -> None:
    """install.sh --service for real, with /etc, /opt and /usr/local overlaid in a private mount
    namespace: the machine's own are never written."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    src = _checkout_copy(tmp_path / "src")
    mounts = []
    for name, target in (("etc", "/etc"), ("opt", "/opt"), ("usrlocal", "/usr/local")):
        (tmp_path / name / "u").mkdir(parents=True)
        (tmp_path / name / "w").mkdir()
        mounts.append(f"mount -t overlay overlay -o lowerdir={target},upperdir={tmp_path / name / 'u'},workdir={tmp_path / name / 'w'} {target}")
    script = "set -e\n" + "\n".join(mounts) + "\nbash contrib/install.sh --service --no-apt\n" + SERVICE_CHECKS
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], cwd=src, capture_output=True,
                         text=True, timeout=900, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("installed: lu2k") and "service lu2kd" in lines[0]
    for marker in ("user ok", "unit ok", "key ok", "man ok", "completion ok", "verify ok"):
        assert marker in lines, (marker, out.stdout, out.stderr)
    assert (tmp_path / "etc" / "u" / "systemd" / "system" / "lu2kd.service").is_file()  # written to the overlay, not the host
