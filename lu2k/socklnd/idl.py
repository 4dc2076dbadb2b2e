"""The wire structs of LNet's acceptor, ksocklnd and the LNet header, one per struct.  Pure.

Everything here is read from Lustre's headers (``include/uapi/linux/lnet/lnet-idl.h``,
``lnet-types.h``, ``socklnd.h``, ``lnet/klnds/socklnd/socklnd-idl.h``) at commit c881f8eb;
the field comments repeat theirs.  Byte order is the subtle part:

* the acceptor connection request, the socklnd hello, the ksock message header and the
  LNet ping info are written in the *sender's* byte order; the receiver recognises a
  byte-swapped magic and swaps every field (``ksnc_flip``, ``__swab32s``).  We always send
  little-endian (every Linux host Lustre supports is) and read either order;
* the LNet message header (``struct lnet_hdr_nid4``) is always little-endian
  (``lnet_hdr_to_nid4`` uses ``cpu_to_le*``), and so are the fields of its message union.

A classic NID (``lnet_nid_t``) is a u64: ``(LNET_MKNET(type, num) << 32) | addr`` with
an IPv4 address in host order.  :func:`nid4_of` / :func:`nid_of4` convert to lu2k's
:class:`~lu2k.nid.Nid`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct

from ..errors import NidError
from ..nid import ADDR_IP, Net, Nid

# --- magics and versions (lnet-idl.h) --------------------------------------------------------
LNET_PROTO_ACCEPTOR_MAGIC = 0xACCE7100  # first word of a connection request to port 988
LNET_PROTO_ACCEPTOR_VERSION = 1  # connreq carries a nid4
LNET_PROTO_ACCEPTOR_VERSION_16 = 2  # connreq carries a struct lnet_nid (large NIDs)
LNET_PROTO_MAGIC = 0x45726963  # socklnd hello V2+ ("Eric")
LNET_PROTO_TCP_MAGIC = 0xEEBC0DED  # socklnd hello V1 (an lnet_hdr in disguise; not spoken)
LNET_PROTO_PING_MAGIC = 0x70696E67  # 'ping': first word of struct lnet_ping_info

KSOCK_PROTO_V1 = 1  # socklnd.h: bare LNet headers, no ksock_msg (not supported here)
KSOCK_PROTO_V2 = 2  # ksock_msg framing, checksums over header + payload
KSOCK_PROTO_V3 = 3  # V2 + typed connections only (no ANY), the kernel's default for IPv4
KSOCK_PROTO_V4 = 4  # V3 with 16-byte NIDs, used by the kernel for IPv6 peers only
SUPPORTED_VERSIONS = (KSOCK_PROTO_V2, KSOCK_PROTO_V3)

# --- ports (lib-lnet.h) ------------------------------------------------------------------------
LNET_ACCEPTOR_PORT = 988  # acceptor.c accept_port
LNET_ACCEPTOR_MIN_RESERVED_PORT = 512  # lnet_connect binds downwards from MAX to MIN
LNET_ACCEPTOR_MAX_RESERVED_PORT = 1023  # secure accept refuses source ports above this

# --- process ids and portals (lnet-types.h, lib-types.h) -------------------------------------------
LNET_PID_LUSTRE = 12345  # the_lnet.ln_pid of every kernel LNet
LNET_PID_USERFLAG = 0x80000000  # set in pids of user-space peers (source port > 1023)
LNET_PID_ANY = 0xFFFFFFFF
LNET_RESERVED_PORTAL = 0  # ping GETs and discovery PUSHes go here
LNET_PROTO_PING_MATCHBITS = 0x8000000000000000  # ... with these match bits
LNET_WIRE_HANDLE_COOKIE_NONE = 0xFFFFFFFFFFFFFFFF  # "no ACK wanted" in a PUT's ack_wmd
LNET_MTU = 1 << 20  # LNET_MAX_PAYLOAD: the largest payload an LNet message may carry
LNET_INTERFACES_NUM = 16  # most IPs a V2/V3 hello may list (kshm_nips)
LNET_INTERFACES_MAX_DEFAULT = 200  # lnet_interfaces_max: most NIs in a ping reply
LNET_PING_BUFFER_MAX = 3960  # api-ni.c: the most ping info bytes lnet_ping asks for (its GET's sink length cap)

# --- LNet net types needed here (nidstrings.h) --------------------------------------------------------
LOLND = 9
LNET_NID_LO_0 = (LOLND << 16) << 32  # 0@lo: first entry of every ping info
LNET_NID_ANY = 0xFFFFFFFFFFFFFFFF


class ConnType(enum.IntEnum):
    """``SOCKLND_CONN_*``: what a connection carries, from its opener's point of view."""

    NONE = -1  # only in a hello refusing a connection (lost race, protocol retry)
    ANY = 0  # everything (V2); the kernel never sends on it with V3
    CONTROL = 1  # small messages (< min_bulk bytes)
    BULK_IN = 2  # bulk towards the opener, and the sink's ZC-ACKs (SOCKLND_CONN_ACK)
    BULK_OUT = 3  # bulk from the opener

    def inverted(self) -> "ConnType":
        """The same connection seen from the other end (``ksocknal_invert_type``)."""
        return {ConnType.BULK_IN: ConnType.BULK_OUT, ConnType.BULK_OUT: ConnType.BULK_IN}.get(self, self)


