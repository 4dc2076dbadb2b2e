"""What an LNet router answers for its own NIDs: pings and discovery pushes.  Pure.

Kernel LNet believes in a gateway through its ping reply (``router.c``
``lnet_router_discovery_ping_reply``, ``lnet_is_route_alive``):

* the reply must not carry ``LNET_PING_FEAT_RTE_DISABLED``, or every route through the
  gateway is marked down;
* a route to net N stays up only if the reply lists an NI on N with status
  ``LNET_NI_STATUS_UP`` (``avoid_asym_router_failure``, on by default, for single-hop routes,
  and a route whose remote net appears in the reply is single-hop).

So lu2kd answers a ping GET (portal 0, match bits ``LNET_PROTO_PING_MATCHBITS``) with an
``lnet_ping_info`` listing 0@lo (its status word is the sequence number, bumped on every
change), its own NID on the LAN, and for every net it reaches over the lu2k hop one NID on
that net whose status says whether the hop is up.  When the satellite hop is down those
entries say DOWN, which is what a kernel router with a dead remote NI reports: the nodes stop
routing through this gateway and use another of equal priority if they have one.

A discovery push (a PUT of the node's own ping info to the same portal and match bits) is
accepted and ACKed when the sender asked for an ACK.  Anything else addressed to lu2kd
itself is dropped with a reason, as ``lnet_parse`` drops a message that matches no ME.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FrameError
from . import idl
from .idl import LnetMsgType
from .proto import LnetHdr, PingInfo


@dataclass(frozen=True)
class Answer:
    """The outcome of one message for us: what to send back (if anything) and a log note."""

    reply: tuple[bytes, bytes] | None  # (packed LNet header, payload) for the sender
    note: str
    pushed: PingInfo | None = None  # the ping info a discovery push carried


class RouterResponder:
    def __init__(self, *, pid: int = idl.LNET_PID_LUSTRE, discovery: bool = True) -> None:
        self.pid = pid
        self.discovery = discovery
        self.seqno = 0
        self._last: tuple[tuple[int, int], ...] | None = None

    def features(self) -> int:
        f = idl.PING_FEAT_NI_STATUS | idl.PING_FEAT_MULTI_RAIL
        if self.discovery:
            f |= idl.PING_FEAT_DISCOVERY
        return f  # never RTE_DISABLED: we route

    def ping_info(self, nis: list[tuple[int, bool]]) -> PingInfo:
        """Our ping info for ``(nid4, up)`` entries; the sequence number moves when they change."""
        entries = tuple((nid, idl.LNET_NI_STATUS_UP if up else idl.LNET_NI_STATUS_DOWN) for nid, up in nis)
        if entries != self._last:
            self._last = entries
            self.seqno = (self.seqno + 1) & 0xFFFFFFFF or 1
        return PingInfo(self.features(), [(idl.LNET_NID_LO_0, self.seqno), *entries], self.pid)

    def handle(self, hdr: LnetHdr, payload: bytes | bytearray, nis: list[tuple[int, bool]]) -> Answer:
        """Answer one message whose destination is one of our NIDs."""
        is_ping_me = hdr.ptl_index == idl.LNET_RESERVED_PORTAL and hdr.match_bits == idl.LNET_PROTO_PING_MATCHBITS
        if hdr.type is LnetMsgType.GET and is_ping_me:
            info = self.ping_info(nis).pack()
            start = min(hdr.offset, len(info))
            data = info[start : start + hdr.sink_length]
            reply = LnetHdr(LnetMsgType.REPLY, dest_nid=hdr.src_nid, src_nid=hdr.dest_nid, dest_pid=hdr.src_pid,
                            src_pid=self.pid, payload_length=len(data), wmd=hdr.wmd)
            return Answer((reply.pack(), data), f"ping from {idl.nid4_str(hdr.src_nid)}: {len(nis)} NIs, {len(data)} bytes")
        if hdr.type is LnetMsgType.PUT and is_ping_me:
            try:
                pushed: PingInfo | None = PingInfo.unpack(payload)
                note = f"discovery push from {idl.nid4_str(hdr.src_nid)} ({len(pushed.nis) - 1 if pushed else 0} NIs)"
            except FrameError as e:
                pushed, note = None, f"discovery push from {idl.nid4_str(hdr.src_nid)} with unusable ping info ({e})"
            if hdr.wmd[0] == idl.LNET_WIRE_HANDLE_COOKIE_NONE:
                return Answer(None, note, pushed)
            ack = LnetHdr(LnetMsgType.ACK, dest_nid=hdr.src_nid, src_nid=hdr.dest_nid, dest_pid=hdr.src_pid,
                          src_pid=self.pid, wmd=hdr.wmd, match_bits=hdr.match_bits, mlength=len(payload))
            return Answer((ack.pack(), b""), note, pushed)
        where = f" portal {hdr.ptl_index} match bits {hdr.match_bits:#x}" if hdr.type in (LnetMsgType.PUT, LnetMsgType.GET) else ""
        return Answer(None, f"dropped {hdr.describe()}{where}: lu2kd has no LNet receiver for it")
