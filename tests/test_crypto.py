"""Sealed frames: pure, no event loop (the attack-level properties are in test_fuzz_wire.py)."""

from __future__ import annotations

import os

import pytest

from lu2k import wire
from lu2k.crypto import INLINE_MAX, TAG_SIZE, FrameCodec, FrameSealer, SealedDecoder
from lu2k.errors import FrameError, IntegrityError, LocalProtocolError
from lu2k.nid import parse_nid
from lu2k.wire import ConnType, FrameType

A, B = parse_nid("127.0.0.1@tcp"), parse_nid("127.0.0.2@tcp")
KEY = bytes(range(32))


def _msg(seq: int, payload: bytes) -> tuple[bytes, bytes]:
    return wire.encode_msg_header(seq, A.to_bytes(), B.to_bytes(), 1, 2, payload, False), payload


def _wire_bytes(records: list[tuple[bytes, bytes | memoryview]]) -> bytes:
    return b"".join(bytes(h) + bytes(p) for h, p in records)


def test_small_frames_take_one_record_large_ones_two() -> None:
    s = FrameSealer(KEY)
    small = s.seal([_msg(1, b"x" * 100)])
    assert s.records == 1 and small[0][1] == b""
    assert len(small[0][0]) == 4 + wire.BASE_SIZE + wire.MSG_BODY.size + 100 + TAG_SIZE
    big = s.seal([_msg(2, os.urandom(INLINE_MAX + 1))])
    assert s.records == 3 and len(big[0][1]) == INLINE_MAX + 1 + TAG_SIZE


def test_large_payload_is_decrypted_into_the_supplied_buffer_and_the_spare_reused() -> None:
    targets: list[bytearray] = []

    def buffer_for(header: wire.FrameHeader) -> memoryview:
        targets.append(bytearray(header.payload_len))
        return memoryview(targets[-1])

    s, d = FrameSealer(KEY), SealedDecoder(KEY, 1 << 20, buffer_for)
    payloads = [os.urandom(100_000), os.urandom(90_000)]
    for i, p in enumerate(payloads):
        d.feed(_wire_bytes(s.seal([_msg(i + 1, p)])))
    frames = d.frames()
    assert [bytes(f.payload) for f in frames] == payloads
    assert [bytes(t) for t in targets] == payloads and frames[0].payload.obj is targets[0]  # type: ignore[union-attr]
    assert d._spare is not None and len(d._spare) == 100_000 + TAG_SIZE  # kept for the next large record


def test_direct_fill_of_the_sealed_payload() -> None:
    s, d = FrameSealer(KEY), SealedDecoder(KEY, 1 << 20)
    payload = os.urandom(50_000)
    first, sealed = s.seal([_msg(7, payload)])[0]
    d.feed(first)
    target = d.payload_target()
    assert target is not None and len(target) == len(payload) + TAG_SIZE and not d.at_boundary()
    target[:] = bytes(sealed)
    d.payload_filled(len(target))
    (f,) = d.frames()
    assert bytes(f.payload) == payload and wire.decode_msg(f.header).seq == 7 and d.at_boundary()


def test_wrong_key_and_oversized_announcement_are_integrity_errors() -> None:
    data = _wire_bytes(FrameSealer(KEY).seal([_msg(1, b"hello")]))
    with pytest.raises(IntegrityError, match="failed authentication"):
        SealedDecoder(bytes(32), 1 << 20).feed(data)
    d = SealedDecoder(KEY, 1 << 20)
    with pytest.raises(IntegrityError, match="announcing"):
        d.feed((1 << 30).to_bytes(4, "little") + b"x" * 60)
    with pytest.raises(IntegrityError):  # broken for good: no resynchronising on a hostile stream
        d.feed(data)


def test_authentic_frame_over_the_limit_is_refused() -> None:
    data = _wire_bytes(FrameSealer(KEY).seal([_msg(1, os.urandom(70_000))]))
    with pytest.raises(FrameError, match="exceeds limit"):
        SealedDecoder(KEY, 65_536).feed(data)


