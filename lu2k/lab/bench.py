"""``lu2k bench link`` and ``lu2k bench matrix``: lu2k over an emulated satellite link, next to kernel TCP.

One ``bench link`` run, all on one lab (the same emulated link, same seed):

1. ``lu2kd`` in each namespace -- config generated: one net with the chosen backend, the
   namespace addresses as NIDs, the link's rate/RTT/loss as the site profile;
2. a receiver endpoint in namespace b and a sender endpoint in namespace a, attached through
   the shim (``lu2k.kernel_shim.endpoint``), each its own process as an application would be;
   the sender keeps ``window`` messages in flight, each stamped with its sequence number and
   CLOCK_MONOTONIC (not namespaced, so both ends read the same clock);
3. goodput = payload bytes delivered in the window after warm-up / window length; message
   latency = arrival - send stamp (p50/p99 over the window); CPU of each daemon over the run;
4. then kernel TCP CUBIC and TCP BBR bulk transfers (:mod:`lu2k.lab.baseline`) for the same
   warm-up and window.

``--json`` makes the last line a JSON object: ``goodput_mbit``, ``link_mbit``, ``loss``,
``rtt_ms``, ``p50_latency_ms``, ``p99_latency_ms``, ``cpu``, ``baselines`` and the
emulator's own counters (lateness, drops), which say whether the figures can be trusted.

The same sender/receiver helpers, with ``--count``, are the correctness probe of the lab
tests: every message must arrive exactly once with its payload intact.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Self

import yaml

from ..errors import ConfigError, Lu2kError, NetworkError, ShimError
from ..nid import NET_TYPES
from .baseline import GoodputMeter, _last_json, tcp_baseline
from .netns import Lab, child_env
from .spec import LinkSpec, build_specs, format_rate

HEADER = struct.Struct("<Qd")  # sequence number, CLOCK_MONOTONIC at send
DEFAULT_SIZE = 64 * 1024
DEFAULT_MAX_MESSAGE = 4 << 20  # the lab daemons' max_message_size
LU2K_PORT = 7988
KEY = "lu2k-lab-bench-key"
MAX_LATENCY_SAMPLES = 1 << 20
DRAIN_S = 45.0  # a stopped sender waits this long for its messages in flight (transfer() allows it 60 s)


def pattern(seq: int, size: int) -> bytes:
    """The body of message ``seq``: cheap to build and to check, different for neighbours."""
    return bytes([seq % 251]) * (size - HEADER.size)


# --- helpers that run inside the namespaces ---------------------------------------------------


def _receiver(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..kernel_shim.endpoint import Endpoint

    latencies: list[float] = []
    seen: set[int] = set()
    dups = corrupt = 0
    dup_first: list[int] = []
    meter: GoodputMeter | None = None
    bodies: dict[int, bytes] = {}
    with Endpoint.attach(args.socket, portal=0) as ep:
        print("listening", flush=True)
        idle_deadline = time.monotonic() + args.idle_timeout
        while True:
            now = time.monotonic()
            if meter is not None and args.count == 0 and now >= meter.end:
                break
            if args.count and len(seen) >= args.count:
                break
            if now > idle_deadline:
                raise NetworkError(f"no message for {args.idle_timeout} s ({len(seen)} received)")
            msg = ep.recv(timeout=0.5)
            if msg is None:
                continue
            with msg:
                now = time.monotonic()
                idle_deadline = now + args.idle_timeout
                data = msg.payload
                n = len(data)
                seq, sent_at = HEADER.unpack_from(data)
                if meter is None:
                    meter = GoodputMeter(now, args.warmup, args.duration)
                meter.add(n, now)
                if seq in seen:
                    dups += 1
                    if len(dup_first) < 20:
                        dup_first.append(seq)
                    continue
                seen.add(seq)
                if args.verify:
                    want = bodies.get(n)
                    body = data[HEADER.size:]
                    if want is None or want[0] != seq % 251:
                        want = bodies[n] = pattern(seq, n)
                    if body != want:
                        corrupt += 1
                t = now - meter.start
                if meter.warmup <= t < meter.warmup + meter.duration and len(latencies) < MAX_LATENCY_SAMPLES:
                    latencies.append(now - sent_at)
        out: dict[str, Any] = meter.result() if meter else {"bytes_total": 0, "goodput_bps": 0.0}
        latencies.sort()

        def pct(q: float) -> float | None:
            if not latencies:
                return None
            return latencies[min(len(latencies) - 1, int(q / 100 * (len(latencies) - 1) + 0.5))] * 1e3

        missing = sorted(set(range(args.count)) - seen)[:20] if args.count else []
        out.update({"messages": len(seen), "duplicates": dups, "duplicates_first": dup_first, "corrupt": corrupt, "missing_first": missing,
                    "p50_latency_ms": pct(50), "p99_latency_ms": pct(99), "latency_samples": len(latencies)})
        if not args.linger:
            return out
        # Report, then stay attached (draining) until the driver closes our stdin: it stops
        # the sender first, so messages still in flight at the end of the window are not
        # failed back to it with "no receiver" -- that would read as a lu2k failure.
        print(json.dumps(out), flush=True)
        while not select.select([sys.stdin], [], [], 0.1)[0] or os.read(sys.stdin.fileno(), 4096):
            while (msg := ep.recv(timeout=0)) is not None:
                msg.release()
    return None


def tx_pool_bytes(size: int, window: int, max_message: int = DEFAULT_MAX_MESSAGE) -> int:
    """A TX pool with a slot for every message of the window (the shim's default pool has
    ~100 slots for 64 KiB messages, fewer than a GEO window), within the shim's 1 GiB cap."""
    from ..kernel_shim.abi import pool_classes

    need = size + HEADER.size
    pool = 64 << 20
    while pool < (1 << 30) and sum(n for s, n in pool_classes(max_message, pool) if s >= need) < window + 8:
        pool *= 2
    return min(pool, 1 << 30)


