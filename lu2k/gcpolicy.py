"""The cyclic garbage collector's settings for a long-running lu2k process.

A busy daemon makes tens of thousands of short-lived objects a second (on the QUIC path
aioquic's per-packet records, their frames and delivery handlers, kept for a round trip), so
CPython's collector runs often, and each older-generation pass walks every object the
process has: the imported modules of aioquic, cryptography and lu2k itself, which never
become garbage.  Measured on the QUIC transport alone (``benchmarks/quic_link.py``, see
docs/performance.md): freezing what start-up made cuts the sender's CPU per byte by about
7 %, and a larger young generation by a little more.

Freezing moves every object alive at that moment into a permanent generation the collector
never walks; objects made later are collected as before.  The young generation's larger
threshold lets at most that many more container objects wait for collection, a few MB.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # container allocations between young-generation passes (CPython: 700)


def settle() -> None:
    """Call once the process has started (modules imported, configuration loaded)."""
    gc.collect()  # what start-up left as garbage is freed, not frozen
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(YOUNG_THRESHOLD, young), middle, old)
