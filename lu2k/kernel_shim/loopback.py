"""A ShimHandler that delivers every message to the local endpoint bound to its destination portal.

This is the engine's local-NID path on its own (no network): a message for this daemon's
NID is copied from the sender's TX slot into an RX slot of the port bound to the
destination portal, then completed as delivered.  When the receiver has no RX slot free,
the message waits (in order, per receiving port) until the receiver releases one --
that wait is bounded by the senders' ``max_in_flight``.  Tests, benchmarks and the C
demo run against it; ``python -m lu2k.kernel_shim.loopback --path P`` serves it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from ..errors import Lu2kError, Status
from ..nid import Nid, parse_nid
from .access import AccessPolicy
from .server import SendRequest, ShimConfig, ShimPort, ShimServer

T = TypeVar("T")


class LoopbackHandler:
    """Local delivery between ports of one ShimServer (set :attr:`server` after creating it)."""

    def __init__(self, nid: Nid | str = "0@lo") -> None:
        self.nid = nid if isinstance(nid, Nid) else parse_nid(nid, resolve=False)
        self._packed = self.nid.to_bytes()
        self.server: ShimServer | None = None
        # receiving portal -> messages waiting for an RX slot there: (sending port, request)
        self._parked: dict[int, collections.deque[tuple[ShimPort, SendRequest]]] = {}

    def local_nid(self) -> bytes:
        return self._packed

    def on_attach(self, port: ShimPort) -> None:
        return None

    def on_detach(self, port: ShimPort) -> None:
        parked = self._parked.pop(port.portal, None)
        for src, req in parked or ():
            src.complete(req, Status.NO_RECEIVER, f"endpoint on portal {port.portal} detached")
        for queue in self._parked.values():  # what the detached port itself had waiting elsewhere
            for item in [i for i in queue if i[0] is port]:
                queue.remove(item)
                port.complete(item[1], Status.CANCELLED, "sender detached")

    def on_submit(self, port: ShimPort, reqs: list[SendRequest]) -> None:
        assert self.server is not None, "LoopbackHandler.server must be set"
        ports = self.server.ports
        for req in reqs:
            if req.dst_nid != self._packed:
                port.complete(req, Status.NO_ROUTE, f"only {self.nid} is reachable through the loopback handler")
                continue
            dst = ports.get(req.dst_portal)
            if dst is None or not dst.attached:
                port.complete(req, Status.NO_RECEIVER, f"no endpoint attached on portal {req.dst_portal}")
            elif len(req.payload) > dst.max_message_size:
                port.complete(req, Status.TOO_LARGE, f"{len(req.payload)} bytes exceeds the receiver's limit")
            else:
                queue = self._parked.get(dst.portal)
                if queue or not self._deliver(port, req, dst):
                    self._parked.setdefault(dst.portal, collections.deque()).append((port, req))

    def on_rx_space(self, port: ShimPort) -> None:
        queue = self._parked.get(port.portal)
        while queue:
            src, req = queue[0]
            if req.done:  # completed meanwhile (sender detached)
                queue.popleft()
                continue
            if not self._deliver(src, req, port):
                return
            queue.popleft()
        self._parked.pop(port.portal, None)

    def _deliver(self, src: ShimPort, req: SendRequest, dst: ShimPort) -> bool:
        n = len(req.payload)
        buf = dst.rx_alloc(n)
        if buf is None:
            return False
        buf.view[:] = req.payload
        try:
            dst.deliver(buf, self._packed, src.portal, n)
        except Lu2kError as e:  # the receiver broke its rings and is being detached: not the sender's fault
            src.complete(req, Status.NO_RECEIVER, f"endpoint on portal {dst.portal} failed: {e}")
            return True
        src.complete(req, Status.DELIVERED)
        return True

    def parked(self) -> int:
        return sum(len(q) for q in self._parked.values())


def serve_loopback(path: str, nid: Nid | str = "0@lo", config: ShimConfig | None = None,
                   access: AccessPolicy | None = None) -> ShimServer:
    """A ShimServer with a LoopbackHandler wired to it (call ``await server.start()``)."""
    handler = LoopbackHandler(nid)
    server = ShimServer(path, handler, config=config, access=access)
    handler.server = server
    return server


class LoopbackThread:
    """A loopback ShimServer on its own event loop in a thread (for blocking clients and C programs).

    ``with LoopbackThread(path) as t:`` starts it; ``t.call(fn, *args)`` runs ``fn`` on the
    server's loop and returns its result; leaving the block closes the server.
    """

    def __init__(self, path: str, nid: Nid | str = "0@lo", config: ShimConfig | None = None,
                 access: AccessPolicy | None = None) -> None:
        self.server = serve_loopback(path, nid, config, access)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="lu2k-shim-loopback", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:  # reported to the starting thread
            self._error = e
            self.loop.close()
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.close())
        self.loop.close()

    def start(self) -> "LoopbackThread":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: "Callable[..., T]", *args: object) -> "T":
        """Run ``fn(*args)`` on the server's loop thread and return its result."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()

    def __enter__(self) -> "LoopbackThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _run(args: argparse.Namespace) -> None:
    server = serve_loopback(args.path, args.nid, ShimConfig(max_in_flight=args.max_in_flight))
    await server.start()
    print(f"shim loopback server on {args.path} (NID {args.nid})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> int:
    from .abi import default_shim_path

    parser = argparse.ArgumentParser(prog="python -m lu2k.kernel_shim.loopback", description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=default_shim_path(), help="shim socket path (default: %(default)s)")
    parser.add_argument("--nid", default="0@lo", help="the NID this server answers to (default: %(default)s)")
    parser.add_argument("--max-in-flight", type=int, default=1024)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_run(args))
    except Lu2kError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
