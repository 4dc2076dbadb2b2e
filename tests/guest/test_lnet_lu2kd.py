"""Kernel LNet nodes and lu2kd: lu2kd as the LNet router between two sites joined by a satellite hop.

Site A: kernel node a (10.203.1.10@tcp) and lu2kd-A (10.203.1.1@tcp); site B: kernel node b
(10.203.2.10@tcp1) and lu2kd-B (10.203.2.1@tcp1); lu2kd-A and lu2kd-B joined by the lab's
emulated GEO link (20 Mbit/s, 600 ms RTT, 1 % loss each way) over an lu2k backend
(``LU2K_LNET_BACKEND``, a comma-separated list; default tcp, and tcp, quic and udt in the long
run: every test below runs once per backend).  The kernel nodes are set up with stock lnetctl commands
only: ``lnetctl net add`` and ``lnetctl route add --net <far net> --gateway <own lu2kd>``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from guestutil import bed_module
from lnetsites import Sites, hop_backends

from lu2k.lab.spec import build_specs

lb = bed_module()
LONG = os.environ.get("LU2K_LNET_LONG") == "1"
# Extra options for the hop's lu2k backend, as JSON (e.g. '{"dead_timeout": 15}').
HOP_OPTIONS: dict[str, Any] = json.loads(os.environ.get("LU2K_LNET_HOP_OPTIONS") or "{}")
PING = "lnetctl ping --timeout 30"


@pytest.fixture(scope="module", params=hop_backends())
def sites(request: pytest.FixtureRequest, lnet_bed: Any, lnet_build: dict[str, Any], lnet_out: Any) -> Iterator[Sites]:
    backend = str(request.param)
    lnet_bed.split()
    workdir = lnet_out / f"sites-{backend}"
    workdir.mkdir(parents=True, exist_ok=True)
    s = Sites.up(build_specs("geo", loss="1%"), lnet_bed, workdir, backend=backend, hop_options=HOP_OPTIONS)
    mods = lb.module_paths(lnet_build)
    a, b = lnet_bed.guests["a"], lnet_bed.guests["b"]
    try:
        lb.on_all([a, b], lambda g: lb.configure_lnet(g, "tcp" if g is a else "tcp1", mods))
        a.sh(f"lnetctl route add --net tcp1 --gateway {s.lan_nid('a')}", timeout=60)
        b.sh(f"lnetctl route add --net tcp --gateway {s.lan_nid('b')}", timeout=60)
        yield s
    finally:
        for side in ("a", "b"):
            print(f"--- lu2kd-{side} log tail ---\n{s.log_tail(side)}")
        s.close(lnet_bed)


def wait_for(guest: Any, script: str, pattern: str, timeout: float = 180.0) -> str:
    """Run ``script`` until its output matches ``pattern`` (LNet's router checker works on its own clock)."""
    deadline = time.monotonic() + timeout
    while True:
        res = guest.sh(script, timeout=60, check=False)
        if re.search(pattern, res.out, re.M):
            return str(res.out)
        if time.monotonic() > deadline:
            raise AssertionError(f"{script!r} never showed {pattern!r}; last output:\n{res.out}{res.err}")
        time.sleep(3)


def test_kernel_node_pings_its_lu2kd(lnet_bed: Any, sites: Sites) -> None:
    for side in ("a", "b"):
        out = lnet_bed.guests[side].sh(f"{PING} {sites.lan_nid(side)}", timeout=90).out
        assert f"primary nid: {sites.lan_nid(side)}" in out, out


def test_lu2kd_pings_the_kernel_node(lnet_bed: Any, sites: Sites) -> None:
    # The other way round: lu2kd's own LNet ping (a GET to the node's ping target, its REPLY
    # back), through lu2kctl, for ping and for discover.
    for side, net in (("a", "tcp"), ("b", "tcp1")):
        node = f"{lnet_bed.guests[side].spec.ip}@{net}"
        for cmd in ("ping", "discover"):
            [res] = sites.ctl(side, cmd, node, "--timeout", "15")
            assert res["nid"] == node and res["primary_nid"] == node, res
            assert node in res["peer_nis"] and res["peer_ni_status"][node] == "up", res
            assert res["multi_rail"] and res["discovery"] and res["rtt_ms"] > 0, res
        [lan] = [n for n in sites.net_show(side) if n.get("backend") == "socklnd"]
        [peer] = [p for p in lan["peers"] if p["nid"] == node]
        assert peer["nis"][node] == "up", peer


def test_kernel_node_discovers_its_lu2kd(lnet_bed: Any, sites: Sites) -> None:
    a = lnet_bed.guests["a"]
    out = a.sh(f"lnetctl discover {sites.lan_nid('a')}", timeout=90).out
    # lu2kd-A shows both its NIs: the LAN one and the one on the far net it routes to.
    assert f"primary nid: {sites.lan_nid('a')}" in out and "Multi-Rail: true" in out, out
    assert f"nid: {sites.lan_ips['a']}@tcp1" in out, out
    peers = a.sh(f"lnetctl peer show --nid {sites.lan_nid('a')} -v", timeout=60).out
    assert re.search(rf"nid: {re.escape(sites.lan_nid('a'))}\n\s+state: up", peers), peers


def test_route_through_lu2kd_is_up(lnet_bed: Any, sites: Sites) -> None:
    out = wait_for(lnet_bed.guests["a"], "lnetctl route show -v", r"state: up")
    assert f"gateway: {sites.lan_nid('a')}" in out and "net: tcp1" in out, out


def test_ping_end_to_end_across_the_hop(lnet_bed: Any, sites: Sites) -> None:
    a, b = lnet_bed.guests["a"], lnet_bed.guests["b"]
    wait_for(a, "lnetctl route show -v", r"state: up")
    wait_for(b, "lnetctl route show -v", r"state: up")
    out = a.sh(f"{PING} {b.spec.ip}@tcp1", timeout=120).out
    assert f"primary nid: {b.spec.ip}@tcp1" in out, out
    out = b.sh(f"{PING} {a.spec.ip}@tcp", timeout=120).out
    assert f"primary nid: {a.spec.ip}@tcp" in out, out


def test_lst_across_the_hop(lnet_bed: Any, sites: Sites, lnet_figures: dict[str, Any]) -> None:
    a, b = lnet_bed.guests["a"], lnet_bed.guests["b"]
    wait_for(a, "lnetctl route show -v", r"state: up")
    plan = lb.LstPlan(f"{a.spec.ip}@tcp", f"{b.spec.ip}@tcp1", size="1M", loops=32 if LONG else 4, concurrency=4,
                      pings=HOP_PINGS, stat_samples=6 if LONG else 3, stat_delay=10)
    before = lb.lnet_counters(b)
    lab_before = sites.lab.stats()
    res = a.sh(plan.script(), timeout=plan.wait_s + 120)
    after = lb.lnet_counters(b)
    got = lb.parse_lst_output(res.out)
    lnet_figures[f"routed_{sites.backend}"] = {
        "plan": vars(plan), "lst": got, "link": "geo 20mbit 600ms 1% loss", "hop_options": HOP_OPTIONS,
        "server_counters_delta": {k: after[k] - before.get(k, 0) for k in after},
        "lab_before": lab_before.get("links"), "lab_after": sites.lab.stats().get("links"),
    }
    assert got["stopped"], res.out
    assert got["error_nodes"] == {"c": 0, "s": 0}, res.out
    assert after["recv_length"] - before["recv_length"] >= plan.bytes_each_way()
    assert after["send_length"] - before["send_length"] >= plan.bytes_each_way()


# --- faults: the kernel nodes see failures LNet handles (no hang, no corruption), then traffic resumes ---

FAULT_TRANSACTION_TIMEOUT = 20  # s; LNet's default 150 would make every outage test last minutes
# lst loops of the batch a fault interrupts (short run): 6 × 4 × 2 MiB still has traffic crossing
# the 20 Mbit/s hop before, during and after the fault; more loops only lengthen the run.
FAULT_LOOPS = 6
# lst pings run one at a time: 100 of them take a minute at GEO's 600 ms RTT, the longest part
# of every short session across the hop. 25 still check that pings cross (the long run keeps 100).
HOP_PINGS = 100 if LONG else 25


@pytest.fixture(scope="module")
def short_timeouts(lnet_bed: Any, sites: Sites) -> None:
    """Stock lnetctl: a shorter LNet transaction timeout on both nodes (LNet derives lnd_timeout from it),
    and the same on both lu2kd gateways, as an operator sets it on kernel routers: a gateway that
    held messages longer than the nodes wait for them would deliver them after their senders gave up."""
    for g in lnet_bed.guests.values():
        g.sh(f"lnetctl set transaction_timeout {FAULT_TRANSACTION_TIMEOUT}", timeout=60)
    for side in ("a", "b"):
        sites.configs[side].setdefault("global", {})["transaction_timeout"] = FAULT_TRANSACTION_TIMEOUT  # kept across a restart
        sites.ctl(side, "set", "transaction_timeout", str(FAULT_TRANSACTION_TIMEOUT))


def wait_for_hop_traffic(sites: Sites, packets: int, timeout: float = 240.0) -> None:
    """Until the emulated link has carried ``packets`` more packets a->b (progress seen by the lab)."""
    start = sites.lab.stats()["links"]["ab"]["packets_out"]
    deadline = time.monotonic() + timeout
    while sites.lab.stats()["links"]["ab"]["packets_out"] < start + packets:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {packets} packets crossed the hop in {timeout:.0f} s")
        time.sleep(0.2)


RESUME_ATTEMPTS = 3


def assert_traffic_resumes(lnet_bed: Any, sites: Sites, figures: dict[str, Any]) -> None:
    """Routes up again, pings end to end, then a fresh lst session with full checks and no error.

    Messages caught in the fault may still be timing out (LNet's and lu2k's transaction timeouts)
    when the first session starts, so up to RESUME_ATTEMPTS sessions run, a transaction timeout
    apart (a session that fails at once would otherwise retry inside the same window); every
    one is recorded.  The sessions take the nodes over (``--force``): the faulted session's
    end may not have reached the far node, which would refuse a new session until it expires.
    Neither kernel may ever log an lnet_selftest data-corruption message.
    """
    a, b = lnet_bed.guests["a"], lnet_bed.guests["b"]
    started = time.monotonic()
    wait_for(a, "lnetctl route show -v", r"state: up", timeout=300)
    wait_for(b, "lnetctl route show -v", r"state: up", timeout=300)
    figures["routes_up_after_s"] = round(time.monotonic() - started, 1)
    wait_for(a, f"{PING} {b.spec.ip}@tcp1", rf"primary nid: {re.escape(b.spec.ip)}@tcp1", timeout=300)
    wait_for(b, f"{PING} {a.spec.ip}@tcp", rf"primary nid: {re.escape(a.spec.ip)}@tcp", timeout=300)
    figures["pings_after_s"] = round(time.monotonic() - started, 1)
    plan = lb.LstPlan(f"{a.spec.ip}@tcp", f"{b.spec.ip}@tcp1", loops=2, concurrency=4, pings=HOP_PINGS, stat_samples=1,
                      stat_delay=5, force=True)
    attempts: list[dict[str, Any]] = []
    figures["after"] = attempts
    figures["hop_tcp_after"] = sites.hop_sockets("a")
    for _ in range(RESUME_ATTEMPTS):
        res = a.sh(plan.script(), timeout=plan.wait_s + 120, check=False)
        got = lb.parse_lst_output(res.out)
        got["seconds"] = round(res.seconds, 1)
        attempts.append(got)
        if got["stopped"] and got["error_nodes"] == {"c": 0, "s": 0}:
            break
        # What the next reader of a failure needs: lst's own words and both daemons' view of the hop.
        got["output_tail"] = (res.out + res.err)[-3000:]
        got["peers"] = {side: sites.ctl(side, "peer", "show") for side in ("a", "b")}
        if len(attempts) < RESUME_ATTEMPTS:
            time.sleep(FAULT_TRANSACTION_TIMEOUT)
    for g in (a, b):
        assert lb.corruption_reports(g) == []
    assert attempts[-1]["stopped"] and attempts[-1]["error_nodes"] == {"c": 0, "s": 0}, \
        "\n---\n".join(str(t.get("output_tail", ""))[-1200:] for t in attempts)


def test_lu2kd_b_restarted_mid_lst(lnet_bed: Any, sites: Sites, short_timeouts: None, lnet_figures: dict[str, Any]) -> None:
    a, b = lnet_bed.guests["a"], lnet_bed.guests["b"]
    plan = lb.LstPlan(f"{a.spec.ip}@tcp", f"{b.spec.ip}@tcp1", loops=48 if LONG else FAULT_LOOPS, concurrency=4, pings=HOP_PINGS, stat_samples=1,
                      stat_delay=5, wait_s=900)
    ticket = a.submit(plan.script(), timeout=plan.wait_s + 120)
    wait_for_hop_traffic(sites, 2000)
    down_at = time.monotonic()
    sites.stop("b")
    sites.start("b")
    restart_s = time.monotonic() - down_at
    res = a.wait(ticket, check=False)  # the batch ends by itself: no hang
    got = lb.parse_lst_output(res.out)
    fig: dict[str, Any] = {"plan": vars(plan), "restart_s": round(restart_s, 1), "during": got, "lst_rc": res.rc,
                           "batch_ended_after_restart_s": round(time.monotonic() - down_at, 1)}
    lnet_figures[f"fault_restart_{sites.backend}"] = fig
    assert got["stopped"], res.out
    assert_traffic_resumes(lnet_bed, sites, fig)


def test_link_down_longer_than_lnet_timeouts(lnet_bed: Any, sites: Sites, short_timeouts: None, lnet_figures: dict[str, Any]) -> None:
    a, b = lnet_bed.guests["a"], lnet_bed.guests["b"]
    outage_s = 200.0 if LONG else 2.5 * FAULT_TRANSACTION_TIMEOUT
    plan = lb.LstPlan(f"{a.spec.ip}@tcp", f"{b.spec.ip}@tcp1", loops=48 if LONG else FAULT_LOOPS, concurrency=4, pings=HOP_PINGS, stat_samples=1,
                      stat_delay=5, wait_s=900)
    ticket = a.submit(plan.script(), timeout=plan.wait_s + 120)
    wait_for_hop_traffic(sites, 2000)
    sites.lab.set_link(False)
    down_at = time.monotonic()
    try:
        # During the outage a ping across fails within its timeout: LNet reports it, nothing hangs.
        res = b.sh(f"lnetctl ping --timeout 10 {a.spec.ip}@tcp", timeout=120, check=False)
        ping_during = {"rc": res.rc, "out": res.out.strip(), "err": res.err.strip(), "seconds": res.seconds}
        # lu2kd-A now tells the kernel (in its ping replies) that its NI on the far net is down.
        far_ni = f"{sites.lan_ips['a']}@tcp1"
        far_down_after = None
        while time.monotonic() - down_at < outage_s:
            if far_down_after is None and sites.remote_ni_status("a").get(far_ni) == "down":
                far_down_after = round(time.monotonic() - down_at, 1)
            time.sleep(1.0)
        routes_during = a.sh("lnetctl route show -v", timeout=60).out
    finally:
        sites.lab.set_link(True)
    res = a.wait(ticket, check=False)
    got = lb.parse_lst_output(res.out)
    fig: dict[str, Any] = {"plan": vars(plan), "outage_s": outage_s, "transaction_timeout_s": FAULT_TRANSACTION_TIMEOUT,
                           "batch_ended_after_link_down_s": round(time.monotonic() - down_at, 1),
                           "ping_during": ping_during, "far_ni_down_after_s": far_down_after, "routes_during": routes_during,
                           "during": got, "lst_rc": res.rc}
    lnet_figures[f"fault_link_down_{sites.backend}"] = fig
    assert ping_during["rc"] != 0, ping_during
    assert far_down_after is not None, f"lu2kd-A still advertised {far_ni} up after {outage_s:.0f} s without a link"
    assert got["stopped"], res.out
    assert_traffic_resumes(lnet_bed, sites, fig)
