"""What the udt backend's packet authentication costs per packet, in nanoseconds.

Compiles ``udt_packet_auth_micro.cpp`` against ``lu2k/backends/_udt/packet_auth.h`` with the
binding's flags and runs it: sealing and checking a full data packet, an ACK and a long NAK
(the work the wrapped sendmsg/recvmsg add), and one loopback UDP send + receive for scale.
Needs g++.

    python benchmarks/udt_packet_auth_micro.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "udt_packet_auth_micro"
        build = ["g++", "-std=c++17", "-O2", f"-I{HERE.parent / 'lu2k/backends/_udt'}", str(HERE / "udt_packet_auth_micro.cpp"),
                 "-o", str(exe), "-lpthread"]
        done = subprocess.run(build, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"build failed:\n{done.stderr}", file=sys.stderr)
            return 1
        return subprocess.run([str(exe)]).returncode


if __name__ == "__main__":
    raise SystemExit(main())
