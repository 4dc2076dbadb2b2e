"""LNet module-parameter strings: ``networks=``, ``ip2nets=``, ``routes=`` (and lnetctl's
``ip2nets:`` rules), read exactly as Lustre 2.17 reads them.

Pure: the host's interfaces come in as an ordered list of ``(name, ipv4)`` pairs standing for
what the OS reports, in detection order (optionally ``(name, ipv4, state)``, state ``"up"``,
``"down"`` or a bool); nothing here looks at the real machine.  Interfaces that are down are
invisible to LNet (``lnet_inet_enumerate`` skips them): they match no ``ip2nets`` rule and a
net that names one does not start.

Theory of operation, following ``lnet/lnet/config.c``:

* ``networks`` is a comma-separated list of ``net[(iface[cpts], …)][cpts]``.  The parser is
  Lustre's destructive one, reproduced on a copy of the string so that error positions match:
  after a net's optional parts, anything up to the next comma is *ignored* (``tcp0 junk`` is
  ``tcp0``), ``lo`` is skipped (it is implicit), a net named twice gets the NIs of both, an
  interface whose name is a prefix of one already on that net is a duplicate (Lustre compares
  with ``strncmp(existing, new, strlen(new))``).  A net without interfaces uses the first
  interface the OS detected (:func:`resolve_interfaces`).
* ``ip2nets`` is a list of rules separated by ``;`` or newlines, ``#`` comments to the end of
  the rule.  A rule is ``<networks-spec> <ip-pattern> …``; it matches when *any* pattern matches
  *any* local IPv4 address other than ``lo``'s -- the address need not belong to the interface
  the rule names (the Lustre wiki's "pattern matching a non-LNet interface").  A rule without
  patterns never matches.  Every matching rule contributes its nets (2.17 accumulates: older
  Lustre skipped a rule whose net an earlier rule had already given); a net repeated *within*
  one rule is an error.  The result is a ``networks`` string, parsed as above, so NIs of a net
  named by several rules add up; two interface-less NIs of one net land on the same (first)
  interface and are one NI.
* ``routes`` is a list of ``net [hops] gateway[:priority] …`` separated by ``;``/newlines with
  ``#`` comments; ``[a-b/s,c,text]`` in any token expands (and a range must land on ``b``
  exactly: ``[1-10/2]`` is an error).  Hops are 1..255.  ``lo`` is refused as a net or
  gateway.  A gateway that is one of our own NIDs makes us a router instead of a route.  One
  quirk kept: the priority applied to all of a rule's routes is that of the *last* gateway
  written (``tcp1 a@tcp:5 b@tcp`` gives priority 0 to both).  A gateway on the very net the
  route leads to (``tcp1 10.0.0.2@tcp1``) fails the whole string, as ``lnet_add_route``'s
  -EINVAL fails ``lnet_parse_route``.

lnetctl's YAML ``ip2nets:`` rules (:func:`ip2nets_rules`) follow lnetctl instead: a rule that
names interfaces keeps only those that exist, are up and match one of its ranges; a rule with
only ranges takes every interface whose address matches; a rule with neither takes the first
non-loopback interface; a rule left with no interface is skipped, and no rule applying at all
is an error.  That is how the wiki's ``tcp(eth0) 192.168.*.3`` on a host whose eth0 is
192.0.19.3 fails.

Errors raise :class:`~lu2k.errors.ConfigError` whose ``where`` is
``"<param> at position N"`` and whose message shows the offending token under the string.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

from .errors import ConfigError, NidError
from .nid import (
    ADDR_IP,
    LOLND,
    ExprList,
    Net,
    Nid,
    nid_of,
    parse_expr_list,
    parse_net,
    parse_nid,
    scan_int,
    scan_u_exact,
    strim,
)
from .routing import Route  # the one Route type: what routes= and the route section give the router

LNET_SINGLE_TEXTBUF_NOB = 4 << 10  # Lustre's bound on one string / one text buffer
LNET_MAX_TEXTBUF_NOB = 64 << 10  # and on all text buffers of one parse
_TEXTBUF_HDR = 24  # sizeof(struct lnet_text_buf) header on 64-bit, counted against the bounds
_SPACESTR = " \t\v\r\n"  # config.c's SPACESTR (note: no \f, unlike isspace)
_ISSPACE = " \t\n\v\f\r"
_DELIMITERS = ":()[]"
_U32 = 0xFFFFFFFF



# --- results --------------------------------------------------------------------------------------


def _cpt_text(el: ExprList) -> str:
    s = str(el)
    return s if s.startswith("[") else f"[{s}]"


@dataclass(frozen=True)
class NiSpec:
    """One NI of a net: an interface name (None: "the first one the OS detected") and the
    CPTs it is bound to (None: all)."""

    interface: str | None = None
    cpts: ExprList | None = None


@dataclass(frozen=True)
class NetSpec:
    """One net of a ``networks`` string with its NIs."""

    net: Net
    nis: tuple[NiSpec, ...] = (NiSpec(),)
    cpts: ExprList | None = None  # the net-level [cpts], inherited by NIs that give none

    @property
    def interfaces(self) -> tuple[str, ...]:
        return tuple(ni.interface for ni in self.nis if ni.interface is not None)

    def __str__(self) -> str:
        out = str(self.net)
        named = [ni for ni in self.nis if ni.interface is not None]
        if named:
            parts = []
            for ni in named:
                own = ni.cpts is not None and ni.cpts is not self.cpts and ni.cpts != self.cpts
                parts.append((ni.interface or "") + (_cpt_text(ni.cpts) if own and ni.cpts is not None else ""))
            out += "(" + ",".join(parts) + ")"
        if self.cpts is not None:
            out += _cpt_text(self.cpts)
        return out


def networks_string(specs: Iterable[NetSpec]) -> str:
    """Print specs back as a ``networks=`` string Lustre reads the same way."""
    return ",".join(str(s) for s in specs)


def route_text(route: Route) -> str:
    """A route as a ``routes=`` entry reads: ``net [hops] gateway[:priority]``."""
    hops = "" if route.hops is None else f" {route.hops}"
    prio = f":{route.priority}" if route.priority else ""
    return f"{route.net}{hops} {route.gateway}{prio}"


class RouteList(list):  # type: ignore[type-arg]
    """The routes ``lnet_parse_route`` hands to ``lnet_add_route``, in order (duplicates
    included), plus ``router``: a gateway was one of our own NIDs."""

    def __init__(self) -> None:
        super().__init__()
        self.router = False

    def installable(self, local_nids: Iterable["Nid | str"]) -> tuple[list[Route], list[tuple[Route, str]]]:
        """What ``lnet_add_route`` keeps on a node with these NIDs, and what it drops (with
        why): routes to one of our nets (EEXIST), through a gateway on a net we are not on
        (EHOSTUNREACH), and repeats (EEXIST) -- all tolerated by the ``routes=`` parser."""
        local_nets = {nid_of(n).net for n in local_nids}
        keep: list[Route] = []
        dropped: list[tuple[Route, str]] = []
        for r in self:
            if r.net in local_nets:
                dropped.append((r, f"{r.net} is a local net"))
            elif r.gateway.net not in local_nets:
                dropped.append((r, f"gateway {r.gateway} is not on a local net"))
            elif any(k.net == r.net and k.gateway == r.gateway for k in keep):
                dropped.append((r, "duplicate route"))
            else:
                keep.append(r)
        return keep, dropped


# --- errors -----------------------------------------------------------------------------------------


def _syntax(param: str, text: str, pos: int, width: int, msg: str) -> ConfigError:
    # lnet_syntax() prints the string and a |----| under the bad token; so do we.
    width = max(width, 1)
    token = text[pos : pos + width]
    shown = text.replace("\n", " ").replace("\r", " ").replace("\t", " ")
    pointer = " " * (len(param) + 2 + pos) + "^" + "-" * (width - 1)
    err = ConfigError(f"{msg}: {token!r}\n  {param}=\"{shown}\"\n  {pointer}", where=f"{param} at position {pos}")
    err.position = pos  # type: ignore[attr-defined]
    err.token = token  # type: ignore[attr-defined]
    return err


# --- networks= ------------------------------------------------------------------------------------


class _Buf:
    """A NUL-terminated char buffer mutated the way config.c mutates its token copy, so error
    widths (``strlen`` from the error position) come out as Lustre's do."""

    def __init__(self, text: str) -> None:
        self.c = list(text) + ["\0"]

    def at(self, i: int) -> str:
        return self.c[i]

    def cspn(self, i: int, stop: str) -> int:
        while self.c[i] != "\0" and self.c[i] not in stop:
            i += 1
        return i

    def kill_spaces(self, i: int) -> int:
        while self.c[i] in _ISSPACE and self.c[i] != "\0":
            self.c[i] = "\0"
            i += 1
        return i

    def kill_then_spaces(self, i: int) -> int:
        # do { *str++ = '\0'; } while (isspace(*str));
        self.c[i] = "\0"
        i += 1
        return self.kill_spaces(i)

    def cstr(self, i: int) -> str:
        j = i
        while self.c[j] != "\0":
            j += 1
        return "".join(self.c[i:j])

    def strlen(self, i: int) -> int:
        return len(self.cstr(i))


