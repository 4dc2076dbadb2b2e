"""``lu2k bench latency``: one-way message latency at a steady offered load, lu2k next to kernel TCP BBR.

A goodput benchmark keeps the link full and so measures queueing; a site that streams video
or forwards interactive traffic runs *below* the link rate, where what matters is how long
each message takes and what a lost packet costs.  One run, all on one lab (same link, same
seed):

1. ``lu2kd`` in each namespace (the :class:`~lu2k.lab.bench.LabDaemons` of ``bench link``);
2. for every (message size, load) cell, a *paced* sender in namespace a posts one message
   every ``size * 8 / (load * rate)`` seconds through the shim, stamping each with the time it
   was *scheduled* (CLOCK_MONOTONIC is not namespaced, so both ends read the same clock): a
   sender held back by lu2k's back-pressure therefore counts that wait as latency;
3. the receiver in namespace b records ``arrival - scheduled`` for the messages after the
   warm-up; p50 / p99 / p99.9 / max are reported against the *floor*, the one-way delay plus
   the message's serialization time at the link rate;
4. the same cells over kernel TCP BBR (``TCP_NODELAY``, an app-limited stream of stamped
   records) as the anchor.

Loss that costs a retransmission round trip shows up as the gap between p99 and the floor:
at 1 % loss without forward error correction, expect one RTT on the tail.

The helpers that run inside the namespaces are this module's ``python -m lu2k.lab.latency``
subcommands; each prints one JSON line as its result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, Lu2kError, NetworkError, ShimError
from .spec import LinkSpec, format_rate, parse_fraction, parse_size

STAMP = struct.Struct("<Qd")  # sequence number, scheduled send time (CLOCK_MONOTONIC)
RECORD = struct.Struct("<IQd")  # TCP anchor: record length, sequence number, scheduled send time
DEFAULT_SIZES = (1024, 64 * 1024)
DEFAULT_LOADS = (0.5, 0.8)
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
MAX_SAMPLES = 1 << 20
MAX_RECORD = 16 << 20
PRIMING_SEQ = (1 << 64) - 1  # the paced sender's unmeasured first message (see _lu2k_sender)
SATURATOR_PORTAL, SINK_PORTAL = 2, 3  # the second endpoint pair of a --saturate run (the paced one: 1 -> 0)


# --- pure parts --------------------------------------------------------------------------------


def send_interval(size: int, rate_bps: float, load: float) -> float:
    """Seconds between messages so that ``size``-byte messages offer ``load`` of ``rate_bps``."""
    if size <= 0 or rate_bps <= 0 or not 0 < load <= 1.0:
        raise ConfigError(f"need size > 0, a link rate and 0 < load <= 1 (size {size}, rate {rate_bps}, load {load})", where="bench latency")
    return size * 8 / (rate_bps * load)


def floor_ms(spec: LinkSpec, size: int) -> float:
    """The least one-way latency the link allows a ``size``-byte message: delay + serialization."""
    serialization = size * 8 / spec.rate_bps if spec.rate_bps else 0.0
    return (spec.delay_s + serialization) * 1e3


def percentiles(samples_s: Sequence[float]) -> dict[str, float | None]:
    """p50 / p99 / p99.9 / max in milliseconds (nearest rank); None for an empty sample."""
    if not samples_s:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    s = sorted(samples_s)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] * 1e3

    return {"p50_ms": rank(0.5), "p99_ms": rank(0.99), "p999_ms": rank(0.999), "max_ms": s[-1] * 1e3}


def cdf(samples_s: Sequence[float], points: int = 200) -> list[tuple[float, float]]:
    """(latency ms, fraction of messages at or below it), thinned to about ``points`` points."""
    s = sorted(samples_s)
    if not s:
        return []
    step = max(1, len(s) // points)
    out = [(s[i] * 1e3, (i + 1) / len(s)) for i in range(0, len(s), step)]
    if out[-1][1] != 1.0:
        out.append((s[-1] * 1e3, 1.0))
    return out


class RecordDecoder:
    """Splits the TCP anchor's byte stream into (seq, scheduled) records.  Pure.

    Each record is ``RECORD`` (its total length included) followed by padding up to that
    length; a length smaller than the header or beyond ``MAX_RECORD`` is a corrupt stream.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need: int | None = None
        self._pending = (0, 0.0)

    def feed(self, data: bytes | memoryview) -> list[tuple[int, float]]:
        self._buf += data
        out: list[tuple[int, float]] = []
        while True:
            if self._need is None:
                if len(self._buf) < RECORD.size:
                    return out
                length, seq, sched = RECORD.unpack_from(self._buf)
                if not RECORD.size <= length <= MAX_RECORD:
                    raise NetworkError(f"corrupt latency stream: record length {length}")
                self._need = length
                self._pending = (seq, sched)
            if len(self._buf) < self._need:
                return out
            del self._buf[: self._need]
            self._need = None
            out.append(self._pending)


