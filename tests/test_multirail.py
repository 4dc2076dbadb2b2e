"""Multi-rail between two real daemons in lab namespaces: one peer over a GEO-like and a
LEO-like path (short delays, so the test is quick), one rail cut mid-transfer.

Correctness only -- every message exactly once, intact, every completion DELIVERED, both
rails used, the cut rail's in-flight messages resent on the other; figures are for
``lu2k bench rails``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from e2e_support import check_complete

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="needs root and TUN for the lab")


def test_rail_config_names_the_other_sides_nids(tmp_path: Path) -> None:
    from lu2k.lab.netns import Lab
    from lu2k.lab.rails_bench import rail_config
    from lu2k.lab.spec import build_specs
    from lu2k.settings import parse_config

    lab = Lab(build_specs("geo", loss="1%"), "cfg", extra_paths=[build_specs("leo", loss="1%")])
    lab.state.subnet = 3
    cfg = rail_config(lab, "a", tmp_path, multirail=True, backend="tcp")
    assert cfg["peer"] == [{"primary nid": "10.201.3.2@tcp", "Multi-Rail": True,
                            "peer ni": [{"nid": "10.201.3.2@tcp"}, {"nid": "10.202.3.2@tcp1"}]}]
    loaded = parse_config(yaml.safe_load(yaml.safe_dump(cfg)))  # what lu2kd will accept
    assert [str(n) for n in loaded.peers[0].rails] == ["10.201.3.2@tcp", "10.202.3.2@tcp1"]
    single = parse_config(yaml.safe_load(yaml.safe_dump(rail_config(lab, "a", tmp_path, multirail=False, backend="tcp"))))
    assert single.peers == []


def test_bench_rails_parses_and_refuses_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    from lu2k.cli.main import build_parser, main

    a = build_parser().parse_args(["bench", "rails", "--cut", "5", "--duration", "3", "--second-loss", "2%", "--json"])
    assert (a.cut, a.duration, a.second_loss, a.json, a.backend) == (5.0, 3.0, "2%", True, "quic")
    assert main(["bench", "rails", "--second", "mars"]) == 1
    assert "mars" in capsys.readouterr().err
    assert main(["bench", "rails", "--duration", "0"]) == 1
    assert "durations must be positive" in capsys.readouterr().err


@needs_root
@pytest.mark.netns
@pytest.mark.timeout(300)
def test_two_rails_carry_one_peer_and_a_cut_rail_loses_nothing(daemons_dir: Path) -> None:
    pytest.importorskip("aioquic")
    from lu2k.lab.netns import Lab
    from lu2k.lab.rails_bench import RailDaemons, lab_id, transfer_with_cut
    from lu2k.lab.spec import build_specs

    geo = build_specs("geo", rate="20mbit", rtt="120ms", loss="1%", seed=3)  # GEO-ish, short delay
    leo = build_specs("leo", rate="40mbit", rtt="20ms", loss="1%", seed=4)
    count = 600
    with Lab(geo, lab_id=lab_id(), extra_paths=[leo]) as lab:
        with RailDaemons(lab, daemons_dir, multirail=True, options={"dead_timeout": 1.5, "keepalive": 0.3}) as daemons:
            r, _cut_at = transfer_with_cut(lab, daemons, path=1, cut_s=4.0, start_bytes=1 << 20, size=32768, window=64,
                                           count=count, verify=True, timeout=240)
            check_complete(r, count)  # none lost, none twice, intact, every completion DELIVERED
            assert r["sender"]["delivered"] == count and not r["sender"]["failed"]
            stats = lab.stats()["paths"]
            assert stats[1]["links"]["ab"]["drops_down"] > 0  # the cut hit traffic on the LEO rail
            assert all(s["links"]["ab"]["bytes_in"] > 1 << 20 for s in stats)  # both rails carried bulk
            rails = {p["nid"]: p for p in daemons.peers("a")}
            leo_rail = rails[daemons.rails["b"][1]]["rail"]
            geo_rail = rails[daemons.rails["b"][0]]["rail"]
            assert leo_rail["failovers"] >= 1 and leo_rail["resent_away"] >= 1 and geo_rail["resent_here"] >= 1
            assert leo_rail["primary"] == daemons.rails["b"][0]
            # The cut rail rejoins: its probe reconnects it (within its reconnect backoff).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                leo_rail = {p["nid"]: p for p in daemons.peers("a")}[daemons.rails["b"][1]]
                if not leo_rail["rail"]["down"] and leo_rail["state"] == "up":
                    break
                time.sleep(0.5)
            assert not leo_rail["rail"]["down"] and leo_rail["state"] == "up", leo_rail


@needs_root
@pytest.mark.netns
@pytest.mark.timeout(300)
def test_discover_learns_the_peers_rails_from_the_peer(daemons_dir: Path) -> None:
    pytest.importorskip("aioquic")
    import asyncio

    from e2e_support import check_complete as complete
    from lu2k.control import request
    from lu2k.lab.bench import transfer
    from lu2k.lab.netns import Lab
    from lu2k.lab.rails_bench import RailDaemons, lab_id
    from lu2k.lab.spec import build_specs

    geo = build_specs("geo", rate="20mbit", rtt="120ms", seed=3)
    leo = build_specs("leo", rate="40mbit", rtt="20ms", seed=4)
    with Lab(geo, lab_id=lab_id(), extra_paths=[leo]) as lab:
        with RailDaemons(lab, daemons_dir, multirail=False) as daemons:  # no peer: section
            ctl = str(daemons.procs["a"].control_path)
            res = asyncio.run(request(ctl, "discover", {"nid": daemons.nids["b"], "timeout": 10}))
            assert res["peer_nis"] == daemons.rails["b"]  # what b itself said it has
            assert [r["nid"] for r in res["rails"]] == daemons.rails["b"]
            before = [lab.stats()["paths"][p]["links"]["ab"]["bytes_in"] for p in (0, 1)]
            r = transfer(lab, daemons, size=32768, window=64, count=300, verify=True, timeout=120)  # type: ignore[arg-type]
            complete(r, 300)
            grew = [lab.stats()["paths"][p]["links"]["ab"]["bytes_in"] - before[p] for p in (0, 1)]
            assert all(g > 1 << 20 for g in grew), grew  # to b's primary NID, over both rails


def test_longest_stall() -> None:
    from lu2k.lab.rails_bench import longest_stall

    assert longest_stall([10, 10, 0, 0, 1, 10, 0, 10, 0], 0.5, 5.0) == 1.5  # the partial last bin does not count
    assert longest_stall([], 0.5, 5.0) == 0.0


def test_a_nid_may_be_a_rail_of_one_peer_only() -> None:
    from lu2k.errors import ConfigError
    from lu2k.lnetyaml import loads

    doc = """
