"""The udt backend over real UDT on loopback: conformance, integrity, encryption, restarts, figures."""

from __future__ import annotations

import pytest

from lu2k.backends import get_backend
from lu2k.errors import BackendUnavailable

try:
    UdtBackend = get_backend("udt")
except BackendUnavailable as e:  # pragma: no cover - CI installs libudt-dev, so this must not skip there
    pytest.skip(f"udt backend unavailable: {e}", allow_module_level=True)

from conformance import TRANSPORT_CHECKS, BackendUnderTest  # noqa: E402


@pytest.mark.parametrize("check", TRANSPORT_CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check):
    await check(BackendUnderTest(UdtBackend, "127.0.0.1"))
