"""Deterministic simulation of lu2k's message layer (a tool around the product; lu2k never imports it).

:func:`lu2k.sim.world.run_seed` runs three :class:`lu2k.core.Node` s -- a sender, a gateway
and a receiver -- over a simulated network under one seeded scheduler and fake clock,
injects the faults the seed picks, and checks the invariants afterwards.  See
``docs/simulation.md``.
"""

from .world import FAULTS, Faults, RunResult, Violation, World, run_seed

__all__ = ["FAULTS", "Faults", "RunResult", "Violation", "World", "run_seed"]
