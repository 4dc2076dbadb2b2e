"""Framing and hello: pure, no event loop."""

from __future__ import annotations

import os
import struct
import zlib

import pytest

from lu2k import wire
from lu2k.errors import AuthenticationError, FrameError, HandshakeError, LocalProtocolError, Status
from lu2k.nid import parse_nid
from lu2k.wire import ConnType, FrameDecoder, FrameType

A = parse_nid("127.0.0.1@tcp")
B = parse_nid("127.0.0.2@tcp")


def msg_frame(seq: int, payload: bytes, checksum: bool = False) -> bytes:
    return wire.encode_msg_header(seq, A.to_bytes(), B.to_bytes(), 1, 2, payload, checksum) + payload


def decode_all(data: bytes, chunk: int, max_payload: int = 1 << 20) -> list[wire.Frame]:
    d = FrameDecoder(max_payload)
    out = []
    for i in range(0, len(data), chunk):
        d.feed(data[i : i + chunk])
        out += d.frames()
    assert d.at_boundary()
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_messages_roundtrip_any_split(chunk: int) -> None:
    payloads = [b"", b"x", bytes(range(256)) * 40, b"y" * 70000]
    data = b"".join(msg_frame(i + 1, p, checksum=True) for i, p in enumerate(payloads))
    frames = decode_all(data, chunk)
    assert [bytes(f.payload) for f in frames] == payloads
    infos = [wire.decode_msg(f.header) for f in frames]
    assert [i.seq for i in infos] == [1, 2, 3, 4]
    assert infos[0].src == A and infos[0].dst == B and infos[0].src_portal == 1 and infos[0].dst_portal == 2
    for f, i in zip(frames, infos):
        wire.check_payload(i, f.payload)


def test_payload_goes_into_supplied_buffer() -> None:
    target = bytearray(5000)
    d = FrameDecoder(1 << 20, buffer_for=lambda h: memoryview(target))
    payload = bytes(range(250)) * 20
    d.feed(msg_frame(1, payload))
    (f,) = d.frames()
    assert bytes(target) == payload and f.payload.obj is target  # type: ignore[union-attr]


def test_direct_payload_fill() -> None:
    d = FrameDecoder(1 << 20)
    payload = b"z" * 100000
    data = msg_frame(9, payload)
    hdr_len = len(data) - len(payload)
    d.feed(data[: hdr_len + 10])
    view = d.payload_target()
    assert view is not None and len(view) == len(payload) - 10
    view[:] = payload[10:]
    d.payload_filled(len(view))
    (f,) = d.frames()
    assert bytes(f.payload) == payload


def test_corrupt_payload_detected_by_checksum() -> None:
    data = bytearray(msg_frame(1, b"hello world", checksum=True))
    data[-1] ^= 1
    (f,) = decode_all(bytes(data), 1000)
    with pytest.raises(FrameError, match="payload checksum"):
        wire.check_payload(wire.decode_msg(f.header), f.payload)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:5] + b"\x63" + b[6:], "unknown frame type"),
        (lambda b: b[:20] + bytes([b[20] ^ 0xFF]) + b[21:], "header checksum"),
    ],
)
def test_bad_headers_rejected(mutate, match) -> None:  # type: ignore[no-untyped-def]
    data = mutate(msg_frame(1, b"abc"))
    with pytest.raises(FrameError, match=match):
        decode_all(data, 1000)


def test_oversized_payload_rejected_before_reading() -> None:
    d = FrameDecoder(1000)
    hdr = wire.encode_msg_header(1, A.to_bytes(), B.to_bytes(), 0, 0, b"x" * 1001, False)
    with pytest.raises(FrameError, match="exceeds limit 1000"):
        d.feed(hdr)


def test_control_frames_have_small_limits() -> None:
    forged = wire.encode_header(FrameType.NACK, wire.NACK_BODY.pack(1, 5), 100000)
    with pytest.raises(FrameError, match="NACK frame payload"):
        FrameDecoder(1 << 20).feed(forged)


def test_ack_count_must_match_payload() -> None:
    forged = wire.encode_frame(FrameType.ACK, wire.ACK_BODY.pack(3), wire.ACK_ENTRY.pack(1, 0))
    with pytest.raises(FrameError, match="announces 3 entries"):
        decode_all(forged, 100)


