"""tcp, quic and udt between two namespaces over IPv6 only (root).

The lab (``Lab(..., ipv6=True)``) joins its namespaces by a 1500-byte-MTU path with 1 % loss
each way and gives each end an IPv6 address; each daemon's NID is that address
(``fd6c:7532:…::1@tcp``), so it listens and connects over IPv6 and nothing else.  Messages go
both ways and are checked for content and exactly-once delivery; the lab's counters prove the
traffic was IPv6 and was really lossy, and the namespaces' IPv6 statistics prove no datagram
was fragmented at the source -- the datagram sizes (QUIC's max datagram size, UDT's packet
size) left room for the 40-byte IPv6 header.

Link-local addresses with zones: two namespaces of the test's own, joined by a veth pair with
only link-local addresses; each daemon listens on ``fe80::…%dev`` and reaches its peer at
``[fe80::…%dev]:port`` (NIDs cannot be link-local, so the NIDs are ULA names that are not
configured anywhere: the addresses come only from ``listen:`` and the peer ``address:``).
"""

from __future__ import annotations

import os
import random
import secrets
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

from lu2k.backends import availability
from lu2k.nid import parse_nid
from e2e_support import HDR, Receiver, make_message

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

KEY = "ipv6-lab-test-key"
PORT = 7988


