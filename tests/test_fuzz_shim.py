"""Hypothesis fuzzing of what a local application controls on the shim: control packets,
command arguments and its shared region.

Properties:

* the control-packet decoders (:func:`~lu2k.kernel_shim.abi.decode_request`,
  ``decode_reply``, ``decode_reason``) on arbitrary and mutated packets of every command
  either decode what was encoded or raise :class:`~lu2k.errors.ShimError` with the errno the
  ABI documents -- never another exception;
* the layout an ATTACH reply carries and the region header: only ``ShimError(EPROTO)``, and a
  layout that is accepted has every part inside the region, without overlap;
* a real :class:`~lu2k.kernel_shim.server.ShimServer` (on its own loop in a thread, a real
  ``SOCK_SEQPACKET`` socket) answers every packet -- arbitrary bytes, mutated requests, each
  command with arbitrary argument fields -- with the errno a model of the ABI predicts and a
  reason, then serves the next valid request on the same connection, while a witness
  endpoint on the same server keeps exchanging messages;
* the daemon's side of a port (:class:`~lu2k.kernel_shim.ports.PortLogic`, over a bytearray)
  under arbitrary writes into the region: only :class:`~lu2k.kernel_shim.abi.RingIndexError`,
  and only for an index the ABI rules out (the endpoint is then detached); every request it
  hands over names a TX slot it fits; once the application behaves again its requests go
  through.  The engine completing and delivering after the application corrupted a consumer
  index never gets an exception, and an impossible index is found within one ring's worth of
  writes.  With sane indices, each bad descriptor fails alone with ``INVALID`` naming its
  field and every descriptor gets exactly one completion.

CI runs a bounded number of cases per property (``LU2K_FUZZ_EXAMPLES``, default 300).  The
long run (10^6 cases each)::

    PYTHONPATH=$PWD python tests/fuzz_long.py --cases 1000000 --shard 50000 --jobs 2 --log fuzz-shim.jsonl tests/test_fuzz_shim.py
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lu2k.errors import ShimError, Status
from lu2k.kernel_shim import abi
from lu2k.kernel_shim.abi import RingIndexError
from lu2k.kernel_shim.endpoint import Endpoint
from lu2k.kernel_shim.loopback import LoopbackThread
from lu2k.kernel_shim.ports import PortLogic, SendRequest
from lu2k.kernel_shim.ring import RingConsumer, RingProducer, SlotPool
from lu2k.kernel_shim.server import ShimConfig
from lu2k.nid import NID_SIZE, parse_nid

EXAMPLES = int(os.environ.get("LU2K_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LO = parse_nid("0@lo").to_bytes()
MASK32 = 0xFFFFFFFF
COMMANDS = sorted(abi.COMMANDS)
REQUEST_ERRNOS = {errno.EINVAL, errno.ENOTTY}

# --- packets ---------------------------------------------------------------------------------


def _command_numbers() -> st.SearchStrategy[int]:
    """Real commands, their numbers with another direction/size/type, and any u32."""
    near = st.builds(lambda d, t, nr, size: (d << abi.IOC_DIRSHIFT) | (t << abi.IOC_TYPESHIFT) | nr | (size << abi.IOC_SIZESHIFT),
                     st.integers(0, 3), st.sampled_from([abi.IOC_TYPE, abi.IOC_TYPE, 0, 255]),
                     st.sampled_from([1, 2, 3, 4, 0, 5, 255]),
                     st.one_of(st.sampled_from(sorted({abi.ioc_size(c) for c in COMMANDS})), st.integers(0, (1 << abi.IOC_SIZEBITS) - 1)))
    return st.one_of(st.sampled_from(COMMANDS), near, st.integers(0, MASK32))


def _valid_requests() -> st.SearchStrategy[bytes]:
    def request(cmd: int, seq: int, arg: bytes) -> bytes:
        size = abi.ioc_size(cmd)
        return abi.encode_request(cmd, seq, arg[:size].ljust(size, b"\0"))

    return st.builds(request, st.sampled_from(COMMANDS), st.integers(0, MASK32), st.binary(max_size=abi.ATTACH.size))


@dataclass(frozen=True)
class Edit:
    how: str  # "set", "insert", "delete", "truncate", "append"
    pos: int
    value: int


_edits = st.lists(st.builds(Edit, st.sampled_from(["set", "set", "insert", "delete", "truncate", "append"]),
                            st.integers(0, 1 << 16), st.integers(0, 255)), max_size=3)


def _apply(data: bytes, edits: list[Edit]) -> bytes:
    for e in edits:
        pos = e.pos % (len(data) + 1)
        if e.how == "set" and data:
            pos %= len(data)
            data = data[:pos] + bytes([e.value]) + data[pos + 1 :]
        elif e.how == "insert":
            data = data[:pos] + bytes([e.value]) + data[pos:]
        elif e.how == "delete":
            data = data[:pos] + data[pos + 1 :]
        elif e.how == "truncate":
            data = data[:pos]
        elif e.how == "append":
            data = data + bytes([e.value]) * (1 + e.pos % 64)
    return data


def _packets() -> st.SearchStrategy[bytes]:
    """Control packets: arbitrary bytes, any command number with any argument, mutated valid requests."""
    any_cmd = st.builds(lambda cmd, seq, arg: abi.CTL_HDR.pack(cmd, seq) + arg,
                        _command_numbers(), st.integers(0, MASK32), st.binary(max_size=abi.ATTACH.size + 8))
    return st.one_of(st.binary(max_size=64), any_cmd, st.builds(_apply, _valid_requests(), _edits))


def _model_request_error(packet: bytes) -> int:
    """The errno decode_request must give ``packet``, from the ABI's description alone (0: valid)."""
    if len(packet) < abi.CTL_HDR.size:
        return errno.EINVAL
    cmd = int.from_bytes(packet[:4], "little")
    if cmd not in abi.COMMANDS:
        same_command = (cmd >> abi.IOC_TYPESHIFT) & 0xFF == abi.IOC_TYPE and cmd & 0xFF in {c & 0xFF for c in COMMANDS}
        return errno.EINVAL if same_command else errno.ENOTTY
    return 0 if len(packet) - abi.CTL_HDR.size == (cmd >> abi.IOC_SIZESHIFT) & 0x3FFF else errno.EINVAL


