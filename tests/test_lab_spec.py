"""lu2k.lab.spec: unit parsing, profiles, per-direction specs."""

from __future__ import annotations

import pytest

from lu2k.errors import ConfigError
from lu2k.lab.spec import (
    MIN_QUEUE_BYTES, GilbertElliott, LinkSpec, build_specs, format_rate, parse_fraction, parse_rate, parse_size, parse_time,
)


@pytest.mark.parametrize("text,bps", [("20mbit", 20e6), ("20Mbit/s", 20e6), ("500kbit", 5e5), ("1gbit", 1e9),
                                      ("1.5mbps", 1.5e6), ("unlimited", 0.0), ("0", 0.0), ("100bit", 100.0)])
def test_parse_rate(text: str, bps: float) -> None:
    assert parse_rate(text) == pytest.approx(bps)


@pytest.mark.parametrize("text", ["20", "fast", "20 mbitz", "-3mbit", ""])
def test_parse_rate_rejects_and_names_option(text: str) -> None:
    with pytest.raises(ConfigError, match="--rate"):
        parse_rate(text)


@pytest.mark.parametrize("text,s", [("600ms", 0.6), ("0.6s", 0.6), ("250us", 250e-6), ("0", 0.0)])
def test_parse_time(text: str, s: float) -> None:
    assert parse_time(text) == pytest.approx(s)


def test_parse_time_needs_unit() -> None:
    with pytest.raises(ConfigError, match="600"):
        parse_time("600", what="--rtt")


@pytest.mark.parametrize("text,v", [("1%", 0.01), ("0.01", 0.01), ("0", 0.0), ("0.1%", 0.001), ("100%", 1.0)])
def test_parse_fraction(text: str, v: float) -> None:
    assert parse_fraction(text) == pytest.approx(v)


@pytest.mark.parametrize("text", ["1", "2", "150%", "x%", "-1%"])
def test_parse_fraction_rejects_ambiguous_or_out_of_range(text: str) -> None:
    with pytest.raises(ConfigError, match="--loss"):
        parse_fraction(text)


def test_parse_size_and_format_rate() -> None:
    assert parse_size("256k") == 256 * 1024
    assert parse_size("1500") == 1500
    with pytest.raises(ConfigError, match="--queue"):
        parse_size("lots")
    assert format_rate(20e6) == "20mbit"
    assert format_rate(0) == "unlimited"


def test_geo_profile_defaults_and_overrides() -> None:
    ab, ba = build_specs("geo", loss="2%")
    assert ab.rate_bps == 20e6 and ab.delay_s == pytest.approx(0.3) and ab.loss == pytest.approx(0.02)
    assert ba.loss == ab.loss and ba.seed != ab.seed
    # One BDP: 20 Mbit/s x 0.6 s / 8 = 1.5 MB.
    assert ab.effective_queue_bytes() == 1_500_000
    leo, _ = build_specs("leo", rate="10mbit")
    assert leo.rate_bps == 10e6 and leo.rtt_s == pytest.approx(0.04)


def test_queue_floor_and_custom_profile_needs_rate() -> None:
    tiny, _ = build_specs("custom", rate="1mbit", rtt="1ms")
    assert tiny.effective_queue_bytes() == MIN_QUEUE_BYTES
    with pytest.raises(ConfigError, match="custom"):
        build_specs("custom", rate="1mbit")
    with pytest.raises(ConfigError, match="--profile"):
        build_specs("mars")


def test_gilbert_elliott_from_mean() -> None:
    ge = GilbertElliott.from_mean(0.01, 5)
    assert ge.mean_loss == pytest.approx(0.01)
    assert ge.p_bg == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="burst"):
        GilbertElliott.from_mean(0.01, 0.5)
    with pytest.raises(ConfigError, match="never recover"):
        GilbertElliott(p_gb=0.1, p_bg=0.0)


def test_spec_round_trips_through_dict() -> None:
    ab, _ = build_specs("leo", loss="1%", burst_loss="0.5%", burst_len=3, reorder="1%", jitter="2ms")
    assert LinkSpec.from_dict(ab.to_dict()) == ab
    with pytest.raises(ConfigError):
        LinkSpec.from_dict({"rate_bps": 1, "warp": 9})


def test_spec_validation() -> None:
    with pytest.raises(ConfigError):
        LinkSpec(loss=1.5)
    with pytest.raises(ConfigError, match="--queue"):
        LinkSpec(queue_bytes=100)


def test_errors_name_the_option_prefix_of_a_second_path() -> None:
    with pytest.raises(ConfigError, match="^--second-path: unknown profile"):
        build_specs("mars", option_prefix="--second-", profile_option="--second-path")
    for kwargs, where in (({"rate": "x"}, "--second-rate"), ({"rtt": "1"}, "--second-rtt"), ({"loss": "5"}, "--second-loss"),
                          ({"queue": "100"}, "--second-queue"), ({"jitter": "z"}, "--second-jitter")):
        with pytest.raises(ConfigError, match=f"^{where}"):
            build_specs("leo", option_prefix="--second-", **kwargs)
    with pytest.raises(ConfigError, match="--second-rate and --second-rtt"):
        build_specs("custom", option_prefix="--second-", profile_option="--second-path")
    assert build_specs("leo", queue="64k") == build_specs("leo", queue="65536")


def test_leo_fast_profile() -> None:
    ab, ba = build_specs("leo-fast")
    assert ab.rate_bps == 200e6 and ab.loss == pytest.approx(0.01)
    assert (ab.rtt_min_s, ab.rtt_s) == pytest.approx((0.030, 0.060))
    assert ab.reconfig_s == 15.0 and 0 < ab.outage_s < 1.0
    # Queue: one BDP at the largest RTT.
    assert ab.effective_queue_bytes() == 1_500_000
    assert (ba.delay_s, ba.delay_max_s, ba.reconfig_s, ba.outage_s) == (ab.delay_s, ab.delay_max_s, ab.reconfig_s, ab.outage_s)
    # Overrides: a fixed RTT, no loss, no outage, still reconfiguring.
    ab, _ = build_specs("leo-fast", rtt="40ms", loss="0", outage="0")
    assert (ab.rtt_min_s, ab.rtt_s, ab.loss, ab.outage_s, ab.reconfig_s) == pytest.approx((0.04, 0.04, 0.0, 0.0, 15.0))
    assert LinkSpec.from_dict(ab.to_dict()) == ab


def test_rtt_range_and_reconfiguration_errors_name_the_option() -> None:
    ab, _ = build_specs("custom", rate="10mbit", rtt="20ms-80ms", reconfig="5s")
    assert (ab.delay_s, ab.delay_max_s) == pytest.approx((0.01, 0.04))
    with pytest.raises(ConfigError, match="--reconfig"):
        build_specs("custom", rate="10mbit", rtt="20ms-80ms")
    with pytest.raises(ConfigError, match="--rtt"):
        build_specs("custom", rate="10mbit", rtt="80ms-20ms", reconfig="5s")
    with pytest.raises(ConfigError, match="--outage"):
        build_specs("leo-fast", outage="20s")
    with pytest.raises(ConfigError, match="--second-reconfig"):
        build_specs("custom", rate="10mbit", rtt="1ms", outage="1ms", option_prefix="--second-")
    with pytest.raises(ConfigError, match="reconfig"):
        LinkSpec(outage_s=0.1)
