"""The udt backend's watchdog and figures, which ask libudt under its global lock: a peer gone
silent is declared dead, and a libudt that stops answering is reported, never waited for by
the event loop (lu2k/backends/udt.py, udt_asking.py)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import structlog

from lu2k.backends import availability

if availability().get("udt") is not None:
    pytest.skip(f"udt backend unavailable: {availability()['udt']}", allow_module_level=True)

from conformance import _close, _msg, _recv_n  # noqa: E402
from test_security_udt import UdpRelay, _through_relay  # noqa: E402

from lu2k.backends import _udtcore, udt  # noqa: E402
from lu2k.errors import ReadError  # noqa: E402


async def _wait_for_log(logs: list[dict[str, Any]], phrase: str, seconds: float) -> dict[str, Any]:
    for _ in range(int(seconds * 20)):
        found = [e for e in logs if phrase in e["event"]]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    pytest.fail(f"no log with {phrase!r} in {seconds} s: {[e['event'] for e in logs]}")


async def test_a_peer_gone_silent_is_declared_dead_by_the_watchdog() -> None:
    silent = {"on": False}

    def blackhole(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        return [] if silent["on"] else [data]

    server, client, out, inn, lst, relay = await _through_relay(blackhole, dead_peer_s=1)
    try:
        await out.send([_msg(1, b"before")])
        assert len(await _recv_n(inn, 1)) == 1
        silent["on"] = True
        await out.send([_msg(2, b"x" * 2000)])  # unacknowledged: retransmission timeouts begin
        with pytest.raises(ReadError, match="acknowledged nothing for .* connection declared dead"):
            await asyncio.wait_for(out.recv(), 30)
    finally:
        relay.close()
        await _close(out, inn, lst, server, client)


async def test_a_libudt_that_stops_answering_is_reported_and_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    server, client, out, inn, lst, relay = await _through_relay(lambda relay, direction, data: [data])
    release, answered = threading.Event(), threading.Event()
    real_perfmon = _udtcore.perfmon

    def held_perfmon(u: int, clear: bool) -> dict[str, Any]:
        release.wait(60)  # as behind libudt's global lock, held
        answered.set()
        return real_perfmon(u, clear)

    monkeypatch.setattr(udt, "LIBUDT_SILENT_REPORT_S", 1.0)
    try:
        before = out.stats()
        assert before["rtt_ms"] > 0 and "udt_figures" not in before
        monkeypatch.setattr(_udtcore, "perfmon", held_perfmon)
        with structlog.testing.capture_logs() as logs:
            stale = out.stats()
            assert not answered.is_set()  # it came back without waiting for libudt's answer
            assert "libudt has not answered for" in stale["udt_figures"] and stale["rtt_ms"] == before["rtt_ms"]
            assert "libudt has not answered" in inn.stats()["udt_figures"]  # at once: nothing more is asked
            # The connection itself goes on: its data path does not ask libudt for figures.
            await out.send([_msg(i + 1, b"m" * 1000) for i in range(50)])
            assert len(await _recv_n(inn, 50)) == 50
            report = await _wait_for_log(logs, "libudt has not answered a question", 15)
            assert report["log_level"] == "error" and report["silent_s"] >= 1
            release.set()
            assert (await _wait_for_log(logs, "libudt answers again", 15))["log_level"] == "warning"
        monkeypatch.setattr(_udtcore, "perfmon", real_perfmon)
        fresh = out.stats()
        assert "udt_figures" not in fresh and fresh["packets_sent"] >= 50
    finally:
        release.set()
        relay.close()
        await _close(out, inn, lst, server, client)
