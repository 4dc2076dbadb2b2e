"""What the tcp backend does with one socket's kernel BBR, decided from ``TCP_CC_INFO`` (sans-I/O).

The kernel runs BBR; lu2k can only read its state (``TCP_CC_INFO``: bandwidth estimate, min
RTT, the two gains) and act through socket options: the pacing ceiling
(``SO_MAX_PACING_RATE``) and the congestion control itself (``TCP_CONGESTION``, which
re-initialises BBR's model when set anew).  :class:`BbrWatch` decides, from one reading at a
time, which of those to do; the transport reads the socket on a timer and applies the actions.
It does two things:

* **Start-up cap.** STARTUP paces at 2.885x its estimate; on a long path with a one-BDP
  bottleneck queue it overshoots by about a BDP of drops before it sees the link is full.  A new
  bulk socket is paced at most ``startup_cap`` until BBR has left STARTUP, then at ``rate_cap``
  (or without a ceiling).

* **No ProbeRTT on long paths** (``probe_rtt``).  BBR v1 drains its window to four packets
  for ``max(200 ms, one round trip)`` whenever its min-RTT sample is ten seconds old.  On a
  600 ms path that is a second or more with the link idle once the bottleneck queue has run
  dry, every 10-20 s: several percent of the link.  Before the ten seconds are up the watch
  restarts BBR's model (congestion control set to ``reno`` and back): BBR starts again from
  STARTUP with the kernel's own min RTT over the last five minutes
  (``net.ipv4.tcp_min_rtt_wlen``) and a fresh ten seconds, while the congestion window, the
  in-flight data and the loss recovery carry on.  The new STARTUP is paced at most 1.1x the
  bandwidth BBR had measured just before, so it does not overshoot, and that ceiling goes when
  it leaves STARTUP, as for a new socket.  The cost: BBR's min RTT only follows a path whose RTT
  grows after that window, so ``auto`` does this only on paths whose min RTT is at least
  :data:`PROBE_RTT_SKIP_MIN_RTT` (a GEO hop, whose RTT is the orbit's), where a ProbeRTT costs
  most.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

# struct tcp_bbr_info: bw_lo, bw_hi (bytes/s), min_rtt (us), pacing_gain, cwnd_gain (gains in 1/256ths).
BBR_INFO = struct.Struct("=IIIII")
BBR_STARTUP_GAIN_MIN = 2 * 256  # STARTUP paces at 2.885x (739/256); no later phase above 1.25x
# A new BULK socket's start-up cap, as a share of the profile's rate, and a restarted model's,
# as a share of the bandwidth BBR had measured: capped a little above the rate, STARTUP finds
# the plateau with the queue a fraction of a BDP deep; the cap goes once BBR has left STARTUP.
STARTUP_CAP_SHARE = 1.1
PACING_UNLIMITED = (1 << 32) - 1  # ~0U: the kernel's "no cap" for SO_MAX_PACING_RATE
MAX_PACING_RATE_LIMIT = (1 << 32) - 2  # bytes/s: the kernel takes a u32 (~ 34 Gbit/s)

PROBE_RTT_MODES = ("auto", "skip", "kernel")
ProbeRttMode = Literal["auto", "skip", "kernel"]
# BBR v1 (net/ipv4/tcp_bbr.c) enters ProbeRTT when its min-RTT sample is this old.
BBR_MIN_RTT_WINDOW = 10.0
# The model is restarted once it has run this long: the window less a margin for the watch's
# tick (at most WATCH_TICK late) and for a reading taken just before a sample.
WATCH_TICK = 1.0  # seconds between two readings once the start-up cap is lifted
RESTART_AFTER = BBR_MIN_RTT_WINDOW - 3 * WATCH_TICK
# ``auto``: only on paths this long (seconds of min RTT), where a ProbeRTT idles the link for
# most of a round trip and the path's RTT is fixed by its geometry.
PROBE_RTT_SKIP_MIN_RTT = 0.2


@dataclass(frozen=True)
class BbrReading:
    """One ``TCP_CC_INFO`` reading of kernel BBR, with the socket's unacknowledged segments."""

    phase: str  # "startup"; "later" (DRAIN, PROBE_BW); "unknown" (no ACK yet, or PROBE_RTT)
    bandwidth: int  # bytes/s, BBR's estimate (0 before the first ACK, and after a restart)
    min_rtt: float  # seconds
    unacked: int


