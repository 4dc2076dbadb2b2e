"""A return path through a real NAT (lu2k.core.returnpath), with real lu2kd processes.

Three namespaces: the inside site, a router that masquerades the inside's traffic with
nftables (and forwards nothing the outside starts), and the outside site.  The inside site
can only be reached over its own outbound connection; the outside daemon sends to it on that
connection's reverse direction.  The router's conntrack timeouts are cut to a few seconds
(per namespace), so the NAT binding lives only as long as the keepalives hold it; then the
router's NAT mapping is changed under the running connection (a rebinding: new source port)
and the outside daemon must follow.  Messages go both ways, every one delivered exactly once,
over tcp, quic and udt.  Needs root, iproute2, nft and conntrack.

The first test needs none of that: two engines in one process over the in-process backend,
the outside one never connecting, the way the daemon's pump carries a return path.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e_support import Receiver, make_message
from lu2k.backends import availability
from lu2k.backends.tcp import available_congestion_controls
from lu2k.kernel_shim.endpoint import Endpoint
from lu2k.lab.netns import LabError, child_env, delete_netns, run_ip
from lu2k.localpair import DaemonProcess, daemon_config, free_port

pytestmark = [pytest.mark.timeout(240), pytest.mark.netns]
needs_nat = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
    pytest.mark.skipif(not (shutil.which("nft") and shutil.which("conntrack") and shutil.which("ip")),
                       reason="needs nft (nftables) and conntrack (conntrack) and ip (iproute2)"),
]

UDP_TIMEOUT = 2  # the router's conntrack timeouts, seconds: far below the defaults (30 / 120 s)
TCP_TIMEOUT = 4
KEEPALIVE = 0.5
IDLE = 3 * TCP_TIMEOUT // 2 + 1  # quiet longer than any conntrack timeout
INSIDE_ADDR, ROUTER_IN, ROUTER_OUT, OUTSIDE_ADDR = "10.77.1.2", "10.77.1.1", "10.77.2.1", "10.77.2.2"


class NatLab:
    """inside --veth-- router (nftables masquerade, conntrack timeouts cut) --veth-- outside."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000:05d}"
        self.ns = {side: f"nt-{side}-{tag}" for side in ("in", "rt", "out")}
        self.dev_in, self.dev_rin, self.dev_rout, self.dev_out = (f"nt{tag}{s}" for s in ("i", "ri", "ro", "o"))
        self.per_netns_timeouts = False

    def sh(self, side: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ip", "netns", "exec", self.ns[side], *cmd], capture_output=True, text=True, timeout=30)
        if check and proc.returncode:
            raise LabError(f"{' '.join(cmd)} in {self.ns[side]} failed: {proc.stderr.strip() or proc.returncode}")
        return proc

    def up(self) -> None:
        for ns in self.ns.values():
            run_ip(["netns", "add", ns])
        run_ip(["link", "add", self.dev_in, "netns", self.ns["in"], "type", "veth", "peer", "name", self.dev_rin, "netns", self.ns["rt"]])
        run_ip(["link", "add", self.dev_out, "netns", self.ns["out"], "type", "veth", "peer", "name", self.dev_rout, "netns", self.ns["rt"]])
        for side, dev, addr in (("in", self.dev_in, INSIDE_ADDR), ("rt", self.dev_rin, ROUTER_IN),
                                ("rt", self.dev_rout, ROUTER_OUT), ("out", self.dev_out, OUTSIDE_ADDR)):
            self.sh(side, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            self.sh(side, "ip", "link", "set", dev, "up")
            self.sh(side, "ip", "link", "set", "lo", "up")
        self.sh("in", "ip", "route", "add", "default", "via", ROUTER_IN)  # the outside has no route to the inside
        self.sh("rt", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.nft(f"""
            table ip ntnat {{
                chain nt_post {{ type nat hook postrouting priority srcnat; policy accept; oifname "{self.dev_rout}" masquerade; }}
                chain nt_fwd {{
                    type filter hook forward priority filter; policy drop;
                    ct state established,related accept
                    iifname "{self.dev_rin}" oifname "{self.dev_rout}" accept
                }}
            }}""")
        # nf_conntrack is loaded now (the NAT needs it); its timeouts are per network namespace.
        self.sh("rt", "sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={UDP_TIMEOUT}",
                f"net.netfilter.nf_conntrack_udp_timeout_stream={UDP_TIMEOUT}",
                f"net.netfilter.nf_conntrack_tcp_timeout_established={TCP_TIMEOUT}")
        host = Path("/proc/sys/net/netfilter/nf_conntrack_udp_timeout")
        self.per_netns_timeouts = not host.exists() or host.read_text().strip() != str(UDP_TIMEOUT)

    def nft(self, ruleset: str) -> None:
        proc = subprocess.run(["ip", "netns", "exec", self.ns["rt"], "nft", "-f", "-"], input=ruleset, capture_output=True,
                              text=True, timeout=30)
        if proc.returncode:
            raise LabError(f"nft failed: {proc.stderr.strip()}")

    def rebind(self) -> None:
        """Give the inside a new source port: masquerade into another port range, and forget
        every binding the router had (the running connections are picked up again on their next
        packet, with a new mapping)."""
        self.sh("rt", "nft", "flush", "chain", "ip", "ntnat", "nt_post")
        self.nft(f'add rule ip ntnat nt_post oifname "{self.dev_rout}" meta l4proto {{ tcp, udp }} masquerade to :40000-40999')
        self.sh("rt", "conntrack", "-F", check=False)

    def flows(self, proto: str, port: int) -> list[str]:
        """The router's conntrack entries of the lu2k traffic (one line each)."""
        out = self.sh("rt", "conntrack", "-L", "-p", proto, "--dport", str(port), "-o", "id", check=False).stdout
        return [line for line in out.splitlines() if f"dport={port}" in line]

    def down(self) -> None:
        for ns in self.ns.values():
            delete_netns(ns)


def _engine_config(nid: str, peer: str, peer_lu2k: dict[str, Any], net: dict[str, Any], *, transaction_timeout: float,
                   tunables: dict[str, int] | None = None) -> Any:
    """An engine's configuration: one net, one peer entry with return-path settings."""
    from lu2k.settings import parse_config

    ni: dict[str, Any] = {"nid": nid, **({"tunables": tunables} if tunables else {})}
    return parse_config({
        "net": [{"net type": "tcp", "local NI(s)": [ni], "lu2k": {"key": "return-path-test-key-01", **net}}],
        "peer": [{"primary nid": peer, "lu2k": peer_lu2k}],
        "global": {"transaction_timeout": transaction_timeout, "connect_timeout": 1, "reconnect_min": 0.05, "reconnect_max": 0.2},
    })


async def test_engines_send_back_over_the_peers_connection() -> None:
    import asyncio

    from lu2k.engine import Engine
    from lu2k.errors import Status
    from lu2k.nid import parse_nid

    port = 51000 + os.getpid() % 1000
    inside_nid, outside_nid = "10.9.7.1@tcp", "10.9.7.2@tcp"
    net = {"backend": "inproc", "port": port}
    outside = Engine(_engine_config(outside_nid, inside_nid, {"return_path": "reverse"}, net, transaction_timeout=5))
    inside = Engine(_engine_config(inside_nid, outside_nid, {"keepalive": 0.1}, net, transaction_timeout=5))
    await outside.start(with_shim=False)
    await inside.start(with_shim=False)
    try:
        done: list[asyncio.Future[tuple[Status, str]]] = []
        loop = asyncio.get_running_loop()
        def finish(fut: asyncio.Future[tuple[Status, str]]) -> Any:
            return lambda status, reason: fut.set_result((status, reason))

        for i in range(20):
            fut: asyncio.Future[tuple[Status, str]] = loop.create_future()
            outside.send(None, parse_nid(inside_nid), 1, 7, b"back %d" % i, finish(fut))
            done.append(fut)
        results = await asyncio.wait_for(asyncio.gather(*done), 10)
        # No endpoint listens on portal 7 at the inside site: its daemon answered each one, so
        # each went all the way over the inside site's own connection.
        assert results == [(Status.NO_RECEIVER, f"no endpoint attached on portal 7 at {inside_nid}")] * 20
        assert inside.stats["conns_accepted"] == 0 and inside.stats["return_paths_served"] == 1
        assert outside.stats["return_paths_adopted"] == 1
        await asyncio.sleep(0.5)
        assert inside.stats["keepalives_sent"] >= 3 and not inside.stats["keepalives_missed"]
        conns = outside.describe_peers()[0]["connections"]
        assert all(c["path"] == "peer's connection" for c in conns.values()), conns
    finally:
        await inside.stop()
        await outside.stop()


async def test_requests_on_our_connections_reverse_direction_are_answered_slice_by_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inside site reads the outside's messages among its ACKs; a read of many of them goes
    to the core a slice at a time, and each slice's answers leave before the next is handled,
    as on a connection we accepted (test_engine.py)."""
    import asyncio

    from lu2k import wire
    from lu2k.backends.inproc import InprocTransport
    from lu2k.engine import RX_SLICE, Engine
    from lu2k.errors import Status
    from lu2k.nid import parse_nid

    port = 52000 + os.getpid() % 1000
    inside_nid, outside_nid = "10.9.8.1@tcp", "10.9.8.2@tcp"
    net = {"backend": "inproc", "port": port}
    credits = {"peer_credits": 4 * RX_SLICE, "credits": 16 * RX_SLICE}
    outside = Engine(_engine_config(outside_nid, inside_nid, {"return_path": "reverse"}, net, transaction_timeout=5, tunables=credits))
    inside = Engine(_engine_config(inside_nid, outside_nid, {"keepalive": 0.5}, net, transaction_timeout=5, tunables=credits))
    answers_sent_after: list[int] = []  # messages the inside had handled when its answers went out
    real_send = InprocTransport.send

    async def logged(self: InprocTransport, frames: Any) -> None:
        answers = any(wire.BASE.unpack_from(header)[2] in (wire.FrameType.ACK, wire.FrameType.NACK) for header, _ in frames)
        if answers and any(link.transport is self for link in inside._out.values()):
            answers_sent_after.append(inside.core.stats["msgs_received"])
        await real_send(self, frames)

    monkeypatch.setattr(InprocTransport, "send", logged)
    await outside.start(with_shim=False)
    await inside.start(with_shim=False)
    loop = asyncio.get_running_loop()

    def send(portal: int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = loop.create_future()
        outside.send(None, parse_nid(inside_nid), 1, portal, b"x", lambda status, reason: fut.set_result(status))
        return fut

    try:
        assert await asyncio.wait_for(send(0), 10) is Status.NO_RECEIVER  # the outside now rides the inside's connection
        before = inside.core.stats["msgs_received"]
        answers_sent_after.clear()
        count = 3 * RX_SLICE + 8
        done = [send(portal) for portal in range(1, count + 1)]  # a portal each: no destination's cap applies
        assert await asyncio.wait_for(asyncio.gather(*done), 10) == [Status.NO_RECEIVER] * count
        assert [n - before for n in answers_sent_after] == [RX_SLICE, 2 * RX_SLICE, 3 * RX_SLICE, count]
        assert outside.stats["return_paths_adopted"] == 1
    finally:
        await inside.stop()
        await outside.stop()


@pytest.mark.skipif("bbr" not in available_congestion_controls(), reason="kernel lacks bbr")
async def test_bulk_on_the_peers_tcp_connection_gets_the_bbr_watch() -> None:
    """The outside site's bulk messages ride the inside site's tcp BULK connection: the
    accepted socket's sending side is watched as a socket the outside opened would be."""
    import asyncio

    from lu2k.engine import Engine
    from lu2k.errors import Status
    from lu2k.nid import parse_nid

    inside_nid, outside_nid = "127.0.0.1@tcp", "127.0.0.2@tcp"
    net = {"backend": "tcp", "port": free_port("127.0.0.1"), "profile": {"rtt_ms": 600, "rate_mbit": 20}}
    outside = Engine(_engine_config(outside_nid, inside_nid, {"return_path": "reverse"}, net, transaction_timeout=10))
    inside = Engine(_engine_config(inside_nid, outside_nid, {"keepalive": 0.2}, net, transaction_timeout=10))
    await outside.start(with_shim=False)
    await inside.start(with_shim=False)
    try:
        loop = asyncio.get_running_loop()
        done: list[asyncio.Future[tuple[Status, str]]] = []
        for i in range(4):
            fut: asyncio.Future[tuple[Status, str]] = loop.create_future()
            outside.send(None, parse_nid(inside_nid), 1, 7, bytes([i]) * (256 << 10),
                         lambda status, reason, fut=fut: fut.set_result((status, reason)))
            done.append(fut)
        results = await asyncio.wait_for(asyncio.gather(*done), 20)
        assert results == [(Status.NO_RECEIVER, f"no endpoint attached on portal 7 at {inside_nid}")] * 4
        assert inside.stats["conns_accepted"] == 0
        conns = outside.describe_peers()[0]["connections"]
        assert conns["bulk"]["path"] == "peer's connection" and conns["bulk"]["bbr_watch"] == "probe_rtt auto", conns
    finally:
        await inside.stop()
        await outside.stop()


async def test_a_first_answer_goes_on_the_peers_connection_while_ours_is_set_up() -> None:
    """Not NAT: the server's connection back to a client that just connected is slow to set up
    (a GEO hop's handshake and hello); its first message to the client rides the client's
    CONTROL connection meanwhile, and the set-up, when it ends, is closed as superseded."""
    import asyncio

    from lu2k.engine import Engine
    from lu2k.errors import Status
    from lu2k.nid import parse_net, parse_nid

    client_nid, server_nid = "127.0.0.1@tcp", "127.0.0.2@tcp"
    net = {"backend": "tcp", "port": free_port("127.0.0.1")}
    client = Engine(_engine_config(client_nid, server_nid, {}, net, transaction_timeout=10))
    server = Engine(_engine_config(server_nid, client_nid, {}, net, transaction_timeout=10))
    await client.start(with_shim=False)
    await server.start(with_shim=False)
    backend = server.nis[parse_net("tcp")].backend
    real_connect = backend.connect
    set_up = asyncio.Event()

    async def slow_connect(*args: Any, **kwargs: Any) -> Any:
        await set_up.wait()  # the set-up takes until the test lets it finish
        return await real_connect(*args, **kwargs)

    backend.connect = slow_connect  # type: ignore[method-assign]

    async def send(engine: Engine, dst: str, payload: bytes = b"x") -> tuple[Status, str]:
        fut: asyncio.Future[tuple[Status, str]] = asyncio.get_running_loop().create_future()
        engine.send(None, parse_nid(dst), 1, 7, payload, lambda status, reason: fut.set_result((status, reason)))
        return await asyncio.wait_for(fut, 10)

    try:
        no_endpoint = Status.NO_RECEIVER
        assert (await send(client, server_nid))[0] is no_endpoint  # the request: the client connects
        assert (await send(server, client_nid))[0] is no_endpoint  # the answer, with the set-up still held
        control = server.describe_peers()[0]["connections"]["control"]
        assert server.stats["return_paths_early"] == 1 and control["path"] == "peer's connection", control
        set_up.set()
        for _ in range(250):  # the set-ups finish (CONTROL, closed as superseded, and BULK)
            await asyncio.sleep(0.02)
            if client.stats["conns_accepted"] >= 2:
                break
        assert client.stats["conns_accepted"] == 2
        results = [await send(server, client_nid, bytes(2000)), await send(server, client_nid), await send(client, server_nid)]
        assert [r[0] for r in results] == [no_endpoint] * 3
        assert server.describe_peers()[0]["connections"]["control"]["path"] == "peer's connection"
        assert server.stats["return_paths_early"] == 1
    finally:
        await server.stop()
        await client.stop()


@pytest.fixture
def nat_lab() -> Iterator[NatLab]:
    lab = NatLab()
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def _site_certs(d: Path) -> dict[str, str]:
    from lu2k.cli.keys import cert_pem, key_pem, make_certificate, make_key

    ca_key = make_key()
    ca = make_certificate(ca_key, "ca", is_ca=True)
    key = make_key()
    cert = make_certificate(key, "site", sans=[INSIDE_ADDR, OUTSIDE_ADDR], issuer_cert=ca, issuer_key=ca_key)
    (d / "ca.crt").write_bytes(cert_pem(ca))
    (d / "site.crt").write_bytes(cert_pem(cert))
    (d / "site.key").write_bytes(key_pem(key))
    return {"cert": str(d / "site.crt"), "key": str(d / "site.key"), "ca": str(d / "ca.crt")}


def _daemon(workdir: Path, nid: str, port: int, backend: str, peer: str, peer_lu2k: dict[str, Any],
            options: dict[str, Any], transaction_timeout: float = 20) -> DaemonProcess:
    extra = {"peer": [{"primary nid": peer, "lu2k": peer_lu2k}],
             "global": {"transaction_timeout": transaction_timeout, "connect_timeout": 2, "reconnect_min": 0.05, "reconnect_max": 0.5}}
    cfg = daemon_config(nid, port, workdir, backend=backend, extra_net={"options": options}, extra=extra)
    name = nid.replace("@", "_")
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return DaemonProcess(nid, path, cfg["lu2k"]["shim"]["path"], cfg["lu2k"]["control"]["path"], workdir / f"{name}.log")


def _ctl(d: DaemonProcess, *args: str) -> Any:
    import json
    import sys

    out = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", d.control_path, "--json", *args],
                         capture_output=True, text=True, timeout=60, env=child_env())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _stats(d: DaemonProcess) -> dict[str, Any]:
    return dict(_ctl(d, "stats", "show"))


def _exchange(src: DaemonProcess, dst: DaemonProcess, first: int, count: int, sizes: tuple[int, ...]) -> None:
    """``count`` messages src -> dst, each delivered once and intact, each completed DELIVERED."""
    rnd = random.Random(first)
    rx = Receiver(dst.shim_path, count, portal=0, idle_timeout=60)
    rx.start()
    with Endpoint.attach(src.shim_path, portal=1) as ep:
        comps = [ep.send(dst.nid, make_message(first + i, rnd.choice(sizes), rnd), 0) for i in range(count)]
        assert all(c.wait(60) for c in comps), "a completion never came"
        assert Counter(c.status for c in comps) == Counter({0: count}), [(c.status, c.reason) for c in comps if c.status][:3]
    rx.join(60)
    assert rx.error is None, rx.error
    assert rx.corrupt == 0 and sorted(rx.seen) == list(range(first, first + count)) and set(rx.seen.values()) == {1}


BACKENDS = {
    # backend: (transport protocol, outside's return_path for the inside, net options)
    "tcp": ("tcp", "reverse", {}),
    "quic": ("udp", "auto", {}),
    "udt": ("udp", "auto", {"dead_peer_s": 2}),
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@needs_nat[0]
@needs_nat[1]
def test_both_ways_through_nat_with_keepalives_and_a_rebinding(backend: str, nat_lab: NatLab, tmp_path: Path) -> None:
    why = availability().get(backend)
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    proto, mode, base_options = BACKENDS[backend]
    options: dict[str, Any] = dict(base_options)
    if backend == "quic":
        options.update(_site_certs(tmp_path))
    port = free_port()
    inside_nid, outside_nid = f"{INSIDE_ADDR}@{backend}", f"{OUTSIDE_ADDR}@{backend}"
    outside = _daemon(tmp_path, outside_nid, port, backend, inside_nid, {"return_path": mode}, options)
    inside = _daemon(tmp_path, inside_nid, port, backend, outside_nid, {"keepalive": KEEPALIVE}, options)
    outside.start(netns=nat_lab.ns["out"])
    inside.start(netns=nat_lab.ns["in"])
    try:
        # The inside site is reachable only through its own connection.
        probe = nat_lab.sh("out", "python3", "-c", f"import socket; socket.create_connection(('{INSIDE_ADDR}', {port}), 1)", check=False)
        assert probe.returncode != 0
        # Both ways (the inside site connects out as soon as it starts: it holds its connection).
        _exchange(outside, inside, 0, 30, (8, 1000, 70_000, 300_000))
        _exchange(inside, outside, 100, 30, (8, 1000, 70_000, 300_000))
        peers = _ctl(outside, "peer", "show")
        conns = [c for p in (peers.get("peers", peers) if isinstance(peers, dict) else peers) if p["nid"] == inside_nid
                 for c in p["connections"].values()]
        assert conns and all(c.get("path") == "peer's connection" for c in conns), peers
        accepted = _stats(outside)["conns_accepted"]
        flows = nat_lab.flows(proto, port)
        assert flows, "no conntrack entry for the lu2k connection"
        ids = {re.search(r"id=(\d+)", f).group(1) for f in flows}  # type: ignore[union-attr]

        # Quiet for longer than the router keeps an idle binding: the keepalives hold it (the
        # same conntrack entries, no new connection), and the outside can still reach in.
        time.sleep(IDLE)
        if nat_lab.per_netns_timeouts:
            assert {re.search(r"id=(\d+)", f).group(1) for f in nat_lab.flows(proto, port)} & ids  # type: ignore[union-attr]
        _exchange(outside, inside, 200, 10, (100, 5000))
        assert _stats(outside)["conns_accepted"] == accepted
        assert _stats(inside)["keepalives_sent"] >= IDLE / KEEPALIVE - 1

        # A rebinding: the inside's traffic leaves with a new source port from now on.
        nat_lab.rebind()
        _exchange(outside, inside, 300, 20, (100, 5000, 70_000))
        _exchange(inside, outside, 400, 20, (100, 5000, 70_000))
        now = nat_lab.flows(proto, port)
        assert any(re.search(r"dport=40\d\d\d", f) for f in now), now  # replies go to the new port
        out_stats = _stats(outside)
        print(backend, "outside:", {k: v for k, v in out_stats.items() if "return" in k or "conns" in k},
              "inside:", {k: v for k, v in _stats(inside).items() if "keepalive" in k or "connect" in k or "lost" in k})
        if backend == "quic":
            assert out_stats["conns_accepted"] >= accepted  # connection migration, or a reconnect: both are fine
        else:
            assert out_stats["conns_accepted"] > accepted and out_stats["return_paths_adopted"] >= 2, out_stats
    except BaseException:
        print("--- outside log ---\n" + outside.log_tail(60) + "\n--- inside log ---\n" + inside.log_tail(60))
        raise
    finally:
        inside.stop()
        outside.stop()


@needs_nat[0]
@needs_nat[1]
def test_without_a_return_path_the_outside_cannot_reach_the_inside(nat_lab: NatLab, tmp_path: Path) -> None:
    """The control: return_path: connect, and the same NAT keeps the outside out."""
    port = free_port()
    inside_nid, outside_nid = f"{INSIDE_ADDR}@tcp", f"{OUTSIDE_ADDR}@tcp"
    outside = _daemon(tmp_path, outside_nid, port, "tcp", inside_nid, {"return_path": "connect"}, {}, transaction_timeout=3)
    inside = _daemon(tmp_path, inside_nid, port, "tcp", outside_nid, {"keepalive": KEEPALIVE}, {})
    outside.start(netns=nat_lab.ns["out"])
    inside.start(netns=nat_lab.ns["in"])
    try:
        _exchange(inside, outside, 0, 5, (100,))  # out works
        with Endpoint.attach(outside.shim_path, portal=1) as ep:
            c = ep.send(inside.nid, b"x" * 100, 0)
            assert c.wait(60)
            assert c.status != 0 and "unreachable" in c.reason, (c.status, c.reason)
    finally:
        inside.stop()
        outside.stop()


@needs_nat[0]
@needs_nat[1]
def test_the_namespace_conntrack_timeout_is_short(nat_lab: NatLab) -> None:
    """What the keepalive test relies on: an idle UDP binding really disappears after the cut
    timeout (a datagram from the inside with no keepalive behind it)."""
    if not nat_lab.per_netns_timeouts:
        pytest.skip("conntrack timeouts are not per network namespace on this kernel")
    port = 40999 - random.randrange(500)
    nat_lab.sh("in", "python3", "-c", f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{OUTSIDE_ADDR}', {port}))")
    assert nat_lab.flows("udp", port)
    time.sleep(UDP_TIMEOUT + 1.5)
    assert not nat_lab.flows("udp", port)