def _parse_cpts(text: str, cpt_count: int | None, what: str) -> ExprList:
    hi = _U32 if cpt_count is None else cpt_count - 1
    if hi < 0:
        raise NidError("no CPTs")
    el = parse_expr_list(text, 0, hi, whole=what)
    # lnet_ni_alloc: cfs_expr_list_values() must give 1..LNET_CPT_NUMBER values.
    n = el.count()
    if n == 0:
        raise NidError(f"{text} names no CPT")
    if cpt_count is not None and n > cpt_count:
        raise NidError(f"{text} names {n} CPTs, more than the {cpt_count} there are")
    return el


def parse_networks(text: str, *, cpt_count: int | None = None) -> list[NetSpec]:
    """Parse a ``networks=`` string (``lnet_parse_networks``).

    ``cpt_count`` bounds CPT expressions (``LNET_CPT_NUMBER``); None leaves them unbounded.
    ``lo`` entries are accepted and left out (loopback is implicit).  NIs without an
    interface name are returned with ``interface=None``; see :func:`resolve_interfaces`.
    """
    if not isinstance(text, str):
        raise ConfigError(f"networks must be a string, got {text!r}", where="networks")
    if len(text) > LNET_SINGLE_TEXTBUF_NOB:
        raise ConfigError(f"string too long ({len(text)} > {LNET_SINGLE_TEXTBUF_NOB} bytes)", where="networks")
    b = _Buf(text)
    order: list[Net] = []
    nets: dict[Net, tuple[list[NiSpec], ExprList | None]] = {}

    def fail(pos: int, msg: str) -> ConfigError:
        return _syntax("networks", text, pos, b.strlen(pos), msg)

    p = 0
    while True:
        p = b.kill_spaces(p)
        if b.at(p) == "\0":
            break
        name = p
        p = b.cspn(p, _SPACESTR + ":()[],")
        p = b.kill_spaces(p)

        nistr: int | None = None
        if b.at(p) == "(":
            b.c[p] = "\0"
            p += 1
            nistr = p
            p = b.cspn(p, ")")
            if b.at(p) != ")":
                raise fail(nistr, "interface list has no closing ')'")
            p = b.kill_then_spaces(p)

        net_el: ExprList | None = None
        if b.at(p) == "[":
            elstr = p
            p = b.cspn(p, "]")
            if b.at(p) != "]":
                raise fail(elstr, "CPT expression has no closing ']'")
            try:
                net_el = _parse_cpts("".join(b.c[elstr : p + 1]), cpt_count, "".join(b.c[elstr : p + 1]))
            except NidError as e:
                raise fail(elstr, f"bad CPT expression ({e})") from None
            b.c[elstr] = "\0"
            p = b.kill_then_spaces(p)

        if b.at(p) != "\0" and b.at(p) in _DELIMITERS:
            raise fail(p, f"unexpected {b.at(p)!r}")

        # Lustre skips whatever else precedes the next comma.
        p = b.cspn(p, ",")
        if b.at(p) == ",":
            b.c[p] = "\0"
            p += 1

        name_s = b.cstr(name)
        try:
            net = parse_net(name_s)
        except NidError as e:
            raise fail(name, f"unrecognised network type ({e})") from None
        if net.type_code == LOLND:
            continue  # loopback is implicit, and there can be only one

        if net not in nets:
            order.append(net)
            nets[net] = ([], net_el)
        nis, _ = nets[net]
        if nistr is None:
            nis.append(NiSpec(None, net_el))
            continue

        q = nistr
        while True:
            q = b.kill_spaces(q)
            iname = q
            q = b.cspn(q, _SPACESTR + "[],")
            q = b.kill_spaces(q)
            ni_el = net_el
            if b.at(q) == "[":
                elstr = q
                q = b.cspn(q, "]")
                if b.at(q) != "]":
                    raise fail(elstr, "CPT expression has no closing ']'")
                try:
                    ni_el = _parse_cpts("".join(b.c[elstr : q + 1]), cpt_count, "".join(b.c[elstr : q + 1]))
                except NidError as e:
                    raise fail(elstr, f"bad CPT expression ({e})") from None
                b.c[elstr] = "\0"
                q = b.kill_then_spaces(q)
            if b.at(q) == ",":
                q = b.kill_then_spaces(q)
                if b.at(q) == "\0":
                    raise fail(q, "interface list ends with ','")
            elif b.at(q) != "\0":
                raise fail(q, "expected ',' or ')' after interface name")
            iname_s = b.cstr(iname)
            if iname_s == "":
                raise fail(iname, "empty interface name")
            for other in nis:
                if other.interface is not None and other.interface.startswith(iname_s):
                    raise ConfigError(
                        f"interface {iname_s!r} duplicates {other.interface!r} on net {net}"
                        " (Lustre compares the first len(new) characters)",
                        where="networks",
                    )
            nis.append(NiSpec(iname_s, ni_el))
            if b.at(q) == "\0":
                break

    out = []
    for net in order:
        nis, el = nets[net]
        out.append(NetSpec(net, tuple(nis), el))
    return out


