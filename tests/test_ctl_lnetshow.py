"""lu2k.cli.lnetshow (pure): lnetctl's YAML layout reads back as the same data for any text and
numbers, and the show builders keep lnetctl's keys and detail levels."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lu2k.cli import lnetshow

scalars = st.one_of(st.text(max_size=20), st.integers(min_value=-(2**63), max_value=2**63), st.booleans(),
                    st.floats(allow_nan=False, allow_infinity=False))
keys = st.one_of(st.text(min_size=1, max_size=12), st.integers(min_value=0, max_value=9))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
                         max_leaves=20)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), documents, min_size=1, max_size=3))
def test_dump_reads_back_as_the_same_data(doc: dict[str, Any]) -> None:
    assert yaml.safe_load(lnetshow.dump(doc)) == doc


def test_layout_is_lnetctls() -> None:
    text = lnetshow.dump({"net": [{"net type": "tcp", "local NI(s)": [{"nid": "10.0.0.1@tcp", "status": "up",
                                                                        "interfaces": {0: "eth0"}}]}]})
    assert text == ("net:\n"
                    "    - net type: tcp\n"
                    "      local NI(s):\n"
                    "        - nid: 10.0.0.1@tcp\n"
                    "          status: up\n"
                    "          interfaces:\n"
                    "              0: eth0\n")


NET = {"net": "tcp", "nid": "10.0.0.1@tcp", "status": "up", "backend": "tcp", "listen": "10.0.0.1:988",
       "tunables": {"peer_timeout": 180, "peer_credits": 8, "credits": 256}, "credits": {"tx": 250, "max_tx": 256, "min_tx": -3},
       "max_message_size": 4194304, "profile": {"rtt_ms": 600}, "backend_settings": {"congestion": "bbr"}}
PEER = {"nid": "10.0.0.2@tcp", "net": "tcp", "state": "connecting", "health": 900, "tx_credits": 6, "max_tx_credits": 8,
        "min_tx_credits": 2, "queued": 4, "in_flight": 2, "delivered": 10, "failed": 1, "last_error": "refused", "connections": {}}


def test_net_show_levels() -> None:
    plain = lnetshow.net_show([NET], [PEER])
    assert plain["net"][1] == {"net type": "tcp", "local NI(s)": [{"nid": "10.0.0.1@tcp", "status": "up"}]}
    ni = lnetshow.net_show([NET], [PEER], detail=1, net="tcp")["net"][0]["local NI(s)"][0]
    assert ni["statistics"] == {"send_count": 11, "drop_count": 1}
    assert ni["tunables"] == {"peer_timeout": 180, "peer_credits": 8, "peer_buffer_credits": 0, "credits": 256}
    assert ni["lu2k"]["min_tx_credits"] == -3 and "health stats" not in ni
    assert "derived from profile" not in ni["lu2k"]  # nothing was derived
    derived = {"bdp_bytes": 1_500_000, "peer_credits": 46, "credits": 256, "window_bytes": 46 << 16, "socket_buffer": 3_000_000}
    ni = lnetshow.net_show([{**NET, "derived": derived}], [], detail=1, net="tcp")["net"][0]["local NI(s)"][0]
    assert ni["lu2k"]["derived from profile"] == derived
    assert lnetshow.net_show([NET], [], net="tcp1") == {"net": []}


def test_peer_show_levels() -> None:
    assert lnetshow.peer_show([PEER]) == {"peer": [{"primary nid": "10.0.0.2@tcp", "Multi-Rail": False,
                                                    "peer ni": [{"nid": "10.0.0.2@tcp", "state": "down"}]}]}
    p = lnetshow.peer_show([PEER], detail=3)["peer"][0]
    assert p["peer state"] == 0
    ni = p["peer ni"][0]
    assert (ni["max_ni_tx_credits"], ni["available_tx_credits"], ni["min_tx_credits"], ni["tx_q_num_of_buf"]) == (8, 6, 2, 4)
    assert ni["health stats"] == {"health value": 900} and ni["lu2k"]["last_error"] == "refused"


def test_stats_and_ping() -> None:
    s = lnetshow.stats_show({"msgs_sent": 5, "msgs_received": 4, "msgs_forwarded": 1, "duplicates": 2, "bytes_sent": 50,
                             "bytes_received": 40, "bad_frames": 1}, [PEER])["statistics"]
    assert (s["send_count"], s["recv_count"], s["route_count"], s["drop_count"], s["msgs_alloc"], s["errors"]) == (5, 4, 1, 2, 6, 2)
    item = lnetshow.ping_result({"nid": "10.0.0.2@tcp", "via": "10.0.0.2@tcp", "rtt_ms": 601.5})
    assert item == {"primary nid": "10.0.0.2@tcp", "Multi-Rail": False, "peer ni": [{"nid": "10.0.0.2@tcp"}], "lu2k": {"rtt_ms": 601.5}}


def test_ping_of_an_lnet_node_shows_its_primary_multi_rail_and_ni_status() -> None:
    # a kernel node on a socklnd LAN, pinged through one of its NIDs: the answer says which is primary
    res = {"nid": "10.0.1.2@tcp1", "primary_nid": "10.0.0.2@tcp", "rtt_ms": 0.4, "peer_nis": ["10.0.0.2@tcp", "10.0.1.2@tcp1"],
           "peer_ni_status": {"10.0.0.2@tcp": "up", "10.0.1.2@tcp1": "down"}, "multi_rail": False,
           "features": ["ni_status", "discovery"], "seqno": 9}
    item = lnetshow.ping_result(res)
    assert item == {"primary nid": "10.0.0.2@tcp", "Multi-Rail": False,
                    "peer ni": [{"nid": "10.0.0.2@tcp"}, {"nid": "10.0.1.2@tcp1"}],
                    "lu2k": {"rtt_ms": 0.4, "features": ["ni_status", "discovery"],
                             "ni status": {"10.0.0.2@tcp": "up", "10.0.1.2@tcp1": "down"}}}
    assert lnetshow.ping_result(res, 1)["lu2k"]["seqno"] == 9
