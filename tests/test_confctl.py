"""lu2k.confctl: lnetctl-style configuration of a running daemon, applied whole or not at all.

A real lu2kd (TCP backend on loopback) is started in-process; commands go through its
control socket exactly as lu2kctl sends them, and through lu2kctl's own main().
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from lu2k.cli import ctl
from lu2k.confctl import document_from_config
from lu2k.control import request
from lu2k.daemon import Daemon
from lu2k.errors import Lu2kError
from lu2k.localpair import free_port
from lu2k.settings import parse_config

KEY = "confctl-test-key"


def _doc(tmp_path: Path, port: int) -> dict[str, Any]:
    return {
        "net": [{"net type": "tcp", "local NI(s)": [{"nid": "127.0.0.1@tcp", "tunables": {"peer_credits": 8, "credits": 64}}],
                 "lu2k": {"backend": "tcp", "port": port, "key": KEY}}],
        "global": {"transaction_timeout": 5, "connect_timeout": 1},
        "lu2k": {"shim": {"path": str(tmp_path / "d.shim")}, "control": {"path": str(tmp_path / "d.ctl")}},
    }


@pytest.fixture
async def daemon(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "lu2kd.yaml"
    path.write_text(yaml.safe_dump(_doc(tmp_path, free_port())))
    from lu2k.settings import load_config

    d = Daemon(load_config(str(path)))
    await d.start()
    yield d
    await d.stop()


async def call(d: Daemon, cmd: str, **args: Any) -> Any:
    return await request(d.config.control_path, cmd, args)


async def test_export_is_lnetctl_yaml_without_secrets(daemon: Daemon) -> None:
    out = await call(daemon, "export")
    data = yaml.safe_load(out["yaml"])
    assert data["net"][0]["net type"] == "tcp" and data["net"][0]["local NI(s)"][0]["nid"] == "127.0.0.1@tcp"
    assert KEY not in out["yaml"] and "hidden" in data["net"][0]["lu2k"]["key"]
    full = yaml.safe_load((await call(daemon, "export", secrets=True))["yaml"])
    assert full["net"][0]["lu2k"]["key"] == KEY


async def test_net_add_and_del(daemon: Daemon) -> None:
    port = free_port()
    res = await call(daemon, "net add", net="tcp1", nid="127.0.0.2@tcp1", backend="tcp", port=port, key=KEY, rtt_ms=600, loss=0.01)
    assert res["changes"] == ["net tcp1 added (127.0.0.2@tcp1, tcp)"]
    nets = {n["net"]: n for n in await call(daemon, "net show")}
    assert nets["tcp1"]["nid"] == "127.0.0.2@tcp1" and nets["tcp1"]["listen"].endswith(f":{port}")
    assert nets["tcp1"]["profile"] == {"rtt_ms": 600.0, "loss": 0.01}
    # It really listens.
    with socket.create_connection(("127.0.0.2", port), timeout=5):
        pass
    exported = yaml.safe_load((await call(daemon, "export"))["yaml"])
    assert [n["net type"] for n in exported["net"]] == ["tcp", "tcp1"]
    await call(daemon, "net del", net="tcp1")
    assert [n["net"] for n in await call(daemon, "net show")] == ["tcp"]
    with pytest.raises(Lu2kError, match="not configured"):
        await call(daemon, "net del", net="tcp1")


async def test_bad_net_add_changes_nothing(daemon: Daemon) -> None:
    before = (await call(daemon, "export", secrets=True))["yaml"]
    with pytest.raises(Lu2kError) as ei:
        await call(daemon, "net add", net="tcp1", nid="127.0.0.300@tcp1", key=KEY)
    assert "net[1].local NI(s)[0].nid" in str(ei.value)
    with pytest.raises(Lu2kError, match="already configured"):
        await call(daemon, "net add", net="tcp0", nid="127.0.0.5@tcp", key=KEY)
    with pytest.raises(Lu2kError, match="key"):
        await call(daemon, "net add", net="tcp2", nid="127.0.0.5@tcp2")  # every net needs a key
    assert (await call(daemon, "export", secrets=True))["yaml"] == before


async def test_port_in_use_rolls_back_the_whole_import(daemon: Daemon) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.3", 0))
    taken.listen()
    try:
        busy = taken.getsockname()[1]
        ok_port = free_port()
        fragment = {"net": [
            {"net type": "tcp1", "local NI(s)": [{"nid": "127.0.0.2@tcp1"}], "lu2k": {"backend": "tcp", "port": ok_port, "key": KEY}},
            {"net type": "tcp2", "local NI(s)": [{"nid": "127.0.0.3@tcp2"}], "lu2k": {"backend": "tcp", "port": busy, "key": KEY}},
        ], "route": [{"net": "o2ib", "gateway": "127.0.0.9@tcp"}]}
        with pytest.raises(Lu2kError, match="not applied"):
            await call(daemon, "import", yaml=yaml.safe_dump(fragment))
    finally:
        taken.close()
    assert [n["net"] for n in await call(daemon, "net show")] == ["tcp"]
    assert await call(daemon, "route show") == []
    assert set(daemon.engine.nis) == {daemon.config.nets[0].net}
    # The first net's port was released by the rollback.
    with socket.socket() as s:
        s.bind(("127.0.0.2", ok_port))


async def test_import_add_and_del(daemon: Daemon) -> None:
    fragment = {
        "net": [{"net type": "tcp1", "local NI(s)": [{"nid": "127.0.0.2@tcp1"}], "lu2k": {"backend": "tcp", "port": free_port(), "key": KEY}}],
        "route": [{"net": "o2ib", "gateway": "127.0.0.9@tcp", "hop": 2, "priority": 1}],
        "peer": [{"primary nid": "127.0.0.7@tcp", "peer ni": [{"nid": "127.0.0.7@tcp"}], "lu2k": {"address": "127.0.0.7:9999"}}],
        "global": {"transaction_timeout": 9},
    }
    res = await call(daemon, "import", yaml=yaml.safe_dump(fragment))
    assert "route o2ib 127.0.0.9@tcp added" in res["changes"] and "peer 127.0.0.7@tcp added" in res["changes"]
    assert daemon.engine.config.global_.transaction_timeout == 9
    assert daemon.engine.peer_addresses[daemon.config.peers[0].nid] == "127.0.0.7:9999"
    routes = await call(daemon, "route show")
    assert [(r["net"], r["gateway"], r["hop"], r["priority"]) for r in routes] == [("o2ib", "127.0.0.9@tcp", 2, 1)]
    with pytest.raises(Lu2kError, match="already"):
        await call(daemon, "import", yaml=yaml.safe_dump({"route": fragment["route"]}))
    await call(daemon, "import", yaml=yaml.safe_dump({k: fragment[k] for k in ("net", "route", "peer")}), **{"del": True})
    assert [n["net"] for n in await call(daemon, "net show")] == ["tcp"]
    assert await call(daemon, "route show") == [] and daemon.config.peers == []


async def test_import_rejects_a_bad_document_whole(daemon: Daemon) -> None:
    bad = "net:\n  - net type: foo\nroute:\n  - {net: lo, gateway: 1.2.3.4@tcp}\nglobal: {health_sensitivity: 5000}\n"
    with pytest.raises(Lu2kError) as ei:
        await call(daemon, "import", yaml=bad)
    text = str(ei.value)
    assert "net[0].net type" in text and "route[0].net" in text and "3 error(s)" in text
    with pytest.raises(Lu2kError, match="not valid YAML"):
        await call(daemon, "import", yaml="net: [")
    with pytest.raises(Lu2kError, match="cannot change"):
        await call(daemon, "import", yaml="lu2k: {shim: {path: /tmp/elsewhere}}")


async def test_import_replace(daemon: Daemon, tmp_path: Path) -> None:
    doc = _doc(tmp_path, free_port())
    doc["net"][0]["local NI(s)"][0]["nid"] = "127.0.0.4@tcp"
    res = await call(daemon, "import", yaml=yaml.safe_dump(doc), replace=True)
    assert "net tcp reconfigured" in res["changes"]
    assert [n["nid"] for n in await call(daemon, "net show")] == ["127.0.0.4@tcp"]


async def test_import_replace_of_a_plain_export_keeps_the_keys(daemon: Daemon) -> None:
    """Issue 17: ``export`` hides keys; importing that output back must not make the
    placeholder the network key (every peer would then fail authentication)."""
    exported = (await call(daemon, "export"))["yaml"]
    assert "<hidden" in exported and KEY not in exported
    await call(daemon, "import", yaml=exported, replace=True)
    assert daemon.config.nets[0].key == KEY.encode()
    assert yaml.safe_load((await call(daemon, "export", secrets=True))["yaml"])["net"][0]["lu2k"]["key"] == KEY
    # a placeholder for a net the daemon does not have has no key to keep: refused, saying why
    doc = yaml.safe_load(exported)
    doc["net"][0]["net type"] = "tcp5"
    doc["net"][0]["local NI(s)"][0]["nid"] = "127.0.0.5@tcp5"
    with pytest.raises(Lu2kError, match="placeholder"):
        await call(daemon, "import", yaml=yaml.safe_dump(doc))


async def test_route_add_del(daemon: Daemon) -> None:
    await call(daemon, "route add", net="tcp5", gateway="127.0.0.[8-9]@tcp", hop=3)
    assert sorted(r["gateway"] for r in await call(daemon, "route show")) == ["127.0.0.8@tcp", "127.0.0.9@tcp"]
    with pytest.raises(Lu2kError, match="not on a local net"):
        await call(daemon, "route add", net="tcp6", gateway="10.0.0.1@o2ib")
    with pytest.raises(Lu2kError, match="hop"):
        await call(daemon, "route add", net="tcp6", gateway="127.0.0.8@tcp", hop=0)
    await call(daemon, "route del", net="tcp5", gateway="127.0.0.8@tcp")
    assert [r["gateway"] for r in await call(daemon, "route show")] == ["127.0.0.9@tcp"]
    await call(daemon, "route del", net="tcp5")
    assert await call(daemon, "route show") == []
    with pytest.raises(Lu2kError, match="no route"):
        await call(daemon, "route del", net="tcp5")


async def test_peer_add_del(daemon: Daemon) -> None:
    await call(daemon, "peer add", nid="127.0.0.7@tcp", nids=["127.0.0.8@tcp"], address="127.0.0.7:1234")
    exported = yaml.safe_load((await call(daemon, "export"))["yaml"])
    assert exported["peer"][0]["peer ni"] == [{"nid": "127.0.0.7@tcp"}, {"nid": "127.0.0.8@tcp"}]
    with pytest.raises(Lu2kError, match="already exists"):
        await call(daemon, "peer add", nid="127.0.0.7@tcp")
    await call(daemon, "peer del", nid="127.0.0.7@tcp")
    assert daemon.engine.peer_addresses == {}
    with pytest.raises(Lu2kError, match="not configured"):
        await call(daemon, "peer del", nid="127.0.0.7@tcp")


async def test_set(daemon: Daemon) -> None:
    res = await call(daemon, "set", name="transaction_timeout", value="30")
    assert res["changes"] == ["global transaction_timeout = 30.0"]
    assert daemon.engine.config.global_.transaction_timeout == 30
    await call(daemon, "set", name="routing", value="1")
    assert daemon.config.routing is True
    await call(daemon, "set", name="retry_count", value="3")  # lnetctl-only: kept in the document
    assert yaml.safe_load((await call(daemon, "export"))["yaml"])["global"]["retry_count"] == 3
    with pytest.raises(Lu2kError, match="less than transaction_timeout"):
        await call(daemon, "set", name="retry_count", value="60")
    with pytest.raises(Lu2kError, match="unknown setting"):
        await call(daemon, "set", name="warp", value="9")
    assert daemon.engine.config.global_.transaction_timeout == 30


async def test_lu2kctl_command_line(daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = ["--socket", daemon.config.control_path]
    port = free_port()
    rc = await asyncio.to_thread(ctl.main, sock + ["net", "add", "--net", "tcp3", "--nid", "127.0.0.6@tcp3", "--port", str(port), "--key", KEY])
    assert rc == 0 and "net add tcp3: done" in capsys.readouterr().out
    rc = await asyncio.to_thread(ctl.main, sock + ["route", "add", "--net", "o2ib2", "--gateway", "127.0.0.6@tcp3", "--hop", "2"])
    assert rc == 0
    rc = await asyncio.to_thread(ctl.main, sock + ["peer", "add", "--prim_nid", "127.0.0.9@tcp", "--nid", "127.0.0.10@tcp"])
    assert rc == 0
    rc = await asyncio.to_thread(ctl.main, sock + ["set", "health_sensitivity", "50"])
    assert rc == 0
    out_file = tmp_path / "backup.yaml"
    capsys.readouterr()
    rc = await asyncio.to_thread(ctl.main, sock + ["export", "--secrets", str(out_file)])
    assert rc == 0
    exported = yaml.safe_load(out_file.read_text())
    assert exported["route"][0]["gateway"] == "127.0.0.6@tcp3" and exported["global"]["health_sensitivity"] == 50
    rc = await asyncio.to_thread(ctl.main, sock + ["net", "del", "--net", "tcp3"])
    assert rc == 1  # the route through tcp3 would be left without a local gateway
    assert "not on a local net" in capsys.readouterr().err
    rc = await asyncio.to_thread(ctl.main, sock + ["route", "del", "--net", "o2ib2"])
    rc = await asyncio.to_thread(ctl.main, sock + ["net", "del", "--net", "tcp3"])
    assert rc == 0
    frag = tmp_path / "frag.yaml"
    frag.write_text("route:\n  - {net: tcp9, gateway: 127.0.0.1@tcp}\n")
    rc = await asyncio.to_thread(ctl.main, sock + ["import", str(frag)])
    assert rc == 0
    rc = await asyncio.to_thread(ctl.main, sock + ["import", "--del", str(frag)])
    assert rc == 0
    rc = await asyncio.to_thread(ctl.main, sock + ["import", str(tmp_path / "missing.yaml")])
    assert rc == 1 and "cannot read" in capsys.readouterr().err
    rc = await asyncio.to_thread(ctl.main, sock + ["--json", "set", "routing", "0"])
    assert rc == 0 and '"ok": "set routing"' in capsys.readouterr().out


def test_document_from_config_round_trips() -> None:
    cfg = parse_config({
        "net": [{"net type": "tcp", "local NI(s)": [{"nid": "10.0.0.1@tcp"}],
                 "lu2k": {"backend": "tcp", "port": 7000, "key": KEY, "profile": {"rtt_ms": 500}}}],
        "route": [{"net": "o2ib", "gateway": "10.0.0.2@tcp", "hop": 3}],
        "peer": [{"primary nid": "10.0.0.5@tcp", "lu2k": {"address": "h:1"}}],
    })
    again = parse_config(document_from_config(cfg))
    assert again.nets == cfg.nets and again.routes == cfg.routes and again.peers == cfg.peers
    assert vars(again.global_) == vars(cfg.global_)


def test_lu2kd_check_reads_module_parameter_strings(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = {"lu2k": {"networks": "tcp(lo)", "routes": "o2ib 127.0.0.[8-9]@tcp", "defaults": {"backend": "tcp", "port": 7988, "key": KEY}}}
    path = tmp_path / "legacy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "lu2k.daemon", "--config", str(path), "--check"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "1 net(s): 127.0.0.1@tcp (tcp); 2 route(s)" in res.stdout
    cfg["lu2k"]["networks"] = "tcp(lo"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "lu2k.daemon", "--config", str(path), "--check"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "lu2k.networks: networks at position 4" in res.stderr


async def test_import_ip2net_entry(daemon: Daemon) -> None:
    # 127.0.0.1 is lo's: ip2nets never matches loopback, so this must fail and change nothing.
    with pytest.raises(Lu2kError, match="ip2nets"):
        await call(daemon, "import", yaml="net:\n  - ip2net: 'tcp9 127.0.0.*'\n")
    assert [n["net"] for n in await call(daemon, "net show")] == ["tcp"]
    assert "ip2net:" not in (await call(daemon, "export"))["yaml"]