# --- interfaces ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostInterface:
    """One interface of the host, as the OS reports it."""

    name: str
    ip: ipaddress.IPv4Address
    up: bool = True


# (name, ipv4) or (name, ipv4, up) as callers write them, or a HostInterface
InterfaceLike = Union[Sequence[object], HostInterface]


def host_interfaces(interfaces: Iterable[InterfaceLike]) -> list[HostInterface]:
    """Validate the ``(name, ipv4[, up])`` list callers pass for the host's interfaces."""
    out: list[HostInterface] = []
    for i, item in enumerate(interfaces):
        if isinstance(item, HostInterface):
            out.append(item)
            continue
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3) or not isinstance(item[0], str):
            raise ConfigError(f"interface #{i} must be (name, ipv4[, up]), got {item!r}", where="interfaces")
        try:
            ip = ipaddress.IPv4Address(item[1] if not isinstance(item[1], str) else item[1].strip())
        except (ValueError, TypeError):
            raise ConfigError(f"interface {item[0]!r} has a bad IPv4 address {item[1]!r}", where="interfaces") from None
        up = _interface_state(item[0], item[2]) if len(item) == 3 else True
        out.append(HostInterface(item[0], ip, up))
    return out


def _interface_state(name: str, state: object) -> bool:
    """The third member of ``(name, ipv4, state)``: a bool, or ``"up"``/``"down"``."""
    if isinstance(state, bool):
        return state
    if isinstance(state, str) and state.strip().lower() in ("up", "down"):
        return state.strip().lower() == "up"
    raise ConfigError(f"interface {name!r}: state must be up/down (or True/False), got {state!r}", where="interfaces")


