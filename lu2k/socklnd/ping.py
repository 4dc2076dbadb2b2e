"""lu2kd pinging a node on its LAN, as LNet's ``lnet_ping`` does.  Pure.

An LNet ping is a GET to portal 0 (``LNET_RESERVED_PORTAL``) with match bits
``LNET_PROTO_PING_MATCHBITS``.  Its ``return_wmd`` names the memory descriptor the answer
goes to and ``sink_length`` how much fits there (``lnet_ping`` binds an MD of at most
``LNET_PING_BUFFER_MAX`` bytes).  The node's LNet matches the GET against its ping target and
answers with a REPLY to that wmd carrying its ``lnet_ping_info``: 0@lo, whose status word is
the node's sequence number, then each NI with status UP or DOWN, and feature bits (Multi-Rail,
discovery ...).  A node whose ping target does not match drops the GET without a word
(lib-move.c ``lnet_parse_get``), so a missing answer is only ever a timeout.

:class:`LanPinger` builds the GET with a fresh cookie and matches what comes back for
lu2kd's own NID as ``lnet_parse_reply`` looks up the wmd (``lnet_wire_handle2md``): the
interface cookie must be this pinger's, the object cookie one of an outstanding ping.  A
REPLY for anything else is dropped with a reason; a REPLY whose ping info does not decode
ends its ping with an error naming what was wrong (``lnet_ping``'s ``-EPROTO`` cases).
Callers pass ``now`` (for the round trip time) and own the timer: :meth:`LanPinger.forget`
a ping that timed out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FrameError, Lu2kError
from . import idl
from .idl import LnetMsgType
from .proto import LnetHdr, PingInfo

FEATURE_NAMES = {
    idl.PING_FEAT_BASE: "base", idl.PING_FEAT_NI_STATUS: "ni_status", idl.PING_FEAT_RTE_DISABLED: "rte_disabled",
    idl.PING_FEAT_MULTI_RAIL: "multi_rail", idl.PING_FEAT_DISCOVERY: "discovery", idl.PING_FEAT_LARGE_ADDR: "large_addr",
    idl.PING_FEAT_PRIMARY_LARGE: "primary_large", idl.PING_FEAT_METADATA: "metadata",
}


def feature_names(features: int) -> list[str]:
    """``LNET_PING_FEAT_*`` bits as names; bits LNet does not define show as hex."""
    names = [name for bit, name in FEATURE_NAMES.items() if features & bit]
    unknown = features & ~idl.PING_FEAT_BITS
    return names + ([f"{unknown:#x}"] if unknown else [])


def ni_status_name(status: int) -> str:
    """An NI status word as ``lnetctl`` words it: up, down, or the raw value."""
    if status == idl.LNET_NI_STATUS_UP:
        return "up"
    if status == idl.LNET_NI_STATUS_DOWN:
        return "down"
    if status == idl.LNET_NI_STATUS_INVALID:
        return "invalid"
    return f"{status:#010x}"


@dataclass(frozen=True)
class PingReply:
    """A node's answer to one ping."""

    nid: int  # the nid4 we pinged
    info: PingInfo
    rtt: float  # seconds from the GET handed over to the REPLY read
    local: bool = False  # one of our own NIDs: answered from our own ping info, nothing sent

    @property
    def nis(self) -> list[tuple[int, int]]:
        """The node's NIs with their status words, without 0@lo."""
        return self.info.nis[1:]

    @property
    def seqno(self) -> int:
        return self.info.nis[0][1]  # 0@lo's status word carries the ping target's sequence number

    @property
    def primary_nid(self) -> int:
        """The node's primary NID as LNet's discovery takes it (``find_primary``: the first NI)."""
        return self.nis[0][0] if self.nis else self.nid

    @property
    def multi_rail(self) -> bool:
        return bool(self.info.features & idl.PING_FEAT_MULTI_RAIL)

    @property
    def discovery(self) -> bool:
        return bool(self.info.features & idl.PING_FEAT_DISCOVERY)

    def describe(self) -> dict[str, Any]:
        """The control answer: the same keys as the engine's ping, plus the NIs' status and features."""
        nis = [(idl.nid4_str(n), ni_status_name(s)) for n, s in self.nis]
        out: dict[str, Any] = {
            "nid": idl.nid4_str(self.nid), "primary_nid": idl.nid4_str(self.primary_nid), "rtt_ms": round(self.rtt * 1000, 3),
            "peer_nis": [n for n, _ in nis], "peer_ni_status": dict(nis), "multi_rail": self.multi_rail,
            "discovery": self.discovery, "features": feature_names(self.info.features), "seqno": self.seqno, "pid": self.info.pid,
        }
        if self.local:
            out["local"] = True
        return out


