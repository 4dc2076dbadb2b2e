"""The udt backend's tunables: its config keys, checked, and buffer sizing from the site profile.  Pure.

Config keys (a net's ``lu2k.options`` when its backend is ``udt``), all optional:

======================  ========================================================================
``cc``                  ``lu2k-rate`` (default: loss-tolerant rate control) or ``udt`` (UDT's DAIMD)
``rate_mbit``           pacing target; default: profile ``rate_mbit`` x ``pace_fraction``; with
                        neither, lu2k-rate probes for the rate
``pace_fraction``       share of the profile's link rate to pace at (default 0.97: headroom for
                        the link's own framing and for ACK traffic in the other direction)
``min_rate_mbit``       floor of the control (default 0.25)
``max_rate_mbit``       ceiling when probing (default 10000)
``heavy_loss``          loss fraction per round trip treated as congestion (default
                        max(0.10, 4 x profile loss))
``rtt_slack``           queueing delay tolerated, as a fraction of the minimum RTT (default 0.2)
``min_rto_ms``          floor of UDT's retransmission timeout under lu2k-rate (default 300)
``mss``                 UDT packet size including IP/UDP headers and the 16-byte packet trailer
                        (default 1500, or the route's MTU where the kernel knows a lower one;
                        576..65536; the same on the wire over IPv6, see :func:`lu2k.inet.udt_mss_for`)
``buffer``              UDT send/receive buffer bytes (default max(8 x BDP, 2 x largest frame, 8 MiB))
``flight_window``       UDT flight window, packets (default: the buffer in packets); a peer's
                        handshake announcing more than 4 x this (at least 16384) is dropped
                        (:mod:`.udt_guard`)
``udp_buffer``          UDP socket buffer bytes (default min(BDP, 4 MiB); the kernel may clamp)
``cipher``              ``aes-256-gcm`` (default) or ``chacha20-poly1305``
``recv_queue``          received messages held for the engine before UDT is back-pressured (64)
``handshake_timeout``   seconds an accepted connection has to send its preamble (default 10)
``dead_peer_s``         lu2k-rate: a connection whose peer has acknowledged nothing for this long,
                        through retransmission timeouts, is declared dead (default
                        max(10, 10 x profile RTT)); libudt itself would wait for ever, since a
                        fixed timeout resets the silence clock it checks
``rendezvous``          true: connect in UDT rendezvous mode (both ends connect; for NAT)
``rendezvous_port``     local UDP port rendezvous connects leave from (default: net port + 1)
``rendezvous_peers``    ["host:port", ...] the listener rendezvous-connects to (their
                        ``rendezvous_port``), handing each connection to the engine as accepted
``fec``                 forward error correction: ``off`` (default), ``auto`` (repair sized by the
                        loss the peer reports) or a fixed ratio (``5%``), as on quic; both ends of
                        a udt net must have it on (see :mod:`lu2k.backends.udt_fec`); not with
                        rendezvous.  UDT packets shrink by its 8-byte worst case so repair fits
======================  ========================================================================

Why 8 x BDP: with random loss the first hole in the sequence holds UDT's ACK point for at
least one more round trip while the retransmission travels, and a lost retransmission for
1.25 more (the receiver's repeated NAK); UDT's send buffer holds everything unacknowledged,
and the receiver's everything behind the hole, so both must cover the data sent meanwhile
or the sender stalls exactly when the link is lossy.  Memory is cheap next to a GEO hop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..inet import format_hostport, split_hostport
from ..fec import MAX_OVERHEAD as FEC_OVERHEAD, FecSettings, parse_fec
from ..wire import MAX_HEADER_SIZE
from .base import BackendSettings
from .udt_proto import CIPHERS, PACKET_TRAILER_SIZE, TAG_SIZE, check_cipher

CCS = ("lu2k-rate", "udt")
UDT_HEADERS = 28 + 16 + PACKET_TRAILER_SIZE  # IPv4 + UDP, UDT's data header, the packet MAC (IPv6: 20 more, see lu2k.inet)
MIN_BUFFER = 8 << 20
MAX_UDP_BUFFER = 4 << 20

KNOWN_KEYS = frozenset({
    "cc", "rate_mbit", "pace_fraction", "min_rate_mbit", "max_rate_mbit", "heavy_loss", "rtt_slack", "mss",
    "buffer", "flight_window", "udp_buffer", "cipher", "recv_queue", "handshake_timeout", "rendezvous",
    "rendezvous_port", "rendezvous_peers", "min_rto_ms", "dead_peer_s", "encryption", "peer_keys", "peer_keys_only",
    "fec",
})


@dataclass(frozen=True)
class UdtTuning:
    """Everything the backend applies to a UDT socket, decided once per net."""

    cc: str
    cc_params: dict[str, float]
    mss: int
    buffer: int
    flight_window: int
    udp_buffer: int
    cipher: str
    max_frame: int  # the largest sealed UDT message this net can carry
    recv_queue: int
    handshake_timeout: float
    dead_peer_s: float = 10.0
    rendezvous: bool = False
    rendezvous_port: int = 0
    rendezvous_peers: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    fec: FecSettings = field(default_factory=FecSettings)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cc": self.cc, "mss": self.mss, "buffer": self.buffer, "flight_window": self.flight_window,
            "udp_buffer": self.udp_buffer, "cipher": self.cipher, "max_frame": self.max_frame,
        }
        if self.cc == "lu2k-rate":
            target = self.cc_params.get("target_bps", 0.0)
            out["pacing"] = f"{target / 1e6:g} Mbit/s" if target else "probing"
        if self.rendezvous:
            out["rendezvous_port"] = self.rendezvous_port
            out["rendezvous_peers"] = [format_hostport(h, p) for h, p in self.rendezvous_peers]
        out["fec"] = self.fec.mode if self.fec.mode != "fixed" else f"{self.fec.ratio * 100:g}%"
        return out


def _num(opts: dict[str, Any], key: str, default: float, where: str, lo: float, hi: float) -> float:
    value = opts.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"expected a number, got {value!r}", where=f"{where}.{key}")
    if not lo <= value <= hi:
        raise ConfigError(f"{value!r} outside {lo:g}..{hi:g}", where=f"{where}.{key}")
    return float(value)


def _host_port(text: Any, where: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` (:func:`lu2k.inet.split_hostport`)."""
    if not isinstance(text, str) or ":" not in text:
        raise ConfigError(f"expected 'host:port', got {text!r}", where=where)
    return split_hostport(text, where)


