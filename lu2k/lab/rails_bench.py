"""``lu2k bench rails``: one peer over two rails (GEO-like and LEO-like paths), against each rail alone.

One lab with two paths (:mod:`lu2k.lab.netns`, ``extra_paths``), one ``lu2kd`` per namespace
with one net per path.  In one run:

1. *single-rail baselines*: the daemons know no multi-rail peer; a bulk stream to the peer's
   NID on path 0, then on path 1 -- each rail alone, as it is without multi-rail -- and the
   small stamped messages of step 3 while bulk fills path 1 alone (what the low-RTT rail
   gives them by itself);
2. *two rails*: the daemons restarted with a ``peer:`` section listing both NIDs of the other
   side (``primary nid`` + ``peer ni``); the same bulk stream, now spread over both rails;
   aggregate goodput against the sum of the two paths' rates;
3. *small messages under bulk*: while the bulk stream fills both rails, a paced stream of
   small stamped messages on its own portal; their one-way latency p50/p99 against path 1
   alone (step 1) and each path's one-way delay (the policy puts them on the lowest-RTT rail);
4. *a rail cut*: the bulk stream with a fixed message count; once it is under way path 1 (the
   LEO-like rail) goes down both ways for ``--cut`` seconds, then comes back.  Reported: lost
   and duplicated messages (both must be 0), every completion's status, the goodput series
   around the cut, and how long after the cut goodput was back to the surviving rail's rate.

The rail cut is noticed by the transport (the QUIC backend's ``dead_timeout``, set short
here); what was in flight on the dead rail goes again on the other one.  The helpers that run
inside the namespaces are this module's ``python -m lu2k.lab.rails_bench`` subcommands; each
prints one JSON line as its result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, Lu2kError, NetworkError
from .bench import LabDaemons, backend_options, net_type_for
from .netns import Lab, Specs, child_env
from .spec import build_specs

LAB_TAG = "rl"  # lab ids (and so namespace and device names) of this benchmark start with it


def lab_id() -> str:
    import secrets

    return LAB_TAG + secrets.token_hex(3)


SMALL_PORTAL = 7  # small stamped messages go here, apart from the bulk stream's portal 0
SMALL_FROM_PORTAL = 8


# --- the daemons ------------------------------------------------------------------------------------


def rail_nid(lab: Lab, side: str, path: int, nettype: str) -> str:
    return f"{lab.address(side, path)}@{nettype if path == 0 else f'{nettype}{path}'}"


def rail_config(lab: Lab, side: str, workdir: Path, *, multirail: bool, backend: str = "quic", peer_credits: int | None = None,
                options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One daemon's config: a net per lab path with that path's profile; with ``multirail`` a
    ``peer:`` entry naming the other side's NIDs (primary on path 0).  Credits are derived from
    each path's profile (two BDPs per peer) unless ``peer_credits`` is given: more than that
    only queues bulk in the transport, where small messages wait behind it."""
    from ..localpair import daemon_config
    from .bench import KEY, LU2K_PORT, net_type_for

    nettype = net_type_for(backend)
    other = "b" if side == "a" else "a"
    nets = []
    cfg: dict[str, Any] = {}
    for p, (ab, _) in enumerate(lab.state.paths):
        nid = rail_nid(lab, side, p, nettype)
        profile = {"rtt_ms": ab.rtt_s * 1e3, "rate_mbit": ab.rate_bps / 1e6, "loss": min(ab.mean_loss, 0.5)}
        extra_net: dict[str, Any] = {"profile": profile, "key": KEY}
        if options:
            extra_net["options"] = dict(options)
        if peer_credits:
            tunables = {"peer_credits": peer_credits, "credits": max(1024, 4 * peer_credits)}
        else:  # the embedded default config names LNet's 8: derive them from this path's profile here
            from ..backends.base import LinkProfile
            from ..settings import derive_link_defaults

            derived = derive_link_defaults(LinkProfile(rtt_ms=profile["rtt_ms"], rate_mbit=profile["rate_mbit"]))
            tunables = {k: derived[k] for k in ("peer_credits", "credits") if k in derived}
        cfg = daemon_config(nid, LU2K_PORT, workdir / side, backend=backend, extra_net=extra_net, tunables=tunables)
        nets.append(cfg["net"][0])
    (workdir / side).mkdir(exist_ok=True)
    cfg["net"] = nets
    if multirail:
        nids = [rail_nid(lab, other, p, nettype) for p in range(lab.n_paths)]
        cfg["peer"] = [{"primary nid": nids[0], "Multi-Rail": True, "peer ni": [{"nid": n} for n in nids]}]
    return cfg


