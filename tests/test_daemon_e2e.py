"""End to end: shim endpoint -> lu2kd -> TCP -> lu2kd -> shim endpoint, real processes.

Covers what issue 2 asks of the integration tier: >= 10 000 messages of 0 B to 4 MiB, each
checked by checksum and delivered exactly once with every completion seen; a peer that goes
away (and comes back); bad frames from a peer; bad shim commands; back-pressure; wrong keys;
and LNet routing through a gateway.
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from lu2k import wire
from lu2k.errors import AuthenticationError, LocalProtocolError, ShimError, Status
from lu2k.kernel_shim import abi
from lu2k.kernel_shim.endpoint import Endpoint
from lu2k.localpair import DaemonProcess, daemon_config, daemons, free_port
from lu2k.nid import parse_nid
from lu2k.wire import ConnType, FrameDecoder

from e2e_support import HDR, Receiver, make_message  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def ctl(d: DaemonProcess, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", d.control_path, "--json", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_ten_thousand_messages_0b_to_4mib_exactly_once() -> None:
    rnd = random.Random(7)
    # Every size class, edges included; sizes log-uniform so the total stays around 1 GB.
    sizes = [HDR.size, HDR.size + 1, 4 << 20, (4 << 20) - 1, 65536, 1024, 1023]
    while len(sizes) < 10_000:
        sizes.append(int(HDR.size * ((4 << 20) / HDR.size) ** (rnd.random() ** 1.6)))
    sizes = [min(s, 4 << 20) for s in sizes]
    pool = rnd.randbytes(8 << 20)
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"]) as (a, b):
        rx = Receiver(b.shim_path, len(sizes))
        rx.start()
        statuses: Counter[int] = Counter()
        completions = []
        with Endpoint.attach(a.shim_path, portal=1) as ep:
            for i, size in enumerate(sizes):
                off = rnd.randrange(0, len(pool) - size + 1)
                body = pool[off : off + size - HDR.size]
                slot = ep.reserve(size, timeout=60)
                HDR.pack_into(slot.view, 0, i, zlib.crc32(body))
                slot.view[HDR.size :] = body
                completions.append(slot.post(b.nid, 0))
            # A 0-byte message (too short to carry the checksum header): sent to a portal with no receiver.
            zero = ep.send(b.nid, b"", portal=5)
            for c in completions:
                assert c.wait(120), "completion never came"
                statuses[c.status] += 1
            assert zero.wait(60) and zero.status == Status.NO_RECEIVER  # nobody on portal 5
            peers = ep.peers()
        rx.join(120)
        assert rx.error is None, rx.error
        assert statuses == Counter({0: len(sizes)})
        assert rx.corrupt == 0
        assert len(rx.seen) == len(sizes) and set(rx.seen.values()) == {1}  # each exactly once
        assert rx.sources == {"127.0.0.1@tcp"}
        assert any(v.get("delivered", 0) == len(sizes) for v in peers.values()), peers
        stats = ctl(b, "stats")
        assert stats["msgs_delivered"] == len(sizes) and stats.get("duplicates", 0) == 0


def test_zero_byte_message_delivered() -> None:
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"]) as (a, b):
        with Endpoint.attach(b.shim_path, portal=3) as rx, Endpoint.attach(a.shim_path, portal=1) as tx:
            c = tx.send(b.nid, b"", portal=3)
            msg = rx.recv(timeout=30)
            assert msg is not None and len(msg.payload) == 0 and str(msg.src) == "127.0.0.1@tcp" and msg.src_portal == 1
            msg.release()
            assert c.wait(30) and c.status == 0


def test_peer_goes_away_and_comes_back() -> None:
    extra = {"global": {"transaction_timeout": 3, "reconnect_min": 0.05, "reconnect_max": 0.5}}
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"], extra=extra) as (a, b):
        with Endpoint.attach(a.shim_path, portal=1) as ep:
            rx = Receiver(b.shim_path, 20)
            rx.start()
            first = [ep.send(b.nid, make_message(i, 1000, random.Random(i)), 0) for i in range(20)]
            assert all(c.wait(30) and c.status == 0 for c in first)
            rx.join(30)
            b.kill()  # abrupt: no goodbye
            lost = [ep.send(b.nid, make_message(100 + i, 5000, random.Random(i)), 0) for i in range(30)]
            for c in lost:
                assert c.wait(30), "a message to a dead peer never completed"
            reasons = Counter((c.status, c.reason) for c in lost)
            assert all(st in (Status.NO_ROUTE, Status.TIMED_OUT) for st, _ in reasons), reasons
            assert any("unreachable" in r or "refused" in r or "timeout" in r for _, r in reasons), reasons
            peer = ctl(a, "peer", "show")[0]
            assert peer["health"] < 1000 and peer["in_flight"] == 0 and peer["queued"] == 0
            # The peer comes back (new incarnation): new messages flow again.
            b.start()
            rx2 = Receiver(b.shim_path, 10)
            rx2.start()
            again = [ep.send(b.nid, make_message(200 + i, 2000, random.Random(i)), 0) for i in range(10)]
            assert all(c.wait(60) for c in again)
            assert [c.status for c in again] == [0] * 10, [(c.status, c.reason) for c in again]
            rx2.join(30)
            assert rx2.error is None and len(rx2.seen) == 10


def _handshake(port: int, src: str, dst: str, key: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.2", port))
    hello = wire.HelloInitiator(key=key, backend="tcp", src=parse_nid(src), dst=parse_nid(dst), conn_type=ConnType.ANY, incarnation=5)
    try:
        s.sendall(hello.start())
        dec = FrameDecoder(1 << 20)
        while True:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("daemon closed the connection during hello")
            dec.feed(data)
            for f in dec.frames():
                reply = hello.receive(f)
                if reply is None:
                    return s
                s.sendall(reply)
    except BaseException:
        s.close()
        raise


def test_bad_frames_close_only_that_connection() -> None:
    key = b"lu2k-demo-key-change-me"  # the embedded default's key
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"]) as (a, b):
        port = yaml.safe_load(Path(b.config_path).read_text())["net"][0]["lu2k"]["port"]
        rx = Receiver(b.shim_path, 2)
        rx.start()
        with Endpoint.attach(a.shim_path, portal=1) as ep:
            assert ep.send(b.nid, make_message(0, 100, random.Random(0)), 0).wait(30)
            # 1. not lu2k at all
            junk = socket.create_connection(("127.0.0.2", port))
            junk.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            junk.settimeout(10)
            assert junk.recv(100) == b""  # dropped without a word: it never spoke lu2k
            junk.close()
            # 2. authenticated, then a corrupt frame: header checksum broken
            s = _handshake(port, "127.0.0.9@tcp", "127.0.0.2@tcp", key)
            frame = bytearray(wire.encode_msg_header(1, parse_nid("127.0.0.9@tcp").to_bytes(), parse_nid(b.nid).to_bytes(), 0, 0, b"abc", False) + b"abc")
            frame[20] ^= 0xFF
            s.sendall(bytes(frame))
            s.settimeout(10)
            assert s.recv(100) == b""  # the daemon closed this connection
            s.close()
            # 3. authenticated, then an oversized message
            s = _handshake(port, "127.0.0.9@tcp", "127.0.0.2@tcp", key)
            s.sendall(wire.encode_header(wire.FrameType.MSG, wire.MSG_BODY.pack(1, bytes(20), bytes(20), 0, 0, 0), 1 << 30))
            s.settimeout(10)
            assert s.recv(100) == b""
            s.close()
            # 4. wrong key: refused at hello
            with pytest.raises(AuthenticationError):
                _handshake(port, "127.0.0.9@tcp", "127.0.0.2@tcp", b"not-the-key-at-all")
            # The daemon carries on serving the real peer.
            assert ep.send(b.nid, make_message(1, 100, random.Random(1)), 0).wait(30)
        rx.join(30)
        assert rx.error is None and len(rx.seen) == 2
        stats = ctl(b, "stats")
        assert stats["bad_frames"] >= 2 and stats["conns_refused"] >= 2
        assert "refused connection" in b.log_tail(200) and "closing connection" in b.log_tail(200)


def test_bad_shim_commands_rejected_daemon_carries_on() -> None:
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"]) as (a, b):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.connect(a.shim_path)
        raw.settimeout(10)
        bogus = abi.iowr(99, 8)
        raw.send(abi.CTL_HDR.pack(bogus, 1) + bytes(8))
        cmd, seq, error, _alen, reason = abi.CTL_REPLY.unpack_from(raw.recv(4096))
        assert (cmd, seq, error) == (bogus, 1, errno.ENOTTY)
        raw.send(abi.CTL_HDR.pack(abi.CMD_ATTACH, 2) + bytes(3))  # wrong size
        assert abi.CTL_REPLY.unpack_from(raw.recv(4096))[2] == errno.EINVAL
        raw.close()
        with Endpoint.attach(b.shim_path, portal=0) as rx, Endpoint.attach(a.shim_path, portal=1) as tx:
            c = tx.send(b.nid, b"still here", 0)
            m = rx.recv(timeout=30)
            assert m is not None and bytes(m.payload) == b"still here"
            m.release()
            assert c.wait(30) and c.status == 0
            with pytest.raises(LocalProtocolError):
                m.release()  # double release is refused locally


def test_back_pressure_then_everything_delivered() -> None:
    size, count = 1 << 20, 300  # 300 MiB against 64 MiB RX and TX pools
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"]) as (a, b):
        hold = threading.Event()
        rx = Receiver(b.shim_path, count, hold=hold)
        rx.start()
        with Endpoint.attach(a.shim_path, portal=1) as ep:
            rnd = random.Random(3)
            comps, pushed_back = [], 0
            for i in range(count):
                msg = make_message(i, size, rnd)
                while True:
                    try:
                        slot = ep.reserve(size, timeout=0)
                        break
                    except ShimError as e:
                        assert e.code == errno.EAGAIN
                        pushed_back += 1
                        if pushed_back == 1:
                            # The receiver is not reading: the sender is held back, nothing is lost.
                            peer = ctl(a, "peer", "show")[0]
                            assert peer["in_flight"] <= peer["max_tx_credits"]
                            hold.set()
                        ep.wait(0.05)
                slot.view[:] = msg
                comps.append(slot.post(b.nid, 0))
            assert pushed_back > 0, "the sender never felt back-pressure"
            assert all(c.wait(120) for c in comps) and {c.status for c in comps} == {0}
        rx.join(120)
        assert rx.error is None and len(rx.seen) == count and rx.corrupt == 0


def test_routing_through_a_gateway() -> None:
    """A (tcp) -> G (tcp, tcp1; routing enabled) -> C (tcp1), as LNet routes."""
    import tempfile

    port = free_port()
    key = "routing-test-key"
    with tempfile.TemporaryDirectory() as wd_name:
        wd = Path(wd_name)

        def write(name: str, nets: list[tuple[str, str]], routes: list[dict[str, Any]] | None = None, routing: bool = False) -> DaemonProcess:
            cfg: dict[str, Any] = {
                "net": [{"net type": net, "local NI(s)": [{"nid": nid}], "lu2k": {"backend": "tcp", "port": port, "key": key}} for net, nid in nets],
                "route": routes or [], "routing": {"enable": int(routing)},
                "global": {"transaction_timeout": 10},
                "lu2k": {"shim": {"path": str(wd / f"{name}.shim")}, "control": {"path": str(wd / f"{name}.ctl")}},
            }
            p = wd / f"{name}.yaml"
            p.write_text(yaml.safe_dump(cfg))
            return DaemonProcess(nets[0][1], p, str(wd / f"{name}.shim"), str(wd / f"{name}.ctl"), wd / f"{name}.log")

        a = write("a", [("tcp", "127.0.0.1@tcp")], [{"net": "tcp1", "gateway": "127.0.0.2@tcp"}])
        g = write("g", [("tcp", "127.0.0.2@tcp"), ("tcp1", "127.0.1.2@tcp1")], routing=True)
        c = write("c", [("tcp1", "127.0.1.3@tcp1")], [{"net": "tcp", "gateway": "127.0.1.2@tcp1"}])
        procs = [g, a, c]
        try:
            for d in procs:
                d.start()
            rx = Receiver(c.shim_path, 50)
            rx.start()
            with Endpoint.attach(a.shim_path, portal=1) as ep:
                comps = [ep.send("127.0.1.3@tcp1", make_message(i, 10_000 * (i + 1), random.Random(i)), 0) for i in range(50)]
                assert all(x.wait(60) for x in comps)
                assert [x.status for x in comps] == [0] * 50, [(x.status, x.reason) for x in comps]
                # End to end: a missing receiver behind the gateway is reported to the origin.
                miss = ep.send("127.0.1.3@tcp1", b"anyone?", portal=9)
                assert miss.wait(30) and miss.status == Status.NO_RECEIVER and "portal 9" in miss.reason
                # A net nobody routes to fails at once.
                nr = ep.send("127.0.5.5@tcp5", b"x", 0)
                assert nr.wait(10) and nr.status == Status.NO_ROUTE
            rx.join(60)
            assert rx.error is None and len(rx.seen) == 50 and rx.sources == {"127.0.0.1@tcp"}
            assert ctl(g, "stats")["msgs_forwarded"] == 51
            routes = ctl(a, "route", "show")
            assert routes == [{"net": "tcp1", "gateway": "127.0.0.2@tcp", "hop": -1, "priority": 0, "health": 1000}]
        finally:
            for d in procs:
                d.stop()


def test_ctl_yaml_and_ping() -> None:
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"]) as (a, b):
        [res] = ctl(a, "ping", "127.0.0.2@tcp")
        assert res["nid"] == "127.0.0.2@tcp" and 0 < res["rtt_ms"] < 5000
        out = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", a.control_path, "peer", "show", "-v", "2"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        [peer] = yaml.safe_load(out.stdout)["peer"]
        assert peer["primary nid"] == "127.0.0.2@tcp" and peer["peer ni"][0]["health stats"]["health value"] == 1000
        out = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", a.control_path, "net", "show"],
                             capture_output=True, text=True, timeout=30)
        assert yaml.safe_load(out.stdout)["net"][1] == {"net type": "tcp", "local NI(s)": [{"nid": "127.0.0.1@tcp", "status": "up"}]}
        bad = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", a.control_path, "ping", "not a nid"],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 1 and "lu2kctl:" in bad.stderr
        gone = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", "/nonexistent/x.ctl", "stats"],
                              capture_output=True, text=True, timeout=30)
        assert gone.returncode == 1 and "not running" in gone.stderr


def _wait_attached(control_path: str, pid: int, limit: float = 60.0) -> None:
    """Until the daemon lists an endpoint attached by ``pid`` (``lu2kctl endpoint show``)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", control_path, "--json", "endpoint", "show"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and any(e["pid"] == pid and e["attached"] for e in json.loads(out.stdout)):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not attach within {limit} s")


