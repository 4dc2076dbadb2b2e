"""lu2k.lab.forwarder: control commands (pure) and packets through real TUN devices."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lu2k.lab.forwarder import Forwarder
from lu2k.lab.netns import Lab, LabState, child_env
from lu2k.lab.spec import build_specs

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def _forwarder(tmp_path: Path) -> Forwarder:
    st = LabState("f1", subnet=1, specs=build_specs("geo", loss="1%"))
    return Forwarder(st, st.path(tmp_path))  # no setup(): the command handling needs no devices


def test_control_commands_flap_one_or_both_directions(tmp_path: Path) -> None:
    fwd = _forwarder(tmp_path)
    assert fwd.handle_command({"cmd": "down", "direction": "ab"})["up"] == {"ab": False, "ba": True}
    assert fwd.handle_command({"cmd": "down"})["up"] == {"ab": False, "ba": False}
    assert fwd.handle_command({"cmd": "up"})["up"] == {"ab": True, "ba": True}
    assert "direction" in fwd.handle_command({"cmd": "down", "direction": "sideways"})["error"]
    assert "unknown command" in fwd.handle_command({"cmd": "explode"})["error"]
    assert fwd.handle_command({"cmd": "ping"})["ok"] is True


def test_control_commands_address_one_path_or_all(tmp_path: Path) -> None:
    st = LabState("f2", subnet=1, specs=build_specs("geo"), extra_paths=(build_specs("leo", loss="1%"),))
    fwd = Forwarder(st, st.path(tmp_path))
    reply = fwd.handle_command({"cmd": "down", "path": 1})
    assert reply["up"] == {"ab": False, "ba": False}
    assert reply["paths"] == [{"ab": True, "ba": True}, {"ab": False, "ba": False}]
    assert fwd.handle_command({"cmd": "down", "path": "all", "direction": "ab"})["paths"][0] == {"ab": False, "ba": True}
    assert fwd.handle_command({"cmd": "up", "path": "all"})["paths"] == [{"ab": True, "ba": True}] * 2
    for bad in (2, -1, "1", True, None):
        assert "no path" in fwd.handle_command({"cmd": "down", "path": bad})["error"]
    s = fwd.stats()
    assert [p["path"] for p in s["paths"]] == [0, 1]
    assert s["paths"][1]["queue_limit_bytes"]["ab"] == 250_000  # leo: one BDP of 50 Mbit/s x 40 ms
    assert s["links"] == s["paths"][0]["links"] and s["queue_limit_bytes"]["ab"] == 1_500_000


def test_stats_shape_and_stats_file(tmp_path: Path) -> None:
    fwd = _forwarder(tmp_path)
    s = fwd.stats()
    assert set(s["links"]) == {"ab", "ba"}
    assert s["queue_limit_bytes"]["ab"] == 1_500_000
    fwd.write_stats()
    assert (tmp_path / "f1.stats.json").exists()


SERVER = """
import hashlib, socket, sys
srv = socket.socket(); srv.bind((sys.argv[1], 7000)); srv.listen(1)
print("listening", flush=True)
c, _ = srv.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""
CLIENT = """
import socket, sys
data = bytes(range(256)) * 4096 * 2  # 2 MiB
s = socket.create_connection((sys.argv[1], 7000), timeout=60); s.sendall(data); s.close()
"""


@needs_root
@pytest.mark.netns
def test_kernel_tcp_stream_survives_loss_and_reordering_intact(lab_dir: Path) -> None:
    specs = build_specs("leo", rate="20mbit", loss="2%", reorder="3%", jitter="1ms", seed=2)
    with Lab(specs) as lab:
        srv = lab.popen("b", [sys.executable, "-c", SERVER, lab.addr_b], stdout=subprocess.PIPE, text=True, env=child_env())
        assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"
        lab.run("a", [sys.executable, "-c", CLIENT, lab.addr_b], check=True, timeout=120)
        out, _ = srv.communicate(timeout=120)
        # The last ACKs may still be on the emulated wire; count once it is empty.
        deadline = time.monotonic() + 10
        while (stats := lab.stats())["in_flight_bytes"]["ab"] and time.monotonic() < deadline:
            time.sleep(0.05)
    n, digest = out.split()
    data = bytes(range(256)) * 4096 * 2
    assert int(n) == len(data) and digest == hashlib.sha256(data).hexdigest()
    ab = stats["links"]["ab"]
    assert ab["drops_loss"] > 0 and ab["reordered"] > 0
    # Conservation: every packet in was released, dropped, or is still in flight (none here).
    assert ab["packets_in"] == ab["packets_out"] + ab["drops_loss"] + ab["drops_queue"] + ab["drops_down"]
    assert ab["lateness"]["count"] == ab["packets_out"] - stats["overflow_drops"]
    assert stats["write_errors"] == 0


