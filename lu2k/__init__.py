"""lu2k: an LNet-style transport gateway for long, lossy links (README.md; the manual in docs/).

Packages: ``kernel_shim`` (the shim ABI, rings, server and endpoints), ``backends``
(transports registered by name), ``cc`` (congestion controllers), ``lab`` (the link
emulator and benchmarks), ``cli`` (``lu2k``, ``lu2kctl``); modules ``engine`` and
``daemon`` (``lu2kd``) with ``control`` (its management socket), ``sdnotify`` (service
readiness and watchdog), ``metrics`` (Prometheus) and ``logs``; ``wire``, ``nid``,
``config``, ``lnetyaml``, ``settings``.
"""

__version__ = "0.1.0"

from . import hotpath as _hotpath

_hotpath.install()  # before anything imports the modules it may compile (see lu2k.hotpath)