def bbr_phase(cc_info: bytes) -> str | None:
    """Where kernel BBR is, from its ``TCP_CC_INFO``: "startup"; "later" (DRAIN or PROBE_BW,
    whose window gain is 2 or more); "unknown" (both gains 1: a socket that has had no ACK
    yet, or PROBE_RTT); None if that is not BBR's answer (another congestion control)."""
    if len(cc_info) < BBR_INFO.size:
        return None
    _bw_lo, _bw_hi, _min_rtt, pacing_gain, cwnd_gain = BBR_INFO.unpack_from(cc_info)
    if pacing_gain >= BBR_STARTUP_GAIN_MIN:
        return "startup"
    return "later" if cwnd_gain >= 2 * 256 else "unknown"


def read_bbr(cc_info: bytes, unacked: int) -> BbrReading | None:
    """A :class:`BbrReading` from ``TCP_CC_INFO``; None if that is not BBR's answer."""
    phase = bbr_phase(cc_info)
    if phase is None:
        return None
    bw_lo, bw_hi, min_rtt_us, _pacing_gain, _cwnd_gain = BBR_INFO.unpack_from(cc_info)
    return BbrReading(phase, bw_hi << 32 | bw_lo, min_rtt_us / 1e6, unacked)


# What the transport does with the socket: set SO_MAX_PACING_RATE to the value, or restart
# BBR's model (TCP_CONGESTION to reno and back to bbr; the value is unused).
Action = tuple[Literal["pace", "restart"], int]


class BbrWatch:
    """The decisions for one socket's kernel BBR; see the module's notes.

    | state | reading | actions | next state |
    |---|---|---|---|
    | capped | DRAIN or PROBE_BW ("later") | pace at ``then`` | free |
    | capped | not BBR | pace at ``then`` (nothing will say when) | free |
    | capped | STARTUP or "unknown" | none | capped |
    | free | restart due (below) | pace at 1.1x bandwidth, restart | capped |
    | free | otherwise | none | free |

    "unknown" while capped is a socket without an ACK yet, or a ProbeRTT from STARTUP, after
    which BBR goes back to STARTUP: the cap stays for it.  A restart is due when ``probe_rtt``
    allows it (``skip``; ``auto`` with a min RTT of at least :data:`PROBE_RTT_SKIP_MIN_RTT`),
    the model has run :data:`RESTART_AFTER` seconds, data is in flight (an idle socket's first
    ACK after the idle period renews BBR's min RTT by itself), BBR is past STARTUP or in
    ProbeRTT, and it has a bandwidth estimate to cap the new STARTUP with.
    """

    def __init__(self, now: float, startup_cap: int, then: int, probe_rtt: ProbeRttMode) -> None:
        self.then = then  # bytes/s after STARTUP (rate_cap), 0: no ceiling
        self.probe_rtt = probe_rtt
        self.capped = False
        self._model_since = now
        self.restarts = 0
        self._first: list[Action] = []
        if startup_cap:
            self.capped = True
            self._first = [("pace", startup_cap)]

    def start(self) -> list[Action]:
        """What to set on the new socket before it sends."""
        return self._first

    @property
    def active(self) -> bool:
        """Whether readings can still lead to an action."""
        return self.capped or self.probe_rtt != "kernel"

    def tick(self, now: float, reading: BbrReading | None) -> list[Action]:
        if reading is None:  # not BBR (any more): nothing tells when to lift, so lift now
            return self._lift() if self.capped else []
        if self.capped:
            return self._lift() if reading.phase == "later" else []
        if self._restart_due(now, reading):
            cap = int(min(reading.bandwidth * STARTUP_CAP_SHARE, self.then or MAX_PACING_RATE_LIMIT))
            self.capped, self._model_since = True, now
            self.restarts += 1
            return [("pace", max(1, cap)), ("restart", 0)]
        return []

    def restart_refused(self) -> list[Action]:
        """The socket would not change its congestion control: no more restarts (the kernel's
        ProbeRTT then), and the ceiling set for the restart goes."""
        self.probe_rtt, self.restarts = "kernel", max(0, self.restarts - 1)
        return self._lift()

    def _lift(self) -> list[Action]:
        self.capped = False
        return [("pace", self.then or PACING_UNLIMITED)]

    def _restart_due(self, now: float, reading: BbrReading) -> bool:
        if self.probe_rtt == "kernel" or (self.probe_rtt == "auto" and reading.min_rtt < PROBE_RTT_SKIP_MIN_RTT):
            return False
        return (now - self._model_since >= RESTART_AFTER and reading.unacked > 0
                and reading.phase in ("later", "unknown") and reading.bandwidth > 0)

    def next_tick(self, startup_poll: float) -> float:
        """Seconds until the next reading."""
        return startup_poll if self.capped else WATCH_TICK