def encode_record(seq: int, scheduled: float, size: int) -> bytes:
    size = max(size, RECORD.size)
    return RECORD.pack(size, seq, scheduled) + bytes(size - RECORD.size)


@dataclass
class Schedule:
    """When message ``k`` is due: ``start + k * interval``.  Pure."""

    start: float
    interval: float

    def due(self, k: int) -> float:
        return self.start + k * self.interval

    def count(self, seconds: float) -> int:
        return max(1, int(seconds / self.interval))


def credits_for(spec: LinkSpec, size: int) -> int:
    """Peer credits that let ``size``-byte messages fill the link: two BDPs of them (at least 256).

    A credit is a message in flight until its end-to-end ACK, so small messages need many: 1 KiB
    messages on a 20 Mbit/s, 600 ms hop need ~1 500 just to carry the link's rate.
    """
    bdp = spec.rate_bps * spec.rtt_s / 8 if spec.rate_bps else 0.0
    return int(min(1 << 16, max(256, 2 * bdp / max(size, 1))))


def parse_loads(values: Iterable[str]) -> tuple[float, ...]:
    loads = []
    for v in values:
        f = parse_fraction(v, what="--loads")
        if not 0 < f <= 1:
            raise ConfigError(f"a load must be above 0 and at most 100%, got {v!r}", where="--loads")
        loads.append(f)
    if not loads:
        raise ConfigError("give at least one load", where="--loads")
    return tuple(loads)


def parse_sizes(values: Iterable[str]) -> tuple[int, ...]:
    sizes = []
    for v in values:
        n = parse_size(v, what="--sizes")
        if n < STAMP.size or n > 4 << 20:
            raise ConfigError(f"a message size must be {STAMP.size} B .. 4 MiB, got {v!r}", where="--sizes")
        sizes.append(n)
    if not sizes:
        raise ConfigError("give at least one size", where="--sizes")
    return tuple(sizes)


def _sleep_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


# --- helpers that run inside the namespaces -----------------------------------------------------


def _lu2k_receiver(args: argparse.Namespace) -> dict[str, Any]:
    from ..kernel_shim.endpoint import Endpoint

    samples: list[float] = []
    seen: set[int] = set()
    dups = 0
    with Endpoint.attach(args.socket, portal=0) as ep:
        print("listening", flush=True)
        deadline = time.monotonic() + args.max_time
        idle_until = time.monotonic() + args.idle_timeout
        while len(seen) < args.count:
            now = time.monotonic()
            if now > deadline or now > idle_until:
                break
            msg = ep.recv(timeout=0.2)
            if msg is None:
                continue
            with msg:
                now = time.monotonic()
                idle_until = now + args.idle_timeout
                seq, scheduled = STAMP.unpack_from(msg.payload)
                if seq == PRIMING_SEQ:
                    continue
                if seq in seen:
                    dups += 1
                    continue
                seen.add(seq)
                if seq >= args.skip and len(samples) < MAX_SAMPLES:
                    samples.append(now - scheduled)
    return {"received": len(seen), "duplicates": dups, "missing": args.count - len(seen), "samples": samples}


