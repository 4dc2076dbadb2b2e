"""A bounded, seeded network fuzzer for a live lu2kd's listeners (used by tests/test_fuzz_live.py).

What it sends, per backend:

* **tcp** -- short connections carrying random bytes, real HELLO frames (built with
  :mod:`lu2k.wire`) mutated or followed by garbage, truncated or cut-short hellos, frame
  headers announcing huge payloads, stripe JOINs with wrong ids, slow senders that stop
  mid-frame and hold the connection, abrupt resets;
* **udt** -- random datagrams, UDT-shaped packets, handshake requests with random fields,
  handshakes completed with the listener's cookie (a half-open connection each) and
  followed by junk, bursts of handshakes, and mutated or replayed copies of real packets;
  the crafted ones half without the packet trailer (a stranger's: dropped as forged) and
  half sealed with the net's packet key (a key holder's, which reach libudt);
* **quic** -- random datagrams, long and short headers over random bytes, Initials over
  random bytes, real ClientHello Initials (from aioquic's client) whole, mutated or in
  bursts, and mutated or replayed copies of real packets;
* **every backend** -- connections made with lu2k's own client side of the backend (so
  past TLS, or the udt preamble) that then send garbage before the hello, run the hello
  with a wrong key, or run it with the right key as a NID nobody uses and then send
  hostile frames (huge or truncated announcements, odd portals, ACK/NACK for unknown
  messages, a second hello).

"Real packets" are recorded by :class:`UdpRelay`, through which the test's legitimate peer
reaches the daemon.

Every case is built from its own ``random.Random`` seeded with (seed, backend, index), so a
seed and a count give the same inputs again (the X25519 and TLS exchanges of the
connection-making cases aside, which are fresh each time, as they must be).  At most
``max_open`` attack sockets are open at once, and every one is closed when its case ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from lu2k import wire
from lu2k.backends.base import Backend, BackendSettings, Transport
from lu2k.backends.tcp_stripes import JOIN, JOIN_MAGIC
from lu2k.errors import Lu2kError
from lu2k.nid import Nid, parse_nid
from lu2k.wire import ConnType, FrameType

CASES_ENV = "LU2K_LIVE_FUZZ_CASES"
SEED_ENV = "LU2K_LIVE_FUZZ_SEED"
INTERESTING_U32 = (0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF,
                   4 << 20, (4 << 20) + 1, 64 << 20, (64 << 20) + 1)


@dataclass(frozen=True)
class Budget:
    """How many cases per backend, and the seed they come from."""

    cases: int
    seed: int

    @classmethod
    def from_env(cls, default_cases: int) -> "Budget":
        cases = int(os.environ.get(CASES_ENV, default_cases))
        seed_text = os.environ.get(SEED_ENV)
        seed = int(seed_text) if seed_text else random.SystemRandom().randrange(1 << 32)
        if cases < 1:
            raise ValueError(f"{CASES_ENV} must be at least 1, got {cases}")
        return cls(cases, seed)


@dataclass
class Tally:
    """What the fuzzer did: cases by kind, bytes and datagrams sent, how cases ended."""

    kinds: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    datagrams: int = 0
    connections: int = 0
    max_open: int = 0
    elapsed: float = 0.0

    @property
    def cases(self) -> int:
        return sum(self.kinds.values())

    def summary(self) -> str:
        rate = self.cases / self.elapsed if self.elapsed else 0.0
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return (f"{self.cases} cases in {self.elapsed:.1f} s ({rate:.0f}/s): {kinds}; {self.connections} connections, "
                f"{self.datagrams} datagrams, {self.bytes_sent} bytes, at most {self.max_open} sockets open; outcomes: {outcomes}")


def case_rng(seed: int, backend: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{backend}:{index}")


def pick(rnd: random.Random, weights: dict[str, int]) -> str:
    return rnd.choices(list(weights), weights=list(weights.values()))[0]


# --- mutations ----------------------------------------------------------------------------------------


def mutate(rnd: random.Random, data: bytes, others: list[bytes] | None = None) -> bytes:
    """One to four random edits of ``data``: bit flips, byte sets, inserts, deletes, a cut,
    a repeated slice, an interesting 32-bit value (either byte order), a splice with another."""
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(8)
        n = len(out)
        if op == 0 and n:
            i = rnd.randrange(n)
            out[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and n:
            out[rnd.randrange(n)] = rnd.randrange(256)
        elif op == 2:
            i = rnd.randint(0, n)
            out[i:i] = rnd.randbytes(rnd.randint(1, 64))
        elif op == 3 and n > 1:
            i = rnd.randrange(n)
            del out[i : i + rnd.randint(1, 64)]
        elif op == 4 and n > 1:
            del out[rnd.randrange(n) :]
        elif op == 5 and n:
            i = rnd.randrange(n)
            piece = out[i : i + rnd.randint(1, 128)]
            j = rnd.randint(0, n)
            out[j:j] = piece * rnd.randint(1, 4)
        elif op == 6 and n >= 4:
            i = rnd.randrange(n - 3) & ~3 if rnd.random() < 0.7 else rnd.randrange(n - 3)
            out[i : i + 4] = struct.pack(rnd.choice("<>") + "I", rnd.choice(INTERESTING_U32))
        elif op == 7 and others:
            other = rnd.choice(others)
            cut = rnd.randint(0, n)
            out = out[:cut] + other[rnd.randint(0, len(other)) :]
    return bytes(out)


# --- tcp: bytes of hellos and frames ------------------------------------------------------------------


def hello_frame(rnd: random.Random, backend: str, src: Nid, dst: Nid) -> bytes:
    """A well-formed HELLO from a connector, its nonce and ephemeral key from ``rnd``."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = X25519PrivateKey.from_private_bytes(rnd.randbytes(32)).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    features = rnd.choice((wire.FEATURE_SEALED, wire.FEATURE_SEALED | wire.FEATURE_NIDS, 0, rnd.randrange(256)))
    body = wire.HELLO_BODY.pack(rnd.randrange(3), features, wire.PROTOCOL_VERSION, backend.encode().ljust(16, b"\0"),
                                src.to_bytes(), dst.to_bytes(), rnd.getrandbits(64), rnd.randbytes(32), public)
    return wire.encode_frame(FrameType.HELLO, body)


