"""The shim ABI is language-neutral: contrib/lu2k_shim.h agrees with lu2k.kernel_shim.abi, and
contrib/shim_demo.c and contrib/shim_stream.c (lu2k_endpoint.h and libc only) attach, send and
receive against a real ShimServer.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lu2k.errors import Status
from lu2k.kernel_shim import abi
from lu2k.kernel_shim.endpoint import Endpoint, pack_nid
from lu2k.kernel_shim.loopback import LoopbackThread

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (CI installs gcc from .ci/requirements-apt.txt)")

# C struct -> (Python struct, [(field, struct format piece)]) -- the pieces must spell the
# Python format exactly, so this table is itself checked against abi.py.
LAYOUTS: dict[str, tuple[object, list[tuple[str, str]]]] = {
    "lu2k_ctl_hdr": (abi.CTL_HDR, [("cmd", "I"), ("seq", "I")]),
    "lu2k_ctl_reply": (abi.CTL_REPLY, [("cmd", "I"), ("seq", "I"), ("error", "i"), ("arg_len", "I"), ("reason", f"{abi.REASON_LEN}s")]),
    "lu2k_pool_class": (abi.POOL_CLASS, [("offset", "Q"), ("slot_size", "I"), ("count", "I")]),
    "lu2k_pool": (abi.POOL, [("nclasses", "I"), ("reserved", "I"), ("offset", "Q"), ("size", "Q"),
                             ("classes", f"{abi.POOL_CLASS.size * abi.MAX_CLASSES}s")]),
    "lu2k_ring_off": (abi.RING_OFF, [("ctrl", "Q"), ("descs", "Q"), ("entries", "I"), ("desc_size", "I")]),
    "lu2k_layout": (abi.LAYOUT, [("region_size", "Q"), ("max_message_size", "I"), ("reserved", "I"),
                                 ("tx", f"{abi.POOL.size}s"), ("rx", f"{abi.POOL.size}s"), ("rings", f"{abi.RING_OFF.size * 4}s")]),
    "lu2k_region_hdr": (abi.REGION_HDR, [("magic", "I"), ("abi_version", "I"), ("layout", f"{abi.LAYOUT.size}s")]),
    "lu2k_send_desc": (abi.SEND_DESC, [("cookie", "Q"), ("offset", "Q"), ("length", "I"), ("dst_portal", "I"),
                                       ("dst_nid", "20s"), ("flags", "I")]),
    "lu2k_completion": (abi.COMPLETION, [("cookie", "Q"), ("status", "i"), ("flags", "I"), ("reason", f"{abi.COMP_REASON_LEN}s")]),
    "lu2k_rx_desc": (abi.RX_DESC, [("offset", "Q"), ("length", "I"), ("src_portal", "I"), ("dst_portal", "I"),
                                   ("src_nid", "20s"), ("flags", "I"), ("reserved", "I")]),
    "lu2k_release_desc": (abi.RELEASE_DESC, [("offset", "Q")]),
    "lu2k_attach_in": (abi.ATTACH_IN, [("abi_version", "I"), ("portal", "I"), ("flags", "I"), ("reserved", "I"),
                                       ("tx_pool_bytes", "Q"), ("rx_pool_bytes", "Q")]),
    "lu2k_attach": (abi.ATTACH, [("in", f"{abi.ATTACH_IN.size}s"), ("local_nid", "20s"), ("max_in_flight", "I"),
                                 ("layout", f"{abi.LAYOUT.size}s")]),
    "lu2k_info": (abi.INFO, [("abi_version", "I"), ("portal", "I"), ("daemon_pid", "I"), ("nports", "I"),
                             ("local_nid", "20s"), ("max_message_size", "I"), ("max_in_flight", "I")]),
    "lu2k_stats": (abi.STATS, []),
}

NUMBERS = {
    "LU2K_ABI_VERSION": abi.ABI_VERSION, "LU2K_REGION_MAGIC": abi.REGION_MAGIC, "LU2K_NID_SIZE": 20,
    "LU2K_CMD_ATTACH": abi.CMD_ATTACH, "LU2K_CMD_DETACH": abi.CMD_DETACH, "LU2K_CMD_INFO": abi.CMD_INFO,
    "LU2K_CMD_STATS": abi.CMD_STATS, "LU2K_REASON_LEN": abi.REASON_LEN, "LU2K_COMP_REASON_LEN": abi.COMP_REASON_LEN,
    "LU2K_MAX_CLASSES": abi.MAX_CLASSES, "LU2K_HDR_DAEMON_FLAGS": abi.HDR_DAEMON_FLAGS,
    "LU2K_HDR_ENDPOINT_FLAGS": abi.HDR_ENDPOINT_FLAGS, "LU2K_HEADER_SIZE": abi.HEADER_SIZE,
    "LU2K_FLAG_NEED_WAKEUP": abi.FLAG_NEED_WAKEUP, "LU2K_FLAG_NEED_WAKEUP_RELEASE": abi.FLAG_NEED_WAKEUP_RELEASE,
    "LU2K_COMP_EVENT": abi.COMP_EVENT, "LU2K_SEND_FLAGS_KNOWN": abi.SEND_FLAGS_KNOWN, "LU2K_RING_CTRL_SIZE": abi.RING_CTRL_SIZE,
    "LU2K_RING_PRODUCER_OFF": abi.RING_PRODUCER_OFF, "LU2K_RING_CONSUMER_OFF": abi.RING_CONSUMER_OFF,
    "LU2K_RING_SUBMIT": abi.RING_SUBMIT, "LU2K_RING_COMPLETE": abi.RING_COMPLETE,
    "LU2K_RING_DELIVER": abi.RING_DELIVER, "LU2K_RING_RELEASE": abi.RING_RELEASE,
    **{f"LU2K_STATUS_{s.name}": int(s) for s in Status},
    "linux.ATTACH": abi.CMD_ATTACH, "linux.DETACH": abi.CMD_DETACH, "linux.INFO": abi.CMD_INFO, "linux.STATS": abi.CMD_STATS,
}


def build(tmp_path: Path, source: str) -> str:
    exe = str(tmp_path / Path(source).stem)
    subprocess.run([CC, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{CONTRIB}", "-o", exe, str(CONTRIB / source)],  # type: ignore[list-item]
                   check=True, capture_output=True, text=True)
    return exe


def expected() -> dict[str, int]:
    out = dict(NUMBERS)
    for name, (st, fields) in LAYOUTS.items():
        out[f"sizeof.{name}"] = st.size  # type: ignore[attr-defined]
        if fields:
            assert "<" + "".join(p for _f, p in fields) == st.format, f"test table for {name} is out of date"  # type: ignore[attr-defined]
        off = 0
        for field, piece in fields:
            out[f"offsetof.{name}.{field}"] = off
            off += struct.calcsize("<" + piece)
    return out


def test_header_matches_python_abi(tmp_path: Path) -> None:
    exe = build(tmp_path, "shim_abi_check.c")
    printed = dict(line.rsplit(" ", 1) for line in subprocess.run([exe], check=True, capture_output=True, text=True).stdout.splitlines())
    got = {k: int(v) for k, v in printed.items()}
    want = expected()
    assert set(got) == set(want)
    mismatches = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert mismatches == {}


def test_c_demo_sends_and_receives_through_the_abi(tmp_path: Path) -> None:
    exe = build(tmp_path, "shim_demo.c")
    path = str(tmp_path / "shim.sock")
    with LoopbackThread(path) as t, Endpoint.attach(path, 2) as ep:
        proc = subprocess.Popen([exe, path, "1", "2", "hello from C"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            m = ep.recv(timeout=30)
            assert m is not None, "no message from the C demo"
            assert (bytes(m.payload), m.src_portal, m.dst_portal) == (b"hello from C", 1, 2)
            m.release()
            ep.send(ep.local_nid, b"hello from Python", portal=1).result(30)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        lines = out.splitlines()
        assert lines[0].startswith("attached portal=1 ")
        assert lines[1] == "sent cookie=42 status=0 reason="
        assert lines[2] == "received src_portal=2 dst_portal=1 len=17 data=hello from Python"
        assert lines[3].startswith("stats submitted=1 completed=1 delivered=1 ")
        assert lines[4] == "detached"
        assert 1 not in t.call(lambda: dict(t.server.ports))  # DETACH unbound the portal


def test_c_demo_reports_refusal(tmp_path: Path) -> None:
    exe = build(tmp_path, "shim_demo.c")
    path = str(tmp_path / "shim.sock")
    with LoopbackThread(path), Endpoint.attach(path, 1):
        proc = subprocess.run([exe, path, "1", "2", "x"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert os.strerror(errno.EADDRINUSE) in proc.stderr and "portal 1 is bound" in proc.stderr


def _stream(exe: str, path: str, nid: str, size: int, count: int, window: int, recv_size: int | None = None) -> tuple[Any, Any]:
    rx = subprocess.Popen([exe, "recv", path, "2", str(recv_size or size), str(count)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        assert rx.stdout is not None and rx.stdout.readline() == "ready\n"
        tx = subprocess.run([exe, "send", path, "1", nid, "2", str(size), str(count), str(window)], capture_output=True,
                            text=True, timeout=120)
        out, err = rx.communicate(timeout=60)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    return tx, (rx.returncode, out, err)


def test_c_stream_moves_every_message_once(tmp_path: Path) -> None:
    exe = build(tmp_path, "shim_stream.c")
    path = str(tmp_path / "shim.sock")
    with LoopbackThread(path) as t, Endpoint.attach(path, 9) as ep:
        nid = pack_nid(ep.local_nid).hex()
        tx, (rx_code, out, err) = _stream(exe, path, nid, 100, 20_000, 64)
        assert tx.returncode == 0 and rx_code == 0, tx.stderr + err
        sent = dict(w.split("=") for w in tx.stdout.split()[1:])
        got = dict(w.split("=") for w in out.split()[1:])
        assert tx.stdout.startswith("sent ") and (sent["count"], sent["failed"]) == ("20000", "0")
        assert out.startswith("received ") and (got["count"], got["bytes"]) == ("20000", str(20_000 * 100))
        assert int(sent["start_ns"]) < int(got["last_ns"])
        # The receiver checked each message's number: 20 000 distinct numbers below 20 000 is each once.
        assert set(t.call(lambda: list(t.server.ports))) == {9}  # both detached


def test_c_stream_receiver_refuses_a_message_of_the_wrong_length(tmp_path: Path) -> None:
    exe = build(tmp_path, "shim_stream.c")
    path = str(tmp_path / "shim.sock")
    with LoopbackThread(path), Endpoint.attach(path, 9) as ep:
        tx, (rx_code, _out, err) = _stream(exe, path, pack_nid(ep.local_nid).hex(), 64, 10, 4, recv_size=32)
    assert rx_code == 1 and "message of 64 bytes" in err and "expected 32 bytes" in err


@pytest.mark.parametrize("args, said", [
    (["send", "/x", "1", "zz" * 20, "2", "64", "10", "8"], "DST_NID has a non-hex digit"),
    (["send", "/x", "1", "ab", "2", "64", "10", "8"], "DST_NID must be 40 hex digits"),
    (["send", "/x", "1", "00" * 20, "2", "0", "10", "8"], "SIZE must be a number from 1"),
    (["send", "/x", "1", "00" * 20, "2", "64", "-1", "8"], "COUNT must be a number from 1"),
    (["recv", "/x", "port", "64", "10"], "PORTAL must be a number"),
    (["bogus"], "usage:"),
])
def test_c_stream_names_a_bad_argument(tmp_path: Path, args: list[str], said: str) -> None:
    exe = build(tmp_path, "shim_stream.c")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr
