"""lu2k.lnetyaml: lnetctl's YAML schema, validated whole, exported, resolved against a host."""

from __future__ import annotations

import textwrap

import pytest

from lu2k.errors import ConfigError
from lu2k.lnetyaml import apply_set, dumps, load, loads, parse_data, resolve, to_data
from lu2k.nid import Net, parse_nid

# What `lnetctl export` prints on a Lustre 2.17 node (with statistics), plus lu2k's keys.
EXPORT = textwrap.dedent(
    """\
    net:
        - net type: lo
          local NI(s):
            - nid: 0@lo
              status: up
        - net type: tcp
          local NI(s):
            - nid: 10.0.0.1@tcp
              status: up
              interfaces:
                  0: eth0
              statistics:
                  send_count: 10
                  recv_count: 10
                  drop_count: 0
              health stats:
                  health value: 1000
              tunables:
                  peer_timeout: 180
                  peer_credits: 8
                  peer_buffer_credits: 0
                  credits: 256
              lnd tunables:
                  conns_per_peer: 1
              dev cpt: -1
              CPT: "[0]"
          lu2k:
              backend: tcp
              port: 7988
              key: a-site-key-of-some-length
              profile: {rtt_ms: 600, rate_mbit: 20, loss: 0.01}
    route:
        - net: o2ib1
          gateway: 10.0.0.2@tcp
          hop: -1
          priority: 0
          health_sensitivity: 1
          state: up
    peer:
        - primary nid: 10.0.0.3@tcp
          Multi-Rail: True
          peer ni:
            - nid: 10.0.0.3@tcp
              state: NA
            - nid: 10.0.0.4@tcp
              state: NA
    routing:
        enable: 0
    buffers:
        tiny: 512
        small: 4096
        large: 256
    global:
        numa_range: 0
        max_intf: 200
        discovery: 1
        drop_asym_route: 0
        retry_count: 2
        transaction_timeout: 50
        health_sensitivity: 100
        recovery_interval: 1
        router_sensitivity: 100
        lnd_timeout: 16
        response_tracking: 3
        recovery_limit: 0
        max_recovery_ping_interval: 900
    """
)

HOST = [("lo", "127.0.0.1"), ("eth0", "10.0.0.1"), ("eth1", "192.168.3.3")]


def test_lnetctl_export_parses() -> None:
    cfg = loads(EXPORT)
    assert [str(n.net) for n in cfg.nets] == ["tcp"]  # lo is implicit
    (ni,) = cfg.nets[0].nis
    assert ni.nid == parse_nid("10.0.0.1@tcp") and [i.interface for i in ni.interfaces] == ["eth0"]
    assert ni.tunables == {"peer_timeout": 180, "peer_credits": 8, "peer_buffer_credits": 0, "credits": 256}
    assert ni.lnd_tunables == {"conns_per_peer": 1} and ni.cpt is not None and ni.cpt.values() == [0]
    assert cfg.nets[0].lu2k["profile"] == {"rtt_ms": 600.0, "rate_mbit": 20.0, "loss": 0.01}
    (route,) = cfg.routes
    assert (str(route.net), str(route.gateway), route.hops, route.priority) == ("o2ib1", "10.0.0.2@tcp", None, 0)
    (peer,) = cfg.peers
    assert [str(n) for n in peer.nids] == ["10.0.0.3@tcp", "10.0.0.4@tcp"] and peer.multi_rail
    assert cfg.routing is False and cfg.buffers == {"tiny": 512, "small": 4096, "large": 256}
    assert cfg.global_["transaction_timeout"] == 50 and cfg.global_["lnd_timeout"] == 16


def test_export_round_trip() -> None:
    cfg = loads(EXPORT)
    text = dumps(cfg)
    again = loads(text)
    assert again == cfg
    assert dumps(again) == text
    data = to_data(cfg)
    assert list(data) == ["net", "route", "peer", "routing", "buffers", "global"]
    assert data["net"][0]["local NI(s)"][0]["interfaces"] == {0: "eth0"}
    assert data["route"][0]["hop"] == -1


