"""lu2k.cli.main: each subcommand loads only its own module; the full parser still knows them all."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from lu2k.cli.main import SUBCOMMANDS, build_parser, main


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_every_command_is_mapped_to_the_module_that_adds_it() -> None:
    assert _commands(build_parser()) == set(SUBCOMMANDS)
    for command, module in SUBCOMMANDS.items():
        assert command in _commands(build_parser(command)), (command, module)
        assert _commands(build_parser(command)) == {c for c, m in SUBCOMMANDS.items() if m == module}


def test_send_does_not_import_the_benchmarks_or_the_lab() -> None:
    code = ("import json, sys\nfrom lu2k.cli.main import main\ntry:\n    main(['send', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('lu2k'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    assert "lu2k.cli.stream" in loaded and "usage: lu2k send" in out.stdout
    assert not loaded & {"lu2k.cli.bench", "lu2k.cli.demo", "lu2k.cli.lab", "lu2k.lab.bench", "lu2k.lab.netns"}, loaded


def test_unknown_command_and_top_level_help_list_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err and all(c in err for c in SUBCOMMANDS)
    assert main([]) == 2  # no command: the whole help
    out = capsys.readouterr().out
    assert all(c in out for c in SUBCOMMANDS)
