"""lu2k.backends.udt_tunables: option checking and sizing from the site profile.  No sockets."""

from __future__ import annotations

import pytest

pytest.importorskip("cryptography")

from lu2k.backends.base import BackendSettings, LinkProfile  # noqa: E402
from lu2k.backends.udt_tunables import MIN_BUFFER, tune  # noqa: E402
from lu2k.errors import ConfigError  # noqa: E402
from lu2k.nid import parse_net  # noqa: E402

GEO = LinkProfile(rtt_ms=600, rate_mbit=20, loss=0.02)


def settings(profile: LinkProfile = LinkProfile(), max_message: int = 1 << 20, port: int = 7988, **options) -> BackendSettings:
    return BackendSettings(parse_net("udt0"), port, max_message, profile, b"k", options)


def test_geo_profile_sizes_buffers_and_pacing() -> None:
    t = tune(settings(GEO, max_message=4 << 20))
    bdp = 20e6 / 8 * 0.6
    assert t.buffer == max(int(8 * bdp), 2 * t.max_frame, MIN_BUFFER)
    assert t.buffer >= 8 * bdp
    assert t.flight_window * (t.mss - 44) >= t.buffer
    assert t.cc == "lu2k-rate"
    assert t.cc_params["target_bps"] == pytest.approx(20e6 * 0.97)
    assert t.cc_params["heavy_loss"] == pytest.approx(0.10)
    assert t.max_frame > 4 << 20
    assert t.describe()["pacing"] == "19.4 Mbit/s"


def test_no_profile_probes_and_options_override() -> None:
    t = tune(settings())
    assert t.cc_params["target_bps"] == 0 and t.describe()["pacing"] == "probing"
    t = tune(settings(GEO, rate_mbit=15, pace_fraction=0.5, heavy_loss=0.2, mss=9000, buffer=64 << 20, cipher="chacha20-poly1305"))
    assert t.cc_params["target_bps"] == 15e6 and t.cc_params["heavy_loss"] == 0.2
    assert (t.mss, t.buffer, t.cipher) == (9000, 64 << 20, "chacha20-poly1305")
    t = tune(settings(GEO, cc="udt"))
    assert t.cc == "udt" and t.cc_params == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bogus": 1}, "unknown udt option.*bogus"),
        ({"cc": "reno"}, "options.cc: unknown congestion control 'reno'"),
        ({"cipher": "des"}, "options.cipher: unknown cipher 'des'"),
        ({"mss": 100}, "options.mss: 100 outside"),
        ({"mss": "big"}, "options.mss: expected a number"),
        ({"rate_mbit": True}, "options.rate_mbit: expected a number"),
        ({"cc": "udt", "rate_mbit": 5}, "rate_mbit applies to cc lu2k-rate only"),
        ({"buffer": 1 << 17}, "buffer 131072 cannot hold the largest frame"),
        ({"min_rate_mbit": 50, "max_rate_mbit": 10}, "max_rate_mbit below min_rate_mbit"),
        ({"rendezvous": "yes"}, "options.rendezvous: expected true or false"),
        ({"rendezvous_peers": ["10.0.0.1:7989"]}, "rendezvous_peers needs rendezvous: true"),
        ({"rendezvous": True, "rendezvous_peers": ["nohost"]}, r"rendezvous_peers\[0\]: expected 'host:port'"),
        ({"rendezvous": True, "rendezvous_peers": "a:1"}, "expected a list"),
    ],
)
def test_bad_options_say_where(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        tune(settings(GEO, **options))
    assert str(info.value).startswith("net udt")


def test_rendezvous_defaults() -> None:
    t = tune(settings(GEO, rendezvous=True, rendezvous_peers=["192.0.2.7:7989", "[2001:db8::1]:7989"]))
    assert t.rendezvous and t.rendezvous_port == 7989
    assert t.rendezvous_peers == (("192.0.2.7", 7989), ("2001:db8::1", 7989))
