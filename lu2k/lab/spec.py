"""Link descriptions for the lab: units, the named profiles, and per-direction specs.

Pure: parsing and arithmetic only.  Every parse error is a :class:`~lu2k.errors.ConfigError`
that names the option and the bad value, because these strings come straight from the
command line (``--rate 20mbit --rtt 600ms --loss 1%``).

A :class:`LinkSpec` describes one *direction* of the emulated hop; a lab has two, usually
identical except for their random seeds (loss both ways, as on a real satellite hop where
the return link is just as noisy).  The queue defaults to one bandwidth-delay product, the
textbook buffer for a single bottleneck: smaller starves a lone TCP flow, larger only adds
delay.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from typing import Any

from .. import values
from ..errors import ConfigError

MTU = 1500
# Below this many full packets a drop-tail queue drops bursts that any real modem absorbs.
MIN_QUEUE_BYTES = 16 * MTU

_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_SIZE_UNITS = {"b": 1, "": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}
_NUM = r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)"


def parse_rate(text: str | float, *, what: str = "--rate") -> float:
    """``20mbit`` / ``500kbit`` / ``1gbit`` -> bits per second; ``0``/``unlimited`` -> 0 (no cap)."""
    return values.parse_rate(text, what, allow_unlimited=True, unit_required=True)


def parse_time(text: str | float, *, what: str = "--rtt") -> float:
    """``600ms`` / ``0.6s`` / ``250us`` -> seconds.  A bare ``0`` is allowed."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise ConfigError(f"time must not be negative, got {text}", where=what)
        return float(text)
    s = text.strip().lower()
    if s == "0":
        return 0.0
    m = re.fullmatch(_NUM + r"\s*(us|ms|s)", s)
    if not m:
        raise ConfigError(f"bad time {text!r}: expected a number with a unit (e.g. 600ms, 0.6s, 250us)", where=what)
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def parse_rtt_range(text: str | float, *, what: str = "--rtt") -> tuple[float, float]:
    """``600ms`` -> (0.6, 0.6); ``30ms-60ms`` -> (0.03, 0.06): the smallest and largest RTT."""
    if isinstance(text, str) and "-" in text.strip().lstrip("-"):
        lo, _, hi = text.strip().partition("-")
        low, high = parse_time(lo, what=what), parse_time(hi, what=what)
        if high < low:
            raise ConfigError(f"bad RTT range {text!r}: the second RTT must not be below the first", where=what)
        return low, high
    rtt = parse_time(text, what=what)
    return rtt, rtt


def parse_fraction(text: str | float, *, what: str = "--loss") -> float:
    """``1%`` or ``0.01`` -> 0.01.  A bare number >= 1 is refused: ``1`` would mean 100 %."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = text.strip()
        m = re.fullmatch(_NUM + r"\s*(%?)", s)
        if not m:
            raise ConfigError(f"bad fraction {text!r}: expected a percentage (1%) or a fraction (0.01)", where=what)
        value = float(m.group(1))
        if m.group(2):
            value /= 100.0
        elif value >= 1.0 and value != 0:
            raise ConfigError(f"ambiguous {text!r}: write {text}% for a percentage or a fraction below 1", where=what)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{text!r} is outside 0..100 %", where=what)
    return value


def parse_size(text: str | int, *, what: str = "--queue") -> int:
    """``256k`` / ``1.5m`` / ``30000`` -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(_NUM + r"\s*([a-z]*)", text.strip().lower())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ConfigError(f"bad size {text!r}: expected bytes with an optional k/m suffix (e.g. 256k)", where=what)
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


format_rate = values.format_rate


