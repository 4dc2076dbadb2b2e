"""Rates and the token bucket (pure; a fake clock)."""

from __future__ import annotations

import argparse

import pytest

from lu2k.apps.pace import TokenBucket, format_throughput
from lu2k.cli.stream import _rate


@pytest.mark.parametrize("text, bps", [("5mbit", 5e6), ("5m", 5e6), ("5Mbps", 5e6), ("500kbit", 5e5), ("1.5gbit", 1.5e9),
                                       ("unlimited", 0.0), ("0", 0.0), ("0mbit", 0.0)])
def test_rate_option_uses_the_one_rate_grammar(text: str, bps: float) -> None:
    assert _rate(text) == pytest.approx(bps)


@pytest.mark.parametrize("text", ["fast", "5 parsecs", "-1mbit", "", "20", "2MB"])
def test_bad_rates_name_the_option(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--rate"):
        _rate(text)


def test_format_throughput() -> None:
    assert format_throughput(5e6) == "5.00 Mbit/s" and format_throughput(2e9) == "2.00 Gbit/s" and format_throughput(1500) == "1.5 kbit/s"


def test_token_bucket_holds_the_average() -> None:
    b = TokenBucket(8e6, burst=100_000)  # 1 MB/s
    now, sent = 0.0, 0
    while now < 10.0:
        d = b.delay(50_000, now)
        if d:
            now += d
        else:
            sent += 50_000
    assert 9.9e6 <= sent <= 10.2e6  # 10 s at 1 MB/s plus the burst


def test_unlimited_never_waits() -> None:
    assert TokenBucket(0).delay(10**9, 0.0) == 0.0
