"""lu2k.inet: bind and peer address text (IPv4, IPv6, link-local zones) and datagram sizes."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from lu2k.errors import ConfigError
from lu2k.inet import (
    IPV6_MIN_MTU, QUIC_MIN_DATAGRAM, UDP_HEADER, family_of, ip_header, format_hostport, parse_host, quic_datagram_size, split_hostport, udp_payload,
    udt_mss_for, udt_wire_mss, usable_mtu, wildcard,
)

V4, V6 = socket.AF_INET, socket.AF_INET6


@pytest.mark.parametrize("text, ip, zone", [
    ("0.0.0.0", "0.0.0.0", ""), ("::", "::", ""), ("10.0.0.1", "10.0.0.1", ""), ("fd00::1", "fd00::1", ""),
    ("[fd00::1]", "fd00::1", ""), (" 2001:db8::7 ", "2001:db8::7", ""), ("fe80::1%eth0", "fe80::1", "eth0"),
    ("[fe80::1%2]", "fe80::1", "2"), ("::ffff:10.0.0.1", "::ffff:10.0.0.1", ""),
])
def test_bind_addresses_are_read(text: str, ip: str, zone: str) -> None:
    host = parse_host(text, "w")
    assert host.ip == ipaddress.ip_address(ip) and host.zone == zone
    assert host.family == (V6 if ":" in ip else V4)
    assert str(host) == (f"{ip}%{zone}" if zone else ip)


@pytest.mark.parametrize("text, msg", [
    ("fd00::1::2", "bad IPv6 address 'fd00::1::2'"), ("fd00::g", "bad IPv6 address"), ("10.0.0.256", "bad IPv4 address"),
    ("host.example", "bad IPv4 address"), ("[10.0.0.1]", "brackets are for IPv6"), ("[fd00::1", "unbalanced brackets"),
    ("fd00::1%eth0", r"zone \(%eth0\) only goes with an IPv6 link-local"), ("10.0.0.1%eth0", "only goes with an IPv6 link-local"),
    ("fe80::1%", "bad zone ''"), ("fe80::1%a/b", "bad zone 'a/b'"), ("fe80::1%waytoolonginterfacename", "bad zone"),
    ("", "expected a bind address"), (None, "expected a bind address"), (988, "expected a bind address"),
])
def test_bad_bind_addresses_say_what_and_where(text: object, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg) as e:
        parse_host(text, "net[0].lu2k.listen", what="a bind address")
    assert str(e.value).startswith("net[0].lu2k.listen")


@pytest.mark.parametrize("text, host, port", [
    ("10.0.0.1:988", "10.0.0.1", 988), ("[fd00::1]:988", "fd00::1", 988), ("[fe80::1%eth0]:7988", "fe80::1%eth0", 7988),
    ("gw.example:1", "gw.example", 1), ("[::1]:65535", "::1", 65535),
])
def test_peer_addresses_are_read(text: str, host: str, port: int) -> None:
    assert split_hostport(text, "w") == (host, port)
    assert split_hostport(format_hostport(host, port), "w") == (host, port)


@pytest.mark.parametrize("text, msg", [
    ("fd00::1:988", r"write an IPv6 address as \[addr\]:port"), ("[fd00::1]988", r"\[addr\]:port"),
    ("[fd00::zz]:988", "bad IPv6 address 'fd00::zz'"), ("[10.0.0.1]:988", "brackets are for IPv6"),
    ("[fd00::1%eth0]:988", "only goes with an IPv6 link-local"), ("10.0.0.300:988", "bad IPv4 address"),
    ("[fd00::1]:0", "0 out of range 1..65535"), ("[fd00::1]:70000", "70000 out of range"), ("[fd00::1]:x", "'x' is not a number"),
    ("10.0.0.1", "needs host:port"), (":988", "needs host:port"),
])
def test_bad_peer_addresses_say_what(text: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        split_hostport(text, "peer[0].lu2k.address")


@settings(deadline=None)  # the suite runs on every core at once: a slow example is load, not a bug
@given(st.ip_addresses(), st.integers(1, 65535))
def test_any_address_and_port_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    text = format_hostport(str(ip), port)
    host, back = split_hostport(text, "w")
    assert ipaddress.ip_address(host) == ip and back == port
    assert family_of(str(ip)) == (V6 if ip.version == 6 else V4)


def test_families_and_wildcards() -> None:
    assert family_of("fd00::1") == V6 and family_of("fe80::1%eth0") == V6 and family_of("10.0.0.1") == V4
    assert wildcard(V6) == "::" and wildcard(V4) == "0.0.0.0"


def test_udp_payload_counts_the_ip_header() -> None:
    assert udp_payload(1500, V4) == 1472 and udp_payload(1500, V6) == 1452
    assert udp_payload(IPV6_MIN_MTU, V6) == 1232  # what every IPv6 path carries


@pytest.mark.parametrize("route, family, mtu", [
    (None, V6, 1500), (0, V4, 1500), (65536, V6, 1500), (1500, V6, 1500), (1400, V6, 1400), (1280, V6, 1280),
    (1000, V6, IPV6_MIN_MTU), (600, V4, 600), (300, V4, 576),
])
def test_usable_mtu_follows_the_route_within_bounds(route: int | None, family: int, mtu: int) -> None:
    assert usable_mtu(route, family) == mtu


def test_quic_datagrams_fit_the_path() -> None:
    assert quic_datagram_size(V4) == 1472 and quic_datagram_size(V6) == 1452
    assert quic_datagram_size(V6, route_mtu=65536) == 1452  # loopback's MTU says nothing about the far end
    assert quic_datagram_size(V6, route_mtu=1400) == 1352
    assert quic_datagram_size(V6, route_mtu=1280) == 1232  # IPv6's minimum still clears QUIC's 1200
    assert quic_datagram_size(V4, route_mtu=576) == QUIC_MIN_DATAGRAM  # QUIC cannot go lower
    assert quic_datagram_size(V6, route_mtu=1280, configured=1400) == 1400  # the operator's word wins


@pytest.mark.parametrize("family", [V4, V6])
@pytest.mark.parametrize("wire", [576, 1280, 1400, 1500, 9000])
def test_udt_packets_are_the_wire_size_in_both_families(family: int, wire: int) -> None:
    # libudt's UDP payload is its mss minus 28, whatever the family: what goes on the wire is
    # that payload plus the real IP and UDP headers, and it must be exactly ``wire``.
    libudt_payload = udt_mss_for(wire, family) - 28
    assert libudt_payload + ip_header(family) + UDP_HEADER == wire


def test_udt_wire_size_follows_the_route_unless_configured() -> None:
    assert udt_wire_mss(1500, V6, None) == 1500
    assert udt_wire_mss(1500, V6, 65536) == 1500
    assert udt_wire_mss(1500, V6, 1400) == 1400
    assert udt_wire_mss(1500, V6, 1400, configured=True) == 1500
    assert udt_wire_mss(9000, V4, 9000, configured=True) == 9000


def test_config_names_bad_ipv6_addresses_by_yaml_path() -> None:
    """The daemon's config applies these checks: each bad address is reported at its YAML path,
    all of them in one error."""
    from lu2k.localpair import daemon_config
    from lu2k.settings import parse_config

    cfg = daemon_config("fd00:6::1@tcp", 7988, Path("/nonexistent"), extra_net={"key": "k" * 32, "listen": "fd00::1::1"})
    cfg["peer"] = [{"primary nid": "fd00:6::2@tcp", "lu2k": {"address": "fd00:6::2:7988"}},
                   {"primary nid": "fd00:6::3@tcp", "lu2k": {"address": "[fd00:6::3%eth0]:7988"}},
                   {"primary nid": "fd00:6::4@tcp", "lu2k": {"address": "[fd00:6::4]:7988"}}]
    with pytest.raises(ConfigError) as e:
        parse_config(cfg)
    errors = "\n".join(e.value.errors)
    assert "net[0].lu2k.listen: 'fd00::1::1' is not a bind address" in errors
    assert "peer[0].lu2k.address: 'fd00:6::2:7988': write an IPv6 address as [addr]:port" in errors
    assert "peer[1].lu2k.address: 'fd00:6::3%eth0': a zone (%eth0) only goes with an IPv6 link-local address" in errors
    assert "peer[2]" not in errors and len(e.value.errors) == 3


def test_config_keeps_good_ipv6_addresses() -> None:
    from lu2k.localpair import daemon_config
    from lu2k.settings import parse_config

    cfg = daemon_config("fd00:6::1@udt", 7988, Path("/nonexistent"), backend="udt",
                        extra_net={"key": "k" * 32, "listen": "[fe80::1%lo]"})
    cfg["peer"] = [{"primary nid": "fd00:6::2@udt", "lu2k": {"address": "[fe80::2%lo]:7989"}}]
    config = parse_config(cfg)
    assert config.nets[0].listen == "fe80::1%lo" and str(config.nets[0].nid) == "fd00:6::1@udt"
    assert config.peers[0].address == "[fe80::2%lo]:7989"


def test_socklnd_lan_with_an_ipv6_nid_is_refused_at_its_path() -> None:
    """Kernel socklnd peers with IPv6 NIDs speak socklnd V4 (large NIDs), which lu2k's socklnd
    LAN does not: the config says so instead of failing at start."""
    from lu2k.localpair import daemon_config
    from lu2k.settings import parse_config

    cfg = daemon_config("fd00:6::1@tcp", 988, Path("/nonexistent"), backend="socklnd", extra_net={"key": "k" * 32})
    with pytest.raises(ConfigError) as e:
        parse_config(cfg)
    assert e.value.errors == ["net[0].local NI(s): fd00:6::1@tcp: the socklnd LAN speaks socklnd protocols V2/V3 with 64-bit "
                              "NIDs; IPv6 NIDs need V4, which lu2k's socklnd does not speak (give this net an IPv4 NID)"]


def test_the_ipv6_page_examples_are_accepted(tmp_path: Path) -> None:
    """docs/ipv6.md's example configurations pass the daemon's config checks as written (their
    files put in a scratch directory), and their bad-address errors are the ones shown."""
    import re

    import yaml

    from lu2k.settings import check_backends, parse_config

    page = (Path(__file__).resolve().parent.parent / "docs" / "ipv6.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", page, re.S)
    assert len(blocks) == 2
    (tmp_path / "net.key").write_text("ipv6-docs-example-network-key\n")
    for block in blocks:
        data = yaml.safe_load(block.replace("/etc/lu2k/", f"{tmp_path}/"))
        config = parse_config(data, source="docs/ipv6.md", base_dir=tmp_path)
        assert all(":" in n.nid.host for n in config.nets)
        assert not [p for p in check_backends(config) if "udt" in p and "unavailable" not in p]
    shown = re.findall(r"^(?:net|peer)\[\d\]\.lu2k\.\S+: .*$", page, re.M)
    assert len(shown) == 3
    cfg = {"net": [{"net type": "tcp", "local NI(s)": [{"nid": "fd00:6::1@tcp"}],
                    "lu2k": {"key": "k" * 32, "listen": "fd00::1::1"}}],
           "peer": [{"primary nid": "fd00:6::2@tcp", "lu2k": {"address": "fd00:6::2:7988"}},
                    {"primary nid": "fd00:6::3@tcp", "lu2k": {"address": "[fd00:6::3%eth0]:7988"}}]}
    with pytest.raises(ConfigError) as e:
        parse_config(cfg)
    assert e.value.errors == shown
