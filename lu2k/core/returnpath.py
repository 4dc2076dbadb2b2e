"""A return path through NAT: sending to a peer over the reverse direction of *its* connection.

lu2k's connections are unidirectional: to send to a peer we connect to it, and a connection
we accepted carries only the answers (ACK, NACK, PONG) to the messages that came in on it.
A site behind NAT (or a firewall that only lets connections out) cannot be connected to, so
its peers could never send to it.  This module lets a node send to such a peer over the
reverse direction of a connection the peer opened to us, and lets the inside site keep that
connection open.

Theory of operation
-------------------
*Frames tell the directions apart.*  MSG and PING frames are requests, ACK, NACK and PONG
answers.  On a connection that carries traffic both ways, the side that accepted it (the
*outside* site) writes its MSG/PING frames after the ACKs it sends anyway, and reads the
answers to them among the peer's MSG frames; the side that opened it (the *inside* site)
reads MSG/PING frames among its ACKs and answers them on its own direction.  No new frame
type and no new hello: a reverse MSG carries a sequence number in the sender's ordinary
session with the receiver (sender NID + incarnation), so the receiver's dedupe window, the
sender's credits and the one completion per message are exactly those of a connection in
the usual direction -- a message sent on the reverse path and resent later on a direct
connection (or the other way round) is recognised as the same message.

*Adopting.*  Our outgoing connection to a peer (:class:`~lu2k.core.node.OutConn`) may, instead
of connecting, *adopt* a live accepted connection from that peer
(:class:`~lu2k.core.states.ConnEvent` ``ADOPT``: IDLE/BACKOFF -> UP); the runner is told with
an :class:`~lu2k.core.actions.Adopt` action and writes the connection's batches on that
accepted transport.  When the accepted connection ends, the adopted one is LOST like any
other: what was not acknowledged is resent on the next connection, direct or adopted.

*Per peer or per net* (:class:`ReturnPath`):

* ``connect`` -- always connect in (the behaviour without this module);
* ``reverse`` -- never connect in: wait for the peer to connect out and adopt its connection;
* ``auto`` (default) -- connect in; once that failed and a live connection from the peer
  exists, adopt it.

*Rebinding.*  A new connection from a peer whose connection we had adopted means the peer
reconnected (its NAT mapping changed, or its old connection broke): we move our traffic to
the newest one -- the old adopted connection is closed and counts as lost, so nothing on it is
lost or delivered twice.  QUIC follows a new source address by itself (connection migration);
TCP and UDT connections break, the inside site reconnects and we follow.

*Typed connections* (tcp: CONTROL for small messages, BULK for the rest).  The inside site
holds both, so each is kept open through the NAT and announced by its first keepalive.  Our
connection of each type adopts the peer's connection of that type, or meanwhile the other one;
when a connection of its own type is heard, it *moves* there (:meth:`ReturnPaths._rp_move`):
our small messages then no longer wait behind our bulk.  Unlike rebinding, the connection left
is not closed -- it is the peer's and carries its messages; its answers to what we sent on it
are still read, and what they do not cover goes out again on the new one.

*Holding and keepalives* (the inside site).  A peer configured with ``keepalive`` seconds is
*held*: we keep a connection to it up even with nothing to send (reconnecting with the usual
backoff), and send it a PING every ``keepalive`` seconds, which keeps the NAT binding alive
both ways.  A keepalive not answered within ``keepalive_misses`` intervals means the path is
gone (e.g. the NAT forgot the binding, or gave us a new source port and the peer reset the old
connection quietly): the connection is reset and reconnected, and the peer follows it.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, FrameError
from ..nid import Net, Nid
from ..wire import PING_BODY, ConnType, Frame, FrameType
from .actions import Adopt, Close
from .states import ConnEvent, ConnState, conn_next

if TYPE_CHECKING:
    from .node import NI, InConn, OutConn, OutMsg, Peer, Session, _Ping

KEEPALIVE_TOKEN = 1 << 63  # keepalive pings' tokens have this bit set; the runner ignores their PingDone
KEEPALIVE_MISSES = 3
ANSWERS = frozenset({FrameType.ACK, FrameType.NACK, FrameType.PONG})
REQUESTS = frozenset({FrameType.MSG, FrameType.PING})


class ReturnPath(enum.Enum):
    """How we reach a peer: ``connect`` in, use its own connection in ``reverse``, or ``auto``."""

    CONNECT = "connect"
    REVERSE = "reverse"
    AUTO = "auto"


@dataclass(frozen=True, slots=True)
class PathSettings:
    """One peer's (or one net's default) return-path settings.  ``None``: not set here."""

    return_path: ReturnPath | None = None
    keepalive: float | None = None  # seconds; 0 = off

    def over(self, default: "PathSettings") -> "PathSettings":
        """These settings, with what is unset taken from ``default`` (the net's)."""
        return PathSettings(self.return_path if self.return_path is not None else default.return_path,
                            self.keepalive if self.keepalive is not None else default.keepalive)


def parse_return_path(value: Any, where: str) -> ReturnPath:
    try:
        return ReturnPath(value)
    except ValueError:
        raise ConfigError(f"return_path must be one of {', '.join(p.value for p in ReturnPath)}, not {value!r}",
                          where=where) from None


def parse_keepalive(value: Any, where: str) -> float:
    """Seconds between keepalives: a number > 0, or 0 / false for none."""
    if value is False:
        return 0.0
    if isinstance(value, bool):
        raise ConfigError(f"keepalive must be a number of seconds or false, not {value!r}", where=where)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"keepalive must be a number of seconds, not {value!r}", where=where) from None
    if not math.isfinite(out) or out < 0 or 0 < out < 0.01:
        raise ConfigError(f"keepalive must be 0 (off) or at least 0.01 seconds, not {value!r}", where=where)
    return out


