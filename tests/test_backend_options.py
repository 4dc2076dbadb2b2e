"""The option checks every backend shares (lu2k.backends.base): clear errors naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from lu2k.backends.base import option_int, option_seconds
from lu2k.errors import ConfigError


def test_option_int_default_value_and_range() -> None:
    assert option_int({}, "slots", 32, 2, 4096, "net o2ib") == 32
    assert option_int({"slots": "64"}, "slots", 32, 2, 4096, "net o2ib") == 64


@pytest.mark.parametrize("opts, kw, match", [
    ({"slots": "many"}, {}, "slots must be an integer, not 'many'"),
    ({"slots": 1}, {}, "slots 1 outside 2..4096"),
    ({"slots": None}, {"what": "a byte count"}, "slots must be a byte count"),
])
def test_option_int_errors(opts: dict[str, Any], kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        option_int(opts, "slots", 32, 2, 4096, "net o2ib", **kw)
    assert "net o2ib" in str(e.value)


def test_option_seconds() -> None:
    assert option_seconds({}, "linger", 10.0, "w") == 10.0
    assert option_seconds({"linger": "2.5"}, "linger", 10.0, "w") == 2.5
    assert option_seconds({"linger": 0}, "linger", 10.0, "w", allow_zero=True) == 0.0
    with pytest.raises(ConfigError, match="linger must be positive, not 0"):
        option_seconds({"linger": 0}, "linger", 10.0, "w")
    with pytest.raises(ConfigError, match="zero or positive, not -1"):
        option_seconds({"linger": -1}, "linger", 10.0, "w", allow_zero=True)
    with pytest.raises(ConfigError, match="a number of seconds, not 'soon'"):
        option_seconds({"linger": "soon"}, "linger", 10.0, "w")


# --- the boundary helpers every backend uses ------------------------------------------------

def test_map_exceptions_translates_by_type_in_table_order() -> None:
    import errno as _errno

    from lu2k.backends.base import map_exceptions
    from lu2k.errors import ConnectError, ConnectTimeout, ReadError

    table = {TimeoutError: ConnectTimeout, OSError: ConnectError}
    with pytest.raises(ConnectTimeout, match="connect to x: timed out"):
        with map_exceptions(table, "connect to x"):
            raise TimeoutError(_errno.ETIMEDOUT, "timed out")
    with pytest.raises(ConnectError, match="connect to x: Connection refused"):
        with map_exceptions(table, "connect to x"):
            raise ConnectionRefusedError(_errno.ECONNREFUSED, "Connection refused")
    with pytest.raises(ReadError):  # lu2k's own errors pass through untouched
        with map_exceptions(table, "connect to x"):
            raise ReadError("already translated")
    with pytest.raises(KeyError):  # not in the table: a bug, not a network error
        with map_exceptions(table, "connect to x"):
            raise KeyError("k")


def test_accept_backoff_doubles_to_its_cap_and_resets() -> None:
    from lu2k.backends.base import AcceptBackoff

    b = AcceptBackoff(low=0.05, high=0.3)
    assert [b.failed() for _ in range(5)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    b.succeeded()
    assert b.failed() == 0.05


def test_encryption_option() -> None:
    from lu2k.backends.base import BackendSettings
    from lu2k.errors import ConfigError
    from lu2k.nid import parse_net

    assert BackendSettings(parse_net("tcp"), 0, 1024).encryption == "aes-256-gcm"
    assert BackendSettings(parse_net("tcp"), 0, 1024, options={"encryption": "none"}).encryption == "none"
    with pytest.raises(ConfigError, match="options.encryption"):
        BackendSettings(parse_net("tcp"), 0, 1024, options={"encryption": "rot13"}).encryption


def test_plaintext_is_warned_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    from lu2k.backends.base import BackendSettings
    from lu2k.backends.tcp import TcpBackend
    from lu2k.nid import parse_net

    backend = TcpBackend(BackendSettings(parse_net("tcp"), 0, 1024, options={"encryption": "none"}))
    out = capsys.readouterr()
    assert not backend.seal_frames
    assert "encryption: none" in out.out + out.err and "plaintext" in out.out + out.err
    assert TcpBackend(BackendSettings(parse_net("tcp"), 0, 1024)).seal_frames
