"""o2ib backend: lu2k frames over RDMA verbs (RC queue pairs) with pyverbs -- o2iblnd's niche.

Theory of operation
-------------------
* **Side channel.**  Like o2iblnd's use of RDMA-CM, a connection starts over TCP: the
  connector opens a TCP connection to the listener's port; both sides create an RC QP and
  exchange one JSON line (QP number, PSN, GID, path MTU, receive slot size and count), move
  the QP INIT -> RTR -> RTS, then exchange ``ready``.  The TCP connection stays open for the
  life of the RC connection: ``bye`` on it is the clean close, and its reset or EOF is how a
  crashed peer is noticed (RC itself only notices when a send runs out of retries).
* **Data path.**  Frames are a byte stream cut into chunks of at most the peer's receive slot
  size, one RC SEND per chunk; the receiver pre-posts ``slots`` receive buffers in one
  registered region and feeds each completed slot to the stream
  :class:`~lu2k.wire.FrameDecoder`, which copies it into the buffer the engine supplied, then
  reposts the slot.  Receiver-not-ready is left to the HCA (``rnr_retry`` 7 = retry forever),
  so a slow reader slows the sender without loss.
* **Zero copy.**  ``VerbsBackend.register_memory(buf)`` registers a buffer (the shim's shared
  region) as an MR.  A payload view lying inside a registered buffer is sent straight from it
  (an SGE with that MR's lkey); anything else -- headers, unregistered payloads -- is copied
  into the chunk's registered bounce slot.  ``send()`` returns when the HCA reported every
  SEND complete, i.e. when the payload buffers are no longer referenced.  On receive there is
  one copy (slot -> engine buffer); receiving in place would need RDMA READ driven by the
  receiver and is not done.
* **Completions** arrive through a completion channel whose fd is driven by the asyncio loop
  (``add_reader``): get the event, ack it, re-arm, poll the CQ empty.  pyverbs does not expose
  that fd, so it is identified as the one ``anon_inode:[infinibandevent]`` descriptor the
  channel's creation added.

Debian ships pyverbs for its own Python (``python3-pyverbs``, /usr/lib/python3/dist-packages);
when ``import pyverbs`` fails, that directory is tried (override: ``LU2K_PYVERBS_PATH``).

Options: ``device`` (default: the first RDMA device), ``port`` (1), ``gid_index`` (default:
the RoCE v2 GID of the side channel's local IPv4 address, else the first usable one),
``slot_size`` (64 KiB), ``slots`` (receive slots, 32), ``send_slots`` (32), ``linger`` (s, 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import importlib
import ipaddress
import json
import mmap
import os
import random
import sys
from collections import deque
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from ..errors import (
    BackendUnavailable,
    ConfigError,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    LocalProtocolError,
    ReadError,
    RemoteProtocolError,
    WriteError,
)
from ..crypto import FrameCodec, SealedDecoder
from ..wire import BufferFor, ConnType, Frame, FrameDecoder, HelloResult
from .base import (
    AcceptCallback, Backend, BackendSettings, ExceptionMap, Listener, OutFrame, Transport, map_exceptions, option_int, option_seconds,
)
from .rds import plan_datagrams  # the same zero-copy stream chunker

# Where the side channel's socket errors become lu2k's; pyverbs errors are translated where each verb is called.
SIDE_CHANNEL_ERRORS: ExceptionMap = {OSError: ConnectError}

DEBIAN_PYVERBS = "/usr/lib/python3/dist-packages"
SETUP_VERSION = 1
MAX_SETUP_LINE = 4096


# --- pure: setup messages and GID choice --------------------------------------------------------------


def encode_setup(info: dict[str, Any]) -> bytes:
    return json.dumps({"v": SETUP_VERSION, **info}, sort_keys=True).encode() + b"\n"


def decode_setup(line: bytes) -> dict[str, Any]:
    """A peer's setup line, checked field by field (``RemoteProtocolError`` names the bad one)."""
    try:
        info = json.loads(line)
    except ValueError:
        raise RemoteProtocolError(f"o2ib setup line is not JSON: {line[:80]!r}") from None
    if not isinstance(info, dict) or info.get("v") != SETUP_VERSION:
        raise RemoteProtocolError(f"o2ib setup line of unknown version: {line[:80]!r}")
    limits = {"qpn": (1, (1 << 24) - 1), "psn": (0, (1 << 24) - 1), "mtu": (1, 5),
              "slot_size": (4096, 1 << 30), "slots": (1, 1 << 16)}
    for key, (low, high) in limits.items():
        value = info.get(key)
        if not isinstance(value, int) or not low <= value <= high:
            raise RemoteProtocolError(f"o2ib setup field {key}={value!r} outside {low}..{high}")
    gid = info.get("gid")
    if not isinstance(gid, str) or len(gid.split(":")) != 8:
        raise RemoteProtocolError(f"o2ib setup field gid={gid!r} is not a GID")
    return info