def _sender(args: argparse.Namespace) -> dict[str, Any]:
    from ..kernel_shim.endpoint import Endpoint

    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    pending: deque[Any] = deque()
    failed: dict[str, int] = {}
    sent = delivered = 0
    end = time.monotonic() + args.max_time

    def settle(limit: int, until: float | None = None) -> None:
        """Wait for the oldest completions until at most ``limit`` are pending; once stopped,
        only with ``until`` (the drain at the end)."""
        nonlocal delivered
        while len(pending) > limit and (until is not None or not stop):
            comp = pending[0]
            if not comp.wait(1.0):
                if time.monotonic() > (end if until is None else until):
                    return
                continue
            pending.popleft()
            if comp.status == 0:
                delivered += 1
            else:
                key = getattr(comp.status, "name", str(comp.status))
                failed[key] = failed.get(key, 0) + 1

    def reserve() -> Any:
        # No free TX slot is back-pressure, not an error: wait for the oldest message.
        while True:
            try:
                return ep.reserve(args.size, timeout=1.0)
            except ShimError as e:
                if e.code != errno.EAGAIN or not pending or time.monotonic() > end:
                    raise
                settle(len(pending) - 1)

    body_cache: dict[int, bytes] = {}
    with Endpoint.attach(args.socket, portal=1, tx_pool_bytes=tx_pool_bytes(args.size, args.window)) as ep:
        while not stop and time.monotonic() < end and (args.count == 0 or sent < args.count):
            slot = reserve()
            b = body_cache.get(sent % 251)
            if b is None:
                b = body_cache[sent % 251] = pattern(sent, args.size)
            slot.view[HEADER.size:] = b
            HEADER.pack_into(slot.view, 0, sent, time.monotonic())
            pending.append(slot.post(args.to, portal=0))
            sent += 1
            settle(args.window)
        # Stopped or done: wait for what is in flight before detaching.  Detaching cancels it
        # here, but what already left still arrives -- at whatever endpoint is on the portal
        # by then, such as the next run's receiver, where it read as duplicates.
        settle(0, until=time.monotonic() + DRAIN_S)
    return {"sent": sent, "delivered": delivered, "failed": failed, "unsettled": len(pending)}