class Completions:
    """A paced sender's posted messages, oldest first: counts them delivered or failed (by
    status name) as their completions come in."""

    def __init__(self) -> None:
        self.pending: deque[Any] = deque()
        self.delivered = 0
        self.failed: dict[str, int] = {}

    def settle(self, block: bool) -> None:
        """Count the completions that are in (``block``: first wait up to 1 s for the oldest).

        Only the oldest is waited for: a sender pushed back needs one TX slot, and waiting for
        every message in flight would idle it for a round trip and then make it burst a whole
        window, the back-pressure feeding itself (seconds of send lag on a GEO link)."""
        pending = self.pending
        while pending and (pending[0].done or block):
            comp = pending[0]
            if not comp.done and not comp.wait(1.0):
                return
            block = False
            pending.popleft()
            if comp.status == 0:
                self.delivered += 1
            else:
                key = getattr(comp.status, "name", str(comp.status))
                self.failed[key] = self.failed.get(key, 0) + 1

    def drain(self, limit_s: float = 120.0) -> None:
        end = time.monotonic() + limit_s
        while self.pending and time.monotonic() < end:
            self.settle(block=True)

    def summary(self, sent: int) -> dict[str, Any]:
        return {"sent": sent, "delivered": self.delivered, "failed": self.failed, "unsettled": len(self.pending)}


def _lu2k_sender(args: argparse.Namespace) -> dict[str, Any]:
    from ..kernel_shim.endpoint import Endpoint
    from .bench import tx_pool_bytes

    done = Completions()
    stalls = 0
    lag_max = 0.0

    # A TX slot is held until the end-to-end ACK: the pool must hold a round trip of messages
    # or the pool, not the path, sets the rate.
    with Endpoint.attach(args.socket, portal=1, tx_pool_bytes=tx_pool_bytes(args.size, args.in_flight)) as ep:
        # One unmeasured message first, answered before the schedule starts.  It brings the
        # connection up (a QUIC handshake and the hello: over a second on GEO), and lu2k lets a
        # destination that has not answered lately hold only a few messages (so a receiver that
        # stopped reading cannot take every credit).  Either would hold the first round trip of
        # a cell back, leaving a backlog that 20 % spare capacity drains for seconds.
        slot = ep.reserve(args.size, timeout=30)
        STAMP.pack_into(slot.view, 0, PRIMING_SEQ, time.monotonic())
        slot.post(args.to, portal=0).result(timeout=30)
        sched = Schedule(time.monotonic() + 0.2, args.interval)
        for k in range(args.count):
            due = sched.due(k)
            _sleep_until(due)
            while True:
                try:
                    slot = ep.reserve(args.size, timeout=0)
                    break
                except ShimError:
                    # No free TX buffer: lu2k is pushing back.  Wait; the stamp keeps the due time,
                    # so the wait shows up as latency, as it would for an application.
                    stalls += 1
                    ep.poll()
                    done.settle(block=bool(done.pending))
            STAMP.pack_into(slot.view, 0, k, due)
            done.pending.append(slot.post(args.to, portal=0))
            lag_max = max(lag_max, time.monotonic() - due)
            ep.poll()
            done.settle(block=False)
        done.drain()
    return {**done.summary(args.count), "backpressure_waits": stalls, "max_send_lag_ms": lag_max * 1e3}


def _lu2k_sink(args: argparse.Namespace) -> dict[str, Any]:
    """The saturating endpoint's peer: take every message, count them, hand the buffers back."""
    from ..kernel_shim.endpoint import Endpoint

    received = nbytes = 0
    first = last = 0.0
    with Endpoint.attach(args.socket, portal=SINK_PORTAL) as ep:
        print("listening", flush=True)
        deadline = time.monotonic() + args.max_time
        idle_until = deadline
        while time.monotonic() < min(deadline, idle_until):
            msg = ep.recv(timeout=0.2)
            if msg is None:
                continue
            last = time.monotonic()
            first = first or last
            idle_until = last + args.idle_timeout
            with msg:
                received += 1
                nbytes += len(msg.payload)
    span = last - first
    return {"received": received, "bytes": nbytes, "carried_mbit": nbytes * 8 / span / 1e6 if span > 0 else 0.0}


