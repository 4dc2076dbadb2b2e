"""Network keys: ``lu2k keygen psk`` makes keys the hello's safety argument needs."""

from __future__ import annotations

import pytest

from lu2k.cli.keys import make_psk
from lu2k.cli.main import main
from lu2k.errors import ConfigError
from lu2k.settings import parse_config


def test_psk_is_256_random_bits_in_the_configs_hex_form() -> None:
    keys = {make_psk() for _ in range(50)}
    assert len(keys) == 50 and all(k.startswith("hex:") and len(k) == 4 + 64 for k in keys)
    cfg = parse_config({"net": [{"net type": "tcp", "local NI(s)": [{"nid": "127.0.0.1@tcp"}],
                                 "lu2k": {"backend": "tcp", "key": next(iter(keys))}}]})
    assert len(cfg.nets[0].key) == 32


@pytest.mark.parametrize("nbytes", [0, 1, 8, 15])
def test_short_psk_refused(nbytes: int) -> None:
    with pytest.raises(ConfigError, match="at least 16 random bytes"):
        make_psk(nbytes)


def test_cli_refuses_short_psk_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "psk", "--bytes", "4"]) == 1
    assert "at least 16 random bytes" in capsys.readouterr().err