def helper_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lu2k.lab.bench", description="bench link endpoint helpers")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("receiver")
    r.add_argument("--socket", required=True)
    r.add_argument("--warmup", type=float, default=5.0)
    r.add_argument("--duration", type=float, default=10.0)
    r.add_argument("--count", type=int, default=0, help="stop after this many distinct messages (0: after the window)")
    r.add_argument("--verify", action="store_true", help="check every payload against its pattern")
    r.add_argument("--idle-timeout", type=float, default=60.0)
    r.add_argument("--linger", action="store_true", help="after reporting, stay attached until stdin closes")
    s = sub.add_parser("sender")
    s.add_argument("--socket", required=True)
    s.add_argument("--to", required=True)
    s.add_argument("--size", type=int, default=DEFAULT_SIZE)
    s.add_argument("--window", type=int, default=32)
    s.add_argument("--count", type=int, default=0, help="send exactly this many (0: until SIGTERM or --max-time)")
    s.add_argument("--max-time", type=float, default=600.0)
    args = p.parse_args(argv)
    if getattr(args, "size", HEADER.size) < HEADER.size:
        print(json.dumps({"error": f"--size must be at least {HEADER.size}"}))
        return 1
    try:
        result = _receiver(args) if args.cmd == "receiver" else _sender(args)
    except Lu2kError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


# --- the driver ---------------------------------------------------------------------------------


def net_type_for(backend: str) -> str:
    """Each backend's NIDs live on a net of its own type where lu2k has one (udt0, quic0), else tcp."""
    return backend if backend in NET_TYPES else "tcp"


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def backend_options(backend: str, lab: Lab, workdir: Path, *, extra_addresses: dict[str, list[str]] | None = None) -> dict[str, dict[str, Any]]:
    """Per-side backend options a lab run needs; QUIC needs a site certificate for each end.

    A throw-away CA signs one certificate per namespace, naming its lab address on every path
    (a multi-rail peer is reached on each) and any ``extra_addresses`` of that side (a second
    gateway of the site, which shares the site's certificate), so each connector verifies the
    other end exactly as a deployment would.
    """
    if backend != "quic":
        return {"a": {}, "b": {}}
    from ..certs import cert_pem, key_pem, make_certificate, make_key

    ca_key = make_key()
    ca_cert = make_certificate(ca_key, "lu2k-lab-ca", is_ca=True)
    ca_path = workdir / "lab-ca.crt"
    ca_path.write_bytes(cert_pem(ca_cert))
    out: dict[str, dict[str, Any]] = {}
    for side in ("a", "b"):
        key = make_key()
        sans = [lab.address(side, p) for p in range(lab.n_paths)] + list((extra_addresses or {}).get(side, []))
        cert = make_certificate(key, f"lab-{side}", sans=sans, issuer_cert=ca_cert, issuer_key=ca_key)
        (workdir / f"lab-{side}.key").write_bytes(key_pem(key))
        os.chmod(workdir / f"lab-{side}.key", 0o600)
        (workdir / f"lab-{side}.crt").write_bytes(cert_pem(cert))
        out[side] = {"cert": str(workdir / f"lab-{side}.crt"), "key": str(workdir / f"lab-{side}.key"), "ca": str(ca_path)}
    return out


