"""Tests for lu2k.kernel_shim.endpoint: the blocking Endpoint against a real loopback ShimServer.

The server runs on its own event loop in a thread (LoopbackThread), as lu2kd would run
in its own process; everything between them is the real ABI (socket, memfd, eventfds).
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections.abc import Iterator

import pytest

from lu2k.errors import LocalProtocolError, MessageFailed, NidError, ShimError, Status
from lu2k.kernel_shim.endpoint import Endpoint, pack_nid
from lu2k.kernel_shim.loopback import LoopbackThread
from lu2k.kernel_shim.server import ShimConfig
from lu2k.nid import parse_nid

LO = "0@lo"


@pytest.fixture
def shim(tmp_path: object) -> Iterator[LoopbackThread]:
    path = os.path.join(str(tmp_path), "shim.sock")
    with LoopbackThread(path, config=ShimConfig(max_in_flight=64, tx_pool_bytes=1 << 20, rx_pool_bytes=1 << 20)) as t:
        yield t


def attach(t: LoopbackThread, portal: int, **kw: int) -> Endpoint:
    return Endpoint.attach(t.server.path, portal, **kw)


def test_send_and_receive_both_ways(shim: LoopbackThread) -> None:
    with attach(shim, 1) as a, attach(shim, 2) as b:
        assert str(a.local_nid) == LO
        c = a.send(LO, b"ping", portal=2)
        assert c.wait(10) and c.status is Status.DELIVERED and c.done
        c.result()
        m = b.recv(timeout=10)
        assert m is not None
        assert (str(m.src), m.src_portal, m.dst_portal, bytes(m.payload)) == (LO, 1, 2, b"ping")
        m.release()
        with pytest.raises(LocalProtocolError, match="twice"):
            m.release()
        b.send(parse_nid(LO), b"pong", portal=1).result(10)
        with a.recv(timeout=10) as r:  # type: ignore[union-attr]
            assert bytes(r.payload) == b"pong" and r.src_portal == 2


def test_zero_byte_and_max_size_messages(shim: LoopbackThread) -> None:
    with attach(shim, 1) as a, attach(shim, 2) as b:
        big = os.urandom(a.max_message_size)
        for payload in (b"", big, b"x"):
            a.send(LO, payload, portal=2).result(10)
            m = b.recv(10)
            assert m is not None and bytes(m.payload) == payload
            m.release()
        with pytest.raises(ShimError) as e:
            a.send(LO, big + b"!", portal=2)
        assert e.value.code == errno.EMSGSIZE


def test_reserve_post_writes_in_place(shim: LoopbackThread) -> None:
    with attach(shim, 1) as a, attach(shim, 2) as b:
        slot = a.reserve(1000)
        slot.view[:5] = b"hello"
        c = slot.post(LO, 2, length=5)
        with pytest.raises(LocalProtocolError):
            slot.post(LO, 2)
        c.result(10)
        m = b.recv(10)
        assert m is not None and bytes(m.payload) == b"hello"
        m.release()
        with a.reserve(10) as s2:  # leaving without posting cancels it
            s2.view[:] = b"0123456789"
        assert a.stats()["tx_buffers_in_use"] == 0


def test_failures_carry_status_and_reason(shim: LoopbackThread) -> None:
    with attach(shim, 1) as a:
        c = a.send(LO, b"x", portal=77)
        assert c.wait(10)
        assert c.status is Status.NO_RECEIVER and "portal 77" in c.reason
        with pytest.raises(MessageFailed) as e:
            c.result()
        assert e.value.status is Status.NO_RECEIVER
        c2 = a.send("10.0.0.1@tcp", b"x", portal=0)
        c2.wait(10)
        assert c2.status is Status.NO_ROUTE
        with pytest.raises(NidError):
            a.send("not a nid@@", b"x")
        peers = a.peers()
        assert peers[LO]["failed"] == 1 and peers["10.0.0.1@tcp"]["failed"] == 1
        assert peers[LO]["in_flight"] == 0


def test_peer_tracking_and_stats(shim: LoopbackThread) -> None:
    with attach(shim, 1) as a, attach(shim, 2) as b:
        comps = [a.send(LO, b"abc", portal=2) for _ in range(10)]
        for c in comps:
            c.result(10)
        for _ in range(10):
            m = b.recv(10)
            assert m is not None
            m.release()
        assert a.peers()[LO] == {"sent": 10, "delivered": 10, "failed": 0, "received": 0,
                                 "bytes_sent": 30, "bytes_received": 0, "in_flight": 0}
        assert b.peers()[LO]["received"] == 10 and b.peers()[LO]["bytes_received"] == 30
        st = a.stats()
        assert st["sent"] == 10 and st["delivered"] == 10 and st["in_flight"] == 0
        ds = a.daemon_stats()
        assert ds["submitted"] == 10 and ds["completed"] == 10 and ds["tx_bytes"] == 30
        for _ in range(2000):  # releases reach the daemon on its next ring pass, which may follow the STATS reply
            bs = b.daemon_stats()
            if bs["released"] == 10:
                break
            time.sleep(0.001)
        assert bs["delivered"] == 10 and bs["released"] == 10
        info = a.info()
        assert info["portal"] == 1 and info["local_nid"] == LO and info["endpoints"] == 2


def test_back_pressure_nonblocking_send_raises_eagain(shim: LoopbackThread) -> None:
    # The receiver never releases: RX slots run out, the loopback parks messages, the
    # sender's completions stop, its TX pool empties, and a non-blocking send says EAGAIN.
    with attach(shim, 1) as a, attach(shim, 2) as b:
        comps = []
        with pytest.raises(ShimError) as e:
            for _ in range(100_000):
                comps.append(a.send(LO, b"x" * 20000, portal=2, timeout=0))
        assert e.value.code == errno.EAGAIN
        assert len(comps) < 100_000
        stats = shim.call(lambda: shim.server.ports[1].stats())
        assert stats["in_flight"] <= 64  # max_in_flight bounds what the daemon holds
        # Draining the receiver lets everything complete, each exactly once.
        got = 0
        while got < len(comps):
            m = b.recv(10)
            assert m is not None
            m.release()
            got += 1
        for c in comps:
            c.result(10)
        assert a.peers()[LO]["delivered"] == len(comps)


def test_fileno_is_selectable(shim: LoopbackThread) -> None:
    with attach(shim, 1) as a, attach(shim, 2) as b:
        assert b.poll() == 0
        a.send(LO, b"wake", portal=2)
        r, _w, _x = select.select([b], [], [], 10)
        assert r == [b]
        m = b.recv(0)
        assert m is not None and bytes(m.payload) == b"wake"
        m.release()


def test_portal_in_use_is_refused(shim: LoopbackThread) -> None:
    with attach(shim, 5):
        with pytest.raises(ShimError) as e:
            attach(shim, 5)
        assert e.value.code == errno.EADDRINUSE
    with attach(shim, 5):  # free again after detach
        pass


def test_daemon_death_fails_pending_with_cancelled(shim: LoopbackThread) -> None:
    a = attach(shim, 1, tx_pool_bytes=16 << 20)  # more TX slots than the receiver has RX slots
    attach_b = attach(shim, 2)
    # The receiver does not read: RX slots fill, so later sends stay pending in the daemon.
    comps = []
    with pytest.raises(ShimError) as full:
        for _ in range(1000):
            comps.append(a.send(LO, b"y" * 50000, portal=2, timeout=0))
    assert full.value.code == errno.EAGAIN
    shim.stop()  # the daemon goes away: control socket EOF
    for c in comps:
        assert c.wait(10)
    statuses = {c.status for c in comps}
    assert statuses <= {Status.DELIVERED, Status.CANCELLED}
    assert Status.CANCELLED in statuses
    failed = [c for c in comps if c.status is Status.CANCELLED]
    assert "lu2kd" in failed[0].reason
    with pytest.raises(ShimError) as e:
        a.send(LO, b"z", portal=2)
    assert e.value.code == errno.ENOTCONN
    assert not a.attached
    # Messages already delivered stay readable; then recv says the endpoint is gone.
    while True:
        try:
            m = attach_b.recv(0)
        except ShimError as err:
            assert err.code == errno.ENOTCONN
            break
        assert m is not None
        m.release()
    a.detach()
    attach_b.detach()


def test_attach_without_daemon_is_a_clear_error(tmp_path: object) -> None:
    with pytest.raises(ShimError, match="is lu2kd running"):
        Endpoint.attach(os.path.join(str(tmp_path), "nobody.sock"))


def test_pack_nid_forms() -> None:
    raw = parse_nid("10.1.2.3@tcp1").to_bytes()
    assert pack_nid("10.1.2.3@tcp1") == raw == pack_nid(raw) == pack_nid(parse_nid("10.1.2.3@tcp1"))
    with pytest.raises(NidError):
        pack_nid(b"short")
    with pytest.raises(NidError):
        pack_nid(42)  # type: ignore[arg-type]


def test_control_calls_work_with_descriptors_above_1024(shim: LoopbackThread) -> None:
    # select() cannot watch fd >= 1024 (FD_SETSIZE): an application with many files open
    # must still be able to ask the daemon for INFO/STATS and to DETACH.
    import subprocess
    import sys

    code = (
        "import os, resource, sys\n"
        "from lu2k.kernel_shim.endpoint import Endpoint\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), max(hard, 2048)))\n"
        "held = [os.open('/dev/null', os.O_RDONLY) for _ in range(1100)]\n"
        "ep = Endpoint.attach(sys.argv[1], 7)\n"
        "assert ep._core.sock.fileno() > 1024, ep._core.sock.fileno()\n"
        "ep.send('0@lo', b'x', portal=7).result(10)\n"
        "print(ep.info()['portal'], ep.daemon_stats()['submitted'], ep._core.sock.fileno())\n"
        "ep.detach()\n"
    )
    out = subprocess.run([sys.executable, "-c", code, shim.server.path], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    portal, submitted, fd = out.stdout.split()
    assert (portal, submitted) == ("7", "1") and int(fd) > 1024


def test_msg_id_is_the_cookie_and_is_checked(shim: LoopbackThread) -> None:
    with attach(shim, 1) as a, attach(shim, 2) as b:
        c = a.send(LO, b"with id", portal=2, msg_id=77)
        assert c.cookie == 77 and c.wait(10) and c.status is Status.DELIVERED
        auto = a.send(LO, b"without", portal=2)
        assert auto.cookie >= 1 << 63 and auto.wait(10)
        for bad in (0, -1, 1 << 63, 1.5):
            with pytest.raises(LocalProtocolError, match="msg_id"):
                a.send(LO, b"x", portal=2, msg_id=bad)  # type: ignore[arg-type]
        for _ in range(2):
            m = b.recv(10)
            assert m is not None
            m.release()
        slot = a.reserve(10)
        held = slot.post(LO, portal=9, msg_id=5)  # portal 9: completes NO_RECEIVER once served
        assert not held.done  # completions are only read while waiting
        with pytest.raises(ShimError) as e:
            a.send(LO, b"x", portal=2, msg_id=5)
        assert e.value.code == errno.EEXIST
        assert held.wait(10) and a.send(LO, b"x", portal=2, msg_id=5).wait(10)
