"""TCP backend: the shared transport conformance checks plus TCP specifics."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from conformance import TRANSPORT_CHECKS, BackendUnderTest, _close, _msg, _pair, _recv_n

from lu2k.backends import get_backend, tcp, tcp_bbr
from lu2k.backends.tcp import TcpBackend, available_congestion_controls
from lu2k.backends.base import BackendSettings, LinkProfile
from lu2k.errors import ConfigError, FrameError, ReadError
from lu2k import wire
from lu2k.nid import parse_net, parse_nid
from lu2k.wire import ConnType


@pytest.mark.parametrize("check", TRANSPORT_CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check) -> None:  # type: ignore[no-untyped-def]
    await check(BackendUnderTest(TcpBackend, "127.0.0.1"))


@pytest.mark.parametrize("check", TRANSPORT_CHECKS, ids=lambda c: c.__name__)
async def test_conformance_inproc(check) -> None:  # type: ignore[no-untyped-def]
    if check.__name__ in ("check_send_after_close_fails_cleanly",):
        pytest.skip("inproc queues accept sends until the close is seen, by design")
    await check(BackendUnderTest(get_backend("inproc"), "inproc-host", port=40000 + TRANSPORT_CHECKS.index(check)))


def test_registry_gives_tcp() -> None:
    assert get_backend("tcp") is TcpBackend


@pytest.fixture
async def raw_server():  # type: ignore[no-untyped-def]
    """A TCP backend listening on loopback; yields (address, queue of accepted transports)."""
    server = BackendUnderTest(TcpBackend, "127.0.0.1").make()
    accepted: asyncio.Queue = asyncio.Queue()

    async def on_accept(t) -> None:  # type: ignore[no-untyped-def]
        await accepted.put(t)

    lst = await server.listen("127.0.0.1", 0, on_accept)
    yield lst.address, accepted
    lst.close()
    await server.close()


async def test_garbage_from_peer_is_frame_error(raw_server) -> None:  # type: ignore[no-untyped-def]
    address, accepted = raw_server
    raw = socket.create_connection(address)
    try:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        inn = await asyncio.wait_for(accepted.get(), 5)
        with pytest.raises(FrameError, match="bad magic"):
            await asyncio.wait_for(inn.recv(), 5)
        inn.close()
    finally:
        raw.close()


async def test_truncated_frame_is_read_error(raw_server) -> None:  # type: ignore[no-untyped-def]
    address, accepted = raw_server
    raw = socket.create_connection(address)
    hello = wire.HelloInitiator(key=b"k" * 16, backend="tcp", src=parse_nid("127.0.0.1@tcp"), dst=parse_nid("127.0.0.2@tcp"),
                                conn_type=ConnType.ANY, incarnation=1).start()
    raw.sendall(hello[: len(hello) // 2])
    raw.close()
    inn = await asyncio.wait_for(accepted.get(), 5)
    with pytest.raises(ReadError, match="middle of a frame"):
        await asyncio.wait_for(inn.recv(), 5)
    inn.close()


def _settings(**opts) -> BackendSettings:  # type: ignore[no-untyped-def]
    profile = opts.pop("profile", LinkProfile())
    return BackendSettings(parse_net("tcp"), 0, 1 << 20, profile=profile, options=opts)


def test_congestion_default_and_validation() -> None:
    avail = available_congestion_controls()
    b = TcpBackend(_settings())
    assert b.congestion == ("bbr" if "bbr" in avail else None)
    with pytest.raises(ConfigError, match="not offered by this kernel"):
        TcpBackend(_settings(congestion="no-such-cc"))


def test_buffers_autotuned_and_unsent_bytes_bounded_from_profile() -> None:
    b = TcpBackend(_settings(profile=LinkProfile(rtt_ms=600, rate_mbit=20)))
    assert b.socket_buffer is None and b.describe()["socket_buffer"] == "autotuned"
    assert b.notsent_lowat == int(20e6 / 8 * 0.6) // 2  # half a BDP
    assert TcpBackend(_settings(profile=LinkProfile(rtt_ms=40, rate_mbit=10))).notsent_lowat == tcp.NOTSENT_LOWAT_MIN
    assert TcpBackend(_settings(profile=LinkProfile(rtt_ms=700, rate_mbit=1000))).notsent_lowat == tcp.NOTSENT_LOWAT_MAX
    plain = TcpBackend(_settings())
    assert plain.socket_buffer is None and plain.notsent_lowat == 0 and plain.short_limits == []
    set_ = TcpBackend(_settings(socket_buffer=1 << 20, notsent_lowat=0, profile=LinkProfile(rtt_ms=600, rate_mbit=20)))
    assert set_.socket_buffer == 1 << 20 and set_.notsent_lowat == 0 and set_.short_limits == []
    with pytest.raises(ConfigError, match="notsent_lowat"):
        TcpBackend(_settings(notsent_lowat=-1))


def test_autotuning_limits_below_the_window_are_named() -> None:
    bdp = 1_500_000
    assert tcp.short_autotuning_limits(bdp, {"tcp_rmem": 32 << 20, "tcp_wmem": 4 << 20}) == []
    assert tcp.short_autotuning_limits(bdp, {"tcp_rmem": 6 << 20, "tcp_wmem": 4 << 20}) == []  # a stock kernel's tcp_rmem
    short = tcp.short_autotuning_limits(bdp, {"tcp_rmem": 4 << 20, "tcp_wmem": 1 << 20})
    assert short == ["net.ipv4.tcp_rmem max=4194304 < 6000000", "net.ipv4.tcp_wmem max=1048576 < 3000000"]


async def test_sockets_get_the_unsent_bytes_limit() -> None:
    but = BackendUnderTest(TcpBackend, "127.0.0.1", options={"notsent_lowat": 256 << 10})
    server, client, out, inn, lst = await _pair(but)
    try:
        for t in (getattr(out, "stripes", [out])[0], getattr(inn, "stripes", [inn])[0]):
            assert t._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 256 << 10
    finally:
        await _close(out, inn, lst, server, client)


@pytest.mark.parametrize("cap, expect", [("20mbit", 20_000_000 // 8), ("100gbit", tcp.MAX_PACING_RATE_LIMIT)])
async def test_sockets_get_the_pacing_cap(cap: str, expect: int) -> None:
    # 100gbit: above a C int's range; the kernel takes a u32 (Python must pass it as bytes).
    but = BackendUnderTest(TcpBackend, "127.0.0.1", options={"rate_cap": cap})
    server, client, out, inn, lst = await _pair(but)
    try:
        for t in (getattr(out, "stripes", [out])[0], getattr(inn, "stripes", [inn])[0]):
            raw = t._sock.getsockopt(socket.SOL_SOCKET, tcp.SO_MAX_PACING_RATE, 4)
            assert int.from_bytes(raw, "little") == expect
        assert server.describe()["rate_cap"] == ("20mbit" if cap == "20mbit" else "34.3597gbit")  # what the kernel holds
    finally:
        await _close(out, inn, lst, server, client)


def test_pacing_cap_values() -> None:
    assert TcpBackend(_settings()).rate_cap == 0 and TcpBackend(_settings()).describe()["rate_cap"] == "unlimited"
    assert TcpBackend(_settings(rate_cap=50)).rate_cap == 50_000_000 // 8  # a bare number is Mbit/s
    assert TcpBackend(_settings(rate_cap="unlimited")).rate_cap == 0
    assert TcpBackend(_settings(rate_cap="100gbit")).rate_cap == tcp.MAX_PACING_RATE_LIMIT  # what the kernel takes
    for bad in ("fast", -5, "20 parsecs"):
        with pytest.raises(ConfigError, match="rate_cap"):
            TcpBackend(_settings(rate_cap=bad))


def test_startup_cap_values() -> None:
    geo = LinkProfile(rtt_ms=600, rate_mbit=20, loss=0.01)
    bbr = "bbr" in available_congestion_controls()
    assert TcpBackend(_settings()).startup_cap == 0  # no profile rate: nothing to cap at
    assert TcpBackend(_settings()).describe()["startup_cap"] == "off"
    assert TcpBackend(_settings(profile=geo)).startup_cap == (int(20e6 * tcp_bbr.STARTUP_CAP_SHARE / 8) if bbr else 0)
    if bbr:
        assert TcpBackend(_settings(profile=geo)).describe()["startup_cap"] == "22mbit"
        assert TcpBackend(_settings(profile=geo, startup_cap="30mbit")).startup_cap == 30_000_000 // 8
        assert TcpBackend(_settings(startup_cap=5)).startup_cap == 5_000_000 // 8  # a bare number is Mbit/s
        assert TcpBackend(_settings(profile=geo, rate_cap="10mbit")).startup_cap == 10_000_000 // 8  # never above rate_cap
    for off in ("off", False, 0, "unlimited"):
        assert TcpBackend(_settings(profile=geo, startup_cap=off)).startup_cap == 0
    for bad in ("fast", -5):
        with pytest.raises(ConfigError, match="startup_cap"):
            TcpBackend(_settings(profile=geo, startup_cap=bad))
    if "cubic" in available_congestion_controls():
        assert TcpBackend(_settings(profile=geo, congestion="cubic")).startup_cap == 0  # the default follows BBR
        with pytest.raises(ConfigError, match="startup_cap needs congestion: bbr"):
            TcpBackend(_settings(profile=geo, congestion="cubic", startup_cap="20mbit"))


def test_probe_rtt_option() -> None:
    bbr = "bbr" in available_congestion_controls()
    assert TcpBackend(_settings()).probe_rtt == ("auto" if bbr else "kernel")
    assert TcpBackend(_settings()).describe()["probe_rtt"].startswith("auto (skipped on paths of 200 ms RTT or more)" if bbr else "kernel")
    for bad in ("never", 1, None):
        with pytest.raises(ConfigError, match="probe_rtt must be one of auto, skip, kernel"):
            TcpBackend(_settings(probe_rtt=bad))
    if bbr:
        assert TcpBackend(_settings(probe_rtt="skip")).probe_rtt == "skip"
        assert TcpBackend(_settings(probe_rtt="kernel")).describe()["probe_rtt"] == "kernel"
    if "cubic" in available_congestion_controls():
        assert TcpBackend(_settings(congestion="cubic")).probe_rtt == "kernel"
        with pytest.raises(ConfigError, match="probe_rtt: skip needs congestion: bbr"):
            TcpBackend(_settings(congestion="cubic", probe_rtt="skip"))


@pytest.mark.skipif("bbr" not in available_congestion_controls(), reason="kernel lacks bbr")
async def test_a_new_bulk_socket_is_capped_until_bbr_leaves_startup() -> None:
    profile = LinkProfile(rtt_ms=20, rate_mbit=200)
    cap = int(200e6 * tcp_bbr.STARTUP_CAP_SHARE / 8)
    server, client, out, inn, lst = await _pair(BackendUnderTest(TcpBackend, "127.0.0.1"), conn_type=ConnType.BULK, profile=profile)
    control = await client.connect("127.0.0.1", lst.address[1], ConnType.CONTROL, 5.0)
    try:
        sock = out._sock  # type: ignore[attr-defined]
        assert sock.getsockopt(socket.SOL_SOCKET, tcp.SO_MAX_PACING_RATE) == cap
        assert out.stats()["startup_capped"] is True
        assert control._sock.getsockopt(socket.SOL_SOCKET, tcp.SO_MAX_PACING_RATE) in (-1, tcp_bbr.PACING_UNLIMITED)  # type: ignore[attr-defined]
        # Data flows; on loopback BBR finds the (capped) rate's plateau within a few rounds.
        payload = os.urandom(1 << 20)
        received = 0
        for _ in range(200):
            sender = asyncio.ensure_future(out.send([_msg(1, payload)] * 4))
            while received < 4:
                received += len(await asyncio.wait_for(inn.recv(), 10))
            await sender
            received = 0
            if not out.stats().get("startup_capped"):
                break
        assert "startup_capped" not in out.stats()
        assert sock.getsockopt(socket.SOL_SOCKET, tcp.SO_MAX_PACING_RATE) in (-1, tcp_bbr.PACING_UNLIMITED)
    finally:
        await _close(control, out, inn, lst, server, client)


@pytest.mark.skipif("bbr" not in available_congestion_controls(), reason="kernel lacks bbr")
async def test_an_accepted_connection_that_carries_our_bulk_gets_the_bbr_watch() -> None:
    """A return path (lu2k.core.returnpath) sends our bulk on the reverse direction of the
    peer's connection: that socket's sending side gets what the sockets we open get."""
    profile = LinkProfile(rtt_ms=20, rate_mbit=200)
    cap = int(200e6 * tcp_bbr.STARTUP_CAP_SHARE / 8)
    server, client, out, inn, lst = await _pair(BackendUnderTest(TcpBackend, "127.0.0.1"), conn_type=ConnType.CONTROL, profile=profile)
    try:
        sock = inn.stripes[0]._sock  # type: ignore[attr-defined]
        unlimited = (-1, tcp_bbr.PACING_UNLIMITED)
        assert sock.getsockopt(socket.SOL_SOCKET, tcp.SO_MAX_PACING_RATE) in unlimited
        inn.carry_requests(ConnType.CONTROL)  # small messages of ours: nothing to tune
        assert "bbr_watch" not in inn.stats()
        assert sock.getsockopt(socket.SOL_SOCKET, tcp.SO_MAX_PACING_RATE) in unlimited
        inn.carry_requests(ConnType.BULK)
        watch = inn.stripes[0]._bbr  # type: ignore[attr-defined]
        assert inn.stats()["bbr_watch"] == "probe_rtt auto" and inn.stats()["startup_capped"] is True
        assert sock.getsockopt(socket.SOL_SOCKET, tcp.SO_MAX_PACING_RATE) == cap
        inn.carry_requests(ConnType.BULK)  # a second adoption of the same connection: one watch
        assert inn.stripes[0]._bbr is watch  # type: ignore[attr-defined]
        assert "bbr_watch" not in out.stats()  # the peer's direction is its own
        payload = os.urandom(1 << 20)
        for _ in range(200):  # our bulk, the reverse way: the cap lifts when BBR leaves STARTUP
            sender = asyncio.ensure_future(inn.send([_msg(1, payload)] * 4))
            await _recv_n(out, 4)
            await sender
            if not inn.stats().get("startup_capped"):
                break
        assert "startup_capped" not in inn.stats()
        assert sock.getsockopt(socket.SOL_SOCKET, tcp.SO_MAX_PACING_RATE) in unlimited
    finally:
        await _close(out, inn, lst, server, client)


async def test_carrying_bulk_with_probe_rtt_kernel_and_no_cap_changes_nothing() -> None:
    but = BackendUnderTest(TcpBackend, "127.0.0.1", options={"probe_rtt": "kernel", "startup_cap": "off"})
    server, client, out, inn, lst = await _pair(but, conn_type=ConnType.BULK)
    try:
        inn.carry_requests(ConnType.BULK)
        assert "bbr_watch" not in inn.stats()
    finally:
        await _close(out, inn, lst, server, client)


@pytest.mark.skipif("cubic" not in available_congestion_controls(), reason="kernel lacks cubic")
async def test_congestion_applied_to_sockets() -> None:
    but = BackendUnderTest(TcpBackend, "127.0.0.1", options={"congestion": "cubic"})
    server, client, out, inn, lst = await _pair(but)
    try:
        assert out.stats()["congestion"] == "cubic"
        assert inn.stats()["congestion"] == "cubic"
    finally:
        await _close(out, inn, lst, server, client)


async def test_accept_loop_pauses_when_out_of_descriptors_and_recovers() -> None:
    """EMFILE from accept() used to be retried at once (the socket stays readable): a spin.
    The listener now stops watching, waits, and accepts the queued connections once
    descriptors are free again; the warning is rate-limited."""
    import resource

    server = BackendUnderTest(TcpBackend, "127.0.0.1").make()
    accepted: asyncio.Queue = asyncio.Queue()

    async def on_accept(t) -> None:  # type: ignore[no-untyped-def]
        await accepted.put(t)

    lst = await server.listen("127.0.0.1", 0, on_accept)
    clients = [socket.create_connection(lst.address) for _ in range(3)]  # completed in the kernel's backlog
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)  # a new descriptor takes the lowest free number: cap below it
    os.close(lowest_free)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        while lst.accept_pauses < 3:  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
        assert accepted.empty()
        assert lst.limiter.suppressed("accept") + min(lst.accept_pauses, lst.limiter.burst) == lst.accept_pauses  # type: ignore[attr-defined]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        got = [await asyncio.wait_for(accepted.get(), 10) for _ in clients]
        assert len(got) == 3
        for t in got:
            t.close()
    finally:
        for c in clients:
            c.close()
        lst.close()
        await server.close()


async def test_partial_sends_keep_every_byte_in_order() -> None:
    """A small send buffer and a slow reader force short sendmsg writes across header, payload
    and memoryview boundaries: what arrives is exactly the frames, in order."""
    from lu2k.backends.tcp import TcpTransport

    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    client = socket.create_connection(lsock.getsockname())
    server, _ = lsock.accept()
    lsock.close()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setblocking(False)
    server.setblocking(False)
    transport = TcpTransport(client, 1 << 20)
    frames = []
    for i, size in enumerate([0, 1, 64, 4096, 70_000, 3, 200_000, 17]):
        payload = memoryview(bytearray(os.urandom(size)))
        frames.append((wire.encode_msg_header(i, bytes(20), bytes(20), 1, 2, payload, False), payload))
    expect = b"".join(bytes(h) + bytes(p) for h, p in frames)
    got = bytearray()

    async def read() -> None:
        while len(got) < len(expect):
            await asyncio.sleep(0.001)  # slow reader: the sender's buffer fills
            got.extend(await loop.sock_recv(server, 3000))

    try:
        await asyncio.wait_for(asyncio.gather(transport.send(frames), read()), 30)
    finally:
        transport.close()
        server.close()
    assert bytes(got) == expect and transport.bytes_sent == len(expect)