# --- the loop itself, without root: packet socketpairs stand in for the TUN fds ------------------
# A TUN fd and a SOCK_SEQPACKET socket both read and write one packet per call, which is all
# the loop relies on; the far ends of the pairs play the two namespaces' IP stacks.


class _Harness:
    def __init__(self, tmp_path: Path, specs: tuple, lab_id: str, extra_paths: tuple = ()) -> None:
        import secrets
        import socket
        import threading

        from lu2k.lab.netns import control_address

        st = LabState(lab_id + secrets.token_hex(2), subnet=1, specs=specs, extra_paths=extra_paths)
        self.fwd = Forwarder(st, st.path(tmp_path))
        # SEQPACKET: one packet per read/write like a TUN fd, and (unlike SOCK_DGRAM, whose queue
        # is max_dgram_qlen = 10 packets) a queue bounded in bytes that we can make roomy, so a
        # burst of releases never fails with EAGAIN while the reading thread waits for the GIL.
        self.far: dict[tuple[int, str], socket.socket] = {}
        near = []
        for i in range(1 + len(extra_paths)):
            for side in ("a", "b"):
                far_s, near_s = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                for sock in (far_s, near_s):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                near_s.setblocking(False)
                self.far[(i, side)] = far_s
                near.append(near_s)
                self.fwd.fds[(i, side)] = near_s.fileno()
        self.a_far, self.b_far = self.far[(0, "a")], self.far[(0, "b")]
        self._near = tuple(near)
        self.fwd.ctl = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.fwd.ctl.bind(control_address(st.lab_id))
        self.fwd.ctl.setblocking(False)
        self.wake_r, self.wake_w = os.pipe()
        self.thread = threading.Thread(target=self.fwd.run, args=(self.wake_r,))
        self.thread.start()

    def recv_all(self, sock: "object", n: int, timeout: float = 10.0) -> list[bytes]:
        sock.settimeout(timeout)  # type: ignore[attr-defined]
        return [sock.recv(4096) for _ in range(n)]  # type: ignore[attr-defined]

    def start_reader(self, sock: "object", n: int) -> "object":
        """Read while the test sends (the pair's buffers are finite, a TUN device's stack is not)."""
        import concurrent.futures

        pool = concurrent.futures.ThreadPoolExecutor(1)
        fut = pool.submit(self.recv_all, sock, n)
        pool.shutdown(wait=False)
        return fut

    def close(self) -> None:
        self.fwd.stopping = True
        os.write(self.wake_w, b"x")
        self.thread.join(10)
        assert self.fwd.ctl is not None
        self.fwd.ctl.close()
        for s in (*self._near, *self.far.values()):
            s.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


