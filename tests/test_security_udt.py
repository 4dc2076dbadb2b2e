"""udt with an on-path attacker: a UDP relay between two udt backends, then two udt engines.

The relay sees every UDT packet -- socket ids, sequence numbers, message numbers are all in
clear -- and can drop, alter, replay and inject datagrams either way, as an attacker on the
path without the network key.  UDT itself authenticates nothing; lu2k's binding appends a
counter and a MAC to every packet and drops forged and replayed ones before libudt acts on
them (``_udt/packet_auth.h``), and seals every message's payload with an AEAD (udt_proto).

Engine-level attacks run two engines, A sending ``COUNT`` messages to B (no endpoint on B,
so each message B really receives completes ``NO_RECEIVER``), through the relay, then a
second batch with the attack stopped.  What must hold for every attack: no message
``DELIVERED``; every message exactly one completion; B receives nothing twice; the second
batch arrives; and the attack is counted (forged or replayed packets, or a bad frame).
``test_without_packet_authentication_a_forged_ack_stalls_the_connection`` shows the forged
ACK working on plain UDT: the proof that the attack the relay makes is real.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import pytest
import structlog

from lu2k.localpair import free_port
from lu2k.backends import availability, get_backend
from lu2k.errors import ConnectError, FrameError, Status

pytestmark = pytest.mark.skipif(availability().get("udt") is not None, reason=str(availability().get("udt")))

from conformance import BackendUnderTest, _close, _msg, _recv_n, run_hello  # noqa: E402

from lu2k.backends import _udtcore, udt  # noqa: E402
from lu2k.engine import Engine  # noqa: E402
from lu2k.nid import Nid, parse_nid  # noqa: E402
from lu2k.settings import parse_config  # noqa: E402
from lu2k.wire import ConnType, decode_msg  # noqa: E402

MARKER = b"UDT-SECRET-PAYLOAD-"
HEADER = struct.Struct("!IIII")  # UDT: seq or control type, message no. or extra, timestamp, destination socket
TRAILER = _udtcore.PACKET_TRAILER_SIZE
KEEPALIVE, ACK, NAK, SHUTDOWN, ACK2, DROP_REQUEST, HANDSHAKE = 1, 2, 3, 5, 6, 7, 0
Kind = Union[int, str]  # a control type, or "data"
Attack = Callable[["UdpRelay", str, bytes], list[bytes]]  # (relay, direction, datagram) -> datagrams to forward


def kind_of(d: bytes) -> Kind:
    return (HEADER.unpack_from(d)[0] >> 16) & 0x7FFF if d[0] & 0x80 else "data"


def dest_of(d: bytes) -> int:
    return int(HEADER.unpack_from(d)[3])


def seq_of(d: bytes) -> int:
    return int(HEADER.unpack_from(d)[0] & 0x7FFFFFFF)


def control(kind: int, dest: int, info: bytes = b"", extra: int = 0) -> bytes:
    """A UDT control packet as libudt sends it, without lu2k's trailer."""
    return HEADER.pack(0x80000000 | (kind << 16), extra, 0, dest) + info


