"""The udt backend over real UDT on loopback: conformance, integrity, encryption, restarts, figures."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import zlib

import pytest

from lu2k.localpair import free_port
from lu2k.backends import availability, get_backend
from lu2k.backends.base import BackendSettings, LinkProfile
from lu2k.errors import BackendUnavailable, ConfigError, ConnectError, ConnectTimeout, FrameError, NetworkError, ReadError, WriteError
from lu2k.nid import parse_net
from lu2k.wire import ConnType, FrameType, decode_msg

try:
    UdtBackend = get_backend("udt")
except BackendUnavailable as e:  # CI installs libudt-dev (.ci/requirements-apt.txt), so this runs there
    pytest.skip(f"udt backend unavailable: {e}", allow_module_level=True)

from conformance import TRANSPORT_CHECKS, BackendUnderTest, _close, _msg, _recv_n, run_hello  # noqa: E402

from lu2k.backends import _udtcore  # noqa: E402
from lu2k.backends import udt  # noqa: E402
from lu2k.backends import udt_proto as proto  # noqa: E402

KEY = b"conformance-key"


def make(port: int = 0, key: bytes = KEY, profile: LinkProfile = LinkProfile(), max_message: int = 4 << 20, **options):
    return UdtBackend(BackendSettings(parse_net("udt0"), port, max_message, profile, key, options))


@pytest.mark.parametrize("cc", ["lu2k-rate", "udt"])
@pytest.mark.parametrize("check", TRANSPORT_CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check, cc: str) -> None:
    await check(BackendUnderTest(UdtBackend, "127.0.0.1", options={"cc": cc}))


def test_registered_and_available() -> None:
    assert UdtBackend.name == "udt"
    assert availability()["udt"] is None
    with pytest.raises(ConfigError, match="network key"):
        make(key=b"")


async def test_many_messages_each_arrive_once_intact_with_figures() -> None:
    server, client = make(profile=LinkProfile(rtt_ms=1, rate_mbit=400)), make(profile=LinkProfile(rtt_ms=1, rate_mbit=400))
    accepted: asyncio.Queue = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    out = await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5)
    inn = await asyncio.wait_for(accepted.get(), 10)
    await run_hello(client, out, inn, KEY)
    hello_sent, hello_received = out.stats()["messages_sent"], inn.stats()["messages_received"]  # HELLO and AUTH
    try:
        rnd = os.urandom(1 << 16)
        payloads = [rnd[: (i * 7919) % len(rnd)] for i in range(1500)]
        # Many concurrent send() calls: UDT keeps their order (one send thread per connection).
        sends = [asyncio.ensure_future(out.send([_msg(i + 1, p)])) for i, p in enumerate(payloads)]
        frames = await _recv_n(inn, len(payloads))
        await asyncio.gather(*sends)
        assert [decode_msg(f.header).seq for f in frames] == list(range(1, len(payloads) + 1))
        assert all(zlib.crc32(f.payload) == zlib.crc32(p) for f, p in zip(frames, payloads))
        s = out.stats()
        assert s["messages_sent"] == hello_sent + len(payloads) and s["packets_sent"] >= s["messages_sent"]
        assert 0 < s["rtt_ms"] < 5000 and s["cc"] == "lu2k-rate" and s["cc_target_mbit"] == pytest.approx(388)
        assert {"bandwidth_estimate_mbit", "retransmitted", "lost_sent", "send_rate_mbit"} <= set(s)
        assert inn.stats()["messages_received"] == hello_received + len(payloads)
        assert server.describe()["cipher"] == "aes-256-gcm" and server.describe()["pacing"] == "388 Mbit/s"
        out.close()
        assert out.stats()["messages_sent"] == hello_sent + len(payloads)  # figures survive the close
    finally:
        await _close(out, inn, lst, server, client)


async def test_before_its_hello_a_connection_costs_no_max_frame_buffer() -> None:
    """A connection reaches the engine before anything has said who the peer is (the UDT
    handshake and the preamble only need the network key); each connection's receive thread
    allocated (and zeroed) a max-frame buffer at once, which glibc then kept after the
    connection was gone: 100 connections took a listening lu2kd up 400 MB.  Until the hello
    is over a message is read into 4 KiB; a longer one is refused."""
    import tracemalloc

    server, client = make(), make()
    accepted: asyncio.Queue = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    transports = []
    tracemalloc.start()
    try:
        for i in range(12):
            out = await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5)
            inn = await asyncio.wait_for(accepted.get(), 10)
            transports += [out, inn]
            await out.send([_msg(1, b"x" * 100)])  # no hello: the engine would refuse this frame
            (f,) = await asyncio.wait_for(inn.recv(), 10)
            assert bytes(f.payload) == b"x" * 100
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert peak < 8 << 20, f"12 connections before their hello peaked at {peak >> 20} MB"
        out = await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5)
        inn = await asyncio.wait_for(accepted.get(), 10)
        transports += [out, inn]
        await out.send([_msg(1, b"y" * 5000)])  # a frame no hello has: too long before it is over
        with pytest.raises(FrameError, match="longer than any hello frame"):
            await asyncio.wait_for(inn.recv(), 10)
    finally:
        await _close(*transports, lst, server, client)


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon:"))


async def test_connections_that_come_and_go_leave_no_memory_behind() -> None:
    """Each connection's receive buffer (the largest frame, 4 MiB) came from the heap of a
    thread of its own, and glibc kept it after the connection ended: a daemon grew ~2 MB
    with every connection, peers reconnecting included."""
    server, client = make(), make()
    accepted: asyncio.Queue = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    payload = os.urandom(20_000)
    try:
        before = _rss_anon()
        for i in range(40):
            out = await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5)
            inn = await asyncio.wait_for(accepted.get(), 10)
            await run_hello(client, out, inn, KEY)
            await out.send([_msg(i + 1, payload)])
            (f,) = await _recv_n(inn, 1)
            assert bytes(f.payload) == payload
            await _close(out, inn)
        grown = _rss_anon() - before
    finally:
        await _close(lst, server, client)
    assert grown < 40 << 20, f"40 connections, one after the other, left {grown >> 20} MB behind"


async def test_a_slow_dial_thread_does_not_break_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """connect() read the dial thread's socket before that thread had made it (KeyError)."""
    import lu2k.backends.udt as udt_module

    made = udt_module._new_socket

    def slow(*args: object, **kwargs: object) -> int:
        threading.Event().wait(0.3)
        return made(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(udt_module, "_new_socket", slow)
    server, client = make(), make()
    accepted: asyncio.Queue = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    try:
        out = await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5)
        inn = await asyncio.wait_for(accepted.get(), 10)
        await _close(out, inn)
    finally:
        await _close(lst, server, client)


