"""Model-based congestion control for long, lossy links (BBR-like).  Pure, sans-I/O.

Theory of operation.  Loss-based controllers (Reno, CUBIC) halve their window on every loss
episode; at 1 % random loss and 600 ms RTT that caps them far below a megabit.  This
controller instead keeps a *model* of the path -- the bottleneck bandwidth (windowed maximum
of delivery-rate samples over ``bw_window_rounds`` rounds) and the propagation RTT (windowed
minimum) -- and sends at the model's rate, paced, with a window of ``cwnd_gain`` BDPs:

* ``STARTUP`` doubles the rate every round (gain 2/ln 2) until the bandwidth estimate stops
  growing by 25 % for three rounds, a round shows congestion loss or a standing queue, or the
  estimate reaches 90 % of the operator's rate -- skipped altogether when the operator gave
  the link's rate (the flow then starts in ``PROBE_BW`` at that rate);
* ``DRAIN`` empties the queue startup built (gain 1/2.885) until in-flight <= one BDP;
* ``PROBE_BW`` cruises at gain 1 with one round at 1.25 (is there more?) followed by one at
  0.75 (drain what the probe queued) every eight rounds -- with the operator's rate, probes of
  the same absolute size for every flow instead (:meth:`BbrController._additive_probe_gain`),
  and a cruise round at 0.9 after any round that left a queue behind;
* ``PROBE_RTT`` lowers in-flight to half a BDP for ``max(200 ms, min RTT)`` when no RTT sample
  came near the minimum for ``min_rtt_window`` seconds, so the minimum can follow a path
  change.  In a healthy steady state the 0.75 phase keeps refreshing the minimum (samples
  within ``rtt_refresh_tolerance`` count), so this rarely costs anything on a GEO link.

Random loss is not congestion, but it does cost wire capacity: delivery-rate samples count
only what got through, so the model's bandwidth is the link rate times (1 - p).  Pacing at
that would leave the link p idle, so the pacing rate is divided by (1 - baseline loss), the
loss rate learned from rounds without a queue (:class:`~lu2k.cc.base.CongestionSignals`).

A path that goes away and comes back (a LEO terminal's hand-over to the next satellite: a few
hundred milliseconds of nothing, then a new RTT) is not congestion either.  An ack gap of
``max(100 ms, 2 RTT)`` with data in flight, or the loss detector's *persistent congestion*,
marks a **blackout**: the bandwidth model is kept (the capacity did not change; if it did,
the first rounds after it show excess loss and the usual reaction follows), the rounds that
straddle the gap are not judged for congestion (their loss is the outage's), the window is
held at a quarter BDP until an ack arrives again, and the RTT minimum is learned again from
the first samples after it -- the old minimum would make a longer new path look like a
standing queue and cut the rate round after round until ``PROBE_RTT``.

Backing off on a shared link.  A round with *excess* loss (above the random baseline by more
than noise) or two rounds with a *standing queue* (the smallest RTT of the round well above
the path minimum) mean we are sending more than our share.  Then the bandwidth model is reset
to what the last round actually delivered (times ``beta``), and a 0.75 drain phase follows;
the 1.25 probes find any capacity that frees up again.  Reactions are at most one per two
rounds, since the effect of one shows only a round later.
"""

from __future__ import annotations

import enum
import math
import random
from typing import Any

from ..errors import ConfigError
from .base import CongestionController, CongestionSignals, MaxFilter, RateSample

STARTUP_GAIN = 2 / math.log(2)  # 2.885: doubles delivery every round
DRAIN_GAIN = 1 / STARTUP_GAIN
PROBE_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
PROBE_RTT_MIN_TIME = 0.2
MIN_CWND_PACKETS = 4
STARTUP_LOSS_EXIT = 0.05
PACING_MARGIN = 0.01
# A cruise round whose *smallest* RTT sat this far above the path minimum left a queue
# behind (startup, a probe, a reaction's transient); the next cruise round paces at
# QUEUE_DRAIN_GAIN to empty it, so the next 1.25 probe does not overflow a 1-BDP buffer.
QUEUE_LEFT_FACTOR = 0.05
QUEUE_LEFT_SLACK = 0.010
QUEUE_DRAIN_GAIN = 0.9
# An ack gap this long (and at least BLACKOUT_RTTS round trips) while data was in flight is
# the path going away, not a queue: on a continuous flow acks come every few milliseconds.
BLACKOUT_MIN_GAP = 0.1
BLACKOUT_RTTS = 2.0
BLACKOUT_CWND_BDP = 0.25