def hostile_header(rnd: random.Random) -> bytes:
    """A frame header of any type, its checksum right (mostly), announcing a payload of a
    size from nothing to 4 GiB; now and then an unknown type or another protocol version."""
    ftype = rnd.choice(list(FrameType))
    body = rnd.randbytes(wire.BODIES[ftype].size)
    payload_len = rnd.choice((0, 1, rnd.randrange(1 << 16), 4 << 20, (4 << 20) + 1, 64 << 20, (64 << 20) + 1, 0xFFFFFFFF))
    flags = rnd.choice((0, wire.FLAG_PAYLOAD_CRC, wire.FLAG_MSG_ID, rnd.randrange(1 << 16)))
    version = wire.PROTOCOL_VERSION if rnd.random() < 0.9 else rnd.randrange(256)
    header = bytearray(wire.encode_header(ftype, body, payload_len, flags=flags, version=version))
    if rnd.random() < 0.1:
        header[5] = rnd.choice((0, 11, 255))  # unknown type
    if rnd.random() < 0.1:
        header[12] ^= 1 << rnd.randrange(8)  # checksum
    return bytes(header)


def hostile_frames(rnd: random.Random, src: Nid, dst: Nid) -> list[tuple[bytes, bytes]]:
    """What a peer holding the key might send after its hello, as (header, payload) pairs
    (messages among them, to the test's receiver too: it tells them apart by their source)."""
    out: list[tuple[bytes, bytes]] = []
    for _ in range(rnd.randint(1, 6)):
        kind = rnd.randrange(8)
        if kind == 0:  # a message to a portal nobody listens on, or to ours with a wrong checksum
            payload = rnd.randbytes(rnd.choice((0, 10, 1000, 30_000)))
            portal = rnd.choice((5, 77, 0xFFFFFFFF, 0))  # 0: the test's receiver, which sees it comes from ``src``
            out.append((wire.encode_msg_header(rnd.getrandbits(40), src.to_bytes(), dst.to_bytes(), rnd.randrange(4), portal,
                                               payload, rnd.random() < 0.5), payload))
        elif kind == 1:
            out.append((hostile_header(rnd), rnd.randbytes(rnd.randrange(64))))
        elif kind == 2:
            n = rnd.randint(0, 40)
            out.append((wire.encode_header(FrameType.ACK, wire.ACK_BODY.pack(n), n * wire.ACK_ENTRY.size),
                        b"".join(wire.ACK_ENTRY.pack(rnd.getrandbits(64), rnd.randrange(1 << 16)) for _ in range(n))))
        elif kind == 3:
            out.append((wire.encode_frame(FrameType.NACK, wire.NACK_BODY.pack(rnd.getrandbits(64), rnd.randrange(64)), b"why"), b""))
        elif kind == 4:
            out.append((wire.encode_frame(FrameType.PING, wire.PING_BODY.pack(rnd.getrandbits(64))), b""))
        elif kind == 5:
            out.append((hello_frame(rnd, "tcp", src, dst), b""))  # a second hello
        elif kind == 6:  # a message header whose payload never all comes (the case ends first)
            # Kept well under the largest message: a key holder may make the daemon hold a
            # payload buffer per stalled message (its budget is per connection), which is
            # not what this measures.
            header = wire.encode_header(FrameType.MSG, wire.MSG_BODY.pack(rnd.getrandbits(40), src.to_bytes(), dst.to_bytes(), 1,
                                                                          rnd.choice((0, 1)), 0), rnd.choice((20_000, 64 << 10)))
            out.append((header, rnd.randbytes(rnd.randrange(4096))))
            break
        else:
            out.append((mutate(rnd, wire.encode_frame(FrameType.PONG, b"")), b""))
    return out


