"""o2ib (verbs) backend, pure parts: the side-channel setup messages and GID choice.

The RDMA data path needs an RDMA device (soft-RoCE in the kernel-test guest:
tests/guest/test_verbs_guest.py).
"""

from __future__ import annotations

import json

import pytest

from lu2k.backends import availability, get_backend
from lu2k.backends.verbs import VerbsBackend, choose_gid_index, decode_setup, encode_setup, ipv4_mapped_gid
from lu2k.errors import ConnectError, RemoteProtocolError

GOOD = {"qpn": 17, "psn": 123456, "gid": "0000:0000:0000:0000:0000:ffff:7f00:0001", "mtu": 3, "slot_size": 65536, "slots": 32}


def test_setup_line_round_trip() -> None:
    line = encode_setup(GOOD)
    assert line.endswith(b"\n") and json.loads(line)["v"] == 1
    assert decode_setup(line) == {"v": 1, **GOOD}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"qpn": 0}, "qpn=0"),
        ({"psn": 1 << 24}, "psn="),
        ({"mtu": 9}, "mtu=9"),
        ({"slot_size": 10}, "slot_size=10"),
        ({"slots": "32"}, "slots='32'"),
        ({"gid": "fe80::1"}, "not a GID"),
    ],
)
def test_bad_setup_fields_are_named(change: dict, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_setup(encode_setup({**GOOD, **change}))


def test_setup_garbage_and_version() -> None:
    with pytest.raises(RemoteProtocolError, match="not JSON"):
        decode_setup(b"SSH-2.0-OpenSSH\r\n")
    with pytest.raises(RemoteProtocolError, match="unknown version"):
        decode_setup(json.dumps({**GOOD, "v": 2}).encode())


def test_ipv4_mapped_gid_matches_pyverbs_format() -> None:
    assert ipv4_mapped_gid("127.0.0.1") == "0000:0000:0000:0000:0000:ffff:7f00:0001"
    assert ipv4_mapped_gid("10.201.0.2") == "0000:0000:0000:0000:0000:ffff:0ac9:0002"
    assert ipv4_mapped_gid("::1") is None and ipv4_mapped_gid("not an ip") is None


def test_choose_gid_prefers_our_roce_v2_address() -> None:
    zero = "0000:0000:0000:0000:0000:0000:0000:0000"
    link_local = "fe80:0000:0000:0000:0200:00ff:fe00:0000"
    v4 = ipv4_mapped_gid("10.1.0.1")
    other = ipv4_mapped_gid("10.2.0.1")
    assert v4 is not None and other is not None
    loopback6 = "0000:0000:0000:0000:0000:0000:0000:0001"
    table = [(0, link_local, False), (1, link_local, True), (2, other, True), (3, v4, False), (4, v4, True), (5, zero, True)]
    assert choose_gid_index(table, "10.1.0.1") == 4
    assert choose_gid_index(table, "192.0.2.1") == 2  # no match: an IPv4-mapped v2 GID
    # soft-RoCE over lo: link-local first in the table, but never chosen over a routable GID.
    rxe_lo = [(0, link_local, True), (1, ipv4_mapped_gid("127.0.0.1"), True), (2, loopback6, True)]
    assert choose_gid_index(rxe_lo, "127.0.0.2") == 1
    assert choose_gid_index([(0, link_local, True), (2, loopback6, True)], None) == 2
    assert choose_gid_index([(0, link_local, False)], None) == 0
    with pytest.raises(ConnectError, match="no usable GID"):
        choose_gid_index([(0, zero, True)], "10.1.0.1")


def test_registry_and_availability_explain_missing_rdma() -> None:
    assert get_backend("o2ib") is VerbsBackend
    reason = VerbsBackend.probe()
    if reason is None:
        pytest.skip("this machine has an RDMA device; the guest tier covers the real backend")
    assert availability()["o2ib"] == reason
    assert "RDMA" in reason or "pyverbs" in reason
