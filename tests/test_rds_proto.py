"""rds backend, pure parts: envelope codec, datagram planning/sizing, RDS info parsing.

The socket parts need AF_RDS, which only the kernel-test guest has (tests/guest/test_rds_guest.py).
"""

from __future__ import annotations

import socket
import struct

import pytest

from lu2k.backends import availability, get_backend
from lu2k.backends.base import BackendSettings
from lu2k.backends.rds import (
    ENVELOPE_SIZE,
    MIN_DATAGRAM,
    RDS_MAX_MSG_SIZE,
    Kind,
    QueuedMessage,
    RdsBackend,
    decode_envelope,
    encode_envelope,
    parse_info_messages,
    plan_datagrams,
    queued_between,
    rds_send_limit,
    rds_unavailable_reason,
    tx_datagram_size,
)
from lu2k.errors import BackendUnavailable, ConnectError, FrameError, LocalProtocolError
from lu2k.nid import parse_net


def test_envelope_round_trip() -> None:
    raw = encode_envelope(Kind.CONNECT, 0xDEADBEEF, 512 << 10, flags=2)
    assert len(raw) == ENVELOPE_SIZE == 16
    env = decode_envelope(raw + b"trailing data is the datagram body")
    assert (env.kind, env.session, env.value, env.flags) == (Kind.CONNECT, 0xDEADBEEF, 512 << 10, 2)


def test_envelope_sequence_wraps_to_32_bits() -> None:
    assert decode_envelope(encode_envelope(Kind.DATA, 1, 1 << 32)).value == 0


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"short", "shorter than"),
        (b"GET / HTTP/1.0\r\n\r\n", "bad magic"),
        (encode_envelope(Kind.DATA, 7)[:4] + bytes([9]) + encode_envelope(Kind.DATA, 7)[5:], "version 9"),
        (encode_envelope(Kind.DATA, 7)[:5] + bytes([77]) + encode_envelope(Kind.DATA, 7)[6:], "unknown kind 77"),
        (encode_envelope(Kind.DATA, 7)[:8] + b"\0\0\0\0" + encode_envelope(Kind.DATA, 7)[12:], "session id 0"),
    ],
)
def test_bad_envelopes_are_frame_errors(raw: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_envelope(raw)


def test_session_zero_cannot_be_sent() -> None:
    with pytest.raises(LocalProtocolError, match="session id 0"):
        encode_envelope(Kind.DATA, 0)


def _join(datagrams: list[list[memoryview]]) -> bytes:
    return b"".join(bytes(v) for d in datagrams for v in d)


def test_plan_datagrams_fragments_large_and_packs_small_without_copying() -> None:
    big = bytearray(range(256)) * 10_000  # 2.56 MB
    views = [memoryview(b"H" * 40), memoryview(big), memoryview(b"h2"), memoryview(b"tiny")]
    plan = plan_datagrams(views, 1 << 20)
    assert [sum(len(v) for v in d) for d in plan] == [1 << 20, 1 << 20, 40 + len(big) + 6 - 2 * (1 << 20)]
    assert _join(plan) == b"H" * 40 + bytes(big) + b"h2tiny"
    # The payload slices are views of the caller's buffer, not copies.
    assert any(v.obj is big for v in plan[1])


def test_plan_datagrams_many_small_frames_share_one_datagram() -> None:
    plan = plan_datagrams([memoryview(b"x" * 50) for _ in range(100)], 8192)
    assert len(plan) == 1 and _join(plan) == b"x" * 5000


def test_plan_datagrams_exact_multiple_has_no_empty_tail() -> None:
    plan = plan_datagrams([memoryview(bytes(8192 * 3))], 8192)
    assert [sum(len(v) for v in d) for d in plan] == [8192] * 3


def test_plan_datagrams_accepts_non_byte_views_and_rejects_zero_size() -> None:
    words = memoryview(bytearray(64)).cast("I")
    assert _join(plan_datagrams([words], 10)) == bytes(64)
    assert plan_datagrams([], 10) == []
    with pytest.raises(LocalProtocolError):
        plan_datagrams([memoryview(b"x")], 0)


def test_send_limit_is_half_the_reported_sndbuf_and_capped() -> None:
    assert rds_send_limit(212992 * 2) == 212992
    assert rds_send_limit(64 << 20) == RDS_MAX_MSG_SIZE


def test_tx_datagram_size_takes_the_smallest_limit() -> None:
    assert tx_datagram_size(512 << 10, RDS_MAX_MSG_SIZE) == 512 << 10
    assert tx_datagram_size(RDS_MAX_MSG_SIZE, 200_000) == 200_000
    with pytest.raises(ConnectError, match="datagram_size"):
        tx_datagram_size(MIN_DATAGRAM - 1, RDS_MAX_MSG_SIZE)


def _info(seq: int, length: int, la: str, fa: str, lp: int, fp: int, tos: bool) -> bytes:
    raw = struct.pack("<QI", seq, length) + socket.inet_aton(la) + socket.inet_aton(fa)
    raw += struct.pack(">HH", lp, fp) + b"\x00"
    return raw + (b"\x00" if tos else b"")


@pytest.mark.parametrize("tos", [False, True], ids=["25-byte entries", "26-byte entries (with tos)"])
def test_parse_info_messages_and_count_a_session(tos: bool) -> None:
    entries = [
        _info(1, 100, "10.0.0.1", "10.0.0.2", 4000, 5000, tos),
        _info(2, 200, "10.0.0.1", "10.0.0.2", 4000, 5000, tos),
        _info(3, 300, "10.0.0.1", "10.0.0.2", 4001, 5000, tos),
    ]
    each = len(entries[0])
    msgs = parse_info_messages(b"".join(entries), each)
    assert msgs[0] == QueuedMessage(1, 100, "10.0.0.1", "10.0.0.2", 4000, 5000)
    assert queued_between(msgs, ("10.0.0.1", 4000), ("10.0.0.2", 5000)) == 2
    assert queued_between(msgs, ("10.0.0.2", 5000), ("10.0.0.1", 4000)) == 0
    assert queued_between(msgs, ("10.0.0.9", 4000), ("10.0.0.2", 5000)) == 0


def test_queued_between_treats_unfilled_addresses_as_wildcards() -> None:
    # Linux 6.1 reports 0.0.0.0 for both addresses of messages on RDS-over-TCP paths.
    raw = _info(11, 1 << 19, "0.0.0.0", "0.0.0.0", 64902, 55471, True)
    msgs = parse_info_messages(raw, len(raw))
    assert queued_between(msgs, ("10.201.0.1", 64902), ("10.201.0.2", 55471)) == 1
    assert queued_between(msgs, ("10.201.0.1", 64903), ("10.201.0.2", 55471)) == 0
    with pytest.raises(LocalProtocolError):
        parse_info_messages(b"", 8)


def test_registry_and_availability_explain_missing_af_rds() -> None:
    assert get_backend("rds") is RdsBackend
    reason = rds_unavailable_reason()
    if reason is None:
        pytest.skip("this kernel has AF_RDS; the guest tier covers the real backend")
    assert "modprobe rds_tcp" in reason
    assert availability()["rds"] == reason
    with pytest.raises(BackendUnavailable, match="rds_tcp"):
        RdsBackend(BackendSettings(parse_net("tcp9"), 0, 1 << 20))