# --- tcp: sending -------------------------------------------------------------------------------------


@dataclass
class TcpCase:
    kind: str
    chunks: list[bytes]
    pause: float = 0.0  # between chunks
    end: str = "close"  # close | reset | hold | drain
    hold: float = 0.0


TCP_WEIGHTS = {"junk": 12, "junk_magic": 6, "hello_mutated": 16, "hello_garbage": 8, "hello_cut": 8, "huge_header": 10,
               "slow": 4, "reset": 8, "join": 6, "wrong_auth": 6}


def tcp_case(rnd: random.Random, backend: str, src: Nid, dst: Nid) -> TcpCase:
    kind = pick(rnd, TCP_WEIGHTS)
    end = rnd.choice(("close", "close", "reset", "drain", "hold"))
    hold = rnd.uniform(0.05, 1.5)
    hello = hello_frame(rnd, backend, src, dst)
    if kind == "junk":
        chunks = [rnd.randbytes(rnd.choice((1, 15, 16, 17, rnd.randrange(4096), rnd.randrange(64 << 10))))]
    elif kind == "junk_magic":
        chunks = [struct.pack("<I", wire.MAGIC) + rnd.randbytes(rnd.randrange(200))]
    elif kind == "hello_mutated":
        chunks = [mutate(rnd, hello)]
    elif kind == "hello_garbage":
        chunks = [hello + rnd.randbytes(rnd.randrange(1, 2048))]
    elif kind == "hello_cut":
        chunks = [hello[: rnd.randrange(len(hello))]]
    elif kind == "huge_header":
        header = hostile_header(rnd)
        chunks = [header + rnd.randbytes(rnd.choice((0, 0, 10, 4000)))]
        if rnd.random() < 0.3:
            chunks = [hello, header]
    elif kind == "slow":
        data = rnd.choice((hello, hostile_header(rnd), hello + hostile_header(rnd)))
        stop = rnd.randrange(1, len(data))
        chunks = []
        pos = 0
        while pos < stop:
            n = rnd.randint(1, 16)
            chunks.append(data[pos : min(stop, pos + n)])
            pos += n
        return TcpCase(kind, chunks[:12], pause=rnd.uniform(0.005, 0.05), end=rnd.choice(("hold", "reset")), hold=hold)
    elif kind == "reset":
        chunks = [rnd.randbytes(rnd.randrange(40))] if rnd.random() < 0.5 else [hello[: rnd.randrange(len(hello))]]
        end = "reset"
    elif kind == "join":
        join = JOIN.pack(JOIN_MAGIC, rnd.choice((1, 1, 2, 255)), rnd.randrange(20), rnd.randbytes(16))
        chunks = [rnd.choice((join, mutate(rnd, join), join[: rnd.randrange(1, len(join))], join + hello))]
    else:  # wrong_auth: a whole hello, then an AUTH whose MAC is made up (the daemon's reply is not read)
        chunks = [hello, wire.encode_frame(FrameType.AUTH, rnd.randbytes(32))]
        end = "drain"
    return TcpCase(kind, [c for c in chunks if c], end=end, hold=hold)