class Mode(enum.Enum):
    STARTUP = "startup"
    DRAIN = "drain"
    PROBE_BW = "probe_bw"
    PROBE_RTT = "probe_rtt"


class BbrController(CongestionController):
    """BBR-like model-based controller; see the module docstring."""

    name = "bbr"

    def __init__(
        self,
        *,
        mss: int,
        initial_rtt: float = 0.1,
        initial_rate: float | None = None,
        cwnd_gain: float = 2.0,
        bw_window_rounds: int = 10,
        min_rtt_window: float = 10.0,
        rtt_refresh_tolerance: float = 0.05,
        max_rate: float | None = None,
        beta: float = 0.85,
        loss_compensation: bool = True,
        signals: CongestionSignals | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(mss=mss)
        if initial_rtt <= 0:
            raise ConfigError(f"initial RTT must be positive, got {initial_rtt}")
        if initial_rate is not None and initial_rate <= 0:
            raise ConfigError(f"initial rate must be positive, got {initial_rate}")
        if max_rate is not None and max_rate <= 0:
            raise ConfigError(f"rate cap must be positive, got {max_rate}")
        if not 1.0 <= cwnd_gain <= 8.0:
            raise ConfigError(f"cwnd gain {cwnd_gain} outside 1..8")
        if not 0.5 <= beta < 1.0:
            raise ConfigError(f"beta {beta} outside 0.5..1")
        self.cwnd_gain = cwnd_gain
        self.min_rtt_window = min_rtt_window
        self.rtt_refresh_tolerance = rtt_refresh_tolerance
        self.max_rate = max_rate
        self.beta = beta
        self.loss_compensation = loss_compensation
        self.signals = signals or CongestionSignals(mss=mss)
        self._rng = random.Random(seed)

        self.mode = Mode.STARTUP
        self.bw = MaxFilter(bw_window_rounds)
        self.min_rtt = math.inf
        self.min_rtt_stamp = 0.0
        self._initial_rtt = initial_rtt
        # An operator-given rate seeds the model so a GEO link is not spent doubling from ten
        # packets for several seconds (see btl_bw and the end of __init__).
        self._hint_bw = initial_rate or 0.0
        self._hint_rate = initial_rate or 0.0  # kept after the seed is dropped: startup exit
        self._startup_queue_acks = 0
        self._rtt_excess = 0.0  # smoothed (RTT sample - min RTT): ack and host delay
        self.pacing_gain = STARTUP_GAIN
        self.cwnd_gain_now = STARTUP_GAIN
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self.filled_pipe = False
        self._cycle_index = 0
        self._cycle_stamp = 0.0
        self._probe_rtt_done_at: float | None = None
        self._probe_rtt_min = math.inf
        self._last_reaction_round = -10
        self.reactions = 0
        self._queue_left = False
        self.blackouts = 0
        self._in_blackout = False
        self._last_ack_time: float | None = None
        self._inflight_after_last_ack = 0
        self._unjudged_through_round = -1  # rounds up to this one straddled a blackout
        if self._hint_bw:
            # The operator told us the link's rate: there is nothing for a 2.885x startup to
            # discover, and on a 1-BDP buffer its first round alone would drop most of a BDP.
            # Cruise at the given rate from the first packet; probing finds any more, and the
            # congestion signals cut a rate that was set too high.
            self.filled_pipe = True
            self.mode = Mode.PROBE_BW
            self.cwnd_gain_now = self.cwnd_gain
            self._set_cycle(0.0, 2)
        self._update_pacing()

    # --- the model --------------------------------------------------------------------------------

    @property
    def btl_bw(self) -> float:
        """Bottleneck bandwidth estimate, bytes/s of *delivered* data."""
        # The operator's rate is a floor until the first congestion signal clears it: the
        # first rounds' delivery samples read low (the ack clock is not running yet), and
        # probing back up from them at 1.25x per eight rounds takes a GEO link ~15 s.
        return max(self.bw.value, self._hint_bw)

    def _rtt(self) -> float:
        return self.min_rtt if math.isfinite(self.min_rtt) else self._initial_rtt

    def bdp(self) -> float:
        return self._wire_bw() * self._rtt()

    def _wire_bw(self) -> float:
        """The bottleneck rate on the wire: delivered rate plus what random loss takes."""
        bw = self.btl_bw
        if self.loss_compensation:
            bw /= 1 - min(self.signals.baseline_loss, 0.2)
        return bw

    def _update_pacing(self) -> None:
        bw = self._wire_bw()
        gain = self.pacing_gain
        if self.mode is Mode.PROBE_BW:
            if gain == 1.0 and self._queue_left:
                gain = QUEUE_DRAIN_GAIN
            elif gain != 1.0 and self._hint_rate > 0 and bw > 0:
                gain = self._additive_probe_gain(gain, bw)
        if bw <= 0:
            # No estimate yet: the initial window over the initial RTT, as aioquic does.
            rate = STARTUP_GAIN * self.cwnd / self._initial_rtt
        else:
            # 1 % under the estimate: a max filter over noisy samples reads a little high,
            # and pacing even 1 % over the bottleneck slowly builds a standing queue.
            rate = gain * bw * (1 - PACING_MARGIN)
        if self.max_rate is not None:
            rate = min(rate, self.max_rate)
        self.pacing_rate = rate
        if bw > 0:
            # The window covers the model's BDP plus the delay acks typically carry beyond
            # the path minimum (delayed/aggregated acks, a busy host): without it a 40 ms
            # path with 10 ms of ack and scheduling delay starves its own window.  Capped,
            # so a real queue cannot hide in it.
            extra = min(self._rtt_excess, max(0.02, 0.1 * self._rtt()))
            target = self.cwnd_gain_now * bw * (self._rtt() + extra) + 3 * self.mss
            if self.mode is Mode.PROBE_RTT:
                target = 0.5 * bw * self._rtt()
            if self._in_blackout:
                target = min(target, BLACKOUT_CWND_BDP * bw * self._rtt())
            self.cwnd = max(int(target), MIN_CWND_PACKETS * self.mss)

    # --- events ---------------------------------------------------------------------------------

    def _on_sample(self, now: float, sample: RateSample, round_ended: bool) -> None:
        sampler = self.sampler
        last = self._last_ack_time
        if (last is not None and self._inflight_after_last_ack > 0
                and now - last > max(BLACKOUT_MIN_GAP, BLACKOUT_RTTS * self._rtt())):
            self._path_went_away(now)
        self._last_ack_time = now
        self._inflight_after_last_ack = self.bytes_in_flight
        self._in_blackout = False
        if not sample.app_limited or sample.rate > self.bw.value:
            self.bw.update(sampler.round_count, sample.rate)
        self._update_min_rtt(now, sample.rtt)
        if self.mode is Mode.STARTUP and math.isfinite(self.min_rtt):
            # A 2.885x startup learns the pipe is full a round too late: by then it has queued
            # ~2 BDP, more than a 1-BDP buffer holds.  Acks that keep coming back with half a
            # BDP of queueing delay say "full" now.
            if sample.rtt > 1.5 * self.min_rtt + 0.010:
                self._startup_queue_acks += 1
                if self._startup_queue_acks >= 3:
                    self.filled_pipe = True
                    self.mode = Mode.DRAIN
                    self.pacing_gain, self.cwnd_gain_now = DRAIN_GAIN, STARTUP_GAIN
            else:
                self._startup_queue_acks = 0
        if round_ended and sampler.last_round is not None:
            self._on_round_end(now, sampler.last_round)
        if self.mode is Mode.PROBE_BW:
            self._advance_cycle(now)
        elif self.mode is Mode.DRAIN and self.bytes_in_flight <= self.bdp():
            self._enter_probe_bw(now)
        self._check_probe_rtt(now)
        self._update_pacing()

    def _update_min_rtt(self, now: float, rtt: float) -> None:
        if math.isfinite(self.min_rtt):
            self._rtt_excess += (max(0.0, rtt - self.min_rtt) - self._rtt_excess) / 8
        if self.mode is Mode.PROBE_RTT:
            self._probe_rtt_min = min(self._probe_rtt_min, rtt)
        if rtt < self.min_rtt:
            self.min_rtt = rtt
            self.min_rtt_stamp = now
        elif rtt <= self.min_rtt * (1 + self.rtt_refresh_tolerance) + 0.002:
            self.min_rtt_stamp = now

    def _on_round_end(self, now: float, r: Any) -> None:
        if r.number <= self._unjudged_through_round:
            return  # its loss and its RTTs are the blackout's, not a queue's
        excess, queue = self.signals.on_round(r, self.min_rtt)
        self._queue_left = (math.isfinite(self.min_rtt) and math.isfinite(r.min_rtt)
                            and r.min_rtt > self.min_rtt * (1 + QUEUE_LEFT_FACTOR) + QUEUE_LEFT_SLACK)
        if not self.filled_pipe:
            if self.bw.value >= self._full_bw * 1.25:
                self._full_bw = self.bw.value
                self._full_bw_rounds = 0
            else:
                self._full_bw_rounds += 1
            # In startup the baseline is not learned yet; only a heavy-loss round (the queue
            # overflowing under a 2.885 gain) ends it early, not the medium's usual loss.
            overflow = excess and r.loss_rate > STARTUP_LOSS_EXIT
            # Two more ways to know the pipe is full before a queue overflows (a GEO round of
            # 2.885x overshoot is ~1 BDP of drops): a standing queue (even the round's
            # smallest RTT inflated), or the operator's rate reached.
            reached_hint = self._hint_rate > 0 and self.bw.value >= 0.9 * self._hint_rate
            if self._full_bw_rounds >= 3 or overflow or queue or reached_hint:
                self.filled_pipe = True
                if overflow:
                    self._react(r)
                self.mode = Mode.DRAIN
                self.pacing_gain, self.cwnd_gain_now = DRAIN_GAIN, STARTUP_GAIN
            return
        if self.mode is Mode.PROBE_RTT:
            return
        if excess or self.signals.queue_rounds >= self._queue_rounds_needed():
            if r.number - self._last_reaction_round >= 2:
                self._react(r)
                if self.mode is Mode.PROBE_BW:
                    self._set_cycle(now, 1)  # the 0.75 phase: drain what we queued

    def _queue_rounds_needed(self) -> int:
        """Rounds of standing queue before reacting: two, but at least 0.3 s worth, so a short
        path's scheduling hiccups are not read as a competing flow."""
        return max(2, math.ceil(0.3 / max(self._rtt(), 1e-3)))

    def _react(self, r: Any) -> None:
        """Congestion: believe what the last round delivered, a little less."""
        self._last_reaction_round = r.number
        self.reactions += 1
        delivered_rate = r.max_rate if r.max_rate > 0 else self.bw.value
        bw = max(min(self.bw.value, delivered_rate) * self.beta, 2 * self.mss / self._rtt())
        self.bw.reset(self.sampler.round_count, bw)
        self._hint_bw = 0.0

    def _additive_probe_gain(self, gain: float, bw: float) -> float:
        """Probe (and drain) by the same *amount* whatever our share: half of what 1.25 / 0.75
        would add at the whole link, i.e. 12.5 % of the operator's rate.

        With multiplicative probes a flow that holds twice the share probes twice as hard and
        flows keep whatever ratio they started with; equal absolute probes win a smaller flow
        relatively more of the FIFO queue, so shares converge (as AIMD's additive increase).
        A lone flow probes at ~1.125, two equal flows at ~1.25, as before.
        """
        link = self._hint_rate / (1 - min(self.signals.baseline_loss, 0.2)) if self.loss_compensation else self._hint_rate
        step = (gain - 1.0) * 0.5 * link / bw
        return min(2.0, max(0.5, 1.0 + step))

    def _enter_probe_bw(self, now: float) -> None:
        self.mode = Mode.PROBE_BW
        self.cwnd_gain_now = self.cwnd_gain
        # Start anywhere but the drain phase, so flows that start together do not probe
        # in lockstep.
        index = self._rng.choice([i for i in range(len(PROBE_GAINS)) if i != 1])
        self._set_cycle(now, index)

    def _set_cycle(self, now: float, index: int) -> None:
        self._cycle_index = index
        self._cycle_stamp = now
        self.pacing_gain = PROBE_GAINS[index]

    def _advance_cycle(self, now: float) -> None:
        elapsed = now - self._cycle_stamp > self._rtt()
        gain = self.pacing_gain
        if gain == 0.75 and self.bytes_in_flight <= self.bdp():
            elapsed = elapsed or now - self._cycle_stamp > 0.5 * self._rtt()
        if elapsed:
            self._set_cycle(now, (self._cycle_index + 1) % len(PROBE_GAINS))

    def _check_probe_rtt(self, now: float) -> None:
        if self.mode is Mode.PROBE_RTT:
            if self._probe_rtt_done_at is None:
                if self.bytes_in_flight <= self.cwnd:
                    self._probe_rtt_done_at = now + max(PROBE_RTT_MIN_TIME, self._rtt())
            elif now >= self._probe_rtt_done_at:
                if math.isfinite(self._probe_rtt_min):
                    self.min_rtt = self._probe_rtt_min  # may have grown: the path changed
                self.min_rtt_stamp = now
                self._probe_rtt_done_at = None
                if self.filled_pipe:
                    self._enter_probe_bw(now)
                else:
                    self.mode = Mode.STARTUP
                    self.pacing_gain = self.cwnd_gain_now = STARTUP_GAIN
            return
        if (self.mode is not Mode.STARTUP and math.isfinite(self.min_rtt)
                and now - self.min_rtt_stamp > self.min_rtt_window):
            self.mode = Mode.PROBE_RTT
            self.pacing_gain, self.cwnd_gain_now = 1.0, 1.0
            self._probe_rtt_min = math.inf
            self._probe_rtt_done_at = None

    def on_persistent_congestion(self, now: float) -> None:
        # Nothing got through for several PTOs.  On the links lu2k is for, that is an outage
        # far more often than a collapse of capacity: keep the model (see the module
        # docstring) and let the rounds after the outage judge the capacity.
        self._path_went_away(now)
        self._in_blackout = True
        self._update_pacing()

    def _path_went_away(self, now: float) -> None:
        if self._unjudged_through_round >= self.sampler.round_count:
            return  # the same blackout, seen again (ack gap after persistent congestion)
        self.blackouts += 1
        # The round in progress holds the outage's losses, declared with the first acks after
        # it; the next one may still see the queue drained by the gap.
        self._unjudged_through_round = self.sampler.round_count + 1
        self.signals.queue_rounds = 0
        self.min_rtt = math.inf
        self.min_rtt_stamp = now
        self._rtt_excess = 0.0
        self._startup_queue_acks = 0

    def state(self) -> dict[str, Any]:
        out = super().state()
        out.update({
            "mode": self.mode.value,
            "btl_bw_mbit": round(self.btl_bw * 8 / 1e6, 3),
            "min_rtt_ms": round(self.min_rtt * 1e3, 1) if math.isfinite(self.min_rtt) else None,
            "pacing_gain": self.pacing_gain,
            "baseline_loss": round(self.signals.baseline_loss, 5),
            "reactions": self.reactions,
            "blackouts": self.blackouts,
            "queue_left": self._queue_left,
        })
        return out
