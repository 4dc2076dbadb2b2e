"""Files and forwarded TCP over the lab's GEO link (20 Mbit/s, 600 ms RTT) with 1 % loss:
``lu2k send`` of a directory into ``lu2k recv --serve`` across a link outage, and curl, ssh
and rsync-over-ssh through ``lu2k forward``.  Short files: this checks behaviour, the
throughput figures come from ``lu2k bench transfer``."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lu2k.lab.bench import LabDaemons
from lu2k.lab.netns import Lab, child_env
from lu2k.lab.spec import build_specs
from lu2k.lab.transfer_bench import stop_processes

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

LU2K = [sys.executable, "-m", "lu2k.cli.main"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_directory_over_lossy_geo_across_an_outage(tmp_path: Path, daemons_dir: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    dst.mkdir()
    for i in range(6):
        (src / "d" / f"f{i}").write_bytes(os.urandom(50_000 * i))
    (src / "d" / "big").write_bytes(os.urandom(3_000_000))
    env = child_env()
    with Lab(build_specs("geo", loss="1%", seed=11)) as lab:
        with LabDaemons(lab, "tcp", daemons_dir) as daemons:
            srv = lab.popen("b", [*LU2K, "recv", "--socket", daemons.shim("b"), "--serve", str(dst)],
                            stderr=subprocess.PIPE, text=True, env=env)
            assert srv.stderr is not None and "serving" in srv.stderr.readline()
            send = lab.popen("a", [*LU2K, "send", "--socket", daemons.shim("a"), "--retry-for", "300", daemons.nids["b"], str(src / "d")],
                             stderr=subprocess.PIPE, text=True, env=env)
            while not (dst / "d" / ".big.lu2k-state").exists() and send.poll() is None:
                time.sleep(0.05)
            lab.set_link(False)
            time.sleep(20)  # longer than a few RTOs: connections break, messages wait or fail
            lab.set_link(True)
            _, err = send.communicate(timeout=400)
            assert send.returncode == 0, err
            srv.send_signal(signal.SIGTERM)
            _, log = srv.communicate(timeout=30)
        stats = lab.stats()
    assert stats["links"]["ab"]["drops_loss"] > 0 and stats["links"]["ab"]["drops_down"] > 0
    for f in (src / "d").iterdir():
        assert sha(dst / "d" / f.name) == sha(f), log
    assert "Traceback" not in log


def _wait_port(lab: Lab, side: str, host: str, port: int) -> None:
    probe = (f"import socket,time\nfor _ in range(300):\n  try:\n    socket.create_connection(('{host}',{port}),1).close(); break\n"
             "  except OSError: time.sleep(0.1)")
    lab.run(side, [sys.executable, "-c", probe], check=True, timeout=60)


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("ssh") and os.path.exists("/usr/sbin/sshd") and shutil.which("rsync")),
                    reason="needs curl, openssh-server/client and rsync (.ci/requirements-apt.txt)")
def test_curl_ssh_and_rsync_through_forward_over_lossy_geo(tmp_path: Path, daemons_dir: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "page.bin").write_bytes(os.urandom(2_000_000))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"r{i}").write_bytes(os.urandom(20_000 * i))
    keys = tmp_path / "ssh"
    keys.mkdir()
    for k in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / k)], check=True)
    shutil.copy(keys / "user.pub", keys / "authorized_keys")
    env = child_env()
    procs: list[subprocess.Popen[str]] = []
    with Lab(build_specs("geo", loss="1%", seed=5)) as lab:
        for side in ("a", "b"):
            lab.run(side, ["ip", "link", "set", "lo", "up"], check=True)
        with LabDaemons(lab, "tcp", daemons_dir) as daemons:
            try:
                procs.append(lab.popen("b", [sys.executable, "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", str(www)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True))
                (keys / "sshd_config").write_text(
                    f"Port 2222\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\n"
                    f"PidFile {keys / 'sshd.pid'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n")
                os.makedirs("/run/sshd", exist_ok=True)
                procs.append(lab.popen("b", ["/usr/sbin/sshd", "-D", "-e", "-f", str(keys / "sshd_config")],
                                       stderr=subprocess.DEVNULL, text=True))
                _wait_port(lab, "b", "127.0.0.1", 8080)
                _wait_port(lab, "b", "127.0.0.1", 2222)
                srv = lab.popen("b", [*LU2K, "forward", "--socket", daemons.shim("b"), "--serve", "--allow", "127.0.0.1:8080",
                                      "--allow", "127.0.0.1:2222"], stderr=subprocess.PIPE, text=True, env=env)
                procs.append(srv)
                assert srv.stderr is not None and "serving" in srv.stderr.readline()
                ports = {}
                for target in ("127.0.0.1:8080", "127.0.0.1:2222"):
                    cli = lab.popen("a", [*LU2K, "forward", "--socket", daemons.shim("a"), "--to", daemons.nids["b"],
                                          "--listen", "127.0.0.1:0", "--target", target], stderr=subprocess.PIPE, text=True, env=env)
                    procs.append(cli)
                    assert cli.stderr is not None
                    m = re.search(r"127\.0\.0\.1:(\d+) ->", cli.stderr.readline())
                    assert m
                    ports[target] = int(m.group(1))
                got = tmp_path / "got.bin"
                r = lab.run("a", ["curl", "-sS", "--fail", "-o", str(got), f"http://127.0.0.1:{ports['127.0.0.1:8080']}/page.bin"],
                            capture_output=True, text=True, timeout=300)
                assert r.returncode == 0, r.stderr
                ssh = (f"ssh -p {ports['127.0.0.1:2222']} -i {keys / 'user'} -o StrictHostKeyChecking=no "
                       "-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR")
                r = lab.run("a", [*ssh.split(), "root@127.0.0.1", f"sha256sum {src / 'r7'}"], capture_output=True, text=True, timeout=300)
                assert r.returncode == 0 and r.stdout.split()[0] == sha(src / "r7"), r.stderr
                dst = tmp_path / "dst"
                r = lab.run("a", ["rsync", "-a", "-e", ssh, f"root@127.0.0.1:{src}/", f"{dst}/"], capture_output=True, text=True, timeout=300)
                assert r.returncode == 0, r.stderr
            finally:
                stop_processes(procs)
        stats = lab.stats()
    assert stats["links"]["ba"]["drops_loss"] > 0  # the download really crossed the lossy link
    assert sha(got) == sha(www / "page.bin")
    for f in src.iterdir():
        assert sha(dst / f.name) == sha(f)
