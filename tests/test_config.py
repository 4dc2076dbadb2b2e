"""lu2k.config: networks=, ip2nets=, routes= as lnet/lnet/config.c reads them, and lnetctl's
ip2nets rules.  Includes every case of the Lustre wiki page "LNet Configuration Edge Case
Behaviors and Side-Effects" and the Lustre manual's examples."""

from __future__ import annotations

import pytest

from lu2k.config import (
    route_text,
    Ip2NetsRule,
    NetSpec,
    NiSpec,
    Route,
    check_ip2nets,
    expand_brackets,
    host_interfaces,
    ip2nets,
    ip2nets_networks,
    ip2nets_rules,
    networks_string,
    ni_nids,
    parse_interface_item,
    parse_ip_pattern,
    parse_networks,
    parse_routes,
    resolve_interfaces,
)
from lu2k.errors import ConfigError, NidError
from lu2k.nid import Net, parse_nid

# --- networks= -----------------------------------------------------------------------------------

NETWORKS_OK = [
    ("tcp", "tcp"),
    ("tcp0", "tcp"),
    ("tcp1", "tcp1"),
    ("tcp0(eth0)", "tcp(eth0)"),
    ("tcp0(eth0,eth1)", "tcp(eth0,eth1)"),
    ("tcp0(eth0,eth1)[0,1],o2ib", "tcp(eth0,eth1)[0,1],o2ib"),
    ("tcp0(eth0[0],eth1[1])", "tcp(eth0[0],eth1[1])"),
    ("o2ib0(ib0),tcp0(eth0)", "o2ib(ib0),tcp(eth0)"),
    ("tcp0,o2ib0", "tcp,o2ib"),
    ("tcp,", "tcp"),
    ("  tcp  ,  o2ib1  ", "tcp,o2ib1"),
    ("tcp ( eth0 , eth1 )", "tcp(eth0,eth1)"),
    ("tcp(eth0) [0]", "tcp(eth0)[0]"),
    ("tcp[0-3]", "tcp[0-3]"),
    ("tcp[1]", "tcp[1]"),
    ("tcp0 junk, o2ib1(ib0)", "tcp,o2ib1(ib0)"),  # text after a net's parts is skipped
    ("tcp(eth0) whatever", "tcp(eth0)"),
    ("lo", ""),  # loopback is implicit
    ("lo,tcp", "tcp"),
    ("lo(eth0),tcp", "tcp"),
    ("tcp(eth0),tcp(eth1)", "tcp(eth0,eth1)"),  # a net named twice gets both NIs (2.17)
    ("tcp(eth1,eth10)", "tcp(eth1,eth10)"),
    ("tcp(eth0:1)", "tcp(eth0:1)"),  # interface aliases are names like any other
    ("tcp01(eth0)", "tcp1(eth0)"),
    ("gni", "gni"),
    ("kfi1,efa", "kfi1,efa"),
    ("udt(eth0),quic1(eth1),rds", "udt(eth0),quic1(eth1),rds"),
    ("", ""),
    ("   ", ""),
    ("tcp\n", "tcp"),
]

NETWORKS_BAD = [
    # (string, position of the error)
    ("foo", 0),
    ("tcpx", 0),
    (",tcp", 0),
    ("tcp,,o2ib", 4),
    ("tcp(eth0", 4),
    ("tcp(eth0,)", 9),
    ("tcp()", 4),
    ("tcp( )", 5),
    ("tcp(,eth0)", 4),
    ("tcp(eth0 eth1)", 9),
    ("tcp(eth0))", 9),
    ("tcp:x", 3),
    ("tcp)", 3),
    ("tcp]", 3),
    ("tcp[0", 3),
    ("tcp[]", 3),
    ("tcp[x]", 3),
    ("tcp[1-3/0]", 3),
    ("tcp(eth0[0)", 8),
    ("tcp(eth0[])", 8),
    ("tcp65536", 0),
    ("lo0", 0),
    ("tcp (eth0) (eth1)", 11),
    ("tcp[0](eth0)", 6),
]


@pytest.mark.parametrize("text,canon", NETWORKS_OK)
def test_networks(text: str, canon: str) -> None:
    specs = parse_networks(text)
    assert networks_string(specs) == canon
    assert networks_string(parse_networks(canon)) == canon


@pytest.mark.parametrize("text,pos", NETWORKS_BAD)
def test_networks_syntax_errors_point_at_the_token(text: str, pos: int) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_networks(text)
    assert ei.value.where == f"networks at position {pos}"
    assert getattr(ei.value, "position") == pos
    assert f'networks="{text}"' in str(ei.value)