class LabDaemons:
    """``lu2kd`` in each namespace of a lab, configured for one backend and the lab's link."""

    def __init__(self, lab: Lab, backend: str, workdir: Path, *, peer_credits: int = 256, max_message: int = DEFAULT_MAX_MESSAGE,
                 extra_options: dict[str, Any] | None = None, net_settings: dict[str, Any] | None = None) -> None:
        from ..localpair import DaemonProcess, daemon_config

        spec = lab.state.specs[0]
        nettype = net_type_for(backend)
        self.nids = {side: f"{lab.state.addr[side]}@{nettype}" for side in ("a", "b")}
        profile = {"rtt_ms": spec.rtt_s * 1e3, "rate_mbit": spec.rate_bps / 1e6 if spec.rate_bps else 1e5,
                   "loss": min(spec.mean_loss, 0.5)}
        self.procs: dict[str, Any] = {}
        self.lab = lab
        options = backend_options(backend, lab, workdir)
        for side in options:
            options[side].update(extra_options or {})
        for side in ("a", "b"):
            extra_net: dict[str, Any] = {"profile": profile, "key": KEY, "max_message_size": max_message, **(net_settings or {})}
            if options[side]:
                extra_net["options"] = options[side]
            cfg = daemon_config(self.nids[side], LU2K_PORT, workdir, backend=backend, extra_net=extra_net,
                                tunables={"peer_credits": peer_credits, "credits": max(1024, peer_credits * 4)})
            # An endpoint may have as many messages outstanding as its peer has credits: with the
            # shim's default (1 024 per port) 1 KiB messages could not fill a GEO round trip.
            cfg["lu2k"]["shim"]["max_in_flight"] = max(1024, peer_credits)
            path = workdir / f"lu2kd-{side}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            self.procs[side] = DaemonProcess(self.nids[side], path, cfg["lu2k"]["shim"]["path"],
                                             cfg["lu2k"]["control"]["path"], workdir / f"lu2kd-{side}.log")

    def start(self) -> None:
        try:
            for side in ("a", "b"):
                self.procs[side].start(netns=self.lab.ns(side))
        except BaseException:
            self.stop()  # one started, the other failed: stop the one
            raise

    def stop(self) -> None:
        for d in self.procs.values():
            d.stop()

    def pids(self) -> dict[str, int]:
        return {s: d.proc.pid for s, d in self.procs.items() if d.proc is not None}

    def shim(self, side: str) -> str:
        return str(self.procs[side].shim_path)

    def _ask(self, side: str, command: str, args: dict[str, Any]) -> Any:
        """``side``'s daemon's answer to a control ``command``; None if it does not answer."""
        import asyncio

        from ..control import request
        from ..errors import Lu2kError

        try:
            return asyncio.run(request(str(self.procs[side].control_path), command, args, timeout=5.0))
        except Lu2kError:
            return None

    def connections(self, side: str) -> dict[str, Any]:
        """The transport figures of ``side``'s connections to the other end (``peer show``):
        what its congestion controller ended in, for the bench's report.  Empty if the daemon
        does not answer."""
        peers = self._ask(side, "peer show", {"nid": self.nids["b" if side == "a" else "a"]})
        return dict(peers[0].get("connections", {})) if peers else {}

    def backend_figures(self, side: str) -> dict[str, Any]:
        """``side``'s backend settings and totals over all its connections, accepted ones
        included (``net show``'s ``backend_settings`` of its lab net); empty if the daemon does
        not answer."""
        nets = self._ask(side, "net show", {})
        return dict(nets[0].get("backend_settings", {})) if nets else {}

    def counter(self, side: str, name: str) -> int | None:
        """One of ``side``'s daemon counters (``stats``, e.g. ``connections_lost``); None if the
        daemon does not answer."""
        stats = self._ask(side, "stats", {})
        return None if stats is None else int(stats.get(name, 0))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _helper_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "lu2k.lab.bench", *args]