def test_plain_lnetctl_file_without_lu2k_keys() -> None:
    cfg = loads("net:\n  - net type: o2ib1\n    local NI(s):\n      - interfaces:\n          0: ib0\n          1: ib1[1]\n")
    assert [i.interface for i in cfg.nets[0].nis[0].interfaces] == ["ib0", "ib1"]


def test_empty_and_null_documents() -> None:
    assert loads("") == loads("{}")
    assert loads("net:\n").nets == []


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        loads(text, resolve=False)
    return ei.value.errors


def test_every_error_is_listed_with_its_path() -> None:
    errors = _errors(
        textwrap.dedent(
            """\
            net:
              - net type: foo
                local NI(s): [{nid: 1.2.3.4@tcp}]
              - net type: tcp
                local NI(s):
                  - nid: 1.2.3@tcp
                  - nid: 10.0.0.1@o2ib
                  - tunables: {credits: -5, bogus: 1}
                    interfaces: {0: eth0}
                lu2k: {backend: 5, port: 70000, key: short, profile: {loss: 0.9}}
            route:
              - {net: lo, gateway: 10.0.0.1@tcp}
              - {net: tcp1, gateway: 0@lo}
              - {net: tcp1, gateway: 10.0.0.1@tcp, hop: 0}
              - {net: tcp2, gateway: 10.0.0.1@tcp, hop: 300, priority: -7}
              - {gateway: 10.0.0.1@tcp}
            peer:
              - {peer ni: [{nid: 10.0.0.5@tcp}]}
              - {primary nid: bad}
            global: {retry_count: 60, transaction_timeout: 50, health_sensitivity: 2000, nonsense: 1}
            routing: {enable: maybe}
            buffers: {tiny: -1, huge: 1}
            ip2nets:
              - {net-spec: tcp, ip-range: {0: 10.0.0}}
              - {ip-range: {0: 10.*.*.*}}
            surprise: {}
            """
        )
    )
    expected = [
        "surprise: unknown section",
        "net[0].net type: unknown net type in 'foo'",
        "net[1].local NI(s)[0].nid: bad IPv4 address '1.2.3'",
        "net[1].local NI(s)[1].nid: NID 10.0.0.1@o2ib is not on net tcp",
        "net[1].local NI(s)[2].tunables.credits: -5 out of range",
        "net[1].local NI(s)[2].tunables.bogus: unknown tunable",
        "net[1].lu2k.backend: expected a backend name",
        "net[1].lu2k.port: 70000 out of range",
        "net[1].lu2k.key: key has 5 byte(s); at least 16 (128 bits)",
        "net[1].lu2k.profile.loss: 0.9 out of range",
        "route[0].net: no routes to 'lo'",
        "route[1].gateway: a gateway cannot be on 'lo'",
        "route[2].hop: invalid hop count 0",
        "route[3].hop: 300 out of range",
        "route[3].priority: -7 out of range",
        "route[4]: missing 'net'",
        "peer[0]: missing 'primary nid'",
        "peer[1].primary nid: host name 'bad'",
        "global.health_sensitivity: 2000 out of range",
        "global.nonsense: unknown global setting",
        "global.retry_count: retry_count 60 must be less than transaction_timeout 50",
        "routing.enable: expected a boolean",
        "buffers.huge: unknown key",
        "buffers.tiny: -1 out of range",
        "ip2nets[0].ip-range[0]: IP pattern '10.0.0' does not have 4 octets",
        "ip2nets[1]: missing 'net-spec'",
    ]
    for exp in expected:
        assert any(e.startswith(exp) for e in errors), (exp, errors)
    assert len(errors) == len(expected)


