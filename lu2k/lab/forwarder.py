"""The lab's forwarder process: two namespaces, a TUN pair and two link models per path, one loop.

Run as ``python -m lu2k.lab.forwarder STATE_FILE --ready-fd N [--die-with-parent]`` by
:class:`lu2k.lab.netns.Lab`; nobody else should start it.

Setup (all failures are reported on the ready pipe, then everything made so far is undone):
create both namespaces, open ``/dev/net/tun`` twice per path (``IFF_TUN | IFF_NO_PI``: bare IP
packets, no offloads, so every packet is at most the 1500-byte MTU), move each device into its
namespace -- the file descriptors stay valid across the move -- and address them (IPv4, and
IPv6 in a lab made with it: no duplicate address detection, no router solicitations, no
link-local address, so the only IPv6 packets on a path are the ones its users send).

Each path has one *channel* per direction: the fd packets come in on, its ``LinkModel``, its
timer heap and the fd they go out on.  All channels share the one loop below.

The loop is deliberately not asyncio: it is the emulator's ceiling that decides whether its
figures mean anything, and a bare ``epoll`` loop with a timer heap per direction costs a few
microseconds per packet.  Each wakeup it (1) releases every packet whose time has come,
recording lateness = actual - scheduled, (2) drains up to ``BATCH`` packets from each readable
TUN fd through its channel's :meth:`LinkModel.offer` onto the channel's heap (counting the
IPv6 ones -- the model charges a packet its full length, IPv4 or IPv6 header included), and
(3) sleeps in
``epoll`` until the next release (``epoll`` has millisecond resolution, which is what the
lateness figures show).  The cyclic garbage collector is off: the loop makes no cycles and
a collection pause would show up as lateness.

Counters are answered on the control socket (``stats``), written to ``<id>.stats.json`` on
SIGUSR1 and at exit, and printed to the log at exit: ``links`` is path 0's two directions,
``paths[i]`` each path's.  ``down``/``up`` on the control socket flap one path's link (one
direction or both) or every path's.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import gc
import heapq
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Lu2kError
from .model import LinkModel
from .netns import LabError, LabState, control_address, run_ip, teardown

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
PR_SET_PDEATHSIG = 1
BATCH = 256  # packets drained per fd per wakeup: bounds how long one direction can starve the other
READ_SIZE = 65536  # a TUN read returns one packet; the MTU keeps it at 1500, the slack is harmless
# In flight (accepted, waiting for their release time) per direction.  The model's queue bounds
# what waits for the link; this bounds an unlimited-rate link with a long delay.
MAX_IN_FLIGHT_BYTES = 64 << 20
FORWARDER_NICE = -10
FORWARDER_RT_PRIORITY = 1
# Per-namespace TCP buffer limits, so the kernel TCP baselines can fill a GEO BDP (1.5 MB) many
# times over; these sysctls are per network namespace and touch nothing outside the lab.
NS_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "1",  # no router solicitations or other chatter
    "net.ipv6.conf.default.disable_ipv6": "1",
    "net.ipv4.tcp_rmem": "4096 131072 67108864",
    "net.ipv4.tcp_wmem": "4096 65536 67108864",
    "net.ipv4.tcp_no_metrics_save": "1",  # each baseline run starts from scratch
}
# A lab with IPv6: on, but silent -- no DAD delay before an address is usable, no router
# solicitations, no link-local addresses (the TUN devices get only the lab's ULA addresses).
NS_SYSCTLS_IPV6 = {
    "net.ipv6.conf.all.disable_ipv6": "0",
    "net.ipv6.conf.default.disable_ipv6": "0",
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.all.router_solicitations": "0",
    "net.ipv6.conf.default.router_solicitations": "0",
    "net.ipv6.conf.all.accept_ra": "0",
    "net.ipv6.conf.default.accept_ra": "0",
    "net.ipv6.conf.default.addr_gen_mode": "1",  # no link-local address
}
DIRECTIONS = (("ab", "a", "b"), ("ba", "b", "a"))  # name, in side, out side


def ns_sysctls(ipv6: bool, rmem_default: int = 0) -> dict[str, str]:
    out = {**NS_SYSCTLS, **NS_SYSCTLS_IPV6} if ipv6 else dict(NS_SYSCTLS)
    if rmem_default:
        low, _default, high = out["net.ipv4.tcp_rmem"].split()
        out["net.ipv4.tcp_rmem"] = f"{low} {rmem_default} {high}"
    return out


@dataclass(eq=False)
class Channel:
    """One direction of one path: packets read from ``in_fd`` go through ``model`` onto
    ``heap`` (release time, sequence, packet) and out of ``out_fd`` when their time comes."""

    path: int
    direction: str
    in_side: str
    out_side: str
    model: LinkModel
    heap: list[tuple[float, int, bytes]] = field(default_factory=list)
    in_fd: int = -1
    out_fd: int = -1
    in_flight_bytes: int = 0
    max_in_flight_bytes: int = 0


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise LabError(f"cannot create TUN device {name}: {e.strerror}") from None
    return fd


def set_priority() -> str:
    """Run ahead of what we measure: SCHED_FIFO 1 if allowed, else nice -10, else as is.

    The emulator's timing is the yardstick of every figure taken through it.  netem does its
    work in softirq context, ahead of every task; the nearest a user-space forwarder gets is
    the lowest real-time priority.  It sleeps in epoll whenever no packet is due, and the
    kernel's RT throttling keeps a runaway from taking a whole core.  ``LU2K_LAB_RT=0`` asks
    for plain nice instead.
    """
    if os.environ.get("LU2K_LAB_RT", "1") != "0":
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FORWARDER_RT_PRIORITY))
            return "SCHED_FIFO"
        except (OSError, AttributeError):
            pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, FORWARDER_NICE)
        return f"nice {FORWARDER_NICE}"
    except OSError:
        return "normal"  # not root: lateness figures will show what that costs


def set_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise LabError(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")


class Forwarder:
    def __init__(self, state: LabState, state_path: Path) -> None:
        self.state = state
        self.state_path = state_path
        self.directory = state_path.parent
        self.paths: list[dict[str, Channel]] = [
            {name: Channel(i, name, src, dst, LinkModel(spec, name if i == 0 else f"{name}{i}"))
             for (name, src, dst), spec in zip(DIRECTIONS, specs)}
            for i, specs in enumerate(state.paths)
        ]
        self.fds: dict[tuple[int, str], int] = {}  # (path, side) -> TUN fd
        self.ctl: socket.socket | None = None
        self.stopping = False
        self.started = time.monotonic()
        self.wakeups = 0
        self.write_errors = 0
        self.overflow_drops = 0
        self.max_batch = 0
        self._seq = 0
        self._dump_requested = False
        self.scheduling = "normal"

    @property
    def models(self) -> dict[str, LinkModel]:
        """Path 0's two directions."""
        return {d: c.model for d, c in self.paths[0].items()}

    @property
    def channels(self) -> list[Channel]:
        return [c for p in self.paths for c in p.values()]

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        st = self.state
        sysctls = [f"{k}={v}" for k, v in ns_sysctls(st.ipv6, st.rmem_default).items()]
        for side in ("a", "b"):
            ns = st.ns[side]
            run_ip(["netns", "add", ns])
            run_ip(["-n", ns, "link", "set", "lo", "up"])
            run_ip(["netns", "exec", ns, "sysctl", "-q", "-w", *sysctls])
        devs, addrs, addrs6 = st.devs, st.addrs, st.addrs6
        for i in range(len(st.paths)):
            for side, peer in (("a", "b"), ("b", "a")):
                ns, dev = st.ns[side], devs[i][side]
                self.fds[(i, side)] = open_tun(dev)
                run_ip(["link", "set", "dev", dev, "netns", ns])
                if st.ipv6:
                    # Per device as well: the namespace defaults apply to devices registered
                    # there, and this one was born outside.
                    run_ip(["-n", ns, "link", "set", "dev", dev, "addrgenmode", "none"])
                run_ip(["-n", ns, "link", "set", "dev", dev, "mtu", "1500", "up"])
                run_ip(["-n", ns, "addr", "add", f"{addrs[i][side]}/32", "peer", f"{addrs[i][peer]}/32", "dev", dev])
                if st.ipv6:
                    run_ip(["-n", ns, "-6", "addr", "add", f"{addrs6[i][side]}/128", "peer", f"{addrs6[i][peer]}/128",
                            "dev", dev, "nodad"])
                if st.initcwnd:  # the peer route the address made, with initial windows of its own
                    windows = ["initcwnd", str(st.initcwnd), "initrwnd", str(st.initcwnd)]
                    run_ip(["-n", ns, "route", "replace", f"{addrs[i][peer]}/32", "dev", dev, "src", addrs[i][side], *windows])
                    if st.ipv6:
                        run_ip(["-n", ns, "-6", "route", "replace", f"{addrs6[i][peer]}/128", "dev", dev, "src", addrs6[i][side],
                                *windows])
        self.ctl = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.ctl.bind(control_address(st.lab_id))
        except OSError as e:
            raise LabError(f"control socket for lab {st.lab_id!r}: {e}") from None
        self.ctl.setblocking(False)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)  # non-persistent TUN devices vanish with their fd
        self.fds.clear()
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None

    # --- loop ----------------------------------------------------------------------------

    def run(self, wake_fd: int) -> None:
        assert self.ctl is not None
        ctl_fd = self.ctl.fileno()
        channels = self.channels
        for c in channels:
            c.in_fd, c.out_fd = self.fds[(c.path, c.in_side)], self.fds[(c.path, c.out_side)]
        by_fd = {c.in_fd: c for c in channels}
        ep = select.epoll()
        for fd in (*by_fd, ctl_fd, wake_fd):
            ep.register(fd, select.EPOLLIN)
        mono = time.monotonic
        gc.disable()
        try:
            while not self.stopping:
                now = mono()
                nxt = 1e300
                for c in channels:
                    heap = c.heap
                    if heap:
                        if heap[0][0] <= now:
                            self._release(c, now)
                        if heap and heap[0][0] < nxt:
                            nxt = heap[0][0]
                timeout = min(max(nxt - mono(), 0.0), 1.0) if nxt < 1e300 else 1.0
                events = ep.poll(timeout)
                self.wakeups += 1
                if not events:
                    continue
                now = mono()
                for fd, _ in events:
                    chan = by_fd.get(fd)
                    if chan is not None:
                        self._ingest(chan, now)
                    elif fd == ctl_fd:
                        self._serve_control()
                    elif fd == wake_fd:
                        try:
                            os.read(wake_fd, 512)
                        except BlockingIOError:
                            pass
                        if self._dump_requested:
                            self._dump_requested = False
                            self.write_stats()
                            print(json.dumps(self.stats()), flush=True)
        finally:
            gc.enable()
            ep.close()

    def _ingest(self, chan: Channel, now: float) -> None:
        offer = chan.model.offer
        fd, heap = chan.in_fd, chan.heap
        read = os.read
        push = heapq.heappush
        in_flight = chan.in_flight_bytes
        n = v6_packets = v6_bytes = 0
        while n < BATCH:
            try:
                pkt = read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                break  # device going away during teardown
            n += 1
            if pkt and pkt[0] >> 4 == 6:
                v6_packets += 1
                v6_bytes += len(pkt)
            verdict = offer(len(pkt), now)
            if verdict.__class__ is float:
                if in_flight + len(pkt) > MAX_IN_FLIGHT_BYTES:
                    self.overflow_drops += 1
                    continue
                in_flight += len(pkt)
                self._seq += 1
                push(heap, (verdict, self._seq, pkt))  # type: ignore[arg-type]
        if v6_packets:
            counters = chan.model.counters
            counters.packets_ipv6 += v6_packets
            counters.bytes_ipv6 += v6_bytes
        chan.in_flight_bytes = in_flight
        if in_flight > chan.max_in_flight_bytes:
            chan.max_in_flight_bytes = in_flight
        if n > self.max_batch:
            self.max_batch = n

    def _release(self, chan: Channel, now: float) -> None:
        late = chan.model.counters.lateness.add
        heap, out_fd = chan.heap, chan.out_fd
        pop = heapq.heappop
        write = os.write
        released = 0
        while heap and heap[0][0] <= now:
            when, _, pkt = pop(heap)
            released += len(pkt)
            try:
                write(out_fd, pkt)
            except OSError:
                self.write_errors += 1
            late(now - when)
        chan.in_flight_bytes -= released

    # --- control and counters -----------------------------------------------------------

    def _serve_control(self) -> None:
        assert self.ctl is not None
        while True:
            try:
                data, addr = self.ctl.recvfrom(65536)
            except BlockingIOError:
                return
            try:
                reply = self.handle_command(json.loads(data))
            except (ValueError, TypeError, KeyError) as e:
                reply = {"error": f"bad control request: {e}"}
            try:
                self.ctl.sendto(json.dumps(reply).encode(), addr)
            except OSError:
                pass  # the client gave up; nothing to do

    def handle_command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd.get("cmd")
        if name == "stats":
            return self.stats()
        if name in ("up", "down"):
            direction = cmd.get("direction", "both")
            if direction not in ("ab", "ba", "both"):
                return {"error": f"direction must be ab, ba or both, not {direction!r}"}
            path = cmd.get("path", 0)
            if path == "all":
                paths = list(range(len(self.paths)))
            elif isinstance(path, int) and not isinstance(path, bool) and 0 <= path < len(self.paths):
                paths = [path]
            else:
                return {"error": f"no path {path!r}: this lab has paths 0..{len(self.paths) - 1} (or all)"}
            for i in paths:
                for d in ("ab", "ba") if direction == "both" else (direction,):
                    self.paths[i][d].model.set_up(name == "up")
            ups = [{d: c.model.up for d, c in p.items()} for p in self.paths]
            return {"ok": True, "up": ups[paths[0]], "paths": ups}
        if name == "ping":
            return {"ok": True, "pid": os.getpid()}
        return {"error": f"unknown command {name!r} (stats, up, down, ping)"}

    def path_stats(self, i: int) -> dict[str, Any]:
        p = self.paths[i]
        return {
            "path": i,
            "up": {d: c.model.up for d, c in p.items()},
            "in_flight_bytes": {d: c.in_flight_bytes for d, c in p.items()},
            "max_in_flight_bytes": {d: c.max_in_flight_bytes for d, c in p.items()},
            "queue_limit_bytes": {d: c.model.queue_limit for d, c in p.items()},
            "links": {d: c.model.counters.to_dict() for d, c in p.items()},
        }

    def stats(self) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru.ru_utime + ru.ru_stime
        uptime = time.monotonic() - self.started
        paths = [self.path_stats(i) for i in range(len(self.paths))]
        return {
            "id": self.state.lab_id,
            "pid": os.getpid(),
            "scheduling": self.scheduling,
            "uptime_s": uptime,
            "cpu_s": cpu,
            "cpu_util": cpu / uptime if uptime > 0 else 0.0,
            "wakeups": self.wakeups,
            "max_batch": self.max_batch,
            "write_errors": self.write_errors,
            "overflow_drops": self.overflow_drops,
            # Path 0's, at the top level as in a one-path lab.
            **{k: paths[0][k] for k in ("in_flight_bytes", "max_in_flight_bytes", "up", "queue_limit_bytes", "links")},
            "paths": paths,
        }

    def write_stats(self) -> None:
        path = self.directory / f"{self.state.lab_id}.stats.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.stats(), indent=1))
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lu2k.lab.forwarder", description="lu2k lab forwarder (started by lu2k lab up)")
    p.add_argument("state_file", type=Path)
    p.add_argument("--ready-fd", type=int, default=-1)
    p.add_argument("--die-with-parent", action="store_true")
    p.add_argument("--detach", action="store_true", help="fork into the background (lu2k lab up)")
    args = p.parse_args(argv)
    if args.detach and os.fork() > 0:
        # The starter reaps this parent at once; the forwarder lives on under init, so it
        # never lingers as a zombie of a long-lived starter (a test run, a shell script).
        os._exit(0)

    def ready(message: str) -> None:
        if args.ready_fd >= 0:
            try:
                os.write(args.ready_fd, (message.replace("\n", " ") + "\n").encode())
                os.close(args.ready_fd)
            except OSError:
                pass
            args.ready_fd = -1

    parent = os.getppid()
    if args.die_with_parent:
        set_pdeathsig()
        if os.getppid() != parent:  # the parent died before prctl took effect
            return 1
    try:
        state = LabState.load(args.state_file)
    except Lu2kError as e:
        ready(f"error: {e}")
        return 1
    fwd = Forwarder(state, args.state_file)

    # Signals only set flags; the wakeup fd gets the loop out of epoll to act on them.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

    def stop(signum: int, frame: object) -> None:
        fwd.stopping = True

    def dump(signum: int, frame: object) -> None:
        fwd._dump_requested = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    signal.signal(signal.SIGUSR1, dump)

    status = 0
    try:
        state.pid = os.getpid()
        state.save(args.state_file.parent)
        fwd.setup()
        # After setup, so the ``ip`` helpers it ran did not inherit a real-time policy.
        priority = fwd.scheduling = set_priority()
        state.ready = True
        state.save(args.state_file.parent)
        ready("ok")
        for i, addr in enumerate(state.addrs):
            v6 = f" ({state.addrs6[i]['a']} <-> {state.addrs6[i]['b']})" if state.ipv6 else ""
            print(f"lu2k lab {state.lab_id}: path {i} up, pid {os.getpid()} ({priority}), {state.ns['a']} {addr['a']} <-> "
                  f"{state.ns['b']} {addr['b']}{v6}", flush=True)
        if not fwd.stopping:
            fwd.run(wake_r)
    except Lu2kError as e:
        ready(f"error: {e}")
        print(f"lu2k lab {state.lab_id}: {e}", file=sys.stderr, flush=True)
        status = 1
    except BaseException as e:  # the lab must be torn down whatever went wrong
        ready(f"error: {type(e).__name__}: {e}")
        status = 1
        raise
    finally:
        try:
            fwd.write_stats()
            print(json.dumps(fwd.stats()), flush=True)
        except OSError:
            pass
        fwd.close()
        try:  # the teardown's helpers need no real-time priority
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass
        teardown(state, args.state_file.parent)
    return status


if __name__ == "__main__":
    sys.exit(main())
