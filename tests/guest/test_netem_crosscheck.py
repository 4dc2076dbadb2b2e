"""lu2k's own link emulator (host) agrees with the kernel's netem (guest) within 10 % goodput.

contrib/kernel-tests/run measures lu2k/tcp through ``lu2k.lab`` on the host first and leaves
the result in the results directory; this test runs the same transfer through netem here
(contrib/kernel-tests/crosscheck.py) and compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CROSSCHECK = Path(__file__).resolve().parents[2] / "contrib" / "kernel-tests" / "crosscheck.py"


@pytest.mark.slow
def test_netem_and_lab_agree_on_goodput(tmp_path: Path) -> None:
    out_dir = Path(os.environ.get("LU2K_KT_OUT", tmp_path))
    host_file = out_dir / "host-link.json"
    if not host_file.exists():
        reason = (out_dir / "host-link.skipped").read_text().strip() if (out_dir / "host-link.skipped").exists() else "not run"
        pytest.skip(f"no host-side lab measurement to compare with: {reason}")
    host = json.loads(host_file.read_text())
    guest_file = out_dir / "guest-link.json"
    res = subprocess.run([sys.executable, str(CROSSCHECK), "guest", str(guest_file)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"guest measurement failed:\n{res.stdout}\n{res.stderr[-3000:]}"
    guest = json.loads(guest_file.read_text())
    h, g = host["goodput_mbit"], guest["goodput_mbit"]
    line = (f"cross-check over {host['link']}: lab (host) {h:.3f} Mbit/s, netem (guest) {g:.3f} Mbit/s, "
            f"difference {abs(g - h) / h * 100:.1f} % (limit 10 %)")
    (out_dir / "crosscheck.txt").write_text(line + "\n")  # contrib/kernel-tests/run prints it
    assert h > 0 and g > 0
    assert abs(g - h) <= 0.10 * h, f"lab {h:.3f} vs netem {g:.3f} Mbit/s differ by more than 10 %"