def test_loop_carries_both_directions_in_order_with_delay(tmp_path: Path) -> None:
    from lu2k.lab.spec import LinkSpec

    # 2 Mbit/s spaces releases 4 ms apart, so the reader keeps up with the short socketpair queue.
    spec = LinkSpec(rate_bps=2e6, delay_s=0.01, jitter_s=0.002, queue_bytes=400_000, seed=3)
    h = _Harness(tmp_path, (spec, spec), "lp")
    try:
        reader = h.start_reader(h.b_far, 200)
        for i in range(200):
            h.a_far.send(i.to_bytes(4, "big") + bytes(1000))
        got = [int.from_bytes(p[:4], "big") for p in reader.result()]  # type: ignore[attr-defined]
        assert got == list(range(200))  # jitter, yet no reordering
        h.b_far.send(b"back")
        assert h.recv_all(h.a_far, 1) == [b"back"]
        from lu2k.lab.netns import send_control

        stats = send_control(h.fwd.state.lab_id, {"cmd": "stats"})
        ab = stats["links"]["ab"]
        assert ab["packets_out"] == 200 and ab["lateness"]["count"] == 200
        assert stats["links"]["ba"]["packets_out"] == 1
        assert send_control(h.fwd.state.lab_id, {"cmd": "down"})["up"] == {"ab": False, "ba": False}
        h.a_far.send(b"lost")
        # The packet and the next stats request may be served in either order in one wakeup,
        # and on a loaded machine the packet may not have been read yet: wait for it (bounded).
        deadline = time.monotonic() + 30
        while not send_control(h.fwd.state.lab_id, {"cmd": "stats"})["links"]["ab"]["drops_down"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert h.fwd.models["ab"].counters.drops_down == 1
        assert h.fwd.write_errors == 0
    finally:
        h.close()


def test_loop_loss_matches_the_model_and_reorder_reorders(tmp_path: Path) -> None:
    import time as _t

    from lu2k.lab.spec import LinkSpec

    spec = LinkSpec(rate_bps=2e6, delay_s=0.005, loss=0.1, reorder=0.2, reorder_delay_s=0.02, queue_bytes=400_000, seed=8)
    h = _Harness(tmp_path, (spec, spec), "lr")
    try:
        for i in range(300):
            h.a_far.send(i.to_bytes(4, "big") + bytes(996))
        deadline = _t.monotonic() + 10
        while h.fwd.models["ab"].counters.packets_in < 300 and _t.monotonic() < deadline:
            _t.sleep(0.01)
        # The model's own tally says how many must arrive; the first has not left yet.
        expect = h.fwd.models["ab"].counters.packets_out
        assert 230 < expect < 290
        got = [int.from_bytes(p[:4], "big") for p in h.recv_all(h.b_far, expect)]
        assert len(set(got)) == expect
        assert got != sorted(got)  # reordered
        assert h.fwd.write_errors == 0
    finally:
        h.close()


def test_loop_bounds_bytes_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lu2k.lab.forwarder as fwd_mod
    from lu2k.lab.spec import LinkSpec

    monkeypatch.setattr(fwd_mod, "MAX_IN_FLIGHT_BYTES", 10_000)
    spec = LinkSpec(rate_bps=0, delay_s=0.2)
    h = _Harness(tmp_path, (spec, spec), "lo")
    try:
        for _ in range(30):
            h.a_far.send(bytes(1000))
        got = h.recv_all(h.b_far, 10)
        assert len(got) == 10
        assert h.fwd.overflow_drops == 20
        assert h.fwd.paths[0]["ab"].max_in_flight_bytes <= 10_000
    finally:
        h.close()


def test_loop_runs_two_paths_with_their_own_models_and_counters(tmp_path: Path) -> None:
    from lu2k.lab.netns import send_control
    from lu2k.lab.spec import LinkSpec

    slow = LinkSpec(rate_bps=2e6, delay_s=0.01, queue_bytes=400_000, seed=3)
    lossy = LinkSpec(rate_bps=4e6, delay_s=0.002, loss=0.2, queue_bytes=400_000, seed=5)
    h = _Harness(tmp_path, (slow, slow), "mp", extra_paths=((lossy, lossy),))
    lab_id = h.fwd.state.lab_id
    try:
        p0 = h.start_reader(h.far[(0, "b")], 100)
        for i in range(100):
            h.far[(0, "a")].send(i.to_bytes(4, "big") + bytes(500))
            h.far[(1, "a")].send(bytes([0x60]) + i.to_bytes(4, "big") + bytes(500))  # IPv6 version nibble
        assert [int.from_bytes(p[:4], "big") for p in p0.result()] == list(range(100))  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while h.fwd.paths[1]["ab"].model.counters.packets_in < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        expect = h.fwd.paths[1]["ab"].model.counters.packets_out
        assert 50 < expect < 100  # 20 % loss on path 1 only
        got = h.recv_all(h.far[(1, "b")], expect)
        assert all(p[0] == 0x60 for p in got)
        stats = send_control(lab_id, {"cmd": "stats"})
        one, two = stats["paths"][0]["links"]["ab"], stats["paths"][1]["links"]["ab"]
        assert one["packets_out"] == 100 and one["drops_loss"] == 0 and one["packets_ipv6"] == 0
        assert two["packets_in"] == 100 and two["drops_loss"] == 100 - expect
        assert two["packets_ipv6"] == 100 and two["bytes_ipv6"] == 100 * 505
        # Cut path 1 only: path 0 still carries, path 1 drops as down.
        assert send_control(lab_id, {"cmd": "down", "path": 1})["paths"][0] == {"ab": True, "ba": True}
        h.far[(1, "a")].send(b"cut")
        h.far[(0, "a")].send(b"still")
        assert h.recv_all(h.far[(0, "b")], 1) == [b"still"]
        deadline = time.monotonic() + 10
        while not h.fwd.paths[1]["ab"].model.counters.drops_down and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h.fwd.paths[1]["ab"].model.counters.drops_down == 1
        assert h.fwd.paths[0]["ab"].model.counters.drops_down == 0
        # The reverse direction of path 1 is its own channel too.
        send_control(lab_id, {"cmd": "up", "path": 1})
        h.far[(1, "b")].send(b"back")
        assert h.recv_all(h.far[(1, "a")], 1) == [b"back"]
        assert h.fwd.write_errors == 0
    finally:
        h.close()
