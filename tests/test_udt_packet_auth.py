"""_udt/packet_auth.h through _udtcore.PacketAuth: UDT control packets sealed and opened as bytes.

The tag is checked against an independent SipHash-2-4 written here from the paper (and its
published test vector), so the trailer's layout is pinned down, not just self-consistent.
"""

from __future__ import annotations

import random
import struct

import pytest

udtcore = pytest.importorskip("lu2k.backends._udtcore", reason="UDT binding not built (apt-get install libudt-dev)")

KEY = bytes(range(16))
TRAILER = udtcore.PACKET_TRAILER_SIZE
WINDOW = 960  # counters behind the newest a socket still takes once (packet_auth.h kWindow)
MASK = (1 << 64) - 1
# UDT control types: handshake, keep-alive, ACK, NAK, congestion warning, shutdown, ACK2,
# message drop request, peer error, and the user-defined type lu2k's probe uses.
CONTROL_TYPES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 0x7FFF)


def siphash24(key: bytes, msg: bytes) -> int:
    """SipHash-2-4 (Aumasson & Bernstein, 2012), straight from the paper."""
    k0, k1 = struct.unpack("<QQ", key)
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & MASK

    def sipround() -> None:
        v[0] = (v[0] + v[1]) & MASK; v[1] = rotl(v[1], 13) ^ v[0]; v[0] = rotl(v[0], 32)  # noqa: E702
        v[2] = (v[2] + v[3]) & MASK; v[3] = rotl(v[3], 16) ^ v[2]  # noqa: E702
        v[0] = (v[0] + v[3]) & MASK; v[3] = rotl(v[3], 21) ^ v[0]  # noqa: E702
        v[2] = (v[2] + v[1]) & MASK; v[1] = rotl(v[1], 17) ^ v[2]; v[2] = rotl(v[2], 32)  # noqa: E702

    def absorb(m: int) -> None:
        v[3] ^= m
        sipround()
        sipround()
        v[0] ^= m

    whole = len(msg) - len(msg) % 8
    for i in range(0, whole, 8):
        absorb(struct.unpack_from("<Q", msg, i)[0])
    absorb(((len(msg) & 0xFF) << 56) | int.from_bytes(msg[whole:], "little"))
    v[2] ^= 0xFF
    for _ in range(4):
        sipround()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def control(kind: int, dest: int, info: bytes = b"", extra: int = 0) -> bytes:
    """A UDT control packet as libudt puts it on the wire (network order)."""
    return struct.pack("!IIII", 0x80000000 | (kind << 16), extra, 12345, dest) + info


def data(seq: int, dest: int, payload: bytes = b"x" * 1000) -> bytes:
    return struct.pack("!IIII", seq, 0xC0000001, 12345, dest) + payload


def test_reference_siphash_matches_the_papers_vector() -> None:
    assert siphash24(bytes(range(16)), bytes(range(15))) == 0xA129CA6149BE45E5


def counter_of(sent: bytes) -> int:
    return int(struct.unpack("!Q", sent[-16:-8])[0])


def tag_of(sent: bytes) -> int:
    return int(struct.unpack("<Q", sent[-8:])[0])


@pytest.mark.parametrize("kind", CONTROL_TYPES)
@pytest.mark.parametrize("info_len", [0, 4, 13, 24, 48, 1400])
def test_a_control_packet_is_covered_whole(kind: int, info_len: int) -> None:
    sender, receiver = udtcore.PacketAuth(KEY), udtcore.PacketAuth(KEY)
    packet = control(kind, 777, bytes(range(256)) * 6)[: 16 + info_len]
    sent = sender.seal(packet)
    assert sent[:-TRAILER] == packet and len(sent) == len(packet) + TRAILER
    assert tag_of(sent) == siphash24(KEY, packet + sent[-16:-8]) and counter_of(sent) > 0
    assert receiver.open(sent) == packet
    assert receiver.totals == {"authenticated": 1, "forged": 0, "replayed": 0}


