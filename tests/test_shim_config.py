"""lu2k.kernel_shim.config: the one ShimConfig, built from keywords (the server's use) or from a
YAML mapping in the daemon config's single pass (every problem recorded with its path)."""

from __future__ import annotations

import pytest

from lu2k.errors import ConfigError
from lu2k.kernel_shim.abi import default_shim_path
from lu2k.kernel_shim.config import ShimConfig
from lu2k.values import Problems


def test_defaults_and_keywords() -> None:
    c = ShimConfig()
    assert (c.max_in_flight, c.batch, c.socket_mode, c.path) == (1024, 256, 0o600, default_shim_path())
    c = ShimConfig(max_in_flight=8, batch=32, socket_mode=0o660, path="/run/x.sock")
    assert (c.max_in_flight, c.batch, c.socket_mode, c.path) == (8, 32, 0o660, "/run/x.sock")
    assert c.options["batch"] == 32 and "max_in_flight" not in c.options and "path" not in c.options
    assert ShimConfig(max_in_flight=8, **c.options) == ShimConfig(max_in_flight=8, batch=32, socket_mode=0o660)


@pytest.mark.parametrize("kw, where", [
    ({"colour": "blue"}, "lu2k.shim: unknown shim option(s) colour"),
    ({"max_in_flight": 0}, "lu2k.shim.max_in_flight: 0 out of range"),
    ({"batch": "many"}, "lu2k.shim.batch: expected an integer"),
    ({"socket_mode": "rw"}, "lu2k.shim.socket_mode: expected an octal mode"),
    ({"max_pool_bytes": 1 << 20, "tx_pool_bytes": 2 << 20}, "lu2k.shim.tx_pool_bytes: 2097152 out of range 65536..1048576"),
    ({"idle_poll_us": float("nan")}, "lu2k.shim.idle_poll_us: expected an integer"),
])
def test_keyword_errors_name_the_key(kw: dict[str, object], where: str) -> None:
    with pytest.raises(ConfigError) as e:
        ShimConfig(**kw)  # type: ignore[arg-type]
    assert str(e.value).startswith(where)


def test_from_mapping_records_every_problem() -> None:
    p = Problems()
    c = ShimConfig.from_mapping({"path": "/tmp/s.sock", "batch": 0, "socket_mode": "0o660", "max_ports": "x", "extra": 1}, p)
    assert c.path == "/tmp/s.sock" and c.socket_mode == 0o660 and c.batch == 256  # the default stands in
    assert [e.split(":")[0] for e in p.items] == ["lu2k.shim", "lu2k.shim.max_ports", "lu2k.shim.batch"]
    p = Problems()
    ShimConfig.from_mapping({"path": ""}, p)
    assert p.items == ["lu2k.shim.path: expected a socket path, got ''"]