class RailDaemons(LabDaemons):
    """``lu2kd`` in each namespace with one net per lab path (what :func:`lu2k.lab.bench.transfer` needs);
    started, stopped and read as :class:`~lu2k.lab.bench.LabDaemons`."""

    def __init__(self, lab: Lab, workdir: Path, *, multirail: bool, backend: str = "quic", peer_credits: int | None = None,
                 options: dict[str, Any] | None = None) -> None:  # the configs differ from LabDaemons': its __init__ is not used
        from ..localpair import DaemonProcess

        self.lab = lab
        nettype = net_type_for(backend)
        self.rails = {s: [rail_nid(lab, s, p, nettype) for p in range(lab.n_paths)] for s in ("a", "b")}
        self.nids = {s: self.rails[s][0] for s in ("a", "b")}
        opts = {"a": dict(options or {}), "b": dict(options or {})}
        certs = backend_options(backend, lab, workdir)
        for s in opts:
            opts[s].update(certs[s])
        self.procs: dict[str, Any] = {}
        tag = "mr" if multirail else "sr"
        for side in ("a", "b"):
            cfg = rail_config(lab, side, workdir, multirail=multirail, backend=backend, peer_credits=peer_credits, options=opts[side])
            path = workdir / f"lu2kd-{tag}-{side}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            self.procs[side] = DaemonProcess(self.rails[side][0], path, cfg["lu2k"]["shim"]["path"],
                                             cfg["lu2k"]["control"]["path"], workdir / f"lu2kd-{tag}-{side}.log")

    def peers(self, side: str) -> list[dict[str, Any]]:
        """What ``lu2kctl peer show`` reads from one daemon (its control socket is a file: no namespace needed)."""
        import asyncio

        from ..control import request

        return list(asyncio.run(request(str(self.procs[side].control_path), "peer show")))


def transfer_with_cut(lab: Lab, daemons: Any, *, path: int, cut_s: float, start_bytes: int, **transfer_args: Any) -> tuple[dict[str, Any], float]:
    """:func:`lu2k.lab.bench.transfer` with ``path`` down both ways for ``cut_s`` seconds once
    ``start_bytes`` went over it (progress seen by the emulator, not a guessed time).  The
    transfer's result and the time of the cut relative to the transfer's start."""
    from .bench import transfer

    out: dict[str, Any] = {}
    t0 = time.monotonic()

    def run() -> None:
        try:
            out["r"] = transfer(lab, daemons, **transfer_args)
        except Exception as e:  # handed to the caller below
            out["e"] = e

    # A daemon thread, joined only on the way out of a normal return: a caller interrupted
    # (a signal, a test's time limit) goes on to tear the lab down, which ends the transfer.
    t = threading.Thread(target=run, daemon=True)
    t.start()
    cut_at = 0.0
    base = lab.stats()["paths"][path]["links"]["ab"]["bytes_in"]  # the lab's counters run from its start
    try:
        while lab.stats()["paths"][path]["links"]["ab"]["bytes_in"] - base < start_bytes and t.is_alive():
            time.sleep(0.05)
        cut_at = time.monotonic() - t0
        lab.set_link(False, path=path)
        time.sleep(cut_s)
    finally:
        lab.set_link(True, path=path)
    t.join(600)
    if t.is_alive():
        raise NetworkError("transfer across the rail cut did not finish")
    if "e" in out:
        raise out["e"]
    return out["r"], cut_at


# --- small messages on their own portal ---------------------------------------------------------------


def _small_receiver(args: argparse.Namespace) -> dict[str, Any]:
    from ..kernel_shim.endpoint import Endpoint
    from .latency import STAMP

    samples: list[float] = []
    seen: set[int] = set()
    dups = 0
    with Endpoint.attach(args.socket, portal=SMALL_PORTAL) as ep:
        print("listening", flush=True)
        deadline = time.monotonic() + args.max_time
        while len(seen) < args.count and time.monotonic() < deadline:
            msg = ep.recv(timeout=0.2)
            if msg is None:
                continue
            with msg:
                now = time.monotonic()
                seq, scheduled = STAMP.unpack_from(msg.payload)
                if seq in seen:
                    dups += 1
                    continue
                seen.add(seq)
                if seq >= args.skip:
                    samples.append(now - scheduled)
    return {"received": len(seen), "duplicates": dups, "missing": args.count - len(seen), "samples": samples}


