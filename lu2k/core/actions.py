"""What a :class:`~lu2k.core.node.Node` asks its runner to do.

The node never performs I/O: every input method leaves actions in ``node.actions`` and
the runner (the daemon's engine, or the simulator) carries them out in order, feeding the
outcomes back as new inputs (``connected``, ``send_done``, ``delivered``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import Status
from ..nid import Nid

if TYPE_CHECKING:
    from .node import Delivery, InConn, OutConn, OutMsg


@dataclass(slots=True)
class Connect:
    """Open a transport to ``host:port`` for ``conn`` and run the hello; answer with
    ``node.connected(conn, attempt, ...)`` or ``node.connect_failed(conn, attempt, ...)``."""

    conn: OutConn
    attempt: int
    host: str
    port: int


@dataclass(slots=True)
class Adopt:
    """``conn``'s attempt ``attempt`` sends on the reverse direction of the accepted connection
    ``via`` (:mod:`lu2k.core.returnpath`): write its batches there, as after a Connect; the
    answers come in on ``via`` and reach the node through ``inbound_frames``."""

    conn: OutConn
    attempt: int
    via: InConn


@dataclass(slots=True)
class Wake:
    """``conn`` has frames to send: call ``node.next_batch(conn)`` until it returns None."""

    conn: OutConn


@dataclass(slots=True)
class Close:
    """Close the transport of ``conn``'s connection attempt ``attempt``.  With ``detach``, only
    stop writing ``conn``'s frames on it: an adopted connection of the peer's (returnpath) that
    still carries the peer's own messages."""

    conn: OutConn
    attempt: int
    reason: str
    detach: bool = False


@dataclass(slots=True)
class CloseIn:
    """Close an accepted connection (it broke the protocol, or its net went away)."""

    conn: InConn
    reason: str


@dataclass(slots=True)
class SendIn:
    """Send these frames (ACK, NACK, PONG) on the reverse direction of an accepted connection."""

    conn: InConn
    frames: list[bytes]


@dataclass(slots=True)
class Resume:
    """An accepted connection may be read again (its deliveries and forwards drained)."""

    conn: InConn


@dataclass(slots=True)
class Deliver:
    """Hand a message to the local endpoint on ``delivery.dst_portal``; answer with
    ``node.delivered(delivery, status, reason)``.  ``delivery.token`` is the receive
    buffer the payload already sits in (or None)."""

    delivery: Delivery


@dataclass(slots=True)
class AbortRx:
    """Give back a receive buffer that will not be delivered (duplicate, forwarded, bad)."""

    token: Any


@dataclass(slots=True)
class LanTransmit:
    """Hand ``msg`` to the LAN driver attached on ``msg.lan``; answer with ``node.lan_done``."""

    msg: OutMsg


@dataclass(slots=True)
class Complete:
    """``msg`` is finished: call its ``on_finish(status, reason)`` (exactly once)."""

    msg: OutMsg
    status: Status
    reason: str


@dataclass(slots=True)
class PingDone:
    """A ping finished: ``rtt`` in seconds and the answering peer's incarnation, or ``error``."""

    token: int
    rtt: float | None
    incarnation: int
    via: str
    error: str
    nids: tuple[Nid, ...] = ()  # the NIDs the answering daemon listed (a direct peer's PONG), for discover


Action = Connect | Adopt | Wake | Close | CloseIn | SendIn | Resume | Deliver | AbortRx | LanTransmit | Complete | PingDone
