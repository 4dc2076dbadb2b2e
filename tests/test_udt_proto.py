"""lu2k.backends.udt_proto: preamble, per-connection key derivation, AEAD per message.  No sockets."""

from __future__ import annotations

import pytest

pytest.importorskip("cryptography")

from lu2k.backends import udt_proto as proto  # noqa: E402
from lu2k.errors import ConfigError, FrameError, HandshakeError, LocalProtocolError  # noqa: E402
from lu2k.wire import FrameType, encode_header  # noqa: E402

KEY = b"network key of site pair"


def _pair(cipher: str = "aes-256-gcm", key_a: bytes = KEY, key_c: bytes = KEY):
    salt_c, salt_a = proto.new_salt(), proto.new_salt()
    # Each side learns the other's salt from its preamble.
    assert proto.decode_preamble(proto.encode_preamble(cipher, salt_c)) == (cipher, salt_c)
    assert proto.decode_preamble(proto.encode_preamble(cipher, salt_a)) == (cipher, salt_a)
    c_out, c_in = proto.derive_keys(key_c, cipher, salt_c, salt_a)
    a_in, a_out = proto.derive_keys(key_a, cipher, salt_c, salt_a)
    return (proto.Sealer(cipher, c_out), proto.Opener(cipher, a_in, "connector"),
            proto.Sealer(cipher, a_out), proto.Opener(cipher, c_in, "acceptor"))


@pytest.mark.parametrize("cipher", proto.CIPHERS)
def test_both_directions_round_trip(cipher: str) -> None:
    c_seal, a_open, a_seal, c_open = _pair(cipher)
    header = encode_header(FrameType.PING, b"\0" * 8, 0)
    payload = bytes(range(256)) * 40
    for _ in range(3):
        sealed = c_seal.seal(header, memoryview(payload))
        assert len(sealed) == len(header) + len(payload) + proto.TAG_SIZE
        assert payload not in sealed  # really encrypted
        assert a_open.open(sealed) == header + payload
    assert c_open.open(a_seal.seal(header)) == header


def test_keys_are_per_connection_and_per_direction() -> None:
    s1, s2 = proto.new_salt(), proto.new_salt()
    k = proto.derive_keys(KEY, "aes-256-gcm", s1, s2)
    assert k[0] != k[1]
    assert proto.derive_keys(KEY, "aes-256-gcm", s1, s2) == k
    assert proto.derive_keys(KEY, "aes-256-gcm", s2, s1) != k
    assert proto.derive_keys(KEY, "chacha20-poly1305", s1, s2) != k
    assert proto.derive_keys(b"other key", "aes-256-gcm", s1, s2) != k
    with pytest.raises(ConfigError, match="network key"):
        proto.derive_keys(b"", "aes-256-gcm", s1, s2)


def test_tampered_replayed_reordered_and_wrong_key_are_frame_errors() -> None:
    c_seal, a_open, _, _ = _pair()
    m0, m1, m2 = (c_seal.seal(bytes([i]) * 40) for i in range(3))
    assert a_open.open(m0) == bytes([0]) * 40
    flipped = bytearray(m1)
    flipped[5] ^= 1
    with pytest.raises(FrameError, match="#1 .*failed authentication.*tampered"):
        a_open.open(bytes(flipped))
    with pytest.raises(FrameError):
        a_open.open(m0)  # replay of an earlier message
    with pytest.raises(FrameError):
        a_open.open(m2)  # skipping one
    assert a_open.open(m1) == bytes([1]) * 40
    with pytest.raises(FrameError, match="shorter than its tag"):
        a_open.open(b"short")

    c_seal, a_open, _, _ = _pair(key_a=b"the wrong key")
    with pytest.raises(FrameError, match="#0 .*network's key"):
        a_open.open(c_seal.seal(b"hello"))


def test_bad_preambles_are_handshake_errors() -> None:
    good = proto.encode_preamble("aes-256-gcm", b"s" * 32)
    with pytest.raises(HandshakeError, match="expected 44"):
        proto.decode_preamble(good[:-1])
    with pytest.raises(HandshakeError, match="bad magic"):
        proto.decode_preamble(b"GET / HTTP/1.1\r\n" + good[16:])
    for version in (1, 3):  # 1: before control packets were authenticated
        with pytest.raises(HandshakeError, match=f"version {version} not supported"):
            proto.decode_preamble(b"LU2KUDT" + bytes([version]) + good[8:])
    with pytest.raises(HandshakeError, match="unknown cipher #9"):
        proto.decode_preamble(good[:8] + b"\x09" + good[9:])
    with pytest.raises(LocalProtocolError):
        proto.encode_preamble("aes-256-gcm", b"short")
    with pytest.raises(ConfigError, match="unknown cipher 'rot13'"):
        proto.check_cipher("rot13")


def test_packet_key_is_per_network_key_and_needs_one() -> None:
    key = proto.packet_key(KEY)
    assert len(key) == proto.PACKET_KEY_SIZE == 16 and key == proto.packet_key(KEY)
    assert proto.packet_key(KEY + b"!") != key
    # Not any of the connection keys a preamble derives from the same network key.
    salt_c, salt_a = proto.new_salt(), proto.new_salt()
    assert all(not k.startswith(key) for k in proto.derive_keys(KEY, "aes-256-gcm", salt_c, salt_a))
    with pytest.raises(ConfigError, match="packet key"):
        proto.packet_key(b"")
