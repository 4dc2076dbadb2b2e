"""tcp, quic and udt over IPv6 loopback.

* each backend passes the shared transport conformance checks (tests/conformance.py) with
  both ends at ``::1``;
* end to end: two real lu2kd exchange messages both ways (IPv6 NIDs, ``listen: ::1``, peers at
  ``[::1]:port``; see lu2k.localpair), every one intact and exactly once, and the daemons'
  own view shows the IPv6 NIDs and ``[::1]:port`` listeners.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lu2k.backends import availability
from lu2k.kernel_shim.endpoint import Endpoint
from lu2k.localpair import DaemonProcess, daemons, ipv6_loopback_problem
from conformance import TRANSPORT_CHECKS, BackendUnderTest
from e2e_support import HDR, Receiver, make_message

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(ipv6_loopback_problem() is not None, reason=str(ipv6_loopback_problem())),
]

KEY = "ipv6-loopback-test-key"
BACKENDS = ["tcp", "quic", "udt"]


def nids(backend: str) -> list[str]:
    return [f"fd00:6::1@{backend}", f"fd00:6::2@{backend}"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA-signed certificate naming ::1, which both QUIC daemons present."""
    from lu2k.certs import cert_pem, key_pem, make_certificate, make_key

    d = tmp_path_factory.mktemp("v6-site")
    ca_key = make_key()
    ca = make_certificate(ca_key, "ca", is_ca=True)
    key = make_key()
    cert = make_certificate(key, "site", sans=["::1"], issuer_cert=ca, issuer_key=ca_key)
    (d / "ca.crt").write_bytes(cert_pem(ca))
    (d / "site.crt").write_bytes(cert_pem(cert))
    (d / "site.key").write_bytes(key_pem(key))
    return {"cert": str(d / "site.crt"), "key": str(d / "site.key"), "ca": str(d / "ca.crt")}


def net(backend: str, site: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"key": KEY, "profile": {"rtt_ms": 1, "rate_mbit": 800}}
    if backend == "quic":
        out["options"] = dict(site)
    return out


def backend_under_test(backend: str, site: dict[str, str]) -> BackendUnderTest:
    from lu2k.backends import get_backend

    problem = availability().get(backend)
    if problem is not None:
        pytest.skip(f"{backend} backend unavailable: {problem}")
    options: dict[str, Any] = {"cert": site["cert"], "key": site["key"], "ca": site["ca"], "_net": "quic"} if backend == "quic" else {}
    return BackendUnderTest(get_backend(backend), "::1", options=options, ordered=backend != "quic")


@pytest.mark.parametrize("check", TRANSPORT_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_conformance_over_ipv6_loopback(backend: str, check: Any, site: dict[str, str]) -> None:
    await check(backend_under_test(backend, site))


def ctl(d: DaemonProcess, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "lu2k.cli.ctl", "--socket", d.control_path, "--json", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def exchange(src: DaemonProcess, dst: DaemonProcess, sizes: list[int], seed: int) -> None:
    """``sizes`` messages src -> dst: all completed OK, all received once and intact."""
    rnd = random.Random(seed)
    rx = Receiver(dst.shim_path, len(sizes), idle_timeout=60)
    rx.start()
    with Endpoint.attach(src.shim_path, portal=1) as ep:
        comps = [ep.send(dst.nid, make_message(i, s, rnd), 0) for i, s in enumerate(sizes)]
        assert all(c.wait(90) for c in comps), "a completion never came"
        assert Counter(c.status for c in comps) == Counter({0: len(sizes)}), [(c.status, c.reason) for c in comps if c.status][:5]
    rx.join(60)
    assert rx.error is None, rx.error
    assert rx.corrupt == 0 and len(rx.seen) == len(sizes) and set(rx.seen.values()) == {1}
    assert rx.sources == {src.nid}


@pytest.mark.parametrize("backend", BACKENDS)
def test_messages_both_ways_over_ipv6_loopback(backend: str, site: dict[str, str], tmp_path: Path) -> None:
    problem = availability().get(backend)
    if problem is not None:
        pytest.skip(f"{backend} backend unavailable: {problem}")
    rnd = random.Random(6)
    sizes = [HDR.size, 1400, 65536, 1 << 20] + [int(HDR.size * 2 ** (rnd.random() * 15)) for _ in range(200)]
    with daemons(nids(backend), backend=backend, workdir=str(tmp_path), extra_net=net(backend, site)) as (a, b):
        exchange(a, b, sizes, seed=1)
        exchange(b, a, sizes[::-1], seed=2)
        show = ctl(a, "net", "show")
        text = json.dumps(show)
        assert "fd00:6::1@" in text and "[::1]:" in text, show  # an IPv6 NID, listening on [::1]:port