@FUZZ
@given(_packets())
def test_decode_request_gives_the_request_or_einval_enotty(packet: bytes) -> None:
    want = _model_request_error(packet)
    try:
        cmd, seq, arg = abi.decode_request(packet)
    except ShimError as e:
        assert e.code in REQUEST_ERRNOS and e.code == want, (e, want)
        assert str(e)
        return
    assert want == 0
    assert cmd in abi.COMMANDS and len(arg) == abi.ioc_size(cmd)
    assert abi.encode_request(cmd, seq, arg) == packet


def _replies() -> st.SearchStrategy[bytes]:
    valid = st.builds(lambda cmd, seq, err, reason, arg: abi.encode_reply(cmd, seq, err, reason, arg),
                      _command_numbers(), st.integers(0, MASK32), st.integers(-(1 << 31), (1 << 31) - 1),
                      st.text(max_size=150), st.binary(max_size=abi.ATTACH.size))
    return st.one_of(st.binary(max_size=abi.CTL_REPLY.size + 64), valid, st.builds(_apply, valid, _edits))


@FUZZ
@given(_replies())
def test_decode_reply_gives_the_reply_or_eproto(packet: bytes) -> None:
    try:
        cmd, seq, err, reason, arg = abi.decode_reply(packet)
    except ShimError as e:
        assert e.code == errno.EPROTO
        short = len(packet) < abi.CTL_REPLY.size
        assert short or int.from_bytes(packet[12:16], "little") != len(packet) - abi.CTL_REPLY.size
        return
    assert len(packet) == abi.CTL_REPLY.size + len(arg) == abi.CTL_REPLY.size + int.from_bytes(packet[12:16], "little")
    assert (cmd, seq, err) == struct.unpack_from("<IIi", packet)
    assert "\0" not in reason and len(reason.encode(errors="surrogatepass")) <= abi.REASON_LEN * 3  # U+FFFD for a bad byte


@FUZZ
@given(st.text(max_size=200), st.sampled_from([abi.REASON_LEN, abi.COMP_REASON_LEN, 1, 2, 3, 4, 5]), st.binary(max_size=200))
def test_reasons_are_cut_on_a_character_boundary_and_any_bytes_decode(text: str, size: int, raw: bytes) -> None:
    encoded = abi.encode_reason(text, size)
    assert len(encoded) == size and encoded[-1] == 0  # always NUL-terminated
    back = abi.decode_reason(encoded)
    assert text.split("\0", 1)[0].startswith(back)  # a prefix of what was said, never a broken character
    assert "\ufffd" not in back or "\ufffd" in text
    decoded = abi.decode_reason(raw)  # whatever an application or a daemon wrote: a str, never an exception
    assert isinstance(decoded, str) and "\0" not in decoded


# --- the layout an ATTACH reply carries --------------------------------------------------------


def _layouts() -> st.SearchStrategy[abi.Layout]:
    return st.builds(abi.build_layout, st.sampled_from([0, 100, 4096, 1 << 16, 1 << 20]),
                     st.sampled_from([0, abi.MIN_POOL_BYTES, 1 << 18]), st.sampled_from([0, abi.MIN_POOL_BYTES, 1 << 18]),
                     st.sampled_from([1, 8, 1024]))


def _parts(layout: abi.Layout) -> list[tuple[int, int, str]]:
    """Every byte range the layout names (pool classes separately), as (start, end, name)."""
    out = [(0, abi.HEADER_SIZE, "header")]
    for name, ring in zip(abi.RING_NAMES, layout.rings):
        out.append((ring.ctrl, ring.ctrl + abi.RING_CTRL_SIZE, f"{name} control"))
        out.append((ring.descs, ring.descs + ring.entries * ring.desc_size, f"{name} descriptors"))
    for label, pool in (("tx", layout.tx), ("rx", layout.rx)):
        out.extend((c.offset, c.end, f"{label} class {c.slot_size}") for c in pool.classes)
    return sorted(out)


def _layout_fields() -> list[tuple[int, str]]:
    """(offset, struct format) of every field of a packed LAYOUT."""
    out = [(0, "<Q"), (8, "<I"), (12, "<I")]
    for pool in range(2):
        p = 16 + pool * abi.POOL.size
        out += [(p, "<I"), (p + 4, "<I"), (p + 8, "<Q"), (p + 16, "<Q")]
        for c in range(abi.MAX_CLASSES):
            q = p + 24 + c * abi.POOL_CLASS.size
            out += [(q, "<Q"), (q + 8, "<I"), (q + 12, "<I")]
    for r in range(4):
        q = 16 + 2 * abi.POOL.size + r * abi.RING_OFF.size
        out += [(q, "<Q"), (q + 8, "<Q"), (q + 16, "<I"), (q + 20, "<I")]
    return out


LAYOUT_FIELDS = _layout_fields()
# The fields of the first three classes of each pool: the ones a built layout uses.
_CLASS_FIELDS = [i for i, (off, _f) in enumerate(LAYOUT_FIELDS) for pool in range(2)
                 if 0 <= off - (16 + pool * abi.POOL.size + 24) < 3 * abi.POOL_CLASS.size]
# A field moved a little (by a few bytes, a cache line, a page) or set to anything.
_field_edits = st.lists(st.tuples(st.one_of(st.integers(0, len(LAYOUT_FIELDS) - 1), st.sampled_from(_CLASS_FIELDS)), st.booleans(),
                                  st.one_of(st.integers(-4, 4), st.integers(-64, 64).map(lambda n: n * 64), st.integers(0, (1 << 64) - 1))),
                        max_size=3)