@pytest.mark.parametrize("payload_len", [0, 1, 7, 1000, 1456])
def test_a_data_packet_is_covered_by_header_and_length(payload_len: int) -> None:
    sender, receiver = udtcore.PacketAuth(KEY), udtcore.PacketAuth(KEY)
    packet = data(99, 777, bytes(payload_len))
    sent = sender.seal(packet)
    assert sent[:-TRAILER] == packet
    assert tag_of(sent) == siphash24(KEY, packet[:16] + struct.pack("!I", payload_len) + sent[-16:-8])
    assert receiver.open(sent) == packet


def test_any_flipped_bit_missing_trailer_or_other_key_is_forged() -> None:
    sender, receiver = udtcore.PacketAuth(KEY), udtcore.PacketAuth(KEY)
    ack = control(2, 777, struct.pack("!6I", 1000, 100, 50, 8192, 10, 100))
    sent = sender.seal(ack)
    attempts = [sent[:-TRAILER], sent[:-1], ack + b"\0" * TRAILER, udtcore.PacketAuth(bytes(16)).seal(ack)]
    for i in range(len(sent) * 8):  # the control bit too: as a data packet its tag would differ
        flipped = bytearray(sent)
        flipped[i // 8] ^= 0x80 >> (i % 8)
        attempts.append(bytes(flipped))
    assert all(receiver.open(a) is None for a in attempts)
    assert receiver.totals == {"authenticated": 0, "forged": len(attempts), "replayed": 0}
    assert receiver.open(sent) == ack  # the genuine one still opens afterwards


def test_a_data_packets_header_and_length_are_bound_its_payload_is_the_aeads() -> None:
    sender, receiver = udtcore.PacketAuth(KEY), udtcore.PacketAuth(KEY)
    sent = sender.seal(data(5, 777, b"p" * 100))
    header_flips = [sent[:i] + bytes([sent[i] ^ 1]) + sent[i + 1:] for i in range(16)]
    shortened = sent[:100] + sent[-TRAILER:]
    assert all(receiver.open(a) is None for a in [*header_flips, shortened])
    # The payload is sealed by the connection's AEAD one level up: an altered one gets through
    # here and fails there, closing the connection as on tcp.
    altered = sent[:40] + b"P" + sent[41:]
    assert receiver.open(altered) == altered[:-TRAILER]


def test_readdressing_a_packet_to_another_socket_is_forged() -> None:
    sender, receiver = udtcore.PacketAuth(KEY), udtcore.PacketAuth(KEY)
    sent = sender.seal(control(5, 777))
    moved = sent[:12] + struct.pack("!I", 778) + sent[16:]
    assert receiver.open(moved) is None and receiver.socket_stats(778) == {"authenticated": 0, "forged": 0, "replayed": 0}
    assert receiver.open(sent) is not None and receiver.totals["forged"] == 1


def test_replays_are_dropped_and_reordering_is_not() -> None:
    sender, receiver = udtcore.PacketAuth(KEY), udtcore.PacketAuth(KEY)
    sent = [sender.seal(data(i, 777, b"d")) for i in range(1100)]
    assert receiver.open(sent[10]) is not None
    assert receiver.open(sent[10]) is None  # the same one again
    assert all(receiver.open(p) is not None for p in sent[:10])  # reordered by up to 10: still taken
    assert receiver.open(sent[5]) is None
    assert receiver.open(sent[1099]) is not None
    assert receiver.open(sent[100]) is None  # 999 behind the newest: outside the 960-packet window
    assert receiver.open(sent[500]) is not None  # 599 behind, never seen
    assert receiver.open(sent[500]) is None
    assert receiver.socket_stats(777) == {"authenticated": 13, "forged": 0, "replayed": 4}


@pytest.mark.parametrize("seed", range(5))
def test_the_window_agrees_with_a_set_of_everything_seen(seed: int) -> None:
    """Packets delivered in a shuffled, duplicated order against the obvious model: taken
    iff never seen and less than WINDOW behind the newest taken."""
    rnd = random.Random(seed)
    sender, receiver = udtcore.PacketAuth(KEY), udtcore.PacketAuth(KEY)
    sent = [sender.seal(data(i, 777, b"d")) for i in range(5000)]
    order: list[int] = []
    for i in sorted(range(len(sent) - 1), key=lambda i: i + rnd.expovariate(1 / 40)):  # mostly small reordering
        order.append(i)
        if rnd.random() < 0.2:
            order.append(max(0, i - rnd.randrange(1200)))  # a replay, recent or not
    order.insert(4500, len(sent) - 1)  # one jump ahead
    seen: set[int] = set()
    newest = -1
    for i in order:
        fresh = i not in seen and (i > newest or newest - i < WINDOW)
        assert (receiver.open(sent[i]) is not None) == fresh, (i, newest)
        if fresh:
            seen.add(i)
            newest = max(newest, i)


def test_each_destination_has_its_own_window_and_counters() -> None:
    sender, receiver = udtcore.PacketAuth(KEY), udtcore.PacketAuth(KEY)
    to_a = [sender.seal(control(1, 100)) for _ in range(2000)]
    to_b = sender.seal(control(1, 200))
    # 2000 packets to socket 100 do not push socket 200's first packet out of any window.
    assert receiver.open(to_a[-1]) is not None and receiver.open(to_b) is not None
    counters = [counter_of(p) for p in to_a]
    assert counters == sorted(set(counters))  # strictly increasing within a stream
    assert counter_of(to_b) > counters[-1]  # a new stream starts above every older one
    assert receiver.socket_stats(100)["authenticated"] == 1 and receiver.socket_stats(200)["authenticated"] == 1


def test_connection_requests_to_a_listener_have_no_window() -> None:
    """Destination socket 0: the listener has no socket for the peer yet (see packet_auth.h)."""
    sender, receiver = udtcore.PacketAuth(KEY), udtcore.PacketAuth(KEY)
    request = sender.seal(control(0, 0, b"\0" * 48))
    assert receiver.open(request) is not None and receiver.open(request) is not None
    assert receiver.open(request[:-1] + bytes([request[-1] ^ 1])) is None


def test_a_packet_that_fills_libudts_buffer_keeps_its_trailer_in_the_spare_bytes() -> None:
    sender, receiver = udtcore.PacketAuth(KEY), udtcore.PacketAuth(KEY)
    nak = control(3, 777, bytes(range(200)) * 7)  # 1400 bytes of loss list
    assert receiver.open(sender.seal(nak), room=1400) == nak  # the trailer went past the buffer, into the spare
    full = data(6, 777, b"y" * 1400)
    assert receiver.open(sender.seal(full), room=1400) == full
    # Longer than buffer and spare: the read cuts the trailer off, so the packet is refused.
    assert receiver.open(sender.seal(nak), room=1392) is None
    assert receiver.open(sender.seal(full), room=1000) is None


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        udtcore.PacketAuth(b"short")
    with pytest.raises(ValueError, match="16-byte header"):
        udtcore.PacketAuth(KEY).seal(b"\x80" * 15)
    u = udtcore.socket()
    try:
        with pytest.raises(ValueError, match="16 bytes"):
            udtcore.set_packet_key(u, b"short")
    finally:
        udtcore.close(u)
    with pytest.raises(ValueError, match="no UDT socket"):
        udtcore.set_packet_key(-5, KEY)


def test_runts_are_refused() -> None:
    """Too short for a trailer -- and shorter than UDT's header, libudt would take the rest
    of the header from whatever its buffer last held."""
    auth = udtcore.PacketAuth(KEY)
    assert auth.open(b"\x80\x02") is None and auth.open(b"\x00" * 15) is None and auth.open(data(1, 777, b"ab")) is None
    assert auth.totals["forged"] == 3


def test_the_trailer_size_is_the_one_the_backend_sizes_packets_for() -> None:
    from lu2k.backends import udt_proto

    assert TRAILER == udt_proto.PACKET_TRAILER_SIZE == 16