def test_accept_pacer_allows_a_burst_then_the_rate() -> None:
    from lu2k.backends.udt import AcceptPacer

    pacer = AcceptPacer(100.0, 3, now=0.0)
    for _ in range(3):
        assert pacer.delay(0.0) == 0.0
        pacer.take(0.0)
    assert pacer.delay(0.0) == pytest.approx(0.01)
    assert pacer.delay(0.005) == pytest.approx(0.005)
    assert pacer.delay(0.01) == 0.0
    pacer.take(0.01)
    assert pacer.delay(10.0) == 0.0  # refilled, but never beyond the burst
    for _ in range(3):
        pacer.take(10.0)
    assert pacer.delay(10.0) > 0


def _raw_connect(port: int, key: bytes, cipher: str = "aes-256-gcm"):
    """A hand-made UDT peer: connect and do the preamble, return (socket, sealer)."""
    u = _udtcore.socket()
    _udtcore.setsockopt(u, "linger", -1)
    _udtcore.set_packet_key(u, proto.packet_key(key))
    _udtcore.connect(u, "127.0.0.1", port)
    salt = proto.new_salt()
    _udtcore.sendmsg(u, proto.encode_preamble(cipher, salt))
    buf = bytearray(proto.PREAMBLE_SIZE + 1)
    n = _udtcore.recvmsg_into(u, buf)
    _, peer_salt = proto.decode_preamble(buf[:n])
    k_out, _ = proto.derive_keys(key, cipher, salt, peer_salt)
    return u, proto.Sealer(cipher, k_out)