def test_send_recv_cli_pipes_a_file(tmp_path: Path) -> None:
    data = os.urandom(5_000_000) + b"tail"
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    out = tmp_path / "out.bin"
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"]) as (a, b):
        recv = subprocess.Popen([sys.executable, "-m", "lu2k.cli.main", "recv", "--socket", b.shim_path, "-o", str(out), "--timeout", "60"],
                                stderr=subprocess.PIPE, text=True)
        _wait_attached(b.control_path, recv.pid)
        send = subprocess.run([sys.executable, "-m", "lu2k.cli.main", "send", "--socket", a.shim_path, "--chunk", "300000", b.nid, str(src)],
                              capture_output=True, text=True, timeout=120)
        assert send.returncode == 0, send.stderr
        _, err = recv.communicate(timeout=60)
        assert recv.returncode == 0, err
    assert out.read_bytes() == data


def test_lu2kd_check_and_bad_config(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "lu2k.daemon", "--check"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    cfg = daemon_config("127.0.0.1@tcp", 1, tmp_path)
    cfg["net"][0]["local NI(s)"][0]["tunables"]["peer_credits"] = "lots"
    cfg["net"][0]["local NI(s)"][0]["tunables"]["credits"] = -5
    cfg["net"][0]["lu2k"]["backend"] = "carrier-pigeon"
    bad.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "lu2k.daemon", "--config", str(bad), "--check"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "peer_credits" in res.stderr and "credits" in res.stderr.replace("peer_credits", "")
    cfg["net"][0]["local NI(s)"][0]["tunables"].update(peer_credits=8, credits=256)
    cfg["route"] = [{"net": "tcp1", "gateway": "1.2.3.4@o2ib"}]
    bad.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "lu2k.daemon", "--config", str(bad), "--check"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "1.2.3.4@o2ib" in res.stderr and "not on a local net" in res.stderr
    cfg["route"] = []
    cfg["lu2k"]["shim"]["tx_pool_bytes"] = 12
    bad.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "lu2k.daemon", "--config", str(bad), "--check"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "lu2k.shim.tx_pool_bytes" in res.stderr
    del cfg["lu2k"]["shim"]["tx_pool_bytes"]
    bad.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "lu2k.daemon", "--config", str(bad), "--check"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "carrier-pigeon" in res.stderr