V3_CONN_TYPES = (ConnType.CONTROL, ConnType.BULK_IN, ConnType.BULK_OUT)


class KsockMsgType(enum.IntEnum):
    NOOP = 0xC0  # empty: keepalive or a bare ZC-ACK
    LNET = 0xC1  # an LNet header and its payload follow


SOCKNAL_KEEPALIVE_PING = 1  # ZC-ACK cookie of a keepalive NOOP (socklnd.h)


class LnetMsgType(enum.IntEnum):
    """``enum lnet_msg_type``."""

    ACK = 0
    PUT = 1
    GET = 2
    REPLY = 3
    HELLO = 4


# Ping info feature bits (LNET_PING_FEAT_*) and NI status words.
PING_FEAT_BASE = 1 << 0  # just a ping
PING_FEAT_NI_STATUS = 1 << 1  # NI status words are valid
PING_FEAT_RTE_DISABLED = 1 << 2  # routing is disabled: never use me as a gateway
PING_FEAT_MULTI_RAIL = 1 << 3  # Multi-Rail aware
PING_FEAT_DISCOVERY = 1 << 4  # supports discovery (accepts pushes)
PING_FEAT_LARGE_ADDR = 1 << 5  # large-address NIs follow the nid4 ones
PING_FEAT_PRIMARY_LARGE = 1 << 6
PING_FEAT_METADATA = 1 << 7
PING_FEAT_BITS = 0xFF
LNET_NI_STATUS_UP = 0x15AAC0DE
LNET_NI_STATUS_DOWN = 0xDEADFACE
LNET_NI_STATUS_INVALID = 0

# --- the structs --------------------------------------------------------------------------------
# struct lnet_acceptor_connreq (16 bytes, sender's order)
#   u32 acr_magic    LNET_PROTO_ACCEPTOR_MAGIC
#   u32 acr_version  LNET_PROTO_ACCEPTOR_VERSION
#   u64 acr_nid      the NID the connector wants to reach (must be one of ours)
CONNREQ_HEAD = struct.Struct("<II")  # magic, version: read first, to learn the order and the NID size
CONNREQ_V1 = struct.Struct("<IIQ")
# struct lnet_acceptor_connreq_v2 (28 bytes): magic, version, struct lnet_nid acr_nid (20 bytes, big-endian address)
CONNREQ_V2_NID_SIZE = 20

# struct ksock_hello_msg_nid4 (56 bytes + kshm_nips * 4, sender's order)
#   u32 kshm_magic            LNET_PROTO_MAGIC
#   u32 kshm_version          KSOCK_PROTO_V*
#   u64 kshm_src_nid          sender's NID
#   u64 kshm_dst_nid          destination NID
#   u32 kshm_src_pid          sender's pid (LNET_PID_LUSTRE)
#   u32 kshm_dst_pid          destination pid
#   u64 kshm_src_incarnation  sender's incarnation: a new one means "I rebooted"
#   u64 kshm_dst_incarnation  destination's incarnation (not checked by the kernel)
#   u32 kshm_ctype            SOCKLND_CONN_*, from the sender's point of view
#   u32 kshm_nips             always sent as zero (deprecated IP list follows)
HELLO_HEAD = struct.Struct("<II")  # magic, version
HELLO_REST = struct.Struct("<QQIIQQII")  # src_nid .. nips
HELLO_SIZE = HELLO_HEAD.size + HELLO_REST.size  # 56