def system_interfaces() -> list[HostInterface]:
    """This host's IPv4 interfaces in detection (ifindex) order -- the one function here that
    looks at the machine.  Interfaces without an IPv4 address are left out, as LNet does."""
    import fcntl
    import socket
    import struct

    siocgifflags, siocgifaddr, iff_up = 0x8913, 0x8915, 0x1
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _idx, name in sorted(socket.if_nameindex()):
            req = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack_from("H", fcntl.ioctl(s.fileno(), siocgifflags, req), 16)[0]
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, req)
            except OSError:
                continue  # gone, or no IPv4 address
            out.append(HostInterface(name, ipaddress.IPv4Address(raw[20:24]), bool(flags & iff_up)))
    return out


def _default_interface(net: Net, ifaces: list[HostInterface]) -> HostInterface | None:
    # socklnd (and lu2k's IP backends) take the first non-loopback interface that is up;
    # o2iblnd only looks at InfiniBand devices, which we recognise by their "ib" name.
    for h in ifaces:
        if not h.up or h.name == "lo":
            continue
        if net.type == "o2ib" and not h.name.startswith("ib"):
            continue
        return h
    return None


def resolve_interfaces(specs: Iterable[NetSpec], interfaces: Iterable[InterfaceLike]) -> list[NetSpec]:
    """Fill in the interface each NI will really use, as the LNDs do at startup.

    An NI without a name takes the first suitable interface in detection order; a named
    interface must exist.  Numeric-address nets (gni, kfi, ptlf) have no IP interface and are
    left alone.  Two NIs of one net that land on the same interface are one NI.
    """
    ifaces = host_interfaces(interfaces)
    by_name = {h.name: h for h in ifaces}
    errors: list[str] = []
    out = []
    for spec in specs:
        if spec.net.info.addr != ADDR_IP:
            out.append(spec)
            continue
        nis = []
        seen: set[str] = set()
        for ni in spec.nis:
            name = ni.interface
            if name is None:
                h = _default_interface(spec.net, ifaces)
                if h is None:
                    errors.append(f"net {spec.net}: no interface given and none detected to default to")
                    continue
                name = h.name
            elif name not in by_name:
                errors.append(f"net {spec.net}: interface {name!r} does not exist on this host")
                continue
            elif not by_name[name].up:
                # lnet_inet_enumerate skips interfaces that are not IFF_UP, so the LND's
                # lnet_inet_select fails: "failed to find UP interface <name>".
                errors.append(f"net {spec.net}: interface {name!r} is down (LNet uses only UP interfaces)")
                continue
            if name in seen:
                continue  # the same NI reached twice (e.g. two interface-less entries)
            seen.add(name)
            nis.append(NiSpec(name, ni.cpts))
        out.append(NetSpec(spec.net, tuple(nis), spec.cpts))
    if errors:
        raise ConfigError(f"{len(errors)} interface error(s)", where="interfaces", errors=errors)
    return out