async def run_tcp_case(case: TcpCase, address: tuple[str, int], tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), 5)
        except (OSError, asyncio.TimeoutError) as e:
            tally.outcomes[f"connect failed ({type(e).__name__})"] += 1
            return
        tally.connections += 1
        try:
            for i, chunk in enumerate(case.chunks):
                if i and case.pause:
                    await asyncio.sleep(case.pause)
                await asyncio.wait_for(loop.sock_sendall(sock, chunk), 5)
                tally.bytes_sent += len(chunk)
            if case.end == "hold":
                await asyncio.sleep(case.hold)
            elif case.end == "drain":
                sock.shutdown(socket.SHUT_WR)
                with contextlib.suppress(asyncio.TimeoutError):
                    while await asyncio.wait_for(loop.sock_recv(sock, 4096), 2):
                        pass
            tally.outcomes["sent"] += 1
        except (OSError, asyncio.TimeoutError):
            tally.outcomes["closed by the daemon"] += 1  # refused part-way: what it should do
        if case.end == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


# --- udp: udt and quic packets ------------------------------------------------------------------------


class UdpRelay(asyncio.DatagramProtocol):
    """Forwards one peer's datagrams to ``target`` and back, recording a sample of them (the
    first ``keep`` each way): the fuzzer's copies of real packets."""

    def __init__(self, target: tuple[str, int], keep: int = 400) -> None:
        self.target = target
        self.keep = keep
        self.to_target: list[bytes] = []
        self.from_target: list[bytes] = []
        self.client: tuple[str, int] | None = None
        self.forwarded: Counter[str] = Counter()  # datagrams each way, and errors
        self._front: asyncio.DatagramTransport | None = None
        self._back: asyncio.DatagramTransport | None = None

    async def start(self, host: str) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        front, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, 0))
        self._front = front  # type: ignore[assignment]
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if len(relay.from_target) < relay.keep:
                    relay.from_target.append(data)
                if relay.client is not None and relay._front is not None:
                    relay._front.sendto(data, relay.client)
                    relay.forwarded["from target"] += 1

            def error_received(self, exc: Exception) -> None:
                relay.forwarded[f"back: {exc}"] += 1

        back, _ = await loop.create_datagram_endpoint(Back, local_addr=(host, 0))
        self._back = back  # type: ignore[assignment]
        return front.get_extra_info("sockname")[:2]  # type: ignore[no-any-return]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.client = addr
        if len(self.to_target) < self.keep:
            self.to_target.append(data)
        if self._back is not None:
            self._back.sendto(data, self.target)
            self.forwarded["to target"] += 1

    def error_received(self, exc: Exception) -> None:
        self.forwarded[f"front: {exc}"] += 1

    def close(self) -> None:
        for t in (self._front, self._back):
            if t is not None:
                t.close()


UDT_HANDSHAKE = struct.Struct("!IIII iiiiiiii 16s")  # UDT 4 control header, then CHandShake