# struct ksock_msg_hdr (24 bytes, sender's order)
#   u32 ksh_type             KSOCK_MSG_NOOP / KSOCK_MSG_LNET
#   u32 ksh_csum             CRC32 (V2: header + payload) if non-zero
#   u64 ksh_zc_cookies[2]    [0]: ZC request (the sender holds the payload until it is ACKed)
#                            [1]: ZC ACK (cookie of a request being acknowledged) / keepalive
KSOCK_MSG_HDR = struct.Struct("<IIQQ")
KSOCK_MSG_HDR_SIZE = KSOCK_MSG_HDR.size  # 24

# struct _lnet_hdr_nid4 (72 bytes, little-endian)
#   u64 dest_nid, u64 src_nid, u32 dest_pid, u32 src_pid, u32 type, u32 payload_length,
#   union lnet_cmd_hdr msg (40 bytes: the largest member, lnet_put)
LNET_HDR_NID4_FIXED = struct.Struct("<QQIIII")
LNET_HDR_MSG_SIZE = 40
LNET_HDR_NID4_SIZE = LNET_HDR_NID4_FIXED.size + LNET_HDR_MSG_SIZE  # 72
#   lnet_ack   { lnet_handle_wire dst_wmd; u64 match_bits; u32 mlength }
#   lnet_put   { lnet_handle_wire ack_wmd; u64 match_bits; u64 hdr_data; u32 ptl_index; u32 offset }
#   lnet_get   { lnet_handle_wire return_wmd; u64 match_bits; u32 ptl_index; u32 src_offset; u32 sink_length }
#   lnet_reply { lnet_handle_wire dst_wmd }
#   lnet_hello { u64 incarnation; u32 type }
#   lnet_handle_wire { u64 wh_interface_cookie; u64 wh_object_cookie }
MSG_ACK = struct.Struct("<QQQI")
MSG_PUT = struct.Struct("<QQQQII")
MSG_GET = struct.Struct("<QQQIII")
MSG_REPLY = struct.Struct("<QQ")
MSG_HELLO = struct.Struct("<QI")

# struct lnet_ping_info (16 bytes + pi_nnis * struct lnet_ni_status (16 bytes), sender's order)
#   u32 pi_magic     LNET_PROTO_PING_MAGIC
#   u32 pi_features  LNET_PING_FEAT_*
#   u32 pi_pid       LNET_PID_LUSTRE
#   u32 pi_nnis      number of nid4 entries; the first is 0@lo, whose status is the seqno
# struct lnet_ni_status { u64 ns_nid; u32 ns_status; u32 ns_msg_size }
PING_INFO_HEAD = struct.Struct("<IIII")
NI_STATUS = struct.Struct("<QII")


def nid4_of(nid: Nid) -> int:
    """``lnet_nid_to_nid4``: the u64 of a classic NID."""
    if not nid.is_nid4:
        raise NidError(f"{nid} does not fit a 64-bit NID (IPv6 needs socklnd protocol V4, not spoken here)")
    return (nid.net.packed << 32) | nid.addr_word


def nid_of4(value: int) -> Nid:
    """``lnet_nid4_to_nid``: a :class:`Nid` from the u64 (NidError for unknown net types)."""
    net = Net.from_packed(value >> 32)
    addr = value & 0xFFFFFFFF
    if net.info.addr == ADDR_IP:
        return Nid(ipaddress.IPv4Address(addr), net)
    return Nid(addr, net)


def nid4_str(value: int) -> str:
    """A u64 NID for a log line, even when it does not decode."""
    try:
        return str(nid_of4(value))
    except NidError:
        return f"<{value >> 48}:{(value >> 32) & 0xFFFF}>:{value & 0xFFFFFFFF:#x}"


def swap32(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "little"), "big")


# --- lu2k's encapsulation ------------------------------------------------------------------------
# An LNet message crossing the lu2k hop is one lu2k message: src = the LNet source NID,
# dst = the LNet destination NID, dst_portal = LNET_PORTAL, payload = the 72-byte LNet
# header followed by the LNet payload, both untouched.  The value is outside the portal
# numbers shim endpoints use (LNet portals are < 64; lu2k's shim takes any u32 but this one
# is reserved), spelling "LNET" in ASCII.
LNET_PORTAL = 0x4C4E4554
