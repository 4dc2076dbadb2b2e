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


# --- per-peer keys ------------------------------------------------------------------------------

import asyncio  # noqa: E402
import itertools  # noqa: E402
from typing import Any  # noqa: E402

from lu2k import wire  # noqa: E402
from lu2k.engine import Engine  # noqa: E402
from lu2k.errors import AuthenticationError, Status  # noqa: E402
from lu2k.nid import parse_nid  # noqa: E402
from lu2k.wire import ConnType, FrameDecoder  # noqa: E402

NET_KEY = b"the-shared-network-key-of-the-net"
A, B, C = parse_nid("10.1.0.1@tcp"), parse_nid("10.1.0.2@tcp"), parse_nid("10.1.0.3@tcp")
KEY_A, KEY_C = b"key-between-a-and-b-0123456789", b"key-between-c-and-b-0123456789"


def _one(data: bytes) -> wire.Frame:
    d = FrameDecoder(1 << 16)
    d.feed(data)
    (f,) = d.frames()
    return f


def _hello(src: Any, key: bytes, **responder: Any) -> tuple[wire.HelloInitiator, wire.HelloResponder]:
    init = wire.HelloInitiator(key=key, backend="tcp", src=src, dst=B, conn_type=ConnType.ANY, incarnation=1)
    resp = wire.HelloResponder(key=NET_KEY, backend="tcp", local_nids=frozenset({B}), incarnation=2, **responder)
    auth = init.receive(_one(resp.receive(_one(init.start()))))
    assert auth is not None
    ok = resp.receive(_one(auth))
    assert init.receive(_one(ok)) is None
    return init, resp


def test_listed_peer_proves_its_own_key() -> None:
    _init, resp = _hello(A, KEY_A, peer_keys={A: KEY_A, C: KEY_C})
    assert resp.result is not None and resp.result.peer_nid == A


@pytest.mark.parametrize("src, key", [(A, NET_KEY), (A, KEY_C), (C, KEY_A)])
def test_listed_peer_cannot_use_the_net_key_or_another_peers_identity(src: Any, key: bytes) -> None:
    """C holding its own key cannot claim A's NID (and A cannot fall back to the net key)."""
    with pytest.raises(AuthenticationError):
        _hello(src, key, peer_keys={A: KEY_A, C: KEY_C})


def test_peer_keys_only_revokes_unlisted_peers() -> None:
    with pytest.raises(AuthenticationError, match="no key for peer"):
        _hello(C, NET_KEY, peer_keys={A: KEY_A}, peer_keys_only=True)


def _engine_config(nid: str, port: int, options: dict[str, Any]) -> Any:
    return parse_config({
        "net": [{"net type": "tcp", "local NI(s)": [{"nid": nid}],
                 "lu2k": {"backend": "inproc", "port": port, "key": NET_KEY.decode(), "max_message_size": 1 << 16, "options": options}}],
        "global": {"transaction_timeout": 2, "connect_timeout": 0.5, "reconnect_min": 0.05, "reconnect_max": 0.2},
    })


_ports = itertools.count(51000)


async def test_revoked_peer_is_refused_while_the_others_keep_working() -> None:
    port = next(_ports)
    only = {"peer_keys": {str(A): KEY_A.decode()}, "peer_keys_only": True}
    b = Engine(_engine_config(str(B), port, only))
    a = Engine(_engine_config(str(A), port, {"peer_keys": {str(B): KEY_A.decode()}}))
    c = Engine(_engine_config(str(C), port, {}))  # holds the network key, but was revoked from b
    for e in (b, a, c):
        await e.start(with_shim=False)
    try:
        outcomes: dict[str, tuple[Status, str]] = {}
        done = asyncio.Event()

        def finish(name: str) -> Any:
            def cb(status: Status, reason: str) -> None:
                outcomes[name] = (status, reason)
                if len(outcomes) == 2:
                    done.set()
            return cb

        a.send(None, B, 1, 9, b"from a", finish("a"))
        c.send(None, B, 1, 9, b"from c", finish("c"))
        await asyncio.wait_for(done.wait(), 10)
        assert outcomes["a"][0] is Status.NO_RECEIVER  # reached b: authenticated with its own key
        assert outcomes["c"][0] is Status.AUTH_FAILED, outcomes["c"]
    finally:
        for e in (a, b, c):
            await e.stop()


def test_bad_peer_keys_are_config_errors() -> None:
    from lu2k.backends.base import BackendSettings
    from lu2k.nid import parse_net

    for options, match in (({"peer_keys": {"10.1.0.1@tcp": "short"}}, "at least 16"),
                           ({"peer_keys": {"nonsense": "x" * 20}}, "bad peer NID"),
                           ({"peer_keys": {"10.1.0.1@o2ib": "x" * 20}}, "not on net"),
                           ({"peer_keys_only": "yes"}, "true or false")):
        with pytest.raises(ConfigError, match=match):
            from lu2k.backends.inproc import InprocBackend
            InprocBackend(BackendSettings(parse_net("tcp"), 0, 1024, key=NET_KEY, options=options))
