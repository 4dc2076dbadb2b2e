"""The life of a message and of an outgoing connection, written down once as data.

Rule 1: everything that changes a message's or a connection's state goes through
:func:`msg_event` / :func:`conn_event` with one of the events below; nothing else assigns
``state``.  A pair (state, event) that is not in the table is a bug of the caller
(:class:`~lu2k.errors.LocalProtocolError`) -- or, when the event came from a peer's
frame, a protocol violation that the node turns into
:class:`~lu2k.errors.RemoteProtocolError` before calling here.

Rule 2: a message ends in exactly one of the two final states, DONE (the destination
took it: ``Status.DELIVERED``) or FAILED (any other status), and the node emits its one
completion when it reaches a final state *and* no transport still reads its payload.

Rule 3: a message holds one peer credit and one NI credit exactly while it is IN_FLIGHT,
SENT or REQUEUED on a peer (a local or LAN message holds none).

Message life::

    QUEUED --ASSIGN--> IN_FLIGHT --TRANSMIT--> SENT --ACK--> DONE
       |                  |                    | ^  \\--NACK/FAIL--> FAILED
       |                  |            CONN_LOST| |TRANSMIT
       |                  |                    v |
       +----FAIL----------+---FAIL-------> REQUEUED --ACK--> DONE, --NACK/FAIL--> FAILED
       ^                  |
       +----REROUTE-------+  (and QUEUED --REROUTE--> QUEUED)

* ASSIGN: credits taken, a sequence number in the session with the next hop given.
* TRANSMIT: handed to a transport (or a LAN driver, or the local shim) -- from here the
  next hop may have it, so a later failure is "delivery unknown" (TIMED_OUT,
  PEER_RESTARTED), never NO_ROUTE.
* CONN_LOST: the connection it went out on died before its ACK; it goes out again on the
  next connection (the receiver's dedupe window answers a copy it already has).
* A peer that restarted gets a new session: what was never transmitted to the old one is
  numbered again from 1 (the transmitted ones failed PEER_RESTARTED).
* REROUTE: its gateway failed before it was transmitted; credits given back, its sequence
  number left unused, queued again for a healthier gateway.  Never after TRANSMIT: the
  failed gateway may have it.
* ACK / NACK: the next hop's answer (end to end through gateways).
* FAIL: transaction timeout, peer restarted, refused hello, cancelled.

Outgoing connection life (one per peer and connection type)::

    IDLE --CONNECT--> CONNECTING --UP--> UP --LOST--> BACKOFF --CONNECT--> CONNECTING
                          |                                ^
                          +--------------FAILED------------+
    any --CLOSE--> CLOSED  (peer dropped, net removed, node stopped)
    IDLE, BACKOFF --ADOPT--> UP  (sending on a connection the peer opened to us instead:
                                  lu2k.core.returnpath; it is LOST when that one ends)
    CONNECTING --ADOPT--> UP     (a CONTROL connection whose set-up a message waits for, when
                                  the peer's own is up: the set-up is abandoned)
"""

from __future__ import annotations

import enum

from ..errors import LocalProtocolError


class MsgState(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own hash is a Python call on every table lookup

    QUEUED = "queued"
    IN_FLIGHT = "in flight"
    SENT = "sent"
    REQUEUED = "requeued"
    DONE = "done"
    FAILED = "failed"


class MsgEvent(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own hash is a Python call on every table lookup

    ASSIGN = "assign"
    TRANSMIT = "transmit"
    CONN_LOST = "connection lost"
    ACK = "ack"
    REROUTE = "reroute"
    NACK = "nack"
    FAIL = "fail"


MSG_TRANSITIONS: dict[MsgState, dict[MsgEvent, MsgState]] = {
    MsgState.QUEUED: {MsgEvent.ASSIGN: MsgState.IN_FLIGHT, MsgEvent.REROUTE: MsgState.QUEUED, MsgEvent.FAIL: MsgState.FAILED},
    MsgState.IN_FLIGHT: {MsgEvent.TRANSMIT: MsgState.SENT, MsgEvent.CONN_LOST: MsgState.IN_FLIGHT, MsgEvent.REROUTE: MsgState.QUEUED,
                         MsgEvent.FAIL: MsgState.FAILED},
    MsgState.SENT: {MsgEvent.ACK: MsgState.DONE, MsgEvent.NACK: MsgState.FAILED, MsgEvent.FAIL: MsgState.FAILED,
                    MsgEvent.CONN_LOST: MsgState.REQUEUED},
    MsgState.REQUEUED: {MsgEvent.TRANSMIT: MsgState.SENT, MsgEvent.ACK: MsgState.DONE, MsgEvent.NACK: MsgState.FAILED,
                        MsgEvent.FAIL: MsgState.FAILED, MsgEvent.CONN_LOST: MsgState.REQUEUED},
    MsgState.DONE: {},
    MsgState.FAILED: {},
}

FINAL = frozenset({MsgState.DONE, MsgState.FAILED})
HOLDS_CREDIT = frozenset({MsgState.IN_FLIGHT, MsgState.SENT, MsgState.REQUEUED})
TRANSMITTED = frozenset({MsgState.SENT, MsgState.REQUEUED})


def msg_next(state: MsgState, event: MsgEvent) -> MsgState:
    """The state after ``event``; LocalProtocolError if the table has no such move."""
    try:
        return MSG_TRANSITIONS[state][event]
    except KeyError:
        raise LocalProtocolError(f"message cannot {event.value} while {state.value}") from None


class ConnState(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own hash is a Python call on every table lookup

    IDLE = "idle"
    CONNECTING = "connecting"
    UP = "up"
    BACKOFF = "backoff"
    CLOSED = "closed"


class ConnEvent(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own hash is a Python call on every table lookup

    CONNECT = "connect"
    UP = "up"
    FAILED = "failed"
    LOST = "lost"
    CLOSE = "close"
    ADOPT = "adopt"


CONN_TRANSITIONS: dict[ConnState, dict[ConnEvent, ConnState]] = {
    ConnState.IDLE: {ConnEvent.CONNECT: ConnState.CONNECTING, ConnEvent.CLOSE: ConnState.CLOSED, ConnEvent.ADOPT: ConnState.UP},
    ConnState.CONNECTING: {ConnEvent.UP: ConnState.UP, ConnEvent.FAILED: ConnState.BACKOFF, ConnEvent.CLOSE: ConnState.CLOSED,
                           ConnEvent.ADOPT: ConnState.UP},
    ConnState.UP: {ConnEvent.LOST: ConnState.BACKOFF, ConnEvent.CLOSE: ConnState.CLOSED},
    ConnState.BACKOFF: {ConnEvent.CONNECT: ConnState.CONNECTING, ConnEvent.CLOSE: ConnState.CLOSED, ConnEvent.ADOPT: ConnState.UP},
    ConnState.CLOSED: {ConnEvent.CLOSE: ConnState.CLOSED},
}


def conn_next(state: ConnState, event: ConnEvent) -> ConnState:
    try:
        return CONN_TRANSITIONS[state][event]
    except KeyError:
        raise LocalProtocolError(f"connection cannot {event.value} while {state.value}") from None
