"""lu2k.cli.lnet: the offline `lu2k lnet ...` commands (argument handling and output)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lu2k.cli.main import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["lnet", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_nid_and_net(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "nid", "010.1.1.1@tcp0", "*@lo", "2001:DB8::1@tcp") == (0, "10.1.1.1@tcp\n0@lo\n2001:db8::1@tcp\n", "")
    rc, out, err = run(capsys, "nid", "--no-resolve", "1.2.3.4@tcp", "bad@o2ib")
    assert rc == 1 and out == "1.2.3.4@tcp\n" and "bad@o2ib: host name 'bad'" in err
    assert run(capsys, "net", "tcp01", "o2ib")[:2] == (0, "tcp1\no2ib\n")
    rc, _, err = run(capsys, "net", "lo1")
    assert rc == 1 and "takes no number" in err


def test_nidlist(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "nidlist", "10.0.[1-2].[1-3/2]@tcp *@o2ib", "--match", "10.0.2.3@tcp", "--match", "9.9.9.9@o2ib")
    assert rc == 0
    assert out.splitlines() == ["10.0.[1-2].[1-3/2]@tcp *@o2ib", "10.0.2.3@tcp: matches", "9.9.9.9@o2ib: matches"]
    rc, _, err = run(capsys, "nidlist", "*@o2ib", "--expand")
    assert rc == 1 and "'*' names every address" in err
    rc, out, _ = run(capsys, "nidlist", "10.0.[1-2].[1-3/2]@tcp", "--match", "10.0.2.2@tcp", "--expand")
    assert rc == 1
    assert out.splitlines() == ["10.0.[1-2].[1-3/2]@tcp", "10.0.2.2@tcp: no match",
                                "10.0.1.1@tcp", "10.0.1.3@tcp", "10.0.2.1@tcp", "10.0.2.3@tcp"]
    rc, _, err = run(capsys, "nidlist", "1.2.3.[1-4/0]@tcp")
    assert rc == 1 and "zero stride" in err


def test_networks_and_ip2nets(capsys: pytest.CaptureFixture[str]) -> None:
    ifs = ["--if", "eth0=10.70.3.4", "--if", "eth1=192.168.1.20", "--if", "ib0=172.16.0.1,down"]
    assert run(capsys, "networks", "tcp0(eth0) junk,o2ib1")[:2] == (0, "tcp(eth0),o2ib1\n")
    assert run(capsys, "networks", "tcp", "--resolve", *ifs)[:2] == (0, "tcp(eth0)\n")
    rc, _, err = run(capsys, "networks", "tcp(eth0")
    assert rc == 1 and "networks at position 4" in err
    rc, out, _ = run(capsys, "ip2nets", "tcp0 192.168.*.*; tcp1(eth1) 10.*.*.*", *ifs)
    assert rc == 0 and out == "networks=tcp0,tcp1(eth1)\ntcp(eth0),tcp1(eth1)\n"
    rc, _, err = run(capsys, "ip2nets", "o2ib 172.16.*.*", *ifs)  # ib0 is down
    assert rc == 1 and "does not match" in err
    rc, _, err = run(capsys, "ip2nets", "tcp *.*.*.*", "--if", "eth0")
    assert rc == 1 and "name=ipv4" in err


def test_routes(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "routes", "o2ib 2 10.0.0.[1-2]@tcp:2; tcp1 10.0.0.5@tcp", "--local", "10.0.0.1@tcp", "--local", "10.1.0.1@tcp1")
    assert rc == 0
    assert out.splitlines() == [
        "o2ib 2 10.0.0.2@tcp:2", "tcp1 10.0.0.5@tcp",
        "# a gateway is one of our NIDs: this node is a router",
        "# not installed: tcp1 10.0.0.5@tcp (tcp1 is a local net)",
    ]


def test_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "lnet.yaml"
    f.write_text("net:\n  - net type: tcp\n    local NI(s):\n      - interfaces: {0: eth1}\nlu2k: {routes: 'o2ib 192.168.1.9@tcp'}\n")
    rc, out, _ = run(capsys, "check", str(f), "--if", "eth0=10.0.0.1", "--if", "eth1=192.168.1.20")
    assert rc == 0
    assert "# net tcp (net): 192.168.1.20@tcp on eth1" in out and "# route o2ib via 192.168.1.9@tcp" in out
    f.write_text("net:\n  - net type: tcp\n    local NI(s):\n      - interfaces: {0: eth7}\n")
    rc, _, err = run(capsys, "check", str(f), "--if", "eth0=10.0.0.1")
    assert rc == 1 and "'eth7' does not exist" in err
    assert run(capsys)[0] == 2


def test_check_never_prints_the_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "lnet.yaml"
    f.write_text("net:\n  - net type: tcp\n    local NI(s): [{nid: 10.0.0.1@tcp}]\n    lu2k: {key: very-secret-network-key}\n"
                 "lu2k: {defaults: {key: another-secret-network-key}}\n")
    rc, out, _ = run(capsys, "check", str(f), "--if", "eth0=10.0.0.1")
    assert rc == 0 and "very-secret" not in out and "another-secret" not in out and out.count("<hidden: export --secrets to include>") == 2


def test_if_down_makes_the_interface_invisible(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "ip2nets", "tcp(eth0) 192.168.*.*; tcp1 10.*.*.*", "--if", "eth0=192.168.1.2,down", "--if", "eth1=10.0.0.2")
    assert rc == 0 and out.splitlines() == ["networks=tcp1", "tcp1(eth1)"]