ONE_ERROR = [
    ("[1, 2]", "the top level must be a mapping"),
    ("net: {net type: tcp}", "net"),
    ("net: [{local NI(s): [{nid: 1.2.3.4@tcp}]}]", "net[0]: missing 'net type'"),
    ("net: [{net type: tcp}]", "net[0].local NI(s): needs at least one NI"),
    ("net: [{net type: tcp, local NI(s): [{}]}]", "net[0].local NI(s)[0]: an NI needs a nid or interfaces"),
    ("net: [{net type: tcp, local NI(s): [{nid: 1.2.3.4@tcp, interfaces: {}}]}]", "empty interface list"),
    ("net: [{net type: tcp, local NI(s): [{interfaces: {0: 'eth0[x]'}}]}]", "interfaces[0]"),
    ("net: [{net type: tcp, local NI(s): [{nid: 1.2.3.4@tcp, CPT: '[]'}]}]", "CPT"),
    ("net: [{net type: tcp, local NI(s): [{nid: 1.2.3.4@tcp, color: red}]}]", "color: unknown key"),
    ("net: [{net type: tcp, local NI(s): [{nid: 1.2.3.4@tcp}, {nid: 1.2.3.4@tcp}]}]", "configured twice"),
    ("net: [{net type: tcp, local NI(s): [{nid: 1.2.3.4@tcp}], lu2k: {key: x, key_file: y}}]", "not both"),
    ("net: [{net type: tcp, local NI(s): [{nid: 1.2.3.4@tcp}], lu2k: {key: 'hex:zz'}}]", "not valid hex"),
    ("net: [{net type: tcp, local NI(s): [{nid: 1.2.3.4@tcp}], lu2k: {profile: {jitter: 1}}}]", "jitter: unknown key"),
    ("net: [{net type: tcp, local NI(s): [{nid: 1.2.3.4@tcp}], lu2k: {warp: 9}}]", "lu2k.warp: unknown key"),
    ("route: [{net: tcp1, gateway: 10.0.0.1@tcp}, {net: tcp1, gateway: 10.0.0.1@tcp}]", "given twice"),
    ("route: [{net: tcp1, gateway: '10.0.0.[1-2/0]@tcp'}]", "zero stride"),
    ("net: [{net type: tcp, local NI(s): [{nid: 1.2.3.4@tcp}]}, {net type: tcp1, local NI(s): [{nid: 1.2.4.4@tcp1}]}]\n"
     "route: [{net: tcp1, gateway: 1.2.3.5@tcp}]", "local net"),
    # lnet_add_route: LNET_NID_NET(gateway) == net is -EINVAL
    ("net: [{net type: tcp, local NI(s): [{nid: 1.2.3.4@tcp}]}]\nroute: [{net: tcp, gateway: 1.2.3.5@tcp}]",
     "route[0].gateway: gateway 1.2.3.5@tcp is on tcp, the net the route leads to"),
    ("route: [{net: tcp7, gateway: '10.0.0.[1-2]@tcp7'}]", "route[0].gateway: gateway 10.0.0.1@tcp7 is on tcp7"),
    ("peer: [{primary nid: 1.2.3.4@tcp}, {primary nid: 1.2.3.4@tcp}]", "peer 1.2.3.4@tcp given twice"),
    ("peer: [{primary nid: 1.2.3.4@tcp, peer ni: [{state: up}]}]", "peer ni[0]: missing 'nid'"),
    ("global: {lnd_timeout: -1}", "lnd_timeout"),
    ("global: {reconnect_min: 5, reconnect_max: 1}", "reconnect_min is larger"),
    ("numa: {range: -1}", "numa.range"),
    ("udsp: [{src: tcp}]", "UDSP"),
    ("lu2k: {networks: 'tcp(eth0'}", "lu2k.networks"),
    ("lu2k: {ip2nets: 'tcp 10.0.0'}", "lu2k.ip2nets"),
    ("lu2k: {routes: 'tcp1'}", "lu2k.routes"),
    ("lu2k: {networks: tcp, ip2nets: 'tcp 10.*.*.*'}", "EITHER"),
    ("lu2k: {routes: 5}", "expected a string"),
    ("lu2k: {interfaces: [eth0]}", "lu2k.interfaces[0]"),
    ("lu2k: {telepathy: true}", "lu2k.telepathy: unknown key"),
    ("ip2nets: [{net-spec: tcp, interfaces: {0: ''}}]", "ip2nets[0].interfaces[0]"),
    ("routing: [1]", "routing: expected a mapping"),
    ("net: [{net type: tcp, local NI(s): [{nid: 1.2.3.4@tcp}], lu2k: {port: 'x'}}]", "lu2k.port: expected a port number"),
]