class UdpRelay(asyncio.DatagramProtocol):
    """One client <-> one server, over two UDP sockets; while ``active`` every datagram goes
    through ``attack``, which may also :meth:`send` its own."""

    def __init__(self, server: tuple[str, int], attack: Attack) -> None:
        self.server, self.attack = server, attack
        self.active = True
        self.capture: list[bytes] = []
        self.client: tuple[str, int] | None = None
        self.seen: Counter[tuple[str, Kind]] = Counter()
        self.last: dict[tuple[str, Kind], bytes] = {}
        self.sent_seqs: dict[str, list[int]] = {"c->s": [], "s->c": []}
        self.full_ack: bytes | None = None  # the latest s->c ACK with all its fields
        self.front: Any = None
        self.back: Any = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                relay._forward("s->c", data)

        self.front, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        self.back, _ = await loop.create_datagram_endpoint(Back, local_addr=("127.0.0.1", 0))
        return int(self.front.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client = addr
        self._forward("c->s", data)

    def _forward(self, direction: str, data: bytes) -> None:
        self.capture.append(data)
        kind = kind_of(data)
        self.seen[direction, kind] += 1
        self.last[direction, kind] = data
        if kind == "data":
            self.sent_seqs[direction].append(seq_of(data))
        elif kind == ACK and direction == "s->c" and len(data) in (HEADER.size + 24, HEADER.size + 24 + TRAILER):
            self.full_ack = data  # six fields, with a trailer or (plain UDT) without
        for out in self.attack(self, direction, data) if self.active else [data]:
            self.send(direction, out)

    def send(self, direction: str, data: bytes) -> None:
        if direction == "c->s":
            self.back.sendto(data, self.server)
        elif self.client is not None:
            self.front.sendto(data, self.client)

    def data_packets(self, direction: str) -> int:
        return self.seen[direction, "data"]

    def retransmitted(self, direction: str) -> int:
        seqs = self.sent_seqs[direction]
        return len(seqs) - len(set(seqs))

    def close(self) -> None:
        for t in (self.front, self.back):
            if t is not None:
                t.close()


def _auth_totals() -> Counter[str]:
    return Counter(_udtcore.packet_auth_totals())


# --- backend level: one connection through the relay --------------------------------------------


async def _through_relay(attack: Attack, **options: Any) -> tuple[Any, Any, Any, Any, Any, UdpRelay]:
    but = BackendUnderTest(get_backend("udt"), "127.0.0.1", options={"_net": "udt", **options})
    server, client = but.make(), but.make()
    accepted: asyncio.Queue[Any] = asyncio.Queue()

    async def on_accept(t: Any) -> None:
        await accepted.put(t)

    lst = await server.listen("127.0.0.1", 0, on_accept)
    relay = UdpRelay(("127.0.0.1", lst.address[1]), attack)
    port = await relay.start()
    out = await client.connect("127.0.0.1", port, ConnType.ANY, 10.0)
    inn = await asyncio.wait_for(accepted.get(), 10)
    await run_hello(client, out, inn, but.key)
    return server, client, out, inn, lst, relay


def _payloads(n: int) -> list[bytes]:
    return [MARKER + bytes([65 + i % 26]) * 3000 for i in range(n)]


async def test_capture_shows_no_payload_and_duplicates_deliver_once() -> None:
    def duplicate(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        return [data, data] if direction == "c->s" and relay.seen[direction, "data"] % 3 == 0 else [data]

    before = _auth_totals()
    server, client, out, inn, lst, relay = await _through_relay(duplicate)
    try:
        payloads = _payloads(20)
        await out.send([_msg(i + 1, p) for i, p in enumerate(payloads)])
        frames = await _recv_n(inn, len(payloads))
        assert [decode_msg(f.header).seq for f in frames] == list(range(1, 21))
        assert [bytes(f.payload) for f in frames] == payloads
        # A sentinel sent afterwards is the very next frame: nothing was delivered twice.
        await out.send([_msg(21, b"sentinel")])
        (nxt,) = await _recv_n(inn, 1)
        assert decode_msg(nxt.header).seq == 21
        assert relay.data_packets("c->s") > 20 and MARKER not in b"".join(relay.capture)
        # The copies never reached libudt: their counters had been seen.
        assert _auth_totals()["replayed"] - before["replayed"] >= relay.data_packets("c->s") // 3 - 1
    finally:
        relay.close()
        await _close(out, inn, lst, server, client)


async def test_flipped_byte_in_a_data_packets_payload_is_caught_by_the_aead() -> None:
    """The packet MAC covers a data packet's header; its payload is the message AEAD's."""
    flipped: list[int] = []

    def flip(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        if direction == "c->s" and not flipped and len(data) > 1000 and kind_of(data) == "data":
            flipped.append(seq_of(data))
            data = data[:200] + bytes([data[200] ^ 0x40]) + data[201:]
        return [data]

    server, client, out, inn, lst, relay = await _through_relay(flip)
    try:
        await out.send([_msg(i + 1, p) for i, p in enumerate(_payloads(5))])
        with pytest.raises(FrameError, match="failed authentication"):
            await _recv_n(inn, 5)
        assert flipped
    finally:
        relay.close()
        await _close(out, inn, lst, server, client)


async def test_forged_packets_are_counted_on_the_connection_and_logged() -> None:
    forged = {"n": 0}

    def inject(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        if direction == "c->s" and len(data) > 1000 and kind_of(data) == "data" and forged["n"] < 10:  # messages, not the hello
            forged["n"] += 1
            return [control(SHUTDOWN, dest_of(data)), data]  # addressed to the accepted socket
        return [data]

    server, client, out, inn, lst, relay = await _through_relay(inject)
    try:
        await out.send([_msg(i + 1, p) for i, p in enumerate(_payloads(5))])
        assert len(await _recv_n(inn, 5)) == 5
        assert forged["n"] == 10 and inn.stats()["packets_forged"] == 10 and out.stats()["packets_forged"] == 0
        with structlog.testing.capture_logs() as logs:
            inn.check_packets()  # what the backend's watchdog does once a second
            inn.check_packets()  # ... and only news are logged
        assert [(e["log_level"], e["forged"]) for e in logs] == [("warning", 10)]
    finally:
        relay.close()
        await _close(out, inn, lst, server, client)


# --- engine level: every message's completion ----------------------------------------------------

A_NID, B_NID = parse_nid("127.0.0.1@udt"), parse_nid("127.0.0.2@udt")
COUNT = 32  # messages of SIZE bytes: about 460 data packets
SIZE = 20000
START = 100  # the attack starts at this data packet from A, well after the hello


def _config(nid: str, port: int, transaction_timeout: float) -> Any:
    return parse_config({
        "net": [{"net type": "udt", "local NI(s)": [{"nid": nid, "tunables": {"peer_credits": 16, "credits": 64}}],
                 "lu2k": {"backend": "udt", "port": port, "key": "udt-forge-test-network-key-0123456789",
                          "max_message_size": 1 << 20}}],
        "global": {"transaction_timeout": transaction_timeout, "connect_timeout": 2, "reconnect_min": 0.05,
                   "reconnect_max": 0.2},
    })


@dataclass
class Outcome:
    during: Counter[Status]  # the first batch, sent while the attack runs
    after: Counter[Status]  # the second batch, the attack stopped
    a: Counter[str]  # engine stats
    b: Counter[str]
    auth: Counter[str]  # packets authenticated, forged, replayed (both engines: one process)
    relay: UdpRelay


async def _send_batch(a: Engine, count: int, tag: int, wait: float) -> list[list[tuple[Status, str]]]:
    results: list[list[tuple[Status, str]]] = [[] for _ in range(count)]
    done = asyncio.Event()

    def finisher(i: int) -> Callable[[Status, str], None]:
        def finish(status: Status, reason: str) -> None:
            results[i].append((status, reason))
            if all(results):
                done.set()
        return finish

    for i in range(count):
        a.send(None, B_NID, 1, 5, MARKER + bytes([tag, 65 + i % 26]) * (SIZE // 2), finisher(i))
    await asyncio.wait_for(done.wait(), wait)
    return results


async def _started(nid: Nid, host: str, transaction_timeout: float, exclude: int = 0) -> tuple[Engine, int]:
    """An engine listening on a free port of ``host``.  A port found free can still be taken by a
    parallel test before the engine binds it; then another one is picked."""
    for attempt in range(3):
        port = free_port(host)
        if port == exclude:  # libudt refuses a second listener on a port, whatever the address
            continue
        engine = Engine(_config(str(nid), port, transaction_timeout))
        try:
            await engine.start(with_shim=False)
        except ConnectError as e:
            await engine.stop()
            if "Address already in use" not in str(e) or attempt == 2:
                raise
            continue
        return engine, port
    raise AssertionError(f"no free port for {nid}")


async def _run(attack: Attack, transaction_timeout: float = 4.0, resumes: bool = True, resets: bool = False) -> Outcome:
    """COUNT messages from A to B while ``attack`` runs, then COUNT / 4 more without it.
    ``resets``: the attack stalls sends until a transaction timeout resets the connection, so a
    message still waiting for its turn then may end NO_ROUTE (never transmitted)."""
    before = _auth_totals()
    a, a_port = await _started(A_NID, "127.0.0.1", transaction_timeout)
    b, b_port = await _started(B_NID, "127.0.0.2", transaction_timeout, exclude=a_port)
    relay = UdpRelay(("127.0.0.2", b_port), attack)
    a.set_peer_addresses({B_NID: f"127.0.0.1:{await relay.start()}"})
    b.set_peer_addresses({A_NID: f"127.0.0.1:{a_port}"})  # B's own connection to A, if it makes one
    try:
        during = await _send_batch(a, COUNT, 1, 20 + transaction_timeout)
        relay.active = False
        after = await _send_batch(a, COUNT // 4, 2, 20 + transaction_timeout)
    finally:
        # Stopping ends every engine task: any second completion has been recorded by then.
        await a.stop()
        await b.stop()
        relay.close()
    results = during + after
    assert all(len(r) == 1 for r in results), f"every message ends in exactly one completion: {results}"
    outcome = Outcome(Counter(r[0][0] for r in during), Counter(r[0][0] for r in after), Counter(a.stats),
                      Counter(b.stats), _auth_totals() - before, relay)
    statuses = outcome.during + outcome.after
    assert Status.DELIVERED not in statuses  # B has no endpoint: DELIVERED could only be forged
    allowed = {Status.NO_RECEIVER, Status.TIMED_OUT} | ({Status.NO_ROUTE} if resets else set())
    assert set(statuses) <= allowed, results
    # B took each message at most once (resends of what it had are counted as duplicates and
    # answered again, not delivered), every one whose completion says so, and none that
    # ended NO_ROUTE.
    delivered = outcome.b["msgs_received"] - outcome.b["duplicates"]
    assert statuses[Status.NO_RECEIVER] <= delivered <= len(results) - statuses[Status.NO_ROUTE]
    if resumes:
        assert outcome.after == Counter({Status.NO_RECEIVER: COUNT // 4}), f"traffic did not resume: {results[COUNT:]}"
    assert MARKER not in b"".join(relay.capture)
    return outcome


def _clean(o: Outcome) -> None:
    """The attack changed nothing: every message received, on the one connection."""
    assert o.during == Counter({Status.NO_RECEIVER: COUNT})
    assert o.a["connections_lost"] == 0 and o.b["conns_accepted"] == 1 and o.b["bad_frames"] == 0


def _forged_ack(relay: UdpRelay, dropped: list[int]) -> list[bytes]:
    """ACKs for the data packets the relay dropped, one bare and one under a genuine trailer."""
    assert relay.full_ack is not None
    template = relay.full_ack
    fields = list(struct.unpack_from("!6I", template, HEADER.size))
    fields[0] = (dropped[-1] + 1) & 0x7FFFFFFF  # "received everything before this"
    body = template[: HEADER.size] + struct.pack("!6I", *fields)
    return [body, body + template[-TRAILER:]]


def dropping_then_acking(count: int = 4) -> Attack:
    """Drop ``count`` data packets from A, then acknowledge them to A in B's name."""
    dropped: list[int] = []

    def attack(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        if direction == "c->s" and kind_of(data) == "data" and relay.data_packets("c->s") >= START and len(dropped) < count:
            dropped.append(seq_of(data))
            if len(dropped) == count:
                for forged in _forged_ack(relay, dropped):
                    relay.send("s->c", forged)
            return []
        return [data]

    return attack


async def test_forged_ack_for_dropped_data_is_refused_and_the_data_resent() -> None:
    o = await _run(dropping_then_acking())
    _clean(o)
    assert o.auth["forged"] >= 2
    assert o.relay.retransmitted("c->s") >= 4  # the dropped packets came again, on B's real NAK


async def test_without_packet_authentication_a_forged_ack_stalls_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain UDT (no packet key on either side): the same attack frees data B never got, and
    messages time out.  Then one of two things, depending on whether libudt's send buffer had
    filled before the first deadline: the connection stays up carrying nothing, so the next
    messages time out too; or a send was still blocked at that deadline and lu2k reset the
    stuck connection, so the next messages go out on a fresh one."""
    monkeypatch.setattr(udt._udtcore, "set_packet_key", lambda u, key: None)
    o = await _run(dropping_then_acking(), transaction_timeout=2.0, resumes=False)
    assert o.auth["forged"] == 0 and o.during[Status.TIMED_OUT] > 0
    stalled = o.after[Status.TIMED_OUT] > 0 and o.a["connections_lost"] == 0
    reset_as_stuck = o.a["connections_lost"] > 0 and o.b["conns_accepted"] > 1
    assert stalled or reset_as_stuck, (o.after, o.a["connections_lost"], o.b["conns_accepted"])


async def test_forged_nak_flood_is_dropped_and_resends_nothing() -> None:
    injected = {"n": 0}

    def flood(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        if direction == "c->s" and kind_of(data) == "data" and relay.data_packets("c->s") >= START:
            seq = seq_of(data)
            loss = struct.pack("!II", 0x80000000 | max(seq - 50, 0), seq)  # "lost: seq - 50 .. seq"
            for i in range(10):
                nak = control(NAK, dest_of(relay.last["s->c", ACK]), loss)
                relay.send("s->c", nak if i % 2 else nak + relay.last["s->c", ACK][-TRAILER:])
                injected["n"] += 1
        return [data]

    o = await _run(flood)
    _clean(o)
    assert o.auth["forged"] >= injected["n"] > 1000
    # Unauthenticated, each NAK made A resend up to 50 packets: several times the whole transfer.
    assert o.relay.retransmitted("c->s") < o.relay.data_packets("c->s") // 10


async def test_forged_shutdown_is_dropped() -> None:
    def shut(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        if direction == "c->s" and kind_of(data) == "data" and relay.data_packets("c->s") == START:
            to_b, to_a = control(SHUTDOWN, dest_of(data)), control(SHUTDOWN, dest_of(relay.last["s->c", ACK]))
            relay.send("c->s", to_b)
            relay.send("s->c", to_a)
            relay.send("s->c", to_a + relay.last["s->c", ACK][-TRAILER:])
        return [data]

    o = await _run(shut)
    _clean(o)
    assert o.auth["forged"] >= 3


async def test_replayed_packets_are_dropped() -> None:
    """Everything the relay saw up to START, control and data, both ways, played again."""
    recorded: list[tuple[str, bytes]] = []

    def replay(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        if relay.data_packets("c->s") < START:
            recorded.append((direction, data))
        elif direction == "c->s" and relay.data_packets("c->s") == START and kind_of(data) == "data":
            for d, old in recorded:
                relay.send(d, old)
        return [data]

    o = await _run(replay)
    _clean(o)
    to_sockets = [old for _, old in recorded if dest_of(old) != 0]  # requests to the listener have no window
    assert len(to_sockets) > START and o.auth["replayed"] >= len(to_sockets)
    assert o.auth["forged"] == 0


async def test_forged_and_replayed_handshakes_to_an_established_connection_change_nothing() -> None:
    handshakes: list[tuple[str, bytes]] = []

    def handshake(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        if kind_of(data) == HANDSHAKE:
            handshakes.append((direction, data))
        if direction == "c->s" and kind_of(data) == "data" and relay.data_packets("c->s") == START:
            genuine_request = next(d for dr, d in handshakes if dr == "c->s")
            for d, old in handshakes:
                relay.send(d, old)  # replayed: the responses are refused, the requests answered as before
            relay.send("c->s", genuine_request[:-TRAILER])  # a new connection request, bare: forged
            relay.send("c->s", control(HANDSHAKE, dest_of(data), genuine_request[HEADER.size:-TRAILER]))
            relay.send("s->c", control(HANDSHAKE, dest_of(relay.last["s->c", ACK]), genuine_request[HEADER.size:-TRAILER]))
        return [data]

    o = await _run(handshake)
    _clean(o)
    assert o.auth["forged"] >= 3 and o.auth["replayed"] >= 1


@pytest.mark.parametrize("how", ["ahead-of-the-genuine", "far-ahead", "new-message"])
async def test_injected_data_packets_are_dropped(how: str) -> None:
    """Data packets with a header the attacker copied or made up: refused before UDT sees them.
    (Unauthenticated, "far-ahead" confused UDT's reassembly until the transaction timeout.)"""
    def inject(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        if direction == "c->s" and kind_of(data) == "data" and relay.data_packets("c->s") == START:
            seq, msgno, stamp, dest = HEADER.unpack_from(data)
            if how == "ahead-of-the-genuine":
                return [data[:HEADER.size] + os.urandom(len(data) - HEADER.size), data]
            if how == "far-ahead":
                return [data, HEADER.pack((seq + 200) & 0x7FFFFFFF, msgno, stamp, dest) + os.urandom(1000)]
            solo = 0xC0000000 | 0x20000000 | ((msgno & 0x1FFFFFFF) + 1)  # first and last packet, in order
            return [data, HEADER.pack(seq + 1, solo, stamp, dest) + os.urandom(200)]
        return [data]

    o = await _run(inject)
    _clean(o)
    assert o.auth["forged"] >= 1


async def test_altered_payload_closes_the_connection_is_counted_and_nothing_is_lost() -> None:
    """The one change that gets past the packet MAC (a payload under a genuine header) fails
    the message AEAD: the connection closes, and its messages are resent on the next."""
    altered: list[int] = []

    def alter(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        if direction == "c->s" and kind_of(data) == "data" and relay.data_packets("c->s") >= START and not altered:
            altered.append(seq_of(data))
            data = data[:300] + bytes([data[300] ^ 0x01]) + data[301:]
        return [data]

    o = await _run(alter)
    assert o.during == Counter({Status.NO_RECEIVER: COUNT})
    assert o.b["bad_frames"] == 1 and o.b["conns_accepted"] == 2 and o.a["connections_lost"] == 1


@pytest.mark.parametrize("kind", [KEEPALIVE, 4, ACK2, DROP_REQUEST, 8, 0x7FFF],
                         ids=["keep-alive", "congestion-warning", "ack2", "drop-request", "peer-error", "probe"])
async def test_every_other_forged_control_packet_is_dropped(kind: int) -> None:
    def forge(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        if direction == "c->s" and kind_of(data) == "data" and relay.data_packets("c->s") == START:
            seq, msgno = seq_of(data), HEADER.unpack_from(data)[1] & 0x1FFFFFFF
            # Plausible contents: a drop request for the message in flight, a probe with its magic.
            info = {DROP_REQUEST: struct.pack("!II", seq, seq + 20), 0x7FFF: struct.pack("!III", 0x6C75326B, seq, seq + 50)}
            extra = msgno if kind == DROP_REQUEST else 0
            for _ in range(5):
                relay.send("c->s", control(kind, dest_of(data), info.get(kind, b"\0" * 4), extra))
                relay.send("s->c", control(kind, dest_of(relay.last["s->c", ACK]), info.get(kind, b"\0" * 4), extra))
        return [data]

    o = await _run(forge)
    _clean(o)
    assert o.auth["forged"] >= 10


async def test_dropping_everything_is_a_denial_of_service_that_ends_in_timeouts() -> None:
    """What no authentication can stop: an attacker on the path drops all of A's data.  The
    messages fail TIMED_OUT, or NO_ROUTE if never sent (each once, none hangs); when the path
    heals, traffic resumes."""
    def blackhole(relay: UdpRelay, direction: str, data: bytes) -> list[bytes]:
        return [] if direction == "c->s" and kind_of(data) == "data" and relay.data_packets("c->s") >= START else [data]

    o = await _run(blackhole, transaction_timeout=3.0, resets=True)
    assert o.during[Status.TIMED_OUT] > 0 and o.auth["forged"] == 0