def test_networks_duplicate_interface_prefix_quirk() -> None:
    # lnet_ni_unique_net: strncmp(existing, new, strlen(new)): "eth1" after "eth10" is a duplicate
    with pytest.raises(ConfigError, match="duplicates 'eth10'"):
        parse_networks("tcp(eth10,eth1)")
    with pytest.raises(ConfigError, match="duplicates"):
        parse_networks("tcp(eth0),tcp(eth0)")


def test_networks_structure() -> None:
    (tcp, o2ib) = parse_networks("tcp0(eth0[0],eth1)[1,2],o2ib3")
    assert tcp.net == Net("tcp", 0) and tcp.interfaces == ("eth0", "eth1")
    assert [v for v in tcp.nis[0].cpts.values()] == [0]  # type: ignore[union-attr]
    assert tcp.nis[1].cpts is tcp.cpts and tcp.cpts is not None and tcp.cpts.values() == [1, 2]
    assert o2ib.net == Net("o2ib", 3) and o2ib.interfaces == () and o2ib.nis == (NiSpec(None, None),)


def test_networks_cpt_bounds() -> None:
    assert networks_string(parse_networks("tcp[0-1]", cpt_count=2)) == "tcp[0-1]"
    with pytest.raises(ConfigError):
        parse_networks("tcp[2]", cpt_count=2)
    with pytest.raises(ConfigError, match="reversed range"):  # cfs_range_expr_parse: re_lo > re_hi fails
        parse_networks("tcp[5-1]")
    with pytest.raises(ConfigError):
        parse_networks("tcp[0,0,0]", cpt_count=2)


def test_networks_too_long() -> None:
    with pytest.raises(ConfigError, match="too long"):
        parse_networks("tcp," * 1100)


def test_networks_type_checked() -> None:
    with pytest.raises(ConfigError):
        parse_networks(None)  # type: ignore[arg-type]


# --- interfaces ------------------------------------------------------------------------------------

HOST = [("lo", "127.0.0.1"), ("eth0", "10.70.1.2"), ("eth1", "192.168.1.5")]


def test_networks_without_interface_use_the_first_detected_one() -> None:
    # Wiki: options lnet networks="tcp0" creates a NID on the first interface detected.
    (spec,) = resolve_interfaces(parse_networks("tcp0"), HOST)
    assert spec.interfaces == ("eth0",)
    assert [str(n) for n in ni_nids(spec, HOST)] == ["10.70.1.2@tcp"]
    # Detection order decides, not names.
    (spec,) = resolve_interfaces(parse_networks("tcp"), [HOST[2], HOST[1]])
    assert spec.interfaces == ("eth1",)


def test_resolve_skips_loopback_and_down_interfaces() -> None:
    host = [("lo", "127.0.0.1"), ("eth0", "10.0.0.1", False), ("eth1", "10.0.0.2")]
    (spec,) = resolve_interfaces(parse_networks("tcp"), host)
    assert spec.interfaces == ("eth1",)


def test_resolve_errors() -> None:
    with pytest.raises(ConfigError) as ei:
        resolve_interfaces(parse_networks("tcp(eth9),o2ib"), HOST)
    assert len(ei.value.errors) == 2
    assert "eth9" in ei.value.errors[0] and "o2ib" in ei.value.errors[1]
    with pytest.raises(ConfigError):
        resolve_interfaces(parse_networks("tcp"), [("lo", "127.0.0.1")])


def test_resolve_o2ib_takes_infiniband_interfaces_and_numeric_nets_are_untouched() -> None:
    host = HOST + [("ib0", "172.16.0.1")]
    specs = resolve_interfaces(parse_networks("o2ib,gni"), host)
    assert specs[0].interfaces == ("ib0",)
    assert specs[1].nis == (NiSpec(None, None),)


def test_resolve_merges_the_same_interface_reached_twice() -> None:
    specs = resolve_interfaces(parse_networks("tcp,tcp(eth0)"), HOST)
    assert specs[0].interfaces == ("eth0",)


def test_host_interfaces_validation() -> None:
    assert host_interfaces([("eth0", "1.2.3.4", False)])[0].up is False
    for bad in ([("eth0",)], [("eth0", "1.2.3")], [(1, "1.2.3.4")], ["eth0"]):
        with pytest.raises(ConfigError):
            host_interfaces(bad)  # type: ignore[arg-type]


def test_ni_nids_needs_resolution() -> None:
    with pytest.raises(ConfigError):
        ni_nids(parse_networks("tcp")[0], HOST)


# --- ip2nets= (kernel module parameter) ------------------------------------------------------------

WIKI_HOST = [("lo", "127.0.0.1"), ("eth0", "10.70.3.4"), ("eth1", "192.168.1.20")]


def test_wiki_interface_less_rule_takes_the_first_interface() -> None:
    # "options lnet ip2nets="tcp0 192.168.*.*"" matches eth1's address but configures eth0.
    (spec,) = ip2nets("tcp0 192.168.*.*", WIKI_HOST)
    assert spec.net == Net("tcp") and spec.interfaces == ("eth0",)
    assert [str(n) for n in ni_nids(spec, WIKI_HOST)] == ["10.70.3.4@tcp"]


