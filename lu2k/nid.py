"""LNet names: nets (``tcp0``), NIDs (``10.0.0.1@tcp``) and NID lists (``10.0.[1-4].*@tcp``).

Pure: no I/O except the optional hostname resolution in :func:`parse_nid`.

Everything here reads and prints names the way Lustre 2.17 does (``nidstrings.c``:
``libcfs_str2net``, ``libcfs_str2nid``/``libcfs_strnid``, ``cfs_parse_nidlist``,
``cfs_match_nid``, ``cfs_print_nidlist``), including its quirks, so an operator's strings mean
the same thing to lu2k as to their Lustre nodes.  The quirks worth knowing (see
README.md, "LNet names and configuration", for the full list):

* A net name is matched by *prefix* against the type table, and its number is read with C's
  ``sscanf("%u")``: leading whitespace, a sign and leading zeros are accepted (``tcp 01`` is
  ``tcp1``), and the number is OR-ed into a 32-bit ``(type << 16) | num`` word, so
  ``tcp131072`` wraps to ``tcp`` while ``tcp65536`` becomes an unknown type (rejected here,
  printed ``<3:0>`` by Lustre).
* Classic IPv4 NID addresses are read with ``sscanf("%u.%u.%u.%u")``: ``010.1.1.1`` is
  ``10.1.1.1`` (decimal, not octal), ``+1.2.3.4`` and ``1. 2.3.4`` are accepted, each part
  must fit in 8 bits after C's 32-bit truncation.  A name starting with a letter is
  resolved (``gethostbyname``).  ``tcp`` (and lu2k's IP backends) also take IPv6 addresses,
  as the large-NID API does; they print as ``inet_ntop`` does.
* Any address on ``lo`` is ``0@lo``.
* In NID *lists*, numbers are read with the kernel's ``kstrtouint(…, 0)``: ``010`` is octal
  8, ``0x1f`` is hex.  Ranges ``[a-b/s]`` are bounded by the field (0..255 for IP octets), a
  stride outside those bounds is refused, and so is a reversed range ``[10-4]``
  (``cfs_range_expr_parse`` fails when ``re_lo > re_hi``).  A zero stride is refused here
  (Lustre accepts it and then divides by zero).
* IPv6 NIDs are read as ``libcfs_ip_str2addr_size`` reads them: loopback (``::1``) and
  link-local (``fe80::/10``) addresses are refused -- a router cannot forward to them.

A :class:`Nid` packs to Lustre's large-NID layout (``struct lnet_nid``: u8 nid_size,
u8 nid_type, be16 nid_num, be32 nid_addr[4]; nid_size = address bytes beyond the first 4),
which is what the shim ABI and the wire protocol carry, so IPv6 NIDs fit as well as IPv4.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Iterable, Union

from .errors import NidError as NidError  # re-exported: NID errors are caught from here too

# --- net types ------------------------------------------------------------------------------
#
# Lustre's numbers are fixed by its ABI (include/uapi/linux/lnet/nidstr.h, 2.17: TOFULND is
# 17, EFALND 18, BXI3LND 19; TOFULND has no row in nidstrings.c, so no name to parse).  lu2k's
# backends that have no Lustre LND get numbers above Lustre's range.
SOCKLND = 2
O2IBLND = 5
LOLND = 9
GNILND = 13
GNIIPLND = 14
PTL4LND = 15
KFILND = 16
EFALND = 18
BXI3LND = 19
UDTLND = 200
QUICLND = 201
RDSLND = 202

# Address syntax of each type: "lo" (anything, always 0), "ip" (IPv4 dotted quad), "num"
# (a 32-bit number, decimal or 0x-hex).
ADDR_LO, ADDR_IP, ADDR_NUM = "lo", "ip", "num"


@dataclass(frozen=True)
class NetType:
    """One row of Lustre's ``libcfs_netstrfns`` table (plus lu2k's own backends)."""

    name: str
    code: int
    addr: str  # ADDR_LO / ADDR_IP / ADDR_NUM
    ipv6: bool = False  # accepts IPv6 addresses (large NIDs)
    netmask: bool = False  # CIDR entries in NID lists can match it (nf_match_netmask)


# Order matters: names are matched by prefix, first row wins, as in libcfs_str2net_internal.
NET_TYPE_TABLE: tuple[NetType, ...] = (
    NetType("lo", LOLND, ADDR_LO),
    NetType("tcp", SOCKLND, ADDR_IP, ipv6=True, netmask=True),
    NetType("o2ib", O2IBLND, ADDR_IP, netmask=True),
    NetType("gni", GNILND, ADDR_NUM),
    NetType("gip", GNIIPLND, ADDR_IP),
    NetType("ptlf", PTL4LND, ADDR_NUM),
    NetType("kfi", KFILND, ADDR_NUM),
    NetType("efa", EFALND, ADDR_IP, ipv6=True),  # has nf_str2addr_size (large NIDs), no nf_match_netmask
    NetType("bxi3f", BXI3LND, ADDR_NUM),
    # lu2k's backends without a Lustre LND (TCP is "tcp", verbs is "o2ib").
    NetType("udt", UDTLND, ADDR_IP, ipv6=True, netmask=True),
    NetType("quic", QUICLND, ADDR_IP, ipv6=True, netmask=True),
    NetType("rds", RDSLND, ADDR_IP, ipv6=True, netmask=True),
)
NET_TYPE_BY_NAME: dict[str, NetType] = {t.name: t for t in NET_TYPE_TABLE}
NET_TYPE_BY_CODE: dict[int, NetType] = {t.code: t for t in NET_TYPE_TABLE}
NET_TYPES: dict[str, int] = {t.name: t.code for t in NET_TYPE_TABLE}
NET_TYPE_NAMES: dict[int, str] = {t.code: t.name for t in NET_TYPE_TABLE}

LARGE_NID_STRUCT = struct.Struct(">BBH16s")
NID_SIZE = LARGE_NID_STRUCT.size  # 20 bytes on the wire and in the shim ABI

LNET_NET_ANY = 0xFFFFFFFF
_U32 = 0xFFFFFFFF
_ULONG_MAX = (1 << 64) - 1
_C_SPACE = " \t\n\v\f\r"  # isspace() in the C locale


def _known_types() -> str:
    return ", ".join(t.name for t in NET_TYPE_TABLE)


# --- C number readers -------------------------------------------------------------------------
#
# Lustre reads numbers with two different libraries depending on the string: NIDs and nets
# go through glibc's sscanf, NID lists and CPT/range expressions through the kernel's
# kstrtouint.  They disagree (octal, signs, whitespace), so both are reproduced exactly.


def scan_int(s: str, i: int, *, base: int = 10, signed: bool = False) -> tuple[int, int] | None:
    """One glibc ``sscanf`` ``%u``/``%d``/``%x`` conversion at ``s[i:]``.

    Returns ``(value, index after it)`` or None on a matching failure.  Like glibc: skips
    leading whitespace, takes a sign, (``%x``) an optional ``0x``; converts with
    ``strtoul``/``strtol`` on a 64-bit ``long`` (saturating) and stores into a 32-bit int.
    """
    n = len(s)
    while i < n and s[i] in _C_SPACE:
        i += 1
    neg = False
    if i < n and s[i] in "+-":
        neg = s[i] == "-"
        i += 1
    digits = "0123456789abcdefABCDEF" if base == 16 else "0123456789"
    if base == 16 and s[i : i + 2] in ("0x", "0X") and i + 2 < n and s[i + 2] in digits:
        i += 2
    start = i
    while i < n and s[i] in digits:
        i += 1
    if i == start:
        return None
    mag = int(s[start:i], base)
    if signed:
        v = -mag if neg else mag
        v = max(-(1 << 63), min((1 << 63) - 1, v))
        v &= _U32
        return (v - (1 << 32) if v & 0x80000000 else v), i
    if mag > _ULONG_MAX:
        v = _ULONG_MAX
    else:
        v = (-mag) & _ULONG_MAX if neg else mag
    return v & _U32, i


def scan_u_exact(s: str) -> int | None:
    """``sscanf(s, "%u%n")`` that must consume all of ``s`` (Lustre's usual idiom)."""
    r = scan_int(s, 0)
    if r is None or r[1] != len(s):
        return None
    return r[0]


def kstrtouint(s: str, base: int = 0) -> int | None:
    """The kernel's ``kstrtouint``: optional ``+``, base prefix (base 0: ``0x`` hex, ``0``
    octal), the whole string (bar one trailing newline) must be digits, fits in 32 bits."""
    if s.startswith("+"):
        s = s[1:]
    if base == 0:
        if s[:1] == "0":
            base = 16 if (s[1:2] in ("x", "X") and s[2:3] != "" and s[2] in "0123456789abcdefABCDEF") else 8
        else:
            base = 10
    if base == 16 and s[:2] in ("0x", "0X"):
        s = s[2:]
    i, value = 0, 0
    while i < len(s):
        c = s[i].lower()
        d = ord(c) - 48 if "0" <= c <= "9" else (ord(c) - 87 if "a" <= c <= "f" else 99)
        if d >= base:
            break
        value = value * base + d
        i += 1
    if i == 0:
        return None
    if s[i : i + 1] == "\n":
        i += 1
    if i != len(s) or value > _U32:
        return None
    return value


def strim(s: str) -> str:
    """The kernel's ``strim``: strip C whitespace at both ends."""
    return s.strip(_C_SPACE)


# --- nets ---------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Net:
    """An LNet network: a type (``tcp``) and a number (``0``)."""

    type: str
    num: int = 0

    def __post_init__(self) -> None:
        if self.type not in NET_TYPE_BY_NAME:
            raise NidError(f"unknown net type {self.type!r} (known: {_known_types()})")
        if not isinstance(self.num, int) or isinstance(self.num, bool) or not 0 <= self.num <= 0xFFFF:
            raise NidError(f"net number {self.num!r} out of range 0..65535")
        if self.type == "lo" and self.num != 0:
            raise NidError("net 'lo' takes no number")

    @property
    def type_code(self) -> int:
        return NET_TYPE_BY_NAME[self.type].code

    @property
    def info(self) -> NetType:
        return NET_TYPE_BY_NAME[self.type]

    @property
    def packed(self) -> int:
        """Lustre's 32-bit net id, ``LNET_MKNET(type, num)``."""
        return (self.type_code << 16) | self.num

    @classmethod
    def from_packed(cls, value: int) -> "Net":
        name = NET_TYPE_NAMES.get((value >> 16) & 0xFFFF)
        if name is None:
            raise NidError(f"net id {value:#x} has unknown type <{(value >> 16) & 0xFFFF}:{value & 0xFFFF}>")
        return cls(name, value & 0xFFFF)

    def __str__(self) -> str:
        # Lustre prints net 0 without its number: "tcp", not "tcp0".
        return self.type if self.num == 0 else f"{self.type}{self.num}"


def _lookup_prefix(text: str) -> NetType | None:
    for t in NET_TYPE_TABLE:
        if text.startswith(t.name):
            return t
    return None


def net_type_of(text: str) -> NetType | None:
    """The table row whose name is a prefix of ``text`` (``libcfs_namenum2netstrfns``)."""
    return _lookup_prefix(text)


def parse_net(text: str) -> Net:
    """Parse ``tcp``, ``tcp0``, ``o2ib3``, ``lo`` as ``libcfs_str2net`` does.

    Raise :class:`NidError` naming the bad part.  No whitespace is stripped (Lustre does not).
    """
    if not isinstance(text, str):
        raise NidError(f"net must be a string, got {text!r}")
    nt = _lookup_prefix(text)
    if nt is None:
        raise NidError(f"unknown net type in {text!r} (known: {_known_types()})")
    rest = text[len(nt.name) :]
    if rest == "":
        return Net(nt.name, 0)
    if nt.code == LOLND:
        raise NidError(f"net 'lo' takes no number (got {text!r})")
    num = scan_u_exact(rest)
    if num is None:
        raise NidError(f"bad net number {rest!r} in {text!r}")
    packed = ((nt.code << 16) | num) & _U32
    if packed == LNET_NET_ANY:
        raise NidError(f"net number {rest!r} in {text!r} makes LNET_NET_ANY")
    code, wrapped = packed >> 16, packed & 0xFFFF
    real = NET_TYPE_BY_CODE.get(code)
    if real is None:
        raise NidError(
            f"net number {rest!r} in {text!r} overflows 16 bits (Lustre reads it as unknown net <{code}:{wrapped}>)"
        )
    return Net(real.name, wrapped)


# --- addresses ------------------------------------------------------------------------------------

AddrType = Union[ipaddress.IPv4Address, ipaddress.IPv6Address, int]


def ntop6(addr: ipaddress.IPv6Address) -> str:
    """glibc ``inet_ntop(AF_INET6)``: RFC 5952 compression, embedded IPv4 where glibc uses it."""
    words = struct.unpack(">8H", addr.packed)
    best_base, best_len, cur_base, cur_len = -1, 0, -1, 0
    for i, w in enumerate(words):
        if w == 0:
            if cur_base == -1:
                cur_base, cur_len = i, 1
            else:
                cur_len += 1
            if cur_len > best_len:
                best_base, best_len = cur_base, cur_len
        else:
            cur_base, cur_len = -1, 0
    if best_len < 2:
        best_base = -1
    out = []
    i = 0
    while i < 8:
        if best_base != -1 and best_base <= i < best_base + best_len:
            if i == best_base:
                out.append(":")
            i += 1
            continue
        if i != 0:
            out.append(":")
        if i == 6 and best_base == 0 and (
            best_len == 6 or (best_len == 7 and words[7] != 1) or (best_len == 5 and words[5] == 0xFFFF)
        ):
            out.append(str(ipaddress.IPv4Address(addr.packed[12:])))
            break
        out.append(f"{words[i]:x}")
        i += 1
    if best_base != -1 and best_base + best_len == 8:
        out.append(":")
    return "".join(out)


def ip4_classic(text: str) -> int | None:
    """``libcfs_ip_str2addr``'s numeric half: ``sscanf("%u.%u.%u.%u%n")`` over all of it."""
    i, parts = 0, []
    for k in range(4):
        if k:
            if text[i : i + 1] != ".":
                return None
            i += 1
        r = scan_int(text, i)
        if r is None:
            return None
        v, i = r
        parts.append(v)
    if i != len(text) or any(p & ~0xFF for p in parts):
        return None
    return (parts[0] << 24) | (parts[1] << 16) | (parts[2] << 8) | parts[3]


_LOOPBACK6 = ipaddress.IPv6Address("::1")
_LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")  # IN6_IS_ADDR_LINKLOCAL
_IN4_STRICT = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+)$")


