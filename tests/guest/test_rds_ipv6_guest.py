"""rds backend over IPv6 on a real AF_RDS kernel (the QEMU guest).

* the shared transport conformance checks over RDS's loopback transport at ``::1``;
* RDS *over TCP* between two network namespaces joined by a veth pair that carries only
  IPv6 addresses (``fd00:6::1`` / ``fd00:6::2``): a session, frames both ways, 4 MiB frames
  fragmented and reassembled, and the kernel's RDS-over-TCP connection proven to be IPv6.

Sockets are AF_RDS with ``sockaddr_in6`` addresses (``lu2k.backends.rds.rds_socket``).
"""

from __future__ import annotations

import asyncio
import os
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from conformance import TRANSPORT_CHECKS, BackendUnderTest, _close, _msg, _recv_n, run_hello

from guestutil import NetnsPair, make_netns_pair, sh
from lu2k.backends.base import BackendSettings, Transport
from lu2k.backends.rds import RdsBackend, RdsTransport
from lu2k.nid import parse_net
from lu2k.wire import ConnType

MAX = 4 << 20
ADDR_A, ADDR_B = "fd00:6::1", "fd00:6::2"


@pytest.fixture
def v6_pair() -> Iterator[NetnsPair]:
    """A veth pair between two namespaces of our own, IPv6 addresses only."""
    for pair in make_netns_pair("v6kt"):
        for ns, dev, addr in ((pair.a, pair.dev_a, ADDR_A), (pair.b, pair.dev_b, ADDR_B)):
            sh("ip", "-n", ns, "addr", "flush", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/64", "dev", dev, "nodad")
        yield pair


@pytest.mark.parametrize("check", TRANSPORT_CHECKS, ids=lambda c: c.__name__)
async def test_conformance_rds_ipv6_loopback(check) -> None:  # type: ignore[no-untyped-def]
    await check(BackendUnderTest(RdsBackend, "::1", max_message_size=MAX))


def _backend(ns: str, **options: Any) -> RdsBackend:
    return RdsBackend(BackendSettings(parse_net("tcp"), 0, MAX, options={"netns": ns, **options}))


async def test_rds_over_tcp_over_ipv6_between_namespaces(v6_pair: NetnsPair) -> None:
    server, client = _backend(v6_pair.b), _backend(v6_pair.a)
    accepted: asyncio.Queue[Transport] = asyncio.Queue()

    async def on_accept(t: Transport) -> None:
        await accepted.put(t)

    lst = await server.listen(ADDR_B, 0, on_accept)
    try:
        assert lst.address[0] == ADDR_B
        out = await client.connect(ADDR_B, lst.address[1], ConnType.ANY, 30)
        inn = await asyncio.wait_for(accepted.get(), 30)
        assert isinstance(out, RdsTransport) and isinstance(inn, RdsTransport)
        assert out.peer_address.startswith(f"rds:[{ADDR_B}]:") and inn.peer_address.startswith(f"rds:[{ADDR_A}]:")
        await run_hello(client, out, inn, b"guest-tier-ipv6-key")
        rnd = os.urandom(1 << 20)
        payloads = [rnd * 4, b"", rnd[:1], rnd[: 64 << 10]] + [rnd[: 997 * i] for i in range(20)]
        sender = asyncio.ensure_future(out.send([_msg(i + 1, p) for i, p in enumerate(payloads)]))
        frames = await _recv_n(inn, len(payloads))
        await sender
        assert [zlib.crc32(f.payload) for f in frames] == [zlib.crc32(p) for p in payloads]
        await inn.send([_msg(1, rnd[:5000])])
        (back,) = await _recv_n(out, 1)
        assert bytes(back.payload) == rnd[:5000]
        # The kernel's own RDS-over-TCP connection (port 16385) runs over IPv6.
        conns = sh("ip", "netns", "exec", v6_pair.a, "ss", "-6tnH", "state", "established", "( dport = :16385 or sport = :16385 )")
        assert ADDR_B in conns, conns
        await _close(out, inn)
    finally:
        lst.close()
        await server.close()
        await client.close()
