"""QUIC through two real lu2kd processes on loopback: exactly-once delivery, restart, wrong keys, mTLS."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aioquic")

from lu2k.cli.keys import cert_pem, key_pem, make_certificate, make_key  # noqa: E402
from lu2k.errors import Status  # noqa: E402
from lu2k.kernel_shim.endpoint import Endpoint  # noqa: E402
from e2e_support import Receiver, make_message  # noqa: E402
from lu2k.localpair import daemons  # noqa: E402

pytestmark = pytest.mark.timeout(240)
NIDS = ["127.0.0.1@quic", "127.0.0.2@quic"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One CA-signed certificate naming both loopback addresses (both daemons present it)."""
    d = tmp_path_factory.mktemp("quic-site")
    ca_key = make_key()
    ca = make_certificate(ca_key, "ca", is_ca=True)
    key = make_key()
    cert = make_certificate(key, "site", sans=["127.0.0.1", "127.0.0.2"], issuer_cert=ca, issuer_key=ca_key)
    (d / "ca.crt").write_bytes(cert_pem(ca))
    (d / "site.crt").write_bytes(cert_pem(cert))
    (d / "site.key").write_bytes(key_pem(key))
    return {"cert": str(d / "site.crt"), "key": str(d / "site.key"), "ca": str(d / "ca.crt")}


def _net(site: dict[str, str], **opts: Any) -> dict[str, Any]:
    return {"options": dict(site, **opts), "profile": {"rtt_ms": 600, "rate_mbit": 200, "loss": 0.01}}


def test_messages_0b_to_4mib_exactly_once_over_quic(site: dict[str, str]) -> None:
    rnd = random.Random(11)
    sizes = [8, 9, 1024, 65536, 4 << 20] + [int(8 * ((1 << 20) / 8) ** (rnd.random() ** 2)) for _ in range(1500)]
    with daemons(NIDS, backend="quic", extra_net=_net(site)) as (a, b):
        rx = Receiver(b.shim_path, len(sizes))
        rx.start()
        with Endpoint.attach(a.shim_path, portal=1) as ep:
            comps = []
            for i, size in enumerate(sizes):
                slot = ep.reserve(size, timeout=60)
                slot.view[:] = make_message(i, size, rnd)
                comps.append(slot.post(b.nid, 0))
            assert all(c.wait(120) for c in comps), "a completion never came"
            assert Counter(c.status for c in comps) == Counter({0: len(sizes)}), [(c.status, c.reason) for c in comps if c.status][:5]
        rx.join(60)
        assert rx.error is None, rx.error
        assert rx.corrupt == 0 and len(rx.seen) == len(sizes) and set(rx.seen.values()) == {1}


def test_restarted_peer_is_reached_again(site: dict[str, str]) -> None:
    extra = {"global": {"transaction_timeout": 4, "reconnect_min": 0.05, "reconnect_max": 0.5}}
    with daemons(NIDS, backend="quic", extra_net=_net(site), extra=extra) as (a, b):
        with Endpoint.attach(a.shim_path, portal=1) as ep:
            rx = Receiver(b.shim_path, 5)
            rx.start()
            first = [ep.send(b.nid, make_message(i, 2000, random.Random(i)), 0) for i in range(5)]
            assert all(c.wait(30) and c.status == 0 for c in first)
            rx.join(30)
            b.kill()
            lost = [ep.send(b.nid, make_message(100 + i, 3000, random.Random(i)), 0) for i in range(5)]
            for c in lost:
                assert c.wait(30), "a message to a dead peer never completed"
            assert {c.status for c in lost} <= {Status.NO_ROUTE, Status.TIMED_OUT, Status.PEER_RESTARTED}, [(c.status, c.reason) for c in lost]
            b.start()
            rx2 = Receiver(b.shim_path, 5)
            rx2.start()
            deadline = time.monotonic() + 60
            again = []
            while time.monotonic() < deadline:
                c = ep.send(b.nid, make_message(200 + len(again), 2000, random.Random(1)), 0)
                assert c.wait(30)
                again.append(c)
                if c.status == 0:
                    break
            assert again and again[-1].status == 0, [(c.status, c.reason) for c in again]
            for i in range(4):
                c = ep.send(b.nid, make_message(300 + i, 2000, random.Random(i)), 0)
                assert c.wait(30) and c.status == 0, (c.status, c.reason)
            rx2.join(30)
            assert rx2.error is None


def test_wrong_network_key_fails_authentication(site: dict[str, str], tmp_path: Path) -> None:
    extra = {"global": {"transaction_timeout": 4, "reconnect_min": 0.05, "reconnect_max": 0.5}}
    with daemons(NIDS, backend="quic", extra_net=_net(site), extra=extra, workdir=str(tmp_path), start=False) as (a, b):
        import yaml

        cfg = yaml.safe_load(Path(b.config_path).read_text())
        cfg["net"][0]["lu2k"]["key"] = "some-other-network-key"
        Path(b.config_path).write_text(yaml.safe_dump(cfg, sort_keys=False))
        a.start()
        b.start()
        with Endpoint.attach(a.shim_path, portal=1) as ep:
            c = ep.send(b.nid, b"x" * 100, 0)
            assert c.wait(30)
            assert c.status in (Status.AUTH_FAILED, Status.NO_ROUTE), (c.status, c.reason)
            assert "auth" in c.reason.lower() or "key" in c.reason.lower(), c.reason


def test_mutual_tls_between_daemons(site: dict[str, str]) -> None:
    with daemons(NIDS, backend="quic", extra_net=_net(site, mtls=True)) as (a, b):
        rx = Receiver(b.shim_path, 20)
        rx.start()
        with Endpoint.attach(a.shim_path, portal=1) as ep:
            comps = [ep.send(b.nid, make_message(i, 50_000, random.Random(i)), 0) for i in range(20)]
            assert all(c.wait(60) and c.status == 0 for c in comps), [(c.status, c.reason) for c in comps]
        rx.join(30)
        assert rx.error is None and len(rx.seen) == 20
