"""Hostile configuration input: every document and every string gets a ConfigError/NidError
or a result -- never another exception (which ``lu2kd --check`` would print as a traceback).

Short runs here; ``LU2K_FUZZ_EXAMPLES=100000 pytest tests/test_config_fuzz.py`` for a long
one.  Host-name lookups are replaced by "cannot resolve" so the fuzzer stays off the network.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lu2k import nid as nid_module
from lu2k.config import check_ip2nets, ip2nets_networks, parse_networks, parse_routes
from lu2k.errors import ConfigError, NidError
from lu2k.lnetyaml import apply_set, dumps, parse_data
from lu2k.nid import NidList, parse_expr_list, parse_net, parse_nid
from lu2k.settings import DaemonConfig, check_backends, parse_config
from lu2k.values import as_address, as_float, as_int, as_mode, parse_key, parse_rate

EXAMPLES = int(os.environ.get("LU2K_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=EXAMPLES <= 1000)
HOST = [("eth0", "10.0.0.1"), ("eth1", "192.168.1.2", "down"), ("ib0", "10.1.0.1")]


@pytest.fixture(autouse=True)
def _no_name_lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(name: str) -> Any:
        raise NidError(f"cannot resolve host name {name!r}")

    monkeypatch.setattr(nid_module, "_resolve_host", refuse)
    yield


TRICKY = [
    "tcp", "tcp1", "o2ib", "lo", "bxi3f", "efa", "quic", "udt", "10.0.0.1@tcp", "10.0.0.2@tcp1", "::1@tcp", "fe80::1@tcp",
    "0@lo", "*@tcp", "10.0.0.[1-3]@tcp", "10.0.0.[10-4]@tcp", "[5-1]", "hex:", "hex:zz", "hex:" + "ab" * 16, "x" * 20,
    "<hidden: export --secrets to include>", "0o660", "0660", "rw", "nan", "inf", "-inf", "1e308", "yes", "maybe",
    "127.0.0.1:7988", "127.0.0.1:99999", "[::1]:1", "host", "tcp(eth0)", "tcp(eth1) 192.168.*.*", "o2ib 10.0.0.2@tcp",
    "20mbit", "fast", "eth0", "", " ", "0x10", "017", "-1", "tcp 10.0.0.2@tcp",
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(TRICKY),
)
KEYS = st.one_of(st.sampled_from([
    "net", "net type", "local NI(s)", "nid", "interfaces", "tunables", "peer_credits", "credits", "peer_timeout", "lu2k",
    "backend", "port", "key", "key_file", "listen", "profile", "rtt_ms", "rate_mbit", "loss", "options", "min_bulk",
    "socket_buffer", "congestion", "route", "gateway", "hop", "priority", "peer", "primary nid", "address", "global",
    "transaction_timeout", "routing", "enable", "shim", "socket_mode", "batch", "path", "control", "networks", "ip2nets",
    "routes", "defaults", "cert", "ca", "CPT", "net-spec", "ip-range", "buffers", "numa", "range",
]), st.text(max_size=6), st.integers(min_value=0, max_value=3))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)), max_leaves=25)

BASE: dict[str, Any] = {
    "net": [
        {"net type": "tcp", "local NI(s)": [{"nid": "10.0.0.1@tcp", "tunables": {"peer_credits": 8, "credits": 256}}],
         "lu2k": {"backend": "tcp", "port": 7988, "key": "fuzz-test-network-key", "profile": {"rtt_ms": 600, "rate_mbit": 20},
                  "options": {"min_bulk": 1024}}},
        {"net type": "tcp1", "local NI(s)": [{"interfaces": {0: "eth0"}}], "lu2k": {"backend": "inproc", "port": 0, "key": "hex:" + "cd" * 16}},
    ],
    "route": [{"net": "o2ib", "gateway": "10.0.0.9@tcp", "hop": 1, "priority": 0}],
    "peer": [{"primary nid": "10.0.0.5@tcp", "lu2k": {"address": "10.0.0.5:7988"}}],
    "global": {"transaction_timeout": 50, "connect_timeout": 1.5},
    "routing": {"enable": 0},
    "lu2k": {"shim": {"socket_mode": "0660", "batch": 32}, "routes": "o2ib1 10.0.0.7@tcp"},
}


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


PATHS = _paths(BASE)[1:]


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = copy.deepcopy(doc)
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


def _parse(doc: Any) -> DaemonConfig | None:
    try:
        return parse_config(doc, interfaces=HOST)
    except ConfigError:
        return None


def test_base_document_is_valid() -> None:
    cfg = parse_config(copy.deepcopy(BASE), interfaces=HOST)
    assert [str(n.nid) for n in cfg.nets] == ["10.0.0.1@tcp", "10.0.0.1@tcp1"]


@FUZZ
@given(path=st.sampled_from(PATHS), value=VALUES)
def test_one_bad_value_anywhere(path: tuple[Any, ...], value: Any) -> None:
    cfg = _parse(_replace(BASE, path, value))
    if cfg is not None:
        assert all(isinstance(p, str) for p in check_backends(cfg))  # tcp/inproc only: cheap, no I/O beyond /proc
        for n in cfg.nets:
            assert len(n.key) >= 16 and 0 <= n.port <= 65535 and n.credits >= 1 and n.peer_credits >= 1
            for v in (n.peer_timeout, n.profile.rtt_ms, n.profile.rate_mbit, n.profile.loss):
                assert v is None or math.isfinite(v)
        for v in vars(cfg.global_).values():
            assert math.isfinite(v)


@FUZZ
@given(path=st.sampled_from(PATHS), key=KEYS, value=VALUES)
def test_one_extra_key_anywhere(path: tuple[Any, ...], key: Any, value: Any) -> None:
    doc = copy.deepcopy(BASE)
    node = doc
    for k in path[:-1]:
        node = node[k]
    if isinstance(node, dict):
        node[key] = value
    _parse(doc)


@FUZZ
@given(doc=VALUES)
def test_random_documents(doc: Any) -> None:
    _parse(doc)
    try:
        cfg = parse_data(doc, resolve=False)
    except ConfigError:
        return
    dumps(cfg)  # whatever parses also prints


@FUZZ
@given(name=st.sampled_from(["routing", "transaction_timeout", "retry_count", "health_sensitivity", "tiny_buffers", "max_intf",
                             "lnd_timeout", "connect_timeout", "nonsense", "hsensitivity"]), value=SCALARS)
def test_lnetctl_set(name: str, value: Any) -> None:
    cfg = parse_data(copy.deepcopy(BASE), resolve=False)
    try:
        apply_set(cfg, name, value)
    except ConfigError:
        pass


TEXT = st.one_of(st.text(max_size=40), st.text(alphabet="tcpo2ib@.:[]-/,*0123456789 ();#x", max_size=40), st.sampled_from(TRICKY))


@FUZZ
@given(text=TEXT)
def test_name_and_string_readers(text: str) -> None:
    for fn in (lambda: parse_nid(text, resolve=False), lambda: parse_net(text), lambda: NidList.parse(text),
               lambda: parse_expr_list(text, 0, 255)):
        try:
            fn()
        except NidError:
            pass
    for fn2 in (lambda: parse_networks(text), lambda: parse_routes(text, ["10.0.0.1@tcp"]), lambda: check_ip2nets(text),
                lambda: ip2nets_networks(text, HOST)):
        try:
            fn2()
        except ConfigError:
            pass


@FUZZ
@given(value=VALUES)
def test_validators(value: Any) -> None:
    for fn in (lambda: as_int(value, "w"), lambda: as_float(value, "w"), lambda: as_mode(value, "w"), lambda: as_address(value, "w"),
               lambda: parse_key(value, "w"), lambda: parse_rate(value, "w", allow_unlimited=True)):
        try:
            out = fn()
        except ConfigError:
            continue
        if isinstance(out, float):
            assert math.isfinite(out)
