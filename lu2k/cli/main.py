"""``lu2k``: stream data, run the demo, benchmarks and the link lab.

Subcommands live in their own modules, each exposing ``register(subparsers)``; a module
whose optional dependencies are missing simply does not add its subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..errors import Lu2kError

# Which module adds each subcommand, in help order.  Each module has
# def register(subparsers: argparse._SubParsersAction) -> None, setting ``func``
# (argparse.Namespace -> int exit status) on the parsers it adds.  ``lu2k send`` imports only
# lu2k.cli.stream, not the benchmarks and the lab (about 0.4 s of start-up, paid by every transfer).
SUBCOMMANDS = {
    "send": "lu2k.cli.stream", "recv": "lu2k.cli.stream",
    "forward": "lu2k.cli.forward",  # TCP ports, SOCKS5
    "demo": "lu2k.cli.demo",
    "bench": "lu2k.cli.bench",  # loopback / link / matrix / transfer / latency
    "lab": "lu2k.cli.lab",  # up / down / status / ...
    "keygen": "lu2k.cli.keys",  # site keys and certificates
    "lnet": "lu2k.cli.lnet",  # nid / nidlist / networks / ip2nets / routes / check
}
SUBCOMMAND_MODULES = list(dict.fromkeys(SUBCOMMANDS.values()))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (``command`` one of :data:`SUBCOMMANDS`) only that command's."""
    parser = argparse.ArgumentParser(prog="lu2k", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lu2k {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [SUBCOMMANDS[command]] if command in SUBCOMMANDS else SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # module not written (yet); its optional deps are its own business
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    completing = "_ARGCOMPLETE" in os.environ  # completion needs every command
    parser = build_parser(None if completing or not args_in else args_in[0])
    _autocomplete(parser)
    args = parser.parse_args(args_in)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Lu2kError as e:
        print(f"lu2k: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _autocomplete(parser: argparse.ArgumentParser) -> None:
    """Shell completion when argcomplete is installed and the shell asked for it (docs/user/install.md)."""
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


if __name__ == "__main__":
    sys.exit(main())
