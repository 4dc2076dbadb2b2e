"""``lu2k``: stream data, run the demo, benchmarks and the link lab.

Subcommands live in their own modules, each exposing ``register(subparsers)``; a module
whose optional dependencies are missing simply does not add its subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import Lu2kError

# Each module: def register(subparsers: argparse._SubParsersAction) -> None, setting
# ``func`` (argparse.Namespace -> int exit status) on the parsers it adds.
SUBCOMMAND_MODULES = [
    "lu2k.cli.stream",  # send, recv
    "lu2k.cli.forward",  # forward (TCP ports, SOCKS5)
    "lu2k.cli.demo",  # demo
    "lu2k.cli.bench",  # bench loopback / link / matrix
    "lu2k.cli.lab",  # lab up / down / status
    "lu2k.cli.keys",  # keygen (site keys and certificates)
    "lu2k.cli.lnet",  # lnet nid / nidlist / networks / ip2nets / routes / check
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lu2k", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lu2k {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # module not written (yet); its optional deps are its own business
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _autocomplete(parser)
    args = parser.parse_args(argv)
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