def _edit_fields(raw: bytes, edits: list[tuple[int, bool, int]]) -> bytes:
    out = bytearray(raw)
    for index, relative, value in edits:
        offset, fmt = LAYOUT_FIELDS[index]
        mask = (1 << (8 * struct.calcsize(fmt))) - 1
        old = struct.unpack_from(fmt, out, offset)[0]
        struct.pack_into(fmt, out, offset, (old + value if relative else value) & mask)
    return bytes(out)


@FUZZ
@given(_layouts(), _field_edits, _edits, st.binary(min_size=abi.LAYOUT.size, max_size=abi.LAYOUT.size),
       st.sampled_from([False, False, False, True]))
def test_layout_decoder_accepts_only_layouts_that_fit_the_region(layout: abi.Layout, field_edits: list[tuple[int, bool, int]],
                                                                 edits: list[Edit], noise: bytes, random_bytes: bool) -> None:
    raw = noise if random_bytes else _apply(_edit_fields(layout.pack(), field_edits), [Edit("set", e.pos, e.value) for e in edits])
    try:
        got = abi.Layout.unpack(raw)
    except ShimError as e:
        assert e.code == errno.EPROTO
        event("refused")
    else:
        event("accepted")
        assert abi.Layout.unpack(got.pack()) == got
        end = 0
        for start, stop, name in _parts(got):
            assert start >= end, f"{name} overlaps the part before it in an accepted layout: {got}"
            end = stop
        assert end <= got.region_size
        for pool in (got.tx, got.rx):
            assert all(pool.offset <= c.offset and c.end <= pool.offset + pool.size for c in pool.classes)
            assert max(c.slot_size for c in pool.classes) >= got.max_message_size
        for ring, desc in zip(got.rings, abi.DESC_STRUCTS):
            assert ring.desc_size == desc.size and ring.entries > 0 and ring.entries & (ring.entries - 1) == 0
        if got.region_size <= 1 << 20 and got.tx.slots + got.rx.slots <= 1 << 14:  # small enough to map here
            mem = memoryview(bytearray(got.region_size))
            for i, desc in enumerate(abi.DESC_STRUCTS):  # what an endpoint builds on it must accept it too
                side = RingProducer if i in (abi.RING_SUBMIT, abi.RING_RELEASE) else RingConsumer
                side(mem, got.rings[i], desc, abi.RING_NAMES[i]).release()
            SlotPool(got.tx)
            SlotPool(got.rx)
    header = abi.pack_region_header(layout)
    try:
        abi.check_region_header(_apply(header, [Edit("set", e.pos % len(header), e.value) for e in edits]), layout)
    except ShimError as e:
        assert e.code == errno.EPROTO


# --- a real server, over its socket ----------------------------------------------------------

WITNESS_PORTAL = 7
SERVER_CONFIG = dict(max_in_flight=8, max_message_size=1 << 16, tx_pool_bytes=abi.MIN_POOL_BYTES,
                     rx_pool_bytes=abi.MIN_POOL_BYTES, max_pool_bytes=1 << 18)


class _Errors(logging.Handler):
    """What the shim logs at ERROR (a failed command, a handler exception): there must be none."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@dataclass
class Shim:
    thread: LoopbackThread
    witness: Endpoint
    errors: _Errors
    sent: int = 0

    @property
    def path(self) -> str:
        return self.thread.server.path

    def witness_still_works(self) -> None:
        """The other endpoint on the server: a message to itself goes through, intact."""
        self.sent += 1
        payload = self.sent.to_bytes(8, "little") * 4
        self.witness.send(LO, payload, portal=WITNESS_PORTAL).result(30)
        m = self.witness.recv(30)
        assert m is not None and bytes(m.payload) == payload
        m.release()


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    path = str(tmp_path_factory.mktemp("shimfuzz") / "s.sock")
    errors = _Errors()
    logger = logging.getLogger("lu2k.shim")
    logger.addHandler(errors)
    with LoopbackThread(path, config=ShimConfig(**SERVER_CONFIG)) as thread:  # type: ignore[arg-type]
        witness = Endpoint.attach(path, WITNESS_PORTAL)
        try:
            yield Shim(thread, witness, errors)
        finally:
            witness.detach()
            logger.removeHandler(errors)


@dataclass
class Client:
    """One raw connection to the shim socket, and which portal it has attached (if any)."""

    sock: socket.socket
    portal: int | None = None
    seq: int = field(default=1 << 31)

    def call(self, packet: bytes) -> tuple[tuple[int, int, int, str, bytes], list[int]] | None:
        """Send one packet; the decoded reply and any descriptors it carried, or None on EOF."""
        self.sock.send(packet)
        data, anc, _flags, _addr = self.sock.recvmsg(abi.MAX_CTL_PACKET, socket.CMSG_SPACE(3 * 4))
        fds: list[int] = []
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array("i")
                a.frombytes(raw[: len(raw) - len(raw) % 4])
                fds.extend(a)
        if not data:
            return None
        return abi.decode_reply(data), fds

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


def _connect(path: str) -> Client:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(30)  # a hang guard, not a timing assertion
    s.connect(path)
    return Client(s)


def _model_reply(packet: bytes, portal: int | None) -> int:
    """The errno the server must answer ``packet`` with on a connection that has ``portal``
    attached (None: not attached), from the ABI's description alone."""
    if len(packet) > abi.MAX_CTL_PACKET:
        return errno.EINVAL
    err = _model_request_error(packet)
    if err:
        return err
    cmd = int.from_bytes(packet[:4], "little")
    if cmd == abi.CMD_INFO:
        return 0
    if cmd in (abi.CMD_DETACH, abi.CMD_STATS):
        return 0 if portal is not None else errno.ENOTCONN
    version, want_portal, flags, reserved, tx, rx = abi.ATTACH_IN.unpack_from(packet, abi.CTL_HDR.size)
    if version != abi.ABI_VERSION:
        return errno.EPROTO
    if flags or reserved:  # lu2k_shim.h: both "0"; a later revision may give them meaning
        return errno.EINVAL
    if portal is not None:
        return errno.EISCONN
    if want_portal == WITNESS_PORTAL:
        return errno.EADDRINUSE
    if max(tx, rx) > SERVER_CONFIG["max_pool_bytes"]:
        return errno.EINVAL
    return 0


