#!/usr/bin/env python3
"""Write man pages for lu2k(1), lu2kd(8) and lu2kctl(8) from their argparse definitions.

    python3 contrib/gen-manpages.py [--out DIR]      # default: build/man

One page per program: NAME, SYNOPSIS, DESCRIPTION, OPTIONS, then a section per
subcommand (recursively: ``lu2kctl net show``) with its own usage and options, and SEE
ALSO.  Everything comes from the parsers the programs run, so a page cannot drift from
the command.  View one with ``man -l build/man/lu2kctl.8``; install with
``install -m 644 build/man/*.1 /usr/local/share/man/man1/`` (and ``*.8`` to ``man8``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lu2k import __version__  # noqa: E402

PROGRAMS = [  # (name, section, module:function building the parser, one-line description)
    ("lu2k", 1, "lu2k.cli.main:build_parser", "lu2k tools: send and receive data, demo, benchmarks, the link lab, keys, LNet checks"),
    ("lu2kd", 8, "lu2k.daemon:build_parser", "the lu2k daemon: an LNet-style transport gateway for long, lossy links"),
    ("lu2kctl", 8, "lu2k.cli.ctl:build_parser", "control a running lu2kd with lnetctl's commands"),
]


def _esc(text: str) -> str:
    """Text safe for roff: backslashes, leading dots/quotes, hyphens that are minus signs."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, sub, helps.get(name, "")


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            metavar = ""
            if action.nargs != 0:
                metavar = " " + (action.metavar if isinstance(action.metavar, str) else action.dest.upper())
            head = ", ".join(f"\\fB{_esc(o)}\\fR" for o in action.option_strings) + _esc(metavar)
        else:
            head = f"\\fI{_esc(action.metavar if isinstance(action.metavar, str) else action.dest)}\\fR"
        help_text = (action.help or "") % {"default": action.default, "prog": parser.prog} if action.help else ""
        if action.choices and not isinstance(action.choices, dict):
            help_text += f" (one of: {', '.join(map(str, action.choices))})"
        out += [".TP", head, _esc(help_text) if help_text else ""]
    return out


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split()).removeprefix("usage: ")


def _walk(parser: argparse.ArgumentParser, path: list[str], lines: list[str]) -> list[str]:
    names = []
    for name, sub, help_text in _subcommands(parser):
        full = path + [name]
        names.append(" ".join(full))
        lines += [f".SS {_esc(' '.join(full))}", _esc(help_text or sub.description or ""), ".PP", f"\\fB{_esc(_usage(sub))}\\fR"]
        opts = _options(sub)
        if opts:
            lines += [".PP", "Options:", *opts]
        names += _walk(sub, full, lines)
    return names


def page(name: str, section: int, parser: argparse.ArgumentParser, summary: str) -> tuple[str, list[str]]:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible builds
    date = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).date() if epoch else datetime.date.today()
    lines = [
        f'.TH {name.upper()} {section} "{date.isoformat()}" "lu2k {__version__}" "lu2k"',
        ".SH NAME", f"{name} \\- {_esc(summary)}",
        ".SH SYNOPSIS", f"\\fB{_esc(_usage(parser))}\\fR",
        ".SH DESCRIPTION", _esc(parser.description or summary),
        ".SH OPTIONS", *_options(parser),
    ]
    body: list[str] = []
    commands = _walk(parser, [name], body)
    if commands:
        lines += [".SH COMMANDS", *body]
    others = [f"\\fB{n}\\fR({s})" for n, s, _, _ in PROGRAMS if n != name]
    lines += [".SH SEE ALSO", ", ".join(others) + ", \\fBlnetctl\\fR(8); the manual in docs/ of the lu2k sources"]
    return "\n".join(line for line in lines if line is not None) + "\n", commands


def build(out: Path) -> dict[str, list[str]]:
    """Write every page into ``out``; returns {file name: the subcommands it documents}."""
    import importlib

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, section, target, summary in PROGRAMS:
        module, _, func = target.partition(":")
        parser = getattr(importlib.import_module(module), func)()
        parser.prog = name
        text, commands = page(name, section, parser, summary)
        path = out / f"{name}.{section}"
        path.write_text(text)
        written[path.name] = commands
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/man", help="output directory (default build/man)")
    args = ap.parse_args()
    for fname, commands in build(Path(args.out)).items():
        print(f"{Path(args.out) / fname}: {len(commands)} subcommand(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