def udt_handshake(rnd: random.Random, request: int, cookie: int = 0, sane: bool = True, socket_id: int | None = None) -> bytes:
    def field_(lo: int, hi: int) -> int:
        return rnd.randint(lo, hi) if sane or rnd.random() < 0.5 else rnd.choice((0, -1, -(1 << 31), (1 << 31) - 1, 100_000_000, 44))

    return UDT_HANDSHAKE.pack(0x80000000, 0, rnd.getrandbits(32), 0, 4 if sane or rnd.random() < 0.8 else rnd.randrange(8),
                              2 if sane or rnd.random() < 0.8 else rnd.randrange(4), rnd.randrange(1 << 31), field_(576, 1500),
                              field_(32, 8000), request, socket_id if socket_id is not None else rnd.randrange(1, 1 << 31),
                              cookie, socket.inet_aton("127.0.0.2") + bytes(12))


UDT_WEIGHTS = {"random": 12, "udt_shaped": 10, "handshake_request": 12, "handshake_complete": 12, "handshake_burst": 4,
               "capture_mutated": 16, "capture_replayed": 6}
QUIC_WEIGHTS = {"random": 10, "long_header": 10, "short_header": 10, "junk_initial": 14, "real_initial": 8,
                "real_initial_mutated": 10, "initial_burst": 3, "capture_mutated": 16, "capture_replayed": 6}


