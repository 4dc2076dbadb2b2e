"""Guest-only tests: they need the stock Debian kernel booted by contrib/kernel-tests/run.

Everything under tests/guest/ is marked ``guest`` and skipped unless
``LU2K_KERNEL_GUEST=1`` (set by contrib/kernel-tests/guest.sh inside the QEMU guest), because
the host kernel has no AF_RDS, no RDMA and no netem, and the tests load modules and create
network namespaces as root.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from guestutil import NetnsPair, make_netns_pair

# The shared conformance checks live in tests/ (tests/conformance.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IN_GUEST = os.environ.get("LU2K_KERNEL_GUEST") == "1"
_SKIP = pytest.mark.skip(
    reason="guest-only test: needs the stock Debian kernel booted by contrib/kernel-tests/run "
    "(AF_RDS, rdma_rxe, netem); run that script instead"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.guest)
            if not IN_GUEST:
                item.add_marker(_SKIP)



@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    yield from make_netns_pair()