def ipv4_mapped_gid(address: str) -> str | None:
    """The RoCE GID string (pyverbs' format) for an IPv4 address: ::ffff:a.b.c.d."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version != 4:
        return None
    raw = b"\0" * 10 + b"\xff\xff" + ip.packed
    return ":".join(raw[i : i + 2].hex() for i in range(0, 16, 2))


IPV4_MAPPED_PREFIX = "0000:0000:0000:0000:0000:ffff:"


def choose_gid_index(gids: Sequence[tuple[int, str, bool]], local_ip: str | None) -> int:
    """Pick from (index, gid, is_roce_v2), best first: the RoCE v2 GID of our IPv4 address,
    any IPv4-mapped v2 GID, any v2 GID that is not link-local, then any non-zero GID.

    Link-local GIDs come last: they carry no routable address (on soft-RoCE over lo,
    librxe even crashes moving a QP to RTR with one).
    """
    usable = [g for g in gids if g[1].replace(":", "").strip("0")]
    if not usable:
        raise ConnectError("the RDMA port has no usable GID (is the netdev up and addressed?)")
    wanted = ipv4_mapped_gid(local_ip) if local_ip else None
    preferences = [
        lambda gid, v2: v2 and gid == wanted,
        lambda gid, v2: v2 and gid.startswith(IPV4_MAPPED_PREFIX),
        lambda gid, v2: v2 and not gid.startswith("fe80:"),
        lambda gid, v2: not gid.startswith("fe80:"),
    ]
    for rule in preferences:
        for idx, gid, v2 in usable:
            if rule(gid, v2):
                return idx
    return usable[0][0]


# --- pyverbs loading --------------------------------------------------------------------------------------

_pv: dict[str, ModuleType] = {}


def load_pyverbs() -> dict[str, ModuleType]:
    """pyverbs' modules; Debian's copy is found even from a venv.  ``BackendUnavailable`` if none."""
    if _pv:
        return _pv
    names = ["device", "pd", "cq", "qp", "mr", "wr", "addr", "enums", "pyverbs_error"]
    try:
        mods = {n: importlib.import_module(f"pyverbs.{n}") for n in names}
    except ImportError as first:
        extra = os.environ.get("LU2K_PYVERBS_PATH", DEBIAN_PYVERBS)
        if not os.path.isdir(os.path.join(extra, "pyverbs")):
            raise BackendUnavailable(f"backend 'o2ib' is unavailable: no pyverbs ({first}); apt-get install python3-pyverbs") from None
        # Only for this import: the package keeps its own __path__ for later submodule imports.
        sys.path.append(extra)
        try:
            mods = {n: importlib.import_module(f"pyverbs.{n}") for n in names}
        except ImportError as e:
            raise BackendUnavailable(f"backend 'o2ib' is unavailable: pyverbs in {extra} does not load here ({e})") from None
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(extra)
    _pv.update(mods)
    return _pv


def _event_fds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[infinibandevent]":
                out.add(int(name))
    return out


def _address_of(buf: Any) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class _Region:
    """A registered buffer: [start, end) in our address space, with its MR."""

    def __init__(self, buf: Any, mr: Any) -> None:
        self.buf = buf
        self.mr = mr
        self.start = _address_of(buf)
        self.end = self.start + memoryview(buf).nbytes


# --- transport ---------------------------------------------------------------------------------------------


class VerbsTransport(Transport):
    backend_name = "o2ib"

    def __init__(self, backend: "VerbsBackend", reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._b = backend
        self._pv = backend.pv
        self._reader, self._writer = reader, writer
        self._loop = asyncio.get_running_loop()
        peer = writer.get_extra_info("peername") or ("?", 0)
        self._peer = f"o2ib:{peer[0]}:{peer[1]}"
        self._codec = FrameCodec(backend.settings.max_message_size, self._peer)
        self._send_lock = asyncio.Lock()
        self._closing = False
        self._peer_state: str | None = None  # "closed" (bye) or "lost" (side channel died)
        self._rx_ready: deque[tuple[int, int]] = deque()
        self._rx_waiter: asyncio.Future[None] | None = None
        self._free_send: deque[int] = deque()
        self._send_waiter: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._next_wr = 0
        self._error: Exception | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._fd = -1
        self.counters = {"bytes_sent": 0, "bytes_received": 0, "sends": 0, "recvs": 0,
                         "zero_copy_bytes": 0, "copied_bytes": 0}
        backend.transports.add(self)

    # -- setup --

    async def setup(self, timeout: float) -> None:
        pv, b = self._pv, self._b
        e = pv["enums"]
        try:
            before = _event_fds()
            self._channel = pv["cq"].CompChannel(b.ctx)
            new = _event_fds() - before
            if len(new) != 1:
                raise ConnectError(f"cannot identify the completion channel's fd (new event fds: {sorted(new)})")
            self._fd = new.pop()
            os.set_blocking(self._fd, False)
            depth = b.slots + b.send_slots
            self._cq = pv["cq"].CQ(b.ctx, depth + 8, None, self._channel, 0)
            cap = pv["qp"].QPCap(max_send_wr=b.send_slots, max_recv_wr=b.slots, max_send_sge=b.max_sge, max_recv_sge=1)
            init = pv["qp"].QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self._cq, rcq=self._cq, cap=cap, sq_sig_all=1)
            self._qp = pv["qp"].QP(b.pd, init)
            # Receive and bounce buffers: page-aligned memory of our own, registered once.
            self._rx_mem = mmap.mmap(-1, b.slots * b.slot_size)
            self._tx_mem = mmap.mmap(-1, b.send_slots * b.slot_size)
            self._rx_mr = b.register(self._rx_mem)
            self._tx_mr = b.register(self._tx_mem)
            self._rx_addr, self._tx_addr = _address_of(self._rx_mem), _address_of(self._tx_mem)
            self._free_send.extend(range(b.send_slots))
            # Receives may be posted from INIT on (not in RESET), and must be before RTR.
            init_attr = pv["qp"].QPAttr()
            init_attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE
            init_attr.port_num = b.port
            init_attr.pkey_index = 0
            self._qp.to_init(init_attr)
            for slot in range(b.slots):
                self._post_recv(slot)
            self._cq.req_notify()
        except self._pv["pyverbs_error"].PyverbsError as err:
            self._teardown()
            raise ConnectError(f"cannot create RDMA resources on {b.device_name}: {err}") from None
        local_ip = (self._writer.get_extra_info("sockname") or ("",))[0]
        gid_index = b.gid_index if b.gid_index is not None else choose_gid_index(b.gids(), local_ip)
        psn = random.randrange(1 << 24)
        mine = {"qpn": self._qp.qp_num, "psn": psn, "gid": b.ctx.query_gid(b.port, gid_index).gid,
                "mtu": b.mtu, "slot_size": b.slot_size, "slots": b.slots}
        try:
            self._writer.write(encode_setup(mine))
            theirs = decode_setup(await asyncio.wait_for(self._reader.readline(), timeout))
            self._peer_slot = theirs["slot_size"]
            self._to_rts(theirs, psn, gid_index)
            self._writer.write(b"ready\n")
            if (await asyncio.wait_for(self._reader.readline(), timeout)).strip() != b"ready":
                raise RemoteProtocolError(f"{self._peer} did not become ready")
        except asyncio.TimeoutError:
            self._teardown()
            raise ConnectTimeout(f"o2ib setup with {self._peer} timed out after {timeout:g} s") from None
        except (OSError, asyncio.IncompleteReadError, ValueError) as err:
            self._teardown()
            raise ConnectError(f"o2ib setup with {self._peer} failed: {err}") from None
        except BaseException:
            self._teardown()
            raise
        self.local_gid, self.remote_gid = mine["gid"], theirs["gid"]
        self._loop.add_reader(self._fd, self._on_event)
        self._watch_task = asyncio.ensure_future(self._watch_side_channel())

    def _to_rts(self, theirs: dict[str, Any], psn: int, gid_index: int) -> None:
        pv, b = self._pv, self._b
        e = pv["enums"]
        try:
            attr = pv["qp"].QPAttr()
            attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE
            attr.port_num = b.port
            attr.pkey_index = 0
            gr = pv["addr"].GlobalRoute(dgid=pv["addr"].GID(theirs["gid"]), sgid_index=gid_index)
            attr.ah_attr = pv["addr"].AHAttr(port_num=b.port, is_global=1, gr=gr, dlid=0)
            attr.dest_qp_num = theirs["qpn"]
            attr.rq_psn = theirs["psn"]
            attr.path_mtu = min(b.mtu, theirs["mtu"])
            attr.max_dest_rd_atomic = 1
            attr.min_rnr_timer = 12  # 0.64 ms before the sender retries a receiver-not-ready
            self._qp.to_rtr(attr)
            attr.sq_psn = psn
            attr.timeout = 14  # ~67 ms local ACK timeout
            attr.retry_cnt = 7
            attr.rnr_retry = 7  # retry RNR forever: a slow receiver throttles, nothing is lost
            attr.max_rd_atomic = 1
            self._qp.to_rts(attr)
        except pv["pyverbs_error"].PyverbsError as err:
            raise ConnectError(f"cannot bring the RC QP to RTS with {self._peer}: {err}") from None

    # -- Transport API --

    @property
    def peer_address(self) -> str:
        return self._peer

    def set_buffer_for(self, buffer_for: BufferFor | None) -> None:
        self._codec.set_buffer_for(buffer_for)

    def on_hello_done(self, result: HelloResult) -> None:
        self._codec.hello_done(result)

    @property
    def _decoder(self) -> FrameDecoder | SealedDecoder:
        return self._codec.decoder  # the hello decoder, then the sealed one

    async def send(self, frames: Sequence[OutFrame]) -> None:
        async with self._send_lock:  # sealing assigns nonces, and a batch's datagrams must not interleave
            await self._send_sealed(self._codec.outgoing(frames))

    async def _send_sealed(self, frames: Sequence[OutFrame]) -> None:
        views: list[memoryview] = []
        for header, payload in frames:
            views.append(memoryview(header))
            if len(payload):
                views.append(memoryview(payload))
        chunk = min(self._b.slot_size, self._peer_slot)
        mine: list[asyncio.Future[None]] = []
        try:
            for body in plan_datagrams(views, chunk):
                self._check_writable()
                while not self._free_send:
                    await self._wait_send_slot()
                    self._check_writable()
                mine.append(self._post_send(self._free_send.popleft(), body))
        finally:
            # Whatever happens, the buffers are referenced until the HCA is done with them.
            if mine:
                await asyncio.gather(*mine, return_exceptions=True)
        for fut in mine:
            if fut.cancelled():
                raise WriteError(f"send to {self._peer} abandoned: connection closed")
            if fut.exception() is not None:
                raise WriteError(f"send to {self._peer} failed: {fut.exception()}")

    async def recv(self) -> list[Frame]:
        while True:
            frames = self._decoder.frames()
            if frames:
                return frames
            if self._rx_ready:
                slot, length = self._rx_ready.popleft()
                base = slot * self._b.slot_size
                try:
                    self._decoder.feed(memoryview(self._rx_mem)[base : base + length])
                finally:
                    self._post_recv(slot)
                self.counters["bytes_received"] += length
                continue
            if self._error is not None:
                raise ReadError(str(self._error))
            if self._closing:
                raise ReadError(f"connection to {self._peer} closed locally")
            if self._peer_state is not None:
                if self._peer_state == "closed" and self._decoder.at_boundary():
                    raise ConnectionClosed(f"{self._peer} closed the connection")
                raise ReadError(f"{self._peer} {'closed the connection mid-frame' if self._peer_state == 'closed' else 'lost'}")
            fut = self._loop.create_future()
            self._rx_waiter = fut
            try:
                await fut
            finally:
                self._rx_waiter = None

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._teardown()
            return
        self._close_task = asyncio.ensure_future(self._close_gracefully())

    async def wait_closed(self) -> None:
        if self._close_task is not None:
            await asyncio.shield(self._close_task)

    def abort(self) -> None:
        """Release everything now, without the goodbye (the backend is shutting down)."""
        self._closing = True
        self._wake()
        if self._close_task is not None and not self._close_task.done():
            self._close_task.cancel()
        self._teardown()

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "device": self._b.device_name, "slot_size": self._b.slot_size,
                "local_gid": getattr(self, "local_gid", None), "remote_gid": getattr(self, "remote_gid", None)}

    # -- data path --

    def _check_writable(self) -> None:
        if self._error is not None:
            raise WriteError(str(self._error))
        if self._closing:
            raise WriteError(f"connection to {self._peer} closed")
        if self._peer_state is not None:
            raise WriteError(f"{self._peer} {'closed the connection' if self._peer_state == 'closed' else 'lost'}")

    async def _wait_send_slot(self) -> None:
        fut = self._loop.create_future()
        self._send_waiter = fut
        try:
            await fut
        finally:
            self._send_waiter = None

    def _post_send(self, slot: int, body: list[memoryview]) -> asyncio.Future[None]:
        pv, b = self._pv, self._b
        sges: list[Any] = []
        base = slot * b.slot_size
        bounce = memoryview(self._tx_mem)
        used = 0
        pieces: list[tuple[int, int, int]] = []  # (addr, length, lkey)
        direct = 0
        for v in body:
            region = b.region_of(v)
            if region is not None:
                pieces.append((region[0], len(v), region[1]))
                direct += len(v)
                continue
            bounce[base + used : base + used + len(v)] = v
            addr = self._tx_addr + base + used
            if pieces and pieces[-1][2] == self._tx_mr.lkey and pieces[-1][0] + pieces[-1][1] == addr:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + len(v), self._tx_mr.lkey)
            else:
                pieces.append((addr, len(v), self._tx_mr.lkey))
            used += len(v)
            self.counters["copied_bytes"] += len(v)
        if len(pieces) > b.max_sge:
            # Too fragmented for one WR: fall back to one bounce copy of the whole chunk.
            pos = 0
            for v in body:
                bounce[base + pos : base + pos + len(v)] = v
                pos += len(v)
            pieces = [(self._tx_addr + base, pos, self._tx_mr.lkey)]
            self.counters["copied_bytes"] += direct
            direct = 0
        self.counters["zero_copy_bytes"] += direct
        for addr, length, lkey in pieces:
            sges.append(pv["wr"].SGE(addr, length, lkey))
        wr_id = self._next_wr = (self._next_wr + 1) & 0xFFFFFFFF
        wr = pv["wr"].SendWR(wr_id=wr_id, opcode=pv["enums"].IBV_WR_SEND, num_sge=len(sges), sg=sges,
                             send_flags=pv["enums"].IBV_SEND_SIGNALED)
        fut = self._loop.create_future()
        self._pending[wr_id] = fut
        fut.add_done_callback(functools.partial(self._send_done, slot))
        try:
            self._qp.post_send(wr)
        except pv["pyverbs_error"].PyverbsError as err:
            self._pending.pop(wr_id, None)
            fut.set_exception(WriteError(f"post_send to {self._peer} failed: {err}"))
            return fut
        self.counters["sends"] += 1
        self.counters["bytes_sent"] += sum(p[1] for p in pieces)
        return fut

    def _send_done(self, slot: int, _fut: "asyncio.Future[None]") -> None:
        self._release_send_slot(slot)

    def _release_send_slot(self, slot: int) -> None:
        self._free_send.append(slot)
        if self._send_waiter is not None and not self._send_waiter.done():
            self._send_waiter.set_result(None)

    def _post_recv(self, slot: int) -> None:
        pv, b = self._pv, self._b
        if self._closing or self._error is not None:
            return
        sge = pv["wr"].SGE(self._rx_addr + slot * b.slot_size, b.slot_size, self._rx_mr.lkey)
        try:
            self._qp.post_recv(pv["wr"].RecvWR(wr_id=slot, num_sge=1, sg=[sge]))
        except pv["pyverbs_error"].PyverbsError as err:
            self._fail(ReadError(f"post_recv failed: {err}"))

    def _on_event(self) -> None:
        pv = self._pv
        try:
            self._channel.get_cq_event(self._cq)
            self._cq.ack_events(1)
        except pv["pyverbs_error"].PyverbsError:
            pass  # no event after all (the fd is non-blocking); polling below is harmless
        try:
            self._cq.req_notify()  # re-arm before polling, so nothing slips between
        except pv["pyverbs_error"].PyverbsError as err:
            self._fail(ReadError(f"cannot re-arm the CQ: {err}"))
            return
        self._poll()

    def _poll(self) -> None:
        e = self._pv["enums"]
        while True:
            try:
                n, wcs = self._cq.poll(32)
            except self._pv["pyverbs_error"].PyverbsError as err:
                self._fail(ReadError(f"CQ poll failed: {err}"))
                return
            if n == 0:
                return
            for wc in wcs[:n]:
                if wc.opcode & e.IBV_WC_RECV:
                    if wc.status == e.IBV_WC_SUCCESS:
                        self._rx_ready.append((wc.wr_id, wc.byte_len))
                        self.counters["recvs"] += 1
                    elif not self._closing:
                        self._fail(ReadError(f"receive from {self._peer} failed: completion status {wc.status}"))
                else:
                    fut = self._pending.pop(wc.wr_id, None)
                    if fut is not None and not fut.done():
                        if wc.status == e.IBV_WC_SUCCESS:
                            fut.set_result(None)
                        else:
                            failure = WriteError(f"send to {self._peer} failed: completion status {wc.status}")
                            fut.set_exception(failure)
                            self._fail(failure)
            self._wake(rx_only=True)

    def _fail(self, err: Exception) -> None:
        if self._error is None:
            self._error = err
        self._wake()

    def _wake(self, rx_only: bool = False) -> None:
        if self._rx_waiter is not None and not self._rx_waiter.done():
            self._rx_waiter.set_result(None)
        if rx_only:
            return
        if self._send_waiter is not None and not self._send_waiter.done():
            self._send_waiter.set_result(None)

    async def _watch_side_channel(self) -> None:
        try:
            line = await self._reader.readline()
        except (OSError, asyncio.IncompleteReadError):
            line = b""
        # Every SEND the peer finished before saying bye is already in our CQ: collect it first.
        self._poll()
        self._peer_state = "closed" if line.strip() == b"bye" else "lost"
        self._wake()

    # -- closing --

    async def _close_gracefully(self) -> None:
        try:
            if self._pending:
                # asyncio.wait, not wait_for(gather): a timeout must not cancel the completions,
                # which queued sends are awaiting and would then end cancelled, not failed.
                await asyncio.wait(list(self._pending.values()), timeout=self._b.linger)
            if self._peer_state is None:
                with contextlib.suppress(OSError, ConnectionError):
                    self._writer.write(b"bye\n")
                    await asyncio.wait_for(self._writer.drain(), self._b.linger)
        except asyncio.TimeoutError:
            pass
        finally:
            self._teardown()

    def _drain_events(self) -> None:
        cq, channel = getattr(self, "_cq", None), getattr(self, "_channel", None)
        if cq is None or channel is None or self._fd < 0:
            return
        for _ in range(1024):
            try:
                channel.get_cq_event(cq)
            except Exception:  # EAGAIN on the non-blocking fd: none left
                return
            with contextlib.suppress(Exception):
                cq.ack_events(1)

    def _teardown(self) -> None:
        self._b.transports.discard(self)
        if self._fd >= 0:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._fd)
        if self._watch_task is not None and asyncio.current_task() is not self._watch_task:
            self._watch_task.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(WriteError(f"connection to {self._peer} closed"))
        self._pending.clear()
        # Order matters: no QP, then no new completions; then every event the channel still
        # holds must be read and acked, or destroying the CQ waits for those acks forever.
        for name in ("_qp", "_drain_events", "_cq", "_rx_mr", "_tx_mr", "_channel"):
            if self._b.closed:  # the device context is gone and took these with it
                if name != "_drain_events":
                    setattr(self, name, None)
                continue
            if name == "_drain_events":
                self._drain_events()
                continue
            obj = getattr(self, name, None)
            if obj is not None:
                with contextlib.suppress(Exception):
                    if name in ("_rx_mr", "_tx_mr"):
                        self._b.unregister(obj)
                    else:
                        obj.close()
                setattr(self, name, None)
        self._fd = -1
        with contextlib.suppress(Exception):
            self._writer.close()


# --- listener and backend -------------------------------------------------------------------------------


class VerbsListener(Listener):
    def __init__(self, server: asyncio.base_events.Server) -> None:
        self._server = server

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def close(self) -> None:
        self._server.close()


class VerbsBackend(Backend):
    name = "o2ib"
    typed_connections = False

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        where = f"net {settings.net} (o2ib)"
        self.pv = load_pyverbs()
        opts = settings.options
        pv = self.pv
        try:
            devices = [d.name.decode() for d in pv["device"].get_device_list()]
        except pv["pyverbs_error"].PyverbsError as err:
            raise BackendUnavailable(f"backend 'o2ib' is unavailable: cannot list RDMA devices ({err})") from None
        if not devices:
            raise BackendUnavailable("backend 'o2ib' is unavailable: no RDMA device (for soft-RoCE: modprobe rdma_rxe; "
                                     "rdma link add rxe0 type rxe netdev IFACE)")
        self.device_name = str(opts.get("device") or devices[0])
        if self.device_name not in devices:
            raise ConfigError(f"RDMA device {self.device_name!r} not found (have: {', '.join(devices)})", where=where)
        self.port = option_int(opts, "port", 1, 1, 255, where)
        self.slot_size = option_int(opts, "slot_size", 64 << 10, 4096, 16 << 20, where)
        self.slots = option_int(opts, "slots", 32, 2, 4096, where)
        self.send_slots = option_int(opts, "send_slots", 32, 1, 4096, where)
        gid_index = opts.get("gid_index")
        self.gid_index = None if gid_index is None else option_int(opts, "gid_index", 0, 0, 1 << 16, where)
        self.linger = option_seconds(opts, "linger", 10.0, where, allow_zero=True)
        try:
            self.ctx = pv["device"].Context(name=self.device_name)
            port_attr = self.ctx.query_port(self.port)
            dev_attr = self.ctx.query_device()
            self.pd = pv["pd"].PD(self.ctx)
        except pv["pyverbs_error"].PyverbsError as err:
            raise BackendUnavailable(f"backend 'o2ib' cannot open {self.device_name} port {self.port}: {err}") from None
        if port_attr.state != pv["enums"].IBV_PORT_ACTIVE:
            raise BackendUnavailable(f"backend 'o2ib': {self.device_name} port {self.port} is not active")
        self.mtu = int(port_attr.active_mtu)
        self.gid_table_len = int(port_attr.gid_tbl_len)
        self.max_sge = max(1, min(8, int(dev_attr.max_sge)))
        self._regions: list[_Region] = []
        self._mrs: dict[int, _Region] = {}
        self._gids: list[tuple[int, str, bool]] | None = None
        self.transports: set[VerbsTransport] = set()
        self.closed = False

    @staticmethod
    def probe() -> str | None:
        try:
            pv = load_pyverbs()
            if not pv["device"].get_device_list():
                return "no RDMA device (for soft-RoCE: modprobe rdma_rxe; rdma link add rxe0 type rxe netdev IFACE)"
        except BackendUnavailable as e:
            return str(e)
        except Exception as e:  # pyverbs' own error types: nothing usable here
            return f"no RDMA devices ({e})"
        return None

    # -- memory registration (zero copy) --

    def register(self, buf: Any) -> Any:
        """Register a writable buffer as an MR (local write); returns the MR."""
        pv = self.pv
        view = memoryview(buf)
        if view.readonly:
            raise LocalProtocolError("only writable buffers can be registered for RDMA")
        region_addr = _address_of(buf)
        try:
            mr = pv["mr"].MR(self.pd, view.nbytes, pv["enums"].IBV_ACCESS_LOCAL_WRITE, address=region_addr)
        except pv["pyverbs_error"].PyverbsError as err:
            raise BackendUnavailable(f"cannot register {view.nbytes} bytes with {self.device_name}: {err}") from None
        region = _Region(buf, mr)
        self._mrs[id(mr)] = region
        return mr

    def register_memory(self, buf: Any) -> Any:
        """Send payloads that lie in ``buf`` (e.g. the shim's shared region) without copying.

        Returns a handle for :meth:`unregister_memory`, which must be called before ``buf``
        is unmapped (an address range reused later must not match a stale registration)."""
        mr = self.register(buf)
        self._regions.append(self._mrs[id(mr)])
        return mr

    def unregister_memory(self, handle: Any) -> None:
        self.unregister(handle)

    def unregister(self, mr: Any) -> None:
        region = self._mrs.pop(id(mr), None)
        if region in self._regions:
            self._regions.remove(region)
        mr.close()

    def region_of(self, view: memoryview) -> tuple[int, int] | None:
        """(address, lkey) of ``view`` if it lies in a registered buffer."""
        if not self._regions or view.readonly or not view.contiguous:
            return None
        try:
            addr = _address_of(view)
        except (TypeError, ValueError):
            return None
        for r in self._regions:
            if r.start <= addr and addr + view.nbytes <= r.end:
                return addr, int(r.mr.lkey)
        return None

    def gids(self) -> list[tuple[int, str, bool]]:
        """The port's GID table (read once: soft-RoCE has 1024 mostly empty entries)."""
        if self._gids is None:
            self._gids = self._read_gids()
        return self._gids

    def _read_gids(self) -> list[tuple[int, str, bool]]:
        pv = self.pv
        out = []
        for idx in range(self.gid_table_len):
            try:
                gid = self.ctx.query_gid(self.port, idx).gid
                v2 = self.ctx.query_gid_type(self.port, idx) == pv["enums"].IBV_GID_TYPE_SYSFS_ROCE_V2
            except pv["pyverbs_error"].PyverbsError:
                continue
            out.append((idx, gid, v2))
        return out

    # -- connections --

    async def listen(self, host: str, port: int, on_accept: AcceptCallback) -> Listener:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            transport = VerbsTransport(self, reader, writer)
            try:
                await transport.setup(30.0)
            except (ConnectError, RemoteProtocolError):
                writer.close()
                return
            await on_accept(transport)

        with map_exceptions(SIDE_CHANNEL_ERRORS, f"cannot listen on o2ib side channel {host}:{port}"):
            server = await asyncio.start_server(accepted, host, port, limit=MAX_SETUP_LINE)
        return VerbsListener(server)

    async def connect(self, host: str, port: int, conn_type: ConnType, timeout: float) -> Transport:
        with map_exceptions(SIDE_CHANNEL_ERRORS, f"o2ib side channel to {host}:{port} failed"):
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=MAX_SETUP_LINE), timeout)
            except asyncio.TimeoutError:
                raise ConnectTimeout(f"o2ib side channel to {host}:{port} timed out after {timeout:g} s") from None
        transport = VerbsTransport(self, reader, writer)
        try:
            await transport.setup(timeout)
        except RemoteProtocolError as e:
            raise ConnectError(f"o2ib setup with {host}:{port} failed: {e}") from None
        return transport

    async def close(self) -> None:
        if self.closed:
            return
        # Transports first: their QPs, CQs and MRs must go before the PD and the context.
        for transport in list(self.transports):
            transport.abort()
        for region in list(self._mrs.values()):
            with contextlib.suppress(Exception):
                region.mr.close()
        self._mrs.clear()
        self._regions.clear()
        with contextlib.suppress(Exception):
            self.pd.close()
        with contextlib.suppress(Exception):
            self.ctx.close()
        self.closed = True

    def describe(self) -> dict[str, Any]:
        return {"device": self.device_name, "port": self.port, "mtu_enum": self.mtu, "slot_size": self.slot_size,
                "slots": self.slots, "send_slots": self.send_slots, "registered_regions": len(self._regions)}


__all__ = ["VerbsBackend", "VerbsTransport", "choose_gid_index", "decode_setup", "encode_setup", "ipv4_mapped_gid",
           "load_pyverbs"]