@pytest.mark.parametrize("text,fragment", ONE_ERROR)
def test_single_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        loads(text, resolve=False)
    assert fragment in str(ei.value)


def test_bad_yaml_and_unreadable_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="not valid YAML"):
        loads("net: [")
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.yaml"))
    p = tmp_path / "ok.yaml"
    p.write_text(EXPORT)
    assert load(str(p)) == loads(EXPORT)


def test_repeated_net_entries_merge_their_nis() -> None:
    cfg = loads(
        "net:\n  - {net type: tcp, local NI(s): [{nid: 10.0.0.1@tcp}]}\n"
        "  - {net type: tcp0, local NI(s): [{nid: 10.0.0.2@tcp}]}\n"
    )
    assert len(cfg.nets) == 1 and [str(n.nid) for n in cfg.nets[0].nis] == ["10.0.0.1@tcp", "10.0.0.2@tcp"]


def test_route_gateway_expression_expands() -> None:
    cfg = loads("route: [{net: tcp1, gateway: '10.0.0.[1-3]@tcp', hop: 2, priority: 4}]")
    assert [str(r.gateway) for r in cfg.routes] == ["10.0.0.1@tcp", "10.0.0.2@tcp", "10.0.0.3@tcp"]
    assert {(r.hops, r.priority) for r in cfg.routes} == {(2, 4)}


def test_peer_nids_as_plain_list_and_non_mr() -> None:
    cfg = parse_data({"peer": [{"primary nid": "1.2.3.4@tcp", "peer ni": ["1.2.3.5@tcp"], "non_mr": True}]})
    assert [str(n) for n in cfg.peers[0].nids] == ["1.2.3.4@tcp", "1.2.3.5@tcp"]
    assert cfg.peers[0].multi_rail is False


# --- resolution ----------------------------------------------------------------------------------------


def test_resolve_export_on_its_host() -> None:
    r = resolve(loads(EXPORT), HOST)
    assert [str(ni.nid) for ni in r.nets[0].nis] == ["10.0.0.1@tcp"]
    assert r.nets[0].nis[0].interface == "eth0" and r.nets[0].lu2k["backend"] == "tcp"
    assert [str(x.gateway) for x in r.routes] == ["10.0.0.2@tcp"] and r.router is False
    assert r.local_nids() == [parse_nid("10.0.0.1@tcp")]


def test_resolve_interface_must_exist_and_agree_with_the_nid() -> None:
    with pytest.raises(ConfigError) as ei:
        resolve(loads(EXPORT), [("eth1", "10.0.0.1")])
    assert any("'eth0' does not exist" in e for e in ei.value.errors)
    with pytest.raises(ConfigError) as ei:
        resolve(loads(EXPORT), [("eth0", "10.0.0.9")])
    assert any("is not the address of eth0" in e for e in ei.value.errors)


def test_resolve_interfaces_only_ni_gets_its_nid_from_the_interface() -> None:
    cfg = loads("net: [{net type: tcp2, local NI(s): [{interfaces: {0: eth1, 1: eth0}}]}]")
    r = resolve(cfg, HOST)
    assert [str(ni.nid) for ni in r.nets[0].nis] == ["192.168.3.3@tcp2", "10.0.0.1@tcp2"]


def test_resolve_legacy_networks_string() -> None:
    cfg = loads("lu2k: {networks: 'tcp1(eth1),tcp'}")
    r = resolve(cfg, HOST)
    assert [(str(n.net), [str(ni.nid) for ni in n.nis], n.origin) for n in r.nets] == [
        ("tcp1", ["192.168.3.3@tcp1"], "networks"),
        ("tcp", ["10.0.0.1@tcp"], "networks"),  # no interface named: the first one detected
    ]


