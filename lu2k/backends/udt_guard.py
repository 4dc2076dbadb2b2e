"""The udt backend's guard in front of libudt: a kernel socket filter on its UDP sockets.

libudt 4.11 sizes a new connection from the *peer's* handshake, before anything is
authenticated (the preamble and the lu2k hello come after UDT has connected).  Its send
loss list gets ``2 x`` the flight window the peer announces, 12 bytes an entry, allocated
and written at once: one 64-byte handshake announcing a window of 10^8 packets made an
accepting lu2kd take 1.5 GB, and a few more would exhaust the host.  Anyone who can send
UDP to the port can do it (the handshake's cookie only proves the sender's address).

So the backend creates every UDP socket libudt listens or connects on itself, attaches a
classic BPF program (``SO_ATTACH_FILTER``) and hands the socket over (``bind_udp``).  The
program looks at UDT handshake packets only -- control type 0, the first bit and the next 15
bits of the header -- and drops one that

* is shorter than a handshake (:data:`HANDSHAKE_SIZE` bytes of UDT),
* names a UDT version other than 4,
* announces a packet size (MSS) outside :data:`MIN_MSS`..:data:`MAX_MSS` (below, no payload
  is left once the headers are taken off; above, no UDP datagram can carry it), or
* announces a flight window above the net's limit (:func:`max_peer_window`).

Everything else passes untouched: data and the other control packets name the connection
they belong to, and libudt drops them unless they come from that connection's peer address.
Negative fields are huge unsigned numbers to BPF, so the upper bounds catch them too.  The
cost is a dozen BPF instructions per datagram, in the kernel.

Not covered: rendezvous sockets (several UDT sockets share libudt's socket on one port;
they are bound by libudt as before).
"""

from __future__ import annotations

import ctypes
import socket
import struct

from ..errors import LocalProtocolError
from .netpath import sockaddr

SO_ATTACH_FILTER = 26  # linux/socket.h (asm-generic); not in Python's socket module
UDP_HEADER = 8  # a UDP socket's filter sees the datagram from its UDP header on
UDT_VERSION = 4
HANDSHAKE_SIZE = 16 + 48  # UDT header + CHandShake body
MIN_MSS = 512  # lu2k's own smallest (576, less IPv6's and FEC's share) stays above this
MAX_MSS = 65536 + 20  # the mss option's ceiling, as libudt counts it for IPv6
WINDOW_FACTOR = 4  # a peer may announce this many times this net's own flight window ...
MIN_WINDOW_LIMIT = 16384  # ... and at least this many packets (a 393 KB loss list)

# Offsets (from the UDP header) of the fields the program reads; UDT writes them big-endian,
# as BPF loads them.
_TYPE = UDP_HEADER  # u16: 1 bit control flag, 15 bits type (0x8000: handshake)
_VERSION = UDP_HEADER + 16
_MSS = UDP_HEADER + 28
_WINDOW = UDP_HEADER + 32

# Classic BPF opcodes (linux/filter.h).
_LD_H_ABS = 0x28
_LD_W_ABS = 0x20
_LD_W_LEN = 0x80
_JEQ_K = 0x15
_JGT_K = 0x25
_JGE_K = 0x35
_RET_K = 0x06
_ACCEPT = 0xFFFFFFFF
_DROP = 0

Instruction = tuple[int, int, int, int]  # code, jump if true, jump if false, k
_INSN = struct.Struct("HBBI")  # struct sock_filter
_FPROG = struct.Struct("@HP")  # struct sock_fprog: length, then a pointer (native alignment)


def max_peer_window(flight_window: int) -> int:
    """The largest flight window a peer's handshake may announce on a net whose own is
    ``flight_window`` (the peers of one net share its site profile, so theirs is alike)."""
    return max(WINDOW_FACTOR * flight_window, MIN_WINDOW_LIMIT)


def handshake_filter(max_window: int) -> list[Instruction]:
    """The BPF program: every datagram passes except bad UDT handshakes (see the module docstring)."""
    if not 1 <= max_window < 1 << 31:
        raise LocalProtocolError(f"max_window must be 1..2^31-1 packets, got {max_window}")
    prog: list[Instruction] = [
        (_LD_H_ABS, 0, 0, _TYPE),
        (_JEQ_K, 0, 10, 0x8000),  # not a handshake: accept
        (_LD_W_LEN, 0, 0, 0),
        (_JGE_K, 0, 9, UDP_HEADER + HANDSHAKE_SIZE),  # short: drop
        (_LD_W_ABS, 0, 0, _VERSION),
        (_JEQ_K, 0, 7, UDT_VERSION),
        (_LD_W_ABS, 0, 0, _MSS),
        (_JGE_K, 0, 5, MIN_MSS),
        (_JGT_K, 4, 0, MAX_MSS),
        (_LD_W_ABS, 0, 0, _WINDOW),
        (_JGT_K, 2, 0, max_window),
        (_RET_K, 0, 0, _ACCEPT),  # a sound handshake
        (_RET_K, 0, 0, _ACCEPT),  # not a handshake
        (_RET_K, 0, 0, _DROP),
    ]
    return prog


def attach(sock: socket.socket, prog: list[Instruction]) -> None:
    """Attach ``prog`` to ``sock`` (the kernel copies it: nothing needs to outlive the call)."""
    code = ctypes.create_string_buffer(b"".join(_INSN.pack(*insn) for insn in prog))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _FPROG.pack(len(prog), ctypes.addressof(code)))


def guarded_socket(family: int, host: str, port: int, max_window: int) -> socket.socket:
    """A UDP socket bound to ``host``:``port`` with the handshake filter attached, for libudt."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        attach(sock, handshake_filter(max_window))  # before bind: no datagram gets in unfiltered
        sock.bind(sockaddr(host, port))
    except BaseException:
        sock.close()
        raise
    return sock
