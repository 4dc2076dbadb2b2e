"""Helpers for the guest tests: commands and network namespaces inside the QEMU guest."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

KERNEL_TESTS = Path(__file__).resolve().parents[2] / "contrib" / "kernel-tests"


def bed_module() -> ModuleType:
    """contrib/kernel-tests/lnetbed.py, the host side of the LNet bed (it is not a package)."""
    if str(KERNEL_TESTS) not in sys.path:
        sys.path.insert(0, str(KERNEL_TESTS))
    import lnetbed

    return lnetbed


def sh(*cmd: str) -> str:
    """Run a command in the guest; a failure names the command and its output."""
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res.stdout


@dataclass(frozen=True)
class NetnsPair:
    """Two network namespaces joined by a veth pair, created by the test itself."""

    a: str
    b: str
    addr_a: str
    addr_b: str
    dev_a: str
    dev_b: str


def make_netns_pair(prefix: str = "lu2kkt") -> Iterator[NetnsPair]:
    """Create the pair, yield it, delete both namespaces (and so the veth) afterwards."""
    pair = NetnsPair(f"{prefix}-a", f"{prefix}-b", "10.201.0.1", "10.201.0.2", "kta0", "ktb0")
    for ns in (pair.a, pair.b):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    sh("ip", "netns", "add", pair.a)
    sh("ip", "netns", "add", pair.b)
    try:
        sh("ip", "link", "add", pair.dev_a, "netns", pair.a, "type", "veth", "peer", "name", pair.dev_b, "netns", pair.b)
        for ns, dev, addr in ((pair.a, pair.dev_a, pair.addr_a), (pair.b, pair.dev_b, pair.addr_b)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield pair
    finally:
        for ns in (pair.a, pair.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
