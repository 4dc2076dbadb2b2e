"""Socket addresses and datagram sizes for lu2k's IP backends, IPv4 and IPv6 alike.  Pure.

A NID names a node (``fd00::1@tcp``, see :mod:`lu2k.nid`); this module owns what a backend
needs beyond the NID to reach it:

* **Address text.**  A bind address (``listen:``) is an IP literal: ``0.0.0.0``, ``::``, a
  specific IPv4 or IPv6 address, optionally in brackets, and for an IPv6 *link-local* address
  a zone (``fe80::1%eth0`` or ``fe80::1%2``) -- NIDs cannot carry one, because Lustre refuses
  link-local NIDs, so a zone only ever comes from ``listen:`` or a peer's ``address:``.  A peer
  address is ``host:port`` or, for IPv6, ``[addr]:port`` (``[fe80::1%eth0]:988``); the same
  form is printed in logs and ``lu2kctl`` output (:func:`format_hostport`).
* **Families.**  A host with a ``:`` is IPv6; everything else is IPv4 (or a name the backend
  resolves).
* **Datagram sizes.**  A UDP datagram on a link of MTU ``m`` carries ``m - 20 - 8`` payload
  bytes over IPv4 and ``m - 40 - 8`` over IPv6; IPv6 guarantees ``m >= 1280`` (RFC 8200), so
  1232 bytes always fit.  QUIC needs at least 1200 (RFC 9000).  Where the kernel knows the
  path MTU (the route's MTU, or what path-MTU discovery learned) the backends size their
  datagrams from it, never above the 1500-byte Ethernet default: a larger MTU (loopback's
  65536) is not evidence about the far end.  libudt's ``mss`` counts 28 bytes of IPv4 and UDP
  header whatever the family, so over IPv6 it is set 20 lower (:func:`udt_mss_for`) to keep
  each packet within the link's MTU instead of fragmenting it at the source.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from .errors import ConfigError
from .nid import ntop6

IPV4_HEADER = 20
IPV6_HEADER = 40
UDP_HEADER = 8
IPV4_MIN_MTU = 576  # the datagram size every IPv4 host must accept (RFC 791)
IPV6_MIN_MTU = 1280  # every IPv6 link carries this (RFC 8200, section 5)
DEFAULT_MTU = 1500  # Ethernet; the ceiling for sizes derived from a route's MTU
QUIC_MIN_DATAGRAM = 1200  # RFC 9000, section 14
UDT_ASSUMED_HEADERS = IPV4_HEADER + UDP_HEADER  # what libudt subtracts from its mss, whatever the family

_LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")
_ZONE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")  # an interface name (IFNAMSIZ - 1) or index

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Host:
    """A checked IP literal: the address and, for IPv6 link-local, its zone."""

    ip: IPAddr
    zone: str = ""

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if self.ip.version == 6 else socket.AF_INET

    def __str__(self) -> str:
        text = ntop6(self.ip) if isinstance(self.ip, ipaddress.IPv6Address) else str(self.ip)
        return f"{text}%{self.zone}" if self.zone else text


def parse_host(text: object, where: str, *, what: str = "an IP address") -> Host:
    """An IP literal as a bind address: IPv4, IPv6 (brackets allowed), ``%zone`` only on an
    IPv6 link-local address.  ``ConfigError`` at ``where`` naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"expected {what}, got {text!r}", where=where)
    raw = text.strip()
    if raw.startswith("[") != raw.endswith("]"):
        raise ConfigError(f"{text!r}: unbalanced brackets", where=where)
    bracketed = raw.startswith("[")
    if bracketed:
        raw = raw[1:-1]
    addr, sep, zone = raw.partition("%")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        kind = "IPv6" if ":" in addr else "IPv4"
        raise ConfigError(f"{text!r} is not {what}: bad {kind} address {addr!r}", where=where) from None
    if bracketed and ip.version == 4:
        raise ConfigError(f"{text!r}: brackets are for IPv6 addresses only", where=where)
    if sep:
        if ip.version == 4:
            raise ConfigError(f"{text!r}: a zone (%{zone}) only goes with an IPv6 link-local address", where=where)
        if ip not in _LINK_LOCAL6:
            raise ConfigError(f"{text!r}: a zone (%{zone}) only goes with an IPv6 link-local address (fe80::/10)",
                              where=where)
        if not _ZONE.fullmatch(zone):
            raise ConfigError(f"{text!r}: bad zone {zone!r} (an interface name or index)", where=where)
    return Host(ip, zone)


