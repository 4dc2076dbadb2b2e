"""LNet names: nets (``tcp0``) and NIDs (``10.0.0.1@tcp``).

Pure: no I/O except the optional hostname resolution in :func:`parse_nid`.

A :class:`Nid` packs to Lustre's large-NID layout (``struct lnet_nid``: u8 nid_size,
u8 nid_type, be16 nid_num, be32 nid_addr[4]; nid_size = address bytes beyond the first 4),
which is what the shim ABI and the wire protocol carry, so IPv6 NIDs fit as well as IPv4.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Union

from .errors import NidError

# Net type numbers.  Lustre's own are fixed by its ABI (lnet/include/uapi/linux/lnet/nidstr.h);
# lu2k's backends that have no Lustre LND get numbers above Lustre's range.
LOLND = 9
SOCKLND = 2
O2IBLND = 5
GNILND = 13
GNIIPLND = 14
PTL4LND = 15
KFILND = 16
EFALND = 17
UDTLND = 200
QUICLND = 201
RDSLND = 202

NET_TYPES: dict[str, int] = {
    "lo": LOLND,
    "tcp": SOCKLND,
    "o2ib": O2IBLND,
    "gni": GNILND,
    "gip": GNIIPLND,
    "ptlf": PTL4LND,
    "kfi": KFILND,
    "efa": EFALND,
    "udt": UDTLND,
    "quic": QUICLND,
    "rds": RDSLND,
}
NET_TYPE_NAMES: dict[int, str] = {v: k for k, v in NET_TYPES.items()}

LARGE_NID_STRUCT = struct.Struct(">BBH16s")
NID_SIZE = LARGE_NID_STRUCT.size  # 20 bytes on the wire and in the shim ABI


@dataclass(frozen=True, order=True)
class Net:
    """An LNet network: a type (``tcp``) and a number (``0``)."""

    type: str
    num: int = 0

    def __post_init__(self) -> None:
        if self.type not in NET_TYPES:
            raise NidError(f"unknown net type {self.type!r}")
        if not 0 <= self.num <= 0xFFFF:
            raise NidError(f"net number {self.num} out of range 0..65535")
        if self.type == "lo" and self.num != 0:
            raise NidError("net 'lo' takes no number")

    @property
    def type_code(self) -> int:
        return NET_TYPES[self.type]

    def __str__(self) -> str:
        # Lustre prints net 0 without its number: "tcp", not "tcp0".
        return self.type if self.num == 0 else f"{self.type}{self.num}"


AddrType = Union[ipaddress.IPv4Address, ipaddress.IPv6Address, int]


@dataclass(frozen=True, order=True)
class Nid:
    """A NID: an address on a net.  ``addr`` is an IP address, or an int on ``lo``/``gni``."""

    addr: AddrType
    net: Net

    def __str__(self) -> str:
        if isinstance(self.addr, ipaddress.IPv6Address):
            return f"{self.addr}@{self.net}"
        return f"{self.addr}@{self.net}"

    @property
    def host(self) -> str:
        """The address a connection to this NID goes to (socket form)."""
        if isinstance(self.addr, int):
            raise NidError(f"NID {self} has no IP address")
        return str(self.addr)

    def to_bytes(self) -> bytes:
        """Lustre's ``struct lnet_nid`` layout (20 bytes)."""
        if isinstance(self.addr, ipaddress.IPv6Address):
            raw, size = self.addr.packed, 12
        elif isinstance(self.addr, ipaddress.IPv4Address):
            raw, size = self.addr.packed + bytes(12), 0
        else:
            raw, size = struct.pack(">I", self.addr) + bytes(12), 0
        return LARGE_NID_STRUCT.pack(size, self.net.type_code, self.net.num, raw)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> "Nid":
        if len(data) != NID_SIZE:
            raise NidError(f"packed NID must be {NID_SIZE} bytes, got {len(data)}")
        size, type_code, num, raw = LARGE_NID_STRUCT.unpack(data)
        name = NET_TYPE_NAMES.get(type_code)
        if name is None:
            raise NidError(f"unknown net type code {type_code} in packed NID")
        net = Net(name, num)
        if size == 12:
            return cls(ipaddress.IPv6Address(raw), net)
        if size != 0:
            raise NidError(f"packed NID has unsupported address size {size + 4}")
        value = struct.unpack(">I", raw[:4])[0]
        if name in ("tcp", "o2ib", "udt", "quic", "rds", "kfi", "efa", "gip"):
            return cls(ipaddress.IPv4Address(value), net)
        return cls(value, net)


def parse_net(text: str) -> Net:
    """Parse ``tcp``, ``tcp0``, ``o2ib3``, ``lo``; raise :class:`NidError` naming the bad part."""
    s = text.strip()
    i = len(s)
    while i > 0 and s[i - 1].isdigit():
        i -= 1
    name, digits = s[:i], s[i:]
    if name not in NET_TYPES:
        raise NidError(f"unknown net type {name!r} in net {text!r}")
    if digits and (len(digits) > 1 and digits[0] == "0"):
        raise NidError(f"net number {digits!r} in {text!r} has a leading zero")
    num = int(digits) if digits else 0
    if name == "lo" and digits:
        raise NidError(f"net 'lo' takes no number (got {text!r})")
    return Net(name, num)


def _parse_addr(addr: str, net: Net, *, resolve: bool) -> AddrType:
    if net.type == "lo":
        if addr in ("0", "*"):
            return 0
        raise NidError(f"address {addr!r} invalid on net lo (only 0)")
    if net.type in ("gni", "ptlf"):
        if addr.isdigit():
            return int(addr)
        raise NidError(f"address {addr!r} on net {net} must be a number")
    try:
        return ipaddress.IPv4Address(addr)
    except ValueError:
        pass
    if ":" in addr:
        try:
            return ipaddress.IPv6Address(addr.strip("[]"))
        except ValueError:
            raise NidError(f"bad IPv6 address {addr!r}") from None
    if resolve and addr and all(c.isalnum() or c in "-." for c in addr):
        try:
            return ipaddress.IPv4Address(socket.gethostbyname(addr))
        except OSError:
            raise NidError(f"cannot resolve host name {addr!r}") from None
    raise NidError(f"bad address {addr!r} for net {net}")


def parse_nid(text: str, *, resolve: bool = True) -> Nid:
    """Parse ``addr@net``; no ``@`` means ``tcp0``; ``*@lo`` is ``0@lo``."""
    s = text.strip()
    if not s:
        raise NidError("empty NID")
    if "@" in s:
        addr, _, net_text = s.rpartition("@")
        net = parse_net(net_text)
    else:
        addr, net = s, Net("tcp", 0)
    return Nid(_parse_addr(addr, net, resolve=resolve), net)