def parse_path_settings(mapping: Mapping[str, Any], where: str) -> PathSettings:
    """``return_path`` and ``keepalive`` out of a net's or a peer's ``lu2k:`` keys."""
    rp = parse_return_path(mapping["return_path"], f"{where}.return_path") if "return_path" in mapping else None
    ka = parse_keepalive(mapping["keepalive"], f"{where}.keepalive") if "keepalive" in mapping else None
    return PathSettings(rp, ka)


class ReturnPaths:
    """The node's return-path half (a mixin of :class:`~lu2k.core.node.Node`): adopting accepted
    connections, answers and requests in the unusual direction, holding and keepalives."""

    # Provided by Node.
    nis: dict[Net, NI]
    sessions: dict[tuple[Nid | None, int], Session]  # (sender NID or None for a multi-rail sender, incarnation)
    actions: list[Any]
    stats: Counter[str]
    closing: bool
    _now: float

    def _rp_init(self) -> None:
        self._rp_net: dict[Net, PathSettings] = {}
        self._rp_peer: dict[Nid, PathSettings] = {}
        self._rp_keepalive: dict[OutConn, float] = {}  # held connections that are up -> next keepalive
        self._rp_outstanding: dict[OutConn, tuple[int, float]] = {}  # keepalive token, answer deadline
        self._rp_tokens = 0

    # ------------------------------------------------------------------ configuration

    def set_return_paths(self, nets: Mapping[Net, PathSettings], peers: Mapping[Nid, PathSettings]) -> None:
        """Per-net defaults and per-peer settings.  A peer with a keepalive is held (see the
        module docstring); nets not up yet are held when :meth:`add_net` brings them up."""
        self._rp_net = dict(nets)
        self._rp_peer = dict(peers)
        for ni in self.nis.values():
            for peer in ni.peers.values():
                for conn in peer.conns.values():
                    conn.hold = False
        self._rp_hold_all()

    def path_settings(self, nid: Nid) -> PathSettings:
        own = self._rp_peer.get(nid, PathSettings())
        return own.over(self._rp_net.get(nid.net, PathSettings()))

    def return_path(self, nid: Nid) -> ReturnPath:
        return self.path_settings(nid).return_path or ReturnPath.AUTO

    def keepalive(self, nid: Nid) -> float:
        return self.path_settings(nid).keepalive or 0.0

    def _rp_hold_all(self) -> None:
        for nid in self._rp_peer:
            if nid.net in self.nis and self.keepalive(nid) > 0 and self.return_path(nid) is not ReturnPath.REVERSE:
                peer = self.peer(nid)
                # With typed connections both are held: the peer sends its bulk back on our
                # BULK connection, which keepalives keep open through the NAT and announce.
                held = [peer.conn_of(ConnType.CONTROL), peer.conn_of(ConnType.BULK)] if peer.ni.params.typed_connections else [peer.conn_for(0)]
                for conn in held:
                    if not conn.hold:
                        conn.hold = True
                        self._maybe_connect(conn)

    # ------------------------------------------------------------------ adopting

    def _rp_live_inbound(self, peer: Peer, ctype: ConnType) -> InConn | None:
        """The newest live connection ``peer`` opened to us that we may send on: one of the
        same type if there is one (typed connections keep small messages apart from bulk),
        else any."""
        same: InConn | None = None
        other: InConn | None = None
        for session in self.sessions.values():
            if peer.nid not in session.nids:  # a multi-rail sender's session spans its rails' NIDs
                continue
            for c in session.conns:
                if c.alive and c.heard and c.out is None and c.ni is peer.ni:
                    if c.ctype is ctype:
                        same = c
                    else:
                        other = c
        return same or other

    def _rp_riders(self, inbound: InConn) -> list[OutConn]:
        """Our connections that send on ``inbound``'s reverse direction."""
        peer = inbound.ni.peers.get(inbound.session.peer_nid)
        return [c for c in peer.conns.values() if c.via is inbound] if peer is not None else []

    def _rp_instead_of_connect(self, conn: OutConn) -> bool:
        """Called where ``conn`` would connect: True if it adopted a connection or waits for
        one instead."""
        peer = conn.peer
        if peer.rail is not None:
            # A multi-rail peer numbers our messages once for all rails, and the far side of a
            # reverse path cannot tell (its session would be per NID): rails always connect.
            return False
        mode = self.return_path(peer.nid)
        if mode is ReturnPath.CONNECT or (mode is ReturnPath.AUTO and not conn.connect_failed):
            return False
        inbound = self._rp_live_inbound(peer, conn.ctype)
        if inbound is not None:
            self._rp_adopt(conn, inbound)
            return True
        if mode is ReturnPath.REVERSE:
            peer.last_error = f"waiting for {peer.nid} to connect (return_path: reverse)"
            return True
        return False

    def _rp_ride_instead(self, conn: OutConn) -> bool:
        """Our CONTROL connection to a peer is still being set up (a connect and a two-round-trip
        hello: 1.8 s on GEO) and a message waits for it, while the peer's own CONTROL connection
        to us is up and heard: send on that one instead, so the first answer to a peer that has
        just connected (an LNet reply, a transfer's ACCEPT) does not wait for ours.  The set-up
        in progress is abandoned; we ride the peer's connection until it ends.  Only small
        messages: bulk keeps a connection of its own (``auto`` only, as adopting is)."""
        peer = conn.peer
        if (conn.ctype is not ConnType.CONTROL or conn.hold or peer.rail is not None
                or self.return_path(peer.nid) is not ReturnPath.AUTO):
            return False
        inbound = self._rp_live_inbound(peer, ConnType.CONTROL)
        if inbound is None or inbound.ctype is not ConnType.CONTROL:
            return False
        self.stats["return_paths_early"] += 1
        self.actions.append(Close(conn, conn.attempt, f"sending on {peer.nid}'s connection instead"))
        self._rp_adopt(conn, inbound)
        return True

    def _rp_adopt(self, conn: OutConn, inbound: InConn) -> None:
        conn.state = conn_next(conn.state, ConnEvent.ADOPT)
        conn.attempt += 1
        conn.via = inbound
        inbound.reverse = conn
        self.stats["return_paths_adopted"] += 1
        self.actions.append(Adopt(conn, conn.attempt, inbound))
        self._conn_up(conn, inbound.session.incarnation)

    def _rp_drop(self, conn: OutConn, reason: str) -> None:
        """``conn`` no longer sends on the connection it adopted (that one ended, or the peer
        reconnected): it is lost, and its unacknowledged messages go out on the next one."""
        if conn.via is None or conn.state is not ConnState.UP:
            return
        self.actions.append(Close(conn, conn.attempt, reason))
        self.connection_lost(conn, conn.attempt, reason, self._now)

    def _rp_maybe_move(self, conn: OutConn) -> None:
        """Move ``conn`` off the peer's connection of the other type (:meth:`_rp_move`) when one
        of its own type is heard -- once no send of ours is under way on the old one: that
        send still reads its payloads, and only its end (or the old connection's) frees them."""
        if conn.state is not ConnState.UP or conn.via is None or conn.via.ctype is conn.ctype or conn.sending:
            return
        inbound = self._rp_live_inbound(conn.peer, conn.ctype)
        if inbound is not None and inbound.ctype is conn.ctype:
            self._rp_move(conn, inbound)

    def _rp_move(self, conn: OutConn, inbound: InConn) -> None:
        """``conn`` rides the peer's connection of another type (our bulk on its CONTROL
        connection, adopted before its BULK one was heard); ``inbound`` is of ``conn``'s type:
        move there, so that our small messages no longer wait behind our bulk.  The old
        connection is the peer's and carries its messages: our writer on it only stops.  What
        we sent on it and is not acknowledged goes out again on the new one (the peer answers
        a copy from its dedupe window), and answers still coming on the old one are read."""
        old = conn.via
        assert old is not None
        self.stats["return_paths_moved"] += 1
        self.actions.append(Close(conn, conn.attempt, f"moving to {conn.peer.nid}'s {inbound.ctype.name} connection", detach=True))
        conn.state = conn_next(conn.state, ConnEvent.LOST)
        conn.woken = False
        self._rp_unlink(conn)
        old.moved_from = True
        self._fail_pings(conn, f"connection to {conn.peer.nid} moved")
        self._requeue(conn, self._take_back_unacked(conn))
        self._rp_adopt(conn, inbound)

    def _rp_unlink(self, conn: OutConn) -> None:
        """``conn`` went down: forget the accepted connection it used, the reverse half of its own
        connection, and its keepalive."""
        if conn.via is not None:
            via, conn.via = conn.via, None
            if via.reverse is conn:
                riders = self._rp_riders(via)
                via.reverse = riders[0] if riders else None
        if conn.rev_in is not None:
            rev, conn.rev_in = conn.rev_in, None
            self.inbound_lost(rev)
        self._rp_keepalive.pop(conn, None)
        self._rp_outstanding.pop(conn, None)

    def _rp_heard(self, inbound: InConn) -> None:
        """The first frames on a connection a peer opened to us: our connections waiting for it
        (or riding an older connection of its) move onto this one.  Not before: until the peer
        sent something after the hello, its side may still be reading hello frames only."""
        ni = inbound.ni
        peer = ni.peers.get(inbound.session.peer_nid)
        if peer is None:
            return
        for conn in list(peer.conns.values()):
            # The same type of connection again: the peer reconnected (new source address, or its
            # old connection broke unseen).  Another type is just its other connection: stay --
            # unless we ride one of another type for want of ours (see _rp_move).
            if conn.via is not None and conn.via is not inbound and conn.via.ctype is inbound.ctype:
                self.stats["return_paths_rebound"] += 1
                self._rp_drop(conn, f"{peer.nid} reconnected from a new address")
            elif conn.via is not None and conn.via.ctype is not conn.ctype and inbound.ctype is conn.ctype:
                self._rp_maybe_move(conn)
                continue
            if conn.state is ConnState.CONNECTING and conn.queue and self._rp_ride_instead(conn):
                continue
            if conn.state in (ConnState.IDLE, ConnState.BACKOFF) and conn.has_work():
                mode = self.return_path(peer.nid)
                if mode is ReturnPath.REVERSE or (mode is ReturnPath.AUTO and conn.connect_failed):
                    self._backoff_waiting.pop(conn, None)
                    conn.backoff.next_at = self._now  # no reason to wait: the peer is right here
                    self._maybe_connect(conn)

    def _rp_inbound_lost(self, inbound: InConn) -> None:
        if inbound.reverse is not None:
            inbound.reverse = None
            for out in self._rp_riders(inbound):
                self._rp_drop(out, f"connection from {inbound.session.peer_nid} ended")
                out.via = None
        if inbound.out is not None and inbound.out.rev_in is inbound:
            inbound.out.rev_in = None  # inbound.out stays: the runner finds the transport by it

    # ------------------------------------------------------------------ the unusual directions

    def _rp_answers(self, inbound: InConn, frames: list[Frame]) -> None:
        """ACK/NACK/PONG frames on a connection we accepted: answers to what we sent on its
        reverse direction."""
        out = inbound.reverse
        if out is None and inbound.moved_from:
            # Late answers to what we sent here before moving: ACKs are matched per peer.
            peer = inbound.ni.peers.get(inbound.session.peer_nid)
            out = next((c for c in peer.conns.values() if c.state is ConnState.UP), None) if peer is not None else None
            if out is None:
                return  # what they answer was taken back and goes out again
        if out is None:
            raise FrameError(f"{frames[0].header.type.name} frame on an incoming connection that carries nothing back")
        for f in frames:
            if f.header.type is FrameType.PONG:  # to the connection that sent the PING
                (token,) = PING_BODY.unpack(f.header.body)
                out = next((c for c in self._rp_riders(inbound) if token in c.pings), out)
            self.frames_received(out, out.attempt, [f], self._now)

    def _rp_requests(self, conn: OutConn, frames: list[Frame]) -> None:
        """MSG/PING frames on the reverse direction of our own connection: the peer sends to us
        over it (we are the inside site).  They go through an InConn of our session with the
        peer, as if the peer had connected to us; its answers go out on ``conn``."""
        peer = conn.peer
        rev = conn.rev_in
        if rev is None or not rev.alive:
            if peer.incarnation is None:
                raise FrameError(f"{peer.nid} sent requests before its hello finished")
            rev = self._attach_in(peer.ni, peer.nid, peer.incarnation, conn.ctype)
            rev.pong_nids = True  # every lu2k daemon reads them (its hellos ask with FEATURE_NIDS)
            rev.out = conn
            conn.rev_in = rev
            self.stats["return_paths_served"] += 1
        self.inbound_frames(rev, frames, self._now)

    # ------------------------------------------------------------------ keepalives

    def _rp_conn_up(self, conn: OutConn) -> None:
        if conn.hold:
            ka = self.keepalive(conn.peer.nid)
            if ka > 0:
                # The first keepalive goes at once: it tells the peer it may send on this
                # connection's reverse direction (see _rp_heard).
                self._rp_keepalive[conn] = self._now + ka
                self._rp_ping(conn, ka)

    def _rp_ping(self, conn: OutConn, ka: float) -> None:
        self._rp_tokens += 1
        token = KEEPALIVE_TOKEN | self._rp_tokens
        conn.pings[token] = self._ping_type(token, self._now, self._now + KEEPALIVE_MISSES * ka, "keepalive")
        self._rp_outstanding[conn] = (token, self._now + KEEPALIVE_MISSES * ka)
        self.stats["keepalives_sent"] += 1

    def _rp_timer(self) -> float | None:
        at: float | None = None
        for t in self._rp_keepalive.values():
            at = t if at is None or t < at else at
        for _tok, t in self._rp_outstanding.values():
            at = t if at is None or t < at else at
        return at

    def _rp_handle_timer(self, now: float) -> None:
        for conn, (token, deadline) in list(self._rp_outstanding.items()):
            if token not in conn.pings:
                del self._rp_outstanding[conn]  # answered
                continue
            if deadline > now:
                continue
            del self._rp_outstanding[conn]
            if conn.state is ConnState.UP:
                conn.pings.pop(token, None)
                self.stats["keepalives_missed"] += 1
                reason = f"no answer from {conn.peer.nid} to {KEEPALIVE_MISSES} keepalive intervals"
                self.actions.append(Close(conn, conn.attempt, reason))
                self.connection_lost(conn, conn.attempt, reason, now)
        for conn, at in list(self._rp_keepalive.items()):
            if at > now:
                continue
            ka = self.keepalive(conn.peer.nid)
            if conn.state is not ConnState.UP or not conn.hold or ka <= 0:
                self._rp_keepalive.pop(conn, None)
                continue
            self._rp_keepalive[conn] = now + ka
            if conn in self._rp_outstanding:
                continue  # the last one is still unanswered
            self._rp_ping(conn, ka)
            self._kick(conn)

    # Node methods the mixin calls.  Declared here for the type checker, as real methods that
    # Node overrides (mypyc, which compiles this class, accepts no ``if`` in a class body).
    _backoff_waiting: dict[OutConn, None]
    _ping_type: type[_Ping]

    def peer(self, nid: Nid) -> Peer:
        raise NotImplementedError

    def _maybe_connect(self, conn: OutConn) -> None:
        raise NotImplementedError

    def _kick(self, conn: OutConn) -> None:
        raise NotImplementedError

    def _conn_up(self, conn: OutConn, peer_incarnation: int) -> None:
        raise NotImplementedError

    def connection_lost(self, conn: OutConn, attempt: int, reason: str, now: float) -> None:
        raise NotImplementedError

    def _fail_pings(self, conn: OutConn, why: str) -> None:
        raise NotImplementedError

    def _take_back_unacked(self, conn: OutConn) -> list[OutMsg]:
        raise NotImplementedError

    def _requeue(self, conn: OutConn, pending: list[OutMsg]) -> None:
        raise NotImplementedError

    def inbound_lost(self, conn: InConn) -> None:
        raise NotImplementedError

    def inbound_frames(self, conn: InConn, frames: list[Frame], now: float) -> None:
        raise NotImplementedError

    def frames_received(self, conn: OutConn, attempt: int, frames: list[Frame], now: float) -> None:
        raise NotImplementedError

    def _attach_in(self, ni: NI, peer_nid: Nid, incarnation: int, ctype: ConnType) -> InConn:
        raise NotImplementedError