def test_acks_and_nacks_roundtrip() -> None:
    (f,) = decode_all(wire.encode_acks([(1, 0), (5, 0), (7, int(Status.NO_RECEIVER))]), 3)
    assert wire.decode_acks(f) == [(1, 0), (5, 0), (7, int(Status.NO_RECEIVER))]
    (n,) = decode_all(wire.encode_nack(42, Status.NO_RECEIVER, "nobody home"), 5)
    assert wire.decode_nack(n) == (42, Status.NO_RECEIVER, "nobody home")


def test_truncation_is_not_a_boundary() -> None:
    d = FrameDecoder(1 << 20)
    d.feed(msg_frame(1, b"abcdef")[:-2])
    assert not d.at_boundary() and d.frames() == []


def test_max_payload_bounds() -> None:
    with pytest.raises(LocalProtocolError):
        FrameDecoder(wire.MAX_PAYLOAD_HARD + 1)


def _run_hello(init: wire.HelloInitiator, resp: wire.HelloResponder) -> None:
    def one(data: bytes) -> wire.Frame:
        (f,) = decode_all(data, 1 << 16)
        return f

    to_resp = init.start()
    reply = resp.receive(one(to_resp))
    auth = init.receive(one(reply))
    assert auth is not None
    ok = resp.receive(one(auth))
    assert init.receive(one(ok)) is None


def make_pair(key_a: bytes = b"secret-key", key_b: bytes = b"secret-key", backend_b: str = "tcp", dst=B):  # type: ignore[no-untyped-def]
    init = wire.HelloInitiator(key=key_a, backend="tcp", src=A, dst=dst, conn_type=ConnType.BULK, incarnation=11)
    resp = wire.HelloResponder(key=key_b, backend=backend_b, local_nids=frozenset({B}), incarnation=22)
    return init, resp


def test_hello_success_both_sides_learn_each_other() -> None:
    init, resp = make_pair()
    _run_hello(init, resp)
    assert init.result and resp.result
    assert resp.result.peer_nid == A and resp.result.peer_incarnation == 11 and resp.result.conn_type is ConnType.BULK
    assert init.result.peer_incarnation == 22


def test_hello_wrong_key_refused_by_acceptor() -> None:
    init, resp = make_pair(key_a=b"wrong-key!")
    reply = resp.receive(decode_all(init.start(), 99)[0])
    auth = init.receive(decode_all(reply, 99)[0])
    # The connector proves first; the acceptor refuses the wrong proof and says why.
    with pytest.raises(AuthenticationError):
        resp.receive(decode_all(auth or b"", 99)[0])
    (rej,) = decode_all(resp.reject_frame or b"", 99)
    with pytest.raises(AuthenticationError, match="wrong network key"):
        init.receive(rej)


def test_acceptor_rejects_forged_auth() -> None:
    init, resp = make_pair()
    resp.receive(decode_all(init.start(), 99)[0])
    forged = wire.encode_frame(FrameType.AUTH, wire.AUTH_BODY.pack(b"\0" * 32))
    with pytest.raises(AuthenticationError):
        resp.receive(decode_all(forged, 99)[0])
    assert resp.reject_frame is not None
    (rej,) = decode_all(resp.reject_frame, 99)
    with pytest.raises(AuthenticationError, match="wrong network key"):
        init.receive(rej)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"backend_b": "udt"}, "backend mismatch"), ({"dst": parse_nid("127.0.0.9@tcp")}, "not a NID of this daemon")],
)
def test_hello_mismatch_rejected_with_reason(kwargs, match) -> None:  # type: ignore[no-untyped-def]
    init, resp = make_pair(**kwargs)
    with pytest.raises(HandshakeError, match=match):
        resp.receive(decode_all(init.start(), 99)[0])
    (rej,) = decode_all(resp.reject_frame or b"", 99)
    with pytest.raises(HandshakeError, match=match):
        init.receive(rej)


def test_hello_version_mismatch() -> None:
    init, resp = make_pair()
    hello = bytearray(init.start())
    base = list(struct.unpack("<IBBHII", hello[:16]))
    base[1], base[5] = 9, 0
    body = bytes(hello[16:])
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<IBBHII", *base))) & 0xFFFFFFFF
    base[5] = crc
    data = struct.pack("<IBBHII", *base) + body
    with pytest.raises(HandshakeError, match="protocol version 9 not supported"):
        resp.receive(decode_all(data, 99)[0])


