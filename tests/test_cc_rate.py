"""The configured-rate controller on the simulated link: paces at the rate, compensates, yields."""

from __future__ import annotations

import pytest

from lu2k.cc.rate import RateController
from lu2k.cc.sim import Flow, Link, Simulation
from lu2k.errors import ConfigError

MSS = 1472
RATE = 20e6 / 8


def _flow(**kw: float) -> Flow:
    params = {"rate": RATE, "initial_rtt": 0.6} | kw
    return Flow(RateController(mss=MSS, **params), mss=MSS)


@pytest.mark.parametrize("loss", [0.0, 0.01, 0.02])
def test_fills_a_known_link(loss: float) -> None:
    link = Link(rate=RATE, delay=0.3, loss=loss, seed=4)
    f = _flow()
    Simulation(link, [f]).run(30.0)
    assert f.goodput(5.0, 30.0) >= 0.95 * RATE * (1 - loss)
    assert f.controller.pacing_rate <= RATE  # the cap (= rate by default) holds
    assert link.queue_drops == 0


def test_compensates_measured_loss_below_the_cap() -> None:
    # Operator wants 15 Mbit/s delivered over a 20 Mbit/s carrier with 2 % loss.
    link = Link(rate=RATE, delay=0.3, loss=0.02, seed=4)
    want = 15e6 / 8
    f = _flow(rate=want, cap=RATE)
    Simulation(link, [f]).run(30.0)
    cc = f.controller
    assert isinstance(cc, RateController)
    assert cc.pacing_rate == pytest.approx(want / (1 - cc.signals.baseline_loss), rel=1e-6)
    assert cc.pacing_rate > want
    assert f.goodput(10.0, 30.0) == pytest.approx(want, rel=0.05)


def test_yields_when_the_link_is_slower_than_configured() -> None:
    # Configured for 20 Mbit/s but only 10 get through (shared or degraded carrier).
    link = Link(rate=RATE / 2, delay=0.3, loss=0.01, seed=8)
    f = _flow()
    Simulation(link, [f]).run(60.0)
    cc = f.controller
    assert isinstance(cc, RateController)
    assert cc.reactions >= 1
    assert cc.current < 0.8 * RATE
    # It keeps the link mostly busy rather than collapsing, and the queue is not kept full.
    assert f.goodput(20.0, 60.0) >= 0.6 * link.rate * 0.99
    assert link.queue_drops < 0.1 * f.sent


def test_recovers_after_congestion_clears() -> None:
    link = Link(rate=RATE / 2, delay=0.3, loss=0.0, seed=8)
    f = _flow()
    sim = Simulation(link, [f])
    sim.run(30.0)
    low = f.controller.current  # type: ignore[attr-defined]
    link.rate = RATE
    sim.run(80.0)
    assert f.controller.current > low  # type: ignore[attr-defined]
    assert f.goodput(60.0, 80.0) >= 0.9 * RATE


@pytest.mark.parametrize("kw", [{"rate": -1.0}, {"rate": float("inf")}, {"cap": 0.0}, {"initial_rtt": 0.0}, {"beta": 0.2}])
def test_bad_parameters_are_config_errors(kw: dict[str, float]) -> None:
    params = {"rate": RATE} | kw
    with pytest.raises(ConfigError):
        RateController(mss=MSS, **params)
