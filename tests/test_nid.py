"""lu2k.nid: nets, NIDs and NID lists read and printed as Lustre 2.17 does.

The expected values come from reading nidstrings.c (libcfs_str2net_internal,
libcfs_ip_str2addr, libcfs_num_str2addr, cfs_parse_nidlist, cfs_range_expr_parse,
cfs_print_nidlist) and the C library calls they make.  The C-library parts (sscanf,
inet_ntop) are additionally cross-checked against this machine's glibc through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import random
import socket

import pytest

from lu2k.errors import NidError
from lu2k.nid import (
    NID_SIZE,
    NET_TYPE_TABLE,
    ExprList,
    Net,
    Nid,
    NidList,
    RangeExpr,
    kstrtouint,
    ntop6,
    parse_expr_list,
    parse_net,
    parse_nid,
    scan_int,
)

# --- nets ---------------------------------------------------------------------------------------

NET_OK = [
    ("tcp", "tcp"),
    ("tcp0", "tcp"),
    ("tcp1", "tcp1"),
    ("tcp00", "tcp"),
    ("tcp01", "tcp1"),  # %u is decimal; leading zeros are fine
    ("tcp010", "tcp10"),
    ("tcp 1", "tcp1"),  # %u skips leading whitespace
    ("tcp\t7", "tcp7"),
    ("tcp+2", "tcp2"),  # and takes a sign
    ("tcp65535", "tcp65535"),
    ("tcp131072", "tcp"),  # (2<<16)|0x20000 == 0x20000: wraps back into tcp0
    ("tcp131073", "tcp1"),
    ("o2ib", "o2ib"),
    ("o2ib0", "o2ib"),
    ("o2ib3", "o2ib3"),
    ("o2ib65536", "o2ib"),  # 5<<16 | 1<<16 == 5<<16
    ("lo", "lo"),
    ("gni", "gni"),
    ("gni5", "gni5"),
    ("gip2", "gip2"),
    ("ptlf", "ptlf"),
    ("kfi9", "kfi9"),
    ("efa", "efa"),
    ("efa1", "efa1"),
    ("udt", "udt"),
    ("udt3", "udt3"),
    ("quic", "quic"),
    ("quic12", "quic12"),
    ("rds", "rds"),
    ("rds1", "rds1"),
    ("tcp4294967296", "tcp"),  # strtoul fits 64 bits, the store truncates to 0
    ("tcp18446744073709551616", None),  # saturates to ULONG_MAX -> 0xffffffff -> LNET_NET_ANY
]

NET_BAD = [
    "",
    "foo",
    "TCP",  # names are case sensitive
    " tcp",  # no whitespace before the name
    "tcp ",  # nor after the number
    "tcp1 ",
    "tcpx",
    "tcp1x",
    "tcp0x1",  # %u is decimal only
    "tcp-1",  # 0xffffffff | type == LNET_NET_ANY
    "tcp65536",  # (2<<16)|65536 = <3:0>, an unknown type
    "tcp65538",
    "lo0",  # lo takes no number
    "lo1",
    "lo 0",
    "ib0",
    "o2",
    "elan",  # removed from 2.17's table
    "gm",
    "ptl",
    "tcp-",
    "tcp+",
    "tcp 1 ",
]


@pytest.mark.parametrize("text,canon", [c for c in NET_OK if c[1] is not None])
def test_parse_net_canonical(text: str, canon: str) -> None:
    net = parse_net(text)
    assert str(net) == canon
    assert parse_net(str(net)) == net


@pytest.mark.parametrize("text", NET_BAD + [c[0] for c in NET_OK if c[1] is None])
def test_parse_net_rejects(text: str) -> None:
    with pytest.raises(NidError):
        parse_net(text)


def test_parse_net_error_names_the_part() -> None:
    with pytest.raises(NidError, match="unknown net type in 'foo1'"):
        parse_net("foo1")
    with pytest.raises(NidError, match=r"bad net number '1x'"):
        parse_net("tcp1x")
    with pytest.raises(NidError, match="takes no number"):
        parse_net("lo1")
    with pytest.raises(NidError, match=r"<3:0>"):
        parse_net("tcp65536")


def test_net_constructor_bounds() -> None:
    assert str(Net("tcp", 0)) == "tcp"
    assert str(Net("o2ib", 65535)) == "o2ib65535"
    for bad in (("tcp", -1), ("tcp", 65536), ("lo", 1), ("bogus", 0)):
        with pytest.raises(NidError):
            Net(*bad)


def test_net_packed_round_trip() -> None:
    for t in NET_TYPE_TABLE:
        net = Net(t.name, 0 if t.name == "lo" else 7)
        assert net.packed == (t.code << 16) | net.num
        assert Net.from_packed(net.packed) == net
    with pytest.raises(NidError):
        Net.from_packed(3 << 16)


def test_type_codes_follow_lustre_abi() -> None:
    codes = {t.name: t.code for t in NET_TYPE_TABLE}
    assert codes["tcp"] == 2 and codes["o2ib"] == 5 and codes["lo"] == 9
    assert codes["gni"] == 13 and codes["gip"] == 14 and codes["ptlf"] == 15 and codes["kfi"] == 16
    assert codes["efa"] == 18 and codes["bxi3f"] == 19  # TOFULND took 17
    assert all(c > 0xFF // 2 for n, c in codes.items() if n in ("udt", "quic", "rds"))


# --- NIDs ------------------------------------------------------------------------------------------

NID_OK = [
    ("10.0.0.1@tcp", "10.0.0.1@tcp"),
    ("10.0.0.1@tcp0", "10.0.0.1@tcp"),
    ("10.0.0.1", "10.0.0.1@tcp"),  # no @: tcp0
    ("10.0.0.1@tcp3", "10.0.0.1@tcp3"),
    ("192.168.1.200@o2ib", "192.168.1.200@o2ib"),
    ("192.168.1.200@o2ib12", "192.168.1.200@o2ib12"),
    ("0.0.0.0@tcp", "0.0.0.0@tcp"),
    ("255.255.255.255@tcp", "255.255.255.255@tcp"),
    ("010.001.000.009@tcp", "10.1.0.9@tcp"),  # decimal, not octal
    ("+1.2.3.4@tcp", "1.2.3.4@tcp"),  # %u takes a sign
    ("1.+2.3.4@tcp", "1.2.3.4@tcp"),
    (" 1.2.3.4@tcp", "1.2.3.4@tcp"),  # and skips whitespace before each part
    ("1. 2.3.4@tcp", "1.2.3.4@tcp"),
    ("1.2.3.\t4@tcp", "1.2.3.4@tcp"),
    ("-0.0.0.0@tcp", "0.0.0.0@tcp"),
    ("4294967296.1.1.1@tcp", "0.1.1.1@tcp"),  # 2^32 truncates to 0 in the unsigned int
    ("4294967297.1.1.1@tcp", "1.1.1.1@tcp"),
    ("1.2.3.4@tcp 1", "1.2.3.4@tcp1"),
    ("1.2.3.4@udt", "1.2.3.4@udt"),
    ("1.2.3.4@quic2", "1.2.3.4@quic2"),
    ("1.2.3.4@rds", "1.2.3.4@rds"),
    ("1.2.3.4@efa", "1.2.3.4@efa"),
    ("1.2.3.4@gip", "1.2.3.4@gip"),
    ("0@lo", "0@lo"),
    ("*@lo", "0@lo"),  # libcfs_lo_str2addr accepts anything
    ("anything@lo", "0@lo"),
    ("@lo", "0@lo"),
    ("5@lo", "0@lo"),
    ("12@gni", "12@gni"),
    ("12@gni1", "12@gni1"),
    ("0x10@gni", "16@gni"),
    ("0X1f@gni", "31@gni"),
    ("0x0x10@gni", "16@gni"),  # glibc %x takes its own 0x after the literal one
    ("007@gni", "7@gni"),
    ("4294967295@gni", "4294967295@gni"),
    ("-1@gni", "4294967295@gni"),
    (" 5@kfi", "5@kfi"),
    ("5@ptlf", "5@ptlf"),
    ("2001:db8::2@tcp", "2001:db8::2@tcp"),  # IPv6 through the large-NID API
    ("2001:db8::1@tcp", "2001:db8::1@tcp"),
    ("2001:DB8:0:0:0:0:0:1@tcp", "2001:db8::1@tcp"),
    ("fec0::1@tcp2", "fec0::1@tcp2"),  # site-local is allowed ("similar to 10.0.0.0/8")
    ("::ffff:1.2.3.4@tcp", "::ffff:1.2.3.4@tcp"),
    ("::2@tcp", "::2@tcp"),
    ("::1.2.3.4@tcp", "::1.2.3.4@tcp"),  # glibc's inet_ntop keeps the IPv4-compatible form
    ("::@tcp", "::@tcp"),
    ("1:0:0:1:0:0:0:1@tcp", "1:0:0:1::1@tcp"),
    ("2001:db8::1@udt", "2001:db8::1@udt"),
    ("2001:db8::1@quic", "2001:db8::1@quic"),
]

NID_BAD = [
    "",
    "@tcp",
    "1.2.3@tcp",
    "1.2.3.4.5@tcp",
    "256.1.1.1@tcp",
    "1.2.3.256@tcp",
    "-1.2.3.4@tcp",
    "1.2.3.4 @tcp",  # trailing whitespace before @ is junk
    "1.2.3.4@",
    "1.2.3.4@foo",
    "1.2.3.4@tcp@tcp",  # the net is everything after the first @
    "1.2.3.4@lo1",
    "1..2.3@tcp",
    "0x1.2.3.4@tcp",
    "1.2.3.4x@tcp",
    "1.2.3.4@tcpx",
    "12@gni@gni",
    "x12@gni",
    "12x@gni",
    "0x@gni",
    "@gni",
    " 1@gni ",
    "::1@o2ib",  # only tcp (and lu2k's IP backends) take IPv6
    "::1@gip",
    "[::1]@tcp",  # no brackets
    "fe80::1%eth0@tcp",  # no zone id
    "1:2:3@tcp",
    "1::2::3@tcp",
    "12345::1@tcp",
    "9.9.9.9.9",
]


@pytest.mark.parametrize("text,canon", NID_OK)
def test_parse_nid_canonical(text: str, canon: str) -> None:
    nid = parse_nid(text, resolve=False)
    assert str(nid) == canon
    assert parse_nid(str(nid), resolve=False) == nid
    assert Nid.from_bytes(nid.to_bytes()) == nid


@pytest.mark.parametrize("text", NID_BAD)
def test_parse_nid_rejects(text: str) -> None:
    with pytest.raises(NidError):
        parse_nid(text, resolve=False)


def test_parse_nid_errors_name_the_part() -> None:
    with pytest.raises(NidError, match="bad IPv4 address '256.1.1.1'"):
        parse_nid("256.1.1.1@tcp")
    with pytest.raises(NidError, match="bad net in NID '1.2.3.4@foo'"):
        parse_nid("1.2.3.4@foo")
    with pytest.raises(NidError, match="does not take IPv6"):
        parse_nid("::1@o2ib")
    with pytest.raises(NidError, match="takes a number"):
        parse_nid("x@gni")


def test_hostname_is_resolved_only_when_it_starts_with_a_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    # "localhost" comes from /etc/hosts: no packet leaves the machine.
    assert str(parse_nid("localhost@tcp")) == "127.0.0.1@tcp"
    assert str(parse_nid("localhost")) == "127.0.0.1@tcp"
    with pytest.raises(NidError, match="resolution disabled"):
        parse_nid("localhost@tcp", resolve=False)
    with pytest.raises(NidError):
        parse_nid("1localhost@tcp")
    # A failing lookup (simulated: a real one would query the site's DNS) becomes a NidError.
    def fail(name: str) -> str:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "gethostbyname", fail)
    with pytest.raises(NidError, match="cannot resolve host name 'nohost'"):
        parse_nid("nohost@tcp")


def test_nid_packing() -> None:
    nid = parse_nid("10.1.2.3@tcp7")
    raw = nid.to_bytes()
    assert len(raw) == NID_SIZE
    assert raw[:8] == bytes([0, 2, 0, 7, 10, 1, 2, 3])
    v6 = parse_nid("2001:db8::5@tcp")
    assert v6.to_bytes()[0] == 12 and Nid.from_bytes(v6.to_bytes()) == v6
    num = parse_nid("77@gni2")
    assert Nid.from_bytes(num.to_bytes()) == num
    with pytest.raises(NidError):
        Nid.from_bytes(raw[:-1])
    with pytest.raises(NidError):
        Nid.from_bytes(bytes([0, 99]) + raw[2:])
    with pytest.raises(NidError):
        Nid.from_bytes(bytes([4]) + raw[1:])


def test_nid_constructor_checks_address_kind() -> None:
    with pytest.raises(NidError):
        Nid(5, Net("tcp"))
    with pytest.raises(NidError):
        Nid(ipaddress.IPv4Address("1.2.3.4"), Net("gni"))
    with pytest.raises(NidError):
        Nid(ipaddress.IPv6Address("::1"), Net("o2ib"))
    with pytest.raises(NidError):
        Nid(1, Net("lo"))
    with pytest.raises(NidError):
        _ = Nid(3, Net("gni")).host
    assert parse_nid("10.0.0.1@tcp").host == "10.0.0.1"


# --- C library cross-checks -------------------------------------------------------------------------

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _glibc_scan(fmt: bytes, text: str) -> tuple[int, int, int]:
    """(conversions, value, %n) from the real sscanf."""
    v = ctypes.c_uint(0xDEAD)
    n = ctypes.c_int(-1)
    rc = _LIBC.sscanf(text.encode(), fmt, ctypes.byref(v), ctypes.byref(n))
    return rc, v.value, n.value


def _fuzz_numbers(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "0123456789+- \txX.aF"
    out = ["0", "1", "+1", "-1", " 7", "4294967295", "4294967296", "18446744073709551615",
           "18446744073709551616", "99999999999999999999999", "-4294967296", "+", "-", " ", "0x10", "010"]
    for _ in range(count):
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
    return out


@pytest.mark.parametrize("text", _fuzz_numbers(1, 300))
def test_scan_u_matches_glibc(text: str) -> None:
    rc, value, n = _glibc_scan(b"%u%n", text)
    mine = scan_int(text, 0)
    if rc < 1:
        assert mine is None
    else:
        assert mine == (value, n)


@pytest.mark.parametrize("text", _fuzz_numbers(2, 150))
def test_scan_x_matches_glibc(text: str) -> None:
    rc, value, n = _glibc_scan(b"%x%n", text)
    mine = scan_int(text, 0, base=16)
    if rc < 1:
        assert mine is None
    else:
        assert mine is not None and mine[0] == value
        # glibc may swallow a dangling "0x"; only compare positions when digits followed.
        if not text.strip(" \t+-").lower().startswith("0x") or mine[1] == n:
            assert mine[1] == n


def test_scan_d_signed_truncation() -> None:
    assert scan_int("-5", 0, signed=True) == (-5, 2)
    assert scan_int("2147483648", 0, signed=True) == (-2147483648, 10)
    assert scan_int("4294967297", 0, signed=True) == (1, 10)
    assert scan_int("x", 0, signed=True) is None


@pytest.mark.parametrize("seed", range(60))
def test_ntop6_matches_glibc(seed: int) -> None:
    rng = random.Random(seed)
    words = [rng.choice([0, 0, 0, 1, 0xFFFF, rng.randint(0, 0xFFFF)]) for _ in range(8)]
    if seed % 5 == 0:
        words[:5] = [0] * 5
        words[5] = 0xFFFF
    if seed % 7 == 0:
        words[:6] = [0] * 6
    raw = b"".join(w.to_bytes(2, "big") for w in words)
    assert ntop6(ipaddress.IPv6Address(raw)) == socket.inet_ntop(socket.AF_INET6, raw)


# --- kstrtouint and expression lists ------------------------------------------------------------------

KSTRTOUINT = [
    ("0", 0), ("7", 7), ("010", 8), ("0x1f", 31), ("0X1F", 31), ("+5", 5), ("5\n", 5),
    ("4294967295", 4294967295), ("4294967296", None), ("08", None), ("0x", None), ("", None),
    (" 5", None), ("5 ", None), ("-1", None), ("0xg", None), ("++1", None),
]


@pytest.mark.parametrize("text,value", KSTRTOUINT)
def test_kstrtouint(text: str, value: int | None) -> None:
    assert kstrtouint(text) == value


EXPR_OK = [
    ("5", "5", [5]),
    ("*", "[0-255]", list(range(256))),
    ("[1-3]", "[1-3]", [1, 2, 3]),
    ("[1-7/2]", "[1-7/2]", [1, 3, 5, 7]),
    ("[1-8/3]", "[1-8/3]", [1, 4, 7]),  # unlike routes=, the end need not be on a step
    ("[1,3,5]", "[1,3,5]", [1, 3, 5]),
    ("[1-2,7,9-13/2]", "[1-2,7,9-13/2]", [1, 2, 7, 9, 11, 13]),
    ("[3-3]", "3", [3]),
    ("[3-3/2]", "3", [3]),
    ("[1-5/1]", "[1-5]", [1, 2, 3, 4, 5]),
    ("[ 1 - 3 ]", "[1-3]", [1, 2, 3]),
    ("[0x10-0x12]", "[16-18]", [16, 17, 18]),
    ("[010]", "8", [8]),
    ("[*]", "[0-255]", list(range(256))),
    ("[1,*]", "[1,0-255]", [1] + list(range(256))),
    ("255", "255", [255]),
    ("[0-255/255]", "[0-255/255]", [0, 255]),
]

EXPR_BAD = ["", "256", "[]", "[,1]", "[1,]", "[1-]", "[-1]", "1-3", "[1-3/0]", "[1-3/256]",
            "[1-256]", "[a]", "[1-3-5]", "[1/2]", "[1-3/]", "[", "]", "x", "[1 2]", "08", "[0x]"]


@pytest.mark.parametrize("text,canon,values", EXPR_OK)
def test_expr_list(text: str, canon: str, values: list[int]) -> None:
    el = parse_expr_list(text, 0, 255)
    assert str(el) == canon
    assert el.values() == values
    for v in range(256):
        assert el.match(v) == (v in values)


@pytest.mark.parametrize("text", EXPR_BAD)
def test_expr_list_rejects(text: str) -> None:
    with pytest.raises(NidError):
        parse_expr_list(text, 0, 255)


def test_zero_stride_is_named() -> None:
    with pytest.raises(NidError, match="zero stride"):
        parse_expr_list("[1-9/0]", 0, 255)


def test_range_expr_render() -> None:
    assert str(ExprList((RangeExpr(1, 9, 4),))) == "[1-9/4]"
    assert str(ExprList((RangeExpr(1, 9, 4), RangeExpr(12, 12)))) == "[1-9/4,12]"


# --- NID lists -----------------------------------------------------------------------------------------

NIDLIST_OK = [
    ("10.0.0.1@tcp", "10.0.0.1@tcp"),
    ("  10.0.0.1@tcp  ", "10.0.0.1@tcp"),
    ("10.0.0.1@tcp 10.0.0.2@tcp", "10.0.0.1@tcp 10.0.0.2@tcp"),
    ("10.0.0.[1-4]@tcp", "10.0.0.[1-4]@tcp"),
    ("10.0.[1,3].[1-9/2]@tcp1", "10.0.[1,3].[1-9/2]@tcp1"),
    ("*.*.*.*@tcp", "[0-255].[0-255].[0-255].[0-255]@tcp"),
    ("*@tcp", "*@tcp"),
    ("*@o2ib3", "*@o2ib3"),
    ("1.2.3.4@o2ib 5.6.7.8@tcp 9.9.9.9@o2ib", "1.2.3.4@o2ib 9.9.9.9@o2ib 5.6.7.8@tcp"),  # grouped by net
    ("1.2.3.4@tcp0 1.2.3.5@tcp", "1.2.3.4@tcp 1.2.3.5@tcp"),
    ("010.0.0.1@tcp", "8.0.0.1@tcp"),  # kstrtouint: octal!
    ("0x0a.0.0.1@tcp", "10.0.0.1@tcp"),
    ("1.2.3.4@tcp1 ", "1.2.3.4@tcp1"),
    ("1.2.3.4@tcp0x10", "1.2.3.4@tcp16"),  # the net number is kstrtouint too
    ("1.2.3.4@tcp010", "1.2.3.4@tcp8"),
    ("5@gni", "5@gni"),
    ("[1-100]@gni", "[1-100]@gni"),
    ("[0-4294967295]@kfi", "[0-4294967295]@kfi"),
    ("0x10@ptlf", "16@ptlf"),
    ("0@lo", "0@lo"),
    ("*@lo", "*@lo"),
    ("192.168.0.0/16@tcp", "192.168.0.0/16@tcp"),
    ("192.168.1.7/24@tcp", "192.168.1.7/24@tcp"),  # printed as given, not as the network
    ("10.0.0.1/32@tcp", "10.0.0.1@tcp"),
    ("2001:db8::/32@tcp", "2001:db8::/32@tcp"),
    ("2001:db8::1@tcp", "2001:db8::1@tcp"),  # a bare IPv6 is a /128 mask
    ("2001:db8::1/128@tcp", "2001:db8::1@tcp"),
    ("1.2.3.4@tcp 10.0.0.0/8@tcp", "10.0.0.0/8@tcp 1.2.3.4@tcp"),  # masks print first
    ("10.0.0.[1-9/2]@tcp", "10.0.0.[1-9/2]@tcp"),  # '/' before ']' is a stride, not a mask
    ("*@tcp 1.2.3.4@tcp", "*@tcp"),
    ("0.0.0.0@udt 1.1.1.1@quic 2.2.2.2@rds", "0.0.0.0@udt 1.1.1.1@quic 2.2.2.2@rds"),
    ("1.2.3.4@lo1", None),  # lo's addresses are numbers
    ("7@lo1", "7@lo1"),  # and the nidlist parser does not stop a number on lo
]

NIDLIST_BAD = [
    "", "   ", "1.2.3.4", "1.2.3.4@", "1.2.3.4@foo", "1.2.3.4@tcp@tcp", "1.2.3@tcp", "1.2.3.4.5@tcp",
    "1.2.3.256@tcp", "1.2.3.[1-4/0]@tcp", "1.2.3.[1-300]@tcp", "1..3.4@tcp", "@tcp", "1.2.3.4@tcp1x",
    "1.2.3.4@tcp-1", "10.0.0.0/33@tcp", "10.0.0.0/0@tcp", "10.0.0.0/@tcp", "10.0.0/8@tcp",
    "2001:db8::/129@tcp", "2001:zz::1@tcp", "x@gni", "[1-]@gni", "1.2.3.4@tcp\t5.6.7.8@tcp",
    "10.0.0.1/8 @tcp1x", "010.0.0.09@tcp",
    " 1 . 2 . 3 . 4 @tcp",  # entries are split at every space
    "1.2.3.4@ tcp1",
    "10.0.0.[1-2]/24@tcp",  # '/' after ']' makes a CIDR mask, and that is not an address
]


@pytest.mark.parametrize("text,canon", NIDLIST_OK)
def test_nidlist_print(text: str, canon: str | None) -> None:
    if canon is None:
        with pytest.raises(NidError):
            NidList.parse(text)
        return
    nl = NidList.parse(text)
    assert str(nl) == canon
    assert str(NidList.parse(str(nl))) == canon


@pytest.mark.parametrize("text", NIDLIST_BAD)
def test_nidlist_rejects(text: str) -> None:
    with pytest.raises(NidError):
        NidList.parse(text)


NIDLIST_MATCH = [
    ("10.0.0.[1-4]@tcp", "10.0.0.3@tcp", True),
    ("10.0.0.[1-4]@tcp", "10.0.0.5@tcp", False),
    ("10.0.0.[1-4]@tcp", "10.0.0.3@tcp1", False),
    ("10.0.0.[1-4]@tcp", "10.0.0.3@o2ib", False),
    ("10.0.0.[1-9/2]@tcp", "10.0.0.7@tcp", True),
    ("10.0.0.[1-9/2]@tcp", "10.0.0.8@tcp", False),
    ("*@tcp", "1.2.3.4@tcp", True),
    ("*@tcp", "1.2.3.4@tcp1", False),
    ("*@tcp", "2001:db8::1@tcp", True),
    ("*@lo", "0@lo", True),
    ("0@lo", "0@lo", True),
    ("10.0.0.0/8@tcp", "10.255.0.1@tcp", True),
    ("10.0.0.0/8@tcp", "11.0.0.1@tcp", False),
    ("10.9.9.9/8@tcp", "10.0.0.1@tcp", True),
    ("10.0.0.0/8@tcp", "2001:db8::1@tcp", False),
    ("10.0.0.0/8@gip", "10.0.0.1@gip", False),  # gip has no netmask matcher in Lustre
    ("10.0.0.0/8@o2ib", "10.0.0.1@o2ib", True),
    ("2001:db8::/32@tcp", "2001:db8:1::1@tcp", True),
    ("2001:db8::/32@tcp", "2001:db9::1@tcp", False),
    ("2001:db8::/32@tcp", "32.1.13.184@tcp", False),
    ("2001:db8::1@tcp", "2001:db8::1@tcp", True),
    ("2001:db8::1@tcp", "2001:db8::2@tcp", False),
    ("32.1.13.184@tcp", "2001:db8::1@tcp", True),  # Lustre ranges look at the first 32 bits only
    ("[1-10]@gni", "5@gni", True),
    ("[1-10]@gni", "11@gni", False),
    ("1.2.3.4@tcp 5.6.7.8@o2ib", "5.6.7.8@o2ib", True),
    ("1.2.3.4@tcp 5.6.7.8@o2ib", "5.6.7.8@tcp", False),
    ("1.*.3.4@tcp", "1.200.3.4@tcp", True),
    ("7@lo1", "0@lo", False),
]


@pytest.mark.parametrize("text,nid,expected", NIDLIST_MATCH)
def test_nidlist_match(text: str, nid: str, expected: bool) -> None:
    nl = NidList.parse(text)
    assert nl.match(nid) is expected
    assert (parse_nid(nid) in nl) is expected


def test_nidlist_expand() -> None:
    nl = NidList.parse("10.0.[1-2].[1-5/2]@tcp 3@gni 10.1.0.0/31@tcp")
    assert [str(n) for n in nl.expand()] == [
        "10.1.0.0@tcp", "10.1.0.1@tcp",
        "10.0.1.1@tcp", "10.0.1.3@tcp", "10.0.1.5@tcp", "10.0.2.1@tcp", "10.0.2.3@tcp", "10.0.2.5@tcp",
        "3@gni",
    ]
    assert nl.count() == 9
    assert [str(n) for n in NidList.parse("2001:db8::7@tcp").expand()] == ["2001:db8::7@tcp"]


def test_nidlist_expand_is_bounded() -> None:
    with pytest.raises(NidError, match="limit"):
        NidList.parse("10.*.*.*@tcp").expand()
    with pytest.raises(NidError, match=r"'\*'"):
        NidList.parse("*@tcp").expand()
    with pytest.raises(NidError, match="limit"):
        NidList.parse("10.0.0.[1-9]@tcp").expand(limit=8)
    with pytest.raises(NidError, match="not a valid net"):
        NidList.parse("7@lo1").expand()
    assert len(NidList.parse("10.0.0.[1-9]@tcp").expand(limit=9)) == 9


def test_nidlist_equality_and_repr() -> None:
    a = NidList.parse("1.2.3.4@tcp  5.6.7.8@tcp")
    b = NidList.parse("1.2.3.4@tcp0 5.6.7.8@tcp")
    assert a == b and hash(a) == hash(b)
    assert "1.2.3.4@tcp" in repr(a)


def _fuzz_ipv6(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = ["::", "::1", "1::", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8:9", "1::2::3", "::ffff:1.2.3.4", "::1.2.3.04",
           "12345::", "g::1", ":1::", "1:::2", "::1.2.3", "1:2:3:4:5:6:1.2.3.4", "1:2:3:4:5:6:7:1.2.3.4", " ::1", "::1 "]
    parts = ["0", "1", "ffff", "FFFF", "abcd", "0000", "00000", "", "1.2.3.4", "256.1.1.1", "g"]
    for _ in range(count):
        out.append(":".join(rng.choice(parts) for _ in range(rng.randint(1, 9))))
    return out


@pytest.mark.parametrize("text", _fuzz_ipv6(3, 150))
def test_ip6_reader_matches_glibc_inet_pton(text: str) -> None:
    from lu2k.nid import ip6_strict

    try:
        expected = socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        expected = None
    mine = ip6_strict(text)
    assert (mine.packed if mine is not None else None) == expected


def _c_ip_str2addr(text: str) -> int | None:
    """libcfs_ip_str2addr's numeric branch, run on the real glibc sscanf."""
    a, b, c, d = (ctypes.c_uint(0) for _ in range(4))
    n = ctypes.c_int(len(text))
    rc = _LIBC.sscanf(text.encode(), b"%u.%u.%u.%u%n", *(ctypes.byref(x) for x in (a, b, c, d, n)))
    parts = [a.value, b.value, c.value, d.value]
    if rc >= 4 and n.value == len(text) and all(p & ~0xFF == 0 for p in parts):
        return (parts[0] << 24) | (parts[1] << 16) | (parts[2] << 8) | parts[3]
    return None


