"""``lu2k forward`` through two real lu2kd on loopback, with real programs: curl against
``python -m http.server`` (port and SOCKS5), ssh and rsync-over-ssh against Debian's
openssh, half-close, resets both ways, back-pressure from a target that does not read, and
refused / disallowed / nonexistent targets."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lu2k.apps import forward_proto as fp
from lu2k.apps.forward import refusal_for
from lu2k.localpair import DaemonProcess, daemons, free_port

pytestmark = pytest.mark.timeout(180)

LU2K = [sys.executable, "-m", "lu2k.cli.main"]


class Forward:
    """A forward service at b and a forwarding listener at a (``--listen`` and ``--socks``)."""

    def __init__(self, a: DaemonProcess, b: DaemonProcess, target: str, allow: list[str], window: str = "8m") -> None:
        self.srv = subprocess.Popen([*LU2K, "forward", "--socket", b.shim_path, "--serve", "--window", window,
                                     *[x for r in allow for x in ("--allow", r)]], stderr=subprocess.PIPE, text=True)
        assert self.srv.stderr is not None and "serving on portal 2" in self.srv.stderr.readline()
        self.cli = subprocess.Popen([*LU2K, "forward", "--socket", a.shim_path, "--to", b.nid, "--window", window,
                                     "--listen", "127.0.0.1:0", "--target", target, "--socks", "127.0.0.1:0"],
                                    stderr=subprocess.PIPE, text=True)
        assert self.cli.stderr is not None
        first, second = self.cli.stderr.readline(), self.cli.stderr.readline()
        m1, m2 = re.search(r"on 127\.0\.0\.1:(\d+) ->", first), re.search(r"SOCKS5 on 127\.0\.0\.1:(\d+)", second)
        assert m1 and m2, first + second
        self.port, self.socks = int(m1.group(1)), int(m2.group(1))

    def close(self) -> tuple[str, str]:
        out = []
        for p in (self.cli, self.srv):
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=30)
            assert "Traceback" not in err, err
            out.append(err)
        return out[0], out[1]


@pytest.fixture
def pair() -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    with daemons(["127.0.0.1@tcp", "127.0.0.2@tcp"]) as (a, b):
        yield a, b


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.05)
        yield port, root
    finally:
        p.terminate()
        p.wait(10)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed (apt-get install curl)")
def test_curl_download_through_port_and_socks(pair, http_server, tmp_path: Path) -> None:
    a, b = pair
    port, root = http_server
    blob = os.urandom(12_000_000)
    (root / "blob.bin").write_bytes(blob)
    fw = Forward(a, b, f"127.0.0.1:{port}", [f"127.0.0.1:{port}"])
    try:
        outs = []
        for i, extra in enumerate((["http://127.0.0.1:%d/blob.bin" % fw.port],
                                   ["--socks5-hostname", f"127.0.0.1:{fw.socks}", f"http://127.0.0.1:{port}/blob.bin"])):
            out = tmp_path / f"got{i}"
            r = subprocess.run(["curl", "-sS", "--fail", "-o", str(out), *extra], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            outs.append(out)
        # many connections at once share the one peer
        procs = [subprocess.Popen(["curl", "-sS", "--fail", f"http://127.0.0.1:{fw.port}/blob.bin"], stdout=subprocess.PIPE)
                 for _ in range(6)]
        bodies = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs)
        denied = subprocess.run(["curl", "-sS", "--socks5-hostname", f"127.0.0.1:{fw.socks}", "http://127.0.0.1:1/"],
                                capture_output=True, text=True, timeout=60)
        assert denied.returncode != 0
    finally:
        cli_err, srv_err = fw.close()
    assert all(sha(o.read_bytes()) == sha(blob) for o in outs)
    assert all(sha(x) == sha(blob) for x in bodies)
    assert "127.0.0.1:1 is not allowed by this forward service" in cli_err + srv_err


def _echo_until_eof(server: socket.socket, seen: dict[str, object]) -> None:
    conn, _ = server.accept()
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.sendall(b"got " + sha(data).encode())  # only possible if our read half saw EOF
    conn.shutdown(socket.SHUT_WR)
    seen["data"] = data
    conn.close()


def test_half_close_propagates_and_the_reply_still_comes_back(pair) -> None:
    a, b = pair
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    seen: dict[str, object] = {}
    t = threading.Thread(target=_echo_until_eof, args=(server, seen), daemon=True)
    t.start()
    fw = Forward(a, b, f"127.0.0.1:{port}", [f"127.0.0.1:{port}"])
    try:
        payload = os.urandom(3_000_000)
        c = socket.create_connection(("127.0.0.1", fw.port))
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        reply = b""
        c.settimeout(60)
        while chunk := c.recv(65536):
            reply += chunk
        c.close()
        t.join(30)
    finally:
        fw.close()
        server.close()
    assert reply == b"got " + sha(payload).encode()
    assert seen["data"] == payload


def test_resets_propagate_both_ways(pair) -> None:
    a, b = pair
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    events: dict[str, object] = {}
    second_open = threading.Event()

    def target() -> None:
        conn, _ = server.accept()  # first connection: we reset it
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        conn2, _ = server.accept()  # second: the client resets it
        conn2.settimeout(60)
        try:
            if conn2.recv(65536):
                second_open.set()
            while conn2.recv(65536):
                pass
            events["second"] = "eof"
        except ConnectionResetError:
            events["second"] = "reset"
        conn2.close()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    fw = Forward(a, b, f"127.0.0.1:{port}", [f"127.0.0.1:{port}"])
    try:
        c = socket.create_connection(("127.0.0.1", fw.port))
        c.settimeout(60)
        c.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            while c.recv(100):
                pass
        c.close()
        c2 = socket.create_connection(("127.0.0.1", fw.port))
        c2.sendall(b"x" * 1000)
        assert second_open.wait(60), "the flow never reached the target"
        c2.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c2.close()
        t.join(60)
    finally:
        fw.close()
        server.close()
    assert events["second"] == "reset"


def test_a_target_that_does_not_read_holds_the_source_back(pair) -> None:
    a, b = pair
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    held: list[socket.socket] = []
    t = threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True)
    t.start()
    fw = Forward(a, b, f"127.0.0.1:{port}", [f"127.0.0.1:{port}"], window="1m")
    try:
        c = socket.create_connection(("127.0.0.1", fw.port))
        c.setblocking(False)
        sent, chunk, stalled_since = 0, b"z" * 65536, None
        while sent < 200_000_000:
            try:
                sent += c.send(chunk)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 3.0:
                    break
                time.sleep(0.01)
        # 1 MiB flow window plus four sockets' kernel buffers at most -- never the 200 MB offered.
        assert sent < 64_000_000, sent
        t.join(10)
        total = 0
        held[0].settimeout(30)
        c.setblocking(True)
        c.shutdown(socket.SHUT_WR)
        while data := held[0].recv(1 << 20):  # now drain: everything held back arrives
            total += len(data)
        assert total == sent
        c.close()
        held[0].close()
    finally:
        fw.close()
        server.close()


def test_refused_disallowed_and_nonexistent_targets_are_named(pair) -> None:
    a, b = pair
    closed = free_port()
    fw = Forward(a, b, f"127.0.0.1:{closed}", [f"127.0.0.1:{closed}", "no-such-host.invalid:*"])
    try:
        c = socket.create_connection(("127.0.0.1", fw.port))
        c.settimeout(60)
        with pytest.raises(ConnectionResetError):
            c.recv(10)
        c.close()
        socks = socket.create_connection(("127.0.0.1", fw.socks))
        socks.settimeout(60)
        replies = []
        for host, port in ((b"no-such-host.invalid", 80), (b"example.org", 80), (b"127.0.0.1", closed)):
            s = socket.create_connection(("127.0.0.1", fw.socks))
            s.settimeout(60)
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + port.to_bytes(2, "big"))
            replies.append(s.recv(10)[1])
            s.close()
        socks.close()
    finally:
        cli_err, srv_err = fw.close()
    assert "Connection refused" in cli_err, cli_err
    assert replies[0] == 4 and "no-such-host.invalid: no such host" in cli_err  # host unreachable
    assert replies[1] == 2 and "example.org:80 is not allowed" in cli_err  # not allowed by ruleset (and not resolved)
    assert replies[2] == 5  # connection refused
    bad = subprocess.run([*LU2K, "forward", "--serve", "--socket", b.shim_path], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "--allow" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([*LU2K, "forward", "--to", b.nid, "--listen", "127.0.0.1:1", "--target", "nohost"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "'nohost' is not host:port" in bad.stderr


def _sshd(tmp_path: Path) -> tuple[subprocess.Popen[str], int, Path]:
    keys = tmp_path / "ssh"
    keys.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "user")], check=True)
    shutil.copy(keys / "user.pub", keys / "authorized_keys")
    port = free_port()
    (keys / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\n"
        f"PidFile {keys / 'sshd.pid'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n")
    os.makedirs("/run/sshd", exist_ok=True)
    p = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(keys / "sshd_config")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return p, port, keys / "user"
        except OSError:
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.stderr else ""
            time.sleep(0.05)


@pytest.mark.skipif(not (shutil.which("ssh") and os.path.exists("/usr/sbin/sshd") and shutil.which("rsync")) or os.geteuid() != 0,
                    reason="needs openssh-server, openssh-client and rsync (.ci/requirements-apt.txt), as root")
def test_ssh_and_rsync_over_ssh_through_the_forward(pair, tmp_path: Path) -> None:
    a, b = pair
    sshd, port, key = _sshd(tmp_path)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / "sub" / f"f{i}").write_bytes(os.urandom(1000 * i * i))
    fw = Forward(a, b, f"127.0.0.1:{port}", [f"127.0.0.1:{port}"])
    ssh = f"ssh -p {fw.port} -i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"
    try:
        r = subprocess.run([*ssh.split(), "root@127.0.0.1", f"sha256sum {src / 'sub' / 'f19'}"], capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == sha((src / "sub" / "f19").read_bytes())
        dst = tmp_path / "dst"
        r = subprocess.run(["rsync", "-a", "-e", ssh, f"root@127.0.0.1:{src}/", f"{dst}/"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        fw.close()
        sshd.terminate()
        sshd.communicate(timeout=10)
    for f in (src / "sub").iterdir():
        assert (dst / "sub" / f.name).read_bytes() == f.read_bytes()


@pytest.mark.parametrize("exc, cause", [
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), fp.Refusal.NO_SUCH_HOST),
    (ConnectionRefusedError(111, "Connection refused"), fp.Refusal.CONNECTION_REFUSED),
    (TimeoutError(), fp.Refusal.TIMED_OUT),
    (OSError(101, "Network is unreachable"), fp.Refusal.NETWORK_UNREACHABLE),
    (OSError(113, "No route to host"), fp.Refusal.HOST_UNREACHABLE),
    (OSError(5, "Input/output error"), fp.Refusal.FAILURE),
    (ValueError("refused"), fp.Refusal.FAILURE),  # the words of a message never decide
])
def test_connect_failures_map_to_refusals_by_type(exc: BaseException, cause: fp.Refusal) -> None:
    assert refusal_for(exc) is cause