def test_wiki_rule_naming_the_interface_uses_it() -> None:
    (spec,) = ip2nets("tcp0(eth1) 192.168.*.*", WIKI_HOST)
    assert spec.interfaces == ("eth1",)


def test_wiki_pattern_matching_a_non_lnet_interface() -> None:
    # eth3 has 134.32.1.4: good enough to configure tcp0 on eth2.
    host = [("eth0", "10.0.0.1"), ("eth1", "10.0.1.1"), ("eth2", "10.0.2.1"), ("eth3", "134.32.1.4")]
    rules = "tcp(eth2) 134.32.1.[4-10/2]; tcp(eth1) *.*.*.*"
    specs = ip2nets(rules, host)
    # 2.17 accumulates: the catch-all second rule also applies.
    assert networks_string(specs) == "tcp(eth2,eth1)"
    # Without the stray address only the catch-all applies.
    host2 = host[:3] + [("eth3", "134.32.1.5")]
    assert networks_string(ip2nets(rules, host2)) == "tcp(eth1)"


def test_wiki_contradicting_interface_and_pattern_kernel_semantics() -> None:
    # The module parameter does not check that the matched address is eth0's.
    host = [("eth0", "192.0.19.3"), ("eth1", "192.168.3.3")]
    (spec,) = ip2nets("tcp(eth0) 192.168.*.3", host)
    assert spec.interfaces == ("eth0",)


def test_wiki_ip2nets_example_addresses() -> None:
    # 134.32.1.[4-10/2] is .4, .6, .8, .10
    rule = "tcp(eth2) 134.32.1.[4-10/2]"
    for last, hit in [(4, True), (5, False), (6, True), (8, True), (10, True), (11, False), (12, False)]:
        host = [("eth2", f"134.32.1.{last}")]
        if hit:
            assert networks_string(ip2nets(rule, host)) == "tcp(eth2)"
        else:
            with pytest.raises(ConfigError, match="does not match"):
                ip2nets(rule, host)


def test_manual_ip2nets_example() -> None:
    # Lustre manual: ip2nets="tcp(eth1,eth2) 134.32.1.[4-10/2]; tcp(eth1) *.*.*.*"
    rules = "tcp(eth1,eth2) 134.32.1.[4-10/2]; tcp(eth1) *.*.*.*"
    host = [("eth1", "134.32.1.7"), ("eth2", "10.0.0.2")]
    assert networks_string(ip2nets(rules, host)) == "tcp(eth1)"
    # When the first rule matches, 2.17 accumulates both rules into "tcp(eth1,eth2),tcp(eth1)",
    # and the networks parser refuses eth1 twice on tcp: the manual's example no longer loads.
    host = [("eth1", "134.32.1.6"), ("eth2", "10.0.0.2")]
    assert ip2nets_networks(rules, host) == "tcp(eth1,eth2),tcp(eth1)"
    with pytest.raises(ConfigError, match="duplicates 'eth1'"):
        ip2nets(rules, host)


def test_manual_multi_network_example() -> None:
    host = [("eth0", "192.168.0.2"), ("ib0", "132.6.1.2")]
    rules = "tcp(eth0) 192.168.0.[2,4]; tcp 192.168.0.*; o2ib(ib0) 132.6.[1-3].[2-8/2]"
    assert networks_string(ip2nets(rules, host)) == "tcp(eth0),o2ib(ib0)"
    assert ip2nets_networks(rules, host) == "tcp(eth0),tcp,o2ib(ib0)"


IP2NETS_NETWORKS = [
    ("tcp 10.70.*.*", "tcp"),
    ("tcp 10.70.3.4", "tcp"),
    ("tcp 1.1.1.1 10.70.3.4", "tcp"),  # any pattern may match
    ("tcp 10.70.3.[1-9]", "tcp"),
    ("tcp 10.70.3.[0x4]", "tcp"),  # kstrtouint reads hex
    ("tcp 010.70.3.4", None),  # ... and octal: 010 is 8
    ("tcp 127.0.0.1", None),  # lo never matches
    ("tcp", None),  # a rule without patterns never matches
    ("tcp 1.1.1.1; o2ib 192.168.1.20", "o2ib"),
    ("tcp(eth0),o2ib1 10.*.*.*", "tcp(eth0),o2ib1"),
    ("tcp(eth0,eth1),o2ib 10.*.*.*", "tcp(eth0,eth1),o2ib"),
    ("tcp 10.*.*.*; tcp1 192.*.*.*", "tcp,tcp1"),
    ("tcp 10.*.*.* # the lab\ntcp1 192.*.*.*", "tcp,tcp1"),
    ("# nothing here\n tcp 10.*.*.*", "tcp"),
    ("tcp 10.*.*.*;;;", "tcp"),
    ("tcp 10.*.*.*\r\ntcp1 192.168.1.*", "tcp,tcp1"),
    ("tcp 10.*.*.*; tcp 192.*.*.*", "tcp,tcp"),  # accumulates; the networks parser merges them
    ("tcp(eth0 10.*.*.*", "tcp(eth0"),  # splitnets only checks brackets before a comma
    ("tcp\t10.*.*.*", "tcp"),
]


