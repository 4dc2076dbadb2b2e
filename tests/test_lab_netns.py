"""lu2k.lab.netns: lab lifecycle, names, state files, stale-lab cleanup, death of the owner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lu2k.errors import ConfigError, LocalProtocolError
from lu2k.lab.netns import (
    Lab, LabError, LabState, check_lab_id, child_env, cleanup_stale, dev_name, forwarder_alive, list_labs, netns_exists,
)
from lu2k.lab.spec import LinkSpec, build_specs

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def test_names_fit_kernel_limits() -> None:
    assert len(dev_name("abcdefgh", "a")) <= 15
    assert check_lab_id("t1") == "t1"
    for bad in ("", "UPPER", "way-too-long-id", "a/b"):
        with pytest.raises(ConfigError, match="lab id"):
            check_lab_id(bad)


def test_state_round_trip_and_corrupt_state(tmp_path: Path) -> None:
    st = LabState("x1", subnet=7, specs=build_specs("geo", loss="1%"), pid=123, profile={"profile": "geo"})
    st.save(tmp_path)
    back = LabState.load(st.path(tmp_path))
    assert back.to_dict() == st.to_dict()
    assert back.addr == {"a": "10.201.7.1", "b": "10.201.7.2"}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        LabState.load(tmp_path / "bad.json")
    assert [s.lab_id for s in list_labs(tmp_path)] == ["x1"]


def test_host_tuning_round_trips_and_is_checked(tmp_path: Path) -> None:
    st = LabState("x2", subnet=3, specs=build_specs("geo"), initcwnd=1000, rmem_default=8 << 20)
    st.save(tmp_path)
    back = LabState.load(st.path(tmp_path))
    assert (back.initcwnd, back.rmem_default) == (1000, 8 << 20) and back.to_dict() == st.to_dict()
    assert LabState.from_dict({k: v for k, v in st.to_dict().items() if k not in ("initcwnd", "rmem_default")}).initcwnd == 0
    for bad, where in (({"initcwnd": 20000}, "initcwnd"), ({"initcwnd": -1}, "initcwnd"), ({"rmem_default": 1024}, "rmem_default"),
                       ({"rmem_default": 1 << 30}, "rmem_default")):
        with pytest.raises(ConfigError, match=where):
            LabState("x3", subnet=3, specs=build_specs("geo"), **bad)  # type: ignore[arg-type]


def test_child_env_makes_package_importable() -> None:
    env = child_env({"X": "1"})
    out = subprocess.run([sys.executable, "-c", "import lu2k.lab.model"], env=env, cwd="/", capture_output=True)
    assert out.returncode == 0, out.stderr
    assert env["X"] == "1"


def test_attach_to_missing_lab_says_so(lab_dir: Path) -> None:
    with pytest.raises(LabError, match="no lab 'nope'"):
        Lab.attach("nope")


@needs_root
@pytest.mark.netns
def test_lab_up_carries_udp_and_down_removes_everything(lab_dir: Path) -> None:
    spec = LinkSpec(rate_bps=10e6, delay_s=0.01)
    with Lab((spec, spec)) as lab:
        assert netns_exists(lab.ns_a) and netns_exists(lab.ns_b)
        assert forwarder_alive(lab.state.pid)
        # Nothing but lo and our TUN in the namespace, and no route beyond the peer.
        links = lab.run("a", ["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert {line.split(":")[1].strip() for line in links.splitlines()} == {"lo", lab.state.dev["a"]}
        routes = lab.run("a", ["ip", "route"], capture_output=True, text=True, check=True).stdout
        assert "default" not in routes
        script = (
            "import socket,sys\n"
            "r=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);r.bind((sys.argv[1],9999));r.settimeout(5)\n"
            "print('bound', flush=True)\n"
            "print(r.recv(100).decode())\n"
        )
        recv = lab.popen("b", [sys.executable, "-c", script, lab.addr_b], stdout=subprocess.PIPE, text=True)
        assert recv.stdout is not None and recv.stdout.readline().strip() == "bound"
        send = ("import socket,sys,time\n"
                "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                "[ (s.sendto(b'hello',(sys.argv[1],9999)), time.sleep(0.2)) for _ in range(5)]\n")
        lab.run("a", [sys.executable, "-c", send, lab.addr_b], check=True)
        out, _ = recv.communicate(timeout=10)
        assert out.strip() == "hello"
        stats = lab.stats()
        assert stats["links"]["ab"]["packets_out"] >= 1
        # SIGUSR1: counters to <id>.stats.json (and the log).
        os.kill(lab.state.pid, signal.SIGUSR1)  # type: ignore[arg-type]
        stats_file = lab_dir / f"{lab.lab_id}.stats.json"
        deadline = time.monotonic() + 10
        while not stats_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(stats_file.read_text())["links"]["ab"]["packets_out"] >= 1
        state_file = lab.state.path(lab_dir)
        assert json.loads(state_file.read_text())["ready"] is True
    assert not netns_exists(lab.ns_a) and not netns_exists(lab.ns_b)
    assert not state_file.exists()
    assert not list(lab_dir.glob(f"{lab.lab_id}*"))


@needs_root
@pytest.mark.netns
def test_killed_forwarder_leaves_a_stale_lab_that_cleanup_removes(lab_dir: Path) -> None:
    lab = Lab(build_specs("leo")).up()
    pid = lab.state.pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    lab._proc.wait()  # type: ignore[union-attr]
    assert netns_exists(lab.ns_a)  # SIGKILL: the forwarder could not clean up
    assert not forwarder_alive(pid)
    with pytest.raises(LabError, match="not running"):
        Lab.attach(lab.lab_id)
    assert cleanup_stale() == [lab.lab_id]
    assert not netns_exists(lab.ns_a) and not netns_exists(lab.ns_b)
    assert list_labs() == []


@needs_root
@pytest.mark.netns
def test_forwarder_dies_and_cleans_up_when_its_owner_dies(lab_dir: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time\nfrom lu2k.lab.netns import Lab\nfrom lu2k.lab.spec import build_specs\n"
         "lab=Lab(build_specs('geo')).up()\nprint(lab.lab_id, lab.state.pid, flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, env=child_env())
    assert owner.stdout is not None
    lab_id, pid = owner.stdout.readline().split()
    assert forwarder_alive(int(pid))
    owner.kill()  # SIGKILL: no chance for the owner to tear anything down
    owner.wait()
    owner.stdout.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (forwarder_alive(int(pid)) or netns_exists(f"lu2k-{lab_id}-a")):
        time.sleep(0.1)
    assert not forwarder_alive(int(pid))
    assert not netns_exists(f"lu2k-{lab_id}-a") and not netns_exists(f"lu2k-{lab_id}-b")
    assert list_labs() == []


@needs_root
@pytest.mark.netns
def test_second_lab_with_same_id_is_refused(lab_dir: Path) -> None:
    with Lab(build_specs("leo"), "dup1"):
        with pytest.raises(LabError, match="already up"):
            Lab(build_specs("leo"), "dup1").up()


def test_state_with_paths_and_ipv6_round_trips(tmp_path: Path) -> None:
    st = LabState("x2", subnet=12, specs=build_specs("geo"), extra_paths=(build_specs("leo", loss="1%", seed=3),), ipv6=True)
    st.save(tmp_path)
    back = LabState.load(st.path(tmp_path))
    assert back.to_dict() == st.to_dict() and back.extra_paths == st.extra_paths and back.ipv6
    assert back.addrs == [{"a": "10.201.12.1", "b": "10.201.12.2"}, {"a": "10.202.12.1", "b": "10.202.12.2"}]
    assert back.addrs6 == [{"a": "fd6c:7532:c::1", "b": "fd6c:7532:c::2"}, {"a": "fd6c:7532:c:1::1", "b": "fd6c:7532:c:1::2"}]
    assert back.devs[1] == {"a": "lu2kx2a1", "b": "lu2kx2b1"} and back.dev == {"a": "lu2kx2a", "b": "lu2kx2b"}
    assert LabState("x3", subnet=1, specs=build_specs("geo")).addrs6 == []
    with pytest.raises(ConfigError, match="at most"):
        LabState("x4", subnet=1, specs=build_specs("geo"), extra_paths=(build_specs("leo"),) * 4)
    lab = Lab(build_specs("geo"), "x5", extra_paths=[build_specs("leo")])
    with pytest.raises(LocalProtocolError, match="paths 0..1, not 2"):
        lab.address("a", 2)
    with pytest.raises(LocalProtocolError, match="IPv6"):
        lab.address("a", 1, ipv6=True)


# Both run in the lab: the server answers TCP (sha256 of what it got) and echoes UDP on every
# address it is given; the client talks to each, retrying a UDP datagram until its echo comes
# back (the links lose packets), and reports what it saw.
EXCHANGE_SERVER = """
import hashlib, socket, sys, threading
def fam(a): return socket.AF_INET6 if ":" in a else socket.AF_INET
def tcp(srv):
    c, _ = srv.accept(); h = hashlib.sha256()
    while True:
        b = c.recv(65536)
        if not b: break
        h.update(b)
    c.sendall(h.hexdigest().encode()); c.close()
