"""FEC under QUIC: the batched UDP endpoint wraps, repairs, rebuilds and reports over real sockets,
and a quic daemon pair configured with ``fec`` delivers exactly once."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from lu2k.backends.quic_udp import BatchedUdpEndpoint
from lu2k.errors import ConfigError
from lu2k.fec import FecSettings, is_fec_frame


class Recorder:
    def __init__(self) -> None:
        self.transport: Any = None
        self.datagrams: list[bytes] = []
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.append(data)

    def transmit(self) -> None:
        self.transport.defer_transmit(self)

    def error_received(self, exc: Exception) -> None:
        raise AssertionError(f"unexpected socket error {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


def _pair(loop: asyncio.AbstractEventLoop, fec_a: FecSettings | None, fec_b: FecSettings | None) -> tuple[Any, Any, Any, Any]:
    sa = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sa.bind(("127.0.0.1", 0))
    sb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sb.bind(("127.0.0.1", 0))
    sa.connect(sb.getsockname())  # a is the connecting side (addr None), b the listening one
    pa, pb = Recorder(), Recorder()
    return BatchedUdpEndpoint(loop, sa, pa, fec=fec_a), pa, BatchedUdpEndpoint(loop, sb, pb, fec=fec_b), pb


async def _until(cond: Any, what: str, limit: int = 500) -> None:
    for _ in range(limit):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_lost_datagrams_are_rebuilt_without_a_round_trip() -> None:
    loop = asyncio.get_running_loop()
    a, pa, b, pb = _pair(loop, FecSettings(mode="fixed", ratio=0.125, k_max=16, max_delay=0.01), None)
    sent_frames: list[bytes] = []
    real_send = a._send

    def lossy_send(frame: bytes, addr: Any) -> None:
        sent_frames.append(frame)
        if len(sent_frames) not in (3, 20):  # one data frame lost in each of the first two groups
            real_send(frame, addr)

    a._send = lossy_send  # type: ignore[method-assign]
    try:
        datagrams = [bytes([0x40, i]) * 300 for i in range(32)]
        for d in datagrams:
            a.sendto(d)
        await _until(lambda: len(pb.datagrams) == 32, "32 datagrams at b")
        assert sorted(pb.datagrams) == sorted(datagrams)
        assert all(is_fec_frame(f) for f in sent_frames) and len(sent_frames) == 36  # 32 data + 2 x 2 repair
        assert b.fec_stats()["recovered"] == 2
        # b has no FEC of its own but reports the loss it saw back to a, once a second.
        await _until(lambda: a.fec_stats().get("reports", 0) >= 1, "a loss report at a", limit=300)
        assert a._fec_peers[None].encoder.ratio == 0.125  # fixed: reports do not move it
    finally:
        a.close()
        b.close()
    await asyncio.wait_for(pa.lost, 5)
    await asyncio.wait_for(pb.lost, 5)


async def test_auto_mode_starts_clean_and_follows_reported_loss() -> None:
    loop = asyncio.get_running_loop()
    a, pa, b, pb = _pair(loop, FecSettings(mode="auto", k_max=16, max_delay=0.01, report_interval=0.05), None)
    real_send = a._send
    count = 0

    def lossy_send(frame: bytes, addr: Any) -> None:
        nonlocal count
        count += 1
        if count % 20 != 5:  # 5 % loss
            real_send(frame, addr)

    a._send = lossy_send  # type: ignore[method-assign]
    try:
        b_addr = b.get_extra_info("sockname")
        for i in range(200):
            # With the peer's address, as aioquic's client protocol calls it on its connected socket:
            # the reports must still reach this encoder.
            a.sendto(bytes([0x40]) + i.to_bytes(2, "little") * 100, b_addr)
        assert a.fec_stats()["repair"] == 0  # nothing measured yet: no repair on a clean start
        await _until(lambda: a.fec_stats().get("reports", 0) >= 1, "a loss report")
        assert a._fec_peers[None].encoder.ratio > 0.1
        for i in range(100):  # what is sent now carries repair
            a.sendto(bytes([0x40]) + i.to_bytes(2, "little") * 100, b_addr)
        await _until(lambda: a.fec_stats()["repair"] > 0, "repair after the report")
        assert list(a._fec_peers) == [None]  # one peer: the one sending is the one the reports reach
    finally:
        a.close()
        b.close()
    await asyncio.wait_for(pa.lost, 5)
    await asyncio.wait_for(pb.lost, 5)


async def test_plain_quic_datagrams_still_pass_with_fec_on() -> None:
    loop = asyncio.get_running_loop()
    a, pa, b, pb = _pair(loop, None, FecSettings(mode="auto"))
    try:
        a.sendto(b"\x40plain")
        await _until(lambda: pb.datagrams == [b"\x40plain"], "the plain datagram")
    finally:
        a.close()
        b.close()
    await asyncio.wait_for(pa.lost, 5)
    await asyncio.wait_for(pb.lost, 5)


def test_quic_option_fec_is_validated() -> None:
    pytest.importorskip("aioquic")
    from lu2k.backends.base import BackendSettings
    from lu2k.backends.quic import QuicBackend
    from lu2k.nid import parse_net

    def make(value: Any) -> Any:
        return QuicBackend(BackendSettings(net=parse_net("quic0"), port=0, max_message_size=1 << 20, options={"fec": value}))

    assert make("auto").describe()["fec"] == "auto"
    assert make("4%").describe()["fec"] == "4%"
    assert make("off")._datagram_size(socket.AF_INET) == 1472
    # Room for FEC's largest frame: a repair frame's 6-byte header and 2-byte length prefix, so
    # repair datagrams fit the 1500-byte MTU too (not only the 4-byte data header).
    assert make("auto")._datagram_size(socket.AF_INET) == 1464
    with pytest.raises(ConfigError, match="fec"):
        make("lots")
    # Groups sized from the profile's round trip (lu2k.fec.group_delay_for_rtt).
    from lu2k.settings import LinkProfile

    geo = QuicBackend(BackendSettings(net=parse_net("quic0"), port=0, max_message_size=1 << 20, options={"fec": "auto"},
                                      profile=LinkProfile(rate_mbit=20, rtt_ms=600)))
    assert geo.fec.max_delay == 0.075 and make("auto").fec.max_delay == 0.02


async def test_gso_sends_a_transmit_pass_in_one_call_and_gro_splits_it() -> None:
    loop = asyncio.get_running_loop()
    a, pa, b, pb = _pair(loop, None, None)
    try:
        datagrams = [bytes([0x40, i]) * 600 for i in range(10)] + [b"\x40short"]
        with a.holding():
            for d in datagrams:
                a.sendto(d)
            assert a.stats["datagrams_sent"] == 0  # queued until the pass ends
        await _until(lambda: len(pb.datagrams) == 11, "11 datagrams at b")
        assert pb.datagrams == datagrams  # in order, cut back at the right places
        assert a.stats["datagrams_sent"] == 11
        assert a.stats["sendmsg_calls"] == (1 if a.gso else 11)
        # Outside a transmit pass a datagram goes at once.
        a.sendto(b"\x40now")
        assert a.stats["datagrams_sent"] == 12
    finally:
        a.close()
        b.close()
    await asyncio.wait_for(pa.lost, 5)
    await asyncio.wait_for(pb.lost, 5)


def test_split_gro() -> None:
    from lu2k.backends.quic_udp import GSO_SIZE, UDP_GRO, _split_gro

    buf = b"a" * 100 + b"b" * 100 + b"c" * 30
    assert _split_gro(buf, [(socket.SOL_UDP, UDP_GRO, GSO_SIZE.pack(100))]) == [b"a" * 100, b"b" * 100, b"c" * 30]
    assert _split_gro(buf, []) == [buf]
    assert _split_gro(buf, [(socket.SOL_UDP, UDP_GRO, GSO_SIZE.pack(0))]) == [buf]  # nonsense size: as one datagram
    assert _split_gro(buf, [(socket.SOL_UDP, UDP_GRO, b"")]) == [buf]
