"""``lu2k send NID PATH...|-`` and ``lu2k recv [-o FILE|-] | --serve DIR``: files and streams across lu2k.

The protocol is :mod:`lu2k.apps.transfer_proto` (sessions, per-chunk and whole-file SHA-256,
resume); the asyncio side is :mod:`lu2k.apps.transfer`.  This module parses arguments,
prints progress and summaries, and turns outcomes into exit statuses:

0 everything written and verified at the destination; 1 other failure (interrupted,
protocol, several causes); 2 bad usage or missing input; 3 peer down or no receiver;
4 refused (not allowed, bad name, busy, different file in place); 5 the receiver could not
write (disk full, I/O error); 6 verification failed; 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from ..apps import portal as portals
from ..apps import transfer_proto as tp
from ..errors import Lu2kError
from ..nid import parse_nid
from ..values import parse_rate

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if t[-1:] in units else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 130816, 64k, 24m)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return n


def _rate(text: str) -> float:
    try:
        return parse_rate(text, "--rate", allow_unlimited=True, unit_required=True)
    except Lu2kError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Line:
    """The progress line: redrawn in place on a terminal, silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.drawn = False

    def __call__(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\x1b[K{text}")
            sys.stderr.flush()
            self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def cmd_send(args: argparse.Namespace) -> int:
    from ..apps.transfer import Sender, collect, install_interrupt

    dst = str(parse_nid(args.nid, resolve=False))
    paths = args.paths or ["-"]
    stream = "-" in paths
    if stream and len(paths) > 1:
        raise Lu2kError("'-' (stdin) cannot be combined with files")
    entries, problems = ([], []) if stream else collect(paths)
    for p in problems:
        print(f"lu2k send: {p}", file=sys.stderr)
    if problems and not args.skip_unreadable:
        print("lu2k send: nothing sent (fix the paths above, or pass --skip-unreadable)", file=sys.stderr)
        return EXIT_USAGE
    line = _Line(sys.stderr.isatty() and not args.quiet)
    sender = Sender(args.socket, dst, portal=args.portal, chunk=args.chunk, window=args.window, rate_bps=args.rate,
                    parallel=args.parallel, retry_for=args.retry_for, reply_timeout=args.reply_timeout,
                    progress=line if line.enabled else None, inline=not args.no_inline)

    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None
        install_interrupt(task)
        try:
            await sender.run(entries, sys.stdin.buffer if stream else None, flush_ms=args.flush_ms)
        except asyncio.CancelledError:
            return EXIT_INTERRUPTED
        return 0

    t0 = time.monotonic()
    interrupted = asyncio.run(main()) == EXIT_INTERRUPTED
    line.clear()
    status = 0
    for e, outcome, text in sender.results:
        if outcome is not tp.Outcome.OK:
            print(f"lu2k send: {e.name}: {outcome.name.lower().replace('_', ' ')}: {text}", file=sys.stderr)
            code = tp.EXIT_STATUS.get(outcome, 1)
            status = code if not status or status == code else 1
    if problems:
        status = status or 1
    if interrupted:
        unfinished = len(entries or [None]) - len(sender.results)
        print(f"lu2k send: interrupted; {sender.stats.files_ok} verified, {unfinished} unfinished (rerun the same command to resume)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.quiet:
        el = time.monotonic() - t0
        n = len(sender.results)
        verdict = "all verified at the destination" if not status else f"{n - sender.stats.files_ok} of {n} NOT transferred"
        what = "stream" if stream else f"{n} entr{'y' if n == 1 else 'ies'}"
        print(f"sent {what} to {dst}: {sender.stats.line(final=True)} in {el:,.1f} s; {verdict}", file=sys.stderr)
    return status


def cmd_recv(args: argparse.Namespace) -> int:
    from ..apps.transfer import StreamReceiver, TransferService

    if args.serve:
        if args.output != "-":
            raise Lu2kError("--serve DIR and -o are exclusive")
        service = TransferService(args.socket, args.serve, portal=args.portal, allow_from=args.allow_from,
                                  say=None if not args.quiet else (lambda text: None))

        async def serve() -> int:
            task = asyncio.current_task()
            assert task is not None
            from ..apps.transfer import install_interrupt

            install_interrupt(task)
            if not args.quiet:
                print(f"lu2k recv: serving {service.root} on portal {args.portal}", file=sys.stderr, flush=True)
            try:
                await service.run()
            except asyncio.CancelledError:
                return 0
            return 0

        return asyncio.run(serve())
    if args.output != "-":
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise Lu2kError(f"cannot write {args.output}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise Lu2kError(f"cannot write {args.output}: directory {parent} is not writable")
        if os.path.isdir(args.output):
            raise Lu2kError(f"cannot write {args.output}: it is a directory (use --serve DIR to receive files into it)")
    receiver = StreamReceiver(args.socket, args.output, portal=args.portal, wait_timeout=args.timeout,
                              idle_timeout=args.idle_timeout, quiet=args.quiet)

    async def main() -> tuple[int, str]:
        task = asyncio.current_task()
        assert task is not None
        from ..apps.transfer import install_interrupt

        install_interrupt(task)
        try:
            return await receiver.run()
        except asyncio.CancelledError:
            return EXIT_INTERRUPTED, "interrupted" + (f"; partial output left as {receiver.part}" if receiver.key and receiver.part else "")

    status, text = asyncio.run(main())
    if status:
        print(f"lu2k recv: {text}", file=sys.stderr)
    elif not args.quiet:
        print(text, file=sys.stderr)
    return status


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("send", help="send files, directories or stdin to a NID (verified, resumable)",
                       description="Send files and directories (names, sizes, modes, mtimes kept) or stdin ('-') to "
                                   "`lu2k recv` at NID.  Exit 0 only when everything is written and verified there.")
    s.add_argument("nid", help="destination NID, e.g. 10.0.0.2@tcp")
    s.add_argument("paths", nargs="*", metavar="PATH", help="files/directories to send, or '-' for stdin (default)")
    s.add_argument("--portal", type=int, default=portals.TRANSFER_PORTAL, help="the receiver's portal (default %(default)s)")
    s.add_argument("--chunk", type=_size, default=tp.DEFAULT_CHUNK, help="payload bytes per message (default %(default)s)")
    s.add_argument("--window", type=_size, default=24 << 20, help="bytes in flight (default 24m)")
    s.add_argument("--rate", type=_rate, default=0.0, help="cap this transfer's payload rate, e.g. 5mbit (default unlimited)")
    s.add_argument("--parallel", type=int, default=4, help="files in flight at once (default %(default)s)")
    s.add_argument("--retry-for", type=float, default=60.0, metavar="SECONDS",
                   help="keep retrying an interrupted file this long before giving up (default %(default)s)")
    s.add_argument("--reply-timeout", type=float, default=30.0, metavar="SECONDS", help="wait this long for each answer (default %(default)s)")
    s.add_argument("--flush-ms", type=float, default=5.0, help="stdin: send what was read after this many ms (default %(default)s)")
    s.add_argument("--no-inline", action="store_true",
                   help="offer small files plainly too (OFFER, DATA, END), for receivers of an lu2k without inline offers")
    s.add_argument("--skip-unreadable", action="store_true", help="send the rest when some paths are missing/unreadable (exit 1)")
    s.add_argument("--socket", default=None, help="the local lu2kd's shim socket")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress or summary (errors still printed)")
    s.set_defaults(func=cmd_send)
    r = sub.add_parser("recv", help="receive one stream/file (-o) or serve a directory (--serve)",
                       description="Without --serve: take one stream or file and write it to -o FILE (renamed into place "
                                   "when verified) or stdout.  With --serve DIR: store every file sent here, many senders "
                                   "at once, resumable.")
    r.add_argument("-o", "--output", default="-", help="output file (default stdout)")
    r.add_argument("--serve", metavar="DIR", help="run as a service storing files under DIR")
    r.add_argument("--allow-from", action="append", metavar="NID", help="--serve: accept only these senders (repeatable)")
    r.add_argument("--portal", type=int, default=portals.TRANSFER_PORTAL, help="portal to bind (default %(default)s)")
    r.add_argument("--timeout", type=float, default=None, help="give up if no sender starts within this many seconds")
    r.add_argument("--idle-timeout", type=float, default=120.0, help="give up when the sender is silent this long (default %(default)s)")
    r.add_argument("--socket", default=None, help="the local lu2kd's shim socket")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_recv)