def quic_client_initial(rnd: random.Random) -> bytes:
    """The first datagram of a real QUIC client: a ClientHello (offering ALPN lu2k) in an Initial."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    config = QuicConfiguration(is_client=True, alpn_protocols=[rnd.choice(("lu2k", "h3", "lu2k"))])
    c = QuicConnection(configuration=config)
    c.connect(("127.0.0.1", 9), now=time.monotonic())
    return c.datagrams_to_send(now=time.monotonic())[0][0]


def quic_long_header(rnd: random.Random, packet_type: int | None = None) -> bytes:
    first = 0xC0 | ((rnd.randrange(4) if packet_type is None else packet_type) << 4) | rnd.randrange(16)
    version = rnd.choice((1, 1, 1, 0x6B3343CF, 0, 0xFF00001D, rnd.getrandbits(32)))
    dcid, scid = rnd.randbytes(rnd.choice((0, 4, 8, 20, 21))), rnd.randbytes(rnd.choice((0, 8, 20)))
    head = bytes([first]) + struct.pack("!I", version) + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
    body = rnd.randbytes(rnd.choice((0, 20, 1200, 1300, 1400)))
    if packet_type == 0:  # Initial: empty token, then a 2-byte length
        body = b"\x00" + struct.pack("!H", 0x4000 | min(len(body), 0x3FFF)) + body
    return head + body


@dataclass
class UdpCase:
    kind: str
    datagrams: list[bytes]
    complete_handshake: bool = False  # udt: answer the cookie, then send ``after``
    after: list[bytes] = field(default_factory=list)
    sealed: bool = False  # udt: sent as a holder of the network key (the packet trailer) would


def udp_case(rnd: random.Random, backend: str, captured: list[bytes]) -> UdpCase:
    kind = pick(rnd, UDT_WEIGHTS if backend == "udt" else QUIC_WEIGHTS)
    if kind in ("capture_mutated", "capture_replayed") and not captured:
        kind = "random"
    if kind == "random":
        return UdpCase(kind, [rnd.randbytes(rnd.choice((0, 1, 16, 44, 64, rnd.randrange(1500), rnd.randrange(9000))))])
    if kind == "capture_mutated":
        return UdpCase(kind, [mutate(rnd, rnd.choice(captured), captured)])
    if kind == "capture_replayed":
        return UdpCase(kind, [rnd.choice(captured)])
    if backend == "udt":
        if kind == "udt_shaped":
            word0 = (0x80000000 | (rnd.choice((0, 1, 2, 3, 4, 5, 6, 7, 0x7FFF, rnd.randrange(1 << 15))) << 16)) if rnd.random() < 0.8 \
                else rnd.getrandbits(31)
            dst = rnd.choice((0, 0, rnd.getrandbits(32)))
            return UdpCase(kind, [struct.pack("!IIII", word0, rnd.getrandbits(32), rnd.getrandbits(32), dst) + rnd.randbytes(rnd.randrange(1500))],
                           sealed=rnd.random() < 0.5)
        if kind == "handshake_request":
            return UdpCase(kind, [udt_handshake(rnd, rnd.choice((1, 1, 0, -1, -2)), rnd.getrandbits(31), sane=rnd.random() < 0.5)],
                           sealed=rnd.random() < 0.5)
        if kind == "handshake_burst":
            return UdpCase(kind, [udt_handshake(rnd, 1, 0, sane=True) for _ in range(rnd.randint(10, 60))], sealed=rnd.random() < 0.5)
        # handshake_complete: a half-open connection, then a preamble-shaped or random message, or nothing
        after = rnd.choice(([], [b"LU2KUDT\x01" + rnd.randbytes(36)], [rnd.randbytes(rnd.randrange(200))]))
        return UdpCase(kind, [udt_handshake(rnd, 1, 0, sane=rnd.random() < 0.8)], complete_handshake=True, after=after,
                       sealed=rnd.random() < 0.8)
    if kind == "long_header":
        return UdpCase(kind, [quic_long_header(rnd)])
    if kind == "short_header":
        dcid = rnd.choice(captured)[1:5] if captured and rnd.random() < 0.5 else rnd.randbytes(4)
        return UdpCase(kind, [bytes([0x40 | rnd.randrange(64)]) + dcid + rnd.randbytes(rnd.randrange(20, 1400))])
    if kind == "junk_initial":
        return UdpCase(kind, [quic_long_header(rnd, 0) + rnd.randbytes(rnd.choice((0, 1200)))])
    if kind == "real_initial":
        return UdpCase(kind, [quic_client_initial(rnd)])
    if kind == "real_initial_mutated":
        return UdpCase(kind, [mutate(rnd, quic_client_initial(rnd))])
    return UdpCase(kind, [quic_client_initial(rnd) if rnd.random() < 0.5 else quic_long_header(rnd, 0) + rnd.randbytes(1200)
                          for _ in range(rnd.randint(5, 30))])


async def run_udp_case(case: UdpCase, address: tuple[str, int], tally: Tally, sock: socket.socket, rnd: random.Random,
                       packet_auth: Any = None) -> None:
    """Send a udt or quic case; ``packet_auth`` (udt: ``_udtcore.PacketAuth`` under the net's
    packet key) seals a sealed case's packets and opens the answers."""
    loop = asyncio.get_running_loop()
    keyed = case.sealed and packet_auth is not None

    def out(d: bytes) -> bytes:
        return bytes(packet_auth.seal(d)) if keyed else d

    async def answer() -> bytes:
        while True:  # a sealed exchange skips what does not open (keep-alives of earlier cases' sockets)
            data = await asyncio.wait_for(loop.sock_recv(sock, 2048), 1)
            if not keyed:
                return data
            opened = packet_auth.open(data)
            if opened is not None:
                return bytes(opened)

    for d in case.datagrams:
        try:
            await loop.sock_sendto(sock, out(d), address)
        except OSError:
            tally.outcomes["send failed"] += 1
            continue
        tally.datagrams += 1
        tally.bytes_sent += len(d)
    if not case.complete_handshake:
        tally.outcomes["sent"] += 1
        return
    # udt: the listener answers a request with its cookie; echo it back as the response
    # (same socket id) and a half-open UDT connection exists on the daemon.
    try:
        reply = await answer()
    except (asyncio.TimeoutError, OSError):
        tally.outcomes["no cookie"] += 1
        return
    if len(reply) < UDT_HANDSHAKE.size:
        tally.outcomes["no cookie"] += 1
        return
    fields = list(UDT_HANDSHAKE.unpack_from(reply))
    fields[3] = 0  # to the listener (socket 0), not to the socket id the reply was addressed to
    fields[9] = -1  # request type: response
    response = UDT_HANDSHAKE.pack(*fields)
    await loop.sock_sendto(sock, out(response), address)
    tally.datagrams += 1
    try:
        accepted = await answer()
    except (asyncio.TimeoutError, OSError):
        tally.outcomes["handshake refused"] += 1
        return
    tally.outcomes["half-open made"] += 1
    if len(accepted) >= UDT_HANDSHAKE.size and case.after:
        their_id = UDT_HANDSHAKE.unpack_from(accepted)[10]
        isn = fields[6]
        for i, payload in enumerate(case.after):  # a solo message in order: boundary bits 11, in-order bit
            header = struct.pack("!IIII", (isn + i) & 0x7FFFFFFF, (3 << 30) | (1 << 29) | (i + 1), 0, their_id & 0xFFFFFFFF)
            await loop.sock_sendto(sock, out(header + payload), address)
            tally.datagrams += 1