@dataclass(frozen=True)
class PingDone:
    """One outstanding ping ended: ``reply`` or ``error`` (never both)."""

    cookie: int
    nid: int
    reply: PingReply | None = None
    error: Lu2kError | None = None  # FrameError for a REPLY that does not decode; what the caller gave to fail()


@dataclass(frozen=True)
class Dropped:
    """A message for us that ends no ping, and why."""

    note: str


@dataclass(frozen=True)
class _Pending:
    nid: int
    sent: float


class LanPinger:
    """Outstanding pings from one NID of ours, keyed by the wmd object cookie of their GET."""

    def __init__(self, local_nid: int, interface_cookie: int, *, pid: int = idl.LNET_PID_LUSTRE,
                 sink_length: int = idl.LNET_PING_BUFFER_MAX, max_nis: int = idl.LNET_INTERFACES_MAX_DEFAULT) -> None:
        self.local_nid = local_nid
        self.interface_cookie = interface_cookie & 0xFFFFFFFFFFFFFFFF
        self.pid = pid
        self.sink_length = sink_length
        self.max_nis = max_nis
        self.pending: dict[int, _Pending] = {}
        self._next_cookie = 1

    def start(self, nid: int, now: float) -> tuple[int, bytes]:
        """A ping of ``nid``: its cookie and the packed LNet header of the GET (no payload)."""
        cookie = self._next_cookie
        self._next_cookie = (self._next_cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        self.pending[cookie] = _Pending(nid, now)
        get = LnetHdr(LnetMsgType.GET, dest_nid=nid, src_nid=self.local_nid, dest_pid=idl.LNET_PID_LUSTRE, src_pid=self.pid,
                      wmd=(self.interface_cookie, cookie), match_bits=idl.LNET_PROTO_PING_MATCHBITS,
                      ptl_index=idl.LNET_RESERVED_PORTAL, offset=0, sink_length=self.sink_length)
        return cookie, get.pack()

    def handle(self, hdr: LnetHdr, payload: bytes | bytearray | memoryview, now: float) -> PingDone | Dropped:
        """A REPLY addressed to us: the end of one of our pings, or dropped with the reason."""
        who = idl.nid4_str(hdr.src_nid)
        if hdr.type is not LnetMsgType.REPLY:
            return Dropped(f"{hdr.describe()}: lu2kd only ever waits for ping REPLYs")
        iface, cookie = hdr.wmd
        pending = self.pending.get(cookie) if iface == self.interface_cookie else None
        if pending is None:
            return Dropped(f"REPLY from {who} for wmd {iface:#x}:{cookie:#x}, which is no ping of ours (late, or never sent)")
        del self.pending[cookie]
        data = bytes(payload[: self.sink_length])  # LNET_MD_TRUNCATE: what does not fit the MD is not read
        try:
            info = PingInfo.unpack(data, self.max_nis)
        except FrameError as e:
            return PingDone(cookie, pending.nid, error=FrameError(f"{who} answered the ping with unusable ping info: {e}"))
        return PingDone(cookie, pending.nid, reply=PingReply(pending.nid, info, max(0.0, now - pending.sent)))

    def fail(self, cookie: int, error: Lu2kError) -> PingDone | None:
        """The GET could not be sent: the ping ends with ``error`` (None if it already ended)."""
        pending = self.pending.pop(cookie, None)
        if pending is None:
            return None
        return PingDone(cookie, pending.nid, error=error)

    def forget(self, cookie: int) -> None:
        """Stop waiting for a ping (it timed out); a REPLY arriving later is dropped."""
        self.pending.pop(cookie, None)


__all__ = ["Dropped", "LanPinger", "PingDone", "PingReply", "feature_names", "ni_status_name"]