def _lu2k_saturator(args: argparse.Namespace) -> dict[str, Any]:
    """An endpoint offering more than the link carries: posts as fast as lu2k takes messages.

    Its only limit is its own TX pool (``--in-flight`` messages): when lu2k holds that many,
    ``reserve`` finds no buffer and the sender waits for a completion -- the back-pressure the
    saturating endpoint must see.  Reports how often and how long it waited.
    """
    from ..kernel_shim.endpoint import Endpoint
    from .bench import tx_pool_bytes

    pending: deque[Any] = deque()
    sent = delivered = failed = stalls = 0
    blocked = 0.0

    def settle() -> None:
        nonlocal delivered, failed
        while pending and pending[0].done:
            comp = pending.popleft()
            if comp.status == 0:
                delivered += 1
            else:
                failed += 1

    with Endpoint.attach(args.socket, portal=SATURATOR_PORTAL, tx_pool_bytes=tx_pool_bytes(args.size, args.in_flight)) as ep:
        start = time.monotonic()
        end = start + args.duration
        while time.monotonic() < end:
            if len(pending) >= args.in_flight:
                slot = None  # its window of messages is with lu2k: wait like a blocked send
            else:
                try:
                    slot = ep.reserve(args.size, timeout=0)
                except ShimError:
                    slot = None
            if slot is None:
                stalls += 1
                t0 = time.monotonic()
                ep.wait(0.5)
                blocked += time.monotonic() - t0
            else:
                pending.append(slot.post(args.to, portal=SINK_PORTAL))
                sent += 1
            ep.poll()
            settle()
        wall = time.monotonic() - start
        # Leave the rest to the daemon: the endpoint's detach cancels what is still queued.
        settle()
    return {"sent": sent, "delivered": delivered, "failed": failed, "unsettled": len(pending),
            "offered_mbit": sent * args.size * 8 / wall / 1e6 if wall else 0.0,
            "backpressure_waits": stalls, "blocked_s": round(blocked, 3), "wall_s": round(wall, 3)}


def _tcp_receiver(args: argparse.Namespace) -> dict[str, Any]:
    from .baseline import accept_one

    srv, conn = accept_one(args.bind, args.port, args.idle_timeout)
    conn.settimeout(args.idle_timeout)
    dec = RecordDecoder()
    samples: list[float] = []
    received = 0
    buf = bytearray(1 << 20)
    deadline = time.monotonic() + args.max_time
    try:
        while received < args.count and time.monotonic() < deadline:
            try:
                n = conn.recv_into(buf)
            except socket.timeout:
                break
            if n == 0:
                break
            now = time.monotonic()
            for seq, scheduled in dec.feed(memoryview(buf)[:n]):
                received += 1
                if seq >= args.skip and len(samples) < MAX_SAMPLES:
                    samples.append(now - scheduled)
    finally:
        conn.close()
        srv.close()
    return {"received": received, "duplicates": 0, "missing": args.count - received, "samples": samples}


def _tcp_sender(args: argparse.Namespace) -> dict[str, Any]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, args.cc.encode())
    except OSError as e:
        raise ConfigError(f"congestion control {args.cc!r} not available here: {e.strerror}", where="--cc") from None
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(30)
    try:
        s.connect((args.to, args.port))
    except OSError as e:
        raise NetworkError(f"connect to {args.to}:{args.port}: {e}") from None
    s.settimeout(None)
    sched = Schedule(time.monotonic() + 0.2, args.interval)
    lag_max = 0.0
    try:
        for k in range(args.count):
            due = sched.due(k)
            _sleep_until(due)
            s.sendall(encode_record(k, due, args.size))  # blocks when TCP pushes back: counted as latency
            lag_max = max(lag_max, time.monotonic() - due)
        # Keep the connection until the receiver has read everything (it closes first).
        s.shutdown(socket.SHUT_WR)
        s.settimeout(120)
        while s.recv(4096):
            pass
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass
    finally:
        s.close()
    return {"sent": args.count, "max_send_lag_ms": lag_max * 1e3, "cc": args.cc}