@pytest.mark.parametrize("text,networks", IP2NETS_NETWORKS)
def test_ip2nets_networks(text: str, networks: str | None) -> None:
    if networks is None:
        with pytest.raises(ConfigError, match="does not match any local IP interfaces"):
            ip2nets_networks(text, WIKI_HOST)
    else:
        assert ip2nets_networks(text, WIKI_HOST) == networks


IP2NETS_BAD = [
    # (string, position)
    ("tcp 10.70.*", 4),
    ("tcp 10.70.*.*.*", 4),
    ("tcp 10.70.[1-3/0].*", 4),
    ("tcp 10.70.300.*", 4),
    ("tcp 1.1.1.1 x.1.1.1", 12),
    ("tcp(eth0, eth1) 10.*.*.*", 10),  # the space splits the net spec: "eth1)" is a pattern
    ("tcp,tcp 10.*.*.*", 4),  # the same net twice in one rule
    ("tcp(eth0)x,o2ib 10.*.*.*", 3),
    ("foo 10.*.*.*", 0),
    ("tcp,foo 10.*.*.*", 4),
    ("tcp 1.1.1.1; tcp 10..1.1", 17),
]


@pytest.mark.parametrize("text,pos", IP2NETS_BAD)
def test_ip2nets_errors(text: str, pos: int) -> None:
    with pytest.raises(ConfigError) as ei:
        ip2nets_networks(text, WIKI_HOST)
    assert ei.value.where == f"ip2nets at position {pos}"


def test_ip2nets_bad_networks_after_selection() -> None:
    with pytest.raises(ConfigError) as ei:
        ip2nets("tcp(eth0 10.*.*.*", WIKI_HOST)
    assert ei.value.where is not None and ei.value.where.startswith("networks")


def test_ip2nets_needs_interfaces() -> None:
    with pytest.raises(ConfigError, match="no local IP interfaces"):
        ip2nets("tcp *.*.*.*", [("lo", "127.0.0.1")])
    with pytest.raises(ConfigError, match="no local IP interfaces"):
        ip2nets("tcp *.*.*.*", [("eth0", "10.0.0.1", False)])


def test_ip2nets_rule_too_long() -> None:
    with pytest.raises(ConfigError):
        ip2nets_networks("tcp " + "10.*.*.* " * 500, WIKI_HOST)


def test_check_ip2nets_without_a_host() -> None:
    check_ip2nets("tcp(eth0) 192.168.*.*; o2ib 10.[1-3].*.*")
    with pytest.raises(ConfigError):
        check_ip2nets("tcp 192.168.*")
    with pytest.raises(ConfigError):
        check_ip2nets("tcp,tcp 1.1.1.1")


def test_ip_pattern() -> None:
    octets = parse_ip_pattern("10.[1-3].*.[2-8/2]")
    assert [str(o) for o in octets] == ["10", "[1-3]", "[0-255]", "[2-8/2]"]
    for bad in ("10.1.1", "10.1.1.1.1", "10..1.1", "10.1.1.x", "", "10.1.1.[1-2/0]"):
        with pytest.raises(NidError):
            parse_ip_pattern(bad)


# --- lnetctl ip2nets rules ---------------------------------------------------------------------------


def _rule(net: str, ifs: tuple[str, ...] = (), ranges: tuple[str, ...] = ()) -> Ip2NetsRule:
    return Ip2NetsRule(
        Net(*([net] if net != "tcp1" else ["tcp", 1])),
        tuple(parse_interface_item(i) for i in ifs),
        tuple(parse_ip_pattern(r) for r in ranges),
        ranges,
    )


def test_lnetctl_contradicting_interface_and_pattern_fails() -> None:
    # Wiki: tcp(eth0) 192.168.*.3 with eth0 = 192.0.19.3, eth1 = 192.168.3.3 -> configuration fails.
    host = [("eth0", "192.0.19.3"), ("eth1", "192.168.3.3")]
    with pytest.raises(ConfigError, match="no rules applied") as ei:
        ip2nets_rules([_rule("tcp", ("eth0",), ("192.168.*.3",))], host)
    assert any("eth0 address 192.0.19.3 matches none of the ranges" in e for e in ei.value.errors)


