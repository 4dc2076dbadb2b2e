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

from lu2k.errors import ConfigError
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
            "print(r.recv(100).decode())\n"
        )
        recv = lab.popen("b", [sys.executable, "-c", script, lab.addr_b], stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)  # let the receiver bind; a lost datagram would fail the test, not hang it
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