def _exchange(shim: Shim, client: Client, packet: bytes) -> Client:
    """Send ``packet``, check the reply against the model, return the client to use next."""
    want = _model_reply(packet, client.portal)
    got = client.call(packet)
    if not packet:  # a zero-length packet reads as EOF: the server ends the session
        assert got is None
        client.sock.close()
        return _connect(shim.path)
    assert got is not None, f"no reply to {packet[:16].hex()}"
    (cmd, seq, err, reason, arg), fds = got
    event(f"reply {errno.errorcode.get(err, err) if err else abi.COMMANDS.get(cmd, 'OK')}")
    try:
        assert err == want, (packet[:40].hex(), err, reason, want)
        head = packet[:8] if len(packet) >= 8 else bytes(8)
        assert (cmd, seq) == struct.unpack("<II", head)  # the reply names the request it answers
        if err:
            assert reason and not arg and not fds
            return client
        command = abi.COMMANDS[cmd]
        if command == "ATTACH":
            assert len(fds) == 3 and len(arg) == abi.ATTACH.size
            in_raw, nid, max_in_flight, layout_raw = abi.ATTACH.unpack(arg)
            layout = abi.Layout.unpack(layout_raw)
            assert in_raw == packet[8 : 8 + abi.ATTACH_IN.size] and nid == LO and max_in_flight == SERVER_CONFIG["max_in_flight"]
            assert os.fstat(fds[0]).st_size == layout.region_size
            client.portal = abi.ATTACH_IN.unpack(in_raw)[1]
        elif command == "DETACH":
            assert not arg
            client.portal = None
        elif command == "INFO":
            version, portal, pid, _n, nid, _m, _f = abi.INFO.unpack(arg)
            assert (version, portal, pid, nid) == (abi.ABI_VERSION, client.portal or 0, os.getpid(), LO)
        else:
            assert len(arg) == abi.STATS.size
        return client
    finally:
        for fd in fds:
            os.close(fd)


@dataclass(frozen=True)
class Oversized:
    """A packet of ``size`` copies of one byte (kept as two numbers so a failure report stays short)."""

    size: int
    fill: int

    def packet(self) -> bytes:
        return bytes([self.fill]) * self.size


def _session(shim: Shim, packets: list[bytes | Oversized], attach_first: int | None) -> None:
    """One connection: maybe a valid ATTACH, the fuzzed packets, then a valid INFO, DETACH and
    a message through the witness endpoint -- the server served all of it."""
    shim.errors.records.clear()  # each case on its own, also while hypothesis shrinks
    client = _connect(shim.path)
    try:
        if attach_first is not None:
            client = _exchange(shim, client, _attach_packet(client.next_seq(), attach_first))
            assert client.portal == attach_first
        for packet in packets:
            client = _exchange(shim, client, packet.packet() if isinstance(packet, Oversized) else packet)
        client = _exchange(shim, client, abi.encode_request(abi.CMD_INFO, client.next_seq(), bytes(abi.INFO.size)))
        if client.portal is not None:
            client = _exchange(shim, client, abi.encode_request(abi.CMD_DETACH, client.next_seq()))
    finally:
        client.sock.close()
    shim.witness_still_works()
    assert shim.errors.records == []  # no "shim command failed" or handler exception logged


def _attach_packet(seq: int, portal: int, version: int = abi.ABI_VERSION, flags: int = 0, reserved: int = 0,
                   tx: int = 0, rx: int = 0, out_fields: bytes = b"") -> bytes:
    out_size = abi.ATTACH.size - abi.ATTACH_IN.size
    arg = abi.ATTACH_IN.pack(version, portal, flags, reserved, tx, rx) + out_fields[:out_size].ljust(out_size, b"\0")
    return abi.encode_request(abi.CMD_ATTACH, seq, arg)


_sessions_attached_first = st.one_of(st.none(), st.none(), st.sampled_from([100, 101]))


@FUZZ
@given(st.lists(st.one_of(_packets(), st.builds(Oversized, st.integers(abi.MAX_CTL_PACKET - 2, abi.MAX_CTL_PACKET + 64), st.integers(0, 255))),
                min_size=1, max_size=4),
       _sessions_attached_first)
def test_server_answers_any_packet_with_its_errno_and_keeps_serving(shim: Shim, packets: list[bytes | Oversized],
                                                                    attach_first: int | None) -> None:
    _session(shim, packets, attach_first)


_u32_edges = st.one_of(st.sampled_from([1, 2, 0x80000000, MASK32]), st.integers(1, MASK32))
_pool_sizes = st.one_of(st.sampled_from([0, 1, abi.MIN_POOL_BYTES - 1, abi.MIN_POOL_BYTES, SERVER_CONFIG["max_pool_bytes"]]),
                        st.integers(0, SERVER_CONFIG["max_pool_bytes"]))
_too_big = st.one_of(st.sampled_from([SERVER_CONFIG["max_pool_bytes"] + 1, 1 << 63, (1 << 64) - 1]),
                     st.integers(SERVER_CONFIG["max_pool_bytes"] + 1, (1 << 64) - 1))