def test_lnetctl_rule_without_interfaces_takes_every_matching_interface() -> None:
    host = [("lo", "127.0.0.1"), ("eth0", "10.70.3.4"), ("eth1", "192.168.1.20"), ("eth2", "192.168.2.20")]
    specs, notes = ip2nets_rules([_rule("tcp", (), ("192.168.*.*",))], host)
    assert specs[0].interfaces == ("eth1", "eth2") and notes == []


def test_lnetctl_rule_with_neither_takes_first_non_loopback() -> None:
    host = [("lo", "127.0.0.1"), ("eth0", "10.70.3.4", False), ("eth1", "192.168.1.20")]
    specs, _ = ip2nets_rules([_rule("tcp")], host)
    assert specs[0].interfaces == ("eth1",)


def test_lnetctl_named_interfaces_are_filtered_individually() -> None:
    host = [("eth0", "10.0.0.1"), ("eth1", "192.168.0.1"), ("eth2", "192.168.0.2", False)]
    specs, notes = ip2nets_rules([_rule("tcp", ("eth0", "eth1", "eth2", "eth9"), ("192.168.*.*",))], host)
    assert specs[0].interfaces == ("eth1",)
    assert len(notes) == 3


def test_lnetctl_named_interface_without_range_just_needs_to_be_up() -> None:
    host = [("eth0", "10.0.0.1"), ("eth1", "192.168.0.1")]
    specs, _ = ip2nets_rules([_rule("tcp", ("eth1[2]",))], host)
    assert specs[0].interfaces == ("eth1",) and specs[0].nis[0].cpts is not None


def test_lnetctl_skipped_rule_does_not_stop_the_rest() -> None:
    host = [("eth0", "192.0.19.3"), ("eth1", "192.168.3.3")]
    specs, notes = ip2nets_rules(
        [_rule("tcp", ("eth0",), ("192.168.*.3",)), _rule("tcp1", (), ("192.168.*.*",))], host
    )
    assert [str(s.net) for s in specs] == ["tcp1"] and specs[0].interfaces == ("eth1",)
    assert any("rule skipped" in n for n in notes)


def test_lnetctl_duplicate_ni_across_rules_is_an_error() -> None:
    host = [("eth0", "10.0.0.1")]
    with pytest.raises(ConfigError, match="ip2nets error"):
        ip2nets_rules([_rule("tcp", ("eth0",)), _rule("tcp", (), ("10.*.*.*",))], host)


def test_interface_item() -> None:
    assert parse_interface_item("eth0") == NiSpec("eth0", None)
    ni = parse_interface_item("eth0[0-3]")
    assert ni.interface == "eth0" and ni.cpts is not None and ni.cpts.values() == [0, 1, 2, 3]
    for bad in ("", "eth0[1", "[1]", "eth0[x]", "e" * 200):
        with pytest.raises(NidError):
            parse_interface_item(bad)


# --- routes= --------------------------------------------------------------------------------------------

ROUTES_OK = [
    ("tcp1 10.0.0.1@tcp", ["tcp1 10.0.0.1@tcp"]),
    ("tcp1 10.0.0.1", ["tcp1 10.0.0.1@tcp"]),  # a gateway without @ is tcp0
    ("tcp1 2 10.0.0.1@tcp", ["tcp1 2 10.0.0.1@tcp"]),
    ("tcp1 255 10.0.0.1@tcp", ["tcp1 255 10.0.0.1@tcp"]),
    ("tcp1 +3 10.0.0.1@tcp", ["tcp1 3 10.0.0.1@tcp"]),  # sscanf %u
    ("tcp1 10.0.0.1@tcp:5", ["tcp1 10.0.0.1@tcp:5"]),
    ("tcp1 10.0.0.1@tcp:0", ["tcp1 10.0.0.1@tcp"]),
    ("tcp1 10.0.0.[1-3]@tcp", ["tcp1 10.0.0.1@tcp", "tcp1 10.0.0.2@tcp", "tcp1 10.0.0.3@tcp"]),
    ("tcp1 10.0.0.[1-5/2]@tcp", ["tcp1 10.0.0.1@tcp", "tcp1 10.0.0.3@tcp", "tcp1 10.0.0.5@tcp"]),
    ("tcp1 10.0.0.[1,7]@tcp", ["tcp1 10.0.0.1@tcp", "tcp1 10.0.0.7@tcp"]),
    ("tcp[1-2] 10.0.0.1@tcp", ["tcp1 10.0.0.1@tcp", "tcp2 10.0.0.1@tcp"]),
    ("o2ib[1,3] 10.0.[0-1].1@tcp", ["o2ib1 10.0.0.1@tcp", "o2ib1 10.0.1.1@tcp", "o2ib3 10.0.0.1@tcp", "o2ib3 10.0.1.1@tcp"]),
    ("[tcp,o2ib]1 10.0.0.1@tcp", ["tcp1 10.0.0.1@tcp", "o2ib1 10.0.0.1@tcp"]),  # literal items
    ("tcp1 10.0.0.1@tcp 10.0.0.2@tcp", ["tcp1 10.0.0.1@tcp", "tcp1 10.0.0.2@tcp"]),
    # The priority applied is the last gateway's, for every gateway of the rule.
    ("tcp1 10.0.0.1@tcp:5 10.0.0.2@tcp", ["tcp1 10.0.0.1@tcp", "tcp1 10.0.0.2@tcp"]),
    ("tcp1 10.0.0.1@tcp 10.0.0.2@tcp:3", ["tcp1 10.0.0.1@tcp:3", "tcp1 10.0.0.2@tcp:3"]),
    ("tcp1 10.0.0.1@tcp; tcp2 10.0.0.2@tcp", ["tcp1 10.0.0.1@tcp", "tcp2 10.0.0.2@tcp"]),
    ("tcp1 10.0.0.1@tcp\ntcp2 10.0.0.2@tcp", ["tcp1 10.0.0.1@tcp", "tcp2 10.0.0.2@tcp"]),
    ("tcp1 10.0.0.1@tcp # comment; tcp2 10.0.0.2@tcp", ["tcp1 10.0.0.1@tcp", "tcp2 10.0.0.2@tcp"]),
    ("# only a comment", []),
    ("", []),
    ("tcp1 10.0.0.1@tcp; tcp1 10.0.0.1@tcp", ["tcp1 10.0.0.1@tcp", "tcp1 10.0.0.1@tcp"]),  # lnet_add_route says EEXIST
    ("tcp1\t2\t10.0.0.1@tcp", ["tcp1 2 10.0.0.1@tcp"]),
    ("o2ib0 192.168.0.[2-4]@tcp0", ["o2ib 192.168.0.2@tcp", "o2ib 192.168.0.3@tcp", "o2ib 192.168.0.4@tcp"]),
    ("tcp1 [1-2]@gni", ["tcp1 1@gni", "tcp1 2@gni"]),
]


