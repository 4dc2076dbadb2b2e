"""The adapter shared by lu2k's applications: an :class:`AsyncEndpoint` on a portal, a receive
loop that hands each message to a handler, and re-attachment when the daemon restarts.

Source portals: a client (``lu2k send``, the listening side of ``lu2k forward``) binds a
portal of its own so replies can reach it.  It picks one at random from
:data:`EPHEMERAL_FIRST`..:data:`EPHEMERAL_LAST` and tries the next on ``EADDRINUSE`` (the
daemon refuses a second bind atomically), like a TCP client's ephemeral port, so any
number of senders can run on one host.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from collections.abc import Callable

from ..errors import Lu2kError, ShimError, Status
from ..kernel_shim.endpoint import AsyncEndpoint

log = logging.getLogger("lu2k.apps")

TRANSFER_PORTAL = 0  # lu2k recv / lu2k recv --serve (the historical default of lu2k send)
FORWARD_PORTAL = 2  # lu2k forward --serve
EPHEMERAL_FIRST = 49152
EPHEMERAL_LAST = 65535

# A message handler gets (source NID packed, source portal, payload view valid during the call).
Handler = Callable[[bytes, int, memoryview], None]

TRANSIENT = frozenset({Status.NO_ROUTE, Status.TIMED_OUT, Status.PEER_RESTARTED, Status.CANCELLED})
"""Failures after which the same message may well get through later (the link or a daemon
came back); ``NO_RECEIVER`` is transient only once a service has answered (it restarts)."""


async def attach(socket_path: str | None, portal: int | None, *, tx_pool_bytes: int = 0, rx_pool_bytes: int = 0,
                 rng: random.Random | None = None) -> AsyncEndpoint:
    """Attach on ``portal``, or on a free ephemeral portal when ``portal`` is None."""
    if portal is not None:
        return await AsyncEndpoint.attach(socket_path, portal, tx_pool_bytes=tx_pool_bytes, rx_pool_bytes=rx_pool_bytes)
    rng = rng or random.Random()
    span = EPHEMERAL_LAST - EPHEMERAL_FIRST + 1
    start = rng.randrange(span)
    for k in range(span):
        candidate = EPHEMERAL_FIRST + (start + k) % span
        try:
            return await AsyncEndpoint.attach(socket_path, candidate, tx_pool_bytes=tx_pool_bytes, rx_pool_bytes=rx_pool_bytes)
        except ShimError as e:
            if e.code != errno.EADDRINUSE:
                raise
    raise ShimError(errno.EADDRINUSE, f"every portal {EPHEMERAL_FIRST}..{EPHEMERAL_LAST} is bound")


async def receive_loop(ep: AsyncEndpoint, handler: Handler) -> str:
    """Hand every message to ``handler`` until the endpoint is detached; returns why it ended."""
    while True:
        try:
            msg = await ep.recv()
        except ShimError as e:
            return str(e)
        if msg is None:
            continue
        try:
            handler(msg.src_nid, msg.src_portal, msg.payload)
        except Lu2kError as e:  # a bad message from a peer: say so, carry on with the others
            log.warning("message from %s portal %d dropped: %s", msg.src, msg.src_portal, e)
        finally:
            msg.release()


class Service:
    """A long-running receiver on a fixed portal that survives lu2kd restarts.

    ``on_attach(ep)`` is called after every (re)attachment; ``handler`` gets every message.
    """

    def __init__(self, socket_path: str | None, portal: int, handler: Handler, *, rx_pool_bytes: int = 0,
                 tx_pool_bytes: int = 0, on_attach: Callable[[AsyncEndpoint], None] | None = None,
                 retry_interval: float = 1.0) -> None:
        self.socket_path, self.portal, self.handler = socket_path, portal, handler
        self.rx_pool_bytes, self.tx_pool_bytes = rx_pool_bytes, tx_pool_bytes
        self.on_attach = on_attach
        self.retry_interval = retry_interval
        self.ep: AsyncEndpoint | None = None
        self.attached = asyncio.Event()

    async def run(self, *, first_attach_errors: bool = True) -> None:
        """Attach and serve forever.  The first attach failure raises (bad socket, portal taken)
        when ``first_attach_errors``; later ones are retried every ``retry_interval`` seconds."""
        first = True
        warned = False
        while True:
            try:
                ep = await attach(self.socket_path, self.portal, tx_pool_bytes=self.tx_pool_bytes, rx_pool_bytes=self.rx_pool_bytes)
            except ShimError as e:
                if first and first_attach_errors:
                    raise
                if not warned:
                    log.warning("cannot attach on portal %d (%s); retrying every %.0f s", self.portal, e, self.retry_interval)
                    warned = True
                await asyncio.sleep(self.retry_interval)
                continue
            if not first:
                log.warning("re-attached on portal %d", self.portal)
            first = warned = False
            self.ep = ep
            self.attached.set()
            if self.on_attach is not None:
                self.on_attach(ep)
            try:
                why = await receive_loop(ep, self.handler)
            finally:
                self.attached.clear()
                self.ep = None
                await ep.detach()
            log.warning("endpoint on portal %d lost (%s); re-attaching", self.portal, why)

    async def send(self, dst: bytes, portal: int, payload: bytes) -> Status:
        """Best-effort reply: wait for an endpoint, send, return the completion status."""
        ep = self.ep
        if ep is None:
            return Status.CANCELLED
        try:
            comp = await ep.send(dst, payload, portal)
            await comp.wait()
        except ShimError:
            return Status.CANCELLED
        return comp.status or Status.PROTOCOL
