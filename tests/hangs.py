"""The test processes of a run that did not end normally, and what they were running.

tests/conftest.py keeps one file per test process in a run's hang directory, naming the test it
is running, and removes it when the process ends normally.  A file left behind belongs to a
process that hung (the hang guard wrote every thread's stack into it and ended the process) or
that the run's own limit stopped (contrib/run-tests.sh sends SIGUSR1 first, which writes the
stacks).  The pytest controller reports them in its summary; contrib/run-tests.sh once more at
the very end of its log.

Usage: python tests/hangs.py DIR      (prints nothing when every process ended normally)
"""

from __future__ import annotations

import sys
from pathlib import Path

# Frames every test shares; leaving them out keeps the report to the lines that tell tests apart.
COMMON_FRAMES = ("/_pytest/", "/pluggy/", "/xdist/", "/execnet/", "/pytest_timeout.py", 'File "<string>"')
MAX_LINES = 120
TEST_LINE = "test: "
# What faulthandler's watchdog writes first; a SIGUSR1 dump has no such line.
WATCHDOG_MARK = "Timeout ("


def header(nodeid: str, started: str) -> str:
    return f"{TEST_LINE}{nodeid}\nstarted: {started}\n"


def left_behind(hang_dir: Path) -> list[Path]:
    return sorted(hang_dir.glob("*.txt")) if hang_dir.is_dir() else []


def hung_before(hang_dir: Path, nodeid: str) -> Path | None:
    """The file of an earlier process of this run in which ``nodeid`` hung, if any."""
    for path in left_behind(hang_dir):
        text = path.read_text(errors="replace")
        if text.startswith(f"{TEST_LINE}{nodeid}\n") and WATCHDOG_MARK in text:
            return path
    return None


def report(path: Path) -> list[str]:
    lines = path.read_text(errors="replace").splitlines()
    head = [line for line in lines[:2] if line.startswith((TEST_LINE, "started:"))]
    stacks = [line for line in lines[len(head):] if not any(frame in line for frame in COMMON_FRAMES)]
    how = "hung" if any(WATCHDOG_MARK in line for line in stacks) else "stopped while running"
    out = [f"== {path.stem} {how}: {head[0][len(TEST_LINE):] if head else 'no test had started'}", *head[1:]]
    if not stacks:
        out.append("   (no stacks: the process ended before it could write them)")
    out.extend(stacks[:MAX_LINES])
    if len(stacks) > MAX_LINES:
        out.append(f"   ... {len(stacks) - MAX_LINES} more lines in {path}")
    return out


def report_all(hang_dir: Path) -> list[str]:
    files = left_behind(hang_dir)
    if not files:
        return []
    lines = [f"{len(files)} test process(es) did not end normally (files in {hang_dir}):"]
    for path in files:
        lines.extend(report(path))
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    for line in report_all(Path(argv[1])):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
