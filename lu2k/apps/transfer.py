"""The asyncio side of file transfer: :class:`Sender`, :class:`TransferService` (``recv --serve``)
and :class:`StreamReceiver` (``recv -o FILE|-``), around :mod:`.transfer_proto`.

Everything here reads or writes files, hashes, paces and sends; every decision about a
session is the pure core's.  Receiver-side files:

* ``DIR/.../.NAME.lu2k-part`` -- the partial file, preallocated to its full size (so a
  full disk is reported before the data is sent when the filesystem can tell);
* ``DIR/.../.NAME.lu2k-state`` -- JSON: size, mtime, chunk size and the chunks verified and
  synced to disk, rewritten (atomically, after ``fdatasync`` of the partial file) every
  :data:`CHECKPOINT_INTERVAL` seconds and when a session stops;
* ``DIR/.../NAME`` -- appears only by ``rename`` after the whole-file hash matched.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import signal
import stat
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ..errors import LocalProtocolError, Lu2kError, RemoteProtocolError, ShimError, Status
from ..kernel_shim.endpoint import AsyncEndpoint, Completion, pack_nid
from ..nid import Nid
from . import portal as portals
from . import transfer_proto as tp
from .pace import TokenBucket, format_throughput

log = logging.getLogger("lu2k.transfer")

CHECKPOINT_INTERVAL = 2.0
DEFAULT_WINDOW = 24 << 20  # bytes of DATA in flight per sender
STREAM_REORDER_LIMIT = 64 << 20  # a one-shot receiver holds at most this much out of order
REPLY_TIMEOUT = 30.0
SESSION_IDLE = 600.0  # a receiver forgets (after checkpointing) a session silent this long
DONE_MEMORY = 4096  # finished sessions remembered for repeated END/OFFER


def _src_name(raw: bytes) -> str:
    try:
        return str(Nid.from_bytes(raw))
    except Lu2kError:
        return raw.hex()


def pool_bytes_for(window: int, chunk: int, max_message: int = 4 << 20) -> int:
    """A TX pool with a slot for every chunk of the window (within the shim's 1 GiB cap)."""
    from ..kernel_shim.abi import pool_classes

    need = chunk + tp.DATA_OVERHEAD
    slots = window // max(chunk, 1) + 16
    pool = 64 << 20
    while pool < (1 << 30) and sum(n for s, n in pool_classes(max_message, pool) if s >= need) < slots:
        pool *= 2
    return min(pool, 1 << 30)


# --- what to send ---------------------------------------------------------------------------


@dataclass
class SourceEntry:
    name: str  # as the receiver will store it (relative, '/'-separated)
    path: str  # local path ('' for a stream)
    size: int
    mtime_ns: int
    mode: int
    entry: tp.Entry


def collect(paths: list[str]) -> tuple[list[SourceEntry], list[str]]:
    """Entries to send for files and directories (directories after their contents, so their
    mtimes stick), and problems (missing, unreadable, not regular files) -- never raises."""
    entries: list[SourceEntry] = []
    problems: list[str] = []
    seen: set[str] = set()

    def add(path: str, name: str) -> None:
        try:
            st = os.lstat(path)
        except OSError as e:
            problems.append(f"{path}: {e.strerror}")
            return
        if stat.S_ISDIR(st.st_mode):
            try:
                children = sorted(os.listdir(path))
            except OSError as e:
                problems.append(f"{path}: cannot list directory: {e.strerror}")
                return
            for c in children:
                add(os.path.join(path, c), f"{name}/{c}")
            entries.append(SourceEntry(name, path, 0, st.st_mtime_ns, stat.S_IMODE(st.st_mode), tp.Entry.DIR))
        elif stat.S_ISREG(st.st_mode):
            if not os.access(path, os.R_OK):
                problems.append(f"{path}: not readable")
                return
            entries.append(SourceEntry(name, path, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), tp.Entry.FILE))
        else:
            problems.append(f"{path}: not a regular file or directory (skipped)")

    for p in paths:
        name = os.path.basename(os.path.normpath(p))
        if name in ("", ".", "..", "/"):
            name = os.path.basename(os.path.abspath(p)) or "root"
        if name in seen:
            problems.append(f"{p}: two arguments would both be stored as {name!r}")
            continue
        seen.add(name)
        add(p, name)
    return entries, problems


# --- sender ---------------------------------------------------------------------------------


