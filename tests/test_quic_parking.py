"""lu2k.backends.quic_stream.StreamParking: our send streams leave aioquic's tables once all
sent, come back when aioquic declares part of them lost, and each is reported acknowledged once.

Two real aioquic connections over an in-memory link with a fake clock (delay, seeded loss); no
sockets, no event loop.
"""

from __future__ import annotations

import heapq
import random
import ssl
from typing import Any

import pytest

pytest.importorskip("aioquic")

from aioquic.quic import events  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.connection import QuicConnection  # noqa: E402

from lu2k.backends.quic_stream import StreamParking, _has_unsent  # noqa: E402
from lu2k.certs import make_certificate, make_key  # noqa: E402

CLIENT_ADDR, SERVER_ADDR = ("10.0.0.1", 40000), ("10.0.0.2", 4433)


class LossyPair:
    """A client and a server connection joined by a link of ``one_way`` seconds that drops
    each datagram with probability ``loss`` (seeded); the client's streams are parked."""

    def __init__(self, *, one_way: float = 0.05, loss: float = 0.0, seed: int = 7) -> None:
        key = make_key()
        client_cfg = QuicConfiguration(is_client=True, alpn_protocols=["lu2k"], verify_mode=ssl.CERT_NONE, server_name="peer")
        server_cfg = QuicConfiguration(is_client=False, alpn_protocols=["lu2k"])
        server_cfg.certificate, server_cfg.private_key = make_certificate(key, "peer"), key
        self.client = QuicConnection(configuration=client_cfg)
        self.server = QuicConnection(configuration=server_cfg, original_destination_connection_id=self.client.original_destination_connection_id)
        self.now = 0.0
        self.one_way, self.loss, self.rng = one_way, loss, random.Random(seed)
        self.link: list[tuple[float, int, bool, bytes]] = []  # (arrival, order, to_server, datagram)
        self.order = 0
        self.acknowledged: list[int] = []
        self.parking = StreamParking(self.client, self.acknowledged.append)
        self.received: dict[int, bytes] = {}
        self.fins: dict[int, int] = {}
        self.idle_known = 0  # times a stream with everything sent was still in aioquic's tables after a pass
        self.client.connect(SERVER_ADDR, now=self.now)
        self.pump()
        self.run_until(lambda: self.client._handshake_complete and self.server._handshake_complete)

    def send_message(self, data: bytes) -> int:
        sid = self.client.get_next_available_stream_id(is_unidirectional=True)
        self.client.send_stream_data(sid, data, end_stream=True)
        self.parking.track(sid)
        self.pump()
        return sid

    def pump(self) -> None:
        for conn, to_server in ((self.client, True), (self.server, False)):
            if not conn._network_paths:
                continue
            for datagram, _ in conn.datagrams_to_send(now=self.now):
                if self.loss and self.rng.random() < self.loss and self.client._handshake_complete:
                    continue
                self.order += 1
                heapq.heappush(self.link, (self.now + self.one_way, self.order, to_server, datagram))
            if conn is self.client:
                self.parking.park()
                self.idle_known += sum(not _has_unsent(st.sender) and not st.sender.is_finished for st in conn._streams.values())
        while (event := self.server.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                self.received[event.stream_id] = self.received.get(event.stream_id, b"") + event.data
                self.fins[event.stream_id] = self.fins.get(event.stream_id, 0) + event.end_stream
        while self.client.next_event() is not None:
            pass

    def step(self) -> bool:
        """Advance the clock to the next arrival or timer and handle it; False if there is none."""
        due = [t for t in (self.client.get_timer(), self.server.get_timer()) if t is not None]
        if self.link:
            due.append(self.link[0][0])
        if not due:
            return False
        self.now = max(self.now, min(due))
        while self.link and self.link[0][0] <= self.now:
            _, _, to_server, datagram = heapq.heappop(self.link)
            if to_server:
                self.server.receive_datagram(datagram, CLIENT_ADDR, now=self.now)
            else:
                self.client.receive_datagram(datagram, SERVER_ADDR, now=self.now)
        for conn in (self.client, self.server):
            timer = conn.get_timer()
            if timer is not None and timer <= self.now:
                conn.handle_timer(now=self.now)
        self.pump()
        return True

    def run_until(self, done: Any, limit: float = 120.0) -> None:
        while not done():
            assert self.now < limit and self.step(), "the pair went quiet before it was done"


def _message(i: int) -> bytes:
    return i.to_bytes(4, "big") * 256  # 1 KiB, its own number all through


def test_streams_all_sent_leave_aioquics_tables_and_are_reported_once() -> None:
    pair = LossyPair()
    sids = [pair.send_message(_message(i)) for i in range(200)]
    pair.run_until(lambda: not pair.client._streams)  # all sent: aioquic walks no stream of ours ...
    assert len(pair.parking.parked) + len(pair.acknowledged) == len(sids)  # ... while their ACKs are on the way
    assert pair.parking.parked
    pair.run_until(lambda: len(pair.acknowledged) == len(sids))
    assert sorted(pair.acknowledged) == sids  # each once
    assert not pair.parking.parked and pair.parking.unparked == 0 and pair.idle_known == 0
    assert all(pair.received[sid] == _message(i) and pair.fins[sid] == 1 for i, sid in enumerate(sids))


def test_a_lost_packet_puts_its_stream_back_and_it_is_retransmitted() -> None:
    pair = LossyPair(loss=0.05, seed=3)
    sids = []
    for i in range(400):
        sids.append(pair.send_message(_message(i)))
        if i % 20 == 19:  # messages keep coming while earlier ones are in flight
            for _ in range(5):
                pair.step()
    pair.run_until(lambda: len(pair.acknowledged) == len(sids))
    assert pair.parking.unparked > 0, "with 5 % loss some parked streams must have been put back"
    assert sorted(pair.acknowledged) == sids
    assert all(pair.received[sid] == _message(i) and pair.fins[sid] == 1 for i, sid in enumerate(sids))
    assert not pair.parking.parked and not pair.client._streams
    assert pair.idle_known == 0  # aioquic's per-packet walk only ever saw streams with something to send


def test_acknowledged_streams_are_freed_without_the_cyclic_collector() -> None:
    """A stream tracked, parked and acknowledged must not be left in a reference cycle: at a
    thousand streams a second the cyclic collector's pauses would show in the latency tail."""
    import gc
    import weakref

    pair = LossyPair(loss=0.05, seed=5)
    gc.collect()
    gc.disable()
    try:
        refs = []
        for i in range(100):
            sid = pair.send_message(_message(i))
            refs.append(weakref.ref(pair.parking._sending.get(sid) or pair.parking.parked[sid]))
        pair.run_until(lambda: len(pair.acknowledged) == 100)
        pair.step()  # aioquic drops its last references on its next pass
        assert sum(r() is not None for r in refs) == 0
    finally:
        gc.enable()