@pytest.mark.parametrize("text,routes", ROUTES_OK)
def test_routes(text: str, routes: list[str]) -> None:
    result = parse_routes(text)
    assert [route_text(r) for r in result] == routes
    assert result.router is False


ROUTES_BAD = [
    # (string, position)
    ("tcp1", 0),
    ("tcp1 3", 5),  # a hop count is not a gateway
    ("tcp1 0 10.0.0.1@tcp", 5),  # hops must be 1..255: "0" is then read as a gateway
    ("tcp1 256 10.0.0.1@tcp", 5),
    ("tcp1 -1 10.0.0.1@tcp", 5),
    ("lo 10.0.0.1@tcp", 0),
    ("tcp1 0@lo", 5),
    ("tcp1 10.0.0.1@lo", 5),
    ("foo 10.0.0.1@tcp", 0),
    ("tcp1 10.0.0.1@foo", 5),
    ("tcp1 10.0.0.1@tcp:x", 18),
    ("tcp1 10.0.0.1@tcp:", 18),
    ("tcp1 10.0.0.1@tcp:-1x", 18),
    ("tcp1 10.0.0.[1-10/2]@tcp", 5),  # the last step must land on the end
    ("tcp1 10.0.0.[1-5/0]@tcp", 5),  # Lustre divides by zero here
    ("tcp1 10.0.0.[3-1]@tcp", 5),
    ("tcp1 10.0.0.[1-3@tcp", 5),
    ("tcp1 10.0.0.[]@tcp", 5),
    ("tcp1 10.0.0.[1,]@tcp", 5),
    ("tcp1 10.0.0.[1-3x]@tcp", 5),
    ("tcp[a-b] 10.0.0.1@tcp", 0),
    ("tcp1 10.0.0.1@tcp; tcp2", 19),
    ("tcp1 1 2 10.0.0.1@tcp", 7),  # only the second token may be a hop count
    ("tcp1 2001:db8::1@tcp", 10),  # routes= uses the classic NID API: ':' starts a priority
]


@pytest.mark.parametrize("text,pos", ROUTES_BAD)
def test_routes_errors(text: str, pos: int) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_routes(text)
    assert ei.value.where == f"routes at position {pos}"


def test_routes_local_gateway_makes_a_router() -> None:
    result = parse_routes("tcp1 10.0.0.[1-2]@tcp", ["10.0.0.1@tcp"])
    assert result.router is True
    assert [route_text(r) for r in result] == ["tcp1 10.0.0.2@tcp"]