def ni_nids(spec: NetSpec, interfaces: Iterable[InterfaceLike]) -> list[Nid]:
    """The NIDs a resolved spec's NIs get: each interface's IPv4 address on the net."""
    by_name = {h.name: h for h in host_interfaces(interfaces)}
    out = []
    for ni in spec.nis:
        if ni.interface is None or ni.interface not in by_name:
            raise ConfigError(f"net {spec.net}: NI interface {ni.interface!r} not resolved", where="interfaces")
        out.append(Nid(by_name[ni.interface].ip, spec.net))
    return out


# --- text buffers (ip2nets=, routes=) ----------------------------------------------------------------


def _split_commands(text: str, param: str) -> list[tuple[str, int]]:
    """``lnet_str2tbs_sep``: commands split at ``;``, CR, LF; ``#`` comments to the separator;
    leading whitespace skipped, inner whitespace turned into spaces.  Returns (command,
    offset of the command in ``text``)."""
    out: list[tuple[str, int]] = []
    total = 0
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _ISSPACE:
            i += 1
        j = i
        while j < n and text[j] not in "\n\r;#":
            j += 1
        if j > i:
            cmd = "".join(" " if c in _ISSPACE else c for c in text[i:j])
            size = _TEXTBUF_HDR + len(cmd) + 1
            if size > LNET_SINGLE_TEXTBUF_NOB:
                raise _syntax(param, text, i, j - i, "command too long for Lustre's text buffer")
            total += size
            if total > LNET_MAX_TEXTBUF_NOB:
                raise _syntax(param, text, i, j - i, "too many commands for Lustre's text buffers")
            out.append((cmd, i))
        if j < n and text[j] == "#":
            while j < n and text[j] not in "\n\r;":
                j += 1
        if j >= n:
            break
        i = j + 1
    return out


