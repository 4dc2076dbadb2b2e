"""lu2k.fec: groups, repair, recovery, loss reports and hostile frames -- all without sockets."""

from __future__ import annotations

import random

import pytest

from lu2k.errors import ConfigError
from lu2k.fec import (
    DATA_HDR, KIND_REPAIR, MAX_GROUP_DELAY, MIN_GROUP_DELAY, REPAIR_HDR, REPORT, FecDecoder, FecEncoder, FecSettings, group_delay_for_rtt,
    is_fec_frame, parse_fec, ratio_for_loss,
)


def _datagrams(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    # QUIC-looking datagrams (fixed bit set) of varied sizes, as a transport would send.
    return [bytes([0x40 | rng.randrange(64)]) + rng.randbytes(rng.randrange(20, 1400)) for _ in range(n)]


def _ratio_buying(r: float, group: list[bytes]) -> float:
    """The ratio that gives ``group`` ``r`` repair datagrams: repair is a ratio of the group's
    bytes, each repair datagram as long as its longest datagram."""
    return r / (sum(map(len, group)) / max(map(len, group))) + 1e-9


def _send_all(enc: FecEncoder, datagrams: list[bytes], t0: float = 0.0) -> list[bytes]:
    frames: list[bytes] = []
    for i, d in enumerate(datagrams):
        frames += enc.wrap(d, t0 + i * 1e-4)
    frames += enc.handle_timer(1e9)
    return frames


def test_frames_are_told_apart_from_quic_packets() -> None:
    enc = FecEncoder(FecSettings(mode="fixed", ratio=_ratio_buying(1, _datagrams(10)), k_max=10))
    frames = _send_all(enc, _datagrams(10))
    assert all(is_fec_frame(f) for f in frames)
    assert not any(is_fec_frame(d) for d in _datagrams(50))
    # Short or unknown datagrams are not ours: they go to the transport untouched.
    assert not any(is_fec_frame(d) for d in (b"", b"\x10\x00", b"\x11" + bytes(5), b"\x12" + bytes(3), b"\x80" + bytes(20)))
    assert len(frames) == 11 and frames[0][DATA_HDR.size:] == _datagrams(10)[0]


def test_no_loss_passes_everything_once_and_repair_is_ignored() -> None:
    data = [bytes([0x40]) + bytes(1000)] * 64  # equal sizes: repair per datagram is the ratio
    enc, dec = FecEncoder(FecSettings(mode="fixed", ratio=0.05, k_max=32)), FecDecoder()
    out = [d for f in _send_all(enc, data) for d in dec.receive(f)[0]]
    assert out == data
    assert enc.stats["repair"] == 3  # 0.05 * 64 over two groups of 32: 1.6 -> 1, then 0.6 + 1.6 -> 2
    # Short datagrams buy less repair: the extra bytes stay the ratio of the data bytes.
    mixed = _datagrams(64)
    enc = FecEncoder(FecSettings(mode="fixed", ratio=0.05, k_max=32))
    _send_all(enc, mixed)
    assert enc.stats["repair_bytes"] <= 0.05 * enc.stats["data_bytes"] + 2 * 1402 and enc.stats["repair"] < 3


@pytest.mark.parametrize("lost", [[0], [5, 9], [31], [0, 1, 2]])
def test_up_to_r_losses_in_a_group_are_rebuilt(lost: list[int]) -> None:
    data = _datagrams(32, seed=len(lost))
    enc, dec = FecEncoder(FecSettings(mode="fixed", ratio=_ratio_buying(3, data), k_max=32)), FecDecoder()
    frames = _send_all(enc, data)
    assert len(frames) == 35
    got = [d for i, f in enumerate(frames) if i not in lost for d in dec.receive(f)[0]]
    assert sorted(got) == sorted(data)
    assert dec.stats["recovered"] == len(lost)


def test_more_losses_than_repair_leaves_them_to_the_transport() -> None:
    data = _datagrams(16)
    enc, dec = FecEncoder(FecSettings(mode="fixed", ratio=_ratio_buying(1, data), k_max=16)), FecDecoder()
    frames = _send_all(enc, data)
    got = [d for i, f in enumerate(frames) if i not in (2, 3) for d in dec.receive(f)[0]]
    assert sorted(got) == sorted(d for i, d in enumerate(data) if i not in (2, 3))
    assert dec.stats["recovered"] == 0


def test_reordered_and_duplicated_frames() -> None:
    data = _datagrams(40, seed=7)
    enc, dec = FecEncoder(FecSettings(mode="fixed", ratio=max(_ratio_buying(2, data[:20]), _ratio_buying(2, data[20:])), k_max=20)), FecDecoder()
    frames = _send_all(enc, data)
    rng = random.Random(3)
    kept = [f for i, f in enumerate(frames) if i not in (4, 25)]
    kept += kept[:5]  # duplicates
    rng.shuffle(kept)
    got = [d for f in kept for d in dec.receive(f)[0]]
    # Each datagram at least once; a duplicate data frame of a settled group may come again
    # (the transport above dedupes), never one that was not sent.
    assert set(got) == set(data)
    assert all(d in data for d in got)


def test_partial_group_closed_by_the_timer() -> None:
    enc = FecEncoder(FecSettings(mode="fixed", ratio=0.75, k_max=64, max_delay=0.02))  # 1.5 of its longest datagram: one repair
    assert enc.next_deadline() is None
    enc.wrap(b"\x40a", 1.0)
    enc.wrap(b"\x40bb", 1.005)
    assert enc.next_deadline() == pytest.approx(1.02)
    assert enc.handle_timer(1.019) == []
    repair = enc.handle_timer(1.02)
    assert len(repair) == 1 and repair[0][0] == KIND_REPAIR
    assert enc.next_deadline() is None
    dec = FecDecoder()
    dec.receive(DATA_HDR.pack(0x10, 0, 1) + b"\x40bb")
    out, _ = dec.receive(repair[0])
    assert out == [b"\x40a"]


def test_random_loss_simulation_repairs_most_losses() -> None:
    rng = random.Random(11)
    # A bulk sender's datagrams: full-size, with one in ten a small ACK-only packet.
    data = [bytes([0x40]) + rng.randbytes(60 if i % 10 == 0 else 1400) + i.to_bytes(4, "little") for i in range(4000)]
    enc, dec = FecEncoder(FecSettings(mode="fixed", ratio=ratio_for_loss(0.01), k_max=64)), FecDecoder()
    got = set()
    lost = 0
    for f in _send_all(enc, data):
        if rng.random() < 0.01:
            lost += 1
            continue
        got.update(dec.receive(f)[0])
    missing = len(set(data) - got)
    assert lost > 20
    assert missing < lost / 5  # FEC rebuilt the large majority
    # Repair plus the data frames' headers, against what was sent without FEC: at most 5 %.
    overhead = (enc.stats["repair_bytes"] + enc.stats["data"] * DATA_HDR.size) / enc.stats["data_bytes"]
    assert overhead < 0.05


def test_auto_follows_the_peers_report() -> None:
    enc = FecEncoder(FecSettings(mode="auto"))
    assert enc.ratio == 0.0
    assert len(_send_all(enc, _datagrams(10))) == 10  # nothing measured yet: no repair
    enc.on_report(received=990, lost=10)
    assert enc.ratio == pytest.approx(ratio_for_loss(0.01))
    enc.on_report(received=1000, lost=0)
    assert enc.ratio == 0.0
    fixed = FecEncoder(FecSettings(mode="fixed", ratio=0.1))
    fixed.on_report(received=10, lost=10)
    assert fixed.ratio == 0.1


def test_decoder_measures_loss_from_gaps_and_reports() -> None:
    enc, dec = FecEncoder(FecSettings(mode="auto", k_max=10)), FecDecoder()
    frames = _send_all(enc, _datagrams(100))
    for i, f in enumerate(frames):
        if i % 10 != 3:  # one datagram of every ten lost, never the last of a group
            dec.receive(f)
    report = dec.take_report()
    assert report is not None
    out, parsed = FecDecoder().receive(report)
    # The four newest groups may still see late frames: only the six older ones are counted.
    assert out == [] and parsed == (54, 6)
    assert dec.take_report() is None  # nothing new since


def test_ratio_for_loss() -> None:
    assert ratio_for_loss(0.0) == 0.0 and ratio_for_loss(0.0001) == 0.0
    assert ratio_for_loss(0.01) == pytest.approx(0.045)
    assert ratio_for_loss(0.5) == 0.25
    assert ratio_for_loss(float("nan")) == 0.0


def test_parse_fec() -> None:
    assert parse_fec("off") == FecSettings() and parse_fec(None) == FecSettings() and parse_fec(False) == FecSettings()
    assert parse_fec("auto").mode == "auto" and parse_fec(True).mode == "auto"
    assert parse_fec("5%") == FecSettings(mode="fixed", ratio=0.05)
    assert parse_fec(0.1).ratio == 0.1
    for bad in ("lots", "0%", "150%", -1, float("nan"), float("inf"), "x%", [1]):
        with pytest.raises(ConfigError):
            parse_fec(bad)
    with pytest.raises(ConfigError):
        FecSettings(mode="fixed", ratio=0.1, k_max=0)


def test_hostile_frames_are_dropped_and_counted() -> None:
    dec = FecDecoder()
    bad = [
        b"",
        b"\x10\x00",  # truncated data header
        REPAIR_HDR.pack(KIND_REPAIR, 1, 0, 4, 1) + b"x",  # repair index inside the data range
        REPAIR_HDR.pack(KIND_REPAIR, 1, 300 % 256, 0, 1) + b"x",  # k = 0
        REPAIR_HDR.pack(KIND_REPAIR, 1, 250, 200, 100) + b"x",  # more than 255 pieces
        REPORT.pack(0x12, 1, 2) + b"extra",
        b"\x33whatever",
    ]
    for f in bad:
        assert dec.receive(f) == ([], None)
    assert dec.stats["malformed"] == len(bad)
    # A repair that contradicts the group's earlier repair is refused too.
    dec.receive(REPAIR_HDR.pack(KIND_REPAIR, 9, 4, 4, 2) + bytes(10))
    assert dec.receive(REPAIR_HDR.pack(KIND_REPAIR, 9, 5, 5, 1) + bytes(10)) == ([], None)
    # A repair whose share length differs from the group's is refused.
    assert dec.receive(REPAIR_HDR.pack(KIND_REPAIR, 9, 5, 4, 2) + bytes(11)) == ([], None)


def test_decoder_memory_is_bounded() -> None:
    dec = FecDecoder(max_groups=8, max_bytes=64 << 10)
    for g in range(1000):
        for i in range(3):
            dec.receive(DATA_HDR.pack(0x10, g & 0xFFFF, i) + bytes(1000))
        assert len(dec._groups) <= 8 and dec._bytes <= (64 << 10) + 3000


def test_fec_peer_pair_repairs_reports_and_adapts() -> None:
    """Two FecPeer ends over a lossy in-memory link, on a fake clock: what every adapter runs."""
    from lu2k.fec import FecPeer

    rng = random.Random(5)
    a, b = FecPeer(FecSettings(mode="auto", k_max=16), 0.0), FecPeer(FecSettings(mode="auto", k_max=16), 0.0)
    assert a.deadline() is None  # nothing sent, nothing heard
    sent: list[bytes] = []
    got: list[bytes] = []
    now = 0.0
    for i in range(6000):
        now = i * 1e-3
        d = bytes([0x40]) + rng.randbytes(200) + i.to_bytes(4, "little")
        sent.append(d)
        frames = a.send(d, now)
        if a.deadline() is not None and a.deadline() <= now:  # type: ignore[operator]
            frames += a.on_timer(now)
        for f in frames:
            if rng.random() >= 0.02:  # 2 % loss a -> b
                got += b.receive(f, now)
        d_b = b.deadline()
        if d_b is not None and d_b <= now:
            for f in b.on_timer(now):  # b's loss report travels back (never lost here)
                a.receive(f, now)
    # b measured the loss and a followed it: repair is flowing, most losses were rebuilt.
    assert b.stats()["reports"] == 0 and a.stats()["reports"] >= 4
    assert a.encoder is not None and a.encoder.ratio == pytest.approx(ratio_for_loss(0.02), abs=0.02)
    assert a.stats()["sent_repair"] > 0 and b.stats()["recovered"] > 0
    missing = len(set(sent) - set(got))
    assert missing < 0.02 * len(sent) / 2
    # With FEC off, send passes datagrams through and nothing is ever due.
    off = FecPeer(FecSettings(), 0.0)
    assert off.send(b"\x40x", 1.0) == [b"\x40x"] and off.deadline() is None and off.on_timer(5.0) == []


def test_every_frame_fits_when_the_transport_shrinks_by_the_overhead() -> None:
    """A transport sized ``udp_payload - HEADER_OVERHEAD`` sends data *and* repair frames that fit."""
    from lu2k.fec import HEADER_OVERHEAD

    udp_payload = 1472  # a 1500-byte IPv4 MTU
    full = [bytes([0x40]) * (udp_payload - HEADER_OVERHEAD) for _ in range(8)]
    frames = _send_all(FecEncoder(FecSettings(mode="fixed", ratio=0.25, k_max=8)), full)
    assert any(f[0] == KIND_REPAIR for f in frames)
    assert max(len(f) for f in frames) == udp_payload  # the repair frame, exactly at the limit


def test_groups_stay_open_an_eighth_of_the_round_trip_within_bounds() -> None:
    assert group_delay_for_rtt(0.6) == MAX_GROUP_DELAY == 0.075  # GEO: capped
    assert group_delay_for_rtt(0.3) == pytest.approx(0.0375)
    assert group_delay_for_rtt(0.04) == MIN_GROUP_DELAY == 0.02  # LEO: a retransmission is cheap there
    assert group_delay_for_rtt(None) == group_delay_for_rtt(0.0) == group_delay_for_rtt(float("nan")) == MIN_GROUP_DELAY
    assert parse_fec("auto", rtt_s=0.6).max_delay == 0.075 and parse_fec("5%", rtt_s=0.3).max_delay == pytest.approx(0.0375)
    assert parse_fec("auto").max_delay == MIN_GROUP_DELAY


def _paced_link(settings: FecSettings, *, rate: float, n: int, loss: float, seed: int) -> tuple[int, float]:
    """``n`` full-size datagrams at ``rate`` per second (groups close by size or by time, as on a
    real link) through a link losing ``loss`` of all frames: (datagrams FEC left missing, extra bytes)."""
    rng = random.Random(seed)
    enc, dec = FecEncoder(settings), FecDecoder(max_groups=256, max_bytes=64 << 20)
    frames: list[bytes] = []
    for i in range(n):
        t = i / rate
        frames += enc.handle_timer(t)
        frames += enc.wrap(bytes([0x40]) + i.to_bytes(4, "little") + bytes(1350), t)
    frames += enc.handle_timer(1e9)
    got: set[bytes] = set()
    for f in frames:
        if rng.random() >= loss:
            got.update(d[1:5] for d in dec.receive(f)[0])
    extra = (enc.stats["repair_bytes"] + enc.stats["data"] * DATA_HDR.size) / enc.stats["data_bytes"]
    return n - len(got), extra


def test_geo_groups_leave_a_twentieth_of_the_losses_that_20_ms_groups_left() -> None:
    """A 20 Mbit/s GEO link (1 700 datagrams/s) at 1 % random loss with auto's ratio: groups of an
    eighth of the RTT (75 ms, ~128 datagrams) against the 20 ms groups (~34) FEC used everywhere.

    What FEC leaves, a round trip repairs: a 64 KiB message (~47 datagrams) with one such
    datagram waits 600 ms, so the p99 of a GEO cell needs well under one in ten thousand."""
    ratio = ratio_for_loss(0.01)
    geo = parse_fec("auto", rtt_s=0.6)
    short = FecSettings(mode="auto", k_max=64, max_delay=MIN_GROUP_DELAY)
    left_geo = left_short = 0
    for seed in range(6):
        for settings in (geo, short):
            fixed = FecSettings(mode="fixed", ratio=ratio, k_max=settings.k_max, max_delay=settings.max_delay)
            left, extra = _paced_link(fixed, rate=1700, n=21000, loss=0.01, seed=seed)
            assert extra < 0.05  # the budget: at most 5 % extra bytes on the link
            if settings is geo:
                left_geo += left
            else:
                left_short += left
    assert left_short > 100  # ~0.2 % of all datagrams: a round trip for one 64 KiB message in ten
    assert left_geo * 20 < left_short and left_geo < 6 * 21000 * 1e-4