class ByteWindow:
    """Bytes in flight, shared by the sessions of one sender (back-pressure on reading)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    def release(self, n: int) -> None:
        self.used -= n

        async def notify() -> None:
            async with self._cond:
                self._cond.notify_all()

        asyncio.get_running_loop().create_task(notify())


@dataclass
class Progress:
    """Totals for the progress line and the summary."""

    total: int
    done: int = 0  # bytes delivered (or found already at the receiver)
    wire: int = 0  # bytes sent as DATA
    resent: int = 0
    files_ok: int = 0
    start: float = field(default_factory=time.monotonic)

    def line(self, final: bool = False) -> str:
        el = max(time.monotonic() - self.start, 1e-6)
        rate = self.wire * 8 / el
        parts = [f"{self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB", format_throughput(rate)]
        if not final and rate > 0 and self.total > self.done:
            parts.append(f"ETA {(self.total - self.done) * 8 / rate:,.0f} s")
        parts.append(f"{self.resent} resent")
        return ", ".join(parts)


_PERMANENT_STATUS = {Status.TOO_LARGE: "message too large for the path", Status.INVALID: "request rejected by the local daemon",
                     Status.PROTOCOL: "protocol error", Status.AUTH_FAILED: "authentication with the peer failed"}


class Sender:
    """``lu2k send``: sessions for each entry, ``parallel`` at a time, one shared window."""

    def __init__(self, socket_path: str | None, dst: str, *, portal: int = portals.TRANSFER_PORTAL, chunk: int = tp.DEFAULT_CHUNK,
                 window: int = DEFAULT_WINDOW, rate_bps: float = 0.0, parallel: int = 4, retry_for: float = 60.0,
                 reply_timeout: float = REPLY_TIMEOUT, progress: Callable[[str], None] | None = None, inline: bool = True) -> None:
        if not 1 <= chunk <= tp.MAX_CHUNK:
            raise LocalProtocolError(f"--chunk must be 1..{tp.MAX_CHUNK} bytes")
        self.socket_path, self.dst, self.portal = socket_path, dst, portal
        self.dst_raw = pack_nid(dst)
        self.chunk, self.window_bytes, self.parallel = chunk, window, parallel
        self.bucket = TokenBucket(rate_bps, burst=max(64 * 1024, 2 * (chunk + tp.DATA_OVERHEAD)))
        self.retry_for, self.reply_timeout = retry_for, reply_timeout
        self.progress_cb = progress
        self.inline = inline  # small files whole in their first OFFER
        self.sessions: dict[int, tp.SendSession] = {}
        self.wakeups: dict[int, asyncio.Event] = {}
        self.ep: AsyncEndpoint | None = None
        self.stats: Progress = Progress(0)
        self.service_seen = False
        self.results: list[tuple[SourceEntry, tp.Outcome, str]] = []

    # replies
    def _on_message(self, src: bytes, src_portal: int, payload: memoryview) -> None:
        msg = tp.decode(payload)
        s = self.sessions.get(msg.sid)
        if s is None:
            return
        self.service_seen = True
        s.handle(msg)
        self.wakeups[msg.sid].set()

    async def run(self, entries: list[SourceEntry], stream: BinaryIO | None = None, *, flush_ms: float = 5.0) -> int:
        self.stats = Progress(sum(e.size for e in entries))
        ep = self.ep = await portals.attach(self.socket_path, None, tx_pool_bytes=pool_bytes_for(self.window_bytes, self.chunk))
        log.debug("attached to the local lu2kd")
        self.window = ByteWindow(self.window_bytes)
        rx = asyncio.ensure_future(portals.receive_loop(ep, self._on_message))
        ticker = asyncio.ensure_future(self._tick()) if self.progress_cb else None
        try:
            if stream is not None:
                await self._run_stream(stream, flush_ms)
            else:
                sem = asyncio.Semaphore(self.parallel)
                dirs = [e for e in entries if e.entry is tp.Entry.DIR]
                files = [e for e in entries if e.entry is not tp.Entry.DIR]

                async def one(e: SourceEntry) -> None:
                    async with sem:
                        await self._run_entry(e)

                await asyncio.gather(*(one(e) for e in files))
                for d in dirs:  # deepest first (collect() lists them after their contents)
                    await self._run_entry(d)
        finally:
            if ticker is not None:
                ticker.cancel()
            await self._abort_unfinished()
            rx.cancel()
            await ep.detach()
        return 0

    async def _tick(self) -> None:
        assert self.progress_cb is not None
        while True:
            await asyncio.sleep(0.5)
            self.progress_cb(self.stats.line())

    async def _abort_unfinished(self) -> None:
        ep = self.ep
        if ep is None or not ep.attached:  # type: ignore[misc]
            return
        for s in self.sessions.values():
            if not s.finished:
                try:
                    await ep.send(self.dst_raw, tp.encode_abort(tp.Abort(s.sid, "sender interrupted")), self.portal, timeout=1.0)
                except (ShimError, LocalProtocolError):
                    pass
        try:
            await asyncio.wait_for(self._drain(), 2.0)
        except asyncio.TimeoutError:
            pass

    async def _drain(self) -> None:
        ep = self.ep
        while ep is not None and ep.attached and ep.stats()["in_flight"]:  # type: ignore[misc]
            await asyncio.sleep(0.02)

    def _new_sid(self) -> int:
        while True:
            sid = int.from_bytes(os.urandom(8), "little")
            if sid and sid not in self.sessions:
                return sid

    def _classify(self, s: tp.SendSession, comp: Completion) -> None:
        """A failed message of ``s``: transient (retry) or final."""
        st = comp.status or Status.PROTOCOL
        where = f"{self.dst} portal {self.portal}"
        if st is Status.NO_RECEIVER:
            if self.service_seen:
                s.transient_failure(f"the transfer service at {where} went away", transient=True)
            else:
                s.transient_failure(f"nothing receives on {where} (start `lu2k recv` or `lu2k recv --serve` there)",
                                    transient=False, outcome=tp.Outcome.NO_SERVICE)
        elif st in portals.TRANSIENT:
            s.transient_failure(f"{where}: {comp.reason or st.describe()}", transient=True)
        else:
            s.transient_failure(f"{where}: {_PERMANENT_STATUS.get(st, st.describe())}: {comp.reason}", transient=False,
                                outcome=tp.Outcome.PEER_DOWN)

    async def _send_ctl(self, s: tp.SendSession, payload: bytes) -> None:
        assert self.ep is not None
        comp = await self.ep.send(self.dst_raw, payload, self.portal)
        comp.add_done_callback(lambda c: self._ctl_done(s, c))

    def _ctl_done(self, s: tp.SendSession, c: Completion) -> None:
        if c.status is not Status.DELIVERED:
            if s.state in (tp.SendState.OFFERED, tp.SendState.ENDED, tp.SendState.SENDING):
                self._classify(s, c)
            self.wakeups[s.sid].set()

    async def _wait(self, s: tp.SendSession, timeout: float) -> bool:
        ev = self.wakeups[s.sid]
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            ev.clear()
        return True

    async def _run_entry(self, e: SourceEntry) -> None:
        s = tp.SendSession(self._new_sid(), e.name, e.size, e.mtime_ns, e.mode, e.entry, self.chunk)
        self.sessions[s.sid] = s
        self.wakeups[s.sid] = asyncio.Event()
        fd = -1
        if e.entry is tp.Entry.FILE:
            try:
                fd = os.open(e.path, os.O_RDONLY)
            except OSError as err:
                s.give_up(tp.Outcome.IO_ERROR, f"cannot read {e.path}: {err.strerror}")
        try:
            if fd >= 0 or e.entry is tp.Entry.DIR:
                await self._drive(s, fd, e)
        finally:
            if fd >= 0:
                os.close(fd)
        outcome = s.outcome if s.outcome is not None else tp.Outcome.ABORTED
        if outcome is tp.Outcome.OK:
            self.stats.files_ok += 1
        self.stats.resent += s.resent
        self.results.append((e, outcome, s.text))

    async def _drive(self, s: tp.SendSession, fd: int, e: SourceEntry) -> None:
        hasher = hashlib.sha256()
        failing_since: float | None = None
        counted: set[int] = set()
        while not s.finished:
            if self.inline and s.inline_eligible:
                content = os.pread(fd, s.size, 0) if s.size else b""
                if len(content) != s.size:
                    s.give_up(tp.Outcome.IO_ERROR, f"{s.name}: file shrank while being sent")
                    break
                await self._pace(len(content) + tp.DATA_OVERHEAD)  # --rate holds for inline bytes too
                hasher.update(content)  # the whole file: a plain re-offer's END needs its hash too
                await self._send_ctl(s, s.offer_inline(content, hasher.copy().digest()))
                self.stats.wire += s.size
                log.debug("%s: OFFER with the whole file sent", s.name)
            elif s.state in (tp.SendState.IDLE, tp.SendState.SETTLING):
                await self._send_ctl(s, s.offer())
                log.debug("%s: OFFER sent", s.name)
            if s.state is tp.SendState.OFFERED:
                if not await self._wait(s, self.reply_timeout) and s.state is tp.SendState.OFFERED:
                    s.transient_failure(f"no answer from {self.dst} within {self.reply_timeout:.0f} s", transient=True)
            if s.state is tp.SendState.SENDING:
                log.debug("%s: accepted, %d of %d chunks held", s.name, len(s.have), s.nchunks)
                failing_since = None
                for i in s.have - counted:
                    self.stats.done += min(s.chunk, s.size - i * s.chunk)
                counted |= s.have
                await self._pump(s, fd, hasher, counted)
            if s.ready_to_end():
                log.debug("%s: END sent, %d chunks in flight", s.name, len(s.in_flight))
                await self._send_ctl(s, s.end(hasher.digest()))
            if s.state is tp.SendState.ENDED:
                if not await self._wait(s, self.reply_timeout + 10.0) and s.state is tp.SendState.ENDED:
                    s.transient_failure(f"no verdict from {self.dst} within {self.reply_timeout + 10:.0f} s", transient=True)
            if s.state is tp.SendState.SETTLING:
                while s.in_flight:
                    await self._wait(s, 1.0)
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= self.retry_for:
                    s.give_up(tp.Outcome.PEER_DOWN, s.text + (f" (retried for {self.retry_for:.0f} s)" if self.retry_for else ""))
                    break
                log.info("%s: %s; re-offering", s.name, s.text)
                await asyncio.sleep(min(5.0, max(0.2, self.retry_for / 20)))
        if s.outcome is tp.Outcome.OK:  # verified at the far side: every byte counts as done (an inline file's too)
            for i in set(range(s.nchunks)) - counted:
                self.stats.done += min(s.chunk, s.size - i * s.chunk)

    async def _pace(self, n: int) -> None:
        """Wait until ``--rate`` lets ``n`` more bytes go."""
        loop = asyncio.get_running_loop()
        delay = self.bucket.delay(n, loop.time())
        while delay > 0:
            await asyncio.sleep(delay)
            delay = self.bucket.delay(n, loop.time())

    async def _pump(self, s: tp.SendSession, fd: int, hasher: Any, counted: set[int]) -> None:
        assert self.ep is not None
        ep = self.ep
        while s.state is tp.SendState.SENDING:
            nxt = s.next_chunk()
            if nxt is None:
                return  # all posted: END goes out now (see SendSession.ready_to_end)
            i, first, must_send = nxt
            off = i * s.chunk
            want = min(s.chunk, s.size - off)
            if not must_send:
                if first:
                    data = os.pread(fd, want, off)
                    if len(data) != want:
                        s.give_up(tp.Outcome.IO_ERROR, f"{s.name}: file shrank while being sent")
                        return
                    hasher.update(data)
                continue
            n = want + tp.DATA_OVERHEAD
            await self.window.acquire(n)
            await self._pace(n)
            try:
                slot = await ep.reserve(n)
            except ShimError as err:
                self.window.release(n)
                s.transient_failure(f"local lu2kd: {err}", transient=False, outcome=tp.Outcome.PEER_DOWN)
                return
            body = slot.view[tp.DATA_OVERHEAD:]
            got = os.preadv(fd, [body], off)
            if got != want:
                slot.cancel()
                self.window.release(n)
                s.give_up(tp.Outcome.IO_ERROR, f"{s.name}: file shrank while being sent")
                return
            sha = hashlib.sha256(body).digest()
            if first:
                hasher.update(body)
            slot.view[: tp.DATA_OVERHEAD] = tp.data_header(s.sid, off, sha)
            comp = slot.post(self.dst_raw, self.portal)
            s.chunk_posted(i)
            self.stats.wire += want

            def done(c: Completion, i: int = i, n: int = n, want: int = want) -> None:
                self.window.release(n)
                if c.status is Status.DELIVERED:
                    s.chunk_delivered(i)
                    if i not in counted:
                        counted.add(i)
                        self.stats.done += want
                else:
                    s.chunk_failed(i, "", transient=True)
                    self._classify(s, c)
                self.wakeups[s.sid].set()

            comp.add_done_callback(done)

    # --- streams (stdin) ---------------------------------------------------------------------

    async def _run_stream(self, stream: BinaryIO, flush_ms: float) -> None:
        """One STREAM session: OFFER, DATA as input arrives (flushed after ``flush_ms``), END."""
        assert self.ep is not None
        loop = asyncio.get_running_loop()
        sid = self._new_sid()
        s = tp.SendSession(sid, "-", 0, 0, 0, tp.Entry.STREAM, self.chunk)
        self.sessions[sid] = s
        self.wakeups[sid] = asyncio.Event()
        entry = SourceEntry("-", "-", 0, 0, 0, tp.Entry.STREAM)
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        fd = stream.fileno()

        def reader() -> None:
            while True:
                try:
                    data = os.read(fd, self.chunk)
                except OSError as err:
                    data = b""
                    log.warning("reading input: %s", err.strerror)
                asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
                if not data:
                    return

        thread = loop.run_in_executor(None, reader)
        try:
            await self._send_ctl(s, s.offer())
            while s.state is tp.SendState.OFFERED:
                if not await self._wait(s, self.reply_timeout) and s.state is tp.SendState.OFFERED:
                    s.give_up(tp.Outcome.PEER_DOWN, f"no answer from {self.dst} within {self.reply_timeout:.0f} s")
            if s.state is tp.SendState.SETTLING:
                s.give_up(tp.Outcome.PEER_DOWN, s.text)
            hasher = hashlib.sha256()
            offset = 0
            eof = False
            while s.state is tp.SendState.SENDING and not eof:
                buf = bytearray(await queue.get())
                eof = not buf
                deadline = loop.time() + flush_ms / 1000
                while not eof and len(buf) < self.chunk:
                    try:
                        more = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        break
                    if not more:
                        eof = True
                    buf += more
                while buf:
                    piece, buf = bytes(buf[: self.chunk]), buf[self.chunk :]
                    n = len(piece) + tp.DATA_OVERHEAD
                    await self.window.acquire(n)
                    delay = self.bucket.delay(n, loop.time())
                    if delay > 0:
                        await asyncio.sleep(delay)
                    hasher.update(piece)
                    comp = await self.ep.send(self.dst_raw, tp.data_header(sid, offset, hashlib.sha256(piece).digest()) + piece, self.portal)
                    offset += len(piece)
                    self.stats.wire += len(piece)

                    def done(c: Completion, n: int = n, k: int = len(piece)) -> None:
                        self.window.release(n)
                        if c.status is Status.DELIVERED:
                            self.stats.done += k
                        else:
                            self._classify(s, c)
                            if s.state is tp.SendState.SETTLING:
                                s.give_up(tp.Outcome.PEER_DOWN, s.text + " (a stream cannot be resumed)")
                        self.wakeups[sid].set()

                    comp.add_done_callback(done)
            self.stats.total = offset
            while self.window.used and s.state is tp.SendState.SENDING:
                await self._wait(s, 1.0)
            if s.state is tp.SendState.SENDING:
                s.size = offset
                await self._send_ctl(s, tp.encode_end(tp.End(sid, offset, hasher.digest())))
                s.state = tp.SendState.ENDED
                while s.state is tp.SendState.ENDED:
                    if not await self._wait(s, self.reply_timeout + 10) and s.state is tp.SendState.ENDED:
                        s.give_up(tp.Outcome.PEER_DOWN, f"no verdict from {self.dst} within {self.reply_timeout + 10:.0f} s")
                if s.state is tp.SendState.SETTLING:
                    s.give_up(tp.Outcome.PEER_DOWN, s.text)
        finally:
            if not thread.done():
                thread.cancel()  # the executor thread ends at the next read (EOF or Ctrl-C)
        self.results.append((entry, s.outcome if s.outcome is not None else tp.Outcome.ABORTED, s.text))
        if s.outcome is tp.Outcome.OK:
            self.stats.files_ok += 1


# --- receiving service -----------------------------------------------------------------------


@dataclass
class _Incoming:
    session: tp.RecvSession
    key: tuple[bytes, int, int]
    final: str
    part: str
    state_path: str
    fd: int = -1
    dirty: bool = False
    last_checkpoint: float = 0.0
    # The whole-file hash follows the written prefix: chunks are hashed in index order as the
    # prefix grows (from the message when it is the next one, else read back from the file).
    hasher: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0


class TransferService:
    """``lu2k recv --serve DIR``: many concurrent sessions from many senders into ``root``."""

    def __init__(self, socket_path: str | None, root: str, *, portal: int = portals.TRANSFER_PORTAL,
                 allow_from: list[str] | None = None, idle: float = SESSION_IDLE, say: Callable[[str], None] | None = None) -> None:
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise Lu2kError(f"receiving directory {root} does not exist or is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise Lu2kError(f"receiving directory {root} is not writable")
        self.allow = {pack_nid(n) for n in allow_from} if allow_from else None
        self.idle = idle
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.active: dict[tuple[bytes, int, int], _Incoming] = {}
        self.by_name: dict[str, tuple[bytes, int, int]] = {}
        self.finished: OrderedDict[tuple[bytes, int, int], bytes] = OrderedDict()
        self.told_unknown: dict[tuple[bytes, int, int], float] = {}
        self.service = portals.Service(socket_path, portal, self._on_message, rx_pool_bytes=256 << 20)
        self.counters = {"files": 0, "bytes": 0, "refused": 0, "failed": 0, "bad_chunks": 0}

    async def run(self) -> None:
        ticker = asyncio.ensure_future(self._housekeeping())
        try:
            await self.service.run()
        finally:
            ticker.cancel()
            for inc in list(self.active.values()):
                self._stop(inc, "receiver shutting down")

    def _reply(self, key: tuple[bytes, int, int], payload: bytes) -> None:
        ep = self.service.ep
        if ep is None:
            return

        async def go() -> None:
            try:
                comp = await ep.send(key[0], payload, key[1])
                await comp.wait()
            except ShimError:
                pass

        asyncio.ensure_future(go())

    def _on_message(self, src: bytes, src_portal: int, payload: memoryview) -> None:
        msg = tp.decode(payload)
        key = (src, src_portal, msg.sid)
        now = time.monotonic()
        if isinstance(msg, tp.Offer) and msg.inline is not None:
            offer, *rest = tp.expand(msg)
            assert isinstance(offer, tp.Offer)
            self._on_offer(key, offer, now, reply_accept=False)
            if key in self.active:  # not refused, nor answered already: the DATA and END it carries
                for part in rest:
                    self._on_part(key, part, now)
            return
        if isinstance(msg, tp.Offer):
            self._on_offer(key, msg, now)
            return
        self._on_part(key, msg, now)

    def _on_part(self, key: tuple[bytes, int, int], msg: tp.Message, now: float) -> None:
        """A DATA, END or ABORT of a session."""
        done = self.finished.get(key)
        if done is not None:
            if isinstance(msg, tp.End):
                self._reply(key, done)
            return
        inc = self.active.get(key)
        if inc is None:
            if isinstance(msg, (tp.Data, tp.End)) and now - self.told_unknown.get(key, 0.0) > 1.0:
                self.told_unknown[key] = now
                self._reply(key, tp.encode_result(tp.Result(msg.sid, tp.Outcome.UNKNOWN_SESSION, "session unknown here; offer again")))
            return
        s = inc.session
        s.last_activity = now
        try:
            if isinstance(msg, tp.Data):
                ok = hashlib.sha256(msg.payload).digest() == msg.sha
                i = s.on_data(msg, ok)
                if not ok:
                    self.counters["bad_chunks"] += 1
                if i is not None:
                    try:
                        os.pwrite(inc.fd, msg.payload, msg.offset)
                    except OSError as e:
                        self._fail_io(inc, e, "writing")
                        return
                    inc.dirty = True
                    self.counters["bytes"] += len(msg.payload)
                    ready = s.written(i)
                    try:
                        self._advance_hash(inc, i, msg.payload)
                    except OSError as e:
                        self._fail_io(inc, e, "reading back")
                        return
                    if ready:
                        self._verify(inc)
                    elif now - inc.last_checkpoint > CHECKPOINT_INTERVAL:
                        self._checkpoint(inc)
            elif isinstance(msg, tp.End):
                if s.on_end(msg):
                    self._verify(inc)
            elif isinstance(msg, tp.Abort):
                self._stop(inc, f"sender aborted ({msg.text})")
        except RemoteProtocolError as e:
            self._finish(inc, s.fail(tp.Outcome.ABORTED, f"protocol error: {e}"))
            raise

    def _on_offer(self, key: tuple[bytes, int, int], m: tp.Offer, now: float, *, reply_accept: bool = True) -> None:
        """A new session (or a repeated OFFER).  ``reply_accept`` False: an inline offer, whose
        sender waits for the RESULT only."""
        src = _src_name(key[0])
        if key in self.finished:
            self._reply(key, self.finished[key])
            return
        inc = self.active.get(key)
        if inc is not None:  # a repeated OFFER: the sender re-synchronises
            inc.session.last_activity = now
            if reply_accept:
                self._reply(key, inc.session.accept())
            return

        def refuse(outcome: tp.Outcome, text: str) -> None:
            self.counters["refused"] += 1
            self.say(f"refused {m.name!r} from {src}: {text}")
            self._reply(key, tp.encode_result(tp.Result(m.sid, outcome, text)))

        if self.allow is not None and key[0] not in self.allow:
            return refuse(tp.Outcome.REFUSED, f"{src} is not allowed to send here")
        bad = tp.check_name(m.name)
        if bad:
            return refuse(tp.Outcome.BAD_NAME, bad)
        if m.entry is tp.Entry.STREAM:
            return refuse(tp.Outcome.REFUSED, "this receiver stores files (lu2k recv --serve); a stream needs `lu2k recv -o FILE|-`")
        final = os.path.join(self.root, *m.name.split("/"))
        parent = os.path.dirname(final)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            return refuse(tp.Outcome.IO_ERROR, f"cannot create directory for {m.name}: {e.strerror}")
        if m.entry is tp.Entry.DIR:
            try:
                os.makedirs(final, exist_ok=True)
                os.chmod(final, m.mode & 0o7777)
                os.utime(final, ns=(m.mtime_ns, m.mtime_ns))
            except OSError as e:
                return refuse(tp.Outcome.IO_ERROR, f"cannot create directory {m.name}: {e.strerror}")
            result = tp.encode_result(tp.Result(m.sid, tp.Outcome.OK, ""))
            self._remember(key, result)
            self._reply(key, result)
            return
        holder = self.by_name.get(m.name)
        if holder is not None:
            other = self.active[holder]
            if holder[0] == key[0] or now - other.session.last_activity > 60.0:
                self._stop(other, "superseded by a new offer for the same file")  # the old sender is gone: resume
            else:
                return refuse(tp.Outcome.BUSY, f"{m.name} is being received from {_src_name(holder[0])} right now")
        base = os.path.basename(final)
        part = os.path.join(parent, f".{base}{tp.PART_SUFFIX}")
        state_path = os.path.join(parent, f".{base}{tp.STATE_SUFFIX}")
        s = tp.RecvSession(m.sid, src, m, last_activity=now)
        inc = _Incoming(s, key, final, part, state_path)
        try:
            st = os.stat(final)
            if stat.S_ISREG(st.st_mode) and st.st_size == m.size and st.st_mtime_ns == m.mtime_ns and not os.path.exists(state_path):
                s.existing = True
                inc.fd = os.open(final, os.O_RDONLY)
            elif stat.S_ISDIR(st.st_mode):
                return refuse(tp.Outcome.IO_ERROR, f"{m.name} is a directory at the receiver")
        except FileNotFoundError:
            pass
        except OSError as e:
            return refuse(tp.Outcome.IO_ERROR, f"{m.name}: {e.strerror}")
        if not s.existing:
            saved = _load_state(state_path)
            resume = (saved is not None and saved.get("size") == m.size and saved.get("mtime_ns") == m.mtime_ns
                      and saved.get("chunk") == m.chunk and os.path.exists(part))
            try:
                inc.fd = os.open(part, os.O_RDWR | os.O_CREAT | (0 if resume else os.O_TRUNC), 0o600)
                if resume and saved is not None:
                    s.held = tp.from_ranges((tuple(r) for r in saved.get("held", [])), s.nchunks)
                need = m.size - os.fstat(inc.fd).st_blocks * 512
                if need > 0:
                    vfs = os.statvfs(parent)
                    free = vfs.f_bavail * vfs.f_frsize
                    if free < need:
                        os.close(inc.fd)
                        return refuse(tp.Outcome.DISK_FULL, f"{m.name} needs {m.size:,} bytes, {free:,} free at the receiver")
                if m.size:
                    os.posix_fallocate(inc.fd, 0, m.size)
            except OSError as e:
                if inc.fd >= 0:
                    os.close(inc.fd)
                outcome = tp.Outcome.DISK_FULL if e.errno in (errno.ENOSPC, errno.EDQUOT) else tp.Outcome.IO_ERROR
                return refuse(outcome, f"cannot create {m.name} at the receiver: {e.strerror}")
            if s.held:
                self.say(f"resuming {m.name} from {src}: {len(s.held)} of {s.nchunks} chunks already verified")
        self.active[key] = inc
        self.by_name[m.name] = key
        if reply_accept:
            self._reply(key, s.accept())
        if s.nchunks == 0 and not s.existing:
            inc.dirty = True

    def _remember(self, key: tuple[bytes, int, int], result: bytes) -> None:
        self.finished[key] = result
        while len(self.finished) > DONE_MEMORY:
            self.finished.popitem(last=False)

    def _checkpoint(self, inc: _Incoming) -> None:
        s = inc.session
        inc.last_checkpoint = time.monotonic()
        if not inc.dirty or s.existing or inc.fd < 0:
            return
        try:
            os.fdatasync(inc.fd)
            tmp = inc.state_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"size": s.offer.size, "mtime_ns": s.offer.mtime_ns, "chunk": s.offer.chunk, "from": s.src,
                           "held": tp.to_ranges(s.held)}, f)
            os.replace(tmp, inc.state_path)
            inc.dirty = False
        except OSError as e:
            log.warning("cannot record progress of %s: %s", s.offer.name, e.strerror)

    def _close(self, inc: _Incoming) -> None:
        self.active.pop(inc.key, None)
        if self.by_name.get(inc.session.offer.name) == inc.key:
            del self.by_name[inc.session.offer.name]
        if inc.fd >= 0:
            os.close(inc.fd)
            inc.fd = -1

    def _stop(self, inc: _Incoming, why: str) -> None:
        """The session ends without a verdict: keep what was verified for a resume."""
        self._checkpoint(inc)
        s = inc.session
        kept = sum(min(s.offer.chunk, s.offer.size - i * s.offer.chunk) for i in s.held)
        self._close(inc)
        if not s.existing:
            self.say(f"{s.offer.name} from {s.src}: {why}; {kept:,} of {s.offer.size:,} bytes kept as "
                     f"{os.path.relpath(inc.part, self.root)} for a resume")

    def _finish(self, inc: _Incoming, result: bytes) -> None:
        self._close(inc)
        self._remember(inc.key, result)
        self._reply(inc.key, result)

    def _fail_io(self, inc: _Incoming, e: OSError, doing: str) -> None:
        s = inc.session
        outcome = tp.Outcome.DISK_FULL if e.errno in (errno.ENOSPC, errno.EDQUOT) else tp.Outcome.IO_ERROR
        self._checkpoint(inc)
        self.counters["failed"] += 1
        text = f"{doing} {s.offer.name} at the receiver: {e.strerror}"
        self.say(f"failed {s.offer.name} from {s.src}: {text}")
        self._finish(inc, s.fail(outcome, text))

    @staticmethod
    def _advance_hash(inc: _Incoming, i: int, payload: memoryview | bytes) -> None:
        s = inc.session
        chunk, size = s.offer.chunk, s.offer.size
        while inc.hashed < s.nchunks and inc.hashed in s.held:
            j = inc.hashed
            data = payload if j == i else os.pread(inc.fd, min(chunk, size - j * chunk), j * chunk)
            inc.hasher.update(data)
            inc.hashed += 1

    def _verify(self, inc: _Incoming) -> None:
        asyncio.ensure_future(self._verify_async(inc))

    async def _verify_async(self, inc: _Incoming) -> None:
        s = inc.session
        fd = inc.fd
        loop = asyncio.get_running_loop()
        try:
            if inc.hashed == s.nchunks and not s.existing:
                sha = inc.hasher.digest()
            else:  # verify-only, or chunks that never formed a prefix: read the file back
                sha = await loop.run_in_executor(None, _hash_fd, fd, s.offer.size)
        except OSError as e:
            self._fail_io(inc, e, "reading back")
            return
        if self.active.get(inc.key) is not inc:
            return  # superseded while hashing
        result = s.verified(sha)
        if s.outcome is tp.Outcome.OK and not s.existing:
            try:
                os.fsync(fd)
                os.fchmod(fd, s.offer.mode & 0o7777)
                os.utime(fd, ns=(s.offer.mtime_ns, s.offer.mtime_ns))
                os.replace(inc.part, inc.final)
                _remove(inc.state_path)
                dfd = os.open(os.path.dirname(inc.final), os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError as e:
                self._fail_io(inc, e, "finishing")
                return
        elif s.outcome is tp.Outcome.VERIFY_FAILED:
            _remove(inc.part)
            _remove(inc.state_path)
        if s.outcome is tp.Outcome.OK:
            self.counters["files"] += 1
            self.say(f"received {s.offer.name} ({s.offer.size:,} bytes) from {s.src}, verified"
                     + (" (already in place)" if s.existing else ""))
        else:
            self.counters["failed"] += 1
            self.say(f"failed {s.offer.name} from {s.src}: {s.text}")
        self._finish(inc, result)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for inc in list(self.active.values()):
                if inc.session.state is not tp.RecvState.RECEIVING:
                    continue
                if now - inc.session.last_activity > self.idle:
                    self._stop(inc, f"sender silent for {self.idle:.0f} s")
                elif inc.dirty and now - inc.last_checkpoint > CHECKPOINT_INTERVAL:
                    self._checkpoint(inc)
            for k, t in list(self.told_unknown.items()):
                if now - t > 60:
                    del self.told_unknown[k]


def _hash_fd(fd: int, size: int) -> bytes:
    h = hashlib.sha256()
    off = 0
    while off < size:
        data = os.pread(fd, min(4 << 20, size - off), off)
        if not data:
            break
        h.update(data)
        off += len(data)
    return h.digest()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _load_state(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


# --- one-shot stream receiver ----------------------------------------------------------------


class StreamReceiver:
    """``lu2k recv [-o FILE|-]``: takes one entry (a stream or one file), writes it in order.

    ``-o FILE`` is written as ``FILE.lu2k-part`` and renamed when the END's hash matched;
    other senders meanwhile get ``BUSY``.  Exit: 0 verified; 1 otherwise, saying why.
    """

    def __init__(self, socket_path: str | None, output: str, *, portal: int = portals.TRANSFER_PORTAL,
                 wait_timeout: float | None = None, idle_timeout: float = 120.0, quiet: bool = False) -> None:
        self.socket_path, self.output, self.portal = socket_path, output, portal
        self.wait_timeout, self.idle_timeout, self.quiet = wait_timeout, idle_timeout, quiet
        self.key: tuple[bytes, int, int] | None = None
        self.reasm = tp.StreamReassembly(STREAM_REORDER_LIMIT)
        self.hasher = hashlib.sha256()
        self.out: BinaryIO | None = None
        self.part = output + tp.PART_SUFFIX if output != "-" else ""
        self.end: tp.End | None = None
        self.verdict: asyncio.Future[tuple[int, str]] | None = None
        self.last = time.monotonic()
        self.ep: AsyncEndpoint | None = None
        self.sends: set[asyncio.Future[Any]] = set()

    def _reply(self, key: tuple[bytes, int, int], payload: bytes) -> None:
        ep = self.ep
        if ep is None or not ep.attached:  # type: ignore[misc]
            return

        async def go() -> None:
            try:
                c = await ep.send(key[0], payload, key[1])
                await c.wait(10.0)
            except ShimError:
                pass

        fut = asyncio.ensure_future(go())
        self.sends.add(fut)
        fut.add_done_callback(self.sends.discard)

    def _conclude(self, status: int, text: str) -> None:
        if self.verdict is not None and not self.verdict.done():
            self.verdict.set_result((status, text))

    def _on_message(self, src: bytes, src_portal: int, payload: memoryview) -> None:
        msg = tp.decode(payload)
        key = (src, src_portal, msg.sid)
        if isinstance(msg, tp.Offer) and msg.inline is not None:
            offer, *rest = tp.expand(msg)
            assert isinstance(offer, tp.Offer)
            if self._on_offer(key, offer, reply_accept=False):
                for part in rest:
                    self._on_part(key, part)
            return
        if isinstance(msg, tp.Offer):
            self._on_offer(key, msg)
            return
        self._on_part(key, msg)

    def _on_offer(self, key: tuple[bytes, int, int], msg: tp.Offer, *, reply_accept: bool = True) -> bool:
        """True if this is the transfer this receiver takes (now or already)."""
        src = key[0]
        if self.key is None:
            if msg.entry is tp.Entry.DIR:
                text = "this receiver takes one stream or file (use lu2k recv --serve DIR for directories)"
                self._reply(key, tp.encode_result(tp.Result(msg.sid, tp.Outcome.REFUSED, text)))
                return False
            try:
                self.out = sys.stdout.buffer if self.output == "-" else open(self.part, "wb")
            except OSError as e:
                self._reply(key, tp.encode_result(tp.Result(msg.sid, tp.Outcome.IO_ERROR, f"cannot write {self.output}: {e.strerror}")))
                self._conclude(1, f"cannot write {self.output}: {e.strerror}")
                return False
            self.key = key
            if not self.quiet:
                what = "a stream" if msg.entry is tp.Entry.STREAM else f"{msg.name} ({msg.size:,} bytes)"
                print(f"lu2k recv: receiving {what} from {_src_name(src)}", file=sys.stderr)
        if key == self.key:
            if reply_accept:
                self._reply(key, tp.encode_accept(tp.Accept(msg.sid, ())))
            return True
        self._reply(key, tp.encode_result(tp.Result(msg.sid, tp.Outcome.BUSY, f"this receiver is taking a transfer from {_src_name(self.key[0])}")))
        return False

    def _on_part(self, key: tuple[bytes, int, int], msg: tp.Message) -> None:
        """A DATA, END or ABORT of the transfer this receiver takes (others are answered or dropped)."""
        if key != self.key:
            if isinstance(msg, (tp.Data, tp.End)):
                self._reply(key, tp.encode_result(tp.Result(msg.sid, tp.Outcome.UNKNOWN_SESSION, "not the transfer this receiver takes")))
            return
        self.last = time.monotonic()
        if isinstance(msg, tp.Data):
            if hashlib.sha256(msg.payload).digest() != msg.sha:
                self._reply(key, tp.encode_result(tp.Result(msg.sid, tp.Outcome.VERIFY_FAILED, f"chunk at offset {msg.offset} failed its SHA-256")))
                self._conclude(1, f"chunk at offset {msg.offset} arrived corrupt")
                return
            assert self.out is not None
            try:
                for piece in self.reasm.feed(msg.offset, msg.payload):
                    self.out.write(piece)
                    self.hasher.update(piece)
                if self.output == "-":
                    self.out.flush()
            except OSError as e:
                text = f"writing {self.output}: {e.strerror}"
                outcome = tp.Outcome.DISK_FULL if e.errno in (errno.ENOSPC, errno.EDQUOT) else tp.Outcome.IO_ERROR
                self._reply(key, tp.encode_result(tp.Result(msg.sid, outcome, text)))
                self._conclude(1, text)
                return
        elif isinstance(msg, tp.End):
            self.end = msg
        elif isinstance(msg, tp.Abort):
            self._conclude(1, f"the sender gave up ({msg.text}) after {self.reasm.next:,} bytes")
            return
        if self.end is not None and self.reasm.next >= self.end.size and not self.reasm.held:
            if self.reasm.next == self.end.size and self.hasher.digest() == self.end.sha:
                try:
                    assert self.out is not None
                    self.out.flush()
                    if self.output != "-":
                        os.fsync(self.out.fileno())
                        self.out.close()
                        os.replace(self.part, self.output)
                except OSError as e:
                    self._reply(key, tp.encode_result(tp.Result(msg.sid, tp.Outcome.IO_ERROR, f"finishing {self.output}: {e.strerror}")))
                    self._conclude(1, f"finishing {self.output}: {e.strerror}")
                    return
                self._reply(key, tp.encode_result(tp.Result(msg.sid, tp.Outcome.OK, "")))
                self._conclude(0, f"received {self.reasm.next:,} bytes intact (sha256 {self.hasher.hexdigest()[:16]}…)")
            else:
                self._reply(key, tp.encode_result(tp.Result(msg.sid, tp.Outcome.VERIFY_FAILED, "whole-stream SHA-256 mismatch")))
                self._conclude(1, f"stream corrupt: {self.reasm.next:,} bytes, sender sent {self.end.size:,}; checksum mismatch")

    async def run(self) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        self.verdict = loop.create_future()
        self.ep = await portals.attach(self.socket_path, self.portal, rx_pool_bytes=128 << 20)
        rx = asyncio.ensure_future(portals.receive_loop(self.ep, self._on_message))
        rx.add_done_callback(lambda f: self._conclude(1, f"lost the local lu2kd: {f.result() if not f.cancelled() else 'cancelled'}"))
        if not self.quiet:
            print(f"lu2k recv: waiting on portal {self.portal} of {self.ep.local_nid}", file=sys.stderr, flush=True)  # type: ignore[misc]
        started = time.monotonic()
        try:
            while not self.verdict.done():
                await asyncio.wait([self.verdict], timeout=1.0)
                now = time.monotonic()
                if self.key is None and self.wait_timeout is not None and now - started > self.wait_timeout:
                    self._conclude(1, f"no sender within {self.wait_timeout:g} s")
                elif self.key is not None and self.idle_timeout and now - self.last > self.idle_timeout:
                    self._conclude(1, f"the sender went silent for {self.idle_timeout:g} s after {self.reasm.next:,} bytes")
            status, text = self.verdict.result()
            if self.sends:
                await asyncio.wait(list(self.sends), timeout=5.0)
        finally:
            rx.cancel()
            await self.ep.detach()
            if self.out is not None and self.output != "-" and not self.out.closed:
                self.out.close()
        if status and self.key is not None and self.output != "-":
            text += f"; partial output left as {self.part}"
        return status, text


def install_interrupt(main: "asyncio.Task[Any]") -> None:
    """SIGINT/SIGTERM cancel ``main`` (which then aborts its sessions politely)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)