# ATTACH with every field valid but at most one, so each check is reached as often as the first.
_attach_fields = st.one_of(
    st.fixed_dictionaries({}),
    st.fixed_dictionaries({"version": st.one_of(st.sampled_from([0, 2, 0x80000000, MASK32]), st.integers(2, MASK32))}),
    st.fixed_dictionaries({"flags": _u32_edges}),
    st.fixed_dictionaries({"reserved": _u32_edges}),
    st.fixed_dictionaries({"portal": st.just(WITNESS_PORTAL)}),
    st.fixed_dictionaries({"tx": _too_big}),
    st.fixed_dictionaries({"rx": _too_big}),
    st.fixed_dictionaries({"version": st.integers(0, MASK32), "flags": st.integers(0, MASK32), "reserved": st.integers(0, MASK32),
                           "tx": st.integers(0, (1 << 64) - 1), "rx": st.integers(0, (1 << 64) - 1)}),  # several wrong at once
)


def _command_with_fields() -> st.SearchStrategy[bytes]:
    """Each command with its argument fields at and around their limits, and anything in the
    fields the server must ignore (ATTACH's out-only part, INFO's and STATS' whole argument)."""
    def attach(seq: int, portal: int, tx: int, rx: int, out_fields: bytes, broken: dict[str, int]) -> bytes:
        fields = {"portal": portal, "tx": tx, "rx": rx, **broken}
        return _attach_packet(seq, fields["portal"], broken.get("version", abi.ABI_VERSION), broken.get("flags", 0),
                              broken.get("reserved", 0), fields["tx"], fields["rx"], out_fields)

    attaches = st.builds(attach, st.integers(0, MASK32), st.one_of(st.sampled_from([100, 101, 0, MASK32]), st.integers(0, MASK32)),
                         _pool_sizes, _pool_sizes, st.binary(max_size=abi.ATTACH.size), _attach_fields)
    others = st.builds(lambda cmd, seq, arg: abi.encode_request(cmd, seq, arg[: abi.ioc_size(cmd)].ljust(abi.ioc_size(cmd), b"\xff")),
                       st.sampled_from([abi.CMD_INFO, abi.CMD_STATS, abi.CMD_DETACH]), st.integers(0, MASK32),
                       st.binary(max_size=abi.STATS.size))
    return st.one_of(attaches, attaches, others)


@FUZZ
@given(st.lists(_command_with_fields(), min_size=1, max_size=4), _sessions_attached_first)
def test_every_commands_argument_fields_are_checked(shim: Shim, packets: list[bytes], attach_first: int | None) -> None:
    _session(shim, list(packets), attach_first)


# --- the daemon's side of a port, over a bytearray region -------------------------------------


@dataclass(frozen=True)
class Shape:
    """A region small enough that full rings, wrap-around, stalls and reloads of an index come quickly."""

    layout: abi.Layout
    max_in_flight: int
    batch: int

    @property
    def tx_slots(self) -> dict[int, int]:
        return {c.offset + i * c.slot_size: c.slot_size for c in self.layout.tx.classes for i in range(c.count)}

    @property
    def rx_slots(self) -> dict[int, int]:
        return {c.offset + i * c.slot_size: c.slot_size for c in self.layout.rx.classes for i in range(c.count)}


SHAPES = [Shape(abi.build_layout(256, 512, 512, 2), 2, 2),  # one class of 2 slots; rings of 2, 4, 2, 2 entries
          Shape(abi.build_layout(1024, 3072, 3072, 3), 3, 4)]  # classes of 3 x 512 and 2 x 1024; rings of 8, 16, 8, 8
RING_DESCS = (abi.SEND_DESC, abi.COMPLETION, abi.RX_DESC, abi.RELEASE_DESC)


class Port(PortLogic):
    """The daemon side as the server runs it, recording what its I/O half would be asked to do."""

    def __init__(self, shape: Shape, mem: memoryview) -> None:
        super().__init__(5, shape.layout, mem, shape.max_in_flight, shape.batch)
        self.handed: list[SendRequest] = []
        self.disconnects: list[str] = []

    def _hand_over(self, reqs: list[SendRequest]) -> None:
        self.handed.extend(reqs)

    def _disconnect(self, reason: str) -> None:
        super()._disconnect(reason)
        self.disconnects.append(reason)


