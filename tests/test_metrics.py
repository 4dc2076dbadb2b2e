"""lu2k.metrics: the Prometheus endpoint scraped from a real daemon on loopback after real
traffic, the configuration key, and HTTP misuse that must not hurt the daemon."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lu2k.daemon import Daemon  # noqa: E402
from lu2k.errors import ConfigError, MessageFailed  # noqa: E402
from lu2k.kernel_shim.endpoint import AsyncEndpoint  # noqa: E402
from lu2k.localpair import free_port  # noqa: E402
from lu2k.metrics import parse_listen, parse_metrics_config  # noqa: E402
from lu2k.settings import load_config  # noqa: E402

KEY = "metrics-test-key-0123456789abcdef"


def _doc(tmp_path: Path, name: str, nid: str, port: int, **lu2k: Any) -> dict[str, Any]:
    return {
        "net": [{"net type": "tcp", "local NI(s)": [{"nid": nid, "tunables": {"peer_credits": 8, "credits": 64}}],
                 "lu2k": {"backend": "tcp", "port": port, "key": KEY}}],
        "route": [{"net": "tcp7", "gateway": "127.0.0.2@tcp"}] if name == "a" else [],
        "global": {"transaction_timeout": 5, "connect_timeout": 1},
        "lu2k": {"shim": {"path": str(tmp_path / f"{name}.shim")}, "control": {"path": str(tmp_path / f"{name}.ctl")}, **lu2k},
    }


async def _get(address: str, request: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return data


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_scrape_after_traffic(tmp_path: Path) -> None:
    port = free_port()
    docs = [_doc(tmp_path, "a", "127.0.0.1@tcp", port, metrics={"listen": "127.0.0.1:0"}), _doc(tmp_path, "b", "127.0.0.2@tcp", port)]
    ds = []
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.yaml").write_text(yaml.safe_dump(doc))
        d = Daemon(load_config(str(tmp_path / f"{i}.yaml")))
        await d.start()
        ds.append(d)
    a, b = ds
    try:
        assert a.metrics is not None and b.metrics is None and a.metrics.address
        rx = await AsyncEndpoint.attach(b.config.shim.path, portal=3)
        tx = await AsyncEndpoint.attach(a.config.shim.path, portal=1)
        ok = [await tx.send("127.0.0.2@tcp", b"x" * 1000, 3) for _ in range(20)]
        bad = [await tx.send("127.0.0.2@tcp", b"y", 9) for _ in range(4)]  # nobody on portal 9: NO_RECEIVER
        for c in ok:
            await c
        for c in bad:
            with pytest.raises(MessageFailed, match="NO_RECEIVER|receiver"):
                await c
        for _ in range(20):
            m = await rx.recv(timeout=30)
            assert m is not None
            m.release()
        head, _, body = (await _get(a.metrics.address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"text/plain" in head
        s = _samples(body)
        peer = (("net", "tcp"), ("nid", "127.0.0.2@tcp"))
        assert s[("lu2k_peer_messages_total", tuple(sorted(peer + (("result", "delivered"),))))] == 20
        assert s[("lu2k_peer_messages_total", tuple(sorted(peer + (("result", "failed"),))))] == 4
        assert s[("lu2k_peer_up", peer)] == 1 and s[("lu2k_peer_health", peer)] > 0
        assert s[("lu2k_peer_tx_credits_max", peer)] == 8 and s[("lu2k_peer_queue_depth", peer)] == 0
        assert s[("lu2k_messages_sent_total", ())] >= 24 and s[("lu2k_bytes_sent_total", ())] >= 20 * 1000
        ni = (("backend", "tcp"), ("net", "tcp"), ("nid", "127.0.0.1@tcp"))
        assert s[("lu2k_ni_tx_credits_max", ni)] == 64 and s[("lu2k_ni_tx_credits", ni)] == 64
        assert s[("lu2k_route_gateway_health", (("gateway", "127.0.0.2@tcp"), ("net", "tcp7")))] > 0
        assert any(name == "lu2k_peer_transport_figure" and dict(labels).get("figure") == "bytes_sent" and v > 20000
                   for (name, labels), v in s.items())
        assert s[("lu2k_endpoints", ())] == 1
        # every metric the Grafana dashboard queries is one this endpoint serves
        families = {f.name for f in text_string_to_metric_families(body.decode())}  # with or without samples on tcp
        served = families | {f + "_total" for f in families}
        dashboard = json.loads((Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "lu2k.json").read_text())
        queried = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"lu2k_[a-z_]+", t["expr"])}
        queried |= set(re.findall(r"lu2k_[a-z_]+", json.dumps(dashboard["templating"])))
        assert queried and queried <= served, queried - served
        # misuse: answered or dropped, never fatal; the endpoint keeps serving
        assert (await _get(a.metrics.address, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _get(a.metrics.address, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await _get(a.metrics.address, b"\x00\xff garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert (await _get(a.metrics.address, b"GET /" + b"x" * 20000)) == b""
        assert (await _get(a.metrics.address, b"HEAD /metrics HTTP/1.0\r\n\r\n")).endswith(b"\r\n\r\n")
        assert (await _get(a.metrics.address, b"GET /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await tx.detach()
        await rx.detach()
    finally:
        for d in ds:
            await d.stop()


@pytest.mark.parametrize("value, message", [
    ("127.0.0.1", "not HOST:PORT"), ("127.0.0.1:99999", "above 65535"), (9725, "expected"), ("[::1:9725", "not HOST:PORT"),
])
def test_bad_listen(value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        parse_listen(value)
    assert "lu2k.metrics.listen" in str(e.value)


def test_listen_forms() -> None:
    assert parse_listen("127.0.0.1:9725") == ("127.0.0.1", 9725)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9725") == ("", 9725)
    assert parse_metrics_config({"listen": "localhost:1"}) == {"listen": ("localhost", 1)}
    with pytest.raises(ConfigError, match="unknown key"):
        parse_metrics_config({"listen": ":1", "path": "/m"})
    with pytest.raises(ConfigError, match="missing"):
        parse_metrics_config({})


def test_check_names_the_bad_metrics_key(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "a", "127.0.0.1@tcp", free_port(), metrics={"listen": "nowhere"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "lu2k.daemon", "--check", "--config", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "lu2k.metrics.listen" in out.stderr and "Traceback" not in out.stderr


async def test_a_taken_port_stops_start_up_cleanly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        doc = _doc(tmp_path, "a", "127.0.0.1@tcp", free_port(), metrics={"listen": f"127.0.0.1:{taken.getsockname()[1]}"})
        (tmp_path / "t.yaml").write_text(yaml.safe_dump(doc))
        d = Daemon(load_config(str(tmp_path / "t.yaml")))
        with pytest.raises(ConfigError, match="cannot listen"):
            await d.start()
        assert not Path(d.config.control_path).exists()  # nothing left behind


async def test_quic_rtt_and_congestion_state_are_exported(tmp_path: Path) -> None:
    pytest.importorskip("aioquic")
    from lu2k.cli.keys import cert_pem, key_pem, make_certificate, make_key
    from lu2k.control import request

    key = make_key()
    (tmp_path / "s.crt").write_bytes(cert_pem(make_certificate(key, "site", sans=["127.0.0.1", "127.0.0.2"])))
    (tmp_path / "s.key").write_bytes(key_pem(key))
    options = {"cert": str(tmp_path / "s.crt"), "key": str(tmp_path / "s.key"), "ca": str(tmp_path / "s.crt")}
    port = free_port()
    ds = []
    for name, nid, extra in (("a", "127.0.0.1@quic", {"metrics": {"listen": "127.0.0.1:0"}}), ("b", "127.0.0.2@quic", {})):
        doc = _doc(tmp_path, name, nid, port, **extra)
        doc["net"][0]["net type"] = "quic"
        # a long lossy profile selects lu2k's own controller (bbr), whose state is exported
        doc["net"][0]["lu2k"].update({"backend": "quic", "options": options, "profile": {"rtt_ms": 600, "rate_mbit": 100, "loss": 0.01}})
        doc["route"] = []
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
        d = Daemon(load_config(str(tmp_path / f"{name}.yaml")))
        await d.start()
        ds.append(d)
    a = ds[0]
    try:
        await request(a.config.control_path, "ping", {"nid": "127.0.0.2@quic", "timeout": 20})
        assert a.metrics is not None and a.metrics.address
        body = (await _get(a.metrics.address, b"GET /metrics HTTP/1.0\r\n\r\n")).partition(b"\r\n\r\n")[2]
        s = _samples(body)
        rtts = [v for (name, labels), v in s.items() if name == "lu2k_peer_rtt_seconds" and dict(labels)["nid"] == "127.0.0.2@quic"]
        assert rtts and all(v > 0 for v in rtts)
        figures = {dict(labels)["figure"] for (name, labels), _ in s.items() if name == "lu2k_peer_transport_figure"}
        assert "srtt_ms" in figures and any(f.startswith("congestion.") for f in figures), figures
    finally:
        for d in ds:
            await d.stop()