def helper_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lu2k.lab.latency", description="bench latency endpoint helpers")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("receiver", "tcp-receiver"):
        r = sub.add_parser(name)
        r.add_argument("--count", type=int, required=True)
        r.add_argument("--skip", type=int, default=0, help="messages before this sequence number are warm-up")
        r.add_argument("--idle-timeout", type=float, default=60.0)
        r.add_argument("--max-time", type=float, default=600.0)
        if name == "receiver":
            r.add_argument("--socket", required=True)
        else:
            r.add_argument("--bind", required=True)
            r.add_argument("--port", type=int, required=True)
    for name in ("sender", "tcp-sender"):
        s = sub.add_parser(name)
        s.add_argument("--to", required=True)
        s.add_argument("--size", type=int, required=True)
        s.add_argument("--interval", type=float, required=True)
        s.add_argument("--count", type=int, required=True)
        if name == "sender":
            s.add_argument("--socket", required=True)
            s.add_argument("--in-flight", type=int, default=256, help="messages the TX pool must hold")
        else:
            s.add_argument("--port", type=int, required=True)
            s.add_argument("--cc", default="bbr")
    sink = sub.add_parser("sink")
    sink.add_argument("--socket", required=True)
    sink.add_argument("--max-time", type=float, required=True)
    sink.add_argument("--idle-timeout", type=float, default=5.0)
    sat = sub.add_parser("saturator")
    sat.add_argument("--socket", required=True)
    sat.add_argument("--to", required=True)
    sat.add_argument("--size", type=int, required=True)
    sat.add_argument("--duration", type=float, required=True)
    sat.add_argument("--in-flight", type=int, required=True, help="messages the endpoint may have with lu2k at once")
    args = p.parse_args(argv)
    handlers = {"receiver": _lu2k_receiver, "sender": _lu2k_sender, "tcp-receiver": _tcp_receiver, "tcp-sender": _tcp_sender,
                "sink": _lu2k_sink, "saturator": _lu2k_saturator}
    try:
        result = handlers[args.cmd](args)
    except Lu2kError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


# --- the driver ---------------------------------------------------------------------------------


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "lu2k.lab.latency", *args]