@pytest.mark.parametrize("attack", ["flip", "replay", "not-a-frame"])
async def test_tampering_is_a_frame_error(attack: str) -> None:
    server = make()
    accepted: asyncio.Queue = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    u, sealer = await asyncio.to_thread(_raw_connect, lst.address[1], KEY)
    inn = await asyncio.wait_for(accepted.get(), 10)
    try:
        header, payload = _msg(1, b"genuine")
        good = sealer.seal(header, payload)
        if attack == "flip":
            bad = bytearray(good)
            bad[len(bad) // 2] ^= 0x40
            messages = [bytes(bad)]
        elif attack == "replay":
            messages = [good, good]
        else:
            messages = [sealer.seal(b"\x00" * 40)]
        for m in messages:
            await asyncio.to_thread(_udtcore.sendmsg, u, m)
        with pytest.raises(FrameError):
            for _ in messages:
                await asyncio.wait_for(inn.recv(), 10)
    finally:
        _udtcore.close(u)
        await _close(inn, lst, server)


@pytest.mark.parametrize("packet_key", [None, b"wrong"], ids=["plain-udt", "wrong-key"])
async def test_peer_without_the_key_cannot_complete_the_udt_handshake(packet_key: bytes | None) -> None:
    """Its handshake packets lack a valid MAC: dropped and counted before libudt sees them,
    so the listener never even opens a UDT connection for it."""
    server = make()
    accepted: asyncio.Queue = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    forged = _udtcore.packet_auth_totals()["forged"]

    def outsider() -> None:
        u = _udtcore.socket()
        try:
            if packet_key is not None:
                _udtcore.set_packet_key(u, proto.packet_key(packet_key))
            with pytest.raises(_udtcore.UDTError) as info:
                _udtcore.connect(u, "127.0.0.1", lst.address[1])
            assert info.value.args[0] == _udtcore.E_NOSERVER
        finally:
            _udtcore.close(u)

    try:
        await asyncio.to_thread(outsider)
        assert accepted.empty()
        assert _udtcore.packet_auth_totals()["forged"] > forged
    finally:
        await _close(lst, server)


async def test_a_daemon_with_another_network_key_is_told_why_it_gets_no_answer() -> None:
    server, other = make(), make(key=b"another net's key")
    accepted: asyncio.Queue = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    forged = server.describe()["packets_forged"]
    try:
        with pytest.raises(ConnectError, match="another network key"):
            await other.connect("127.0.0.1", lst.address[1], ConnType.ANY, 10)
        assert accepted.empty() and server.describe()["packets_forged"] > forged
    finally:
        await _close(lst, server, other)


async def test_non_lu2k_peer_is_dropped_and_listener_keeps_serving() -> None:
    """A key holder that does not speak lu2k's preamble (or says nothing) is dropped."""
    server, client = make(handshake_timeout=1.0), make()
    accepted: asyncio.Queue = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    port = lst.address[1]

    def stranger(send: bytes | None) -> None:
        u = _udtcore.socket()
        _udtcore.set_packet_key(u, proto.packet_key(KEY))
        _udtcore.connect(u, "127.0.0.1", port)
        if send is not None:
            _udtcore.sendmsg(u, send)
        try:
            _udtcore.recvmsg_into(u, bytearray(100))  # the listener hangs up on us
        except _udtcore.UDTError:
            pass
        _udtcore.close(u)

    await asyncio.to_thread(stranger, b"GET / HTTP/1.0\r\n\r\n")
    await asyncio.to_thread(stranger, None)  # silent: dropped after handshake_timeout
    out = await client.connect("127.0.0.1", port, ConnType.ANY, 5)
    inn = await asyncio.wait_for(accepted.get(), 10)
    await run_hello(client, out, inn, KEY)
    try:
        assert accepted.empty()  # neither stranger reached the engine
        await out.send([_msg(1, b"still here")])
        (f,) = await _recv_n(inn, 1)
        assert bytes(f.payload) == b"still here"
    finally:
        await _close(out, inn, lst, server, client)


async def test_peer_restart_mid_stream_every_send_one_outcome() -> None:
    """The receiving daemon goes away mid-stream and comes back on the same port.

    Every send() ends exactly once: it returns (the frame went into UDT) or raises
    WriteError; what the old peer received plus what the new one receives after the
    reconnect covers everything that was sent, each frame once per connection.
    """
    port_probe = make()
    probe = await port_probe.listen("127.0.0.1", 0, lambda t: asyncio.sleep(0))
    port = probe.address[1]
    probe.close()
    await port_probe.close()

    client = make()
    outcomes: dict[int, str] = {}
    received: list[int] = []
    payload = os.urandom(32768)

    async def serve(out, accepted: asyncio.Queue, stop_after: int | None) -> None:
        inn = await asyncio.wait_for(accepted.get(), 20)
        await run_hello(client, out, inn, KEY)
        try:
            while stop_after is None or len(received) < stop_after:
                for f in await inn.recv():
                    assert f.header.type is FrameType.MSG and bytes(f.payload) == payload
                    received.append(decode_msg(f.header).seq)
        except ReadError:
            pass

    async def sender(t, seqs: range) -> None:
        for seq in seqs:
            try:
                await t.send([_msg(seq, payload)])
                outcomes[seq] = outcomes.get(seq, "") + "ok"
            except WriteError:
                outcomes[seq] = outcomes.get(seq, "") + "failed"
                return

    first, accepted1 = make(), asyncio.Queue()
    lst1 = await first.listen("127.0.0.1", port, accepted1.put)
    out1 = await client.connect("127.0.0.1", port, ConnType.ANY, 5)
    serving = asyncio.ensure_future(serve(out1, accepted1, stop_after=100))
    while not out1._hello_over:  # the engine sends no message before its hello
        await asyncio.sleep(0.01)
    sending = asyncio.ensure_future(sender(out1, range(1, 100000)))
    await serving
    await _close(lst1, first)  # the peer daemon dies mid-stream
    with pytest.raises(NetworkError):
        await asyncio.wait_for(out1.recv(), 30)  # the reverse direction reports the loss
    await asyncio.wait_for(sending, 60)
    last = max(outcomes)
    assert outcomes[last] == "failed" and all(v == "ok" for s, v in outcomes.items() if s != last)
    out1.close()

    second, accepted2 = make(), asyncio.Queue()
    lst2 = await second.listen("127.0.0.1", port, accepted2.put)
    before = len(received)
    out2 = await client.connect("127.0.0.1", port, ConnType.ANY, 5)
    serving = asyncio.ensure_future(serve(out2, accepted2, stop_after=before + 50))
    while not out2._hello_over:
        await asyncio.sleep(0.01)
    await sender(out2, range(last, last + 50))  # resend what failed, then new ones
    await asyncio.wait_for(serving, 30)
    try:
        assert len(received) == len(set(received))  # nothing twice
        assert received[:before] == list(range(1, before + 1))
        assert received[before:] == list(range(last, last + 50))
        assert all(outcomes[s] == "ok" for s in range(last + 1, last + 50))
    finally:
        await _close(out2, lst2, second, client)


async def test_receiver_that_stops_reading_bounds_every_queue() -> None:
    small = {"buffer": 1 << 20, "recv_queue": 4, "flight_window": 1024}
    server, client = make(max_message=65536, **small), make(max_message=65536, **small)
    accepted: asyncio.Queue = asyncio.Queue()
    lst = await server.listen("127.0.0.1", 0, accepted.put)
    out = await client.connect("127.0.0.1", lst.address[1], ConnType.ANY, 5)
    inn = await asyncio.wait_for(accepted.get(), 10)
    await run_hello(client, out, inn, KEY)
    try:
        payload = b"z" * 65000
        count = 200  # 13 MB: far more than both UDT buffers and the hand-off queue hold
        sending = asyncio.ensure_future(out.send([_msg(i + 1, payload) for i in range(count)]))
        # Wait until the sender has stalled on a full pipe: its UDT send buffer (counted in
        # packets of mss - 28 bytes) is too full for another message.
        for _ in range(2400):
            if _udtcore.getsockopt(out._u, "snddata") * 1472 > (1 << 20) - 2 * 65536:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"send buffer never filled: {out.stats()}")
        assert not sending.done()
        assert len(inn._ready) <= 4  # the hand-off to the engine is bounded too
        got = await _recv_n(inn, count)  # reading again drains everything, in order
        await sending
        assert [decode_msg(f.header).seq for f in got] == list(range(1, count + 1))
    finally:
        await _close(out, inn, lst, server, client)


