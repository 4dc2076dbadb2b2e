"""Traffic helpers run inside lab namespaces: kernel TCP bulk baselines and a UDP blaster.

Run as ``ip netns exec NS python -m lu2k.lab.baseline SUBCOMMAND ...`` (see
:func:`tcp_baseline` and :func:`udp_blast`, which do that for a :class:`~lu2k.lab.netns.Lab`).

* ``tcp-recv`` accepts one connection and reads until ``warmup + duration`` seconds after
  the connection came up; goodput is the payload received in the window after warm-up,
  divided by its length.  It also prints a per-bin series for goodput-over-time plots.
* ``tcp-send`` connects with ``TCP_CONGESTION`` set (cubic, bbr, reno) and sends zeros until
  the receiver closes.  Socket buffers are left to the kernel's autotuning, whose ceiling the
  forwarder raised inside the lab namespaces to 64 MB (``net.ipv4.tcp_[rw]mem``): setting
  SO_RCVBUF by hand would switch autotuning off and cap the window at ``rmem_max``.
* ``udp-send`` / ``udp-recv`` blast datagrams as fast as the sender can for the forwarder
  self-test; the receiver counts what arrives after warm-up.

Each prints exactly one JSON line on stdout as its result (the receiver first prints
``listening`` so the driver knows when to start the sender).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, LocalProtocolError, NetworkError

TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
BIN_S = 0.5  # goodput-over-time resolution (GEO delivers in RTT-sized bursts after repairs)


@dataclass
class GoodputMeter:
    """Bytes over time -> goodput after warm-up, and a binned series.  Pure: callers pass ``now``."""

    start: float
    warmup: float
    duration: float
    bin_s: float = BIN_S
    total: int = 0
    in_window: int = 0
    bins: list[int] = field(default_factory=list)

    @property
    def end(self) -> float:
        return self.start + self.warmup + self.duration

    def add(self, nbytes: int, now: float) -> None:
        self.total += nbytes
        t = now - self.start
        if self.warmup <= t < self.warmup + self.duration:
            self.in_window += nbytes
        idx = int(t / self.bin_s)
        if idx >= 0:
            if idx >= len(self.bins):
                self.bins.extend([0] * (idx + 1 - len(self.bins)))
            self.bins[idx] += nbytes

    def result(self) -> dict[str, Any]:
        return {
            "bytes_total": self.total,
            "bytes_window": self.in_window,
            "goodput_bps": self.in_window * 8 / self.duration if self.duration > 0 else 0.0,
            "warmup_s": self.warmup,
            "window_s": self.duration,
            "bin_s": self.bin_s,
            "series_mbit": [round(b * 8 / self.bin_s / 1e6, 4) for b in self.bins],
        }


def accept_one(bind: str, port: int, timeout: float) -> tuple[socket.socket, socket.socket]:
    """Listen, say ``listening`` on stdout (the driver's cue to start the sender), accept one
    connection: ``(listening socket, connection)``."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(1)
    srv.settimeout(timeout)
    print("listening", flush=True)
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        srv.close()
        raise NetworkError(f"no TCP connection within {timeout} s") from None
    return srv, conn


def _tcp_recv(args: argparse.Namespace) -> dict[str, Any]:
    srv, conn = accept_one(args.bind, args.port, args.accept_timeout)
    meter = GoodputMeter(time.monotonic(), args.warmup, args.duration)
    buf = bytearray(1 << 20)
    conn.settimeout(1.0)
    while True:
        now = time.monotonic()
        if now >= meter.end:
            break
        try:
            n = conn.recv_into(buf)
        except socket.timeout:
            continue
        if n == 0:
            break
        meter.add(n, time.monotonic())
    conn.close()
    srv.close()
    return meter.result()


def _tcp_send(args: argparse.Namespace) -> dict[str, Any]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, args.cc.encode())
    except OSError as e:
        raise ConfigError(f"congestion control {args.cc!r} not available here: {e.strerror}", where="--cc") from None
    s.settimeout(args.connect_timeout)
    try:
        s.connect((args.to, args.port))
    except OSError as e:
        raise NetworkError(f"connect to {args.to}:{args.port}: {e}") from None
    s.settimeout(None)
    chunk = bytes(256 * 1024)
    sent = 0
    deadline = time.monotonic() + args.max_time
    try:
        while time.monotonic() < deadline:
            sent += s.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the receiver closes when its window is over
    cc = s.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, 16).rstrip(b"\0").decode()
    s.close()
    return {"bytes_sent": sent, "cc": cc}


def _udp_recv(args: argparse.Namespace) -> dict[str, Any]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((args.bind, args.port))
    s.settimeout(args.accept_timeout)
    print("listening", flush=True)
    buf = bytearray(65536)
    try:
        n = s.recv_into(buf)
    except socket.timeout:
        raise NetworkError(f"no datagram within {args.accept_timeout} s") from None
    meter = GoodputMeter(time.monotonic(), args.warmup, args.duration)
    packets_window = 0
    s.settimeout(0.5)
    while True:
        now = time.monotonic()
        if now >= meter.end:
            break
        try:
            n = s.recv_into(buf)
        except socket.timeout:
            continue
        meter.add(n, now)
        if meter.warmup <= now - meter.start < meter.warmup + meter.duration:
            packets_window += 1
    out = meter.result()
    out["pps"] = packets_window / args.duration
    return out