def ipv6_problem() -> str | None:
    if not os.path.exists("/proc/net/if_inet6"):
        return "this kernel has no IPv6 (no /proc/net/if_inet6)"
    try:
        with open("/proc/sys/net/ipv6/conf/default/disable_ipv6") as f:
            if f.read().strip() == "1":
                return "IPv6 is disabled by default here (net.ipv6.conf.default.disable_ipv6=1)"
    except OSError:
        pass
    return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    problem = ipv6_problem()
    if problem:
        pytest.skip(problem)
    from lu2k.lab.netns import Lab
    from lu2k.lab.spec import build_specs

    specs = build_specs("leo", rate="50mbit", rtt="20ms", loss="1%", seed=6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LU2K_LAB_DIR", str(tmp_path_factory.mktemp("labs")))
        with Lab(specs, f"v6{secrets.token_hex(2)}", ipv6=True) as lab:
            yield lab


def snmp6(lab: Any, side: str) -> dict[str, int]:
    out = lab.run(side, ["cat", "/proc/net/snmp6"], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}


def site_options(lab: Any, workdir: Path) -> dict[str, dict[str, Any]]:
    """Per-side QUIC certificates naming each end's IPv6 address (what the connector checks)."""
    from lu2k.certs import cert_pem, key_pem, make_certificate, make_key

    ca_key = make_key()
    ca = make_certificate(ca_key, "v6-lab-ca", is_ca=True)
    (workdir / "ca.crt").write_bytes(cert_pem(ca))
    out = {}
    for side in ("a", "b"):
        key = make_key()
        cert = make_certificate(key, f"v6-{side}", sans=[lab.address(side, ipv6=True)], issuer_cert=ca, issuer_key=ca_key)
        (workdir / f"{side}.crt").write_bytes(cert_pem(cert))
        (workdir / f"{side}.key").write_bytes(key_pem(key))
        os.chmod(workdir / f"{side}.key", 0o600)
        out[side] = {"cert": str(workdir / f"{side}.crt"), "key": str(workdir / f"{side}.key"), "ca": str(workdir / "ca.crt")}
    return out


def exchange(src: Any, dst: Any, sizes: list[int], seed: int) -> None:
    rnd = random.Random(seed)
    rx = Receiver(dst.shim_path, len(sizes), idle_timeout=90)
    rx.start()
    from lu2k.kernel_shim.endpoint import Endpoint

    with Endpoint.attach(src.shim_path, portal=1) as ep:
        comps = [ep.send(dst.nid, make_message(i, s, rnd), 0) for i, s in enumerate(sizes)]
        assert all(c.wait(150) for c in comps), "a completion never came"
        assert Counter(c.status for c in comps) == Counter({0: len(sizes)}), [(c.status, c.reason) for c in comps if c.status][:5]
    rx.join(90)
    assert rx.error is None, rx.error
    assert rx.corrupt == 0 and len(rx.seen) == len(sizes) and set(rx.seen.values()) == {1}
    assert rx.sources == {str(parse_nid(src.nid))}


@pytest.mark.parametrize("backend, fec", [("tcp", None), ("quic", None), ("quic", "10%"), ("udt", None)],
                         ids=["tcp", "quic", "quic-fec", "udt"])
def test_messages_both_ways_over_an_ipv6_lab_link_with_loss(backend: str, fec: str | None, lab: Any, tmp_path: Path) -> None:
    """With ``fec``, QUIC's datagrams are wrapped in FEC data frames and followed by repair
    frames: both must fit the path as well."""
    problem = availability().get(backend)
    if problem is not None:
        pytest.skip(f"{backend} backend unavailable: {problem}")
    import yaml

    from lu2k.localpair import DaemonProcess, daemon_config

    options = site_options(lab, tmp_path) if backend == "quic" else {"a": {}, "b": {}}
    if fec:
        pytest.importorskip("zfec")
        for side in options:
            options[side]["fec"] = fec
    procs = {}
    for side in ("a", "b"):
        nid = f"{lab.address(side, ipv6=True)}@{backend}"
        extra_net: dict[str, Any] = {"key": KEY, "profile": {"rtt_ms": 20, "rate_mbit": 50, "loss": 0.01}}
        if options[side]:
            extra_net["options"] = options[side]
        cfg = daemon_config(nid, PORT, tmp_path, backend=backend, extra_net=extra_net)
        path = tmp_path / f"lu2kd-{side}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        procs[side] = DaemonProcess(nid, path, cfg["lu2k"]["shim"]["path"], cfg["lu2k"]["control"]["path"], tmp_path / f"{side}.log")
    before = {side: snmp6(lab, side) for side in ("a", "b")}
    stats0 = lab.stats()["links"]
    rnd = random.Random(16)
    sizes = [HDR.size, 1232, 1452, 1500, 65536, 1 << 20] + [int(HDR.size * 2 ** (rnd.random() * 14)) for _ in range(120)]
    try:
        for side in ("a", "b"):
            procs[side].start(netns=lab.ns(side))
        exchange(procs["a"], procs["b"], sizes, seed=1)
        exchange(procs["b"], procs["a"], sizes[::-1], seed=2)
    finally:
        for d in procs.values():
            d.stop()
    links = lab.stats()["links"]
    for way in ("ab", "ba"):
        sent = links[way]["packets_in"] - stats0[way]["packets_in"]
        v6 = links[way]["packets_ipv6"] - stats0[way]["packets_ipv6"]
        assert sent > 100 and v6 == sent, (way, sent, v6)  # everything crossed the link as IPv6
        assert links[way]["drops_loss"] > stats0[way]["drops_loss"], way  # and the link did lose some of it
    for side in ("a", "b"):
        after = snmp6(lab, side)
        created = after.get("Ip6FragCreates", 0) - before[side].get("Ip6FragCreates", 0)
        assert created == 0, f"{side} fragmented {created} IPv6 packets: {backend} datagrams too big for the 1500-byte path"
        assert after["Ip6OutRequests"] > before[side]["Ip6OutRequests"]


LL_A, LL_B = "fe80::a", "fe80::b"


@pytest.fixture(scope="module")
def link_local_pair() -> Iterator[dict[str, str]]:
    problem = ipv6_problem()
    if problem:
        pytest.skip(problem)
    tag = secrets.token_hex(2)
    ns = {"a": f"v6ll{tag}-a", "b": f"v6ll{tag}-b"}
    dev = {"a": f"v6ll{tag}a", "b": f"v6ll{tag}b"}

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        for side in ("a", "b"):
            ip("netns", "add", ns[side])
        ip("link", "add", dev["a"], "netns", ns["a"], "type", "veth", "peer", "name", dev["b"], "netns", ns["b"])
        for side, addr in (("a", LL_A), ("b", LL_B)):
            ip("-n", ns[side], "link", "set", "lo", "up")
            ip("-n", ns[side], "addr", "add", f"{addr}/64", "dev", dev[side], "nodad")
            ip("-n", ns[side], "link", "set", dev[side], "up")
        yield {"ns_a": ns["a"], "ns_b": ns["b"], "dev_a": dev["a"], "dev_b": dev["b"]}
    finally:
        for side in ("a", "b"):
            subprocess.run(["ip", "netns", "del", ns[side]], capture_output=True)


@pytest.mark.parametrize("backend", ["tcp", "quic", "udt"])
def test_link_local_addresses_with_zones(backend: str, link_local_pair: dict[str, str], tmp_path: Path) -> None:
    problem = availability().get(backend)
    if problem is not None:
        pytest.skip(f"{backend} backend unavailable: {problem}")
    import yaml

    from lu2k.certs import cert_pem, key_pem, make_certificate, make_key
    from lu2k.localpair import DaemonProcess, daemon_config

    p = link_local_pair
    nids = {"a": f"fd00:6:11::a@{backend}", "b": f"fd00:6:11::b@{backend}"}
    here = {"a": (LL_A, p["dev_a"]), "b": (LL_B, p["dev_b"])}
    options: dict[str, dict[str, Any]] = {"a": {}, "b": {}}
    if backend == "quic":
        ca_key = make_key()
        ca = make_certificate(ca_key, "v6-ll-ca", is_ca=True)
        (tmp_path / "ca.crt").write_bytes(cert_pem(ca))
        for side in ("a", "b"):
            key = make_key()
            cert = make_certificate(key, f"ll-{side}", sans=[here[side][0]], issuer_cert=ca, issuer_key=ca_key)
            (tmp_path / f"{side}.crt").write_bytes(cert_pem(cert))
            (tmp_path / f"{side}.key").write_bytes(key_pem(key))
            os.chmod(tmp_path / f"{side}.key", 0o600)
            options[side] = {"cert": str(tmp_path / f"{side}.crt"), "key": str(tmp_path / f"{side}.key"), "ca": str(tmp_path / "ca.crt")}
    procs = {}
    for side, other in (("a", "b"), ("b", "a")):
        own_dev = here[side][1]
        extra_net: dict[str, Any] = {"key": KEY, "listen": f"{here[side][0]}%{own_dev}", "profile": {"rtt_ms": 1, "rate_mbit": 1000}}
        if options[side]:
            extra_net["options"] = options[side]
        # The peer's link-local address, reached through this side's own interface.
        peer = [{"primary nid": nids[other], "lu2k": {"address": f"[{here[other][0]}%{own_dev}]:{PORT}"}}]
        cfg = daemon_config(nids[side], PORT, tmp_path, backend=backend, extra_net=extra_net, extra={"peer": peer})
        path = tmp_path / f"lu2kd-{side}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        procs[side] = DaemonProcess(nids[side], path, cfg["lu2k"]["shim"]["path"], cfg["lu2k"]["control"]["path"], tmp_path / f"{side}.log")
    rnd = random.Random(11)
    sizes = [HDR.size, 1452, 65536] + [int(HDR.size * 2 ** (rnd.random() * 12)) for _ in range(40)]
    try:
        procs["a"].start(netns=p["ns_a"])
        procs["b"].start(netns=p["ns_b"])
        exchange(procs["a"], procs["b"], sizes, seed=3)
        exchange(procs["b"], procs["a"], sizes, seed=4)
    finally:
        for d in procs.values():
            d.stop()