def ip4_strict(text: str) -> ipaddress.IPv4Address | None:
    """The kernel's ``in4_pton`` (used for CIDR masks): four decimal octets, nothing else."""
    m = _IN4_STRICT.match(text)
    if m is None or any(int(g) > 255 for g in m.groups()):
        return None
    return ipaddress.IPv4Address(".".join(str(int(g)) for g in m.groups()))


def ip6_strict(text: str) -> ipaddress.IPv6Address | None:
    """``inet_pton(AF_INET6)``: no brackets, no zone id."""
    if "%" in text or not text or text[0] in _C_SPACE or text[-1] in _C_SPACE:
        return None
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        return None


def num_str2addr(text: str) -> int | None:
    """``libcfs_num_str2addr``: ``0x%x``, ``0X%x`` or ``%u``, all of the string."""
    for prefix in ("0x", "0X"):
        if text.startswith(prefix):
            r = scan_int(text, 2, base=16)
            if r is not None and r[1] == len(text):
                return r[0]
    return scan_u_exact(text)


def _resolve_host(name: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(socket.gethostbyname(name))
    except (OSError, UnicodeError, ValueError):
        raise NidError(f"cannot resolve host name {name!r}") from None


# --- NIDs -------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Nid:
    """A NID: an address on a net.  ``addr`` is an IP address, or an int on ``lo``/``gni``/…"""

    addr: AddrType
    net: Net

    def __post_init__(self) -> None:
        kind = self.net.info.addr
        a = self.addr
        if kind == ADDR_IP:
            if isinstance(a, ipaddress.IPv6Address):
                if not self.net.info.ipv6:
                    raise NidError(f"net {self.net} does not take IPv6 addresses ({a})")
            elif not isinstance(a, ipaddress.IPv4Address):
                raise NidError(f"net {self.net} needs an IP address, got {a!r}")
        elif isinstance(a, bool) or not isinstance(a, int) or not 0 <= a <= _U32:
            raise NidError(f"net {self.net} needs a 32-bit number as address, got {a!r}")
        elif kind == ADDR_LO and a != 0:
            raise NidError(f"the only address on lo is 0, got {a}")

    def __str__(self) -> str:
        if isinstance(self.addr, ipaddress.IPv6Address):
            return f"{ntop6(self.addr)}@{self.net}"
        return f"{self.addr}@{self.net}"

    @property
    def is_nid4(self) -> bool:
        """True for NIDs that fit the classic 64-bit ``lnet_nid_t`` (IPv4 or number)."""
        return not isinstance(self.addr, ipaddress.IPv6Address)

    @property
    def addr_word(self) -> int:
        """The first 32 address bits, host order (what Lustre's range matching looks at)."""
        if isinstance(self.addr, int):
            return self.addr
        return int.from_bytes(self.addr.packed[:4], "big")

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
        info = NET_TYPE_BY_CODE.get(type_code)
        if info is None:
            raise NidError(f"unknown net type code {type_code} in packed NID")
        net = Net(info.name, num)
        if size == 12:
            return cls(ipaddress.IPv6Address(raw), net)
        if size != 0:
            raise NidError(f"packed NID has unsupported address size {size + 4}")
        value = struct.unpack(">I", raw[:4])[0]
        if info.addr == ADDR_IP:
            return cls(ipaddress.IPv4Address(value), net)
        return cls(value, net)


def parse_addr(addr: str, net: Net, *, resolve: bool = True, context: str | None = None) -> AddrType:
    """Read the address half of a NID for ``net`` (``nf_str2addr``/``nf_str2addr_size``)."""
    where = context if context is not None else f"{addr}@{net}"
    kind = net.info.addr
    if kind == ADDR_LO:
        return 0  # libcfs_lo_str2addr accepts anything: "*@lo", "foo@lo" are 0@lo
    if kind == ADDR_NUM:
        v = num_str2addr(addr)
        if v is None:
            raise NidError(f"bad address {addr!r} in {where!r}: net {net} takes a number (decimal or 0x hex)")
        return v
    v4 = ip4_classic(addr)
    if v4 is not None:
        return ipaddress.IPv4Address(v4)
    if ":" in addr and net.info.ipv6:
        v6 = ip6_strict(addr)
        if v6 is None:
            raise NidError(f"bad IPv6 address {addr!r} in {where!r}")
        # libcfs_ip_str2addr_size: "Since link local doesn't allow forwarding packets for
        # router don't allow those addresses as well" (and loopback alike).
        if v6 == _LOOPBACK6:  # IN6_IS_ADDR_LOOPBACK is ::1 only (Python 3.13's is_loopback also takes ::ffff:127.0.0.1)
            raise NidError(f"IPv6 loopback address {addr!r} in {where!r} cannot be a NID (Lustre refuses it)")
        if v6 in _LINK_LOCAL6:
            raise NidError(f"IPv6 link-local address {addr!r} in {where!r} cannot be a NID (Lustre refuses it: not routable)")
        return v6
    if addr[:1].isascii() and addr[:1].isalpha():
        if not resolve:
            raise NidError(f"host name {addr!r} in {where!r} (resolution disabled)")
        return _resolve_host(addr)
    if ":" in addr:
        raise NidError(f"net {net} does not take IPv6 addresses ({addr!r} in {where!r})")
    raise NidError(f"bad IPv4 address {addr!r} in {where!r}")


def parse_nid(text: str, *, resolve: bool = True) -> Nid:
    """Parse ``addr@net`` as ``libcfs_str2nid`` does; no ``@`` means ``tcp0``.

    The net is everything after the *first* ``@``.  Raise :class:`NidError` naming the bad
    part.  ``resolve=False`` refuses host names instead of looking them up.
    """
    if not isinstance(text, str):
        raise NidError(f"NID must be a string, got {text!r}")
    if text == "":
        raise NidError("empty NID")
    sep = text.find("@")
    if sep >= 0:
        try:
            net = parse_net(text[sep + 1 :])
        except NidError as e:
            raise NidError(f"bad net in NID {text!r}: {e}") from None
        addr = text[:sep]
    else:
        addr, net = text, Net("tcp", 0)
    return Nid(parse_addr(addr, net, resolve=resolve, context=text), net)


def nid_of(value: "Nid | str") -> Nid:
    return value if isinstance(value, Nid) else parse_nid(value)


# --- expression lists ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RangeExpr:
    """``lo-hi/stride`` (``cfs_range_expr``); ``lo <= hi`` (a reversed range does not parse)."""

    lo: int
    hi: int
    stride: int = 1

    def match(self, value: int) -> bool:
        return self.lo <= value <= self.hi and (value - self.lo) % self.stride == 0

    def values(self) -> range:
        return range(self.lo, self.hi + 1, self.stride)

    def count(self) -> int:
        return len(self.values())

    def render(self, bracketed: bool) -> str:
        # cfs_range_expr_print: a lone range gets its own brackets, a list member does not.
        o, c = ("", "") if bracketed else ("[", "]")
        if self.lo == self.hi:
            return str(self.lo)
        if self.stride == 1:
            return f"{o}{self.lo}-{self.hi}{c}"
        return f"{o}{self.lo}-{self.hi}/{self.stride}{c}"


@dataclass(frozen=True)
class ExprList:
    """``<number> | '[' range {',' range} ']'`` (``cfs_expr_list``)."""

    exprs: tuple[RangeExpr, ...]

    def match(self, value: int) -> bool:
        return any(e.match(value) for e in self.exprs)

    def values(self) -> list[int]:
        return [v for e in self.exprs for v in e.values()]

    def count(self) -> int:
        return sum(e.count() for e in self.exprs)

    def __str__(self) -> str:
        if len(self.exprs) > 1:
            return "[" + ",".join(e.render(True) for e in self.exprs) + "]"
        return "".join(e.render(False) for e in self.exprs)


def _range_expr(src: str, lo: int, hi: int, bracketed: bool, whole: str) -> RangeExpr:
    src = strim(src)
    if src == "*":
        return RangeExpr(lo, hi, 1)

    def num(tok: str, what: str) -> int:
        v = kstrtouint(strim(tok))
        if v is None:
            raise NidError(f"bad {what} {strim(tok)!r} in {whole!r}")
        if not lo <= v <= hi:
            raise NidError(f"{what} {v} in {whole!r} out of range {lo}..{hi}")
        return v

    v = kstrtouint(src)
    if v is not None:
        if not lo <= v <= hi:
            raise NidError(f"number {v} in {whole!r} out of range {lo}..{hi}")
        return RangeExpr(v, v, 1)
    if not bracketed:
        raise NidError(f"bad number {src!r} in {whole!r} (ranges need [brackets])")
    if "-" not in src:
        raise NidError(f"bad range {src!r} in {whole!r}")
    first, rest = src.split("-", 1)
    start = num(first, "range start")
    end = kstrtouint(strim(rest))
    if end is not None:
        if not lo <= end <= hi:
            raise NidError(f"range end {end} in {whole!r} out of range {lo}..{hi}")
        return _ordered(RangeExpr(start, end, 1), src, whole)
    if "/" not in rest:
        raise NidError(f"bad range end {strim(rest)!r} in {whole!r}")
    second, third = rest.split("/", 1)
    end = num(second, "range end")
    stride = num(third, "stride")
    if stride == 0:
        raise NidError(f"zero stride in {src!r} in {whole!r}")
    return _ordered(RangeExpr(start, end, stride), src, whole)


def _ordered(expr: RangeExpr, src: str, whole: str) -> RangeExpr:
    # cfs_range_expr_parse (libcfs and the kernel alike) ends with
    # "if (re->re_lo > re->re_hi) goto failed;".
    if expr.lo > expr.hi:
        raise NidError(f"reversed range {src!r} in {whole!r}: {expr.lo} > {expr.hi}")
    return expr


def parse_expr_list(text: str, lo: int, hi: int, *, whole: str | None = None) -> ExprList:
    """``cfs_expr_list_parse``: a number, ``*``, or ``[a,b-c,d-e/s]`` bounded by ``lo..hi``."""
    whole = text if whole is None else whole
    if text[:1] == "[" and text[-1:] == "]" and len(text) >= 2:
        exprs = []
        for tok in text[1:-1].split(","):
            if tok == "":
                raise NidError(f"empty item in {text!r} in {whole!r}")
            exprs.append(_range_expr(tok, lo, hi, True, whole))
        return ExprList(tuple(exprs))
    return ExprList((_range_expr(text, lo, hi, False, whole),))


# --- NID lists ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NidMask:
    """A CIDR entry (``192.168.0.0/16@tcp``, ``2001:db8::/32@tcp``, a bare IPv6 is /128)."""

    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    prefix_len: int

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(f"{self.addr}/{self.prefix_len}", strict=False)

    def match(self, nid: Nid) -> bool:
        if not isinstance(nid.addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return False
        if nid.addr.version != self.addr.version:
            return False
        return nid.addr in self.network

    def __str__(self) -> str:
        # cfs_print_nidmasks prints the address as given, not the network address.
        text = ntop6(self.addr) if isinstance(self.addr, ipaddress.IPv6Address) else str(self.addr)
        full = 128 if isinstance(self.addr, ipaddress.IPv6Address) else 32
        return text if self.prefix_len >= full else f"{text}/{self.prefix_len}"


@dataclass
class NidRange:
    """All entries of a NID list on one net (``struct nidrange``)."""

    type: NetType
    netnum: int  # up to 32 bits here: Lustre's nidlist parser does not bound it
    all: bool = False
    masks: list[NidMask] = field(default_factory=list)
    addrs: list[tuple[ExprList, ...]] = field(default_factory=list)

    def net_text(self) -> str:
        return self.type.name if self.netnum == 0 else f"{self.type.name}{self.netnum}"

    def matches_net(self, net: Net) -> bool:
        return self.type.name == net.type and self.netnum == net.num

    def match(self, nid: Nid) -> bool:
        if not self.matches_net(nid.net):
            return False
        if self.all:
            return True
        if self.type.netmask and any(m.match(nid) for m in self.masks):
            return True
        # Lustre matches address ranges against the first 32 address bits, even of an IPv6 NID.
        word = nid.addr_word
        for octets in self.addrs:
            if self.type.addr == ADDR_IP:
                if all(el.match((word >> (8 * (3 - k))) & 0xFF) for k, el in enumerate(octets)):
                    return True
            elif octets[0].match(word):
                return True
        return False

    def __str__(self) -> str:
        at = "@" + self.net_text()
        if self.all:
            return "*" + at
        parts = [str(m) + at for m in self.masks]
        parts += [".".join(str(el) for el in octets) + at for octets in self.addrs]
        return " ".join(parts)


class NidList:
    """A space-separated list of NID ranges (``cfs_parse_nidlist``), matched and expanded.

    ``NidList.parse("192.168.0.[1-10/2]@tcp *@o2ib 10.0.0.0/8@tcp")``; ``str()`` prints it the
    way ``cfs_print_nidlist`` does (grouped by net, masks before ranges).
    """

    def __init__(self, ranges: Iterable[NidRange], source: str = "") -> None:
        self.ranges: list[NidRange] = list(ranges)
        self.source = source

    @classmethod
    def parse(cls, text: str) -> "NidList":
        if not isinstance(text, str):
            raise NidError(f"NID list must be a string, got {text!r}")
        ranges: list[NidRange] = []
        for tok in text.split(" "):
            if tok:
                _parse_nidrange(tok, ranges)
        if not ranges:
            raise NidError(f"empty NID list {text!r}")
        return cls(ranges, text)

    def match(self, nid: "Nid | str") -> bool:
        """``cfs_match_nid``: does the NID fall in any entry?"""
        n = nid_of(nid)
        return any(r.match(n) for r in self.ranges)

    __contains__ = match

    def count(self) -> int | None:
        """How many NIDs :meth:`expand` would give; None for ``*`` entries."""
        total = 0
        for r in self.ranges:
            if r.all:
                return None
            total += sum(m.network.num_addresses for m in r.masks)
            for octets in r.addrs:
                c = 1
                for el in octets:
                    c *= el.count()
                total += c
        return total

    def expand(self, limit: int = 65536) -> list[Nid]:
        """Every NID the list names, in print order; at most ``limit`` (else NidError)."""
        n = self.count()
        if n is None:
            raise NidError(f"cannot expand {self}: '*' names every address")
        if n > limit:
            raise NidError(f"{self} names {n} NIDs, more than the limit of {limit}")
        out: list[Nid] = []
        for r in self.ranges:
            if r.netnum > 0xFFFF or (r.type.code == LOLND and r.netnum):
                raise NidError(f"cannot expand {r}: net {r.net_text()!r} is not a valid net")
            net = Net(r.type.name, r.netnum)
            for m in r.masks:
                if m.addr.version == 6 and not r.type.ipv6:
                    raise NidError(f"cannot expand {m}@{net}: net {net} does not take IPv6")
                out.extend(Nid(a, net) for a in m.network)
            for octets in r.addrs:
                if r.type.addr == ADDR_IP:
                    acc = [0]
                    for el in octets:
                        vals = el.values()
                        acc = [(a << 8) | v for a in acc for v in vals]
                    out.extend(Nid(ipaddress.IPv4Address(a), net) for a in acc)
                elif r.type.addr == ADDR_LO:
                    if octets[0].values():
                        out.append(Nid(0, net))
                else:
                    out.extend(Nid(v, net) for v in octets[0].values())
        return out

    def __str__(self) -> str:
        return " ".join(str(r) for r in self.ranges)

    def __repr__(self) -> str:
        return f"NidList({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NidList) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def _parse_nidrange(tok: str, ranges: list[NidRange]) -> None:
    at = tok.find("@")
    if at < 0:
        raise NidError(f"{tok!r} in NID list has no '@net'")
    addr, net_text = strim(tok[:at]), strim(tok[at + 1 :])
    if "@" in net_text or not net_text:
        raise NidError(f"bad net {net_text!r} in NID list entry {tok!r}")
    nt = _lookup_prefix(net_text)
    if nt is None:
        raise NidError(f"unknown net type in {net_text!r} in NID list entry {tok!r} (known: {_known_types()})")
    end = net_text[len(nt.name) :]
    netnum = 0
    if end:
        v = kstrtouint(end)
        if v is None:
            raise NidError(f"bad net number {end!r} in NID list entry {tok!r}")
        netnum = v
    nr = next((r for r in ranges if r.type is nt and r.netnum == netnum), None)
    if nr is None:
        nr = NidRange(nt, netnum)
        ranges.append(nr)
    slash = addr.find("/")
    if ":" in addr or (slash >= 0 and "]" not in addr[slash:]):
        nr.masks.append(_parse_nidmask(addr, tok))
    elif addr == "*":
        nr.all = True
    elif nt.addr == ADDR_IP:
        parts = strim(addr).split(".")
        octets = []
        for p in parts:
            p = strim(p)
            if not p:
                raise NidError(f"empty octet in {addr!r} in NID list entry {tok!r}")
            octets.append(parse_expr_list(p, 0, 255, whole=tok))
        if len(octets) != 4:
            raise NidError(f"{addr!r} in NID list entry {tok!r} does not have 4 octets")
        nr.addrs.append(tuple(octets))
    else:
        nr.addrs.append((parse_expr_list(addr, 0, _U32, whole=tok),))


def _parse_nidmask(addr: str, tok: str) -> NidMask:
    slash = addr.find("/")
    full = 128 if ":" in addr else 32
    if slash < 0:
        if ":" not in addr:
            raise NidError(f"netmask {addr!r} in {tok!r} needs a prefix length")
        plen = 128
        base = addr
    else:
        v = kstrtouint(addr[slash + 1 :], 10)
        if v is None or not 1 <= v <= full:
            raise NidError(f"bad prefix length {addr[slash + 1:]!r} in {tok!r} (1..{full})")
        plen = v
        base = addr[:slash]
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    ip = ip6_strict(base) if ":" in base else ip4_strict(base)
    if ip is None:
        raise NidError(f"bad address {base!r} in netmask entry {tok!r}")
    if ip.version == 4 and plen > 32:
        raise NidError(f"prefix length {plen} too long for IPv4 address in {tok!r}")
    return NidMask(ip, plen)