async def test_rendezvous_both_ends_connect() -> None:
    # Site A accepts by rendezvous-connecting to B's rendezvous port; B connects from it.
    pa = free_port()
    pb_rdv = free_port()
    a = make(port=pa, rendezvous=True, rendezvous_peers=[f"127.0.0.1:{pb_rdv}"])
    b = make(port=0, rendezvous=True, rendezvous_port=pb_rdv)
    accepted: asyncio.Queue = asyncio.Queue()
    lst = await a.listen("127.0.0.1", pa, accepted.put)
    out = await b.connect("127.0.0.1", pa, ConnType.ANY, 30)
    inn = await asyncio.wait_for(accepted.get(), 30)
    await run_hello(b, out, inn, KEY)
    try:
        await out.send([_msg(1, b"punched through")])
        (f,) = await _recv_n(inn, 1)
        assert bytes(f.payload) == b"punched through"
        assert a.describe()["rendezvous_peers"] == [f"127.0.0.1:{pb_rdv}"]
    finally:
        await _close(out, inn, lst, a, b)


async def test_connect_timeout_and_listen_errors() -> None:
    client = make()
    with pytest.raises(NetworkError):
        await client.connect("127.0.0.1", free_port(), ConnType.ANY, 0.5)
    with pytest.raises(NetworkError, match="cannot listen"):
        await client.listen("192.0.2.1", 0, lambda t: asyncio.sleep(0))  # not an address of this host
    await client.close()
    assert threading.active_count() < 200  # no thread leak from abandoned connects