def test_routes_lustre_would_not_add_are_reported() -> None:
    text = "tcp1 10.0.0.2@tcp; o2ib 192.168.0.1@o2ib1; o2ib 10.0.0.3@tcp; o2ib 10.0.0.3@tcp:4"
    local = ["10.0.0.1@tcp", "10.1.0.1@tcp1"]
    result = parse_routes(text, local)
    assert len(result) == 4  # everything lnet_parse_route hands to lnet_add_route
    keep, dropped = result.installable(local)
    assert [route_text(r) for r in keep] == ["o2ib 10.0.0.3@tcp"]
    assert [why for _, why in dropped] == [
        "tcp1 is a local net", "gateway 192.168.0.1@o2ib1 is not on a local net", "duplicate route"]


@pytest.mark.parametrize("text", ["tcp 10.0.0.2@tcp", "o2ib 1.2.3.4@tcp; tcp1 10.0.0.[2-3]@tcp1", "tcp2 2 10.0.0.9@tcp2:1"])
def test_route_through_a_gateway_on_the_routed_net_fails(text: str) -> None:
    """lnet_add_route: ``LNET_NID_NET(gateway) == net`` is -EINVAL, checked before the local-net
    EEXIST, and lnet_parse_route fails on it ("Can't create route to ... via ...")."""
    with pytest.raises(ConfigError, match="Can't create route to tcp.* via .*: the gateway is on the net it routes to"):
        parse_routes(text, ["10.0.0.1@tcp"])


def test_own_gateway_on_the_routed_net_makes_a_router() -> None:
    """lnet_parse_route asks lnet_islocalnid before lnet_add_route: our own NID makes us a router."""
    result = parse_routes("tcp 10.0.0.1@tcp", ["10.0.0.1@tcp"])
    assert list(result) == [] and result.router


def test_route_fields() -> None:
    (r,) = parse_routes("o2ib2 3 10.0.0.1@tcp:7")
    assert r == Route(Net("o2ib", 2), parse_nid("10.0.0.1@tcp"), 3, 7)
    (r,) = parse_routes("o2ib2 10.0.0.1@tcp")
    assert r.hops is None and r.priority == 0


EXPAND = [
    ("abc", ["abc"]),
    ("a[1-3]", ["a1", "a2", "a3"]),
    ("a[1-3]b[x,y]", ["a1bx", "a1by", "a2bx", "a2by", "a3bx", "a3by"]),
    ("[0-10/5]", ["0", "5", "10"]),
    ("[x]", ["x"]),
    ("[a-b]", ["a-b"]),  # not numbers: a literal item
    ("[1-2/1]", ["1", "2"]),
    ("[+1-2]", ["1", "2"]),
    ("[ 1-2]", ["1", "2"]),
]


@pytest.mark.parametrize("text,out", EXPAND)
def test_expand_brackets(text: str, out: list[str]) -> None:
    assert expand_brackets(text) == out


def test_expand_brackets_is_bounded() -> None:
    from lu2k.config import _ExpandError

    with pytest.raises(_ExpandError):
        expand_brackets("10.[0-255].[0-255].1@tcp")


def test_routes_expansion_bound_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="buffers"):
        parse_routes("tcp1 10.[0-255].[0-255].1@tcp")


def test_netspec_str_round_trip() -> None:
    spec = NetSpec(Net("tcp", 2), (NiSpec("eth0"), NiSpec("eth1")))
    assert str(spec) == "tcp2(eth0,eth1)"
    assert networks_string(parse_networks(str(spec))) == "tcp2(eth0,eth1)"


def test_system_interfaces_sees_loopback() -> None:
    from lu2k.config import system_interfaces

    ifaces = system_interfaces()
    assert any(h.name == "lo" and str(h.ip) == "127.0.0.1" and h.up for h in ifaces)
    assert len({h.name for h in ifaces}) == len(ifaces)


