"""lu2k.gcpolicy: start-up's objects frozen, a larger young generation, later garbage still
collected; and lu2kd applies it once it serves.  Each case runs in a child process, so the
test process's own collector is left alone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, cwd: Path, timeout: float = 60) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_settle_freezes_start_up_and_still_collects_later_cycles(tmp_path: Path) -> None:
    out = _run("""
        import gc, weakref
        from lu2k import gcpolicy
        class Node: pass
        before = Node(); before.me = before   # garbage made before settle(): freed by it, not frozen
        gone = []
        weakref.finalize(before, gone.append, "before")
        del before
        assert gc.get_freeze_count() == 0
        gcpolicy.settle()
        assert gone == ["before"], gone
        assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
        assert gc.get_threshold()[0] == gcpolicy.YOUNG_THRESHOLD
        later = Node(); later.me = later
        weakref.finalize(later, gone.append, "later")
        del later
        gc.collect()
        assert gone == ["before", "later"], gone
        gc.set_threshold(50_000, 10, 10)
        gcpolicy.settle()   # a larger threshold set by the operator's own code is kept
        assert gc.get_threshold()[0] == 50_000
        print("ok")
    """, tmp_path)
    assert out.strip() == "ok"


def test_lu2kd_settles_the_collector_once_it_serves(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "lu2k.yaml").write_text(textwrap.dedent(f"""\
        net:
          - net type: tcp
            local NI(s):
              - nid: 127.0.0.1@tcp
            lu2k:
              backend: tcp
              port: {port}
              key: gcpolicy-test-key-0123456789
        """))
    out = _run("""
        import gc, os, signal, sys, threading, time
        from lu2k import daemon, gcpolicy
        seen = {}
        def watch():
            while not os.path.exists("ctl.sock"):
                time.sleep(0.05)
            deadline = time.monotonic() + 10
            while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            seen["frozen"] = gc.get_freeze_count()
            seen["young"] = gc.get_threshold()[0]
            os.kill(os.getpid(), signal.SIGTERM)
        assert gc.get_freeze_count() == 0
        threading.Thread(target=watch, daemon=True).start()
        rc = daemon.main(["-c", "lu2k.yaml", "--shim-socket", "shim.sock", "--control-socket", "ctl.sock", "--log-level", "error"])
        print(rc, seen["frozen"] > 1000, seen["young"] == gcpolicy.YOUNG_THRESHOLD)
    """, tmp_path)
    assert out.split() == ["0", "True", "True"]