@dataclass(frozen=True)
class GilbertElliott:
    """Two-state burst loss (Gilbert-Elliott), per packet.

    ``p_gb``: probability of moving Good->Bad at a packet; ``p_bg``: Bad->Good.  Packets are
    lost with ``loss_bad`` in the Bad state and ``loss_good`` in the Good state (the classic
    Gilbert model is ``loss_bad=1, loss_good=0``; netem's ``gemodel p r 1-h 1-k``).
    """

    p_gb: float
    p_bg: float
    loss_bad: float = 1.0
    loss_good: float = 0.0

    def __post_init__(self) -> None:
        for name in ("p_gb", "p_bg", "loss_bad", "loss_good"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be within 0..1, got {v}", where="gilbert-elliott")
        if self.p_bg == 0.0 and self.p_gb > 0.0:
            raise ConfigError("p_bg is 0: once Bad the link would never recover", where="gilbert-elliott")

    @classmethod
    def from_mean(cls, loss: float, burst_len: float) -> "GilbertElliott":
        """The Gilbert model with a given mean loss rate and mean burst length (packets)."""
        if burst_len < 1.0:
            raise ConfigError(f"mean burst length must be >= 1 packet, got {burst_len}", where="--burst-len")
        if not 0.0 <= loss < 1.0:
            raise ConfigError(f"burst loss must be below 100 %, got {loss}", where="--burst-loss")
        p_bg = 1.0 / burst_len
        # Stationary P(Bad) = p_gb / (p_gb + p_bg) must equal ``loss``.
        p_gb = p_bg * loss / (1.0 - loss)
        return cls(p_gb=min(p_gb, 1.0), p_bg=p_bg)

    @property
    def mean_loss(self) -> float:
        if self.p_gb + self.p_bg == 0.0:
            return self.loss_good
        bad = self.p_gb / (self.p_gb + self.p_bg)
        return bad * self.loss_bad + (1.0 - bad) * self.loss_good


@dataclass(frozen=True)
class LinkSpec:
    """One direction of an emulated hop."""

    rate_bps: float = 0.0  # 0: no rate cap (and then no queue)
    delay_s: float = 0.0  # one-way propagation delay
    jitter_s: float = 0.0  # uniform +-jitter on the delay; order is kept unless ``reorder``
    loss: float = 0.0  # Bernoulli loss per packet
    burst: GilbertElliott | None = None  # burst loss, applied on top of ``loss``
    reorder: float = 0.0  # fraction of packets held back by ``reorder_delay_s`` (overtaken)
    reorder_delay_s: float = 0.005
    queue_bytes: int | None = None  # drop-tail limit; None: one BDP
    seed: int = 1
    # Reconfiguration: every ``reconfig_s`` seconds (0: never) the link is down for
    # ``outage_s`` and the one-way delay is redrawn within delay_s..delay_max_s (0: fixed).
    reconfig_s: float = 0.0
    outage_s: float = 0.0
    delay_max_s: float = 0.0

    def __post_init__(self) -> None:
        if min(self.rate_bps, self.delay_s, self.jitter_s, self.reorder_delay_s, self.reconfig_s, self.outage_s, self.delay_max_s) < 0:
            raise ConfigError("rate, delay, jitter, reorder delay, reconfiguration period and outage must not be negative", where="link")
        if self.delay_max_s and self.delay_max_s < self.delay_s:
            raise ConfigError(f"the largest RTT ({self.delay_max_s * 2e3:g} ms) is below the smallest ({self.delay_s * 2e3:g} ms)",
                              where="--rtt")
        if (self.outage_s or self.delay_max_s) and not self.reconfig_s:
            raise ConfigError("an outage or an RTT range needs a reconfiguration period", where="--reconfig")
        if self.reconfig_s and self.outage_s >= self.reconfig_s:
            raise ConfigError(f"an outage of {self.outage_s:g} s leaves nothing of a {self.reconfig_s:g} s reconfiguration period",
                              where="--outage")
        for name in ("loss", "reorder"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be within 0..1, got {v}", where="link")
        if self.queue_bytes is not None and self.queue_bytes < MTU:
            raise ConfigError(f"queue of {self.queue_bytes} bytes cannot hold one {MTU}-byte packet", where="--queue")

    @property
    def rtt_s(self) -> float:
        """The largest round-trip time: what windows and queues are provisioned for."""
        return 2.0 * max(self.delay_s, self.delay_max_s)

    @property
    def rtt_min_s(self) -> float:
        return 2.0 * self.delay_s

    def period_delay(self, period: int) -> float:
        """The one-way delay during reconfiguration period ``period`` (same for both directions)."""
        if not self.delay_max_s or self.delay_max_s == self.delay_s:
            return self.delay_s
        return random.Random(f"reconfig/{period}").uniform(self.delay_s, self.delay_max_s)

    def effective_queue_bytes(self) -> int:
        """The drop-tail limit: explicit, or one BDP (rate x RTT), at least 16 packets."""
        if self.queue_bytes is not None:
            return self.queue_bytes
        bdp = int(self.rate_bps * self.rtt_s / 8)
        return max(bdp, MIN_QUEUE_BYTES)

    @property
    def mean_loss(self) -> float:
        burst = self.burst.mean_loss if self.burst else 0.0
        return 1.0 - (1.0 - self.loss) * (1.0 - burst)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LinkSpec":
        d = dict(d)
        burst = d.pop("burst", None)
        try:
            return cls(burst=GilbertElliott(**burst) if burst else None, **d)
        except TypeError as e:
            raise ConfigError(f"bad link description: {e}", where="link") from None


@dataclass(frozen=True)
class Profile:
    """A named site link: what ``--profile`` starts from before the overrides."""

    name: str
    rate: str
    rtt: str
    jitter: str = "0"
    description: str = ""
    loss: str = "0"
    reconfig: str = "0"
    outage: str = "0"


PROFILES: dict[str, Profile] = {
    # Geostationary: ~36 000 km up and down twice per round trip, ~600 ms including ground
    # segments; a few tens of Mbit/s per terminal.
    "geo": Profile("geo", rate="20mbit", rtt="600ms", description="GEO satellite hop (20 Mbit/s, 600 ms RTT)"),
    # Low earth orbit constellations: ~40 ms RTT, higher rates per terminal.
    "leo": Profile("leo", rate="50mbit", rtt="40ms", description="LEO satellite hop (50 Mbit/s, 40 ms RTT)"),
    # A fast LEO terminal (Starlink class): the constellation reconfigures every 15 s, the RTT
    # jumps within 30-60 ms and the link drops out for a fraction of a second at each step.
    "leo-fast": Profile("leo-fast", rate="200mbit", rtt="30ms-60ms", loss="1%", reconfig="15s", outage="300ms",
                        description="fast LEO terminal (200 Mbit/s, RTT 30-60 ms redrawn every 15 s with a 300 ms outage, 1 % loss)"),
    # Nothing preset: --rate and --rtt are required.
    "custom": Profile("custom", rate="", rtt="", description="everything from --rate/--rtt/..."),
}


def build_specs(
    profile: str = "geo",
    *,
    rate: str | None = None,
    rtt: str | None = None,
    loss: str | None = None,
    jitter: str | None = None,
    burst_loss: str | None = None,
    burst_len: float | None = None,
    reorder: str | None = None,
    reorder_delay: str | None = None,
    queue: str | None = None,
    reconfig: str | None = None,
    outage: str | None = None,
    seed: int = 1,
    option_prefix: str = "--",
    profile_option: str = "--profile",
) -> tuple[LinkSpec, LinkSpec]:
    """The two directions (a->b, b->a) from a profile name plus command-line overrides.

    Errors name the option as ``<option_prefix>rate`` etc. and the profile as
    ``profile_option``, so a second path's options (``--second-rate``, ``--second-path``)
    are named as the user typed them.
    """
    def opt(name: str) -> str:
        return f"{option_prefix}{name}"

    prof = PROFILES.get(profile)
    if prof is None:
        raise ConfigError(f"unknown profile {profile!r} (known: {', '.join(PROFILES)})", where=profile_option)
    rate_s = rate if rate is not None else prof.rate
    rtt_s = rtt if rtt is not None else prof.rtt
    if not rate_s or not rtt_s:
        raise ConfigError(f"the custom profile needs {opt('rate')} and {opt('rtt')}", where=f"{profile_option} custom")
    burst = None
    if burst_loss is not None:
        burst = GilbertElliott.from_mean(parse_fraction(burst_loss, what=opt("burst-loss")),
                                         burst_len if burst_len is not None else 4.0)
    elif burst_len is not None:
        raise ConfigError(f"{opt('burst-len')} needs {opt('burst-loss')}", where=opt("burst-len"))
    rtt_lo, rtt_hi = parse_rtt_range(rtt_s, what=opt("rtt"))
    reconfig_s = parse_time(reconfig if reconfig is not None else prof.reconfig, what=opt("reconfig"))
    outage_s = parse_time(outage if outage is not None else prof.outage, what=opt("outage"))
    if not reconfig_s and (outage_s or rtt_hi != rtt_lo):
        raise ConfigError(f"an outage or an RTT range ({rtt_s}) needs {opt('reconfig')} (a period, e.g. 15s)", where=opt("reconfig"))
    if reconfig_s and outage_s >= reconfig_s:
        raise ConfigError(f"{opt('outage')} {outage_s:g} s must be shorter than {opt('reconfig')} {reconfig_s:g} s", where=opt("outage"))
    queue_bytes = parse_size(queue, what=opt("queue")) if queue is not None else None
    if queue_bytes is not None and queue_bytes < MTU:
        raise ConfigError(f"queue of {queue_bytes} bytes cannot hold one {MTU}-byte packet", where=opt("queue"))
    common: dict[str, Any] = dict(
        rate_bps=parse_rate(rate_s, what=opt("rate")),
        delay_s=rtt_lo / 2.0,
        delay_max_s=rtt_hi / 2.0 if rtt_hi != rtt_lo else 0.0,
        reconfig_s=reconfig_s,
        outage_s=outage_s,
        jitter_s=parse_time(jitter if jitter is not None else prof.jitter, what=opt("jitter")),
        loss=parse_fraction(loss if loss is not None else prof.loss, what=opt("loss")),
        burst=burst,
        reorder=parse_fraction(reorder, what=opt("reorder")) if reorder is not None else 0.0,
        queue_bytes=queue_bytes,
    )
    if reorder_delay is not None:
        common["reorder_delay_s"] = parse_time(reorder_delay, what=opt("reorder-delay"))
    # Different seeds per direction so the two directions do not lose the same packet
    # numbers in lock-step; both derived from the one --seed so a run repeats.
    return LinkSpec(seed=seed * 2, **common), LinkSpec(seed=seed * 2 + 1, **common)
