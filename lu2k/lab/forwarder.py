"""The lab's forwarder process: two namespaces, two TUN devices, two link models, one loop.

Run as ``python -m lu2k.lab.forwarder STATE_FILE --ready-fd N [--die-with-parent]`` by
:class:`lu2k.lab.netns.Lab`; nobody else should start it.

Setup (all failures are reported on the ready pipe, then everything made so far is undone):
create both namespaces, open ``/dev/net/tun`` twice (``IFF_TUN | IFF_NO_PI``: bare IP packets,
no offloads, so every packet is at most the 1500-byte MTU), move each device into its
namespace -- the file descriptors stay valid across the move -- and address them.

The loop is deliberately not asyncio: it is the emulator's ceiling that decides whether its
figures mean anything, and a bare ``epoll`` loop with a timer heap per direction costs a few
microseconds per packet.  Each wakeup it (1) releases every packet whose time has come,
recording lateness = actual - scheduled, (2) drains up to ``BATCH`` packets from each readable
TUN fd through :meth:`LinkModel.offer` onto the other direction's heap, and (3) sleeps in
``epoll`` until the next release (``epoll`` has millisecond resolution, which is what the
lateness figures show).  The cyclic garbage collector is off: the loop makes no cycles and
a collection pause would show up as lateness.

Counters are answered on the control socket (``stats``), written to ``<id>.stats.json`` on
SIGUSR1 and at exit, and printed to the log at exit.  ``down``/``up`` on the control socket
flap the link (one direction or both).
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
        self.models = {"ab": LinkModel(state.specs[0], "ab"), "ba": LinkModel(state.specs[1], "ba")}
        self.fds: dict[str, int] = {}
        self.ctl: socket.socket | None = None
        self.stopping = False
        self.started = time.monotonic()
        self.wakeups = 0
        self.write_errors = 0
        self.overflow_drops = 0
        self.max_batch = 0
        self.in_flight_bytes = {"ab": 0, "ba": 0}
        self.max_in_flight_bytes = {"ab": 0, "ba": 0}
        self._heaps: dict[str, list[tuple[float, int, bytes]]] = {"ab": [], "ba": []}
        self._seq = 0
        self._dump_requested = False
        self.scheduling = "normal"

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        st = self.state
        for side in ("a", "b"):
            ns = st.ns[side]
            run_ip(["netns", "add", ns])
            run_ip(["-n", ns, "link", "set", "lo", "up"])
            args = [f"{k}={v}" for k, v in NS_SYSCTLS.items()]
            run_ip(["netns", "exec", ns, "sysctl", "-q", "-w", *args])
        for side, peer in (("a", "b"), ("b", "a")):
            ns, dev = st.ns[side], st.dev[side]
            self.fds[side] = open_tun(dev)
            run_ip(["link", "set", "dev", dev, "netns", ns])
            run_ip(["-n", ns, "link", "set", "dev", dev, "mtu", "1500", "up"])
            run_ip(["-n", ns, "addr", "add", f"{st.addr[side]}/32", "peer", f"{st.addr[peer]}/32", "dev", dev])
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
        fd_a, fd_b = self.fds["a"], self.fds["b"]
        assert self.ctl is not None
        ctl_fd = self.ctl.fileno()
        ep = select.epoll()
        for fd in (fd_a, fd_b, ctl_fd, wake_fd):
            ep.register(fd, select.EPOLLIN)
        heap_ab, heap_ba = self._heaps["ab"], self._heaps["ba"]
        mono = time.monotonic
        gc.disable()
        try:
            while not self.stopping:
                now = mono()
                if heap_ab and heap_ab[0][0] <= now:
                    self._release("ab", heap_ab, fd_b, now)
                if heap_ba and heap_ba[0][0] <= now:
                    self._release("ba", heap_ba, fd_a, now)
                if heap_ab or heap_ba:
                    nxt = min(heap_ab[0][0] if heap_ab else 1e300, heap_ba[0][0] if heap_ba else 1e300)
                    timeout = min(max(nxt - mono(), 0.0), 1.0)
                else:
                    timeout = 1.0
                events = ep.poll(timeout)
                self.wakeups += 1
                if not events:
                    continue
                now = mono()
                for fd, _ in events:
                    if fd == fd_a:
                        self._ingest("ab", fd_a, heap_ab, now)
                    elif fd == fd_b:
                        self._ingest("ba", fd_b, heap_ba, now)
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

    def _ingest(self, direction: str, fd: int, heap: list[tuple[float, int, bytes]], now: float) -> None:
        offer = self.models[direction].offer
        read = os.read
        push = heapq.heappush
        in_flight = self.in_flight_bytes[direction]
        n = 0
        while n < BATCH:
            try:
                pkt = read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                break  # device going away during teardown
            n += 1
            verdict = offer(len(pkt), now)
            if verdict.__class__ is float:
                if in_flight + len(pkt) > MAX_IN_FLIGHT_BYTES:
                    self.overflow_drops += 1
                    continue
                in_flight += len(pkt)
                self._seq += 1
                push(heap, (verdict, self._seq, pkt))  # type: ignore[arg-type]
        self.in_flight_bytes[direction] = in_flight
        if in_flight > self.max_in_flight_bytes[direction]:
            self.max_in_flight_bytes[direction] = in_flight
        if n > self.max_batch:
            self.max_batch = n

    def _release(self, direction: str, heap: list[tuple[float, int, bytes]], out_fd: int, now: float) -> None:
        late = self.models[direction].counters.lateness.add
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
        self.in_flight_bytes[direction] -= released

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
            for d in ("ab", "ba") if direction == "both" else (direction,):
                self.models[d].set_up(name == "up")
            return {"ok": True, "up": {d: m.up for d, m in self.models.items()}}
        if name == "ping":
            return {"ok": True, "pid": os.getpid()}
        return {"error": f"unknown command {name!r} (stats, up, down, ping)"}

    def stats(self) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru.ru_utime + ru.ru_stime
        uptime = time.monotonic() - self.started
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
            "in_flight_bytes": dict(self.in_flight_bytes),
            "max_in_flight_bytes": dict(self.max_in_flight_bytes),
            "up": {d: m.up for d, m in self.models.items()},
            "queue_limit_bytes": {d: m.queue_limit for d, m in self.models.items()},
            "links": {d: m.counters.to_dict() for d, m in self.models.items()},
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
        print(f"lu2k lab {state.lab_id}: up, pid {os.getpid()} ({priority}), {state.ns['a']} {state.addr['a']} <-> "
              f"{state.ns['b']} {state.addr['b']}", flush=True)
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
