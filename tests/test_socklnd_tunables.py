"""lu2k.socklnd.tunables: a socklnd net in lnetctl YAML, its options and their errors; the shipped examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lu2k.backends import get_backend
from lu2k.daemon import check
from lu2k.errors import ConfigError
from lu2k.settings import load_config, parse_config
from lu2k.socklnd.tunables import SocklndNet, SocklndTunables

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "lnet-router"


def lan(options: dict[str, Any] | None = None, net: str = "tcp", nid: str = "10.10.1.1@tcp", **lu: Any) -> Any:
    return parse_config({
        "net": [{"net type": net, "local NI(s)": [{"nid": nid, "tunables": {"credits": 64, "peer_credits": 4}}],
                 "lu2k": {"backend": "socklnd", **({"options": options} if options is not None else {}), **lu}}],
    })


def tunables(cfg: Any) -> SocklndTunables:
    return SocklndNet(cfg.nets[0].backend_settings()).tunables


def test_defaults_follow_lnet() -> None:
    cfg = lan()
    nc = cfg.nets[0]
    assert nc.port == 988 and nc.key == b""  # LNet's acceptor port; a kernel LAN has no lu2k key
    t = tunables(cfg)
    assert (t.port, t.peer_port, t.protocol, t.secure_accept, t.privileged_connect) == (988, 988, 3, True, True)
    assert t.min_bulk == 1024 and t.timeout == 50 and t.keepalive == 30
    assert check(cfg) == []


def test_options_are_read() -> None:
    t = tunables(lan({"secure_accept": False, "peer_port": 1988, "protocol": 2, "min_bulk": 4096, "max_queued": 16,
                      "remote_nids": ["10.10.1.1@tcp1"], "discovery": False, "probe_interval": 2}, port=7000))
    assert (t.port, t.peer_port, t.protocol, t.min_bulk, t.max_queued) == (7000, 1988, 2, 4096, 16)
    assert not t.secure_accept and not t.discovery and t.probe_interval == 2
    assert [str(n) for n in t.remote_nids] == ["10.10.1.1@tcp1"]


@pytest.mark.parametrize("options,message", [
    ({"secure_acept": True}, "unknown socklnd option(s) ['secure_acept']"),
    ({"protocol": 4}, "protocol 4 outside 2..3"),
    ({"secure_accept": "yes"}, "secure_accept must be true or false"),
    ({"timeout": -1}, "timeout must be positive"),
    ({"remote_nids": "10.0.0.1@tcp1"}, "remote_nids must be a list"),
    ({"remote_nids": ["10.0.0.1@tcp"]}, "is on this net"),
    ({"remote_nids": ["fd00::1@tcp1"]}, "IPv6"),
    ({"remote_nids": ["nonsense@@"]}, "remote_nids[0]"),
])
def test_bad_options_say_what_and_where(options: dict[str, Any], message: str) -> None:
    cfg = lan(options)
    with pytest.raises(ConfigError, match="net tcp.lu2k.options") as e:
        tunables(cfg)
    assert message in str(e.value)
    assert any(message in p for p in check(cfg))  # lu2kd --check reports it


def test_only_tcp_nets() -> None:
    cfg = lan(net="o2ib", nid="10.10.1.1@o2ib")
    with pytest.raises(ConfigError, match="socklnd carries LNet's tcp nets, not o2ib"):
        tunables(cfg)


def test_registered_as_a_lan_driver() -> None:
    from lu2k.backends import availability

    cls = get_backend("socklnd")
    assert cls is SocklndNet and cls.lan_driver
    assert "not a link between lu2k daemons" in str(availability()["socklnd"])  # benches do not pick it


async def test_adding_a_socklnd_net_at_run_time_is_refused_with_a_reason() -> None:
    net = SocklndNet(lan().nets[0].backend_settings())
    with pytest.raises(ConfigError, match="attached when lu2kd starts"):
        await net.listen("127.0.0.1", 988, None)


@pytest.mark.parametrize("name", ["site-a.yaml", "site-b.yaml"])
def test_shipped_two_site_example_is_valid(name: str) -> None:
    cfg = load_config(str(CONTRIB / name))
    assert check(cfg) == []
    lan_net = next(n for n in cfg.nets if n.backend == "socklnd")
    assert lan_net.port == 988 and cfg.routing
    assert [r.gateway.net.type for r in cfg.routes] == ["tcp"] and cfg.routes[0].gateway.net.num == 9
