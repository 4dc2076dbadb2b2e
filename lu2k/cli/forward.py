"""``lu2k forward``: TCP port forwarding (and a SOCKS5 listener) across lu2k.

Listening site::

    lu2k forward --to 10.0.0.2@tcp --listen 127.0.0.1:2222 --target 10.9.0.5:22
    lu2k forward --to 10.0.0.2@tcp --socks 127.0.0.1:1080

Far site (connects only to what ``--allow`` permits)::

    lu2k forward --serve --allow 10.9.0.5:22 --allow 10.9.0.0/24:80-443

See :mod:`lu2k.apps.forward_proto` for the flow protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..apps import forward_proto as fp
from ..apps import portal as portals
from ..errors import ConfigError, Lu2kError
from ..nid import parse_nid


def _window(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    try:
        n = int(float(t[:-1]) * units[t[-1]]) if t[-1:] in units else int(t)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 8m)") from None
    if not 0 < n <= fp.MAX_WINDOW:
        raise argparse.ArgumentTypeError(f"window {text!r} outside 1..1g")
    return n


def cmd_forward(args: argparse.Namespace) -> int:
    from ..apps.forward import ForwardClient, ForwardService
    from ..apps.transfer import install_interrupt

    if args.serve:
        if args.to or args.listen or args.socks:
            raise Lu2kError("--serve takes --allow rules only (no --to/--listen/--socks)")
        rules = [fp.parse_allow(a) for a in args.allow or []]
        service = ForwardService(args.socket, rules, portal=args.portal, window=args.window, max_flows=args.max_flows)

        async def serve() -> int:
            task = asyncio.current_task()
            assert task is not None
            install_interrupt(task)
            if not args.quiet:
                print(f"lu2k forward: serving on portal {args.portal}; allowed: {', '.join(str(r) for r in rules)}",
                      file=sys.stderr, flush=True)
            try:
                await service.run()
            except asyncio.CancelledError:
                pass
            return 0

        return asyncio.run(serve())

    if not args.to:
        raise Lu2kError("--to NID is required (the far site running `lu2k forward --serve`)")
    if args.allow:
        raise Lu2kError("--allow belongs to the far side (--serve)")
    if bool(args.listen) != bool(args.target):
        raise Lu2kError("--listen and --target go together")
    if not args.listen and not args.socks:
        raise Lu2kError("nothing to do: give --listen ADDR:PORT --target HOST:PORT and/or --socks ADDR:PORT")
    dst = str(parse_nid(args.to, resolve=False))
    listen = fp.parse_hostport(args.listen, what="--listen", any_port=True) if args.listen else None
    if args.target:
        fp.parse_hostport(args.target, what="--target")
    socks = fp.parse_hostport(args.socks, what="--socks", any_port=True) if args.socks else None
    client = ForwardClient(args.socket, dst, portal=args.portal, window=args.window, max_flows=args.max_flows)

    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None
        install_interrupt(task)
        await client.start()
        try:
            if listen is not None:
                h, p = await client.listen(listen[0], listen[1], args.target)
                print(f"lu2k forward: listening on {h}:{p} -> {args.target} via {dst}", file=sys.stderr, flush=True)
            if socks is not None:
                h, p = await client.listen(socks[0], socks[1], None)
                print(f"lu2k forward: SOCKS5 on {h}:{p} via {dst}", file=sys.stderr, flush=True)
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass
        finally:
            await client.close()
        return 0

    try:
        return asyncio.run(main())
    except ConfigError as e:
        raise Lu2kError(str(e)) from None


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    f = sub.add_parser("forward", help="forward TCP ports (or SOCKS5) to another site across lu2k",
                       description="At the listening site: --to NID with --listen ADDR:PORT --target HOST:PORT and/or "
                                   "--socks ADDR:PORT.  At the far site: --serve --allow HOST:PORT (repeatable); the far "
                                   "site opens the TCP connections, only to allowed targets.")
    f.add_argument("--to", metavar="NID", help="the far site's NID (its lu2kd runs `lu2k forward --serve`)")
    f.add_argument("--listen", metavar="ADDR:PORT", help="accept TCP connections here (port 0: any free port)")
    f.add_argument("--target", metavar="HOST:PORT", help="where the far site connects them")
    f.add_argument("--socks", metavar="ADDR:PORT", help="also accept SOCKS5 (CONNECT, no auth) here; the client names the target")
    f.add_argument("--serve", action="store_true", help="run the far-site service")
    f.add_argument("--allow", action="append", metavar="HOST:PORT",
                   help="--serve: a target the service may connect (name, address or CIDR; port, a-b or *); repeatable")
    f.add_argument("--portal", type=int, default=portals.FORWARD_PORTAL, help="the service's portal (default %(default)s)")
    f.add_argument("--window", type=_window, default=fp.DEFAULT_WINDOW, help="bytes in flight per connection and direction (default 8m)")
    f.add_argument("--max-flows", type=int, default=1024, help="connections at once (default %(default)s)")
    f.add_argument("--socket", default=None, help="the local lu2kd's shim socket")
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(func=cmd_forward)