def split_hostport(text: object, where: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` (port 1..65535); the host without brackets.

    An IPv6 host must be a valid address (with a zone only if link-local); an IPv4-looking or
    name host is returned as written (names are resolved by the backend)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"expected an address host:port, got {text!r}", where=where)
    text = text.strip()
    if text.startswith("["):
        inner, sep, port = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"{text!r}: write an IPv6 address as [addr]:port", where=where)
        host = str(parse_host(inner, where, what="an IPv6 address"))
        if ":" not in host:
            raise ConfigError(f"{text!r}: brackets are for IPv6 addresses only", where=where)
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ConfigError(f"{text!r}: write an IPv6 address as [addr]:port", where=where)
        if not sep or not host:
            raise ConfigError(f"{text!r} needs host:port", where=where)
        if host[:1].isdigit() and re.fullmatch(r"[0-9.]+", host):
            parse_host(host, where, what="an IPv4 address")
    if not port.isdigit():
        raise ConfigError(f"{text!r}: port {port!r} is not a number", where=where)
    number = int(port)
    if not 1 <= number <= 65535:
        raise ConfigError(f"{number} out of range 1..65535", where=where)
    return host, number


def format_hostport(host: str, port: int) -> str:
    """``[v6]:port`` or ``v4:port``: the text :func:`split_hostport` reads back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def family_of(host: str) -> socket.AddressFamily:
    """IPv6 for a host with a ``:`` (an IPv6 literal), else IPv4."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def wildcard(family: int) -> str:
    """The any-address of ``family``, for a socket that only needs a local port."""
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


def ip_header(family: int) -> int:
    return IPV6_HEADER if family == socket.AF_INET6 else IPV4_HEADER


def udp_payload(mtu: int, family: int) -> int:
    """UDP payload bytes of one unfragmented datagram on a path of MTU ``mtu``."""
    return mtu - ip_header(family) - UDP_HEADER


def usable_mtu(route_mtu: int | None, family: int) -> int:
    """The MTU to size datagrams by: the route's (where the kernel knows one), never above
    :data:`DEFAULT_MTU`, never below the family's minimum."""
    floor = IPV6_MIN_MTU if family == socket.AF_INET6 else IPV4_MIN_MTU
    if route_mtu is None or route_mtu <= 0:
        return DEFAULT_MTU
    return max(floor, min(DEFAULT_MTU, route_mtu))


def quic_datagram_size(family: int, route_mtu: int | None = None, configured: int = 0) -> int:
    """QUIC's max datagram size: ``configured`` if set, else the usable MTU's UDP payload
    (1472 over IPv4 and 1452 over IPv6 on a 1500-byte path), at least QUIC's 1200."""
    if configured:
        return configured
    return max(QUIC_MIN_DATAGRAM, udp_payload(usable_mtu(route_mtu, family), family))


def udt_mss_for(mss: int, family: int) -> int:
    """What to give libudt as ``mss`` for packets of at most ``mss`` bytes on the wire.

    libudt sizes its payload as ``mss - 28`` (IPv4 and UDP headers) for IPv6 sockets too, so
    an IPv6 packet would be 20 bytes over ``mss``; this takes the difference off."""
    return mss - (ip_header(family) + UDP_HEADER - UDT_ASSUMED_HEADERS)


def udt_wire_mss(mss: int, family: int, route_mtu: int | None = None, configured: bool = False) -> int:
    """The on-the-wire UDT packet size for a connection: the ``mss`` option as given, else
    the default capped by the route's MTU where the kernel knows it."""
    if configured or route_mtu is None:
        return mss
    return min(mss, usable_mtu(route_mtu, family))


__all__ = [
    "DEFAULT_MTU", "IPV4_HEADER", "IPV4_MIN_MTU", "IPV6_HEADER", "IPV6_MIN_MTU", "QUIC_MIN_DATAGRAM", "UDP_HEADER", "Host",
    "family_of", "format_hostport", "ip_header", "parse_host", "quic_datagram_size", "split_hostport", "udp_payload",
    "udt_mss_for", "udt_wire_mss", "usable_mtu", "wildcard",
]
