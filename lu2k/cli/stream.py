"""``lu2k send NID [FILE|-]`` and ``lu2k recv [-o FILE|-]``: pipe a byte stream across lu2k.

The stream is cut into chunks, each sent as one lu2k message with a small header
(:data:`CHUNK`: stream id, chunk index, flags).  Messages of different sizes may take
different connections (socklnd's typed connections) and may be resent after a reconnect,
so the receiver puts chunks back in order with a bounded reorder window.  The last message
carries the total length and a SHA-256 of the whole stream, which the receiver checks
before it reports success: a stream either arrives intact or the command fails.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys
import time
from collections import deque
from typing import BinaryIO

from ..errors import LocalProtocolError, Lu2kError, MessageFailed
from ..nid import parse_nid

CHUNK = struct.Struct("<IQQI")  # magic, stream id, chunk index, flags
END = struct.Struct("<Q32s")  # total bytes, sha256 (payload of the END chunk)
STREAM_MAGIC = 0x53324C55
FLAG_END = 1
DEFAULT_CHUNK = 1 << 20


class Progress:
    """A one-line progress display on stderr, only when it is a terminal."""

    def __init__(self, label: str, total: int | None = None, enabled: bool | None = None) -> None:
        self.label, self.total = label, total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and not force):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            text = f"\r{self.label} [{bar:<30}] {frac:6.1%} {self.done / 1e6:,.1f} MB {rate / 1e6:,.1f} MB/s"
        else:
            text = f"\r{self.label} {self.done / 1e6:,.1f} MB {rate / 1e6:,.1f} MB/s"
        sys.stderr.write(text)
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self.update(0, force=True)
            sys.stderr.write("\n")


def _open_in(path: str) -> BinaryIO:
    return sys.stdin.buffer if path == "-" else open(path, "rb")


def _open_out(path: str) -> BinaryIO:
    return sys.stdout.buffer if path == "-" else open(path, "wb")


def cmd_send(args: argparse.Namespace) -> int:
    from ..kernel_shim.endpoint import Endpoint

    dst = parse_nid(args.nid)
    if args.chunk < 1 or args.chunk > (4 << 20) - CHUNK.size:
        raise LocalProtocolError(f"--chunk must be 1..{(4 << 20) - CHUNK.size} bytes")
    stream_id = int.from_bytes(os.urandom(8), "little")
    digest = hashlib.sha256()
    total = 0
    src = _open_in(args.file)
    size_hint = os.fstat(src.fileno()).st_size if args.file != "-" else None
    progress = Progress(f"send -> {dst}", size_hint or None, None if not args.quiet else False)
    pending: deque = deque()
    index = 0
    with Endpoint.attach(args.socket, portal=args.src_portal) as ep:

        def settle(limit: int) -> None:
            while len(pending) > limit:
                comp = pending.popleft()
                comp.wait(args.timeout)
                try:
                    comp.result()
                except MessageFailed as e:
                    raise Lu2kError(f"chunk {index} of the stream failed: {e.reason}") from None

        while True:
            slot = ep.reserve(CHUNK.size + args.chunk)
            n = src.readinto(slot.view[CHUNK.size :])  # type: ignore[attr-defined]
            if not n:
                slot.cancel()
                break
            CHUNK.pack_into(slot.view, 0, STREAM_MAGIC, stream_id, index, 0)
            digest.update(slot.view[CHUNK.size : CHUNK.size + n])
            pending.append(slot.post(dst, portal=args.portal, length=CHUNK.size + n))
            index += 1
            total += n
            progress.update(n)
            settle(args.window)
        end = CHUNK.pack(STREAM_MAGIC, stream_id, index, FLAG_END) + END.pack(total, digest.digest())
        pending.append(ep.send(dst, end, portal=args.portal))
        settle(0)
    progress.finish()
    if args.file != "-":
        src.close()
    if not args.quiet:
        print(f"sent {total:,} bytes in {index} messages to {dst} (sha256 {digest.hexdigest()[:16]}…)", file=sys.stderr)
    return 0


def cmd_recv(args: argparse.Namespace) -> int:
    from ..kernel_shim.endpoint import Endpoint

    out = _open_out(args.output)
    digest = hashlib.sha256()
    written = 0
    next_index = 0
    stream_id: int | None = None
    held: dict[int, bytes] = {}
    end_at: tuple[int, int, bytes] | None = None  # (index, total, sha)
    progress = Progress("recv", None, None if not args.quiet else False)
    with Endpoint.attach(args.socket, portal=args.portal) as ep:
        while end_at is None or next_index < end_at[0]:
            with ep.recv(timeout=args.timeout) as msg:
                data = msg.payload
                if len(data) < CHUNK.size:
                    raise Lu2kError(f"message from {msg.src} is not a lu2k stream chunk ({len(data)} bytes)")
                magic, sid, index, flags = CHUNK.unpack_from(data)
                if magic != STREAM_MAGIC:
                    raise Lu2kError(f"message from {msg.src} is not a lu2k stream chunk")
                if stream_id is None:
                    stream_id = sid
                elif sid != stream_id:
                    print(f"lu2k recv: ignoring a message of another stream from {msg.src}", file=sys.stderr)
                    continue
                if flags & FLAG_END:
                    total, sha = END.unpack_from(data, CHUNK.size)
                    end_at = (index, total, sha)
                    continue
                body = data[CHUNK.size :]
                if index == next_index:
                    out.write(body)
                    digest.update(body)
                    written += len(body)
                    progress.update(len(body))
                    next_index += 1
                elif index > next_index:
                    if len(held) >= args.reorder_window:
                        raise Lu2kError(f"reorder window of {args.reorder_window} chunks exceeded (waiting for chunk {next_index})")
                    held[index] = bytes(body)
                # index < next_index cannot happen: lu2k delivers each message once.
            while next_index in held:
                body = held.pop(next_index)
                out.write(body)
                digest.update(body)
                written += len(body)
                progress.update(len(body))
                next_index += 1
    out.flush()
    progress.finish()
    if args.output != "-":
        out.close()
    assert end_at is not None
    _, total, sha = end_at
    if total != written or sha != digest.digest():
        raise Lu2kError(f"stream corrupt: got {written} bytes (sender sent {total}), checksum {'mismatch' if sha != digest.digest() else 'ok'}")
    if not args.quiet:
        print(f"received {written:,} bytes intact (sha256 {digest.hexdigest()[:16]}…)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("send", help="stream a file or stdin to a NID")
    s.add_argument("nid", help="destination NID, e.g. 10.0.0.2@tcp")
    s.add_argument("file", nargs="?", default="-", help="file to send (default stdin)")
    s.add_argument("--portal", type=int, default=0, help="destination portal (default 0)")
    s.add_argument("--src-portal", type=int, default=1, help="portal this sender binds (default 1)")
    s.add_argument("--chunk", type=int, default=DEFAULT_CHUNK - CHUNK.size, help="payload bytes per message")
    s.add_argument("--window", type=int, default=32, help="messages in flight")
    s.add_argument("--timeout", type=float, default=None, help="seconds to wait for each completion")
    s.add_argument("--socket", default=None, help="the local lu2kd's shim socket")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_send)
    r = sub.add_parser("recv", help="receive one stream and write it to a file or stdout")
    r.add_argument("-o", "--output", default="-", help="output file (default stdout)")
    r.add_argument("--portal", type=int, default=0, help="portal to bind (default 0)")
    r.add_argument("--timeout", type=float, default=None, help="give up after this many idle seconds")
    r.add_argument("--reorder-window", type=int, default=256, help="chunks held while waiting for a gap")
    r.add_argument("--socket", default=None, help="the local lu2kd's shim socket")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_recv)