def _pair(lab: Any, recv_argv: list[str], send_argv: list[str], timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    from .baseline import _last_json
    from .bench import _communicate
    from .netns import child_env

    env = child_env()
    recv = lab.popen("b", recv_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    send = None
    try:
        assert recv.stdout is not None
        ready, _, _ = select.select([recv.stdout], [], [], 30)
        line = recv.stdout.readline().strip() if ready else ""
        if line != "listening":
            raise NetworkError(f"latency receiver did not start: {line} {recv.stderr.read() if recv.stderr else ''}")
        send = lab.popen("a", send_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        r_out, r_err = _communicate(recv, timeout)
        s_out, s_err = _communicate(send, 150)
    finally:
        for proc in (recv, send):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.kill()
                proc.communicate()
    return _last_json(r_out + r_err, "latency receiver"), _last_json(s_out + s_err, "latency sender")


def _saturated_cell(lab: Any, daemons: Any, spec: LinkSpec, paced: tuple[list[str], list[str]],
                    seconds: float) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The paced pair again, while a second endpoint on the same daemons offers 64 KiB messages
    to the same peer as fast as lu2k takes them (its own window: four times the peer's credits for
    that size, so lu2k's bound, not the endpoint's, is what holds it back).

    Returns (paced receiver, paced sender, saturator, sink) results.
    """
    from .baseline import _last_json
    from .bench import _communicate
    from .netns import child_env

    env = child_env()
    size = 64 << 10
    in_flight = 4 * credits_for(spec, size)
    sink = lab.popen("b", _argv("sink", "--socket", daemons.shim("b"), "--max-time", str(seconds + 300)),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sat = None
    try:
        assert sink.stdout is not None
        ready, _, _ = select.select([sink.stdout], [], [], 30)
        line = sink.stdout.readline().strip() if ready else ""
        if line != "listening":
            raise NetworkError(f"saturating sink did not start: {line}")
        sat = lab.popen("a", _argv("saturator", "--socket", daemons.shim("a"), "--to", daemons.nids["b"], "--size", str(size),
                                   "--duration", repr(seconds + 2.0), "--in-flight", str(in_flight)),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(2.0)  # the link is full before the first paced message
        recv, send = _pair(lab, *paced, seconds + 180)
        s_out, s_err = _communicate(sat, 120)
        k_out, k_err = _communicate(sink, 120)
    finally:
        for proc in (sink, sat):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    return recv, send, _last_json(s_out + s_err, "saturating sender"), _last_json(k_out + k_err, "saturating sink")


def daemon_cpu_seconds(daemons: Any) -> dict[str, float]:
    """User + system CPU seconds each lab daemon has used so far."""
    from .bench import _cpu_seconds

    return {side: _cpu_seconds(pid) for side, pid in daemons.pids().items()}


def cpu_per_message(before: dict[str, float], after: dict[str, float], messages: int) -> dict[str, float]:
    """Each daemon's CPU microseconds per message of a cell: a figure that machine load changes
    far less than latency does (a starved daemon is late, but spends the same CPU per message)."""
    return {f"lu2kd-{side}": (after[side] - before[side]) * 1e6 / max(messages, 1) for side in after if side in before}


def _fec_counters(daemons: Any) -> dict[str, dict[str, Any]]:
    """Each daemon's FEC mode and counters over the whole lu2k part of the run (``net show -v``)."""
    import asyncio

    from ..control import request

    out: dict[str, dict[str, Any]] = {}
    for side, proc in daemons.procs.items():
        try:
            nets = asyncio.run(request(str(proc.control_path), "net show", {}, timeout=10))
        except Lu2kError as e:
            print(f"FEC counters of lu2kd-{side}: {e}", file=sys.stderr)
            continue
        for n in nets:
            settings = n.get("backend_settings") or {}
            if settings.get("fec", "off") != "off":
                out[side] = {k: v for k, v in settings.items() if k == "fec" or k.startswith("fec_")}
    return out


def fec_summary(fec: dict[str, Any], sender: str = "a", receiver: str = "b") -> str | None:
    """One line on FEC in the a -> b direction: repair sent and its share of the bytes, rebuilt, lost."""
    tx, rx = fec.get(sender), fec.get(receiver)
    if not tx or not rx:
        return None
    data = tx.get("fec_data_bytes", tx.get("fec_sent_data_bytes", 0))
    repair = tx.get("fec_repair_bytes", tx.get("fec_sent_repair_bytes", 0))
    share = f"{repair / data * 100:.1f} %" if data else "-"
    return (f"FEC {sender}->{receiver} ({tx.get('fec')}): repair {share} of the data bytes; at {receiver}: "
            f"{rx.get('fec_lost', 0)} datagrams missing, {rx.get('fec_recovered', 0)} of them rebuilt "
            f"({rx.get('fec_unrecovered_groups', 0)} groups beyond repair)")


def _cell_result(kind: str, size: int, load: float, spec: LinkSpec, recv: dict[str, Any], send: dict[str, Any]) -> dict[str, Any]:
    samples = recv.pop("samples", [])
    out: dict[str, Any] = {"path": kind, "size": size, "load": load, "floor_ms": floor_ms(spec, size),
                           **percentiles(samples), "samples": len(samples), "cdf": cdf(samples),
                           "received": recv.get("received"), "missing": recv.get("missing"), "duplicates": recv.get("duplicates"),
                           "sender": send}
    return out


def run_latency(backend: str, specs: tuple[LinkSpec, LinkSpec], *, sizes: Sequence[int] = DEFAULT_SIZES,
                loads: Sequence[float] = DEFAULT_LOADS, duration: float = 20.0, warmup: float = 5.0,
                baseline: str | None = "bbr", options: dict[str, Any] | None = None, log: Any = None,
                saturate: bool = False) -> dict[str, Any]:
    """Every (size, load) cell through lu2k, then over kernel TCP; see the module docstring.

    ``saturate``: each lu2k cell runs twice, alone and then beside a second endpoint on the
    same daemon offering more than the link to the same peer (:func:`_saturated_cell`).
    """
    from .bench import LabDaemons, backend_availability
    from .netns import Lab

    avail = backend_availability()
    if backend not in avail:
        raise ConfigError(f"unknown backend {backend!r} (known: {', '.join(sorted(avail))})", where="--backend")
    if avail[backend] is not None:
        raise ConfigError(str(avail[backend]), where="--backend")
    if duration <= 0 or warmup < 0:
        raise ConfigError("--duration must be > 0 and --warmup >= 0", where="bench latency")
    spec = specs[0]
    if not spec.rate_bps:
        raise ConfigError("a latency run needs a link rate (the offered load is a fraction of it)", where="--rate")

    def say(msg: str) -> None:
        if log is not None:
            print(msg, file=log, flush=True)

    cells: list[dict[str, Any]] = []
    fec: dict[str, dict[str, Any]] = {}
    wd = Path(tempfile.mkdtemp(prefix="lu2k-latency-"))
    try:
        with Lab(specs) as lab:
            say(f"lab {lab.lab_id}: {format_rate(spec.rate_bps)}, RTT {spec.rtt_s * 1e3:g} ms, loss {spec.mean_loss * 100:g}%")
            emu0 = lab.stats()
            with LabDaemons(lab, backend, wd, peer_credits=credits_for(spec, min(sizes)), extra_options=options) as daemons:
                for size in sizes:
                    for load in loads:
                        interval = send_interval(size, spec.rate_bps, load)
                        count, skip = int((warmup + duration) / interval), int(warmup / interval)
                        say(f"lu2k/{backend}: {size} B at {load * 100:g}% of the link ({count} messages)")
                        paced = (
                            _argv("receiver", "--socket", daemons.shim("b"), "--count", str(count), "--skip", str(skip),
                                  "--max-time", str(warmup + duration + 120)),
                            _argv("sender", "--socket", daemons.shim("a"), "--to", daemons.nids["b"], "--size", str(size),
                                  "--interval", repr(interval), "--count", str(count), "--in-flight", str(credits_for(spec, size))),
                        )
                        cpu0 = daemon_cpu_seconds(daemons)
                        recv, send = _pair(lab, *paced, warmup + duration + 180)
                        cells.append({**_cell_result(f"lu2k/{backend}", size, load, spec, recv, send),
                                      "daemon_cpu_us_per_msg": cpu_per_message(cpu0, daemon_cpu_seconds(daemons), count)})
                        if saturate:
                            say(f"lu2k/{backend}: the same beside a saturating endpoint")
                            cell = _saturated_cell(lab, daemons, spec, paced, warmup + duration)
                            cells.append({**_cell_result(f"lu2k/{backend} +saturating", size, load, spec, *cell[:2]),
                                          "saturator": cell[2], "sink": cell[3]})
                fec = _fec_counters(daemons)
            emu1 = lab.stats()
            if baseline:
                port = 5301
                for size in sizes:
                    for load in loads:
                        interval = send_interval(size, spec.rate_bps, load)
                        count, skip = int((warmup + duration) / interval), int(warmup / interval)
                        say(f"kernel TCP {baseline}: {size} B at {load * 100:g}% of the link")
                        recv, send = _pair(
                            lab,
                            _argv("tcp-receiver", "--bind", lab.addr_b, "--port", str(port), "--count", str(count), "--skip", str(skip),
                                  "--max-time", str(warmup + duration + 120)),
                            _argv("tcp-sender", "--to", lab.addr_b, "--port", str(port), "--size", str(size), "--interval", repr(interval),
                                  "--count", str(count), "--cc", baseline),
                            warmup + duration + 180)
                        port += 1
                        cells.append(_cell_result(f"kernel tcp-{baseline}", size, load, spec, recv, send))
    finally:
        import shutil

        shutil.rmtree(wd, ignore_errors=True)
    ab = emu1["links"]["ab"]
    return {
        "backend": backend, "options": options or {}, "link_mbit": spec.rate_bps / 1e6, "rtt_ms": spec.rtt_s * 1e3, "loss": spec.mean_loss,
        "warmup_s": warmup, "duration_s": duration, "cells": cells, "fec": fec,
        "emulator": {"lateness_p99_ms": ab["lateness"]["p99_us"] / 1e3, "lateness_max_ms": ab["lateness"]["max_us"] / 1e3,
                     "drops_queue": ab["drops_queue"] - emu0["links"]["ab"]["drops_queue"],
                     "drops_loss": ab["drops_loss"] - emu0["links"]["ab"]["drops_loss"]},
        "load_average": os.getloadavg(),
    }


def format_latency(r: dict[str, Any]) -> str:
    from ..table import render

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    rows = []
    for c in r["cells"]:
        over = "-" if c["p99_ms"] is None else f"+{c['p99_ms'] - c['floor_ms']:.0f}"
        rows.append([c["path"], c["size"], f"{c['load'] * 100:g}%", ms(c["floor_ms"]), ms(c["p50_ms"]), ms(c["p99_ms"]),
                     over, ms(c["p999_ms"]), ms(c["max_ms"]), c["missing"]])
    head = (f"link {r['link_mbit']:g} Mbit/s, RTT {r['rtt_ms']:g} ms, loss {r['loss'] * 100:g}% each way; "
            f"emulator lateness p99 {r['emulator']['lateness_p99_ms']:.2f} ms; load average {r['load_average'][0]:.2f}")
    table = render(["path", "size B", "load", "floor ms", "p50 ms", "p99 ms", "p99-floor", "p99.9 ms", "max ms", "lost"], rows)
    notes = []
    for c in r["cells"]:
        sat, sink = c.get("saturator"), c.get("sink")
        if sat is not None and sink is not None:
            notes.append(f"saturating endpoint beside {c['size']} B @ {c['load'] * 100:g}%: offered {sat['offered_mbit']:.1f} Mbit/s, "
                         f"carried {sink['carried_mbit']:.1f}; blocked {sat['backpressure_waits']} times, "
                         f"{sat['blocked_s']:.1f} s of {sat['wall_s']:.1f} s")
    for c in r["cells"]:
        lag = (c.get("sender") or {}).get("max_send_lag_ms")
        cpu = c.get("daemon_cpu_us_per_msg")
        if cpu or lag is not None:
            parts = [f"{c['path']} {c['size']} B @ {c['load'] * 100:g}%:"]
            if lag is not None:
                parts.append(f"send lag max {lag:.0f} ms")
            if cpu:
                parts.append("CPU per message " + ", ".join(f"{k} {v:.0f} us" for k, v in sorted(cpu.items())))
            notes.append(" ".join(parts))
    line = fec_summary(r.get("fec") or {})
    if line:
        notes.append(line)
    return head + "\n" + table + "".join("\n" + n for n in notes)


def plot_cdf(r: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for c in r["cells"]:
        if c["cdf"]:
            xs, ys = zip(*c["cdf"])
            ax.plot(xs, ys, label=f"{c['path']} {c['size']} B @ {c['load'] * 100:g}%",
                    linestyle="-" if c["path"].startswith("lu2k") else "--")
    ax.axvline(r["rtt_ms"] / 2, color="grey", linewidth=0.8)
    ax.set_xlabel("one-way latency, ms")
    ax.set_ylabel("fraction of messages")
    ax.set_title(f"{r['link_mbit']:g} Mbit/s, RTT {r['rtt_ms']:g} ms, loss {r['loss'] * 100:g}%")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_latency(args: argparse.Namespace) -> int:
    from .args import parse_backend_options, specs_from_args

    specs = specs_from_args(args)
    r = run_latency(args.backend, specs, sizes=parse_sizes(args.sizes), loads=parse_loads(args.loads), duration=args.duration,
                    warmup=args.warmup, baseline=None if args.no_baseline else "bbr", options=parse_backend_options(args.option), log=sys.stderr,
                    saturate=args.saturate)
    print(format_latency(r))
    if args.plot:
        plot_cdf(r, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        print(json.dumps(r))
    return 0


def register_bench(bsub: Any) -> None:
    """Add ``latency`` to ``lu2k bench`` (called by :mod:`lu2k.cli.bench`)."""
    from .args import add_backend_option, add_link_options

    lat = bsub.add_parser("latency", help="one-way latency at a paced offered load vs kernel TCP BBR (needs root)")
    lat.add_argument("--backend", default="quic")
    add_link_options(lat)
    lat.add_argument("--loads", nargs="+", default=["50%", "80%"], help="offered load as a share of the link rate (default 50%% 80%%)")
    lat.add_argument("--sizes", nargs="+", default=["1k", "64k"], help="message sizes (default 1k 64k)")
    lat.add_argument("--duration", type=float, default=20.0, help="measured seconds per cell, after the warm-up")
    lat.add_argument("--warmup", type=float, default=5.0, help="seconds per cell not measured")
    add_backend_option(lat, "fec=auto")
    lat.add_argument("--no-baseline", action="store_true", help="skip the kernel TCP BBR cells")
    lat.add_argument("--saturate", action="store_true",
                     help="run each lu2k cell again beside a second endpoint that offers more than the link to the same peer")
    lat.add_argument("--plot", help="write a latency CDF PNG here")
    lat.add_argument("--json", action="store_true", help="last line: the result as JSON")
    lat.set_defaults(func=cmd_latency)


if __name__ == "__main__":
    sys.exit(helper_main())
