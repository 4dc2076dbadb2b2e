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
    passed = [lim.allow(f"peer-{i}", 0.0) for i in range(100)]  # hostile variety
    assert len(lim._kinds) == 4  # a, b, peer-0 and the bucket every further kind shares
    assert passed[:3] == [0, 0, None] and passed.count(None) == 98  # peer-0, then one line of the shared bucket


def test_tokens_come_back_at_burst_per_interval() -> None:
    lim = LogLimiter(burst=2, interval=10.0)
    assert [lim.allow("k", 0.0) for _ in range(3)] == [0, 0, None]
    assert lim.allow("k", 4.9) is None  # 0.98 of a token
    assert lim.allow("k", 5.0) == 2 and lim.allow("k", 5.0) is None
