"""Prometheus metrics for lu2kd (optional: needs ``prometheus-client``, the ``metrics`` extra).

Configured by ``lu2k: metrics: {listen: "127.0.0.1:9725"}``.  Nothing is counted twice:
the collector reads the engine's own figures (``describe_nets``, ``describe_peers``,
``describe_routes``, ``describe_stats``) at scrape time, so the data path carries no metrics
code.  The HTTP endpoint runs on the daemon's event loop (not in a thread), so a scrape sees
one consistent snapshot and never races the engine.

Families (labels in braces):

* daemon: ``lu2k_messages_{submitted,sent,received,delivered,forwarded}_total``,
  ``lu2k_bytes_{sent,received}_total``, ``lu2k_duplicates_total``, ``lu2k_bad_frames_total``,
  ``lu2k_connections_refused_total``, ``lu2k_uptime_seconds``, ``lu2k_endpoints``,
  ``lu2k_inbound_sessions``, and every other figure as ``lu2k_daemon_figure{name}``;
* per NI ``{net,nid,backend}``: ``lu2k_ni_tx_credits``, ``lu2k_ni_tx_credits_max``,
  ``lu2k_ni_tx_credits_min``, ``lu2k_ni_peer_credits``, ``lu2k_ni_max_message_bytes``;
* per peer ``{net,nid}``: ``lu2k_peer_messages_total{result}``, ``lu2k_peer_up``,
  ``lu2k_peer_health``, ``lu2k_peer_tx_credits``, ``lu2k_peer_tx_credits_max``,
  ``lu2k_peer_tx_credits_min``, ``lu2k_peer_queue_depth``, ``lu2k_peer_in_flight``;
  per connection ``{net,nid,conn}``: ``lu2k_peer_rtt_seconds`` (udt's RTT, quic's smoothed
  RTT), ``lu2k_peer_retransmitted_packets``, ``lu2k_peer_lost_packets`` where the backend
  reports them (udt), and every numeric figure of the backend as
  ``lu2k_peer_transport_figure{figure}`` (nested ones as ``outer.inner``);
* per route ``{net,gateway}``: ``lu2k_route_gateway_health``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Mapping
from typing import Any

import structlog

from .errors import BackendUnavailable, ConfigError

log = structlog.get_logger("lu2k.metrics")

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0

# describe_stats keys that only grow -> counter names (without _total)
DAEMON_COUNTERS = {
    "msgs_submitted": "lu2k_messages_submitted", "msgs_sent": "lu2k_messages_sent", "msgs_received": "lu2k_messages_received",
    "msgs_delivered": "lu2k_messages_delivered", "msgs_forwarded": "lu2k_messages_forwarded",
    "msgs_rerouted": "lu2k_messages_rerouted",
    "bytes_sent": "lu2k_bytes_sent", "bytes_received": "lu2k_bytes_received", "duplicates": "lu2k_duplicates",
    "bad_frames": "lu2k_bad_frames", "conns_refused": "lu2k_connections_refused",
}
DAEMON_GAUGES = {"uptime_s": "lu2k_uptime_seconds", "endpoints": "lu2k_endpoints", "inbound_sessions": "lu2k_inbound_sessions"}


def parse_metrics_config(value: Any) -> dict[str, Any]:
    """``lu2k.metrics`` -> ``{"listen": (host, port)}``; ConfigError naming the key otherwise."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping like {{listen: \"127.0.0.1:9725\"}}, got {value!r}", where="lu2k.metrics")
    unknown = set(value) - {"listen"}
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))} (known: listen)", where="lu2k.metrics")
    if "listen" not in value:
        raise ConfigError("missing 'listen: HOST:PORT'", where="lu2k.metrics")
    return {"listen": parse_listen(value["listen"])}


def parse_listen(text: Any) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all addresses); port 0 means any free port."""
    where = "lu2k.metrics.listen"
    if not isinstance(text, str):
        raise ConfigError(f"expected \"HOST:PORT\", got {text!r}", where=where)
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]*)):([0-9]{1,5})", text.strip())
    if not m:
        raise ConfigError(f"{text!r} is not HOST:PORT (IPv6: [ADDR]:PORT)", where=where)
    port = int(m.group(3))
    if port > 65535:
        raise ConfigError(f"port {port} is above 65535", where=where)
    return (m.group(1) or m.group(2) or "", port)


RTT_KEYS = ("rtt_ms", "srtt_ms")  # udt's perfmon RTT; quic's smoothed RTT


def _flatten(figures: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Numeric figures of a transport, nested ones as ``outer.inner`` (quic's congestion state)."""
    for key, v in figures.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{key}.")
        elif (n := _num(v)) is not None:
            yield f"{prefix}{key}", n


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