def _udp_send(args: argparse.Namespace) -> dict[str, Any]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((args.to, args.port))
    payload = bytes(args.size)
    sent = errors = 0
    end = time.monotonic() + args.max_time
    gap = args.size * 8 / args.rate if args.rate > 0 else 0.0
    nxt = time.monotonic()
    send = s.send
    while True:
        now = time.monotonic()
        if now >= end:
            break
        for _ in range(64):
            try:
                send(payload)
                sent += 1
            except (BlockingIOError, ConnectionRefusedError, OSError):
                errors += 1  # ENOBUFS from a full TUN queue: the point of a blast
        if gap:
            nxt += 64 * gap
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return {"packets_sent": sent, "send_errors": errors}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lu2k.lab.baseline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("tcp-recv", "udp-recv"):
        r = sub.add_parser(name)
        r.add_argument("--bind", required=True)
        r.add_argument("--port", type=int, required=True)
        r.add_argument("--warmup", type=float, default=5.0)
        r.add_argument("--duration", type=float, default=10.0)
        r.add_argument("--accept-timeout", type=float, default=30.0)
    s = sub.add_parser("tcp-send")
    s.add_argument("--to", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--cc", default="cubic")
    s.add_argument("--max-time", type=float, default=120.0)
    s.add_argument("--connect-timeout", type=float, default=30.0)
    u = sub.add_parser("udp-send")
    u.add_argument("--to", required=True)
    u.add_argument("--port", type=int, required=True)
    u.add_argument("--size", type=int, default=1472)  # 1500-byte IP packets
    u.add_argument("--rate", type=float, default=0.0, help="bit/s; 0 = as fast as possible")
    u.add_argument("--max-time", type=float, default=20.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn = {"tcp-recv": _tcp_recv, "tcp-send": _tcp_send, "udp-recv": _udp_recv, "udp-send": _udp_send}[args.cmd]
    try:
        result = fn(args)
    except (ConfigError, NetworkError) as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


# --- drivers (run in the parent, against a Lab) -----------------------------------------------


def _module_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "lu2k.lab.baseline", *args]


def _wait_listening(proc: "subprocess.Popen[str]", what: str, timeout: float = 20.0) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "listening":
        rest = proc.stdout.read() if proc.poll() is not None else ""
        raise NetworkError(f"{what} did not start: {line} {rest}".strip())


def _last_json(text: str, what: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            data = json.loads(line)
            if "error" in data:
                raise NetworkError(f"{what}: {data['error']}")
            return dict(data)
    raise NetworkError(f"{what} printed no result: {text[-500:]!r}")


def tcp_baseline(lab: Any, cc: str, *, warmup: float, duration: float, port: int = 5201) -> dict[str, Any]:
    """Kernel TCP bulk transfer a->b with congestion control ``cc``; receiver goodput after warm-up."""
    from .netns import child_env

    if cc not in ("cubic", "bbr", "reno"):
        raise LocalProtocolError(f"unknown TCP congestion control {cc!r}")
    env = child_env()
    recv = lab.popen("b", _module_argv("tcp-recv", "--bind", lab.addr_b, "--port", str(port), "--warmup", str(warmup),
                                       "--duration", str(duration)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_listening(recv, f"tcp-recv ({cc})")
        send = lab.popen("a", _module_argv("tcp-send", "--to", lab.addr_b, "--port", str(port), "--cc", cc,
                                           "--max-time", str(warmup + duration + 60)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            r_out, r_err = recv.communicate(timeout=warmup + duration + 90)
            s_out, s_err = send.communicate(timeout=30)
        finally:
            if send.poll() is None:
                send.kill()
                send.wait()
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    result = _last_json(r_out + r_err, f"tcp-recv ({cc})")
    sender = _last_json(s_out + s_err, f"tcp-send ({cc})")
    if sender.get("cc") != cc:
        raise NetworkError(f"sender ran {sender.get('cc')!r}, not {cc!r}")
    result["cc"] = cc
    return result


def udp_blast(lab: Any, *, warmup: float, duration: float, rate_bps: float = 0.0, size: int = 1472, port: int = 5202) -> dict[str, Any]:
    """Blast UDP a->b; what arrives at b per second after warm-up."""
    from .netns import child_env

    env = child_env()
    recv = lab.popen("b", _module_argv("udp-recv", "--bind", lab.addr_b, "--port", str(port), "--warmup", str(warmup),
                                       "--duration", str(duration)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_listening(recv, "udp-recv")
        send = lab.popen("a", _module_argv("udp-send", "--to", lab.addr_b, "--port", str(port), "--size", str(size),
                                           "--rate", str(rate_bps), "--max-time", str(warmup + duration + 2)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            r_out, r_err = recv.communicate(timeout=warmup + duration + 60)
            s_out, s_err = send.communicate(timeout=warmup + duration + 30)
        finally:
            if send.poll() is None:
                send.kill()
                send.wait()
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    result = _last_json(r_out + r_err, "udp-recv")
    result.update(_last_json(s_out + s_err, "udp-send"))
    return result


if __name__ == "__main__":
    sys.exit(main())