class Region:
    """The application's side: raw access to the words and descriptors it may write."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.layout = shape.layout
        self.tx_slots, self.rx_slots = shape.tx_slots, shape.rx_slots
        self.mem = memoryview(bytearray(self.layout.region_size))
        header = abi.pack_region_header(self.layout)
        self.mem[: len(header)] = header

    def entries(self, ring: int) -> int:
        return self.layout.rings[ring].entries

    def word(self, ring: int, consumer: bool) -> int:
        return int(struct.unpack_from("<I", self.mem, self.layout.rings[ring].ctrl + (abi.RING_CONSUMER_OFF if consumer else 0))[0])

    def set_word(self, ring: int, consumer: bool, value: int) -> None:
        struct.pack_into("<I", self.mem, self.layout.rings[ring].ctrl + (abi.RING_CONSUMER_OFF if consumer else 0), value & MASK32)

    def produce(self, ring: int, *fields: object) -> None:
        """Write a descriptor at the producer index and publish it (no check: the application may overrun)."""
        r = self.layout.rings[ring]
        prod = self.word(ring, False)
        RING_DESCS[ring].pack_into(self.mem, r.descs + (prod & (r.entries - 1)) * r.desc_size, *fields)
        self.set_word(ring, False, prod + 1)

    def consume(self, ring: int) -> list[tuple]:  # type: ignore[type-arg]
        """Take what the daemon published on the complete or deliver ring, honestly."""
        r = self.layout.rings[ring]
        cons, prod = self.word(ring, True), self.word(ring, False)
        n = (prod - cons) & MASK32
        assert n <= r.entries, f"daemon published {n} descriptors on a ring of {r.entries}"
        out = [RING_DESCS[ring].unpack_from(self.mem, r.descs + ((cons + i) & (r.entries - 1)) * r.desc_size) for i in range(n)]
        self.set_word(ring, True, prod)
        return out

    def offset(self, spec: tuple[str, int, int]) -> int:
        """A descriptor offset from its description: a TX slot (+ a shift), an RX slot, or any u64."""
        kind, i, shift = spec
        if kind == "tx":
            slots = sorted(self.tx_slots)
            return max(0, slots[i % len(slots)] + shift)
        if kind == "rx":
            return sorted(self.rx_slots)[i % len(self.rx_slots)]
        return i


def _detachable_indices(port: Port, region: Region) -> dict[str, int]:
    """The application-written indices the daemon may detach the endpoint for now, by the ABI's
    rules: ``producer - consumer`` (mod 2**32) never exceeds ``entries``; and the deliver ring,
    which has an entry for every RX slot, is never full when the daemon delivers into a free
    slot (the application released buffers it never consumed)."""
    bad: dict[str, int] = {}
    for ring, ours in ((abi.RING_SUBMIT, port._submit.tail), (abi.RING_RELEASE, port._release.tail)):
        theirs = region.word(ring, False)
        if (theirs - ours) & MASK32 > region.entries(ring):
            bad[f"{abi.RING_NAMES[ring]} ring producer index"] = theirs
    for ring, head in ((abi.RING_COMPLETE, port._complete.head), (abi.RING_DELIVER, port._deliver.head)):
        theirs = region.word(ring, True)
        used = (head - theirs) & MASK32
        if used > region.entries(ring) or (ring == abi.RING_DELIVER and used == region.entries(ring)):
            bad[f"{abi.RING_NAMES[ring]} ring consumer index"] = theirs
    return bad


def _check_detach_reason(reason: str, bad: dict[str, int]) -> None:
    assert any(reason.startswith(f"{what} {value}:") for what, value in bad.items()) or "does not consume" in reason, (reason, bad)


def _check_handed(port: Port, region: Region) -> None:
    """What reached the engine names a TX slot it fits, each slot at most once at a time."""
    open_reqs = [r for r in port.handed if not r.done]
    assert len(open_reqs) == port.in_flight <= region.shape.max_in_flight
    assert len({r.offset for r in open_reqs}) == len(open_reqs)
    for r in port.handed:
        assert r.offset in region.tx_slots and len(r.payload) <= min(region.tx_slots[r.offset], region.layout.max_message_size)
        assert r.msg_id is None or r.msg_id == r.cookie


def _daemon(port: Port, region: Region, call: str) -> bool:
    """Run one daemon-side step as the server does; False once the endpoint is being detached."""
    bad = _detachable_indices(port, region)
    must_fail = any(k.endswith("producer index") for k in bad)  # consumed rings are checked on every pass
    try:
        if call == "service":
            port._drain_release()
            port._drain_submit()
        else:
            port.publish()
    except RingIndexError as e:  # the one error the ring service may raise: the server detaches
        _check_detach_reason(e.reason, bad)
        port._disconnect(e.reason)
        return False
    assert not (must_fail and call == "service"), f"impossible index not noticed: {bad}"
    return not port._failing


_u32 = st.one_of(st.integers(0, MASK32), st.integers(0, 12), st.integers(MASK32 - 12, MASK32))
_u64 = st.one_of(st.integers(0, (1 << 64) - 1), st.integers(0, 1 << 20))
_tx_offsets = st.one_of(st.tuples(st.just("tx"), st.integers(0, 7), st.just(0)), st.tuples(st.just("tx"), st.integers(0, 7), st.integers(-65, 65)),
                        st.tuples(st.just("rx"), st.integers(0, 7), st.just(0)), st.tuples(st.just("any"), _u64, st.just(0)))
_lengths = st.one_of(st.integers(0, 1100), st.sampled_from([256, 257, 512, 513, 1024, 1025]), _u32)
_send_desc = st.tuples(_u64, _tx_offsets, _lengths, _u32, st.one_of(st.just(LO), st.binary(min_size=NID_SIZE, max_size=NID_SIZE)),
                       st.one_of(st.just(0), st.just(abi.SEND_FLAG_MSG_ID), _u32))
# The index words: the four the application owns (checked by the daemon) twice as often as the
# four the daemon owns (which it never reads back, but the application can still write them).
# A value is absolute, or relative to the index of the other side (as an attacker reads it).
_APP_WORDS = [(abi.RING_SUBMIT, False), (abi.RING_RELEASE, False), (abi.RING_COMPLETE, True), (abi.RING_DELIVER, True)]
_DAEMON_WORDS = [(abi.RING_SUBMIT, True), (abi.RING_RELEASE, True), (abi.RING_COMPLETE, False), (abi.RING_DELIVER, False)]
_word_op = st.builds(lambda w, relative, value: ("word", *w, relative, value), st.sampled_from(_APP_WORDS * 2 + _DAEMON_WORDS),
                     st.booleans(), st.one_of(_u32, st.integers(-2, 18)))  # ("word", ring, consumer?, relative?, value)
_hostile_op = st.one_of(
    _word_op, _word_op,
    st.tuples(st.just("submit"), _send_desc),
    st.tuples(st.just("release"), st.one_of(st.tuples(st.just("rx"), st.integers(0, 7), st.just(0)), _tx_offsets)),
    st.tuples(st.just("bytes"), st.integers(0, 1 << 14), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("flags"), _u32),
    st.tuples(st.just("service")), st.tuples(st.just("service")),
    st.tuples(st.just("complete"), st.integers(0, 7), st.sampled_from(list(Status))),
    st.tuples(st.just("deliver"), st.integers(0, 1100)),
    st.tuples(st.just("release_delivered"), st.integers(0, 7)),
    st.tuples(st.just("publish")),
    st.tuples(st.just("consume"), st.sampled_from([abi.RING_COMPLETE, abi.RING_DELIVER])),
)


@FUZZ
@given(st.sampled_from(SHAPES), st.lists(_hostile_op, min_size=1, max_size=40), st.lists(st.integers(0, 7), min_size=1, max_size=2, unique=True))
def test_a_hostile_region_gives_only_ring_index_errors_and_recovers(shape: Shape, ops: list[tuple], good: list[int]) -> None:  # type: ignore[type-arg]
    region = Region(shape)
    port = Port(shape, region.mem)
    delivered: list[int] = []
    alive = True
    for op in ops:
        kind = op[0]
        bad = _detachable_indices(port, region)
        if kind == "word":
            _, ring, consumer, relative, value = op
            region.set_word(ring, consumer, region.word(ring, not consumer) + value if relative else value)
        elif kind == "submit":
            cookie, offset, *rest = op[1]
            region.produce(abi.RING_SUBMIT, cookie, region.offset(offset), *rest)
        elif kind == "release":
            region.produce(abi.RING_RELEASE, region.offset(op[1]))
        elif kind == "release_delivered" and delivered:
            region.produce(abi.RING_RELEASE, delivered.pop(op[1] % len(delivered)))
        elif kind == "bytes":
            pos = op[1] % len(region.mem)
            region.mem[pos : pos + len(op[2])] = op[2][: len(region.mem) - pos]
        elif kind == "flags":
            struct.pack_into("<I", region.mem, abi.HDR_ENDPOINT_FLAGS, op[1])
        elif kind in ("service", "publish") and alive:
            alive = _daemon(port, region, kind)
        elif kind == "complete":  # the engine finishes a request: never an exception, whatever the region holds
            open_reqs = [r for r in port.handed if not r.done]
            if open_reqs:
                before = len(port.disconnects)
                port.complete(open_reqs[op[1] % len(open_reqs)], op[2], "fuzz")
                for reason in port.disconnects[before:]:
                    _check_detach_reason(reason, bad)
        elif kind == "deliver":
            buf = port.rx_alloc(op[1])
            if buf is not None:
                before = len(port.disconnects)
                try:
                    port.deliver(buf, LO, 9, op[1])
                except ShimError as e:  # only once the endpoint is being detached
                    assert e.code == errno.ENOTCONN and port._failing
                    port.rx_abort(buf)
                else:
                    delivered.append(buf.offset)
                for reason in port.disconnects[before:]:
                    _check_detach_reason(reason, bad)
        elif kind == "consume":
            try:
                region.consume(op[1])
            except AssertionError:  # the application scribbled over the daemon's producer index: its problem
                pass
        _check_handed(port, region)
        alive = alive and not port._failing

    if alive:  # the server services a port again and again: what the ops left behind is seen now
        alive = _daemon(port, region, "service")
    event("detached" if not alive else "recovered")
    if not alive:  # detached: the engine can still finish what it holds, without an exception
        for r in [r for r in port.handed if not r.done]:
            port.complete(r, Status.CANCELLED)
        assert port.in_flight == 0
        return
    # The application behaves again: indices back where the daemon has them, its completions
    # consumed; the daemon carries on with its next valid requests.
    region.set_word(abi.RING_SUBMIT, False, port._submit.tail)
    region.set_word(abi.RING_RELEASE, False, port._release.tail)
    region.set_word(abi.RING_COMPLETE, True, port._complete.head)
    region.set_word(abi.RING_DELIVER, True, port._deliver.head)
    for r in [r for r in port.handed if not r.done]:
        port.complete(r, Status.DELIVERED)
    assert _daemon(port, region, "publish")
    region.consume(abi.RING_COMPLETE)
    slots = sorted({region.offset(("tx", i, 0)) for i in good})
    cookies = [(1 << 62) + i for i in range(len(slots))]
    before = len(port.handed)
    for cookie, slot in zip(cookies, slots):
        region.produce(abi.RING_SUBMIT, cookie, slot, 10, 1, LO, 0)
    assert _daemon(port, region, "service")
    assert [r.cookie for r in port.handed[before:]] == cookies and not port.disconnects
    _check_handed(port, region)


@FUZZ
@given(st.sampled_from(SHAPES), st.sampled_from([abi.RING_COMPLETE, abi.RING_DELIVER]), st.integers(0, 3), st.booleans(),
       st.one_of(st.integers(-3, 40), st.integers(0, MASK32)), st.lists(st.sampled_from(list(Status)), min_size=1, max_size=6))
def test_the_engine_never_gets_an_exception_and_a_corrupt_index_is_found(
        shape: Shape, ring: int, honest_rounds: int, relative: bool, value: int, statuses: list[Status]) -> None:
    """The engine completes requests (from its timer, from ACKs) and delivers messages whatever the
    application did to the consumer index of its complete or deliver ring (security finding 1):
    never an exception, and an index that is impossible, and stays so, is found within
    ``entries`` writes to that ring -- the endpoint is detached, naming the ring and the index."""
    region = Region(shape)
    port = Port(shape, region.mem)
    producer = port._complete if ring == abi.RING_COMPLETE else port._deliver
    corrupt: int | None = None
    head_then = cookie = 0
    for round_ in range(honest_rounds + region.entries(abi.RING_COMPLETE) + 2):
        if round_ == honest_rounds:  # from now on the application never writes that index again
            head_then = producer.head
            corrupt = (head_then - value if relative else value) & MASK32
            region.set_word(ring, True, corrupt)
        if not port._failing:  # it keeps posting to every slot not in flight
            busy = {r.offset for r in port.handed if not r.done}
            for offset in sorted(region.tx_slots):
                if offset not in busy and (region.word(abi.RING_SUBMIT, False) - port._submit.tail) & MASK32 < region.entries(abi.RING_SUBMIT):
                    cookie += 1
                    region.produce(abi.RING_SUBMIT, cookie, offset, 8, 1, LO, 0)
            assert _daemon(port, region, "service")
        for i, r in enumerate([r for r in port.handed if not r.done]):
            port.complete(r, statuses[(cookie + i) % len(statuses)], "timer")  # never an exception
        buf = port.rx_alloc(16)
        if buf is not None:
            try:
                port.deliver(buf, LO, 9, 16)  # never an exception but this one, once detached
            except ShimError as e:
                assert e.code == errno.ENOTCONN and port._failing
                port.rx_abort(buf)
            else:
                if corrupt is not None and ring == abi.RING_DELIVER:
                    region.produce(abi.RING_RELEASE, buf.offset)  # read without moving its index, released
        if not port._failing:
            _daemon(port, region, "publish")
        for honest in (abi.RING_COMPLETE, abi.RING_DELIVER):
            if corrupt is None or honest != ring:
                descs = region.consume(honest)
                if honest == abi.RING_DELIVER:
                    for offset, *_rest in descs:
                        region.produce(abi.RING_RELEASE, offset)
        _check_handed(port, region)
    assert corrupt is not None and port.in_flight == 0
    what = f"{abi.RING_NAMES[ring]} ring consumer index {corrupt}:"
    behind = (head_then - corrupt) & MASK32
    if region.entries(ring) < behind < MASK32 - (1 << 16):  # impossible now and after every later write here
        event(f"impossible {abi.RING_NAMES[ring]} index")
        assert port._failing.startswith(what), port._failing
    elif port._failing:
        event(f"possible {abi.RING_NAMES[ring]} index, then not consumed")
        assert port._failing.startswith(what) or "does not consume" in port._failing, port._failing


@dataclass
class Posted:
    cookie: int
    offset: int
    length: int
    flags: int


def _model_invalid_field(d: Posted, region: Region, in_flight: set[int]) -> str | None:
    """Which field the daemon must name for descriptor ``d`` (None: valid), from the ABI's rules."""
    cap = region.tx_slots.get(d.offset)
    if cap is None:
        return "offset"
    if d.length > cap or d.length > region.layout.max_message_size:
        return "length"
    if d.flags & ~abi.SEND_FLAGS_KNOWN:
        return "flags"
    if d.flags & abi.SEND_FLAG_MSG_ID and not 1 <= d.cookie <= abi.MAX_MSG_ID:
        return "cookie"
    if d.offset in in_flight:
        return "already in flight"
    return None


