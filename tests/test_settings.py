"""lu2k.settings: the daemon config built in one pass, every bad value named by its YAML path.

The operator-input cases of issue 13 item 10 go through ``lu2kd --check`` (in-process, so a
traceback would fail the test) and must come back with the YAML path and exit status 2 (the
document is wrong) or 1 (this host's backend refuses it).
"""

from __future__ import annotations

import copy
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from lu2k import daemon
from lu2k.backends.base import LinkProfile
from lu2k.errors import ConfigError
from lu2k.kernel_shim.config import ShimConfig
from lu2k.nid import parse_net, parse_nid
from lu2k.routing import Route
from lu2k.settings import (
    DEFAULT_CONFIG_YAML, DaemonConfig, NetConfig, RouteConfig, check_backends, default_control_path, derive_link_defaults,
    load_config, parse_config, with_overrides,
)

KEY = "settings-test-key-0123"


def base(**lu: Any) -> dict[str, Any]:
    return {
        "net": [{"net type": "tcp", "local NI(s)": [{"nid": "127.0.0.1@tcp"}],
                 "lu2k": {"backend": "tcp", "port": 7988, "key": KEY, **lu}}],
    }


def errors_of(data: Any) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    return str(e.value)


@pytest.fixture(autouse=True)
def _logging_restored() -> Any:
    """``lu2kd`` run in-process points logging at the captured stderr; put it back after."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def run_check(tmp_path: Path, data: Any, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "lu2kd.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    rc = daemon.main(["--config", str(path), "--check"])
    out = capsys.readouterr()
    return rc, out.err


# --- the names others read stay -----------------------------------------------------------------


def test_public_names_and_attributes() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, DaemonConfig) and cfg.source == "<embedded default>"
    (n,) = cfg.nets
    assert isinstance(n, NetConfig) and n.net == parse_net("tcp") and n.nid == parse_nid("127.0.0.1@tcp")
    assert (n.backend, n.port, n.credits, n.peer_credits, n.peer_timeout) == ("tcp", 7988, 256, 8, 180.0)
    assert n.key == b"lu2k-demo-key-change-me" and n.where == "net[0]"
    assert isinstance(cfg.shim, ShimConfig) and cfg.shim.max_in_flight == 1024 and "batch" in cfg.shim.options
    assert cfg.control_path == default_control_path()
    assert RouteConfig is Route
    other = with_overrides(cfg, routing=True)
    assert other.routing and not cfg.routing
    assert yaml.safe_load(DEFAULT_CONFIG_YAML)["net"][0]["lu2k"]["port"] == 7988


def test_routes_peers_globals_come_through() -> None:
    data = base()
    data["route"] = [{"net": "tcp1", "gateway": "127.0.0.[5-6]@tcp", "hop": 2, "priority": 3}]
    data["peer"] = [{"primary nid": "127.0.0.9@tcp", "lu2k": {"address": "127.0.0.1:9000"}}]
    data["global"] = {"transaction_timeout": 5, "connect_timeout": 0.5, "health_sensitivity": 50}
    data["routing"] = {"enable": 1}
    cfg = parse_config(data)
    assert cfg.routes == [Route(parse_net("tcp1"), parse_nid("127.0.0.5@tcp"), 2, 3), Route(parse_net("tcp1"), parse_nid("127.0.0.6@tcp"), 2, 3)]
    assert cfg.peers[0].nid == parse_nid("127.0.0.9@tcp") and cfg.peers[0].address == "127.0.0.1:9000"
    assert (cfg.global_.transaction_timeout, cfg.global_.connect_timeout, cfg.global_.health_sensitivity) == (5.0, 0.5, 50)
    assert cfg.routing is True


def test_every_problem_in_one_rejection() -> None:
    data = base(port=99999, key="short")
    data["global"] = {"transaction_timeout": float("nan")}
    data["lu2k"] = {"shim": {"batch": "many", "socket_mode": "rw"}}
    text = errors_of(data)
    for where in ("net[0].lu2k.port", "net[0].lu2k.key", "global.transaction_timeout", "lu2k.shim.batch", "lu2k.shim.socket_mode"):
        assert where in text, where


def test_one_ni_per_net() -> None:
    data = base()
    data["net"][0]["local NI(s)"].append({"nid": "127.0.0.2@tcp"})
    assert "net[0].local NI(s): net tcp has 2 NIs" in errors_of(data)


# --- issue 13 item 10: each case rejected by lu2kd --check with its YAML path --------------------------

CHECK_CASES: list[tuple[str, Any, int, list[str]]] = [
    ("unknown tcp option", {"options": {"colour": "blue"}}, 1, ["net[0].lu2k.options", "unknown tcp option(s) colour"]),
    ("negative socket buffer", {"options": {"socket_buffer": -1}}, 1, ["net[0].lu2k.options", "socket_buffer -1 outside 0..1073741824"]),
    ("min_bulk: big", {"options": {"min_bulk": "big"}}, 1, ["net[0].lu2k.options", "min_bulk must be a byte count, not 'big'"]),
    ("infinite socket buffer", {"options": {"socket_buffer": float("inf")}}, 2, ["net[0].lu2k.options.socket_buffer: expected a finite number"]),
    ("NaN in an option string", {"options": {"min_bulk": "nan"}}, 2, ["net[0].lu2k.options.min_bulk: expected a finite number"]),
    ("NaN RTT", {"profile": {"rtt_ms": float("nan")}}, 2, ["net[0].lu2k.profile.rtt_ms: expected a finite number"]),
    ("port 99999", {"port": 99999}, 2, ["net[0].lu2k.port: 99999 out of range 0..65535"]),
    ("empty hex key", {"key": "hex:"}, 2, ["net[0].lu2k.key: key has 0 byte(s); at least 16 (128 bits)"]),
    ("one-byte key", {"key": "hex:41"}, 2, ["net[0].lu2k.key: key has 1 byte(s)"]),
    ("one-character key", {"key": "x"}, 2, ["net[0].lu2k.key: key has 1 byte(s)"]),
    ("blank key", {"key": "    "}, 2, ["net[0].lu2k.key: the key is blank"]),
    ("15-byte key", {"key": "fifteen-bytes!!"}, 2, ["net[0].lu2k.key: key has 15 byte(s)"]),
    ("export placeholder as key", {"key": "<hidden: export --secrets to include>"}, 2, ["net[0].lu2k.key: this is the placeholder"]),
    ("quic without certificate", {"backend": "quic", "options": {"congestion": "bbr"}}, 2, ["net[0].lu2k: a quic net listens with TLS"]),
]


@pytest.mark.parametrize("name, lu, rc, wanted", CHECK_CASES, ids=[c[0] for c in CHECK_CASES])
def test_check_rejects_with_yaml_path(name: str, lu: Any, rc: int, wanted: list[str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    got_rc, err = run_check(tmp_path, base(**lu), capsys)
    assert got_rc == rc, err
    for w in wanted:
        assert w in err
    assert "Traceback" not in err


def test_check_rejects_peer_addresses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = base()
    data["peer"] = [
        {"primary nid": "127.0.0.9@tcp", "lu2k": {"address": "127.0.0.9"}},
        {"primary nid": "127.0.0.10@tcp", "lu2k": {"address": "127.0.0.10:99999"}},
        {"primary nid": "127.0.0.11@tcp", "lu2k": {"address": "::1:7988"}},
        {"primary nid": "127.0.0.12@tcp", "lu2k": {"address": "[::1]:7988"}},
        {"primary nid": "127.0.0.13@tcp", "lu2k": {"address": "host:port"}},
    ]
    rc, err = run_check(tmp_path, data, capsys)
    assert rc == 2
    assert "peer[0].lu2k.address: '127.0.0.9' needs host:port" in err
    assert "peer[1].lu2k.address: 99999 out of range 1..65535" in err
    assert "peer[2].lu2k.address: '::1:7988': write an IPv6 address as [addr]:port" in err
    assert "peer[3]" not in err
    assert "peer[4].lu2k.address: 'host:port': port 'port' is not a number" in err


def test_check_rejects_two_nets_on_one_address_and_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = base()
    data["net"].append({"net type": "tcp1", "local NI(s)": [{"nid": "127.0.0.1@tcp1"}],
                        "lu2k": {"backend": "tcp", "port": 7988, "key": KEY}})
    rc, err = run_check(tmp_path, data, capsys)
    assert rc == 2 and "net[1].lu2k.port: net tcp1 and net tcp both listen on 127.0.0.1 port 7988" in err
    # another port, another transport (udt is UDP) or port 0 (the OS picks) are fine
    for change in ({"port": 7989}, {"port": 0}):
        d = copy.deepcopy(data)
        d["net"][1]["lu2k"].update(change)
        if change == {"port": 0}:
            d["net"][0]["lu2k"]["port"] = 0
        parse_config(d)
    d = copy.deepcopy(data)
    d["net"][1]["lu2k"]["backend"] = "udt"
    assert [n.backend for n in parse_config(d).nets] == ["tcp", "udt"]


@pytest.mark.parametrize("text, ok", [("yes", True), ("'yes'", True), ("1", True), ("0", False), ("off", False), ("maybe", None), ("2", None)])
def test_routing_enable_values(text: str, ok: bool | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = yaml.safe_dump(base()) + f"routing: {{enable: {text}}}\n"
    if ok is None:
        rc, err = run_check(tmp_path, doc, capsys)
        assert rc == 2 and "routing.enable: expected a boolean" in err and "Traceback" not in err
    else:
        assert parse_config(yaml.safe_load(doc)).routing is ok


@pytest.mark.parametrize("text, mode", [("0o660", 0o660), ("'0660'", 0o660), ("0660", 0o660), ("'660'", 0o660), ("384", 0o600), ("'0o600'", 0o600)])
def test_socket_mode_forms(text: str, mode: int) -> None:
    doc = yaml.safe_dump(base()) + f"lu2k: {{shim: {{socket_mode: {text}}}}}\n"
    assert parse_config(yaml.safe_load(doc)).shim.socket_mode == mode


@pytest.mark.parametrize("text, msg", [("'rw-rw----'", "expected an octal mode"), ("0o1777", "out of range"), ("'0o8'", "expected an octal mode"),
                                       ("true", "expected an octal mode")])
def test_socket_mode_rejected(text: str, msg: str) -> None:
    doc = yaml.safe_dump(base()) + f"lu2k: {{shim: {{socket_mode: {text}}}}}\n"
    text_err = errors_of(yaml.safe_load(doc))
    assert "lu2k.shim.socket_mode" in text_err and msg in text_err


def test_check_accepts_a_good_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = base(options={"min_bulk": 4096, "socket_buffer": 1 << 20})
    data["lu2k"] = {"shim": {"socket_mode": "0o660"}}
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(data))
    assert daemon.main(["--config", str(path), "--check"]) == 0
    assert "OK: 1 net(s)" in capsys.readouterr().out


def test_check_subprocess_prints_no_traceback(tmp_path: Path) -> None:
    """The real ``lu2kd --check`` on a file with many faults: one exit, every path, no traceback."""
    data = base(port=99999, key="hex:", options={"min_bulk": "big"})
    data["routing"] = {"enable": "maybe"}
    data["peer"] = [{"primary nid": "127.0.0.9@tcp", "lu2k": {"address": "127.0.0.9"}}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    res = subprocess.run([sys.executable, "-m", "lu2k.daemon", "--config", str(path), "--check"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    for where in ("net[0].lu2k.port", "net[0].lu2k.key", "routing.enable", "peer[0].lu2k.address"):
        assert where in res.stderr


def test_check_backends_names_an_unknown_backend() -> None:
    cfg = parse_config(base(backend="carrier-pigeon"))
    (problem,) = check_backends(cfg)
    assert problem.startswith("net[0].lu2k.backend: net tcp: unknown backend 'carrier-pigeon'")


# --- relative paths resolve against the config file's directory (issue 17) --------------------------


def test_relative_paths_are_taken_from_the_config_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc" / "lu2k"
    conf.mkdir(parents=True)
    (conf / "psk.txt").write_text("a-key-read-from-a-file\n")
    data = base()
    del data["net"][0]["lu2k"]["key"]
    data["net"][0]["lu2k"]["key_file"] = "psk.txt"
    data["net"].append({"net type": "quic", "local NI(s)": [{"nid": "127.0.0.1@quic"}],
                        "lu2k": {"backend": "quic", "port": 7990, "key": KEY, "cert": "certs/site.crt", "cert_key": "certs/site.key",
                                 "options": {"ca": "../ca.crt"}}})
    (conf / "lu2kd.yaml").write_text(yaml.safe_dump(data))
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../../etc/lu2k/lu2kd.yaml")  # a relative config path, too
    tcp, quic = cfg.nets
    assert tcp.key == b"a-key-read-from-a-file"
    assert quic.options == {"cert": str(conf.resolve() / "certs/site.crt"), "key": str(conf.resolve() / "certs/site.key"),
                            "ca": str(conf.resolve() / "../ca.crt")}
    # absolute and ~ paths stay as they are
    data["net"][1]["lu2k"]["cert"] = "/abs/site.crt"
    data["net"][1]["lu2k"]["cert_key"] = "~/site.key"
    (conf / "lu2kd.yaml").write_text(yaml.safe_dump(data))
    quic = load_config(str(conf / "lu2kd.yaml")).nets[1]
    assert quic.options["cert"] == "/abs/site.crt" and quic.options["key"] == str(Path("~/site.key").expanduser())


def test_key_file_problems(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("tiny\n")
    data = base()
    del data["net"][0]["lu2k"]["key"]
    data["net"][0]["lu2k"]["key_file"] = "short.txt"
    with pytest.raises(ConfigError, match=r"net\[0\].lu2k.key_file .*short.txt\): key has 4 byte"):
        parse_config(data, base_dir=tmp_path)
    data["net"][0]["lu2k"]["key_file"] = "missing.txt"
    with pytest.raises(ConfigError, match=r"net\[0\].lu2k.key_file: cannot read"):
        parse_config(data, base_dir=tmp_path)


def test_key_file_from_keygen_is_decoded(tmp_path: Path) -> None:
    (tmp_path / "net.key").write_text("hex:" + "ab" * 32 + "\n")  # what ``lu2k keygen psk`` writes
    data = base()
    del data["net"][0]["lu2k"]["key"]
    data["net"][0]["lu2k"]["key_file"] = "net.key"
    assert parse_config(data, base_dir=tmp_path).nets[0].key == bytes([0xAB]) * 32


def test_cert_given_twice_is_an_error() -> None:
    text = errors_of(base(backend="quic", cert="/a.crt", cert_key="/a.key", options={"cert": "/b.crt", "key": "/b.key"}))
    assert "net[0].lu2k.cert: given both here and as options.cert" in text


# --- derived defaults (issue 15 section 2) --------------------------------------------------------------


def test_derived_defaults_geo() -> None:
    d = derive_link_defaults(LinkProfile(rtt_ms=600, rate_mbit=20))
    assert d["bdp_bytes"] == 1_500_000
    # four BDPs: the pipe, the ACK's way back, and two for loss repair behind an in-order transport's hole
    assert d["window_bytes"] == 6_000_000 and d["socket_buffer"] == 3_000_000
    assert d["peer_credits"] == 4096 and d["credits"] == 4 * 4096  # ceil(6 MB / 1 KiB) = 5860, capped
    # 4096 credits of 1 KiB per 600 ms round trip is 56 Mbit/s, where 8 gave 0.1; larger
    # messages are held to the same 6 MB by the byte window
    assert 4096 * 1024 * 8 / 0.6 / 1e6 > 2 * 20 * 0.99


def test_derived_defaults_for_a_link_that_loses_nothing_keep_two_bdps() -> None:
    d = derive_link_defaults(LinkProfile(rtt_ms=600, rate_mbit=20, loss=0.0))
    assert d["window_bytes"] == 3_000_000 and d["peer_credits"] == math.ceil(3_000_000 / 1024) == 2930
    assert derive_link_defaults(LinkProfile(rtt_ms=600, rate_mbit=20, loss=0.01))["window_bytes"] == 6_000_000


def test_derived_defaults_leo() -> None:
    d = derive_link_defaults(LinkProfile(rtt_ms=40, rate_mbit=50))
    assert d["bdp_bytes"] == 250_000
    assert d["peer_credits"] == math.ceil(4 * 250_000 / 1024) == 977
    assert d["credits"] == 4 * 977 and d["window_bytes"] == 1_000_000 and d["socket_buffer"] == 500_000
    assert 977 * 1024 * 8 / 0.04 / 1e6 > 2 * 50 * 0.99


def test_derived_window_per_backend() -> None:
    geo, clean = LinkProfile(rtt_ms=600, rate_mbit=20, loss=0.01), LinkProfile(rtt_ms=600, rate_mbit=20, loss=0)
    bdp = 1_500_000
    assert derive_link_defaults(geo)["window_bytes"] == 4 * bdp
    assert derive_link_defaults(geo, "quic")["window_bytes"] == derive_link_defaults(geo, "udt")["window_bytes"] == 4 * bdp
    assert derive_link_defaults(geo, "tcp")["window_bytes"] == 6 * bdp
    assert derive_link_defaults(clean, "tcp")["window_bytes"] == 2 * bdp


def test_derived_defaults_caps_and_absence() -> None:
    assert derive_link_defaults(LinkProfile()) == {} and derive_link_defaults(LinkProfile(rtt_ms=600)) == {}
    big = derive_link_defaults(LinkProfile(rtt_ms=60000, rate_mbit=1e6))
    assert big["peer_credits"] == 4096 and big["credits"] == 16384


def test_profile_only_net_gets_derived_credits_and_config_wins() -> None:
    cfg = parse_config(base(profile={"rtt_ms": 600, "rate_mbit": "20mbit"}))
    n = cfg.nets[0]
    assert n.profile == LinkProfile(rtt_ms=600, rate_mbit=20.0)
    assert (n.peer_credits, n.credits) == (4096, 4 * 4096)
    # a tcp net: six BDPs of window on a path that may lose packets (one ordered stream per socket)
    assert n.derived == {"bdp_bytes": 1_500_000, "peer_credits": 4096, "credits": 4 * 4096, "window_bytes": 9_000_000,
                         "socket_buffer": 3_000_000, "shim_max_in_flight": 4096}
    data = base(profile={"rtt_ms": 600, "rate_mbit": 20})
    data["net"][0]["local NI(s)"][0]["tunables"] = {"peer_credits": 12}
    n = parse_config(data).nets[0]
    assert n.peer_credits == 12 and "peer_credits" not in n.derived and n.derived["credits"] == 4 * 4096
    # without a profile: LNet's defaults, nothing derived
    n = parse_config(base()).nets[0]
    assert (n.peer_credits, n.credits, n.derived) == (8, 256, {})


def test_endpoints_may_keep_a_derived_window_of_messages_in_flight() -> None:
    # 1 KiB messages at 80 % of GEO need ~1 950 in flight; the shim's 1 024 would cap them.
    cfg = parse_config(base(profile={"rtt_ms": 600, "rate_mbit": 20}))
    assert cfg.shim.max_in_flight == 4096 and cfg.nets[0].derived["shim_max_in_flight"] == 4096
    # A profile whose window needs fewer than the default leaves the default alone.
    cfg = parse_config(base(profile={"rtt_ms": 20, "rate_mbit": 50}))
    assert cfg.shim.max_in_flight == 1024 and "shim_max_in_flight" not in cfg.nets[0].derived
    # The config's own figure wins, even below the profile's.
    data = base(profile={"rtt_ms": 600, "rate_mbit": 20})
    data["lu2k"] = {"shim": {"max_in_flight": 16}}
    cfg = parse_config(data)
    assert cfg.shim.max_in_flight == 16 and "shim_max_in_flight" not in cfg.nets[0].derived
    # No profile: the shim's default.
    assert parse_config(base()).shim.max_in_flight == 1024


@pytest.mark.parametrize("rate, mbit", [(20, 20.0), ("20mbit", 20.0), ("500kbit", 0.5), ("1gbit/s", 1000.0), ("2.5", 2.5)])
def test_profile_rate_units(rate: Any, mbit: float) -> None:
    assert parse_config(base(profile={"rate_mbit": rate})).nets[0].profile.rate_mbit == pytest.approx(mbit)
