"""Runs *inside* an LNet test guest (``vng --exec``): runs the host's commands, one at a time.

The guest's console is not a reliable channel (virtme-ng 1.42 may lose it and exit 255 even on
success), so commands and results travel as files in the guest's ``--rwdir`` (9p, uncached):

* the host writes ``cmd/<seq>.json`` -- ``{"sh": "...", "timeout": s}`` or ``{"exit": true}`` --
  atomically (write, then rename);
* the agent runs each command with ``bash -c`` in order of ``seq`` and writes
  ``res/<seq>.json`` -- ``{"rc": n, "out": "...", "err": "...", "seconds": s}`` -- the same way;
  a command still running at its timeout is killed (rc -9, ``"timed_out": true``);
* ``ready.json`` says the agent is up (kernel release, CPUs, memory); ``{"exit": true}`` ends
  the agent and so the guest.

Stdlib only: it runs on the host's interpreter, shared read-only over the guest's 9p root.

usage: lnetagent.py RWDIR [KEY=VALUE ...]   (extra environment for every command)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.1


def write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def run_one(cmd: dict[str, object], env: dict[str, str]) -> dict[str, object]:
    script = str(cmd.get("sh", ""))
    timeout = float(cmd.get("timeout", 120))  # type: ignore[arg-type]
    started = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
    return {"rc": proc.returncode, "out": out, "err": err, "seconds": round(time.monotonic() - started, 3),
            "timed_out": timed_out}


def main(argv: list[str]) -> int:
    rwdir = Path(argv[1])
    env = dict(os.environ)
    for kv in argv[2:]:
        key, _, value = kv.partition("=")
        env[key] = value
    (rwdir / "res").mkdir(exist_ok=True)
    cmd_dir = rwdir / "cmd"
    cmd_dir.mkdir(exist_ok=True)
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    write_json(rwdir / "ready.json", {"release": platform.release(), "cpus": os.cpu_count(), "mem_mib": mem_kib // 1024,
                                      "pid": os.getpid()})
    done: set[str] = set()
    while True:
        names = sorted((n for n in os.listdir(cmd_dir) if n.endswith(".json") and not n.startswith(".") and n not in done),
                       key=lambda n: int(n.split(".")[0]))
        if not names:
            time.sleep(POLL_S)
            continue
        for name in names:
            done.add(name)
            try:
                cmd = json.loads((cmd_dir / name).read_text())
            except (OSError, ValueError) as e:
                write_json(rwdir / "res" / name, {"rc": -1, "out": "", "err": f"agent: unreadable command: {e}", "seconds": 0})
                continue
            if cmd.get("exit"):
                write_json(rwdir / "res" / name, {"rc": 0, "out": "", "err": "", "seconds": 0})
                os.sync()
                return 0
            write_json(rwdir / "res" / name, run_one(cmd, env))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
