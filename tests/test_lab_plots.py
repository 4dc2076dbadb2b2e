"""lu2k.lab.plots: the PNGs are written and are real images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lu2k.lab.plots import moving_average, plot_matrix, plot_timeseries

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(profile: str, loss: float, backend: str, goodput: float | None) -> dict[str, Any]:
    return {"profile": profile, "loss": loss, "backend": backend, "goodput_mbit": goodput,
            "link_mbit": 20.0 if profile == "geo" else 50.0, "rtt_ms": 600.0 if profile == "geo" else 40.0,
            "baselines": {"tcp-cubic": 10 * (1 - loss * 40), "tcp-bbr": 18.0} if backend == "tcp" else {}}


def test_matrix_plot(tmp_path: Path) -> None:
    rows = [_row(p, loss, b, 15.0 - loss * 100) for p in ("geo", "leo") for loss in (0, 0.001, 0.01, 0.02) for b in ("tcp", "quic")]
    rows.append(_row("geo", 0.02, "udt", None))  # a failed cell is left out, not plotted as 0
    out = plot_matrix(rows, tmp_path / "m.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000


def test_timeseries_plot(tmp_path: Path) -> None:
    r = {"backend": "tcp", "link_mbit": 20.0, "rtt_ms": 600.0, "loss": 0.01, "warmup_s": 2.0, "bin_s": 0.5,
         "series_mbit": [1, 5, 10, 18, 19, 0, 30, 18], "baseline_series_mbit": {"tcp-cubic": [0.5] * 8, "tcp-bbr": [10] * 8}}
    out = plot_timeseries(r, tmp_path / "t.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_moving_average() -> None:
    assert moving_average([0, 3, 0, 3], 1) == [0, 3, 0, 3]
    assert moving_average([0, 3, 0], 3) == [1.5, 1.0, 1.5]
