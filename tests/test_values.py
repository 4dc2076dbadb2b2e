"""lu2k.values: the one set of validators; every refusal names where and never lets NaN through."""

from __future__ import annotations

import math

import pytest

from lu2k.errors import ConfigError
from lu2k.values import (
    HIDDEN_KEY, Problems, as_address, as_bool, as_float, as_int, as_mode, as_port, as_str, format_rate, parse_key, parse_rate,
)


@pytest.mark.parametrize("value, out", [(5, 5), (5.0, 5), (1e6, 1_000_000), ("0x10", 16), ("0o17", 15), (" 42 ", 42), ("-3", -3)])
def test_as_int_accepts(value: object, out: int) -> None:
    assert as_int(value, "w") == out


@pytest.mark.parametrize("value", [True, False, 1.5, math.nan, math.inf, -math.inf, "017", "big", "", None, [1], {"a": 1}, "nan"])
def test_as_int_refuses(value: object) -> None:
    with pytest.raises(ConfigError, match="^w: expected an integer"):
        as_int(value, "w")


def test_as_int_range() -> None:
    assert as_int(0, "w", 0, 1) == 0
    with pytest.raises(ConfigError, match=r"^w: 2 out of range 0\.\.1$"):
        as_int(2, "w", 0, 1)
    with pytest.raises(ConfigError, match=r"-1 out of range 0\.\.inf"):
        as_int(-1, "w", 0)


@pytest.mark.parametrize("value, out", [(1, 1.0), (0.5, 0.5), ("2.5", 2.5), ("1e3", 1000.0)])
def test_as_float_accepts(value: object, out: float) -> None:
    assert as_float(value, "w") == out


@pytest.mark.parametrize("value, msg", [(math.nan, "finite"), (math.inf, "finite"), ("nan", "finite"), ("-inf", "finite"), ("1e999", "finite"),
                                        (True, "expected a number"), ("soon", "expected a number"), (None, "expected a number")])
def test_as_float_refuses_nan_inf_and_junk(value: object, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg) as e:
        as_float(value, "global.transaction_timeout", 0, 86400)
    assert e.value.where == "global.transaction_timeout"


def test_as_float_range() -> None:
    with pytest.raises(ConfigError, match=r"1e\+308 out of range 0\.\.86400"):
        as_float(1e308, "w", 0, 86400)


@pytest.mark.parametrize("value, out", [(True, True), (0, False), (1, True), ("yes", True), ("Off", False), (" true ", True), ("0", False)])
def test_as_bool(value: object, out: bool) -> None:
    assert as_bool(value, "w") is out


@pytest.mark.parametrize("value", [2, "maybe", None, 1.0, ""])
def test_as_bool_refuses(value: object) -> None:
    with pytest.raises(ConfigError, match="expected a boolean"):
        as_bool(value, "w")


@pytest.mark.parametrize("value, out", [(0o660, 0o660), (432, 0o660), ("0660", 0o660), ("0o660", 0o660), ("660", 0o660), ("0O600", 0o600), (0, 0)])
def test_as_mode(value: object, out: int) -> None:
    assert as_mode(value, "w") == out


@pytest.mark.parametrize("value", ["0o", "rw", "0o8", "9", True, 1.5, 0o1000, -1])
def test_as_mode_refuses(value: object) -> None:
    with pytest.raises(ConfigError):
        as_mode(value, "w")


def test_ports_strings_addresses() -> None:
    assert as_port(0, "w") == 0 and as_port("8080", "w") == 8080
    with pytest.raises(ConfigError, match="out of range 1..65535"):
        as_port(0, "w", allow_zero=False)
    assert as_str("x", "w") == "x"
    with pytest.raises(ConfigError, match="non-empty string"):
        as_str("  ", "w")
    assert as_address("10.0.0.1:7988", "w") == ("10.0.0.1", 7988)
    assert as_address("[fe80::1]:7988", "w") == ("fe80::1", 7988)
    assert as_address("gw.example:1", "w") == ("gw.example", 1)
    for bad, msg in (("10.0.0.1", "needs host:port"), ("10.0.0.1:99999", "out of range"), (":7988", "needs host:port"),
                     ("fe80::1:7988", r"\[addr\]:port"), ("h:-1", "not a number"), (7988, "expected an address")):
        with pytest.raises(ConfigError, match=msg):
            as_address(bad, "w")


@pytest.mark.parametrize("value, kw, bps", [
    ("20mbit", {}, 20e6), ("20Mbit/s", {}, 20e6), ("500kbit", {}, 5e5), ("1gbit", {}, 1e9), ("1.5mbps", {}, 1.5e6),
    (20, {"number_unit": 1e6}, 20e6), ("20", {"number_unit": 1e6}, 20e6), (100, {}, 100.0),
    ("unlimited", {"allow_unlimited": True}, 0.0), ("0", {"allow_unlimited": True, "unit_required": True}, 0.0),
])
def test_parse_rate(value: object, kw: dict[str, object], bps: float) -> None:
    assert parse_rate(value, "rate", **kw) == pytest.approx(bps)  # type: ignore[arg-type]


@pytest.mark.parametrize("value, kw", [
    ("fast", {}), ("20 mbitz", {}), ("-3mbit", {}), ("", {}), (0, {}), ("unlimited", {}), (math.nan, {}), (math.inf, {}), ("nan", {}),
    ("20", {"unit_required": True}), (True, {}), (-1, {"allow_unlimited": True}),
])
def test_parse_rate_refuses(value: object, kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as e:
        parse_rate(value, "net[0].lu2k.profile.rate_mbit", **kw)  # type: ignore[arg-type]
    assert e.value.where == "net[0].lu2k.profile.rate_mbit"


def test_format_rate_round_trips() -> None:
    for bps in (20e6, 5e5, 1e9, 2.5e9):
        assert parse_rate(format_rate(bps), "w") == pytest.approx(bps)
    assert format_rate(0) == "unlimited"


@pytest.mark.parametrize("value, key", [("a-sixteen-byte-k", b"a-sixteen-byte-k"), ("hex:" + "ab" * 16, b"\xab" * 16), (b"x" * 32, b"x" * 32)])
def test_parse_key(value: object, key: bytes) -> None:
    assert parse_key(value, "k") == key


@pytest.mark.parametrize("value, msg", [
    ("hex:", "0 byte"), ("hex:00", "1 byte"), ("x", "1 byte"), ("   ", "blank"), ("", "blank"), ("hex:zz", "not valid hex"),
    ("fifteen-bytes!!", "15 byte"), (HIDDEN_KEY, "placeholder"), (12345678901234567890, "expected a key string"),
])
def test_parse_key_refuses(value: object, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg) as e:
        parse_key(value, "net[0].lu2k.key")
    assert e.value.where == "net[0].lu2k.key"


def test_problems_collects_and_raises_once() -> None:
    p = Problems()
    assert p.check(lambda: as_int("3", "a")) == 3
    assert p.check(lambda: as_int("x", "b")) is None
    p.add("c", "bad")
    with pytest.raises(ConfigError) as e:
        p.raise_if_any("in configuration", "file.yaml")
    assert e.value.errors == ["b: expected an integer, got 'x'", "c: bad"]
    assert str(e.value).startswith("file.yaml: 2 error(s) in configuration")
    Problems().raise_if_any("in configuration", "file.yaml")  # nothing collected: no error
