"""``lu2k send`` / ``lu2k recv`` through two real lu2kd on loopback: files, directories, streams,
concurrency, interruption and resume, and every failure the user must be told about."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lu2k.localpair import DaemonProcess, daemons

pytestmark = pytest.mark.timeout(180)

LU2K = [sys.executable, "-m", "lu2k.cli.main"]


@pytest.fixture
def pair() -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"]) as (a, b):
        yield a, b


def send(a: DaemonProcess, b: DaemonProcess, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LU2K, "send", "--socket", a.shim_path, b.nid, *args], capture_output=True, text=True, timeout=timeout)


def serve(b: DaemonProcess, root: Path, *extra: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([*LU2K, "recv", "--socket", b.shim_path, "--serve", str(root), *extra], stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    assert "serving" in p.stderr.readline()
    return p


def stop(p: subprocess.Popen[str]) -> str:
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "Traceback" not in err
    return err


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for(cond: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_files_and_directories_keep_names_sizes_modes_mtimes_from_two_concurrent_senders(pair, tmp_path: Path) -> None:
    a, b = pair
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "tree" / "sub").mkdir(parents=True)
    dst.mkdir()
    for i, size in enumerate((0, 1, 130816, 130817, 700_000)):
        f = src / "tree" / f"f{i}"
        f.write_bytes(os.urandom(size))
        os.utime(f, ns=(1_600_000_000_123_456_789 + i, 1_600_000_000_123_456_789 + i))
    script = src / "tree" / "sub" / "run.sh"
    script.write_bytes(b"#!/bin/sh\necho hi\n")
    script.chmod(0o751)
    os.utime(src / "tree" / "sub", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    big = src / "big.bin"
    big.write_bytes(os.urandom(3_000_000))
    srv = serve(b, dst)
    p1 = subprocess.Popen([*LU2K, "send", "--socket", a.shim_path, b.nid, str(src / "tree")], stderr=subprocess.PIPE, text=True)
    p2 = subprocess.Popen([*LU2K, "send", "--socket", a.shim_path, b.nid, str(big)], stderr=subprocess.PIPE, text=True)
    for p in (p1, p2):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "all verified at the destination" in err
    log = stop(srv)
    assert log.count("verified") == 7, log  # 6 files in the tree + big.bin
    for f in sorted(src.rglob("*")):
        g = dst / f.relative_to(src)
        st, gt = f.stat(), g.stat()
        assert (st.st_mode, st.st_mtime_ns) == (gt.st_mode, gt.st_mtime_ns), f
        if f.is_file():
            assert sha(f) == sha(g), f
    assert not list(dst.rglob("*.lu2k-*"))


def test_two_senders_to_one_stream_receiver_second_is_told_busy(pair, tmp_path: Path) -> None:
    a, b = pair
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_bytes(os.urandom(2_000_000))
    two.write_bytes(os.urandom(1000))
    out = tmp_path / "out"
    recv = subprocess.Popen([*LU2K, "recv", "--socket", b.shim_path, "-o", str(out), "--timeout", "60"], stderr=subprocess.PIPE, text=True)
    assert recv.stderr is not None and "waiting on portal 0" in recv.stderr.readline()
    # 8 s at 2 Mbit/s: the second sender's start-up must fit inside it on a loaded machine
    p1 = subprocess.Popen([*LU2K, "send", "--socket", a.shim_path, "--rate", "2mbit", b.nid, str(one)], stderr=subprocess.PIPE, text=True)
    wait_for(lambda: out.with_name("out.lu2k-part").exists(), "first sender never started")
    r2 = send(a, b, str(two))
    assert r2.returncode == 4 and "busy" in r2.stderr and "127.0.0.1@tcp" in r2.stderr, r2.stderr
    _, err = p1.communicate(timeout=60)
    assert p1.returncode == 0, err
    _, rerr = recv.communicate(timeout=60)
    assert recv.returncode == 0, rerr
    assert out.read_bytes() == one.read_bytes()


def test_stdin_goes_out_before_end_of_input_and_recv_dash_writes_in_order(pair) -> None:
    a, b = pair
    recv = subprocess.Popen([*LU2K, "recv", "--socket", b.shim_path, "-o", "-", "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert recv.stderr is not None and b"waiting on portal 0" in recv.stderr.readline()
    sender = subprocess.Popen([*LU2K, "send", "-q", "--socket", a.shim_path, b.nid, "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert sender.stdin is not None and recv.stdout is not None
    sender.stdin.write(b"hi\n")
    sender.stdin.flush()
    line = recv.stdout.readline()
    assert line == b"hi\n", (recv.wait(10), recv.stderr.read() if recv.stderr else "", sender.stderr.read() if sender.stderr else "")
    # ... while the sender's input is still open
    body = b"".join(b"%08d\n" % i for i in range(200_000))
    got: list[tuple[bytes, bytes]] = []
    reader = threading.Thread(target=lambda: got.append(recv.communicate(timeout=90)))
    reader.start()  # the receiver's stdout is a pipe: keep draining it
    sender.stdin.write(body)
    sender.stdin.close()
    assert sender.wait(60) == 0, sender.stderr.read() if sender.stderr else ""
    reader.join(90)
    rest, err = got[0]
    if sender.stderr is not None:
        sender.stderr.close()
    assert recv.returncode == 0, err
    assert rest == body


def test_interrupted_sender_leaves_a_marked_partial_and_a_rerun_resumes(pair, tmp_path: Path) -> None:
    a, b = pair
    dst = tmp_path / "dst"
    dst.mkdir()
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(4_000_000))
    srv = serve(b, dst)
    p = subprocess.Popen([*LU2K, "send", "--socket", a.shim_path, "--rate", "4mbit", b.nid, str(f)], stderr=subprocess.PIPE, text=True)
    state = dst / ".data.bin.lu2k-state"
    wait_for(state.exists, "no progress recorded")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and "interrupted" in err and "resume" in err, err
    assert not (dst / "data.bin").exists() and (dst / ".data.bin.lu2k-part").exists()
    r = send(a, b, str(f))
    assert r.returncode == 0, r.stderr
    again = send(a, b, str(f))  # already there: verified, not resent
    assert again.returncode == 0 and "0.0 kbit/s" in again.stderr, again.stderr
    log = stop(srv)
    assert "(already in place)" in log
    assert "sender aborted" in log and "kept as .data.bin.lu2k-part" in log, log
    assert "resuming data.bin" in log and "already verified" in log, log
    assert sha(dst / "data.bin") == sha(f)
    assert not (dst / ".data.bin.lu2k-part").exists() and not state.exists()


def test_receiver_daemon_restart_mid_transfer_resumes_and_verifies(pair, tmp_path: Path) -> None:
    a, b = pair
    dst = tmp_path / "dst"
    dst.mkdir()
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(3_000_000))
    srv = serve(b, dst)
    p = subprocess.Popen([*LU2K, "send", "--socket", a.shim_path, "--rate", "4mbit", "--retry-for", "90", b.nid, str(f)],
                         stderr=subprocess.PIPE, text=True)
    wait_for((dst / ".data.bin.lu2k-state").exists, "no progress recorded")
    b.stop()
    b.start()
    _, err = p.communicate(timeout=150)
    assert p.returncode == 0, err
    stop(srv)
    assert sha(dst / "data.bin") == sha(f)


def test_failures_are_named_with_their_exit_status(pair, tmp_path: Path) -> None:
    a, b = pair
    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(100_000))
    r = send(a, b, str(f))
    assert r.returncode == 3 and "nothing receives on 127.0.0.2@tcp portal 0" in r.stderr, r.stderr
    r = send(a, b, str(tmp_path / "missing"))
    assert r.returncode == 2 and "missing: No such file or directory" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*LU2K, "recv", "--socket", b.shim_path, "--timeout", "0.5"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "no sender within 0.5 s" in r.stderr, r.stderr
    r = subprocess.run([*LU2K, "recv", "--socket", b.shim_path, "-o", str(tmp_path / "no" / "x")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*LU2K, "recv", "--socket", b.shim_path, "--serve", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "nowhere does not exist" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*LU2K, "send", "--socket", a.shim_path, "--rate", "fast", b.nid, str(f)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "bad rate 'fast'" in r.stderr

    dst = tmp_path / "dst"
    (dst / "f.bin").mkdir(parents=True)  # a directory where the file would go
    srv = serve(b, dst, "--allow-from", "127.0.0.9@tcp")
    r = send(a, b, str(f))
    assert r.returncode == 4 and "refused" in r.stderr and "127.0.0.1@tcp is not allowed" in r.stderr, r.stderr
    stop(srv)
    srv = serve(b, dst)
    r = send(a, b, str(f))
    assert r.returncode == 5 and "f.bin is a directory at the receiver" in r.stderr, r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.lu2k-part").write_bytes(b"sneaky")
    r = send(a, b, str(bad))
    assert r.returncode == 4 and "reserved suffixes" in r.stderr, r.stderr
    stop(srv)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_at_the_receiver(pair, tmp_path: Path) -> None:
    a, b = pair
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "ap-tmpfs", str(small)], check=True)
    try:
        srv = serve(b, small)
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(3_000_000))
        ok = tmp_path / "ok.bin"
        ok.write_bytes(os.urandom(200_000))
        r = send(a, b, str(big), str(ok))
        assert r.returncode == 5, r.stderr
        assert "big.bin: disk full: big.bin needs 3,000,000 bytes" in r.stderr and "1 of 2 NOT transferred" in r.stderr, r.stderr
        assert sha(small / "ok.bin") == sha(ok) and not (small / "big.bin").exists()
        stop(srv)
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_progress_line_on_a_terminal_summary_line_otherwise(pair, tmp_path: Path) -> None:
    import pty

    a, b = pair
    dst = tmp_path / "dst"
    dst.mkdir()
    f = tmp_path / "p.bin"
    f.write_bytes(os.urandom(1_500_000))
    srv = serve(b, dst)
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([*LU2K, "send", "--socket", a.shim_path, "--rate", "4mbit", b.nid, str(f)], stderr=slave,
                             stdin=subprocess.DEVNULL)
        os.close(slave)
        out = b""
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the sender closed its end
                break
            if not data:
                break
            out += data
        assert p.wait(timeout=60) == 0
    finally:
        os.close(master)
    text = out.decode()
    assert "\r\x1b[K" in text, text  # redrawn in place
    drawn = [line for line in text.split("\r\x1b[K") if "ETA" in line]
    assert drawn and "MB" in drawn[0] and "bit/s" in drawn[0] and "resent" in drawn[0], text
    assert "sent 1 entry" in text and "all verified at the destination" in text
    r = send(a, b, str(f))  # not a terminal: no redrawing, one summary line
    assert r.returncode == 0 and "\x1b" not in r.stderr and r.stderr.count("\n") == 1 and "sent 1 entry" in r.stderr, r.stderr
    stop(srv)


def test_small_files_go_inline_and_again_are_only_verified_or_found_different(pair, tmp_path: Path) -> None:
    """A file of at most one chunk goes out whole in its first OFFER (one round trip): the
    sessions never send a separate DATA.  Sent again it is verified in place; changed under the
    same size and mtime it is refused as different."""
    import asyncio

    from lu2k.apps import transfer_proto as tp
    from lu2k.apps.transfer import Sender, collect

    a, b = pair
    src, dst = tmp_path / "small", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for i in range(6):  # 0 B .. 5 KB, and one of a whole default chunk
        (src / f"s{i}").write_bytes(os.urandom(i * 997))
    (src / "whole").write_bytes(os.urandom(tp.DEFAULT_CHUNK - 100))
    srv = serve(b, dst)
    entries, problems = collect([str(src)])
    assert not problems
    sender = Sender(a.shim_path, b.nid)
    assert asyncio.run(sender.run(entries)) == 0
    files = [s for s in sender.sessions.values() if s.entry is tp.Entry.FILE]
    assert len(files) == 7 and all(s.outcome is tp.Outcome.OK for s in files)
    assert all(s.offers == 1 and not s.delivered and not s.have for s in files)  # inline: no DATA, no ACCEPT
    for f in src.iterdir():
        assert sha(dst / "small" / f.name) == sha(f)
        assert (dst / "small" / f.name).stat().st_mtime_ns == f.stat().st_mtime_ns
    plain = Sender(a.shim_path, b.nid, inline=False)  # lu2k send --no-inline; the same files under another name
    renamed = tmp_path / "plainly"
    src.rename(renamed)
    entries, _ = collect([str(renamed)])
    assert asyncio.run(plain.run(entries)) == 0
    sent = [s for s in plain.sessions.values() if s.entry is tp.Entry.FILE]
    assert all(s.outcome is tp.Outcome.OK and s.offers == 1 for s in sent)
    assert all(s.delivered == {0} for s in sent if s.size)  # each one's DATA went separately
    renamed.rename(src)
    again = send(a, b, str(src))
    assert again.returncode == 0, again.stderr
    changed = src / "s3"
    st = changed.stat()
    changed.write_bytes(os.urandom(st.st_size))
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
    differs = send(a, b, str(src))
    assert differs.returncode == 4 and "other content" in differs.stderr, differs.stderr
    log = stop(srv)
    assert log.count("(already in place)") == 7 + 6, log  # all seven, then the six unchanged
    one = tmp_path / "one.txt"
    one.write_bytes(b"to a one-shot receiver")
    out = tmp_path / "out.txt"
    recv = subprocess.Popen([*LU2K, "recv", "--socket", b.shim_path, "-o", str(out), "--timeout", "60"], stderr=subprocess.PIPE, text=True)
    assert recv.stderr is not None and "waiting on portal 0" in recv.stderr.readline()
    r = send(a, b, str(one))
    assert r.returncode == 0, r.stderr
    _, rerr = recv.communicate(timeout=60)
    assert recv.returncode == 0 and out.read_bytes() == one.read_bytes(), rerr