def test_resolve_legacy_ip2nets_string_kernel_semantics() -> None:
    # The wiki's contradicting rule loads under module-parameter rules (eth0 is used)...
    cfg = loads("lu2k: {ip2nets: 'tcp(eth0) 192.168.*.3'}")
    host = [("eth0", "192.0.19.3"), ("eth1", "192.168.3.3")]
    r = resolve(cfg, host)
    assert [str(ni.nid) for ni in r.nets[0].nis] == ["192.0.19.3@tcp"]


def test_resolve_yaml_ip2nets_lnetctl_semantics() -> None:
    # ... but fails as an lnetctl ip2nets rule: the pattern contradicts eth0.
    cfg = loads("ip2nets: [{net-spec: tcp, interfaces: {0: eth0}, ip-range: {0: 192.168.*.3}}]")
    host = [("eth0", "192.0.19.3"), ("eth1", "192.168.3.3")]
    with pytest.raises(ConfigError) as ei:
        resolve(cfg, host)
    assert "no rules applied" in ei.value.errors[0]
    cfg = loads("ip2nets: [{net-spec: tcp, ip-range: {0: 192.168.*.3}}]")
    r = resolve(cfg, host)
    assert [str(ni.nid) for ni in r.nets[0].nis] == ["192.168.3.3@tcp"]


def test_resolve_legacy_routes_and_router_detection() -> None:
    cfg = loads(
        "net: [{net type: tcp, local NI(s): [{nid: 10.0.0.1@tcp}]}, {net type: tcp1, local NI(s): [{nid: 10.1.0.1@tcp1}]}]\n"
        "lu2k: {routes: 'o2ib 10.0.0.[1-2]@tcp:3; tcp1 10.0.0.5@tcp'}\n"
    )
    r = resolve(cfg, HOST)
    assert r.router is True
    assert [(str(x.net), str(x.gateway), x.priority) for x in r.routes] == [("o2ib", "10.0.0.2@tcp", 3)]
    assert any("local net" in n for n in r.notes)


def test_resolve_route_checks() -> None:
    cfg = loads("net: [{net type: tcp, local NI(s): [{nid: 10.0.0.1@tcp}]}]\nroute: [{net: tcp1, gateway: 10.1.0.1@o2ib}]")
    with pytest.raises(ConfigError, match="error") as ei:
        resolve(cfg, HOST)
    assert "not on a local net" in ei.value.errors[0]
    cfg = loads("net: [{net type: tcp, local NI(s): [{nid: 10.0.0.1@tcp}]}]\nroute: [{net: tcp1, gateway: 10.0.0.1@tcp}]")
    assert resolve(cfg, HOST).router is True


def test_resolve_duplicate_nid_from_two_sources() -> None:
    cfg = loads("net: [{net type: tcp, local NI(s): [{nid: 10.0.0.1@tcp}]}]\nlu2k: {networks: tcp(eth0)}")
    with pytest.raises(ConfigError) as ei:
        resolve(cfg, HOST)
    assert "already configured" in ei.value.errors[0]


def test_resolve_uses_document_interfaces() -> None:
    cfg = loads("lu2k: {networks: tcp, interfaces: [{name: eth7, ip: 172.16.0.7}]}")
    assert str(resolve(cfg).nets[0].nis[0].nid) == "172.16.0.7@tcp"


def test_resolve_numeric_net_without_nid() -> None:
    cfg = loads("lu2k: {networks: gni}")
    with pytest.raises(ConfigError, match="error"):
        resolve(cfg, HOST)


# --- set -------------------------------------------------------------------------------------------------