def transfer(lab: Lab, daemons: LabDaemons, *, size: int, window: int, warmup: float = 0.0, duration: float = 0.0,
             count: int = 0, verify: bool = False, timeout: float = 300.0) -> dict[str, Any]:
    """Stream messages a->b through both daemons; the receiver's figures plus the sender's outcome.

    With ``count`` the run ends when ``count`` distinct messages have arrived; otherwise after
    ``warmup + duration`` seconds from the first arrival.
    """
    env = child_env()
    timed = count == 0
    rargs = ["receiver", "--socket", daemons.shim("b"), "--warmup", str(warmup), "--duration", str(duration),
             "--count", str(count), "--idle-timeout", str(max(5.0, min(timeout / 2, 60.0)))]
    if verify:
        rargs.append("--verify")
    if timed:
        rargs.append("--linger")
    recv = lab.popen("b", _helper_argv(*rargs), stdin=subprocess.PIPE if timed else subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    send = None
    try:
        assert recv.stdout is not None
        line = recv.stdout.readline().strip()
        if line != "listening":
            raise NetworkError(f"bench receiver did not start: {line} {recv.stderr.read() if recv.stderr else ''}")
        pids = daemons.pids()
        cpu0 = {s: _cpu_seconds(p) for s, p in pids.items()}
        t0 = time.monotonic()
        sargs = ["sender", "--socket", daemons.shim("a"), "--to", daemons.nids["b"], "--size", str(size),
                 "--window", str(window), "--count", str(count), "--max-time", str(timeout)]
        send = lab.popen("a", _helper_argv(*sargs), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if timed:
            # The receiver reports on one line and lingers; stop the sender, then release it.
            r_out = _read_result_line(recv, timeout)
            t1 = time.monotonic()
            cpu1 = {s: _cpu_seconds(p) for s, p in pids.items()}
            send.send_signal(signal.SIGTERM)
            s_out, s_err = _communicate(send, 60)
            rest, r_err = _communicate(recv, 30)  # closes its stdin: the receiver detaches
            r_out += rest
        else:
            r_out, r_err = _communicate(recv, timeout)
            t1 = time.monotonic()
            cpu1 = {s: _cpu_seconds(p) for s, p in pids.items()}
            s_out, s_err = _communicate(send, 60)
    finally:
        for p in (recv, send):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    result = _last_json(r_out + r_err, "bench receiver")
    result["sender"] = _last_json(s_out + s_err, "bench sender") if s_out.strip() or count else {}
    result["cpu"] = {f"lu2kd-{s}": (cpu1[s] - cpu0[s]) / (t1 - t0) for s in pids}
    result["elapsed_s"] = t1 - t0
    return result


def _communicate(proc: "subprocess.Popen[str]", timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return out, err + f"\n(killed after {timeout:.0f} s)"


def _read_result_line(proc: "subprocess.Popen[str]", timeout: float) -> str:
    """The first JSON line a helper prints (its result), within ``timeout``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([proc.stdout], [], [], 1.0)[0]:
            continue
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise NetworkError(f"bench receiver exited without a result: {err[-500:]}")
        if line.startswith("{"):
            return line
    raise NetworkError(f"bench receiver did not report within {timeout:.0f} s")


DEFAULT_WINDOW_BYTES = 8 << 20


def default_window(spec: LinkSpec, size: int) -> int:
    """Messages in flight: max(4 BDP, 8 MiB) of them (at least 16, at most 4096).

    As much as lu2k's backends buffer by default (quic ``send_buffer``, udt ``buffer``), and
    well under what the kernel TCP baselines may keep in flight (autotuned to 64 MB in the
    lab).  Two BDPs are not enough on a lossy GEO hop: a message that lost a packet holds its
    slot for an extra round trip or two, and an in-order transport holds every slot behind it.
    """
    bdp = spec.rate_bps * spec.rtt_s / 8 if spec.rate_bps else 4 << 20
    return max(16, min(4096, int(max(4 * bdp, DEFAULT_WINDOW_BYTES) / size) + 1))


def run_link(backend: str, specs: tuple[LinkSpec, LinkSpec], *, duration: float, warmup: float, size: int = DEFAULT_SIZE,
             window: int | None = None, baselines: tuple[str, ...] = ("cubic", "bbr"), workdir: str | None = None,
             log: Any = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``bench link`` run; see the module docstring."""
    from ..errors import BackendUnavailable

    avail = backend_availability()
    if backend not in avail:
        raise BackendUnavailable(f"unknown backend {backend!r} (known: {', '.join(sorted(avail))})")
    if avail[backend] is not None:  # with the install hint, before any lab exists
        raise BackendUnavailable(str(avail[backend]))
    spec = specs[0]
    window = window or default_window(spec, size)
    own = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="lu2k-bench-"))

    def say(msg: str) -> None:
        if log is not None:
            print(msg, file=log, flush=True)

    try:
        with Lab(specs) as lab:
            say(f"lab {lab.lab_id}: {format_rate(spec.rate_bps)}, RTT {spec.rtt_s * 1e3:g} ms, loss {spec.mean_loss * 100:g}%")
            emu0 = lab.stats()
            with LabDaemons(lab, backend, wd, extra_options=options) as daemons:
                say(f"lu2k/{backend}: {size}-byte messages, window {window}, warm-up {warmup:g} s, window {duration:g} s")
                lu2k = transfer(lab, daemons, size=size, window=window, warmup=warmup, duration=duration,
                                timeout=warmup + duration + 120)
                sender_connections = daemons.connections("a")
            emu1 = lab.stats()
            base: dict[str, Any] = {}
            for cc in baselines:
                say(f"kernel TCP {cc}: warm-up {warmup:g} s, window {duration:g} s")
                base[f"tcp-{cc}"] = tcp_baseline(lab, cc, warmup=warmup, duration=duration)
            emu2 = lab.stats()
    finally:
        if own:
            import shutil

            shutil.rmtree(wd, ignore_errors=True)
    link_mbit = spec.rate_bps / 1e6
    ab = emu1["links"]["ab"]
    return {
        "backend": backend,
        "options": dict(options or {}),
        "goodput_mbit": lu2k["goodput_bps"] / 1e6,
        "link_mbit": link_mbit,
        "limit_mbit": link_mbit * (1 - spec.mean_loss),
        "loss": spec.mean_loss,
        "rtt_ms": spec.rtt_s * 1e3,
        "p50_latency_ms": lu2k["p50_latency_ms"],
        "p99_latency_ms": lu2k["p99_latency_ms"],
        "messages": lu2k["messages"],
        "message_size": size,
        "window": window,
        "warmup_s": warmup,
        "duration_s": duration,
        "cpu": lu2k["cpu"],
        "sender": lu2k["sender"],
        # The sending lu2kd's view of its connections at the end (congestion state included).
        "sender_connections": sender_connections,
        "series_mbit": lu2k.get("series_mbit", []),
        "bin_s": lu2k.get("bin_s"),
        "baselines": {k: v["goodput_bps"] / 1e6 for k, v in base.items()},
        "baseline_series_mbit": {k: v["series_mbit"] for k, v in base.items()},
        "emulator": {
            "lateness_p99_ms": ab["lateness"]["p99_us"] / 1e3,
            "lateness_max_ms": ab["lateness"]["max_us"] / 1e3,
            "drops_queue": ab["drops_queue"] - emu0["links"]["ab"]["drops_queue"],
            "drops_loss": ab["drops_loss"] - emu0["links"]["ab"]["drops_loss"],
            "forwarder_cpu": (emu2["cpu_s"] - emu0["cpu_s"]) / max(emu2["uptime_s"] - emu0["uptime_s"], 1e-9),
        },
    }


def format_link(r: dict[str, Any]) -> str:
    from ..table import render

    def pct(x: float) -> str:
        return f"{x / r['link_mbit'] * 100:.0f}%" if r["link_mbit"] else "-"

    rows = [[f"lu2k/{r['backend']}", f"{r['goodput_mbit']:.2f}", pct(r["goodput_mbit"]),
             _ms(r["p50_latency_ms"]), _ms(r["p99_latency_ms"]),
             " ".join(f"{k}={v * 100:.0f}%" for k, v in r["cpu"].items())]]
    for name, mbit in r["baselines"].items():
        rows.append([f"kernel {name}", f"{mbit:.2f}", pct(mbit), "-", "-", "-"])
    head = (f"link {r['link_mbit']:g} Mbit/s, RTT {r['rtt_ms']:g} ms, loss {r['loss'] * 100:g}% each way "
            f"(limit rate x (1-p) = {r['limit_mbit']:.2f} Mbit/s); emulator lateness p99 {r['emulator']['lateness_p99_ms']:.2f} ms, "
            f"forwarder CPU {r['emulator']['forwarder_cpu'] * 100:.0f}%")
    if r.get("options"):
        head += "\nbackend options: " + ", ".join(f"{k}={v}" for k, v in r["options"].items())
    return head + "\n" + render(["sender", "goodput Mbit/s", "of link", "p50 ms", "p99 ms", "CPU (of one core)"], rows)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


# --- matrix -----------------------------------------------------------------------------------

MATRIX_LOSSES = ("0", "0.1%", "1%", "2%")
MATRIX_PROFILES = ("geo", "leo")


def backend_availability() -> dict[str, str | None]:
    """``lu2k.backends.availability()``, asked in a child process.

    Probing imports every backend, native extensions included; the driver of a long
    benchmark keeps none of them loaded, so a fault in a backend's native code can only take
    down the daemons that use it, never the run that is measuring them.
    """
    code = "import json; from lu2k.backends import availability; print(json.dumps(availability()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=120)
    if proc.returncode != 0:
        raise Lu2kError(f"probing the backends failed: {proc.stderr.strip()[-500:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def available_backends() -> list[str]:
    """Backends that can carry a daemon-to-daemon run here (in-process ones cannot cross namespaces)."""
    return [name for name, why in backend_availability().items() if why is None and name != "inproc"]


def run_matrix(backends: list[str], *, duration: float, warmup: float, losses: tuple[str, ...] = MATRIX_LOSSES,
               profiles: tuple[str, ...] = MATRIX_PROFILES, size: int = DEFAULT_SIZE, log: Any = None) -> list[dict[str, Any]]:
    """Every backend x loss x profile; kernel baselines once per (profile, loss), on the first backend's lab."""
    rows = []
    for profile in profiles:
        for loss in losses:
            for i, backend in enumerate(backends):
                specs = build_specs(profile, loss=loss)
                try:
                    r = run_link(backend, specs, duration=duration, warmup=warmup, size=size,
                                 baselines=("cubic", "bbr") if i == 0 else (), log=log)
                except Lu2kError as e:
                    r = {"backend": backend, "error": str(e), "loss": specs[0].mean_loss, "link_mbit": specs[0].rate_bps / 1e6,
                         "rtt_ms": specs[0].rtt_s * 1e3, "goodput_mbit": None, "baselines": {}}
                    if log is not None:
                        print(f"{profile} {loss} {backend}: FAILED: {e}", file=log, flush=True)
                r["profile"] = profile
                rows.append(r)
    return rows


def format_matrix(rows: list[dict[str, Any]]) -> str:
    from ..table import render

    base_by_key = {(r["profile"], r["loss"]): r["baselines"] for r in rows if r.get("baselines")}
    table = []
    for r in rows:
        b = base_by_key.get((r["profile"], r["loss"]), {})
        g = r.get("goodput_mbit")
        table.append([
            r["profile"], f"{r['loss'] * 100:g}%", r["backend"],
            "FAILED" if g is None else f"{g:.2f}",
            f"{r['link_mbit'] * (1 - r['loss']):.2f}",
            _ms(r.get("p99_latency_ms")),
            f"{b['tcp-cubic']:.2f}" if "tcp-cubic" in b else "-",
            f"{b['tcp-bbr']:.2f}" if "tcp-bbr" in b else "-",
            f"{r['emulator']['lateness_p99_ms']:.1f}" if r.get("emulator") else "-",
        ])
    # The last column is the emulator's own lateness during the lu2k run: if it is a sizeable
    # fraction of the RTT, the machine was too busy for that cell to mean much.
    return render(["profile", "loss", "backend", "lu2k Mbit/s", "limit", "p99 ms", "TCP CUBIC", "TCP BBR", "emu late p99 ms"], table)


# --- CLI ------------------------------------------------------------------------------------------


def cmd_link(args: argparse.Namespace) -> int:
    from .args import parse_backend_options, specs_from_args

    specs = specs_from_args(args)
    if args.duration <= 0 or args.warmup < 0:
        raise ConfigError("--duration must be > 0 and --warmup >= 0", where="bench link")
    r = run_link(args.backend, specs, duration=args.duration, warmup=args.warmup, size=args.size, window=args.window,
                 baselines=() if args.no_baselines else ("cubic", "bbr"), log=sys.stderr,
                 options=parse_backend_options(args.option))
    print(format_link(r))
    if args.plot:
        from .plots import plot_timeseries

        plot_timeseries(r, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        print(json.dumps(r))
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    backends = args.backends or available_backends()
    if not backends:
        raise ConfigError("no backend is available here", where="bench matrix")
    losses = tuple(args.losses) if args.losses else MATRIX_LOSSES
    profiles = tuple(args.profiles) if args.profiles else MATRIX_PROFILES
    rows = run_matrix(backends, duration=args.duration, warmup=args.warmup, losses=losses, profiles=profiles,
                      size=args.size, log=sys.stderr)
    print(format_matrix(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps(rows, indent=1))
    from .plots import plot_matrix, plot_timeseries

    plot_matrix(rows, out / "matrix.png")
    pick = next((r for r in rows if r.get("series_mbit") and r["profile"] == "geo" and r["loss"] > 0), None)
    pick = pick or next((r for r in rows if r.get("series_mbit")), None)
    if pick:
        plot_timeseries(pick, out / "timeseries.png")
    print(f"results: {out / 'matrix.json'}, plots: {out / 'matrix.png'}, {out / 'timeseries.png'}")
    if args.json:
        print(json.dumps(rows))
    return 0


def register_bench(bsub: Any) -> None:
    """Add ``link`` and ``matrix`` to ``lu2k bench`` (called by :mod:`lu2k.cli.bench`)."""
    from .args import add_backend_option, add_link_options

    link = bsub.add_parser("link", help="lu2k over an emulated satellite link vs kernel TCP CUBIC/BBR (needs root)")
    link.add_argument("--backend", default="tcp")
    add_link_options(link)
    link.add_argument("--duration", type=float, default=20.0, help="measurement window after warm-up, seconds")
    link.add_argument("--warmup", type=float, default=10.0, help="seconds ignored at the start of each transfer")
    link.add_argument("--size", type=int, default=DEFAULT_SIZE, help="message size in bytes")
    link.add_argument("--window", type=int, help="messages in flight (default: max(4 BDP, 8 MiB) of messages)")
    add_backend_option(link, "streams=2 or notsent_lowat=0")
    link.add_argument("--no-baselines", action="store_true", help="skip the kernel TCP runs")
    link.add_argument("--plot", help="write a goodput-over-time PNG here")
    link.add_argument("--json", action="store_true", help="last line: the result as JSON")
    link.set_defaults(func=cmd_link)

    mx = bsub.add_parser("matrix", help="every backend x loss (0, 0.1, 1, 2 %%) on GEO and LEO; table + PNG plots")
    mx.add_argument("--backends", nargs="*", help="default: every backend available here")
    mx.add_argument("--losses", nargs="*", help="default: 0 0.1%% 1%% 2%%")
    mx.add_argument("--profiles", nargs="*", choices=list(MATRIX_PROFILES))
    mx.add_argument("--duration", type=float, default=15.0)
    mx.add_argument("--warmup", type=float, default=10.0)
    mx.add_argument("--size", type=int, default=DEFAULT_SIZE)
    mx.add_argument("--out", default="results/lab", help="directory for matrix.json, matrix.png, timeseries.png")
    mx.add_argument("--json", action="store_true")
    mx.set_defaults(func=cmd_matrix)


if __name__ == "__main__":
    sys.exit(helper_main())
