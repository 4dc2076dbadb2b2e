"""lu2k.localpair.free_port: a port that no other socket can be handed before a daemon binds it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lu2k import localpair
from lu2k.localpair import free_port


def _binds(host: str, port: int) -> None:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, port))


def test_the_port_is_below_the_ephemeral_range_and_free_for_tcp_and_udp_on_every_host() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        port = free_port("127.0.0.1", "127.0.0.2")
        assert localpair.FREE_PORT_FLOOR <= port < low
        _binds("127.0.0.1", port)
        _binds("127.0.0.2", port)


def test_a_port_taken_for_udp_only_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        picks = iter([busy, busy, busy + 1 if busy + 1 < 65536 else busy - 1])
        monkeypatch.setattr(localpair.random.SystemRandom, "randrange", lambda self, a, b: next(picks))
        monkeypatch.setattr(localpair, "_ephemeral_low", lambda: 65535)
        assert free_port() != busy


def test_an_ephemeral_range_that_starts_low_leaves_the_kernels_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "range").write_text("1024\t65535\n")
    monkeypatch.setattr(localpair, "EPHEMERAL_RANGE", tmp_path / "range")
    port = free_port()
    _binds("127.0.0.1", port)


def test_an_unreadable_ephemeral_range_means_linuxs_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(localpair, "EPHEMERAL_RANGE", tmp_path / "missing")
    assert localpair._ephemeral_low() == 32768
    assert localpair.FREE_PORT_FLOOR <= free_port() < 32768