def tune(settings: BackendSettings) -> UdtTuning:
    """Check a net's udt options and size everything from its profile; ConfigError says where."""
    where = f"net {settings.net}.options"
    opts = dict(settings.options)
    unknown = sorted(set(opts) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"unknown udt option(s) {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_KEYS))})", where=where)
    cc = opts.get("cc", "lu2k-rate")
    if cc not in CCS:
        raise ConfigError(f"unknown congestion control {cc!r} (choose from {', '.join(CCS)})", where=f"{where}.cc")
    cipher = check_cipher(str(opts.get("cipher", CIPHERS[0])), where=f"{where}.cipher")
    prof = settings.profile
    mss = int(_num(opts, "mss", 1500, where, 576, 65536))
    fec = parse_fec(opts.get("fec", "off"), f"{where}.fec", rtt_s=prof.rtt_ms / 1e3 if prof.rtt_ms else None)
    if fec.enabled:
        mss -= FEC_OVERHEAD  # the repair frame of a group of full packets must fit the path too

    bdp = prof.bdp_bytes(default=0)
    max_frame = MAX_HEADER_SIZE + settings.max_message_size + TAG_SIZE
    buffer = int(_num(opts, "buffer", max(8 * bdp, 2 * max_frame, MIN_BUFFER), where, 1 << 16, 1 << 31))
    if buffer < max_frame + mss:
        # UDT refuses a message larger than the whole send buffer.
        raise ConfigError(f"buffer {buffer} cannot hold the largest frame ({max_frame} bytes)", where=f"{where}.buffer")
    payload = mss - UDT_HEADERS
    flight = int(_num(opts, "flight_window", -(-buffer // payload), where, 32, 1 << 24))
    udp_buffer = int(_num(opts, "udp_buffer", min(max(bdp, 1 << 20), MAX_UDP_BUFFER), where, 1 << 16, 1 << 30))

    params: dict[str, float] = {}
    if cc == "lu2k-rate":
        pace = _num(opts, "pace_fraction", 0.97, where, 0.1, 1.0)
        default_rate = prof.rate_mbit * pace if prof.rate_mbit else 0.0
        rate = _num(opts, "rate_mbit", default_rate, where, 0.0, 1e6)
        params["target_bps"] = rate * 1e6
        params["min_bps"] = _num(opts, "min_rate_mbit", 0.25, where, 0.001, 1e6) * 1e6
        params["max_bps"] = _num(opts, "max_rate_mbit", max(10000.0, rate), where, 0.001, 1e6) * 1e6
        if params["max_bps"] < params["min_bps"]:
            raise ConfigError("max_rate_mbit below min_rate_mbit", where=f"{where}.max_rate_mbit")
        params["heavy_loss"] = _num(opts, "heavy_loss", max(0.10, 4 * (prof.loss or 0.0)), where, 0.0, 1.0)
        params["rtt_slack"] = _num(opts, "rtt_slack", 0.2, where, 0.0, 10.0)
        params["cwnd_pkts"] = float(flight)
        params["min_rto_us"] = _num(opts, "min_rto_ms", 300.0, where, 10.0, 600000.0) * 1e3
        if prof.rtt_ms:
            params["rtt_hint_us"] = prof.rtt_ms * 1e3
    else:
        for key in ("rate_mbit", "pace_fraction", "min_rate_mbit", "max_rate_mbit", "heavy_loss", "rtt_slack", "min_rto_ms"):
            if key in opts:
                raise ConfigError(f"{key} applies to cc lu2k-rate only", where=f"{where}.{key}")

    rendezvous = opts.get("rendezvous", False)
    if not isinstance(rendezvous, bool):
        raise ConfigError(f"expected true or false, got {rendezvous!r}", where=f"{where}.rendezvous")
    rdv_port = int(_num(opts, "rendezvous_port", (settings.port + 1) if settings.port else 0, where, 0, 65535))
    peers_raw = opts.get("rendezvous_peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError("expected a list of 'host:port'", where=f"{where}.rendezvous_peers")
    peers = tuple(_host_port(p, f"{where}.rendezvous_peers[{i}]") for i, p in enumerate(peers_raw))
    if peers and not rendezvous:
        raise ConfigError("rendezvous_peers needs rendezvous: true", where=f"{where}.rendezvous_peers")
    if fec.enabled and rendezvous:
        raise ConfigError("fec and rendezvous cannot be combined on udt (the FEC relay owns the net's port)", where=f"{where}.fec")

    return UdtTuning(
        cc=cc, cc_params=params, mss=mss, buffer=buffer, flight_window=flight, udp_buffer=udp_buffer, cipher=cipher,
        max_frame=max_frame, recv_queue=int(_num(opts, "recv_queue", 64, where, 1, 1 << 16)),
        handshake_timeout=_num(opts, "handshake_timeout", 10.0, where, 0.1, 3600.0),
        dead_peer_s=_num(opts, "dead_peer_s", max(10.0, 10 * (prof.rtt_ms or 0) / 1e3), where, 1.0, 86400.0),
        rendezvous=rendezvous, rendezvous_port=rdv_port, rendezvous_peers=peers, fec=fec,
    )
