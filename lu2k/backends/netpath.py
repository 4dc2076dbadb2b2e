"""What the kernel knows about the path to a peer: the route's MTU (socket adapter for
:mod:`lu2k.inet`, which turns it into datagram sizes).

A UDP socket ``connect``-ed to the peer sends nothing, but makes the kernel pick the route;
``IP_MTU``/``IPV6_MTU`` then read that route's MTU, lowered by what path-MTU discovery has
learned (ICMP "packet too big" / "fragmentation needed").  Where that fails (no route yet, a
name that does not resolve) the answer is ``None`` and the backend keeps its default.
"""

from __future__ import annotations

import socket
from typing import Any

from ..inet import family_of

IP_MTU = 14  # linux/in.h; not in Python's socket module
IPV6_MTU = 24  # linux/in6.h


def route_mtu(host: str, port: int) -> int | None:
    """The MTU of the route to ``host`` (a numeric address, zone allowed), or ``None``."""
    family = family_of(host)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr(host, port or 9))
            if family == socket.AF_INET6:
                return int(s.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU))
            return int(s.getsockopt(socket.IPPROTO_IP, IP_MTU))
    except OSError:  # socket.gaierror included: a name, or no route
        return None


def sockaddr(host: str, port: int) -> tuple[Any, ...]:
    """``(host, port)`` as Python's socket calls must be given it.

    A 2-tuple loses an IPv6 zone (``fe80::1%eth0``): the socket module resolves the text but
    then sets the scope id from the tuple's missing 4th member, 0, and the kernel refuses a
    link-local address without one.  So a zoned host becomes ``(addr, port, 0, scope_id)``
    (numeric lookup only: nothing is sent, nothing blocks).  ``socket.gaierror`` for an
    interface that does not exist."""
    if "%" not in host:
        return (host, port)
    info = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)
    return tuple(info[0][4])
