"""The anchor: the same ``lst`` run as test_lnet_lu2kd's, routed by a *kernel* LNet router over
plain kernel TCP on the same emulated satellite link, for comparison with lu2k's figures.

Three guests: a (10.203.1.10@tcp), b (10.203.2.10@tcp1) and the router r (10.203.1.20, one NI
on ``tcp`` and one on ``tcp1`` over the same NIC, ``lnetctl set routing 1``), all with stock
lnetctl only.  r sits on site a's bridge; b reaches it through the lab: the lab's namespaces
forward IP between the bridges' legs and the lab's link (GEO: 20 Mbit/s, 600 ms RTT, 1 % loss
each way), answering ARP for the far site's addresses (proxy ARP), so every byte between r
and b crosses the emulated link in kernel TCP -- where lu2k's run carries it over an lu2k
backend between two lu2kd.

A third TCG guest on a shared 2-core machine is heavy, so this runs only when asked:
``LU2K_LNET_ANCHOR=1 LU2K_LNET_PYTEST="-k anchor" contrib/kernel-tests/run lnet``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guestutil import bed_module

from lu2k.lab.netns import Lab
from lu2k.lab.spec import build_specs

lb = bed_module()
LONG = os.environ.get("LU2K_LNET_LONG") == "1"

pytestmark = pytest.mark.skipif(os.environ.get("LU2K_LNET_ANCHOR") != "1",
                                reason="the kernel-router anchor boots a third guest: set LU2K_LNET_ANCHOR=1 to run it")


def run_ip(*argv: str) -> None:
    res = subprocess.run(list(argv), capture_output=True, text=True)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {res.stderr.strip()}")


def route_sites_through_lab(lab: Lab) -> None:
    """IP forwarding between each site's bridge leg and the lab link, with proxy ARP on the legs
    (the guests' /16 makes the far site look on-link)."""
    far = {"a": f"{lb.SUBNET}.2.0/24", "b": f"{lb.SUBNET}.1.0/24"}
    for side in ("a", "b"):
        ns, tun, leg = lab.ns(side), lab.state.dev[side], f"lgl{side}"
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{leg}.rp_filter=0",
                    f"net.ipv4.conf.{tun}.rp_filter=0", f"net.ipv4.conf.{leg}.proxy_arp=1"):
            run_ip("ip", "netns", "exec", ns, "sysctl", "-qw", key)
        run_ip("ip", "-n", ns, "route", "add", far[side], "dev", tun)


@pytest.fixture(scope="module")
def anchor(lnet_out: Path, lnet_build: dict[str, Any]) -> Iterator[tuple[Any, Lab]]:
    bed = lb.Bed(vng=os.environ["LU2K_KT_VNG"], vmlinuz=Path(os.environ["LU2K_KT_VMLINUZ"]),
                 repo=Path(__file__).resolve().parents[2], python=sys.executable, build=lnet_build,
                 workdir=lnet_out / "anchor-bed", sides=("a", "b", "r"), memory=os.environ.get("LU2K_LNET_MEMORY", "768M"))
    lab: Lab | None = None
    try:
        bed.create()
        lab = Lab(build_specs("geo", loss="1%"), lab_id=f"lg{secrets.token_hex(3)}").up()
        for side in ("a", "b"):
            bed.attach(side, lab.ns(side))
        route_sites_through_lab(lab)
        bed.boot()
        mods = lb.module_paths(lnet_build)
        guests = list(bed.guests.values())
        lb.on_all(guests, lambda g: lb.load_lnet(g, mods))
        a, b, r = bed.guests["a"], bed.guests["b"], bed.guests["r"]
        lb.on_all([a, b], lambda g: lb.configure_lnet(g, "tcp" if g is a else "tcp1", mods))
        # LNet's default router pools (512 large 1 MiB buffers...) do not fit a 768 MiB guest
        # ("cannot enable routing: Cannot allocate memory"): reload lnet on r with smaller ones.
        r.sh("rmmod ksocklnd && rmmod lnet && "
             f"insmod {mods['lnet']} large_router_buffers=64 small_router_buffers=1024 tiny_router_buffers=1024 && "
             f"insmod {mods['ksocklnd']}", timeout=180)
        r.sh("lnetctl lnet configure && "
             f"lnetctl net add --net tcp --if {r.iface} && lnetctl net add --net tcp1 --if {r.iface} && "
             "lnetctl set routing 1", timeout=180)
        a.sh(f"lnetctl route add --net tcp1 --gateway {r.spec.ip}@tcp", timeout=60)
        b.sh(f"lnetctl route add --net tcp --gateway {r.spec.ip}@tcp1", timeout=60)
        yield bed, lab
    finally:
        bed.close()
        for side in ("a", "b"):
            bed.detach(side)
        if lab is not None:
            lab.down()


def test_anchor_lst_through_a_kernel_router_on_the_geo_link(anchor: tuple[Any, Lab], lnet_figures: dict[str, Any]) -> None:
    from test_lnet_lu2kd import PING, wait_for

    bed, lab = anchor
    a, b = bed.guests["a"], bed.guests["b"]
    wait_for(a, "lnetctl route show -v", r"state: up", timeout=300)
    wait_for(b, "lnetctl route show -v", r"state: up", timeout=300)
    out = a.sh(f"{PING} {b.spec.ip}@tcp1", timeout=120).out
    assert f"primary nid: {b.spec.ip}@tcp1" in out, out
    # The same plan as test_lnet_lu2kd.test_lst_across_the_hop.
    plan = lb.LstPlan(f"{a.spec.ip}@tcp", f"{b.spec.ip}@tcp1", size="1M", loops=32 if LONG else 4, concurrency=4,
                      pings=100 if LONG else 25, stat_samples=6 if LONG else 3, stat_delay=10)
    before = lb.lnet_counters(b)
    lab_before = lab.stats()
    res = a.sh(plan.script(), timeout=plan.wait_s + 120)
    after = lb.lnet_counters(b)
    got = lb.parse_lst_output(res.out)
    lab_after = lab.stats()
    lnet_figures["routed_kernel_router"] = {
        "plan": vars(plan), "lst": got, "link": "geo 20mbit 600ms 1% loss",
        "server_counters_delta": {k: after[k] - before.get(k, 0) for k in after},
        "lab_before": lab_before.get("links"), "lab_after": lab_after.get("links"),
    }
    assert got["stopped"], res.out
    # Errors here are a figure of the kernel router on the lossy link (recorded above and in
    # the measurements page), not a property of lu2k: the anchor only has to have run.
    assert set(got["error_nodes"]) == {"c", "s"}, res.out
    assert after["recv_length"] - before["recv_length"] >= plan.bytes_each_way()
    # The bulk really crossed the emulated link (not some other path between the bridges).
    assert lab_after["links"]["ab"]["bytes_out"] - lab_before["links"]["ab"]["bytes_out"] >= plan.bytes_each_way()
