"""Helpers shared by the tests that run real lu2kd pairs with shim endpoints (any backend).

Messages carry ``HDR`` (index, CRC32 of the body) so a receiver can check integrity and
exactly-once delivery without knowing the sender's plan.
"""

from __future__ import annotations

import random
import struct
import threading
import time
import zlib
from pathlib import Path
from collections import Counter
from typing import Any

from lu2k.kernel_shim.endpoint import Endpoint

HDR = struct.Struct("<II")  # index, crc32 of the body


class Receiver(threading.Thread):
    """Receives on an endpoint, checking each message's checksum and uniqueness."""

    def __init__(self, shim_path: str, expect: int, portal: int = 0, hold: threading.Event | None = None,
                 idle_timeout: float = 90) -> None:
        super().__init__(daemon=True)
        self.ep = Endpoint.attach(shim_path, portal=portal)
        self.expect, self.hold, self.idle_timeout = expect, hold, idle_timeout
        self.seen: Counter[int] = Counter()
        self.corrupt = 0
        self.sources: set[str] = set()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.hold is not None:
                self.hold.wait(120)
            while sum(self.seen.values()) < self.expect:
                msg = self.ep.recv(timeout=self.idle_timeout)
                if msg is None:
                    raise TimeoutError(f"receiver idle for {self.idle_timeout} s after {sum(self.seen.values())} messages")
                with msg:
                    index, crc = HDR.unpack_from(msg.payload)
                    if zlib.crc32(msg.payload[HDR.size :]) != crc:
                        self.corrupt += 1
                    self.seen[index] += 1
                    self.sources.add(str(msg.src))
        except BaseException as e:
            self.error = e
        finally:
            self.ep.detach()


class CountingReceiver(threading.Thread):
    """Receives until ``stop`` is set, counting each message index (duplicates included).

    With ``expect_src``, messages from other NIDs are only counted as ``foreign``; a payload
    too short for the header counts as corrupt."""

    def __init__(self, shim_path: str, expect_src: str | None = None) -> None:
        super().__init__(daemon=True)
        self.ep = Endpoint.attach(shim_path, portal=0)
        self.expect_src = expect_src
        self.seen: Counter[int] = Counter()
        self.corrupt = 0
        self.foreign = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                msg = self.ep.recv(timeout=0.2)
                if msg is None:
                    continue
                with msg:
                    if self.expect_src is not None and str(msg.src) != self.expect_src:
                        self.foreign += 1
                    elif len(msg.payload) < HDR.size:
                        self.corrupt += 1
                    else:
                        index, crc = HDR.unpack_from(msg.payload)
                        self.corrupt += zlib.crc32(msg.payload[HDR.size :]) != crc
                        self.seen[index] += 1
        except BaseException as e:
            self.error = e
        finally:
            self.ep.detach()


def make_message(index: int, size: int, rnd: random.Random) -> bytes:
    body = rnd.randbytes(max(0, size - HDR.size))
    return HDR.pack(index, zlib.crc32(body)) + body


def check_complete(r: dict[str, Any], count: int) -> None:
    """A lab transfer report (lu2k.lab.bench.transfer): every message once, intact, completed."""
    assert r["messages"] == count, r
    assert r["duplicates"] == 0 and r["corrupt"] == 0, r
    assert r["sender"]["delivered"] == count and not r["sender"]["failed"], r["sender"]


def lab_transfer(backend: str, specs: Any, workdir: Path, **transfer_args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bring up a lab on ``specs`` with two lu2kd over ``backend``, run one
    :func:`lu2k.lab.bench.transfer`; its result and the lab's counters afterwards."""
    from lu2k.lab.bench import LabDaemons, transfer
    from lu2k.lab.netns import Lab

    with Lab(specs) as lab:
        with LabDaemons(lab, backend, workdir) as daemons:
            r = transfer(lab, daemons, **transfer_args)
        return r, lab.stats()


def lab_transfer_across_outage(backend: str, specs: Any, workdir: Path, outage_s: float, *,
                               options: dict[str, Any] | None = None,
                               **transfer_args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """As :func:`lab_transfer`, with the link taken down both ways for ``outage_s`` seconds
    once the transfer is under way (progress seen by the emulator, not a guessed time);
    ``options`` go to both daemons' backend."""
    from lu2k.lab.bench import LabDaemons, transfer
    from lu2k.lab.netns import Lab

    with Lab(specs) as lab:
        with LabDaemons(lab, backend, workdir, extra_options=options) as daemons:
            out: dict[str, Any] = {}

            def run() -> None:
                try:
                    out["r"] = transfer(lab, daemons, **transfer_args)
                except Exception as e:  # handed to the test thread below
                    out["e"] = e

            t = threading.Thread(target=run, daemon=True)  # a test stopped at its limit does not wait for it
            t.start()
            while lab.stats()["links"]["ab"]["packets_out"] < 200 and t.is_alive():
                time.sleep(0.05)
            lab.set_link(False)
            while lab.stats()["links"]["ab"]["drops_down"] < 5 and t.is_alive():
                time.sleep(0.05)
            time.sleep(outage_s)
            lab.set_link(True)
            t.join(240)
            assert not t.is_alive()
        stats = lab.stats()
    if "e" in out:
        raise out["e"]
    return out["r"], stats
