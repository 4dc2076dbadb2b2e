"""PNG plots for the link benchmark (matplotlib, headless ``Agg`` backend).

* :func:`plot_matrix` -- goodput vs loss, one panel per profile, one line per backend, the
  kernel TCP CUBIC/BBR baselines dashed and the physical limit ``rate x (1 - p)`` drawn in;
* :func:`plot_timeseries` -- goodput over time of one ``bench link`` run, lu2k next to the
  baselines, with the warm-up shaded (it is excluded from the figures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'lu2k[lab]'", where="--plot") from None
    return plt


def plot_matrix(rows: list[dict[str, Any]], path: str | Path) -> Path:
    plt = _pyplot()
    profiles = list(dict.fromkeys(r["profile"] for r in rows))
    fig, axes = plt.subplots(1, len(profiles), figsize=(6.5 * len(profiles), 4.5), squeeze=False)
    for ax, profile in zip(axes[0], profiles):
        sel = [r for r in rows if r["profile"] == profile]
        losses = sorted({r["loss"] for r in sel})
        xs = [p * 100 for p in losses]
        link = max(r["link_mbit"] for r in sel)
        ax.plot(xs, [link * (1 - p) for p in losses], color="black", linewidth=1, label="limit: rate x (1-p)")
        for backend in dict.fromkeys(r["backend"] for r in sel):
            pts = sorted((r["loss"] * 100, r["goodput_mbit"]) for r in sel if r["backend"] == backend and r.get("goodput_mbit") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"lu2k/{backend}")
        for name, style in (("tcp-cubic", "s--"), ("tcp-bbr", "^--")):
            pts = sorted((r["loss"] * 100, r["baselines"][name]) for r in sel if name in (r.get("baselines") or {}))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, alpha=0.7, label=f"kernel {name}")
        rtt = sel[0]["rtt_ms"]
        ax.set_title(f"{profile.upper()}: {link:g} Mbit/s, RTT {rtt:g} ms")
        ax.set_xlabel("random loss each way (%)")
        ax.set_ylabel("goodput (Mbit/s)")
        ax.set_ylim(bottom=0, top=link * 1.1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def moving_average(values: list[float], n: int) -> list[float]:
    """Centred moving average over ``n`` points (shorter at the edges)."""
    if n <= 1:
        return list(values)
    half = n // 2
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half): i + half + 1]
        out.append(sum(window) / len(window))
    return out


def plot_timeseries(result: dict[str, Any], path: str | Path, smooth_s: float = 2.0) -> Path:
    """Goodput over time; smoothed over ``smooth_s`` because on a long path a repaired loss
    releases a whole RTT of data to the application at once, and raw bins are all spikes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    bin_s = result.get("bin_s") or 0.5
    n = max(1, round(smooth_s / bin_s))
    series = {f"lu2k/{result['backend']}": result.get("series_mbit") or []}
    series.update({f"kernel {k}": v for k, v in (result.get("baseline_series_mbit") or {}).items()})
    for name, values in series.items():
        if values:
            ax.plot([i * bin_s for i in range(len(values))], moving_average(values, n), label=name, linewidth=1.2)
    ax.axvspan(0, result.get("warmup_s", 0), color="grey", alpha=0.15, label="warm-up (not counted)")
    ax.axhline(result["link_mbit"], color="black", linewidth=0.8, linestyle=":", label="link rate")
    ax.set_title(f"{result.get('profile', '')} {result['link_mbit']:g} Mbit/s, RTT {result['rtt_ms']:g} ms, "
                 f"loss {result['loss'] * 100:g}% each way".strip())
    ax.set_xlabel("seconds since first delivery")
    ax.set_ylabel(f"goodput (Mbit/s, {n * bin_s:g} s moving average)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