def udp(u):
    while True:
        d, peer = u.recvfrom(2048); u.sendto(d, peer)
threads = []
for a in sys.argv[1:]:
    srv = socket.socket(fam(a)); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind((a, 7001)); srv.listen(1)
    u = socket.socket(fam(a), socket.SOCK_DGRAM); u.bind((a, 7001))
    threads.append(threading.Thread(target=tcp, args=(srv,))); threading.Thread(target=udp, args=(u,), daemon=True).start()
for t in threads: t.start()
print("ready", flush=True)
for t in threads: t.join()
"""
EXCHANGE_CLIENT = """
import hashlib, json, socket, sys
data = bytes(range(256)) * 1024  # 256 KiB
out = {}
for a in sys.argv[1:]:
    f = socket.AF_INET6 if ":" in a else socket.AF_INET
    u = socket.socket(f, socket.SOCK_DGRAM); u.settimeout(0.3); echoed = 0
    for i in range(10):  # first: the server stops echoing once its TCP stream is done
        for _ in range(50):
            u.sendto(b"%d" % i, (a, 7001))
            try:
                if u.recv(100) == b"%d" % i: echoed += 1; break
            except socket.timeout:
                pass
    s = socket.create_connection((a, 7001), timeout=60); s.sendall(data); s.shutdown(socket.SHUT_WR)
    digest = b""
    while True:
        b = s.recv(100)
        if not b: break
        digest += b
    out[a] = {"tcp": digest.decode() == hashlib.sha256(data).hexdigest(), "udp": echoed, "src": s.getsockname()[0]}
