"""The asker that keeps lu2kd's loop from waiting on libudt (lu2k/backends/udt_asking.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from lu2k.backends.udt_asking import Asker, NotAnswered


def test_answers_and_raised_errors_come_back_to_the_caller() -> None:
    asker = Asker("t-asker", stuck_after=5)
    assert asker.ask(lambda: 42, 5) == 42
    with pytest.raises(ValueError, match="no such socket"):
        asker.ask(lambda: (_ for _ in ()).throw(ValueError("no such socket")), 5)
    assert asker.ask(lambda: "again", 5) == "again" and asker.silent_for() == 0.0


def test_a_question_that_hangs_is_not_waited_for_twice_and_nothing_more_is_asked_meanwhile() -> None:
    asker = Asker("t-asker-stuck", stuck_after=0.1)
    release, asked = threading.Event(), []

    def stuck() -> str:
        asked.append("stuck")
        release.wait(30)
        return "late"

    try:
        with pytest.raises(NotAnswered, match="has not answered for"):
            asker.ask(stuck, 0.1)
        # Meanwhile: no second question reaches the thread, and the caller does not wait.
        with pytest.raises(NotAnswered) as again:
            asker.ask(lambda: asked.append("second"), 30)
        assert again.value.seconds >= 0.1 and asker.silent_for() >= 0.1
        assert asker.submit(lambda: asked.append("third"), lambda ok, v: None) is False
    finally:
        release.set()
    got: list[Any] = []
    done = threading.Event()
    # Once the stuck one is over, the next question is asked as usual, by the same one thread.
    for _ in range(200):
        if asker.submit(lambda: threading.current_thread().name, lambda ok, v: (got.append((ok, v)), done.set())):
            break
        time.sleep(0.05)  # the stuck question's thread is still finishing it
    assert done.wait(5) and got == [(True, "t-asker-stuck")]
    assert asked == ["stuck"] and asker.silent_for() == 0.0
    assert [t.name for t in threading.enumerate()].count("t-asker-stuck") == 1


def test_questions_wait_their_turn_behind_one_in_progress_and_their_number_is_bounded() -> None:
    # Two nets' watchdogs ask in the same second: the later question waits, it is not dropped.
    asker = Asker("t-asker-turns", stuck_after=30, max_waiting=2)
    release, started, answered = threading.Event(), threading.Event(), threading.Event()
    answers: list[Any] = []

    def slow() -> str:
        started.set()
        release.wait(30)
        return "slow"

    def note(ok: bool, value: Any) -> None:
        answers.append(value)
        if len(answers) == 3:
            answered.set()

    try:
        assert asker.submit(slow, note) and started.wait(5)
        assert asker.submit(lambda: "second", note) and asker.submit(lambda: "third", note)
        assert not asker.submit(lambda: "fourth", note)  # two wait their turn already
    finally:
        release.set()
    assert answered.wait(5) and answers == ["slow", "second", "third"]
