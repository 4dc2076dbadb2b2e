"""Scale-out: two lu2kd gateways at site A, the kernel node routing the far net through both at
equal priority; one gateway killed mid-run, the node carrying on through the other by LNet's own
means (router health, resends), as a site that outgrew one gateway runs.

Site A: kernel node a (10.203.1.10@tcp), lu2kd-A (10.203.1.1@tcp) and lu2kd-A2 (10.203.1.2@tcp);
site B: kernel node b (10.203.2.10@tcp1) and lu2kd-B (10.203.2.1@tcp1), which routes ``tcp``
back through both A gateways.  The hop: the lab's emulated LEO link (50 Mbit/s, 40 ms RTT,
0.5 % loss) over each of ``LU2K_LNET_BACKEND`` (as in test_lnet_lu2kd) -- a shorter RTT than the GEO tests, so the
run stays short on TCG guests; the behaviour under test is LNet's choice among gateways.  The
kernel nodes use stock lnetctl only.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from guestutil import bed_module
from lnetsites import Sites, hop_backends
from test_lnet_lu2kd import PING, wait_for, wait_for_hop_traffic

from lu2k.lab.spec import build_specs

lb = bed_module()
LONG = os.environ.get("LU2K_LNET_LONG") == "1"
A2_LAN_IP = "10.203.1.2"
A2_HOP_OCTET = 3  # lu2kd-A2's hop address: lu2kd-A's with this last octet
TRANSACTION_TIMEOUT = 20  # s on both nodes (stock lnetctl); LNet's 150 s default would make the kill test last minutes


@pytest.fixture(scope="module", params=hop_backends())
def scaled(request: pytest.FixtureRequest, lnet_bed: Any, lnet_build: dict[str, Any], lnet_out: Any) -> Iterator[Sites]:
    backend = str(request.param)
    lnet_bed.split()
    workdir = lnet_out / f"scaleout-{backend}"
    workdir.mkdir(parents=True, exist_ok=True)
    s = Sites.up(build_specs("leo", loss="0.5%"), lnet_bed, workdir, backend=backend, spare_hop_octets={"a": [A2_HOP_OCTET]})
    mods = lb.module_paths(lnet_build)
    a, b = lnet_bed.guests["a"], lnet_bed.guests["b"]
    try:
        s.add_gateway("a", "a2", A2_LAN_IP, A2_HOP_OCTET)
        lb.on_all([a, b], lambda g: lb.configure_lnet(g, "tcp" if g is a else "tcp1", mods))
        for g in (a, b):
            g.sh(f"lnetctl set transaction_timeout {TRANSACTION_TIMEOUT}", timeout=60)
        # Two gateways of equal (default) priority for the far net: LNet spreads over both.
        a.sh(f"lnetctl route add --net tcp1 --gateway {s.lan_nid('a')} && "
             f"lnetctl route add --net tcp1 --gateway {s.lan_nid('a2')}", timeout=60)
        b.sh(f"lnetctl route add --net tcp --gateway {s.lan_nid('b')}", timeout=60)
        yield s
    finally:
        for side in ("a", "a2", "b"):
            print(f"--- lu2kd-{side} log tail ---\n{s.log_tail(side)}")
        s.close(lnet_bed)


def route_states(guest: Any) -> dict[str, str]:
    """``lnetctl route show -v``: gateway NID -> state."""
    out = guest.sh("lnetctl route show -v", timeout=60).out
    return dict(re.findall(r"gateway: (\S+)\n(?:\s+\w[^\n]*\n)*?\s+state: (\w+)", out))


def wait_routes(guest: Any, want: dict[str, str], timeout: float = 300.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        states = route_states(guest)
        if all(states.get(gw) == st for gw, st in want.items()):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"routes never became {want}: {states}")
        time.sleep(3)


def test_both_gateways_carry_traffic(lnet_bed: Any, scaled: Sites, lnet_figures: dict[str, Any]) -> None:
    a, b = lnet_bed.guests["a"], lnet_bed.guests["b"]
    gw_a, gw_a2 = scaled.lan_nid("a"), scaled.lan_nid("a2")
    wait_routes(a, {gw_a: "up", gw_a2: "up"})
    before = {s: scaled.socklnd_stats(s).get("forwarded", 0) for s in ("a", "a2")}
    plan = lb.LstPlan(f"{a.spec.ip}@tcp", f"{b.spec.ip}@tcp1", size="1M", loops=8 if LONG else 4, concurrency=4,
                      stat_samples=2, stat_delay=5)
    res = a.sh(plan.script(), timeout=plan.wait_s + 120)
    got = lb.parse_lst_output(res.out)
    forwarded = {s: scaled.socklnd_stats(s).get("forwarded", 0) - before[s] for s in ("a", "a2")}
    lnet_figures[f"scaleout_share_{scaled.backend}"] = {"plan": vars(plan), "lst": got, "forwarded_by_gateway": forwarded,
                                                "link": "leo 50mbit 40ms 0.5% loss"}
    assert got["stopped"] and got["error_nodes"] == {"c": 0, "s": 0}, res.out
    # Both gateways forwarded part of node a's traffic: LNet spread it over the two routes.
    assert forwarded["a"] > 0 and forwarded["a2"] > 0, forwarded


def test_one_gateway_killed_the_node_carries_on(lnet_bed: Any, scaled: Sites, lnet_figures: dict[str, Any]) -> None:
    a, b = lnet_bed.guests["a"], lnet_bed.guests["b"]
    gw_a, gw_a2 = scaled.lan_nid("a"), scaled.lan_nid("a2")
    wait_routes(a, {gw_a: "up", gw_a2: "up"})
    plan = lb.LstPlan(f"{a.spec.ip}@tcp", f"{b.spec.ip}@tcp1", size="1M", loops=24 if LONG else 8, concurrency=4,
                      stat_samples=1, stat_delay=5, wait_s=900)
    ticket = a.submit(plan.script(), timeout=plan.wait_s + 120)
    wait_for_hop_traffic(scaled, 1500)
    scaled.kill("a2")  # SIGKILL: its LAN and hop connections reset, what it held is lost
    res = a.wait(ticket, check=False)  # the batch ends by itself: no hang
    during = lb.parse_lst_output(res.out)
    states = wait_routes(a, {gw_a: "up", gw_a2: "down"})
    # With A2 dead and marked down, pings and a fresh lst session go through A alone, without an error.
    pings = [a.sh(f"{PING} {b.spec.ip}@tcp1", timeout=90, check=False).rc for _ in range(5)]
    after_plan = lb.LstPlan(f"{a.spec.ip}@tcp", f"{b.spec.ip}@tcp1", size="1M", loops=4, concurrency=4, stat_samples=1, stat_delay=5)
    after_res = a.sh(after_plan.script(), timeout=after_plan.wait_s + 120, check=False)
    after = lb.parse_lst_output(after_res.out)
    corruption = [ln for g in (a, b) for ln in lb.corruption_reports(g)]
    lnet_figures[f"scaleout_kill_{scaled.backend}"] = {"plan": vars(plan), "during": during, "lst_rc": res.rc, "routes_after": states,
                                               "pings_after_rc": pings, "after": after}
    assert during["stopped"], res.out
    assert corruption == []
    assert pings == [0] * 5, pings
    assert after["stopped"] and after["error_nodes"] == {"c": 0, "s": 0}, after_res.out
    out = wait_for(a, f"{PING} {b.spec.ip}@tcp1", rf"primary nid: {re.escape(b.spec.ip)}@tcp1")
    assert out