@pytest.mark.netns
def test_first_interface_on_a_real_kernel(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The wiki's first-interface cases with interfaces a real kernel reports, in a private
    network namespace: detection order is ifindex order, not name order."""
    import os
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    ns = f"lu2kcfg{os.getpid()}"
    run = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True, timeout=30)  # noqa: E731
    run("netns", "add", ns)
    try:
        # Created in this order: eth1 gets the lower ifindex, so it is "first".
        for name, addr, up in (("eth1", "10.70.3.4/16", True), ("eth0", "192.168.1.20/24", True), ("eth2", "172.16.0.1/16", False)):
            run("-n", ns, "link", "add", name, "type", "veth", "peer", "name", "p" + name)  # the peer has no IPv4
            run("-n", ns, "addr", "add", addr, "dev", name)
            if up:
                run("-n", ns, "link", "set", name, "up")
        run("-n", ns, "link", "set", "lo", "up")
        code = (
            "from lu2k.config import system_interfaces, ip2nets, networks_string, parse_networks, resolve_interfaces\n"
            "h = system_interfaces()\n"
            "print([(i.name, str(i.ip), i.up) for i in h])\n"
            "print(networks_string(resolve_interfaces(parse_networks('tcp'), h)))\n"
            "print(networks_string(ip2nets('tcp0 192.168.*.*', h)))\n"
            "print(networks_string(ip2nets('tcp0(eth0) 192.168.*.*', h)))\n"
            "try:\n    ip2nets('tcp 172.16.*.*', h)\nexcept Exception as e:\n    print('error:', e)\n"
        )
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True, capture_output=True,
                             text=True, env=env, timeout=60).stdout.splitlines()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    assert out[0] == str([("lo", "127.0.0.1", True), ("eth1", "10.70.3.4", True), ("eth0", "192.168.1.20", True),
                          ("eth2", "172.16.0.1", False)])
    assert out[1] == "tcp(eth1)"  # networks="tcp": the first interface detected
    assert out[2] == "tcp(eth1)"  # the pattern matches eth0's address, the NI goes on eth1
    assert out[3] == "tcp(eth0)"
    assert out[4].startswith("error:") and "does not match" in out[4]  # eth2 is down


def _glibc_range(text: str) -> tuple[int, int, int, int] | None:
    """lnet_str2tbs_expand's two sscanf calls, on the real glibc."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    lo, hi, stride, n = (ctypes.c_int(0) for _ in range(4))
    if libc.sscanf(text.encode(), b"%d-%d/%d%n", *(ctypes.byref(x) for x in (lo, hi, stride, n))) >= 3:
        return lo.value, hi.value, stride.value, n.value
    if libc.sscanf(text.encode(), b"%d-%d%n", *(ctypes.byref(x) for x in (lo, hi, n))) >= 2:
        return lo.value, hi.value, 1, n.value
    return None


def _fuzz_ranges(seed: int, count: int) -> list[str]:
    import random

    rng = random.Random(seed)
    pieces = ["1", "10", "-3", "+2", " 4", "0", "2147483648", "4294967297", "x", ""]
    out = []
    for _ in range(count):
        text = rng.choice(pieces) + rng.choice(["-", "--", "/", ""]) + rng.choice(pieces)
        if rng.random() < 0.6:
            text += rng.choice(["/", "-", ""]) + rng.choice(pieces)
        out.append(text + rng.choice(["]", ",5]", ""]))
    return out


@pytest.mark.parametrize("text", _fuzz_ranges(6, 200))
def test_route_range_scan_matches_glibc(text: str) -> None:
    from lu2k.config import _scan_range

    assert _scan_range(text, 0) == _glibc_range(text)


# --- interfaces that are down (lnet_inet_enumerate skips !IFF_UP) ---------------------------------


def test_interface_state_words() -> None:
    hosts = host_interfaces([("eth0", "10.0.0.1", "down"), ("eth1", "10.0.1.1", "UP"), ("eth2", "10.0.2.1", True), ("eth3", "10.0.3.1")])
    assert [h.up for h in hosts] == [False, True, True, True]
    for bad in ("sideways", 1, None):
        with pytest.raises(ConfigError, match="state must be up/down"):
            host_interfaces([("eth0", "10.0.0.1", bad)])


def test_ip2nets_rule_matching_only_a_down_interface_does_not_apply() -> None:
    """lnet_parse_ip2nets matches the addresses lnet_inet_enumerate gives: down ones are not there."""
    host = [("eth0", "192.168.1.2", "down"), ("eth1", "10.0.0.2", "up")]
    assert ip2nets_networks("tcp(eth0) 192.168.*.*; o2ib 10.*.*.*", host) == "o2ib"
    with pytest.raises(ConfigError, match="does not match any local IP interfaces"):
        ip2nets_networks("tcp 192.168.*.*", host)
    with pytest.raises(ConfigError, match="no local IP interfaces"):
        ip2nets_networks("tcp 192.168.*.*", [("eth0", "192.168.1.2", "down")])


def test_ip2nets_rule_naming_a_down_interface_matched_through_another() -> None:
    """The rule's pattern matches eth0 (up), so its networks spec ``tcp(eth1)`` is taken; eth1 is
    down, so the LND finds no UP interface eth1 (lnet_inet_select) and the net cannot start."""
    host = [("eth0", "192.168.1.2", "up"), ("eth1", "192.168.2.2", "down")]
    assert ip2nets_networks("tcp(eth1) 192.168.1.*", host) == "tcp(eth1)"
    with pytest.raises(ConfigError) as e:
        ip2nets("tcp(eth1) 192.168.1.*", host)
    assert e.value.errors == ["net tcp: interface 'eth1' is down (LNet uses only UP interfaces)"]


def test_networks_default_interface_skips_down_ones() -> None:
    host = [("eth0", "10.0.0.1", "down"), ("eth1", "10.0.1.1", "up")]
    (spec,) = resolve_interfaces(parse_networks("tcp"), host)
    assert spec.interfaces == ("eth1",)
    with pytest.raises(ConfigError):
        resolve_interfaces(parse_networks("tcp(eth0)"), host)
