"""contrib/systemd/lu2kd.service and contrib/lu2kd.yaml: the unit is what lu2kd implements
(Type=notify with a watchdog), runs as its own user with hardening, starts what install.sh
--service installs, and passes systemd-analyze verify; the default configuration passes
lu2kd --check."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "systemd" / "lu2kd.service"


def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def test_unit_is_notify_with_watchdog_own_user_and_hardening() -> None:
    s = _unit()["Service"]
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"] and int(s["WatchdogSec"][0]) > 0
    assert s["User"] == ["lu2k"] and s["Group"] == ["lu2k"] and s["RuntimeDirectory"] == ["lu2k"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("RestrictNamespaces", "yes"), ("SystemCallFilter", "@system-service"), ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE")):
        assert s[key] == [value], key
    assert s["ExecStart"] == ["/opt/lu2k/venv/bin/lu2kd --config /etc/lu2k/lu2kd.yaml --log-json"]
    assert s["ExecStartPre"] == ["/opt/lu2k/venv/bin/lu2kd --check --config /etc/lu2k/lu2kd.yaml"]
    install = (ROOT / "contrib" / "install.sh").read_text()
    assert "venv=/opt/lu2k/venv" in install and "/etc/systemd/system/lu2kd.service" in install


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # The unit as installed, with lu2kd at a path that exists here and the man pages it names generated.
    lu2kd = tmp_path / "lu2kd"
    lu2kd.write_text(f"#!/bin/sh\nexec {sys.executable} -m lu2k.daemon \"$@\"\n")
    lu2kd.chmod(0o755)
    (tmp_path / "lu2kd.service").write_text(UNIT.read_text().replace("/opt/lu2k/venv/bin/lu2kd", str(lu2kd)))
    spec = importlib.util.spec_from_file_location("gen_manpages", ROOT / "contrib" / "gen-manpages.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.build(tmp_path / "man" / "man8")
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "lu2kd.service")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MANPATH": str(tmp_path / "man")})
    assert out.returncode == 0 and "lu2kd.service" not in out.stderr, out.stderr


def test_default_config_checks(tmp_path: Path) -> None:
    key = tmp_path / "net.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    from lu2k.config import system_interfaces

    interface = next((i.name for i in system_interfaces() if i.up and i.name != "lo"), None)
    if interface is None:
        pytest.skip("no network interface besides lo")
    text = (ROOT / "contrib" / "lu2kd.yaml").read_text()
    # Only the site-specific values change: the interface, and the key's path (the real one is /etc/lu2k/net.key).
    text = text.replace("0: eth0", f"0: {interface}").replace("/etc/lu2k/net.key", str(key))
    (tmp_path / "lu2kd.yaml").write_text(text)
    out = subprocess.run([sys.executable, "-m", "lu2k.daemon", "--check", "--config", str(tmp_path / "lu2kd.yaml")],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and ": OK: 1 net(s)" in out.stdout, out.stderr