peer:
  - primary nid: 10.0.0.2@tcp
    peer ni: [{nid: 10.0.0.2@tcp}, {nid: 10.1.0.2@tcp1}]
  - primary nid: 10.0.0.3@tcp
    peer ni: [{nid: 10.0.0.3@tcp}, {nid: 10.1.0.2@tcp1}]
"""
    with pytest.raises(ConfigError, match=r"NID 10.1.0.2@tcp1 is a peer ni of both 10.0.0.2@tcp and 10.0.0.3@tcp"):
        loads(doc, resolve=False)
    cfg = loads(doc.split("  - primary nid: 10.0.0.3")[0], resolve=False)
    assert [str(n) for n in cfg.peers[0].nids] == ["10.0.0.2@tcp", "10.1.0.2@tcp1"]


def test_the_engine_takes_its_rails_from_the_config_and_from_discover(tmp_path: Path) -> None:
    from lu2k.engine import Engine
    from lu2k.lab.netns import Lab
    from lu2k.lab.rails_bench import rail_config
    from lu2k.lab.spec import build_specs
    from lu2k.nid import parse_nid
    from lu2k.settings import parse_config

    lab = Lab(build_specs("geo"), "cfg", extra_paths=[build_specs("leo")])
    lab.state.subnet = 5
    cfg = parse_config(yaml.safe_load(yaml.safe_dump(rail_config(lab, "a", tmp_path, multirail=True, backend="tcp"))))
    eng = Engine(cfg)
    b0, b1 = parse_nid("10.201.5.2@tcp"), parse_nid("10.202.5.2@tcp1")
    assert eng.core._rails[b0] is eng.core._rails[b1] and eng.core._rails[b0].nids == [b0, b1]
    plain = parse_config(yaml.safe_load(yaml.safe_dump(rail_config(lab, "a", tmp_path, multirail=False, backend="tcp"))))
    eng.config = plain  # peer del: no rails any more
    assert eng.core._rails == {}
    eng.discovered[b0] = [b0, b1]  # what discover learned
    eng.apply_rails()
    assert eng.core._rails[b1].primary == b0
    eng.config = cfg  # the configuration wins over discovery for the same NIDs
    assert eng.core._rails[b1].nids == [b0, b1]


def test_peer_show_lists_a_peers_rails_as_its_peer_nis() -> None:
    from lu2k.cli.lnetshow import peer_show, ping_result

    rail = {"primary": "10.0.0.2@tcp", "down": False, "rtt_ms": 40.0, "capacity_mbit": 50.0}
    peers = [{"nid": "10.0.0.2@tcp", "state": "up", "health": 1000, "rail": rail},
             {"nid": "10.1.0.2@tcp1", "state": "idle", "health": 900, "rail": {**rail, "down": True}},
             {"nid": "10.0.0.9@tcp", "state": "up", "health": 1000}]
    out = peer_show(peers, 3)["peer"]
    assert [(p["primary nid"], p["Multi-Rail"], p["peer state"], [n["nid"] for n in p["peer ni"]]) for p in out] == [
        ("10.0.0.2@tcp", True, 1, ["10.0.0.2@tcp", "10.1.0.2@tcp1"]), ("10.0.0.9@tcp", False, 1, ["10.0.0.9@tcp"])]
    assert out[0]["peer ni"][1]["lu2k"]["rail"]["down"] is True
    assert out[0]["peer ni"][1]["health stats"] == {"health value": 900}
    assert ping_result({"nid": "10.0.0.2@tcp", "peer_nis": ["10.0.0.2@tcp", "10.1.0.2@tcp1"]})["Multi-Rail"] is True


async def test_peer_add_with_nids_makes_rails_in_a_running_daemon(tmp_path: Path) -> None:
    from lu2k.control import request
    from lu2k.daemon import Daemon
    from lu2k.localpair import free_port
    from lu2k.nid import parse_nid
    from lu2k.settings import load_config

    doc = {"net": [{"net type": "tcp", "local NI(s)": [{"nid": "127.0.0.1@tcp"}],
                    "lu2k": {"backend": "tcp", "port": free_port(), "key": "rails-test-key-0123456789"}}],
           "lu2k": {"shim": {"path": str(tmp_path / "d.shim")}, "control": {"path": str(tmp_path / "d.ctl")}}}
    (tmp_path / "lu2kd.yaml").write_text(yaml.safe_dump(doc))
    d = Daemon(load_config(str(tmp_path / "lu2kd.yaml")))
    await d.start()
    try:
        ctl = d.config.control_path
        res = await request(ctl, "peer add", {"nid": "127.0.0.7@tcp", "nids": ["127.0.0.8@tcp"]})
        assert "peer 127.0.0.7@tcp added" in str(res)
        a, b = parse_nid("127.0.0.7@tcp"), parse_nid("127.0.0.8@tcp")
        assert d.engine.core._rails[a].nids == [a, b] and d.engine.core._rails[b] is d.engine.core._rails[a]
        d.engine.peer(b)
        shown = await request(ctl, "peer show", {})
        assert [(p["nid"], p["rail"]["primary"]) for p in shown] == [("127.0.0.8@tcp", "127.0.0.7@tcp")]
        await request(ctl, "peer del", {"nid": "127.0.0.7@tcp"})
        assert d.engine.core._rails == {}
    finally:
        await d.stop()
