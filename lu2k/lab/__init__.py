"""The satellite link lab: emulate GEO/LEO hops between network namespaces, and measure.

The kernel lu2k is developed on has no ``netem``, so the lab brings its own emulator:

* :mod:`lu2k.lab.spec` -- link descriptions (rate, RTT, loss, bursts, jitter, reordering),
  unit parsing and the named ``geo``/``leo`` profiles.  Pure.
* :mod:`lu2k.lab.model` -- the per-direction :class:`~lu2k.lab.model.LinkModel`: a packet
  length and ``now`` go in, a release time or a drop reason comes out.  Pure, sans-I/O.
* :mod:`lu2k.lab.forwarder` -- the one process that owns a lab: it creates two namespaces
  joined by TUN devices and pumps packets through two ``LinkModel`` objects on a timer heap.
* :mod:`lu2k.lab.netns` -- namespaces, TUN devices, state files, stale-lab cleanup, and the
  :class:`~lu2k.lab.netns.Lab` handle used by the CLI, the benchmarks and the tests.
* :mod:`lu2k.lab.baseline` -- kernel TCP (CUBIC, BBR) bulk baselines and the UDP blaster
  used by the forwarder self-test.
* :mod:`lu2k.lab.selftest` -- ``lu2k lab selftest``: the forwarder's own ceiling and lateness.
* :mod:`lu2k.lab.bench` / :mod:`lu2k.lab.plots` -- ``lu2k bench link|matrix`` and its plots.
"""