# --- every backend: lu2k's own client side, then hostile --------------------------------------------


CONNECT_WEIGHT = {"tcp": 6, "udt": 6, "quic": 6}  # of 100: cases that make a whole connection
CONNECT_KINDS = {"pre_hello_junk": 3, "wrong_key": 2, "hello_then_hostile": 5}


async def run_connect_case(rnd: random.Random, kind: str, clients: dict[str, Backend], address: tuple[str, int], src: Nid,
                           dst: Nid, key: bytes, tally: Tally) -> None:
    """One connection made by lu2k's own client side of the backend: garbage before the
    hello, a hello with the wrong key, or a hello as ``src`` then hostile frames."""
    client = clients["wrong" if kind == "wrong_key" else "right"]
    try:
        t: Transport = await client.connect(address[0], address[1], rnd.choice(list(ConnType)), 5.0)
    except Lu2kError as e:
        tally.outcomes[f"connect failed ({type(e).__name__})"] += 1
        return
    tally.connections += 1
    try:
        if kind == "pre_hello_junk":
            frames = [(rnd.choice((hostile_header(rnd), rnd.randbytes(rnd.randrange(1, 300)), mutate(rnd, hello_frame(rnd, client.name, src, dst)))),
                       b"") for _ in range(rnd.randint(1, 3))]
            await t.send(frames)
            answer = await asyncio.wait_for(t.recv(), 3)
            tally.outcomes[f"answered with {answer[0].header.type.name}" if answer else "answered"] += 1
            return
        hello = wire.HelloInitiator(key=key if kind != "wrong_key" else b"not-the-network-key-0123456789", backend=client.name, src=src,
                                    dst=dst, conn_type=ConnType.ANY, incarnation=rnd.getrandbits(64), sealed=client.seal_frames,
                                    channel_binding=t.channel_binding)
        await t.send([(hello.start(), b"")])
        while not hello.done:
            for f in await asyncio.wait_for(t.recv(), 5):
                reply = hello.receive(f)
                if reply is not None:
                    await t.send([(reply, b"")])
        assert hello.result is not None
        t.on_hello_done(hello.result)
        tally.outcomes["hello done"] += 1
        await t.send(hostile_frames(rnd, src, dst))
        if rnd.random() < 0.5:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(t.recv(), rnd.uniform(0.05, 1.0))
        tally.outcomes["hostile frames sent"] += 1
    except (Lu2kError, asyncio.TimeoutError, ValueError) as e:
        tally.outcomes[f"ended: {type(e).__name__}"] += 1
    finally:
        t.close()


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class Target:
    """The daemon under attack and what the fuzzer needs to know about it."""

    backend: str
    address: tuple[str, int]
    nid: Nid
    key: bytes
    options: dict[str, Any] = field(default_factory=dict)  # for the client side (quic: no ca)
    captured: list[bytes] = field(default_factory=list)
    fake_nids: list[Nid] = field(default_factory=list)


