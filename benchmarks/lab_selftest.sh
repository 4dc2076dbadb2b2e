#!/usr/bin/env bash
# The link emulator's own ceiling: UDP blast through an uncapped lab link (no delay, then
# 300 ms one-way), and a paced 45 Mbit/s load on a 50 Mbit/s, 300 ms link for lateness.
# Needs root (network namespaces, TUN).  Prints a table; --json adds the raw figures.
set -euo pipefail
exec "${PYTHON:-python3}" -m lu2k.cli.main lab selftest --duration "${DURATION:-5}" "$@"
