"""How long the first request and answer take between two freshly started daemons.  Needs root.

A fresh lab and fresh ``lu2kd`` pair per run (the lab's link, no loss by default).  An
application at A sends one small request to B; an application at B answers it as soon as it
arrives; A's application times the request and the answer from the moment it sent.  Nothing
was connected before: the request waits for A's connection set-up, and the answer either goes
on A's own connection while B's connection back is still set up (``return_path: auto``, the
default, over a backend with typed connections) or waits for B's connection (``connect``).
Both are run, alternating, so the two columns come from the same minutes of the same machine.

    python benchmarks/first_answer.py --backend tcp --runs 3
    python benchmarks/first_answer.py --backend udt --rtt 600ms --runs 2 --json

Prints one line per run and the median of each mode; ``--json`` adds the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lu2k.errors import Lu2kError  # noqa: E402

PORTAL = 9


def one_run(backend: str, mode: str, rtt: str, rate: str, loss: str, seed: int) -> dict[str, Any]:
    from lu2k.kernel_shim.endpoint import Endpoint
    from lu2k.lab.bench import LabDaemons
    from lu2k.lab.netns import Lab
    from lu2k.lab.spec import build_specs

    specs = build_specs("custom", rate=rate, rtt=rtt, loss=loss, seed=seed)
    with tempfile.TemporaryDirectory(prefix="lu2k-first-answer-") as d, \
            Lab(specs, lab_id="fa" + secrets.token_hex(2)) as lab, \
            LabDaemons(lab, backend, Path(d), net_settings={"return_path": mode}) as daemons:
        answered = threading.Event()
        failure: list[str] = []

        def answer() -> None:
            try:
                with Endpoint.attach(daemons.shim("b"), portal=PORTAL) as ep:
                    ready.set()
                    msg = ep.recv(timeout=60)
                    if msg is None:
                        failure.append("B: no request within 60 s")
                        return
                    src = msg.src
                    msg.release()
                    done = ep.send(src, b"answer", portal=PORTAL)
                    done.result(60)
                    answered.set()
            except Exception as e:  # reported by the main thread
                failure.append(f"B: {type(e).__name__}: {e}")
                ready.set()

        ready = threading.Event()
        worker = threading.Thread(target=answer, daemon=True)
        worker.start()
        ready.wait(30)
        with Endpoint.attach(daemons.shim("a"), portal=PORTAL) as ep:
            t0 = time.monotonic()
            sent = ep.send(daemons.nids["b"], b"request", portal=PORTAL)
            got = ep.recv(timeout=60)
            t1 = time.monotonic()
            if got is not None:
                got.release()
            sent.result(60)
        worker.join(60)
        if failure or got is None:
            raise RuntimeError(failure[0] if failure else "A: no answer within 60 s")
        return {"backend": backend, "mode": mode, "seed": seed, "seconds": round(t1 - t0, 3),
                "answers_on_peer_connection": daemons.counter("b", "return_paths_early") or 0}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="tcp", choices=("tcp", "quic", "udt"))
    ap.add_argument("--rtt", default="600ms")
    ap.add_argument("--rate", default="20mbit")
    ap.add_argument("--loss", default="0%")
    ap.add_argument("--runs", type=_positive, default=3, help="runs of each mode")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for i in range(args.runs):
        for mode in ("auto", "connect"):
            try:
                r = one_run(args.backend, mode, args.rtt, args.rate, args.loss, seed=100 + i)
            except (Lu2kError, RuntimeError) as e:
                print(f"first_answer: {args.backend} {mode} run {i + 1}: {e}", file=sys.stderr)
                return 1
            rows.append(r)
            print(f"{args.backend} {mode:8s} run {i + 1}: request to answer {r['seconds']:.2f} s"
                  f" (answers on the peer's connection: {r['answers_on_peer_connection']})", flush=True)
    for mode in ("auto", "connect"):
        print(f"median {mode}: {statistics.median(r['seconds'] for r in rows if r['mode'] == mode):.2f} s")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