def _client(target: Target, key: bytes) -> Backend:
    from lu2k.backends import get_backend

    settings = BackendSettings(target.nid.net, 0, 4 << 20, key=key, options=dict(target.options))
    return get_backend(target.backend)(settings)


CASE_TIMEOUT = 30.0  # s: a case still running then is ended (and counted): the run must finish
UDP_CASE_RATE = 500.0  # udt/quic cases started per second at most: a flood the daemon reads, not a full socket buffer


async def fuzz(target: Target, budget: Budget, *, max_open: int = 48, udp_sockets: int = 16, udp_rate: float = UDP_CASE_RATE,
               progress: Callable[[int], Awaitable[None]] | None = None) -> Tally:
    """Send ``budget.cases`` cases at ``target``, at most ``max_open`` sockets at a time
    (udt and quic: at most ``udp_rate`` cases a second)."""
    tally = Tally()
    slots = asyncio.Semaphore(max_open)
    open_now = 0
    tasks: set[asyncio.Task[None]] = set()
    udp_pool: list[socket.socket] = []
    if target.backend != "tcp":
        for _ in range(udp_sockets):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            udp_pool.append(s)
    free_udp: asyncio.Queue[socket.socket] = asyncio.Queue()
    for s in udp_pool:
        free_udp.put_nowait(s)
    clients = {"right": _client(target, target.key), "wrong": _client(target, b"not-the-network-key-0123456789")}
    packet_auth: Any = None
    if target.backend == "udt":
        from lu2k.backends import _udtcore, udt_proto

        packet_auth = _udtcore.PacketAuth(udt_proto.packet_key(target.key))
    start = time.monotonic()

    async def one(index: int) -> None:
        nonlocal open_now
        open_now += 1
        tally.max_open = max(tally.max_open, open_now)
        try:
            await asyncio.wait_for(case(index), CASE_TIMEOUT)
        except asyncio.TimeoutError:
            tally.outcomes["case timed out"] += 1
        finally:
            open_now -= 1
            slots.release()

    async def case(index: int) -> None:
        rnd = case_rng(budget.seed, target.backend, index)
        try:
            if rnd.randrange(100) < CONNECT_WEIGHT[target.backend]:
                kind = pick(rnd, CONNECT_KINDS)
                tally.kinds[f"connect:{kind}"] += 1
                await run_connect_case(rnd, kind, clients, target.address, rnd.choice(target.fake_nids), target.nid, target.key, tally)
            elif target.backend == "tcp":
                case = tcp_case(rnd, target.backend, rnd.choice(target.fake_nids), target.nid)
                tally.kinds[case.kind] += 1
                await run_tcp_case(case, target.address, tally)
            else:
                ucase = udp_case(rnd, target.backend, target.captured)
                tally.kinds[ucase.kind] += 1
                sock = await free_udp.get()
                try:
                    await run_udp_case(ucase, target.address, tally, sock, rnd, packet_auth)
                    if ucase.complete_handshake:  # drain late answers so the next case reads its own
                        with contextlib.suppress(BlockingIOError, OSError):
                            while sock.recv(4096):
                                pass
                finally:
                    free_udp.put_nowait(sock)
        except Exception as e:  # a bug in the fuzzer itself must not pass for a finding
            tally.outcomes[f"fuzzer error {type(e).__name__}: {e}"] += 1

    try:
        for index in range(budget.cases):
            await slots.acquire()
            task = asyncio.ensure_future(one(index))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if target.backend != "tcp":
                ahead = start + (index + 1) / udp_rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if progress is not None and index % 10_000 == 9_999:
                await progress(index + 1)
        while tasks:
            await asyncio.gather(*list(tasks))
    finally:
        for c in clients.values():
            await c.close()
        for s in udp_pool:
            s.close()
        tally.elapsed = time.monotonic() - start
    return tally


def fake_nids(net: str, count: int = 4) -> list[Nid]:
    """NIDs on the daemon's net that no daemon has: who the authenticated cases claim to be."""
    return [parse_nid(f"127.0.0.{50 + i}@{net}") for i in range(count)]

