"""Route selection, LNet style.  Pure.

To reach a NID on a remote net, LNet picks among the routes to that net: lowest
``priority`` value first, then the healthiest gateway, then fewest hops, then round-robin
among equals.  Gateways must be on a local net.  A NID on a local net is reached directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .nid import Net, Nid


@dataclass(frozen=True)
class Route:
    net: Net
    gateway: Nid
    hops: int | None = None
    priority: int = 0


class RouteTable:
    def __init__(self, local_nets: Iterable[Net], routes: Iterable[Route] = ()) -> None:
        self.local_nets = set(local_nets)
        self._routes: dict[Net, list[Route]] = {}
        self._rr: dict[Net, int] = {}
        for r in routes:
            self.add(r)

    def add(self, route: Route) -> None:
        lst = self._routes.setdefault(route.net, [])
        if route not in lst:
            lst.append(route)

    def remove(self, net: Net, gateway: Nid | None = None) -> int:
        lst = self._routes.get(net, [])
        keep = [r for r in lst if gateway is not None and r.gateway != gateway]
        removed = len(lst) - len(keep)
        if keep:
            self._routes[net] = keep
        else:
            self._routes.pop(net, None)
        return removed

    def routes(self) -> list[Route]:
        return [r for lst in self._routes.values() for r in lst]

    def next_hop(self, dst: Nid, health_of: Callable[[Nid], int]) -> Nid | None:
        """The NID to hand the message to: ``dst`` itself on a local net, a gateway, or None."""
        if dst.net in self.local_nets:
            return dst
        candidates = [r for r in self._routes.get(dst.net, []) if r.gateway.net in self.local_nets]
        if not candidates:
            return None
        best_prio = min(r.priority for r in candidates)
        tier = [r for r in candidates if r.priority == best_prio]
        best_health = max(health_of(r.gateway) for r in tier)
        if best_health <= 0 and len(candidates) > len(tier):
            pass  # all of the best tier are dead; still try them (LNet does too)
        tier = [r for r in tier if health_of(r.gateway) == best_health]
        fewest = min((r.hops if r.hops is not None else 1) for r in tier)
        tier = [r for r in tier if (r.hops if r.hops is not None else 1) == fewest]
        i = self._rr.get(dst.net, 0)
        self._rr[dst.net] = i + 1
        return tier[i % len(tier)].gateway
