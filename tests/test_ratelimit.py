"""LogLimiter: pure, driven with explicit times."""

from __future__ import annotations

from lu2k.ratelimit import LogLimiter


def test_burst_then_suppressed_then_reported() -> None:
    lim = LogLimiter(burst=3, interval=10.0)
    assert [lim.allow("refused", 0.0) for _ in range(3)] == [0, 0, 0]
    assert [lim.allow("refused", 1.0) for _ in range(1000)] == [None] * 1000
    assert lim.suppressed("refused") == 1000
    # Next window: the first line through says how many were swallowed.
    assert lim.allow("refused", 10.0) == 1000
    assert lim.allow("refused", 10.5) == 0 and lim.suppressed("refused") == 0


def test_kinds_are_independent_and_bounded() -> None:
    lim = LogLimiter(burst=1, interval=5.0, max_kinds=4)
    assert lim.allow("a", 0.0) == 0 and lim.allow("a", 0.0) is None
    assert lim.allow("b", 0.0) == 0
    for i in range(100):  # hostile variety: the table stays at max_kinds
        lim.allow(f"peer-{i}", 0.0)
    assert len(lim._kinds) == 4
