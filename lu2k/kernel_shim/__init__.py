"""The kernel-facing half of lu2k: a shared-memory endpoint ABI (lu2klnd's in-kernel part).

* :mod:`.abi` -- command numbers, structs, region layout (pure; mirrored in
  ``contrib/lu2k_shim.h``);
* :mod:`.ring` -- SPSC descriptor rings and slot pools over shared memory (pure);
* :mod:`.server` -- the daemon side (asyncio): :class:`ShimServer`, :class:`ShimPort`;
* :mod:`.endpoint` -- the application side: :class:`Endpoint` (sync, ``fileno()``) and
  :class:`AsyncEndpoint`;
* :mod:`.loopback` -- a :class:`ShimHandler` that delivers between local portals (the
  engine does the same for local NIDs; tests, benchmarks and ``python -m`` use it alone).

Submodules are imported on use so that ``import lu2k.kernel_shim.abi`` stays cheap.
"""