def _tokens(cmd: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    i, n = 0, len(cmd)
    while True:
        while i < n and cmd[i] in _ISSPACE:
            i += 1
        if i >= n:
            return out
        j = i
        while j < n and cmd[j] not in _ISSPACE:
            j += 1
        out.append((i, cmd[i:j]))
        i = j


# --- ip2nets= -----------------------------------------------------------------------------------


def parse_ip_pattern(text: str) -> tuple[ExprList, ...]:
    """``cfs_ip_addr_parse``: four ``.``-separated octet expressions (``192.168.[1-3].*``)."""
    parts = strim(text).split(".")
    octets = []
    for p in parts:
        p = strim(p)
        if not p:
            raise NidError(f"empty octet in IP pattern {text!r}")
        octets.append(parse_expr_list(p, 0, 255, whole=text))
    if len(octets) != 4:
        raise NidError(f"IP pattern {text!r} does not have 4 octets")
    return tuple(octets)


def ip_pattern_match(octets: Sequence[ExprList], ip: ipaddress.IPv4Address) -> bool:
    v = int(ip)
    return all(el.match((v >> (8 * (3 - k))) & 0xFF) for k, el in enumerate(octets))


def _netspec_net(piece: str) -> Net:
    return parse_net(piece.split("(", 1)[0])


def _splitnets(source: str, spec: str, base: int) -> list[tuple[str, Net]]:
    """``lnet_splitnets``: split a rule's networks spec (at ``source[base:]``) at commas
    outside ``(…)``."""
    out: list[tuple[str, Net]] = []
    offset = base
    text = spec
    while True:
        sep = text.find(",")
        br = text.find("(")
        if sep >= 0 and 0 <= br < sep:
            close = text.find(")", br + 1)
            if close < 0 or not (close + 1 == len(text) or text[close + 1] == ","):
                raise _syntax("ip2nets", source, offset + br, len(text) - br, "bad interface list")
            sep = -1 if close + 1 == len(text) else close + 1
        piece, rest = (text[:sep], text[sep + 1 :]) if sep >= 0 else (text, None)
        try:
            net = _netspec_net(piece)
        except NidError as e:
            raise _syntax("ip2nets", source, offset, len(piece), f"bad network ({e})") from None
        if any(net == other for _, other in out):
            raise _syntax("ip2nets", source, offset, len(piece), f"duplicate network {net}")
        out.append((piece, net))
        if rest is None:
            return out
        offset += sep + 1
        text = rest


def ip2nets_networks(text: str, interfaces: Iterable[InterfaceLike]) -> str:
    """The ``networks`` string an ``ip2nets=`` string selects on this host
    (``lnet_match_networks``)."""
    if not isinstance(text, str):
        raise ConfigError(f"ip2nets must be a string, got {text!r}", where="ip2nets")
    ifaces = host_interfaces(interfaces)
    ipaddrs = [h.ip for h in ifaces if h.name != "lo" and h.up]
    if not ipaddrs:
        raise ConfigError("no local IP interfaces for ip2nets to match", where="ip2nets")
    chosen: list[str] = []
    length = 0
    for cmd, base in _split_commands(text, "ip2nets"):
        toks = _tokens(cmd)
        if len(cmd) >= LNET_SINGLE_TEXTBUF_NOB:
            raise _syntax("ip2nets", text, base, len(cmd), "rule too long")
        hit = False
        for pos, tok in toks[1:]:
            try:
                octets = parse_ip_pattern(tok)
            except NidError as e:
                raise _syntax("ip2nets", text, base + pos, len(tok), f"bad IP pattern ({e})") from None
            hit = hit or any(ip_pattern_match(octets, ip) for ip in ipaddrs)
        if not hit:
            continue
        npos, ntok = toks[0]
        current = _splitnets(text, ntok, base + npos)
        for piece, _net in current:
            length += len(piece) + (1 if chosen else 0)
            chosen.append(piece)
            if length >= LNET_SINGLE_TEXTBUF_NOB:
                raise ConfigError("too many matched networks", where="ip2nets")
    if not chosen:
        raise ConfigError("ip2nets does not match any local IP interfaces", where="ip2nets")
    return ",".join(chosen)


def check_ip2nets(text: str) -> None:
    """Check an ``ip2nets=`` string without a host: every rule's patterns parse (Lustre reads
    all of them whatever matches) and every rule's networks spec splits."""
    if not isinstance(text, str):
        raise ConfigError(f"ip2nets must be a string, got {text!r}", where="ip2nets")
    for cmd, base in _split_commands(text, "ip2nets"):
        toks = _tokens(cmd)
        for pos, tok in toks[1:]:
            try:
                parse_ip_pattern(tok)
            except NidError as e:
                raise _syntax("ip2nets", text, base + pos, len(tok), f"bad IP pattern ({e})") from None
        _splitnets(text, toks[0][1], base + toks[0][0])


def ip2nets(text: str, interfaces: Iterable[InterfaceLike], *, cpt_count: int | None = None) -> list[NetSpec]:
    """Apply an ``ip2nets=`` string to a host whose interfaces are ``interfaces`` (ordered
    ``(name, ipv4)``; ``lo`` never matches).  Each returned spec names the interface each NI
    will actually use."""
    ifaces = host_interfaces(interfaces)
    networks = ip2nets_networks(text, ifaces)
    specs = parse_networks(networks, cpt_count=cpt_count)
    return resolve_interfaces(specs, ifaces)


# --- lnetctl ip2nets rules -------------------------------------------------------------------------


@dataclass(frozen=True)
class Ip2NetsRule:
    """One lnetctl YAML ``ip2nets:`` entry: ``net-spec``, ``interfaces``, ``ip-range``."""

    net: Net
    interfaces: tuple[NiSpec, ...] = ()
    ip_ranges: tuple[tuple[ExprList, ...], ...] = ()
    range_texts: tuple[str, ...] = field(default=(), compare=False)

    def __str__(self) -> str:
        ifs = ",".join((ni.interface or "") + (_cpt_text(ni.cpts) if ni.cpts else "") for ni in self.interfaces)
        head = f"{self.net}({ifs})" if ifs else str(self.net)
        return " ".join([head, *self.range_texts])


def parse_interface_item(text: str) -> NiSpec:
    """``<name>['['<cpts>']']`` as lnetctl's ``lustre_lnet_add_intf_descr`` reads it."""
    if not isinstance(text, str) or text == "":
        raise NidError(f"bad interface {text!r}")
    if len(text) >= 128:
        raise NidError(f"interface {text[:20]!r}… too long")
    ob = text.find("[")
    if ob < 0:
        return NiSpec(text, None)
    if text.find("]") < 0:
        raise NidError(f"interface {text!r}: '[' without ']'")
    el = parse_expr_list(text[ob:], 0, _U32, whole=text)
    if ob == 0:
        raise NidError(f"interface {text!r} has no name")
    return NiSpec(text[:ob], el)


def ip2nets_rules(rules: Sequence[Ip2NetsRule], interfaces: Iterable[InterfaceLike]) -> tuple[list[NetSpec], list[str]]:
    """Apply lnetctl ``ip2nets:`` rules.  Returns (specs, notes on skipped rules); raises
    ConfigError listing why each rule was skipped when none applied."""
    ifaces = host_interfaces(interfaces)
    notes: list[str] = []
    order: list[Net] = []
    acc: dict[Net, list[NiSpec]] = {}
    errors: list[str] = []
    for idx, rule in enumerate(rules):
        tag = f"ip2nets[{idx}] ({rule})"
        chosen: list[NiSpec] = []
        if not rule.interfaces and not rule.ip_ranges:
            h = next((h for h in ifaces if h.up and h.name != "lo"), None)
            if h is not None:
                chosen.append(NiSpec(h.name, None))
        elif not rule.interfaces:
            for h in ifaces:
                if h.up and any(ip_pattern_match(r, h.ip) for r in rule.ip_ranges):
                    if all(c.interface != h.name for c in chosen):
                        chosen.append(NiSpec(h.name, None))
        else:
            for ni in rule.interfaces:
                h = next((h for h in ifaces if h.name == ni.interface), None)
                if h is None:
                    notes.append(f"{tag}: interface {ni.interface!r} does not exist")
                    continue
                if not h.up:
                    notes.append(f"{tag}: interface {ni.interface!r} is down")
                    continue
                if rule.ip_ranges and not any(ip_pattern_match(r, h.ip) for r in rule.ip_ranges):
                    notes.append(f"{tag}: {ni.interface} address {h.ip} matches none of the ranges")
                    continue
                chosen.append(ni)
        if not chosen:
            notes.append(f"{tag}: no interface matches, rule skipped")
            continue
        if rule.net not in acc:
            order.append(rule.net)
            acc[rule.net] = []
        for ni in chosen:
            if any(o.interface == ni.interface for o in acc[rule.net]):
                errors.append(f"{tag}: interface {ni.interface} already configured on net {rule.net}")
            else:
                acc[rule.net].append(ni)
    if errors:
        raise ConfigError(f"{len(errors)} ip2nets error(s)", where="ip2nets", errors=errors)
    if not order:
        raise ConfigError("no rules applied", where="ip2nets", errors=notes or ["no rules given"])
    return [NetSpec(n, tuple(acc[n])) for n in order], notes


# --- routes= ----------------------------------------------------------------------------------------


def _scan_range(s: str, i: int) -> tuple[int, int, int, int] | None:
    """``sscanf(s, "%d-%d/%d%n")`` falling back to ``"%d-%d%n"``: (lo, hi, stride, end)."""
    a = scan_int(s, i, signed=True)
    if a is None or s[a[1] : a[1] + 1] != "-":
        return None
    b = scan_int(s, a[1] + 1, signed=True)
    if b is None:
        return None
    if s[b[1] : b[1] + 1] == "/":
        c = scan_int(s, b[1] + 1, signed=True)
        if c is not None:
            return a[0], b[0], c[0], c[1]
    return a[0], b[0], 1, b[1]


class _ExpandError(Exception):
    pass


def expand_brackets(text: str, *, budget: list[int] | None = None) -> list[str]:
    """``lnet_str2tbs_expand`` applied until nothing is left to expand: the first ``[…]`` is
    replaced by each item (``a-b``, ``a-b/s`` ranges, or literal text), then the rest."""
    budget = budget if budget is not None else [LNET_MAX_TEXTBUF_NOB]
    lb = text.find("[")
    if lb < 0:
        return [text]
    rb = text.find("]", lb)
    if rb < 0:
        raise _ExpandError("'[' without ']'")
    items: list[str] = []
    parsed = lb
    while parsed < rb:
        parsed += 1
        end = parsed
        while end < rb and text[end] != ",":
            end += 1
        if end == parsed:
            raise _ExpandError("empty item in [...]")
        r = _scan_range(text, parsed)
        if r is None:
            items.append(text[parsed:end])
        else:
            lo, hi, stride, stop = r
            if stop != end:
                raise _ExpandError(f"junk after range {text[parsed:end]!r}")
            if hi < 0 or lo < 0 or stride < 0 or hi < lo:
                raise _ExpandError(f"bad range {text[parsed:end]!r}")
            if stride == 0:
                raise _ExpandError(f"zero stride in {text[parsed:end]!r}")
            if (hi - lo) % stride != 0:
                raise _ExpandError(f"range {text[parsed:end]!r} does not end on a step")
            items.extend(str(v) for v in range(lo, hi + 1, stride))
        parsed = end
    out: list[str] = []
    for item in items:
        new = text[:lb] + item + text[rb + 1 :]
        budget[0] -= _TEXTBUF_HDR + len(new) + 1
        if budget[0] < 0 or _TEXTBUF_HDR + len(new) + 1 > LNET_SINGLE_TEXTBUF_NOB:
            raise _ExpandError("expands to more text than Lustre's buffers hold")
        out.extend(expand_brackets(new, budget=budget))
    return out


def _parse_hops(tok: str) -> int | None:
    v = scan_u_exact(tok)
    return v if v is not None and 0 < v < 256 else None


def parse_routes(text: str, local_nids: Iterable["Nid | str"] | None = None) -> RouteList:
    """Parse a ``routes=`` string (``lnet_parse_routes``).

    ``local_nids`` are this node's NIDs: a gateway among them makes the node a router
    (``result.router``) instead of adding a route (``lnet_islocalnid``).  The result is every
    route the parser hands to ``lnet_add_route``; :meth:`RouteList.installable` applies
    what ``lnet_add_route`` itself checks.
    """
    if not isinstance(text, str):
        raise ConfigError(f"routes must be a string, got {text!r}", where="routes")
    local = [] if local_nids is None else [nid_of(n) for n in local_nids]
    result = RouteList()
    for cmd, base in _split_commands(text, "routes"):
        toks = _tokens(cmd)
        nets: list[Net] = []
        gateways: list[Nid] = []
        hops: int | None = None
        got_hops = False
        priority = 0
        budget = [LNET_MAX_TEXTBUF_NOB]
        for idx, (pos, tok) in enumerate(toks):
            if idx == 1 and (h := _parse_hops(tok)) is not None:
                hops, got_hops = h, True
                continue
            try:
                texts = expand_brackets(tok, budget=budget)
            except _ExpandError as e:
                raise _syntax("routes", text, base + pos, len(tok), str(e)) from None
            for item in texts:
                if idx == 0:
                    try:
                        net = parse_net(item)
                    except NidError as e:
                        raise _syntax("routes", text, base + pos, len(tok), f"bad net {item!r} ({e})") from None
                    if net.type_code == LOLND:
                        raise _syntax("routes", text, base + pos, len(tok), "no routes to 'lo'")
                    nets.append(net)
                    continue
                colon = item.find(":")
                gw_text = item
                if colon >= 0:
                    prio = scan_u_exact(item[colon + 1 :])
                    if prio is None:
                        # Lustre points at the priority, offset by its place in the expanded text.
                        raise _syntax(
                            "routes", text, base + pos + colon + 1, len(item) - colon - 1, "bad gateway priority"
                        )
                    priority = prio
                    gw_text = item[:colon]
                else:
                    priority = 0
                try:
                    gw = parse_nid(gw_text)
                except NidError as e:
                    raise _syntax("routes", text, base + pos, len(tok), f"bad gateway {gw_text!r} ({e})") from None
                if gw.net.type_code == LOLND:
                    raise _syntax("routes", text, base + pos, len(tok), "a gateway cannot be on 'lo'")
                gateways.append(gw)
        if len(toks) < (3 if got_hops else 2):
            pos, tok = toks[-1]
            raise _syntax("routes", text, base + pos, len(tok), "a route needs a net and at least one gateway")
        for net in nets:
            for gw in gateways:
                if gw in local:
                    result.router = True
                    continue
                if gw.net == net:
                    # lnet_add_route: "LNET_NID_NET(gateway) == net" is -EINVAL, which
                    # lnet_parse_route does not tolerate ("Can't create route to ... via ...").
                    raise ConfigError(f"Can't create route to {net} via {gw}: the gateway is on the net it routes to", where="routes")
                result.append(Route(net, gw, hops, priority))
    return result


__all__ = [
    "HostInterface",
    "Ip2NetsRule",
    "NetSpec",
    "NiSpec",
    "Route",
    "RouteList",
    "route_text",
    "check_ip2nets",
    "expand_brackets",
    "host_interfaces",
    "ip2nets",
    "ip2nets_networks",
    "ip2nets_rules",
    "ip_pattern_match",
    "networks_string",
    "ni_nids",
    "parse_interface_item",
    "parse_ip_pattern",
    "parse_networks",
    "parse_routes",
    "resolve_interfaces",
    "system_interfaces",
]
