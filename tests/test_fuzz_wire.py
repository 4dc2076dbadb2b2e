"""Hypothesis fuzzing of the pure decoders a peer can reach: frames, the hello, sealed records.

Properties: whatever bytes arrive, in whatever pieces, a decoder either yields frames or
raises a :class:`~lu2k.errors.RemoteProtocolError` (never another exception, never a
payload allocation beyond its limit); sealed records round-trip and any single changed,
dropped or repeated byte is an :class:`~lu2k.errors.IntegrityError`.

CI runs a bounded number of cases per property.  The full run (10^6 cases each)::

    LU2K_FUZZ_EXAMPLES=1000000 PYTHONPATH=$PWD python -m pytest -q -p no:cacheprovider --timeout=0 tests/test_fuzz_wire.py
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lu2k import wire
from lu2k.crypto import INLINE_MAX, FrameSealer, SealedDecoder
from lu2k.errors import HandshakeError, IntegrityError, RemoteProtocolError
from lu2k.nid import parse_nid
from lu2k.wire import ConnType, FrameDecoder, FrameType

EXAMPLES = int(os.environ.get("LU2K_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
A, B = parse_nid("127.0.0.1@tcp"), parse_nid("127.0.0.2@tcp")
KEY = b"fuzz-network-key-0123456789abcdef"
MAX_PAYLOAD = 1 << 16
FRAME_KEY = bytes(range(32))  # a frame key as the hello derives one (32 bytes)


def _valid_frames() -> st.SearchStrategy[bytes]:
    msg = st.builds(lambda seq, p, c, i: wire.encode_msg_header(seq, A.to_bytes(), B.to_bytes(), 1, 2, p, c, i) + p,
                    st.integers(0, 2**64 - 1), st.binary(max_size=300), st.booleans(), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    acks = st.builds(wire.encode_acks, st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)), max_size=5))
    ping = st.builds(lambda t: wire.encode_frame(FrameType.PING, wire.PING_BODY.pack(t)), st.integers(0, 2**64 - 1))
    return st.one_of(msg, acks, ping)


def _mutated(data: bytes, draw_pos: int, value: int) -> bytes:
    if not data:
        return bytes([value])
    pos = draw_pos % len(data)
    return data[:pos] + bytes([value]) + data[pos + 1 :]


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def _feed_in_pieces(decoder: object, data: bytes, cuts: list[int]) -> list[wire.Frame]:
    out: list[wire.Frame] = []
    for piece in _pieces(data, cuts):
        decoder.feed(piece)  # type: ignore[attr-defined]
        out += decoder.frames()  # type: ignore[attr-defined]
    return out


@FUZZ
@given(st.lists(_valid_frames(), max_size=4), st.integers(0, 2**16), st.integers(0, 255), st.lists(st.integers(0, 2**16), max_size=6),
       st.booleans())
def test_frame_decoder_yields_frames_or_a_protocol_error(frames: list[bytes], pos: int, value: int, cuts: list[int],
                                                          hello_phase: bool) -> None:
    data = _mutated(b"".join(frames), pos, value) if value % 3 else b"".join(frames)
    d = FrameDecoder(MAX_PAYLOAD, accept=wire.HELLO_FRAMES if hello_phase else None)
    try:
        for f in _feed_in_pieces(d, data, cuts):
            assert len(f.payload) == f.header.payload_len <= MAX_PAYLOAD
            if f.header.type is FrameType.MSG:
                info = wire.decode_msg(f.header)
                assert (info.msg_id is not None) == bool(f.header.flags & wire.FLAG_MSG_ID)
            elif f.header.type is FrameType.ACK:
                wire.decode_acks(f)
    except RemoteProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 2**16), max_size=6))
def test_frame_decoder_on_random_bytes(data: bytes, cuts: list[int]) -> None:
    d = FrameDecoder(MAX_PAYLOAD, accept=wire.HELLO_FRAMES)
    try:
        _feed_in_pieces(d, data, cuts)
    except RemoteProtocolError:
        pass
    assert not d.in_payload or d._header is not None and d._header.type in wire.HELLO_FRAMES


def _hello_frames() -> st.SearchStrategy[bytes]:
    def hello(ctype: int, features: int, backend: bytes, src: bytes, dst: bytes, rest: bytes) -> bytes:
        body = wire.HELLO_BODY.pack(ctype, features, 2, backend, src, dst, 7, rest[:32].ljust(32, b"\0"), rest[32:64].ljust(32, b"\0"))
        return wire.encode_frame(FrameType.HELLO, body)

    nid = st.one_of(st.just(A.to_bytes()), st.just(B.to_bytes()), st.binary(min_size=wire.NID_SIZE, max_size=wire.NID_SIZE))
    raw = st.builds(lambda t, b: wire.encode_frame(t, b.ljust(wire.BODIES[t].size, b"\0")[: wire.BODIES[t].size]),
                    st.sampled_from(list(FrameType)), st.binary(max_size=128))
    return st.one_of(st.builds(hello, st.integers(0, 255), st.integers(0, 255), st.sampled_from([b"tcp".ljust(16, b"\0"), bytes(16)]),
                               nid, nid, st.binary(min_size=64, max_size=64)), raw)


@FUZZ
@given(st.lists(_hello_frames(), min_size=1, max_size=4))
def test_hello_responder_refuses_with_a_reason_or_proceeds(frames: list[bytes]) -> None:
    resp = wire.HelloResponder(key=KEY, backend="tcp", local_nids=frozenset({B}), incarnation=2)
    for data in frames:
        try:
            (f,) = _feed_in_pieces(FrameDecoder(MAX_PAYLOAD, accept=None), data, [])
        except RemoteProtocolError:
            return  # refused by the frame decoder already
        try:
            reply = resp.receive(f)
        except HandshakeError:
            assert resp.reject_frame is not None
            return
        assert isinstance(reply, bytes)
        assert not resp.done  # nobody without the key gets past AUTH


@FUZZ
@given(st.lists(_hello_frames(), min_size=1, max_size=3))
def test_hello_initiator_never_finishes_with_a_forger(frames: list[bytes]) -> None:
    init = wire.HelloInitiator(key=KEY, backend="tcp", src=A, dst=B, conn_type=ConnType.ANY, incarnation=1)
    init.start()
    try:
        for data in frames:
            (f,) = _feed_in_pieces(FrameDecoder(MAX_PAYLOAD), data, [])  # may refuse: a RemoteProtocolError too
            init.receive(f)
    except RemoteProtocolError:
        pass
    assert not init.done


def _plain_frames() -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    frame = st.builds(lambda seq, p: (wire.encode_msg_header(seq, A.to_bytes(), B.to_bytes(), 1, 2, p, False), p),
                      st.integers(0, 2**64 - 1), st.one_of(st.binary(max_size=200), st.integers(INLINE_MAX - 2, INLINE_MAX + 300).map(os.urandom)))
    return st.lists(frame, min_size=1, max_size=4)


def _sealed(frames: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(bytes(h) + bytes(p) for h, p in FrameSealer(FRAME_KEY).seal(frames))


@FUZZ
@given(_plain_frames(), st.lists(st.integers(0, 2**20), max_size=8))
def test_sealed_frames_roundtrip_in_any_pieces(frames: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    got = _feed_in_pieces(SealedDecoder(FRAME_KEY, MAX_PAYLOAD), _sealed(frames), cuts)
    assert [bytes(f.payload) for f in got] == [p for _, p in frames]
    assert [f.header.body for f in got] == [h[wire.BASE_SIZE:] for h, _ in frames]


@FUZZ
@given(_plain_frames(), st.integers(0, 2**24), st.integers(1, 255), st.sampled_from(["flip", "drop", "repeat"]),
       st.lists(st.integers(0, 2**20), max_size=4))
def test_any_changed_byte_is_an_integrity_error(frames: list[tuple[bytes, bytes]], pos: int, xor: int, how: str, cuts: list[int]) -> None:
    data = _sealed(frames)
    i = pos % len(data)
    if how == "flip":
        data = data[:i] + bytes([data[i] ^ xor]) + data[i + 1 :]
    elif how == "drop":
        data = data[:i] + data[i + 1 :]
    else:
        data = data[: i + 1] + data[i:]
    d = SealedDecoder(FRAME_KEY, MAX_PAYLOAD)
    got: list[wire.Frame] = []
    try:
        for piece in _pieces(data, cuts):
            d.feed(piece)
            got += d.frames()
    except IntegrityError:
        pass
    else:
        # No error only if the change left a record waiting for bytes that never come: the
        # transport reports that end as truncation ("closed in the middle of a frame").
        assert not d.at_boundary()
    # Whatever came out is genuine and in order: a prefix of what was sent (all of it only
    # when the change added bytes after the last record).
    assert [bytes(f.payload) for f in got] == [p for _, p in frames][: len(got)]


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2**16), max_size=6))
def test_sealed_decoder_on_random_bytes(data: bytes, cuts: list[int]) -> None:
    d = SealedDecoder(FRAME_KEY, MAX_PAYLOAD)
    try:
        frames = _feed_in_pieces(d, data, cuts)
    except IntegrityError:
        return
    assert frames == []  # a forger without the key gets nothing through