def test_acceptor_reveals_nothing_key_dependent_before_the_connector_proves(monkeypatch: pytest.MonkeyPatch, in_pure_child: bool) -> None:
    """The finding: an unauthenticated HELLO got back a MAC over attacker-known data, so a
    weak key fell to an offline dictionary.  Now the reply is the same whatever the key (with
    the randomness fixed): there is nothing in it to test a guess against."""
    if in_pure_child:
        return
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    fixed = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    monkeypatch.setattr(wire, "_ephemeral", lambda: (fixed, fixed.public_key().public_bytes_raw()))
    init = wire.HelloInitiator(key=b"k" * 16, backend="tcp", src=A, dst=B, conn_type=ConnType.ANY, incarnation=1)
    hello = decode_all(init.start(), 99)[0]
    replies = {
        wire.HelloResponder(key=key, backend="tcp", local_nids=frozenset({B}), incarnation=22, nonce=bytes(32)).receive(hello)
        for key in (b"password", b"correct horse battery staple", os.urandom(32))
    }
    assert len(replies) == 1


def test_hello_result_carries_the_proven_peer_nid_and_matching_frame_keys() -> None:
    init, resp = make_pair()
    _run_hello(init, resp)
    assert init.result and resp.result
    assert resp.result.peer_nid == A and init.result.peer_nid == B
    assert init.result.tx_key == resp.result.rx_key and init.result.rx_key == resp.result.tx_key
    assert init.result.tx_key != init.result.rx_key and len(init.result.tx_key) == 32
    # A second hello between the same two gets fresh keys.
    init2, resp2 = make_pair()
    _run_hello(init2, resp2)
    assert init2.result and init2.result.tx_key != init.result.tx_key


def test_encryption_mismatch_is_refused_with_a_reason() -> None:
    init = wire.HelloInitiator(key=b"secret-key", backend="tcp", src=A, dst=B, conn_type=ConnType.ANY, incarnation=1, sealed=False)
    resp = wire.HelloResponder(key=b"secret-key", backend="tcp", local_nids=frozenset({B}), incarnation=2)
    with pytest.raises(HandshakeError, match="encryption mismatch"):
        resp.receive(decode_all(init.start(), 99)[0])


def test_channel_binding_mismatch_fails_authentication() -> None:
    init = wire.HelloInitiator(key=b"secret-key", backend="tcp", src=A, dst=B, conn_type=ConnType.ANY, incarnation=1,
                               channel_binding=b"cert-seen-by-connector")
    resp = wire.HelloResponder(key=b"secret-key", backend="tcp", local_nids=frozenset({B}), incarnation=2,
                               channel_binding=b"cert-of-the-real-acceptor")
    auth = init.receive(decode_all(resp.receive(decode_all(init.start(), 99)[0]), 99)[0])
    with pytest.raises(AuthenticationError):
        resp.receive(decode_all(auth or b"", 99)[0])


def test_low_order_ephemeral_key_is_refused() -> None:
    init, resp = make_pair()
    hello = bytearray(init.start())
    hello[-32:] = bytes(32)  # the all-zero point: a forced, known shared secret
    body = bytes(hello[16:])
    base = list(struct.unpack("<IBBHII", hello[:16]))
    base[5] = 0
    base[5] = zlib.crc32(body, zlib.crc32(struct.pack("<IBBHII", *base))) & 0xFFFFFFFF
    with pytest.raises(HandshakeError, match="invalid ephemeral key"):
        resp.receive(decode_all(struct.pack("<IBBHII", *base) + body, 99)[0])


def test_the_destination_view_of_a_msg_body_reads_what_msg_body_packs() -> None:
    dst = parse_nid("10.1.2.3@tcp7").to_bytes()
    body = wire.MSG_BODY.pack(12345, parse_nid("10.9.9.9@tcp").to_bytes(), dst, 4, 0xDEADBEEF, 77)
    assert wire.MSG_BODY_DST.unpack_from(body) == (dst, 0xDEADBEEF)
