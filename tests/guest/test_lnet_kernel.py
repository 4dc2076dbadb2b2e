"""Two kernel LNet nodes on one LAN, nothing of lu2k between them: the bed checked on its own.

Lustre's own modules (built by contrib/kernel-tests/lnetbuild.py) in two TCG guests: they must
ping each other with ``lnetctl ping`` and run lnet_selftest bulk write/read with full data
checks and pings with zero errors, or nothing the lu2kd tests see can be trusted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from guestutil import bed_module

lb = bed_module()


@pytest.fixture(scope="module")
def kernel_lan(lnet_bed: Any, lnet_build: dict[str, Any]) -> Iterator[tuple[Any, Any, str, str]]:
    """Guests a and b on one bridge, each with one NI on net ``tcp``."""
    lnet_bed.join()
    mods = lb.module_paths(lnet_build)
    a, b = lnet_bed.guests["a"], lnet_bed.guests["b"]
    try:
        nid_a, nid_b = lb.on_all([a, b], lambda g: lb.configure_lnet(g, "tcp", mods))
        yield a, b, nid_a, nid_b
    finally:
        lnet_bed.split()


def test_kernel_nodes_ping_each_other(kernel_lan: tuple[Any, Any, str, str]) -> None:
    a, b, nid_a, nid_b = kernel_lan
    out = a.sh(f"lnetctl ping {nid_b}").out
    assert f"primary nid: {nid_b}" in out
    out = b.sh(f"lnetctl ping {nid_a}").out
    assert f"primary nid: {nid_a}" in out
    # A NID nobody has: the ping must fail, not hang, or the checks above prove nothing.
    res = a.sh("lnetctl ping --timeout 5 10.203.1.99@tcp", timeout=120, check=False)
    assert res.rc != 0, res.out


def test_lst_bulk_and_ping_between_kernel_nodes(kernel_lan: tuple[Any, Any, str, str], lnet_figures: dict[str, Any]) -> None:
    a, b, nid_a, nid_b = kernel_lan
    plan = lb.LstPlan(nid_a, nid_b, loops=16, concurrency=4)
    before = lb.lnet_counters(b)
    res = a.sh(plan.script(), timeout=plan.wait_s + 120)
    after = lb.lnet_counters(b)
    got = lb.parse_lst_output(res.out)
    lnet_figures["kernel_lan"] = {"plan": vars(plan), "lst": got, "server_counters_delta":
                                  {k: after[k] - before.get(k, 0) for k in after}}
    assert got["stopped"], res.out
    assert got["error_nodes"] == {"c": 0, "s": 0}, res.out
    assert got["bandwidth_mib_s"], res.out
    # Every write landed on b and every read left it (plus headers): the batch really ran.
    assert after["recv_length"] - before["recv_length"] >= plan.bytes_each_way()
    assert after["send_length"] - before["send_length"] >= plan.bytes_each_way()