def _c_num_str2addr(text: str) -> int | None:
    """libcfs_num_str2addr on the real glibc sscanf."""
    for fmt in (b"0x%x%n", b"0X%x%n", b"%u%n"):
        v, n = ctypes.c_uint(0), ctypes.c_int(len(text))
        if _LIBC.sscanf(text.encode(), fmt, ctypes.byref(v), ctypes.byref(n)) >= 1 and n.value == len(text):
            return v.value
    return None


def _fuzz_addresses(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    pieces = ["0", "1", "01", "255", "256", "+3", "-0", "-1", " 7", "4294967296", "4294967551", "99999999999999999999", "x", ""]
    out = ["1.2.3.4", "1.2.3", "1.2.3.4.5", "1..2.3", " 1.2.3.4", "1.2.3.4 ", "0x1.2.3.4"]
    for _ in range(count):
        out.append(".".join(rng.choice(pieces) for _ in range(rng.choice([3, 4, 4, 4, 5]))))
    return out


@pytest.mark.parametrize("text", _fuzz_addresses(4, 200))
def test_ipv4_nid_address_matches_libcfs_on_glibc(text: str) -> None:
    from lu2k.nid import ip4_classic

    assert ip4_classic(text) == _c_ip_str2addr(text)


@pytest.mark.parametrize("text", _fuzz_numbers(5, 150) + ["0x10", "0X1f", "0x0x10", "0x", "0xg", "0x-1", "0x 5", "0x+5"])
def test_numeric_nid_address_matches_libcfs_on_glibc(text: str) -> None:
    from lu2k.nid import num_str2addr

    assert num_str2addr(text) == _c_num_str2addr(text)


# --- the last cases where lu2k followed Lustre's code (lustre-release c881f8eb) ----------------------


def test_every_net_type_of_libcfs_netstrfns() -> None:
    """lib/libcfs/nidstrings.c ``libcfs_netstrfns[]``: lo, tcp, o2ib, gni, gip, ptlf, kfi, efa, bxi3f,
    in that order (libcfs_str2net_internal matches by prefix, first row wins)."""
    lustre = [t.name for t in NET_TYPE_TABLE if t.code < 100]
    assert lustre == ["lo", "tcp", "o2ib", "gni", "gip", "ptlf", "kfi", "efa", "bxi3f"]
    assert str(parse_net("bxi3f")) == "bxi3f" and parse_net("bxi3f2") == Net("bxi3f", 2)
    assert str(parse_nid("0x1f@bxi3f1")) == "31@bxi3f1"  # libcfs_num_str2addr, printed by libcfs_decnum_addr2str
    assert NidList.parse("[1-4]@bxi3f").match("3@bxi3f")  # libcfs_num_parse / libcfs_num_match
    with pytest.raises(NidError):
        parse_nid("1.2.3.4@bxi3f")  # a number, not an IP address
    with pytest.raises(NidError):
        parse_net("bxi3")  # no row is a prefix of it


def test_efa_takes_ipv6_but_no_netmask() -> None:
    """efa's row has nf_str2addr_size (large, IPv6 NIDs) and no nf_match_netmask."""
    assert str(parse_nid("2001:db8::7@efa")) == "2001:db8::7@efa"
    assert not NidList.parse("10.0.0.0/8@efa").match("10.0.0.1@efa")


@pytest.mark.parametrize("text", ["::1@tcp", "::1@udt", "fe80::1@tcp2", "fe80::abcd:1@quic", "FE80::1@tcp", "fe9f::1@tcp", "febf:ffff::1@tcp"])
def test_ipv6_loopback_and_link_local_nids_are_refused(text: str) -> None:
    """libcfs_ip_str2addr_size: ``!IN6_IS_ADDR_LOOPBACK && !IN6_IS_ADDR_LINKLOCAL`` or no address."""
    with pytest.raises(NidError, match="loopback|link-local"):
        parse_nid(text)


def test_ipv6_loopback_in_a_packed_nid_still_unpacks() -> None:
    """The restriction is the string reader's, as in Lustre; a packed NID is taken as it is."""
    raw = Nid(ipaddress.IPv6Address("::1"), Net("tcp")).to_bytes()
    assert str(Nid.from_bytes(raw)) == "::1@tcp"


@pytest.mark.parametrize("text", ["[10-4]", "[5-1/2]", "[1,9-8]", "[0x10-0xf]"])
def test_reversed_range_is_refused(text: str) -> None:
    """cfs_range_expr_parse ends with ``if (re->re_lo > re->re_hi) goto failed;``."""
    with pytest.raises(NidError, match="reversed range"):
        parse_expr_list(text, 0, 255)


@pytest.mark.parametrize("text", ["10.0.0.[10-4]@tcp", "[10-4]@gni", "10.[9-1].0.1@o2ib"])
def test_reversed_range_in_a_nidlist_is_refused(text: str) -> None:
    with pytest.raises(NidError, match="reversed range"):
        NidList.parse(text)


@pytest.mark.parametrize("text,canon", [("::ffff:127.0.0.1@tcp", "::ffff:127.0.0.1@tcp"), ("::2@tcp", "::2@tcp"),
                                        ("fe7f::1@tcp", "fe7f::1@tcp"), ("fec0::1@tcp", "fec0::1@tcp")])
def test_ipv6_next_to_loopback_and_link_local_is_taken(text: str, canon: str) -> None:
    """IN6_IS_ADDR_LOOPBACK is ``::1`` alone and IN6_IS_ADDR_LINKLOCAL ``fe80::/10`` alone: an
    IPv4-mapped loopback, ``::2``, the /10's neighbours are ordinary addresses to Lustre."""
    assert str(parse_nid(text)) == canon