_honest_op = st.one_of(
    st.tuples(st.just("post"), _tx_offsets, _lengths, st.one_of(st.just(0), st.just(0), st.just(abi.SEND_FLAG_MSG_ID), _u32),
              st.booleans()),
    st.tuples(st.just("post"), st.tuples(st.just("tx"), st.integers(0, 7), st.just(0)), st.integers(0, 256), st.just(0),
              st.just(False)),
    st.tuples(st.just("service")),
    st.tuples(st.just("complete"), st.integers(0, 7), st.sampled_from(list(Status))),
)


@FUZZ
@given(st.sampled_from(SHAPES), st.lists(_honest_op, max_size=40))
def test_bad_descriptors_fail_alone_and_every_descriptor_completes_once(shape: Shape, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    region = Region(shape)
    port = Port(shape, region.mem)
    waiting: list[Posted] = []  # posted, not yet taken by the daemon
    in_flight: set[int] = set()  # TX offsets of requests handed over and not completed (the model's)
    expected: dict[int, tuple[int, str | None]] = {}  # cookie -> (status, invalid field)
    finished: dict[int, int] = {}  # what we told the daemon to complete each request with
    handed_model: list[int] = []
    seen: dict[int, tuple[int, str]] = {}
    next_cookie = 1

    def service() -> None:
        budget = min(shape.batch, shape.max_in_flight - len(in_flight))
        taken = waiting[: max(budget, 0)]
        del waiting[: len(taken)]
        for d in taken:
            wrong = _model_invalid_field(d, region, in_flight)
            if wrong is None:
                in_flight.add(d.offset)
                handed_model.append(d.cookie)
            else:
                expected[d.cookie] = (int(Status.INVALID), wrong)
                event(f"invalid {wrong}")
        assert _daemon(port, region, "service") and _daemon(port, region, "publish")
        for cookie, status, flags, reason in region.consume(abi.RING_COMPLETE):
            assert cookie not in seen and flags == 0, (cookie, seen)  # exactly one completion each, no events
            seen[cookie] = (status, abi.decode_reason(reason))

    def complete(i: int, status: Status) -> None:
        open_reqs = [r for r in port.handed if not r.done]
        if open_reqs:
            r = open_reqs[i % len(open_reqs)]
            port.complete(r, status, "fuzz" if status else "")
            in_flight.discard(r.offset)
            finished[r.cookie] = int(status)

    for op in ops:
        if op[0] == "post":
            if (region.word(abi.RING_SUBMIT, False) - region.word(abi.RING_SUBMIT, True)) & MASK32 >= region.entries(abi.RING_SUBMIT):
                continue  # full: an honest application waits
            # With bit 63 set the cookie is a library cookie, and no message id (the ABI's range).
            d = Posted(next_cookie | (1 << 63 if op[4] else 0), region.offset(op[1]), op[2], op[3])
            next_cookie += 1
            region.produce(abi.RING_SUBMIT, d.cookie, d.offset, d.length, 1, LO, d.flags)
            waiting.append(d)
        elif op[0] == "service":
            service()
        else:
            complete(op[1], op[2])
        assert [r.cookie for r in port.handed] == handed_model
        _check_handed(port, region)
    while waiting or port.in_flight:  # drain: everything posted ends, exactly once
        for _ in range(port.in_flight):
            complete(0, Status.DELIVERED)
        service()
    service()
    assert not port.disconnects and not port._failing
    for cookie in finished:
        expected[cookie] = (finished[cookie], None)
    assert {c & abi.MAX_MSG_ID for c in seen} == {c & abi.MAX_MSG_ID for c in expected} == set(range(1, next_cookie))
    assert set(seen) == set(expected)
    for cookie, (status, wrong) in expected.items():
        got_status, reason = seen[cookie]
        assert got_status == status, (cookie, got_status, status, reason)
        if wrong is not None:
            assert wrong in reason, (cookie, wrong, reason)
    assert port.counters["invalid"] == sum(1 for _s, w in expected.values() if w is not None)
    assert port.counters["completed"] == len(expected)