print(json.dumps(out))
"""


@needs_root
@pytest.mark.netns
def test_two_paths_with_ipv6_carry_tcp_and_udp_on_their_own_links_and_one_can_be_cut(lab_dir: Path) -> None:
    fast = build_specs("leo", rate="20mbit")
    lossy = build_specs("leo", rate="10mbit", rtt="20ms", loss="3%", seed=4)
    with Lab(fast, extra_paths=[lossy], ipv6=True) as lab:
        addrs = [lab.address("b", p, ipv6=v6) for p in (0, 1) for v6 in (False, True)]
        srv = lab.popen("b", [sys.executable, "-c", EXCHANGE_SERVER, *addrs], stdout=subprocess.PIPE, text=True)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        out = lab.run("a", [sys.executable, "-c", EXCHANGE_CLIENT, *addrs], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
        srv.communicate(timeout=30)
        for p in (0, 1):
            for v6 in (False, True):
                r = seen[lab.address("b", p, ipv6=v6)]
                # Whole stream, every datagram echoed, and from that path's own address.
                assert r == {"tcp": True, "udp": 10, "src": lab.address("a", p, ipv6=v6)}
        stats = lab.stats()
        one, two = stats["paths"][0]["links"], stats["paths"][1]["links"]
        assert one == stats["links"]
        for links in (one, two):
            for d in ("ab", "ba"):
                assert 0 < links[d]["packets_ipv6"] < links[d]["packets_in"]  # both families on both paths
                assert links[d]["bytes_ipv6"] >= 40 * links[d]["packets_ipv6"]  # each at least an IPv6 header
        assert one["ab"]["drops_loss"] == 0 and two["ab"]["drops_loss"] > 0  # loss on path 1 only
        # A 256 KiB burst into a 10 Mbit/s link queues: the rate cap is at work.
        assert two["ab"]["max_queue_bytes"] > 1500 and two["ab"]["bytes_out"] > 2 * len(bytes(range(256)) * 1024)

        # Cut path 1: path 0 still carries both families, path 1 drops as down.
        assert lab.set_link(False, path=1)["paths"] == [{"ab": True, "ba": True}, {"ab": False, "ba": False}]
        path0 = [lab.address("b", 0), lab.address("b", 0, ipv6=True)]
        srv = lab.popen("b", [sys.executable, "-c", EXCHANGE_SERVER, *path0], stdout=subprocess.PIPE, text=True)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        out = lab.run("a", [sys.executable, "-c", EXCHANGE_CLIENT, *path0], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert all(r["tcp"] and r["udp"] == 10 for r in json.loads(out.stdout).values())
        srv.communicate(timeout=30)
        probe = "import socket,sys\nfor _ in range(5): socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 7001))\n"
        lab.run("a", [sys.executable, "-c", probe, lab.address("b", 1, ipv6=True)], check=True)
        deadline = time.monotonic() + 10
        while (stats := lab.stats())["paths"][1]["links"]["ab"]["drops_down"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats["paths"][1]["links"]["ab"]["drops_down"] == 5
        assert stats["links"]["ab"]["drops_down"] == 0
    assert not netns_exists(lab.ns_a)


@needs_root
@pytest.mark.netns
def test_killed_forwarder_of_a_two_path_lab_is_cleaned_up(lab_dir: Path) -> None:
    lab = Lab(build_specs("leo"), extra_paths=[build_specs("geo")], ipv6=True).up()
    pid = lab.state.pid
    assert pid and lab.run("b", ["ip", "-o", "link", "show", lab.state.devs[1]["b"]], capture_output=True).returncode == 0
    os.kill(pid, signal.SIGKILL)
    lab._proc.wait()  # type: ignore[union-attr]
    assert cleanup_stale() == [lab.lab_id]
    assert not netns_exists(lab.ns_a) and not netns_exists(lab.ns_b) and list_labs() == []


@needs_root
@pytest.mark.netns
def test_host_tuning_gives_new_tcp_connections_their_initial_windows(lab_dir: Path) -> None:
    spec = LinkSpec(rate_bps=10e6, delay_s=0.005)
    with Lab((spec, spec), initcwnd=300, rmem_default=4 << 20, ipv6=True) as lab:
        for side, peer in (("a", lab.addr_b), ("b", lab.addr_a)):
            route = lab.run(side, ["ip", "route", "show", f"{peer}/32"], capture_output=True, text=True, check=True).stdout
            assert "initcwnd 300" in route and "initrwnd 300" in route, route
            rmem = lab.run(side, ["sysctl", "-n", "net.ipv4.tcp_rmem"], capture_output=True, text=True, check=True).stdout.split()
            assert rmem[1] == str(4 << 20), rmem
        route6 = lab.run("a", ["ip", "-6", "route", "show", f"{lab.state.addr6['b']}/128"], capture_output=True, text=True,
                         check=True).stdout
        assert "initcwnd 300" in route6, route6
        # A fresh connection from a to b starts with the route's window, before any data.
        script = ("import socket,sys,time\n"
                  "l=socket.socket();l.bind((sys.argv[1],9977));l.listen()\n"
                  "print('bound',flush=True);c,_=l.accept();time.sleep(5)\n")
        srv = lab.popen("b", [sys.executable, "-c", script, lab.addr_b], stdout=subprocess.PIPE, text=True)
        try:
            assert srv.stdout is not None and srv.stdout.readline().strip() == "bound"
            client = ("import socket,subprocess,sys\n"
                      "s=socket.create_connection((sys.argv[1],9977))\n"
                      "print(subprocess.run(['ss','-tinH','dst',sys.argv[1]],capture_output=True,text=True).stdout)\n")
            out = lab.run("a", [sys.executable, "-c", client, lab.addr_b], capture_output=True, text=True, check=True).stdout
            assert " cwnd:300 " in f" {out} ", out
        finally:
            srv.kill()
            srv.communicate()
