"""Sealing and opening small frames, in one process: CPU microseconds per frame.

Seals 256 MSG frames of ``SIZE`` bytes (argument, default 64) once per frame (as the tcp
transport did before it sealed runs) and as one batch, then opens the sealed stream with
:class:`lu2k.crypto.SealedDecoder`.  Best of 30 repetitions of ``time.process_time`` -- stable
on a shared machine, unlike rates.

    PYTHONPATH=$PWD python benchmarks/sealed_frames_micro.py 64
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lu2k import crypto, wire  # noqa: E402

KEY = bytes(range(32))


def main() -> int:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    frames = []
    for i in range(256):
        p = memoryview(bytearray(size))
        frames.append((wire.encode_msg_header(i, b"a" * 20, b"b" * 20, 1, 2, p, False), p))

    def best(fn: Callable[[], object], reps: int = 30) -> float:
        b = 1e9
        for _ in range(reps):
            t = time.process_time()
            fn()
            b = min(b, time.process_time() - t)
        return b / len(frames) * 1e6

    s = crypto.FrameSealer(KEY)
    print(f"seal one frame per call: {best(lambda: [x for f in frames for x in s.seal((f,))]):.2f} us/frame")
    print(f"seal the batch at once:  {best(lambda: s.seal(frames)):.2f} us/frame")
    stream = b"".join(bytes(h) + bytes(p) for h, p in crypto.FrameSealer(KEY).seal(frames))

    def open_all() -> None:
        d = crypto.SealedDecoder(KEY, 1 << 20)
        d.feed(stream)
        assert len(d.frames()) == len(frames)

    print(f"open:                    {best(open_all):.2f} us/frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