def test_apply_set() -> None:
    cfg = loads(EXPORT)
    new = apply_set(cfg, "transaction_timeout", 30)
    assert new.global_["transaction_timeout"] == 30 and cfg.global_["transaction_timeout"] == 50
    assert apply_set(cfg, "routing", 1).routing is True
    assert apply_set(cfg, "tiny_buffers", 1024).buffers["tiny"] == 1024
    assert apply_set(cfg, "max_interfaces", 32).global_["max_intf"] == 32
    assert apply_set(cfg, "hsensitivity", 10).global_["health_sensitivity"] == 10
    assert apply_set(cfg, "connect_timeout", "2.5").global_["connect_timeout"] == 2.5
    for name, value, frag in [
        ("retry_count", 50, "less than transaction_timeout"),
        ("health_sensitivity", 5000, "out of range"),
        ("lnd_timeout", 5, "cannot be set"),
        ("warp_factor", 9, "unknown setting"),
        ("routing", "sometimes", "boolean"),
        ("discovery", 2, "out of range"),
    ]:
        with pytest.raises(ConfigError) as ei:
            apply_set(cfg, name, value)
        assert frag in ei.value.errors[0]
    assert cfg == loads(EXPORT)  # never half-applied


def test_net_type_names() -> None:
    cfg = loads("net: [{net type: udt3, local NI(s): [{nid: 10.0.0.1@udt3}], lu2k: {backend: udt}}]")
    assert cfg.nets[0].net == Net("udt", 3)


# --- the daemon's config ----------------------------------------------------------------------------

DAEMON_LU2K = {"backend": "tcp", "port": 7988, "key": "a-site-key-of-some-length"}


def test_daemon_config_from_legacy_strings_and_interface_nis() -> None:
    """One pass: the document is checked and applied to the host; the daemon config comes out."""
    from lu2k.settings import parse_config

    data = {
        "net": [{"net type": "tcp2", "local NI(s)": [{"interfaces": {0: "eth1"}, "tunables": {"credits": 5}}], "lu2k": DAEMON_LU2K}],
        "route": [{"net": "o2ib3", "gateway": "192.168.3.[8-9]@tcp2"}],
        "lu2k": {"networks": "tcp(eth0)", "routes": "tcp1 10.0.0.2@tcp; tcp4 10.0.0.1@tcp", "defaults": DAEMON_LU2K},
    }
    before = repr(data)
    cfg = parse_config(data, interfaces=HOST)
    assert [(str(n.net), str(n.nid), n.credits, n.where) for n in cfg.nets] == [
        ("tcp2", "192.168.3.3@tcp2", 5, "net[0]"), ("tcp", "10.0.0.1@tcp", 256, "lu2k (networks) net tcp")]
    assert all(n.key == b"a-site-key-of-some-length" for n in cfg.nets)
    assert [(str(r.net), str(r.gateway)) for r in cfg.routes] == [
        ("o2ib3", "192.168.3.8@tcp2"), ("o2ib3", "192.168.3.9@tcp2"), ("tcp1", "10.0.0.2@tcp")]
    assert cfg.routing is True  # 10.0.0.1@tcp is ours: we are a router
    assert repr(data) == before  # the input is not modified


def test_daemon_config_reports_host_problems_whole() -> None:
    from lu2k.settings import parse_config

    with pytest.raises(ConfigError) as ei:
        parse_config({"lu2k": {"ip2nets": "tcp 172.16.*.*", "routes": "tcp1 1.1.1.1@o2ib"}}, interfaces=HOST)
    assert any("does not match" in e for e in ei.value.errors)


def test_daemon_settings_read_legacy_module_parameters() -> None:
    from lu2k.settings import parse_config

    cfg = parse_config({
        "lu2k": {"ip2nets": "tcp(eth1) 192.168.*.*; tcp1 10.*.*.*", "routes": "o2ib 192.168.3.9@tcp",
                 "defaults": DAEMON_LU2K, "interfaces": [{"name": "eth0", "ip": "10.0.0.1"}, {"name": "eth1", "ip": "192.168.3.3"}]},
    })
    assert [(str(n.net), str(n.nid), n.port) for n in cfg.nets] == [("tcp", "192.168.3.3@tcp", 7988), ("tcp1", "10.0.0.1@tcp1", 7988)]
    assert [(str(r.net), str(r.gateway)) for r in cfg.routes] == [("o2ib", "192.168.3.9@tcp")]


