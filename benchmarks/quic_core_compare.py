"""QUIC cores alone, in memory: aioquic (lu2k's QUIC core) against qh3, CPU per Mbit/s.

A client and a server connection of the same library, joined in one process with no sockets
and no event loop (both are sans-I/O: datagrams in, datagrams out), move ``--megabytes`` of
stream data; the figure is goodput per CPU-second, i.e. the Mbit/s one core sustains for
*both ends together* (one end alone costs about half).  It measures only the QUIC state
machines, packet protection and recovery: what a faster core could at best save the
``quic`` backend.  Each library with its default congestion control, and both with
datagrams of ``--max-datagram-size`` bytes (default 1472, the quic backend's on IPv4), so
that the figures compare the cost per datagram.  The printed line names the library's
version: qh3 1.x keeps its connection, packet builder, recovery and congestion controller
in Python (with buffers, ranges, stream sending and packet protection in Rust), qh3 2.x has
its connection core in Rust and no congestion-control hook.

With ``--cc bbr`` both ends run lu2k's BBR instead of the library's own controller, with
its pacer: on aioquic through lu2k's adapter (``lu2k.cc.aioquic_adapter``), on qh3 1.x by
putting the controller and the pacer where its recovery keeps its own (:class:`Qh3Controller`,
a measurement-only adapter: qh3 1.x calls its controller with positional arguments and its
sent packets have ``__slots__``).  qh3 2.x has no such place and is skipped.

    pip install qh3          # or 'qh3<2' for the 1.x line, in another environment
    PYTHONPATH=$PWD python benchmarks/quic_core_compare.py --megabytes 64 [--cc bbr]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lu2k.certs import cert_pem, key_pem, make_certificate, make_key  # noqa: E402

CHUNK = 64 * 1024


def _certs(wd: Path) -> tuple[str, str]:
    key = make_key()
    cert = make_certificate(key, "localhost", sans=["localhost"])
    (wd / "c.pem").write_bytes(cert_pem(cert))
    (wd / "k.pem").write_bytes(key_pem(key))
    return str(wd / "c.pem"), str(wd / "k.pem")


class Qh3Controller:
    """lu2k's controller where qh3 1.x's recovery keeps its own (``_loss._cc``); records by packet number."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self.ssthresh = None
        self._now = 0.0
        self._records: dict[int, Any] = {}

    @property
    def congestion_window(self) -> int:
        return int(self.controller.cwnd)

    @property
    def bytes_in_flight(self) -> int:
        return int(self.controller.bytes_in_flight)

    @bytes_in_flight.setter
    def bytes_in_flight(self, _value: int) -> None:
        pass  # only a lost PMTU probe; none is lost in memory

    def on_packet_sent(self, packet: Any) -> None:
        now = packet.sent_time if packet.sent_time is not None else self._now
        self._now = max(self._now, now)
        self._records[packet.packet_number] = self.controller.on_sent(now, packet.sent_bytes, False)

    def on_packet_acked(self, packet: Any, now: float) -> None:
        self._now = max(self._now, now)
        record = self._records.pop(packet.packet_number, None)
        if record is not None:
            self.controller.on_acked(now, record)

    def on_packets_lost(self, packets: Any, now: float) -> None:
        self._now = max(self._now, now)
        for packet in packets:
            record = self._records.pop(packet.packet_number, None)
            if record is not None:
                self.controller.on_lost(now, record)

    def on_packets_expired(self, packets: Any) -> None:
        for packet in packets:
            record = self._records.pop(packet.packet_number, None)
            if record is not None:
                self.controller.on_discarded(record)

    def on_persistent_congestion(self, now: float) -> None:
        self.controller.on_persistent_congestion(now)

    def on_rtt_measurement(self, latest_rtt: float, now: float) -> None:
        self._now = max(self._now, now)


def _use_lu2k_bbr(lib: str, conn: Any, datagram_size: int) -> None:
    """Give a freshly made connection lu2k's BBR and its pacer (before its first packet)."""
    from lu2k.cc import create_controller
    from lu2k.cc.aioquic_adapter import ControllerPacer, install_pacer

    if lib == "aioquic":
        install_pacer(conn)  # the controller came from the configuration's algorithm name
        return

    class Pacer(ControllerPacer):
        def start_pacing(self, now: float, congestion_window: int, smoothed_rtt: float) -> None:
            self._refresh()

    controller = create_controller("bbr", mss=datagram_size)
    conn._loss._cc = Qh3Controller(controller)
    conn._loss._pacer = Pacer(max_datagram_size=datagram_size, controller=controller)