def _hello_result(sealed: bool) -> wire.HelloResult:
    return wire.HelloResult(A, B, ConnType.ANY, 1, 2, KEY, KEY, sealed)


def test_codec_takes_only_hello_frames_then_seals() -> None:
    codec = FrameCodec(1 << 20)
    with pytest.raises(FrameError, match="before the hello"):
        codec.decoder.feed(wire.encode_frame(FrameType.PING, wire.PING_BODY.pack(1)))
    codec = FrameCodec(1 << 20)
    assert not codec.hello_over and codec.outgoing([_msg(1, b"x")]) == [_msg(1, b"x")]
    codec.hello_done(_hello_result(True))
    assert codec.hello_over and codec.stats()["encryption"] == "aes-256-gcm"
    peer = FrameCodec(1 << 20)
    peer.hello_done(_hello_result(True))
    peer.decoder.feed(_wire_bytes(list(codec.outgoing([_msg(1, b"sealed")]))))
    (f,) = peer.decoder.frames()
    assert bytes(f.payload) == b"sealed" and peer.stats()["records_received"] == 1
    with pytest.raises(LocalProtocolError, match="twice"):
        codec.hello_done(_hello_result(True))


def test_codec_without_encryption_passes_bytes_read_past_the_hello_on() -> None:
    codec = FrameCodec(1 << 20)
    ok = wire.encode_frame(FrameType.AUTH_OK, bytes(32))
    header, payload = _msg(1, b"plain")
    codec.decoder.feed(ok + header[:10])  # the next frame's start came in the same read
    assert [f.header.type for f in codec.decoder.frames()] == [FrameType.AUTH_OK]
    codec.hello_done(_hello_result(False))
    codec.decoder.feed(header[10:] + payload)
    (f,) = codec.decoder.frames()
    assert bytes(f.payload) == b"plain" and codec.stats() == {"encryption": "none"}


def test_a_batch_of_small_frames_is_one_buffer_of_records_each_opened_on_its_own() -> None:
    s, d = FrameSealer(KEY), SealedDecoder(KEY, 1 << 20)
    frames = [_msg(i, os.urandom(i * 7)) for i in range(1, 40)] + [_msg(40, os.urandom(INLINE_MAX + 5))] + [_msg(41, b"tail")]
    sealed = s.seal(frames)
    # 39 small frames in one buffer (one iovec), the large one as header record + payload record, then the tail.
    assert len(sealed) == 3 and sealed[0][1] == b"" and len(sealed[1][1]) == INLINE_MAX + 5 + TAG_SIZE and s.records == 42
    d.feed(_wire_bytes(sealed))
    got = d.frames()
    assert [bytes(f.payload) for f in got] == [bytes(p) for _h, p in frames] and d.records == 42


@pytest.mark.parametrize("attack", ["alter", "swap", "replay", "drop"])
def test_each_record_in_a_batched_buffer_is_still_authenticated_on_its_own(attack: str) -> None:
    s, d = FrameSealer(KEY), SealedDecoder(KEY, 1 << 20)
    buf = bytes(s.seal([_msg(i, b"p" * 10) for i in range(1, 6)])[0][0])
    size = len(buf) // 5
    recs = [buf[i * size : (i + 1) * size] for i in range(5)]
    if attack == "alter":
        recs[2] = recs[2][:10] + bytes([recs[2][10] ^ 1]) + recs[2][11:]
    elif attack == "swap":
        recs[2], recs[3] = recs[3], recs[2]
    elif attack == "replay":
        recs[2] = recs[1]
    else:
        del recs[2]
    with pytest.raises(IntegrityError, match="failed authentication"):
        d.feed(b"".join(recs))
    assert [f.header.fields()[0] for f in d.frames()] == [1, 2]  # the authentic records before it were opened