def _small_sender(args: argparse.Namespace) -> dict[str, Any]:
    from ..kernel_shim.endpoint import Endpoint
    from .bench import tx_pool_bytes
    from .latency import STAMP, Completions, Schedule, _sleep_until

    done = Completions()

    with Endpoint.attach(args.socket, portal=SMALL_FROM_PORTAL, tx_pool_bytes=tx_pool_bytes(args.size, 256)) as ep:
        sched = Schedule(time.monotonic() + 0.2, args.interval)
        for k in range(args.count):
            due = sched.due(k)
            _sleep_until(due)
            slot = ep.reserve(args.size, timeout=30)
            STAMP.pack_into(slot.view, 0, k, due)
            done.pending.append(slot.post(args.to, portal=SMALL_PORTAL))
            ep.poll()
            done.settle(block=False)
        done.drain()
    return done.summary(args.count)


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "lu2k.lab.rails_bench", *args]


def small_under_bulk(lab: Lab, daemons: Any, *, size: int, interval: float, count: int, skip: int,
                     bulk_window: int, bulk_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A paced stream of small stamped messages while a bulk stream fills the rails."""
    from .bench import _communicate, _last_json, transfer

    env = child_env()
    bulk: dict[str, Any] = {}
    duration = count * interval + 2.0

    def run_bulk() -> None:
        try:
            bulk["r"] = transfer(lab, daemons, size=bulk_size, window=bulk_window, warmup=0.5, duration=duration)
        except Exception as e:
            bulk["e"] = e

    t = threading.Thread(target=run_bulk, daemon=True)  # joined below on a normal return only, as in transfer_with_cut
    t.start()
    time.sleep(2.0)  # the bulk stream is under way
    recv = lab.popen("b", _argv("small-receiver", "--socket", daemons.shim("b"), "--count", str(count), "--skip", str(skip),
                                "--max-time", str(duration + 60)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    send = None
    try:
        assert recv.stdout is not None
        line = recv.stdout.readline().strip()
        if line != "listening":
            raise NetworkError(f"small receiver did not start: {line}")
        send = lab.popen("a", _argv("small-sender", "--socket", daemons.shim("a"), "--to", daemons.nids["b"], "--size", str(size),
                                    "--interval", repr(interval), "--count", str(count)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        r_out, r_err = _communicate(recv, duration + 120)
        s_out, s_err = _communicate(send, 180)
    finally:
        for p in (recv, send):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    t.join(duration + 300)
    if "e" in bulk:
        raise bulk["e"]
    return _last_json(r_out + r_err, "small receiver"), {"sender": _last_json(s_out + s_err, "small sender"), "bulk": bulk.get("r", {})}


# --- the benchmark -----------------------------------------------------------------------------------


def _small_figures(recv: dict[str, Any], extra: dict[str, Any], size: int, rate: float) -> dict[str, Any]:
    from .latency import percentiles

    return {"size": size, "rate_per_s": rate, **percentiles(recv.get("samples", [])), "received": recv["received"],
            "missing": recv["missing"], "duplicates": recv["duplicates"], "sender": extra["sender"],
            "bulk_goodput_mbit": (extra["bulk"].get("goodput_bps") or 0) / 1e6}


def longest_stall(series: list[float], bin_s: float, floor_mbit: float) -> float:
    """The longest stretch, in seconds, of goodput bins below ``floor_mbit`` (the last bin,
    which is partial, left out): how long goodput took to come back after the cut."""
    longest = run = 0
    for v in series[:-1]:
        run = run + 1 if v < floor_mbit else 0
        longest = max(longest, run)
    return round(longest * bin_s, 3)


def run_rails(geo: Specs, leo: Specs, *, duration: float = 10.0, warmup: float = 2.0, cut: float = 30.0, size: int = 65536,
              window: int = 512, small_size: int = 512, small_rate: float = 20.0, backend: str = "quic",
              log: Any = None) -> dict[str, Any]:
    """Everything of the module docstring in one lab; one JSON-able dict."""
    from .bench import transfer

    if duration <= 0 or warmup < 0 or cut < 0 or size < 64 or window < 1 or small_rate <= 0:
        raise ConfigError("durations must be positive, --size >= 64, --window >= 1", where="bench rails")

    def say(msg: str) -> None:
        if log is not None:
            print(msg, file=log, flush=True)

    wd = Path(tempfile.mkdtemp(prefix="lu2k-rails-"))
    out: dict[str, Any] = {"backend": backend, "size": size, "window": window, "duration_s": duration, "warmup_s": warmup,
                           "cut_s": cut, "load_average_start": os.getloadavg()}
    rates = [geo[0].rate_bps / 1e6, leo[0].rate_bps / 1e6]
    out["paths"] = [{"rate_mbit": rates[i], "rtt_ms": s[0].rtt_s * 1e3, "loss": s[0].mean_loss} for i, s in enumerate((geo, leo))]
    # A rail is dead when its transport hears nothing for this long (QUIC keepalives every 1/4 of it).
    options = {"dead_timeout": max(1.5, 3 * leo[0].rtt_s), "keepalive": max(0.3, leo[0].rtt_s)} if backend == "quic" else {}
    try:
        with Lab(geo, lab_id=lab_id(), extra_paths=[leo]) as lab:
            say(f"lab {lab.lab_id}: path 0 {rates[0]:g} Mbit/s RTT {geo[0].rtt_s * 1e3:g} ms, path 1 {rates[1]:g} Mbit/s "
                f"RTT {leo[0].rtt_s * 1e3:g} ms")
            base = []
            (wd / "sr").mkdir()
            count = int(max(duration, 5.0) * small_rate)
            with RailDaemons(lab, wd / "sr", multirail=False, backend=backend, options=options) as d:
                for p in (0, 1):
                    d.nids = {"a": d.rails["a"][p], "b": d.rails["b"][p]}
                    say(f"single rail, path {p}")
                    r = transfer(lab, d, size=size, window=window, warmup=warmup, duration=duration)
                    base.append({"path": p, "goodput_mbit": r["goodput_bps"] / 1e6, "duplicates": r["duplicates"], "cpu": r.get("cpu")})
                # What the small messages get from the low-RTT rail alone while bulk fills it: the
                # two-rail figure below is held to this one, not to the path's bare one-way delay.
                say("small messages while bulk fills path 1 alone")
                recv, extra = small_under_bulk(lab, d, size=small_size, interval=1 / small_rate, count=count, skip=int(small_rate),
                                               bulk_window=window, bulk_size=size)
                out["small_under_bulk_path1_alone"] = _small_figures(recv, extra, small_size, small_rate)
            out["single_rail"] = base
            (wd / "mr").mkdir()
            with RailDaemons(lab, wd / "mr", multirail=True, backend=backend, options=options) as d:
                say("two rails")
                r = transfer(lab, d, size=size, window=window, warmup=warmup, duration=duration)
                total = r["goodput_bps"] / 1e6
                out["two_rails"] = {"goodput_mbit": total, "sum_of_limits_mbit": sum(rates), "of_sum": total / sum(rates),
                                    "vs_best_single": total / max(b["goodput_mbit"] for b in base), "duplicates": r["duplicates"],
                                    "cpu": r.get("cpu"),
                                    "peers_a": d.peers("a")}
                say("small messages while bulk fills both rails")
                recv, extra = small_under_bulk(lab, d, size=small_size, interval=1 / small_rate, count=count, skip=int(small_rate),
                                               bulk_window=window, bulk_size=size)
                out["small_under_bulk"] = {**_small_figures(recv, extra, small_size, small_rate),
                                           "one_way_ms": [geo[0].rtt_s * 500, leo[0].rtt_s * 500]}
                say(f"rail cut: path 1 down for {cut:g} s mid-transfer")
                n = int((cut + 2 * duration) * sum(rates) * 1e6 / 8 / size)
                r, cut_at = transfer_with_cut(lab, d, path=1, cut_s=cut, start_bytes=2 << 20, size=size, window=window, count=n,
                                              verify=True, timeout=cut + 20 * duration + 300)
                series = r.get("series_mbit") or []
                bin_s = float(r.get("bin_s") or 1.0)
                out["rail_cut"] = {"messages": n, "received": r["messages"], "lost": n - r["messages"], "duplicates": r["duplicates"],
                                   "corrupt": r["corrupt"], "sender": r["sender"], "cut_at_s": round(cut_at, 3),
                                   "longest_stall_s": longest_stall(series, bin_s, 0.5 * base[0]["goodput_mbit"]),
                                   "stall_floor_mbit": 0.5 * base[0]["goodput_mbit"],
                                   "series_mbit": series, "bin_s": bin_s, "peers_a": d.peers("a")}
            out["emulator"] = lab.stats()["paths"]
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    out["load_average_end"] = os.getloadavg()
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_rails(r: dict[str, Any]) -> str:
    from ..table import render

    rows = [[f"path {b['path']} alone", f"{b['goodput_mbit']:.2f}", f"{r['paths'][b['path']]['rate_mbit']:g}"] for b in r["single_rail"]]
    two = r["two_rails"]
    rows.append(["two rails", f"{two['goodput_mbit']:.2f}", f"{two['sum_of_limits_mbit']:g}"])
    s, alone = r["small_under_bulk"], r["small_under_bulk_path1_alone"]
    c = r["rail_cut"]
    lines = [render(["run", "goodput Mbit/s", "limit Mbit/s"], rows),
             f"two rails: {two['of_sum'] * 100:.0f}% of the sum of limits, {two['vs_best_single']:.2f}x the best single rail",
             f"small {s['size']} B under bulk: p50 {_ms(s['p50_ms'])} ms, p99 {_ms(s['p99_ms'])} ms (one-way delay GEO {s['one_way_ms'][0]:g} ms,"
             f" LEO {s['one_way_ms'][1]:g} ms), missing {s['missing']}",
             f"  the same on path 1 alone (bulk on it too): p50 {_ms(alone['p50_ms'])} ms, p99 {_ms(alone['p99_ms'])} ms",
             f"rail cut {r['cut_s']:g} s: {c['messages']} messages, lost {c['lost']}, duplicated {c['duplicates']}, "
             f"completions {c['sender'].get('delivered')} delivered / {c['sender'].get('failed')} failed, "
             f"goodput below {c['stall_floor_mbit']:.1f} Mbit/s for at most {c['longest_stall_s']} s",
             f"load average {r['load_average_start'][0]:.2f} -> {r['load_average_end'][0]:.2f} (shared machine)"]
    return "\n".join(lines)


def cmd_rails(args: argparse.Namespace) -> int:
    geo = build_specs(args.first, rate=args.rate, rtt=args.rtt, loss=args.loss, seed=args.seed)
    leo = build_specs(args.second, rate=args.second_rate, rtt=args.second_rtt, loss=args.second_loss, seed=args.seed + 1)
    try:
        r = run_rails(geo, leo, duration=args.duration, warmup=args.warmup, cut=args.cut, size=args.size, window=args.window,
                      small_size=args.small_size, small_rate=args.small_rate, backend=args.backend, log=sys.stderr)
    except Lu2kError as e:
        print(f"lu2k bench rails: {e}", file=sys.stderr)
        return 1
    print(format_rails(r))
    if args.json:
        print(json.dumps(r))
    return 0


def register_bench(bsub: Any) -> None:
    """Add ``rails`` to ``lu2k bench`` (called by :mod:`lu2k.cli.bench`)."""
    p = bsub.add_parser("rails", help="multi-rail: two rails vs each alone, a rail cut, small-message latency (needs root)")
    p.add_argument("--backend", default="quic", help="backend of both nets (quic notices a dead rail by its dead_timeout)")
    p.add_argument("--first", default="geo", help="profile of path 0 (default geo)")
    p.add_argument("--rate", help="path 0 rate, e.g. 20mbit")
    p.add_argument("--rtt", help="path 0 RTT, e.g. 600ms")
    p.add_argument("--loss", default="1%", help="path 0 loss each way (default 1%%)")
    p.add_argument("--second", default="leo", help="profile of path 1 (default leo)")
    p.add_argument("--second-rate", help="path 1 rate")
    p.add_argument("--second-rtt", help="path 1 RTT")
    p.add_argument("--second-loss", default="1%", help="path 1 loss each way (default 1%%)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds of each goodput run")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--cut", type=float, default=30.0, help="seconds path 1 is down mid-transfer (default 30)")
    p.add_argument("--size", type=int, default=65536, help="bulk message size")
    p.add_argument("--window", type=int, default=512,
                   help="bulk messages in flight (the window moves with the oldest, usually on the slow rail: "
                        "it must cover that rail's delay at the sum of the rates)")
    p.add_argument("--small-size", type=int, default=512)
    p.add_argument("--small-rate", type=float, default=20.0, help="small messages per second")
    p.add_argument("--json", action="store_true", help="last line: the result as JSON")
    p.set_defaults(func=cmd_rails)


def helper_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lu2k.lab.rails_bench", description="bench rails endpoint helpers")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("small-receiver")
    r.add_argument("--socket", required=True)
    r.add_argument("--count", type=int, required=True)
    r.add_argument("--skip", type=int, default=0)
    r.add_argument("--max-time", type=float, default=600.0)
    s = sub.add_parser("small-sender")
    s.add_argument("--socket", required=True)
    s.add_argument("--to", required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--interval", type=float, required=True)
    s.add_argument("--count", type=int, required=True)
    args = p.parse_args(argv)
    try:
        result = _small_receiver(args) if args.cmd == "small-receiver" else _small_sender(args)
    except Exception as e:  # reported to the driver as the one JSON line
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(helper_main())
