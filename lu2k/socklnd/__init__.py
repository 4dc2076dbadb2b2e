"""socklnd: lu2kd as an LNet router on a LAN of kernel LNet nodes (``ksocklnd``'s protocol).

Split as Lustre splits ksocklnd: :mod:`.idl` (the wire structs, one comment per field),
:mod:`.proto` (codecs: LNet header, ping info, acceptor request, hello, ksock header),
:mod:`.conn` (one connection's state machine), :mod:`.router` (what a router answers for its
own NIDs: pings, discovery pushes), :mod:`.ping` (lu2kd's own pings of LAN nodes: the GET, the
REPLY matched by its cookie), :mod:`.tunables` (the net's options) and :mod:`.driver`
(the asyncio LAN driver the daemon attaches with ``engine.attach_lan``).  Everything but the
driver is pure.
"""

from .idl import LNET_PORTAL

__all__ = ["LNET_PORTAL"]
