"""lu2k.backends.udt_fec: the udt backend with ``fec`` on, over real UDT on loopback.

Conformance with FEC on; a run where the relay's wire loses one frame in 25 and FEC rebuilds
what libudt would otherwise wait a retransmission for, every message arriving once, intact;
peers named after their wire address, not the relay's leg; foreign datagrams dropped.
"""

from __future__ import annotations

import asyncio
import os
import socket
import zlib

import pytest

from lu2k.backends import get_backend
from lu2k.backends.base import BackendSettings, LinkProfile
from lu2k.errors import BackendUnavailable, ConfigError
from lu2k.nid import parse_net
from lu2k.wire import ConnType, decode_msg

try:
    UdtBackend = get_backend("udt")
except BackendUnavailable as e:
    pytest.skip(f"udt backend unavailable: {e}", allow_module_level=True)

from conformance import TRANSPORT_CHECKS, BackendUnderTest, _close, _msg, _recv_n, run_hello  # noqa: E402

from lu2k.backends.udt_fec import FecRelay  # noqa: E402

KEY = b"conformance-key"


def make(fec: object = "auto", **options: object):
    return UdtBackend(BackendSettings(parse_net("udt0"), 0, 4 << 20, LinkProfile(rtt_ms=1, rate_mbit=400), KEY,
                                      {"fec": fec, **options}))


@pytest.mark.parametrize("check", TRANSPORT_CHECKS, ids=lambda c: c.__name__)
async def test_conformance_with_fec(check) -> None:
    await check(BackendUnderTest(UdtBackend, "127.0.0.1", options={"fec": "10%"}))


def _lossy(relay: FecRelay, every: int) -> list[int]:
    """Make ``relay``'s wire drop every ``every``-th data frame it sends (a lossy link); counts them."""
    sent, dropped = [0], [0]
    orig = relay._send_wire

    def send(frames: list[bytes], peer: object) -> None:
        kept = []
        for f in frames:
            if f[0] == 0x10:
                sent[0] += 1
                if sent[0] % every == 0:
                    dropped[0] += 1
                    continue
            kept.append(f)
        orig(kept, peer)

    relay._send_wire = send  # type: ignore[method-assign]
    return dropped


async def test_fec_rebuilds_lost_packets_and_every_message_arrives_once() -> None:
    server, client = make("10%"), make("10%")
    accepted: asyncio.Queue = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    out = await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5)
    inn = await asyncio.wait_for(accepted.get(), 10)
    await run_hello(client, out, inn, KEY)
    try:
        # The accepted side names the real peer (the client's wire socket), not the relay's leg.
        (client_relay,) = client._relays
        assert inn.peer_address == f"127.0.0.1:{client_relay.address[1]}"
        dropped = _lossy(client_relay, 25)
        rnd = os.urandom(1 << 16)
        payloads = [rnd[: 500 + (i * 7919) % 20000] for i in range(300)]
        sends = [asyncio.ensure_future(out.send([_msg(i + 1, p)])) for i, p in enumerate(payloads)]
        frames = await _recv_n(inn, len(payloads))
        await asyncio.gather(*sends)
        assert [decode_msg(f.header).seq for f in frames] == list(range(1, len(payloads) + 1))
        assert all(zlib.crc32(f.payload) == zlib.crc32(p) for f, p in zip(frames, payloads))
        fec = server.describe()
        assert dropped[0] > 20 and fec["fec"] == "10%"
        assert fec["fec_recovered"] > dropped[0] / 2  # most losses rebuilt without a round trip
        assert client.describe()["fec_sent_repair"] > 0
    finally:
        await _close(out, inn, lst, server, client)
    assert not server._relays and not client._relays  # every relay closed with its owner


async def test_foreign_datagrams_are_dropped_and_counted() -> None:
    server = make()
    lst = await server.listen("127.0.0.1", 0, lambda t: asyncio.sleep(0))
    try:
        (relay,) = server._relays
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"\x80\x00\x00\x00 a bare UDT handshake, not an FEC frame", ("127.0.0.1", lst.address[1]))
        s.close()
        for _ in range(100):
            if relay.stats["foreign"]:
                break
            await asyncio.sleep(0.02)
        assert relay.stats["foreign"] == 1 and not relay._legs
    finally:
        lst.close()
        await server.close()


def test_fec_option_is_checked_and_shrinks_the_packet() -> None:
    assert make("off").tuning.mss == 1500 and make("off").describe()["fec"] == "off"
    assert make("auto").tuning.mss == 1492 and make("5%").describe()["fec"] == "5%"
    with pytest.raises(ConfigError, match="fec"):
        make("lots")
    with pytest.raises(ConfigError, match="rendezvous"):
        make("auto", rendezvous=True)
