"""lu2k's LNet message layer as a pure state machine (no asyncio, no sockets, no clock).

:class:`~lu2k.core.node.Node` is driven by the daemon's engine and by the simulator
(:mod:`lu2k.sim`); :mod:`lu2k.core.states` holds the message and connection state tables,
:mod:`lu2k.core.actions` what the node asks its runner to do.
"""

from .actions import (
    AbortRx, Action, Adopt, Close, CloseIn, Complete, Connect, Deliver, LanTransmit, PingDone, Resume, SendIn, Wake,
)
from .node import PING_PORTAL, NI, Batch, Delivery, InConn, NetParams, Node, NodeParams, OutConn, OutMsg, Peer, Session
from .states import ConnState, MsgState

__all__ = [
    "AbortRx", "Action", "Adopt", "Batch", "Close", "CloseIn", "Complete", "Connect", "ConnState", "Deliver", "Delivery", "InConn",
    "LanTransmit", "MsgState", "NI", "NetParams", "Node", "NodeParams", "OutConn", "OutMsg", "PING_PORTAL", "Peer", "PingDone",
    "Resume", "SendIn", "Session", "Wake",
]