async def test_an_abandoned_connect_is_closed_off_the_event_loop_once_the_connect_call_is_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # libudt's close of a socket whose connect is still running waits for that connect (up to
    # 3 s against a silent peer), and such a race was where libudt was seen to lock up: the
    # loop must not wait there, and the socket is closed only once libudt's connect returned.
    loop_thread = threading.get_ident()
    events: list[tuple[str, int, int]] = []  # (what, socket, thread)
    real_close, real_connect = udt._udtcore.close, udt._udtcore.connect

    def close(u: int) -> None:
        events.append(("close", u, threading.get_ident()))
        real_close(u)

    def connect(u: int, host: str, port: int) -> None:
        try:
            real_connect(u, host, port)
        finally:
            events.append(("connect returned", u, threading.get_ident()))

    monkeypatch.setattr(udt._udtcore, "close", close)
    monkeypatch.setattr(udt._udtcore, "connect", connect)
    client = make()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        with pytest.raises(ConnectTimeout):
            await client.connect("127.0.0.1", silent.getsockname()[1], ConnType.ANY, 0.3)
        assert not [e for e in events if e[0] == "connect returned"]  # given up on at once: libudt's connect still runs
        for _ in range(200):  # it gives up by itself within about 3 s, then the socket is closed
            dialled = {u for what, u, _ in events if what == "connect returned"}
            if any(what == "close" and u in dialled for what, u, _ in events):
                break
            await asyncio.sleep(0.05)
        await client.close()
    dialled = {u for what, u, _ in events if what == "connect returned"}
    ours = [(what, thread) for what, u, thread in events if u in dialled]  # not an earlier test's late closes
    assert [what for what, _ in ours] == ["connect returned", "close"], events
    assert loop_thread not in [thread for _, thread in ours], events


async def test_a_connect_that_cannot_bind_closes_its_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    # The rendezvous port is taken: the dial fails before libudt's connect, and its socket must
    # still be closed (each retry would otherwise leave one behind).
    made: list[int] = []
    closed: list[int] = []
    real_socket, real_close = udt._udtcore.socket, udt._udtcore.close

    def new_socket(family: int) -> int:
        made.append(real_socket(family))
        return made[-1]

    def close(u: int) -> None:
        closed.append(u)
        real_close(u)

    monkeypatch.setattr(udt._udtcore, "socket", new_socket)
    monkeypatch.setattr(udt._udtcore, "close", close)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("0.0.0.0", 0))
        client = make(rendezvous=True, rendezvous_port=taken.getsockname()[1])
        with pytest.raises(ConnectError):
            await client.connect("127.0.0.1", free_port(), ConnType.ANY, 2.0)
        for _ in range(100):
            if made and set(made) <= set(closed):
                break
            await asyncio.sleep(0.05)
        await client.close()
    assert made and set(made) <= set(closed), (made, closed)


def test_missing_binding_makes_backend_unavailable_with_reason(tmp_path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['lu2k.backends._udtcore'] = None\n"
        "from lu2k.backends import availability, get_backend\n"
        "from lu2k.errors import BackendUnavailable\n"
        "print(availability()['udt'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "backend 'udt' is unavailable" in out.stdout and "libudt-dev" in out.stdout


def test_install_without_libudt_headers_still_succeeds(tmp_path) -> None:
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, LU2K_UDT_INCLUDE=str(tmp_path / "no-such-include"), LU2K_MYPYC="0")  # the hot path is not under test
    out = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "NOT building the UDT binding" in out.stderr and "libudt-dev" in out.stderr
    assert not list((tmp_path / "lib").rglob("_udtcore*"))


def test_process_using_udt_exits() -> None:
    """The binding's repair ticker thread must not hang interpreter exit (it once did: a static
    condition variable with a waiter blocks forever in pthread_cond_destroy at exit)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    code = (
        "import asyncio, sys; sys.path.insert(0, %r)\n"
        "from conformance import BackendUnderTest, check_messages_arrive_intact\n"
        "from lu2k.backends.udt import UdtBackend\n"
        "asyncio.run(check_messages_arrive_intact(BackendUnderTest(UdtBackend, '127.0.0.1', max_message_size=1 << 20)))\n"
    ) % str(tests)
    done = subprocess.run([sys.executable, "-c", code], cwd=tests.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
