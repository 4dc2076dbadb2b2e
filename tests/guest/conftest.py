"""Guest-tier tests: most run inside the QEMU guest, the LNet bed tests drive guests from the host.

Everything under tests/guest/ is marked ``guest``.

* ``test_lnet_*.py`` run on the *host*, as root, and boot their own guests (kernel LNet nodes,
  contrib/kernel-tests/lnetbed.py); they are skipped unless ``LU2K_LNET_BED=1``, which
  ``contrib/kernel-tests/run`` sets after building Lustre's LNet for the guest kernel.
* The others run *inside* the one guest booted by contrib/kernel-tests/run and are skipped
  unless ``LU2K_KERNEL_GUEST=1`` (set by contrib/kernel-tests/guest.sh), because the host kernel
  has no AF_RDS, no RDMA and no netem, and the tests load modules and create namespaces as root.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guestutil import NetnsPair, bed_module, make_netns_pair

# The shared conformance checks live in tests/ (tests/conformance.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IN_GUEST = os.environ.get("LU2K_KERNEL_GUEST") == "1"
LNET_BED = os.environ.get("LU2K_LNET_BED") == "1"
_SKIP = pytest.mark.skip(
    reason="guest-only test: needs the stock Debian kernel booted by contrib/kernel-tests/run "
    "(AF_RDS, rdma_rxe, netem); run that script instead"
)
_SKIP_LNET = pytest.mark.skip(
    reason="LNet bed test: boots kernel LNet guests from the host; run `contrib/kernel-tests/run lnet` "
    "(needs root, QEMU and the Lustre source, see docs/lustre-interop.md)"
)


def is_lnet_bed_test(path: Path) -> bool:
    return path.name.startswith("test_lnet_")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.guest)
            if is_lnet_bed_test(Path(item.path)):
                if not LNET_BED:
                    item.add_marker(_SKIP_LNET)
            elif not IN_GUEST:
                item.add_marker(_SKIP)


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    yield from make_netns_pair()


# --- the LNet bed (host side) ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def lnet_out() -> Path:
    out = Path(os.environ.get("LU2K_LNET_OUT", "build/kernel-tests/lnet-out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="session")
def lnet_figures(lnet_out: Path) -> Iterator[dict[str, Any]]:
    """Figures the LNet tests record (lst stat, counters); written to figures.json at the end."""
    figures: dict[str, Any] = {}
    yield figures
    (lnet_out / "figures.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def lnet_build() -> dict[str, Any]:
    return dict(json.loads(Path(os.environ["LU2K_LNET_BUILD"]).read_text()))


@pytest.fixture(scope="session")
def lnet_bed(lnet_out: Path, lnet_build: dict[str, Any]) -> Iterator[Any]:
    """Two kernel LNet guests (a, b) on bridges of their own, booted once per session, LNet modules loaded."""
    lb = bed_module()
    bed = lb.Bed(vng=os.environ["LU2K_KT_VNG"], vmlinuz=Path(os.environ["LU2K_KT_VMLINUZ"]),
                 repo=Path(__file__).resolve().parents[2], python=sys.executable, build=lnet_build,
                 workdir=lnet_out / "bed", memory=os.environ.get("LU2K_LNET_MEMORY", "768M"))
    try:
        bed.create()
        bed.boot()
        lb.on_all(list(bed.guests.values()), lambda g: lb.load_lnet(g, lb.module_paths(lnet_build)))
        yield bed
    finally:
        bed.close()