def run(lib: str, megabytes: int, cert: str, key: str, datagram_size: int, lu2k_bbr: bool = False) -> dict[str, Any]:
    conf_mod = importlib.import_module(f"{lib}.quic.configuration")
    conn_mod = importlib.import_module(f"{lib}.quic.connection")
    events = importlib.import_module(f"{lib}.quic.events")
    extra: dict[str, Any] = {}
    if lu2k_bbr and lib == "aioquic":
        from lu2k.cc.aioquic_adapter import algorithm_name

        extra["congestion_control_algorithm"] = algorithm_name("bbr")
    cc = conf_mod.QuicConfiguration(is_client=True, alpn_protocols=["lu2k"], server_name="localhost", verify_mode=0,
                                    max_datagram_size=datagram_size, **extra)
    sc = conf_mod.QuicConfiguration(is_client=False, alpn_protocols=["lu2k"], max_datagram_size=datagram_size, **extra)
    sc.load_cert_chain(cert, key)
    for c in (cc, sc):
        c.max_data = c.max_stream_data = 64 << 20
    now = 0.0
    client = conn_mod.QuicConnection(configuration=cc)
    if lu2k_bbr:
        _use_lu2k_bbr(lib, client, datagram_size)
    server: Any = None
    caddr, saddr = ("127.0.0.1", 1), ("127.0.0.1", 2)
    client.connect(saddr, now=now)
    total = megabytes << 20
    payload = os.urandom(CHUNK)
    sid: int | None = None
    sent = got = packets = 0

    def pump(src: Any, src_addr: Any) -> int:
        nonlocal packets, server
        n = 0
        for data, _addr in src.datagrams_to_send(now=now):
            if src is client:
                if server is None:  # created on the first datagram: its long header names the original CID
                    server = conn_mod.QuicConnection(configuration=sc, original_destination_connection_id=bytes(data[6 : 6 + data[5]]))
                    if lu2k_bbr:
                        _use_lu2k_bbr(lib, server, datagram_size)
                server.receive_datagram(data, src_addr, now=now)
            else:
                client.receive_datagram(data, src_addr, now=now)
            n += 1
        packets += n
        return n

    cpu0 = time.process_time()
    while got < total:
        now += 0.0002
        ev = client.next_event()
        while ev is not None:
            if isinstance(ev, events.HandshakeCompleted):
                sid = client.get_next_available_stream_id()
            ev = client.next_event()
        while sid is not None and sent < total and sent - got < (8 << 20):
            client.send_stream_data(sid, payload, end_stream=False)
            sent += CHUNK
        moved = pump(client, caddr)
        if server is not None:
            ev = server.next_event()
            while ev is not None:
                if isinstance(ev, events.StreamDataReceived):
                    got += len(ev.data)
                ev = server.next_event()
            moved += pump(server, saddr)
        if not moved:
            timers = [t for t in (client.get_timer(), server.get_timer() if server is not None else None) if t is not None]
            if timers:
                now = max(now, min(timers))
                for c in (client, server):
                    if c is not None and (t := c.get_timer()) is not None and t <= now:
                        c.handle_timer(now=now)
    cpu = time.process_time() - cpu0
    return {"lib": lib, "version": getattr(importlib.import_module(lib), "__version__", "?"), "cc": "lu2k bbr" if lu2k_bbr else "own",
            "megabytes": megabytes,
            "max_datagram_size": datagram_size, "cpu_s": round(cpu, 3), "mbit_per_core": round(total * 8 / 1e6 / cpu, 1),
            "datagrams": packets, "us_per_datagram": round(cpu * 1e6 / max(packets, 1), 2),
            # which controller the sender ended with, and what it holds: proof it was the one in charge
            "sender_controller": type(getattr(client._loss._cc, "controller", client._loss._cc)).__name__,
            "sender_cwnd": int(client._loss._cc.congestion_window)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--megabytes", type=int, default=64)
    ap.add_argument("--libs", nargs="*", default=["aioquic", "qh3"])
    ap.add_argument("--max-datagram-size", type=int, default=1472, help="both libraries' datagram size (1200..65000)")
    ap.add_argument("--cc", choices=("own", "bbr"), default="own", help="each library's own controller, or lu2k's BBR on both ends")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.megabytes < 1 or not 1200 <= args.max_datagram_size <= 65000:
        print("--megabytes must be at least 1 and --max-datagram-size 1200..65000", file=sys.stderr)
        return 2
    out = []
    with tempfile.TemporaryDirectory() as wd:
        cert, key = _certs(Path(wd))
        for lib in args.libs:
            try:
                importlib.import_module(lib)
            except ImportError:
                print(f"{lib}: not installed", file=sys.stderr)
                continue
            if args.cc == "bbr" and lib == "qh3" and importlib.util.find_spec("qh3.quic.recovery") is None:
                print("qh3: this version keeps its controller in its Rust core; lu2k's cannot be put in", file=sys.stderr)
                continue
            r = run(lib, args.megabytes, cert, key, args.max_datagram_size, args.cc == "bbr")
            out.append(r)
            print(f"{lib:8s} {r['version']:7s} {r['cc']:8s} {r['megabytes']} MiB: {r['cpu_s']} CPU-s, {r['mbit_per_core']} Mbit/s per core (both ends), "
                  f"{r['datagrams']} datagrams of up to {r['max_datagram_size']} B, {r['us_per_datagram']} us each; "
                  f"sender's controller {r['sender_controller']}, cwnd {r['sender_cwnd']}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