class EngineCollector:
    """A prometheus-client collector over an engine's describe_* figures."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        eng = self.engine
        stats = eng.describe_stats()
        for key, name in DAEMON_COUNTERS.items():
            c = CounterMetricFamily(name, f"lu2kd {key.replace('_', ' ')}")
            c.add_metric([], float(stats.get(key, 0)))
            yield c
        for key, name in DAEMON_GAUGES.items():
            g = GaugeMetricFamily(name, f"lu2kd {key.replace('_', ' ')}")
            g.add_metric([], float(stats.get(key, 0)))
            yield g
        other = GaugeMetricFamily("lu2k_daemon_figure", "other lu2kd figures, by name", labels=["name"])
        for key, v in sorted(stats.items()):
            if key not in DAEMON_COUNTERS and key not in DAEMON_GAUGES and _num(v) is not None:
                other.add_metric([key], _num(v))  # type: ignore[arg-type]
        yield other

        ni_labels = ["net", "nid", "backend"]
        ni = {n: GaugeMetricFamily(f"lu2k_ni_{n}", h, labels=ni_labels) for n, h in (
            ("tx_credits", "NI send credits available"), ("tx_credits_max", "NI send credits configured"),
            ("tx_credits_min", "lowest NI send credits seen (negative: messages queued)"),
            ("peer_credits", "per-peer credits configured on this NI"), ("max_message_bytes", "largest message on this NI"))}
        for n in eng.describe_nets():
            lab = [n["net"], n["nid"], str(n.get("backend"))]
            cr, tun = n.get("credits") or {}, n.get("tunables") or {}
            for metric, v in (("tx_credits", cr.get("tx")), ("tx_credits_max", cr.get("max_tx")), ("tx_credits_min", cr.get("min_tx")),
                              ("peer_credits", tun.get("peer_credits")), ("max_message_bytes", n.get("max_message_size"))):
                if _num(v) is not None:
                    ni[metric].add_metric(lab, _num(v))  # type: ignore[arg-type]
        yield from ni.values()

        pl = ["net", "nid"]
        msgs = CounterMetricFamily("lu2k_peer_messages", "messages to this peer completed, by result", labels=pl + ["result"])
        pg = {n: GaugeMetricFamily(f"lu2k_peer_{n}", h, labels=pl) for n, h in (
            ("up", "1 if a connection to the peer is up"), ("health", "peer health, 0..1000"),
            ("tx_credits", "peer send credits available"), ("tx_credits_max", "peer send credits configured"),
            ("tx_credits_min", "lowest peer send credits seen"), ("queue_depth", "messages queued for credits"),
            ("in_flight", "messages sent and not yet acknowledged"))}
        cl = pl + ["conn"]
        rtt = GaugeMetricFamily("lu2k_peer_rtt_seconds", "round-trip time the backend measures", labels=cl)
        retx = GaugeMetricFamily("lu2k_peer_retransmitted_packets", "packets the backend retransmitted", labels=cl)
        lost = GaugeMetricFamily("lu2k_peer_lost_packets", "packets the backend saw lost", labels=cl)
        fig = GaugeMetricFamily("lu2k_peer_transport_figure", "every numeric figure the backend reports", labels=cl + ["figure"])
        for p in eng.describe_peers():
            lab = [str(p.get("net", "")), p["nid"]]
            msgs.add_metric(lab + ["delivered"], float(p.get("delivered", 0)))
            msgs.add_metric(lab + ["failed"], float(p.get("failed", 0)))
            for metric, v in (("up", 1 if p.get("state") == "up" else 0), ("health", p.get("health")),
                              ("tx_credits", p.get("tx_credits")), ("tx_credits_max", p.get("max_tx_credits")),
                              ("tx_credits_min", p.get("min_tx_credits")), ("queue_depth", p.get("queued")),
                              ("in_flight", p.get("in_flight"))):
                if _num(v) is not None:
                    pg[metric].add_metric(lab, _num(v))  # type: ignore[arg-type]
            for conn, figures in (p.get("connections") or {}).items():
                if not isinstance(figures, Mapping):
                    continue
                clab = lab + [str(conn)]
                flat = dict(_flatten(figures))
                rtt_ms = next((flat[k] for k in RTT_KEYS if k in flat), None)
                if rtt_ms is not None:
                    rtt.add_metric(clab, rtt_ms / 1000)
                for key, family in (("retransmitted", retx), ("lost_sent", lost)):
                    if key in flat:
                        family.add_metric(clab, flat[key])
                for key, v in sorted(flat.items()):
                    fig.add_metric(clab + [key], v)
        yield msgs
        yield from pg.values()
        yield from (rtt, retx, lost, fig)

        routes = GaugeMetricFamily("lu2k_route_gateway_health", "health of a route's gateway, 0..1000", labels=["net", "gateway"])
        for r in eng.describe_routes():
            if _num(r.get("health")) is not None:
                routes.add_metric([r["net"], r["gateway"]], _num(r["health"]))  # type: ignore[arg-type]
        yield routes


class MetricsServer:
    """``GET /metrics`` over HTTP/1.x on the daemon's event loop."""

    def __init__(self, engine: Any, listen: tuple[str, int]) -> None:
        try:
            from prometheus_client import CollectorRegistry
        except ImportError:
            raise BackendUnavailable("lu2k.metrics is configured but prometheus-client is not installed "
                                     "(pip install 'lu2k[metrics]', or Debian's python3-prometheus-client)") from None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(engine))  # type: ignore[arg-type]
        self.listen = listen
        self._server: asyncio.base_events.Server | None = None
        self.address: str | None = None

    async def start(self) -> None:
        host, port = self.listen
        try:
            self._server = await asyncio.start_server(self._client, host or None, port, limit=MAX_REQUEST_HEAD)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}", where="lu2k.metrics.listen") from None
        sockname = self._server.sockets[0].getsockname()
        self.address = f"[{sockname[0]}]:{sockname[1]}" if ":" in sockname[0] else f"{sockname[0]}:{sockname[1]}"

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST

        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
            elif parts[0] not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET\n"
            elif parts[1].split("?", 1)[0] == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self.render()
            elif parts[1] == "/":
                status, ctype, body = "200 OK", "text/plain", b"lu2kd metrics: /metrics\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found; metrics are at /metrics\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + (body if parts[0:1] != ["HEAD"] else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError, ValueError):
            pass  # a client that sends garbage or nothing just loses its connection
        except Exception:  # noqa: BLE001 - a failing scrape must never reach the event loop
            log.exception("metrics scrape failed")
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