def test_daemon_settings_list_schema_errors_with_paths() -> None:
    from lu2k.settings import parse_config

    with pytest.raises(ConfigError) as ei:
        parse_config({"net": [{"net type": "tcp", "local NI(s)": [{"nid": "10.0.0.1@tcp", "tunables": {"credits": "x"}}],
                               "lu2k": {**DAEMON_LU2K, "port": -1}}],
                      "route": [{"net": "tcp1", "gateway": "1.2.3.4@o2ib"}]})
    assert ei.value.errors == [
        "net[0].local NI(s)[0].tunables.credits: expected an integer, got 'x'",
        "net[0].lu2k.port: -1 out of range 0..65535",
        "route: route to tcp1: gateway 1.2.3.4@o2ib is not on a local net",
    ]


def test_plain_lnetctl_export_plus_lu2k_defaults_is_a_daemon_config() -> None:
    from lu2k.settings import parse_config

    data = yaml_load(EXPORT)
    del data["net"][1]["lu2k"]
    data["lu2k"] = {"defaults": {"backend": "tcp", "port": 7000, "key": "a-site-key-of-some-length"},
                    "interfaces": [{"name": "eth0", "ip": "10.0.0.1"}]}
    cfg = parse_config(data)
    assert [(str(n.nid), n.port, n.backend, n.peer_credits) for n in cfg.nets] == [("10.0.0.1@tcp", 7000, "tcp", 8)]
    assert [str(p.nid) for p in cfg.peers] == ["10.0.0.3@tcp"] and cfg.global_.transaction_timeout == 50
    # Without defaults the daemon says what is missing.
    del data["lu2k"]["defaults"]
    with pytest.raises(ConfigError, match="pre-shared key"):
        parse_config(data)


def yaml_load(text: str) -> dict:  # type: ignore[type-arg]
    import yaml

    return yaml.safe_load(text)


def test_lnetctl_ip2net_string_in_a_net_entry() -> None:
    # lnetctl's net handler takes `ip2net: "<module parameter>"` and hands it to the kernel.
    cfg = loads("net:\n  - ip2net: 'tcp(eth1) 192.168.*.*; tcp1 10.*.*.*'\n")
    assert cfg.ip2net == ["tcp(eth1) 192.168.*.*; tcp1 10.*.*.*"] and cfg.nets == []
    assert loads(dumps(cfg)) == cfg
    r = resolve(cfg, HOST)
    assert [(str(n.net), str(n.nis[0].nid), n.origin) for n in r.nets] == [
        ("tcp", "192.168.3.3@tcp", "ip2net"), ("tcp1", "10.0.0.1@tcp1", "ip2net")]
    with pytest.raises(ConfigError, match=r"net\[0\].ip2net"):
        loads("net:\n  - ip2net: 'tcp 192.168.*'\n")
    with pytest.raises(ConfigError, match="either"):
        loads("net:\n  - {ip2net: 'tcp 1.1.1.1', net type: tcp}\n")


def test_resolve_refuses_an_ni_on_a_down_interface() -> None:
    """lnetctl hands the NI to the LND, whose lnet_inet_select finds only UP interfaces."""
    cfg = loads("net: [{net type: tcp, local NI(s): [{interfaces: {0: eth0}}]}]")
    with pytest.raises(ConfigError) as e:
        resolve(cfg, [("eth0", "10.0.0.1", "down")])
    assert e.value.errors[0] == "net[0].local NI(s)[0].interfaces: interface 'eth0' is down (LNet uses only UP interfaces)"
    assert [str(n) for n in resolve(cfg, [("eth0", "10.0.0.1", "up")]).local_nids()] == ["10.0.0.1@tcp"]
