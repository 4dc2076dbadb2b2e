"""Asking libudt from the event loop without ever waiting on it for long.

libudt's figures (``perfmon``, ``getsockopt``, the control's state through ``UDT_CC``) look the
socket up under libudt's one global lock.  That lock was once seen held for good (the garbage
collector joining a receive thread stuck on a reused descriptor, see ``_udt/udtcore.cpp``):
every later lookup waited with it, and a daemon whose loop asked for figures froze whole --
every connection, the control socket, shutdown.

So the loop never calls those itself.  :class:`Asker` runs them in one thread of its own, in
turn: the loop hands a question over and either waits a bounded time for the answer (``ask``)
or has it delivered later (``submit``).  Once a question has gone unanswered for ``stuck_after``
seconds no more are taken -- a stuck libudt costs the loop one bounded wait, then "not
answered" at once, and never a pile of threads -- and :meth:`Asker.silent_for` says for how
long.  Questions waiting their turn are bounded too (``max_waiting``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
Answer = Callable[[bool, Any], None]  # (answered normally, result or the exception raised)


class NotAnswered(Exception):
    """The question in progress has not been answered (for ``seconds``)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"libudt has not answered for {seconds:.1f} s")
        self.seconds = seconds


class Asker:
    """One thread answering questions in turn; started at the first question."""

    def __init__(self, name: str, stuck_after: float, max_waiting: int = 64) -> None:
        self._name = name
        self._stuck_after = stuck_after
        self._max_waiting = max_waiting
        self._cv = threading.Condition()
        self._waiting: deque[tuple[Callable[[], Any], Answer]] = deque()
        self._asked_at: float | None = None  # monotonic time the question in progress was taken
        self._thread: threading.Thread | None = None

    def silent_for(self) -> float:
        """Seconds the question in progress has gone unanswered; 0 when none is."""
        with self._cv:
            return self._silent_for()

    def _silent_for(self) -> float:
        return 0.0 if self._asked_at is None else max(0.0, time.monotonic() - self._asked_at)

    def submit(self, question: Callable[[], Any], on_answer: Answer) -> bool:
        """Ask ``question``; ``on_answer`` is called in the asking thread.  False (and nothing
        asked) while the question in progress is stuck, or too many wait their turn."""
        with self._cv:
            if self._silent_for() >= self._stuck_after or len(self._waiting) >= self._max_waiting:
                return False
            self._waiting.append((question, on_answer))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify()
        return True

    def ask(self, question: Callable[[], T], wait: float) -> T:
        """The answer, or what the question raised; :class:`NotAnswered` after ``wait`` s, or at
        once while the question in progress is stuck."""
        done = threading.Event()
        box: list[Any] = []

        def on_answer(ok: bool, value: Any) -> None:
            box.extend((ok, value))
            done.set()

        if not self.submit(question, on_answer) or not done.wait(wait):
            raise NotAnswered(self.silent_for())
        ok, value = box
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting:
                    self._cv.wait()
                question, on_answer = self._waiting.popleft()
                self._asked_at = time.monotonic()
            try:
                result: Any = question()
                ok = True
            except Exception as e:  # noqa: BLE001 - carried to whoever asked
                result, ok = e, False
            with self._cv:
                self._asked_at = None
            on_answer(ok, result)
