"""QUIC backend alone over the emulated satellite link: bulk goodput, per controller.  Needs root.

Runs the transport without the daemons (so it measures the backend and its congestion
controller, not the engine's windows): a receiver in lab namespace b, a bulk sender in
namespace a pushing 64 KiB MSG frames as fast as the backend's send buffer allows.  Goodput
counts MSG payload bytes received in the window after the warm-up.  CPU is each process's
user+sys time over the run, per Mbit/s of goodput.  Both processes set the garbage collector
up as lu2kd does once it serves (:mod:`lu2k.gcpolicy`).

    python benchmarks/quic_link.py --profile geo --loss 1% --cc bbr bbr-nohint rate cubic
    python benchmarks/quic_link.py --flows 2 --profile geo --loss 1%
    python benchmarks/quic_link.py --profile loopback     # CPU ceiling: no link, one core each

Prints one table; ``--json`` adds the rows as JSON.  The machine's 2 cores are shared, so
numbers taken while other jobs run are noisy (the emulator's lateness is printed to judge).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lu2k import gcpolicy, wire  # noqa: E402
from lu2k.backends.base import BackendSettings, LinkProfile  # noqa: E402
from lu2k.backends.quic import QuicBackend  # noqa: E402
from lu2k.errors import Lu2kError  # noqa: E402
from lu2k.nid import parse_net, parse_nid  # noqa: E402
from lu2k.wire import ConnType, FrameType  # noqa: E402

PORT = 7989
SIZE = 64 * 1024
CONTROLLERS = {
    # name -> backend options (the profile comes from the link)
    "bbr": {"congestion": "bbr"},
    "bbr-nohint": {"congestion": "bbr", "_no_hint": True},
    "rate": {"congestion": "rate"},
    "cubic": {"congestion": "cubic"},
    "reno": {"congestion": "reno"},
}


def _backend(args: argparse.Namespace) -> QuicBackend:
    opts = json.loads(args.options)
    no_hint = opts.pop("_no_hint", False)
    profile = LinkProfile(rtt_ms=args.rtt_ms, rate_mbit=None if no_hint else args.rate_mbit, loss=args.loss)
    if no_hint and opts.get("congestion") == "rate":
        raise SystemExit("rate needs the rate")
    if opts.get("congestion") == "rate":
        opts.setdefault("rate", args.rate_mbit)
    return QuicBackend(BackendSettings(parse_net("quic"), args.port, 8 << 20, profile=profile, options=opts))


def _hello_done(t: Any, local: str, peer: str) -> None:
    """The transport alone has no engine to run the lu2k hello; QUIC's mTLS has authenticated
    the peer, so open the transport for message streams as a finished hello would."""
    t.on_hello_done(wire.HelloResult(parse_nid(f"{peer}@quic"), parse_nid(f"{local}@quic"), ConnType.ANY, 1, wire.PROTOCOL_VERSION))


async def _receiver(args: argparse.Namespace) -> dict[str, Any]:
    backend = _backend(args)
    done = asyncio.Event()
    totals: list[int] = []
    per_second: list[int] = []
    state = {"start": None, "bytes": 0}

    async def on_accept(t: Any) -> None:
        n = 0
        _hello_done(t, "127.0.0.2", "127.0.0.1")
        while True:
            try:
                frames = await t.recv()
            except Exception:
                return
            now = time.monotonic()
            if state["start"] is None:
                state["start"] = now
            acks = []
            for f in frames:
                if f.header.type is FrameType.MSG:
                    n += len(f.payload)
                    state["bytes"] += len(f.payload)
                    acks.append((wire.decode_msg(f.header).seq, 0))
            totals.append(n)
            if acks and args.window:
                try:
                    await t.send([(wire.encode_acks(acks[i:i + 4096]), b"") for i in range(0, len(acks), 4096)])
                except Exception:
                    return

    lst = await backend.listen("0.0.0.0", args.port, on_accept)
    gcpolicy.settle()  # as lu2kd does once it serves
    print("listening", flush=True)
    cpu0 = time.process_time()
    while state["start"] is None:
        await asyncio.sleep(0.05)
    t0 = state["start"]
    await asyncio.sleep(max(0.0, t0 + args.warmup - time.monotonic()))
    b0 = state["bytes"]
    for _ in range(int(args.duration)):
        before = state["bytes"]
        await asyncio.sleep(1.0)
        per_second.append(state["bytes"] - before)
    b1 = state["bytes"]
    cpu = time.process_time() - cpu0
    lst.close()
    await backend.close()
    done.set()
    return {"goodput_mbit": (b1 - b0) * 8 / args.duration / 1e6, "series_mbit": [b * 8 / 1e6 for b in per_second],
            "cpu_s": cpu, "elapsed_s": time.monotonic() - t0}


async def _sender(args: argparse.Namespace) -> dict[str, Any]:
    backend = _backend(args)
    src, dst = parse_nid(f"{args.src}@quic").to_bytes(), parse_nid(f"{args.peer}@quic").to_bytes()
    t = await backend.connect(args.peer, args.port, ConnType.ANY, 30.0)
    _hello_done(t, args.src, args.peer)
    await asyncio.sleep(1.0)  # let the receiver's accept callback open its side before the first message stream
    gcpolicy.settle()  # as lu2kd does once it serves
    payload = os.urandom(SIZE)
    seq = 0
    end = time.monotonic() + args.warmup + args.duration + 5
    states: list[dict[str, Any]] = []
    every = args.state_every
    next_state = time.monotonic() + every
    cpu0 = time.process_time()
    window = asyncio.Semaphore(args.window) if args.window else None

    async def read_acks() -> None:
        while True:
            try:
                frames = await t.recv()
            except Lu2kError:
                return
            for f in frames:
                if f.header.type is FrameType.ACK and window is not None:
                    for _ in wire.decode_acks(f):
                        window.release()

    reader = asyncio.ensure_future(read_acks())
    while time.monotonic() < end:
        batch = []
        if window is not None:  # like the lab bench's app: at most `window` messages unacknowledged
            try:
                await asyncio.wait_for(window.acquire(), 10)
            except asyncio.TimeoutError:
                break  # no ACKs any more: the receiver is done
            seq += 1
            batch.append((wire.encode_msg_header(seq, src, dst, 0, 0, payload, False), payload))
        for _ in range(0 if window is not None else 8):
            seq += 1
            batch.append((wire.encode_msg_header(seq, src, dst, 0, 0, payload, False), payload))
        try:
            await t.send(batch)
        except Lu2kError:
            break  # the receiver finished its window and closed
        if time.monotonic() >= next_state:
            next_state += every
            st = t.stats()
            states.append({"t": round(time.monotonic() - end + args.warmup + args.duration + 5, 1)}
                          | {k: st.get(k) for k in ("srtt_ms", "cwnd", "bytes_in_flight")} | {"cc": st.get("congestion")})
            print(json.dumps(states[-1]), file=sys.stderr, flush=True)
    cpu = time.process_time() - cpu0
    reader.cancel()
    t.close()
    await backend.close()
    return {"sent_msgs": seq, "cpu_s": cpu, "states": states[-2:]}


def _role_main(args: argparse.Namespace) -> int:
    coro = _receiver(args) if args.role == "recv" else _sender(args)
    print(json.dumps(asyncio.run(coro)), flush=True)
    return 0


def run_one(lab: Any, cc: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import subprocess

    from lu2k.lab.bench import backend_options

    certs = backend_options("quic", lab, workdir)
    spec = lab.state.specs[0]
    common = ["--rtt-ms", str(spec.rtt_s * 1e3), "--rate-mbit", str(spec.rate_bps / 1e6), "--loss", str(spec.mean_loss),
              "--warmup", str(args.warmup), "--duration", str(args.duration), "--window", str(args.window),
              "--state-every", str(args.state_every)]
    me = [sys.executable, str(Path(__file__).resolve())]
    recv_opts = dict(CONTROLLERS[cc]) | certs["b"]
    recvs, sends = [], []
    for i in range(args.flows):
        port = PORT + i
        r = lab.popen("b", me + ["--role", "recv", "--port", str(port), "--options", json.dumps(recv_opts)] + common,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert r.stdout is not None
        line = r.stdout.readline().strip()
        if line != "listening":
            raise SystemExit(f"receiver failed: {line} {r.stderr.read() if r.stderr else ''}")
        recvs.append(r)
    for i in range(args.flows):
        send_opts = dict(CONTROLLERS[cc]) | certs["a"]
        sends.append(lab.popen("a", me + ["--role", "send", "--port", str(PORT + i), "--peer", lab.addr_b, "--src", lab.addr_a,
                                          "--options", json.dumps(send_opts)] + common,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rows = []
    for i, (r, s) in enumerate(zip(recvs, sends)):
        r_out, r_err = r.communicate(timeout=args.warmup + args.duration + 120)
        s_out, s_err = s.communicate(timeout=120)
        if args.trace:
            Path(f"{args.trace}.{cc}.{i}").write_text(s_err)
        try:
            rr = json.loads(r_out.strip().splitlines()[-1])
            ss = json.loads(s_out.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise SystemExit(f"flow {i} failed:\n{r_err[-2000:]}\n{s_err[-2000:]}") from None
        rows.append({"cc": cc, "flow": i, "goodput_mbit": rr["goodput_mbit"], "series_mbit": rr["series_mbit"],
                     "recv_cpu_s": rr["cpu_s"], "send_cpu_s": ss["cpu_s"], "elapsed_s": rr["elapsed_s"], "sender_state": ss["states"]})
    return {"rows": rows, "lab": lab.stats()}


class _Loopback:
    """Stands in for a lab: both roles on 127.0.0.1, no emulated link (CPU-bound ceiling)."""

    addr_a = addr_b = "127.0.0.1"
    n_paths = 1

    def address(self, side: str, path: int = 0) -> str:
        return "127.0.0.1"

    class state:  # noqa: N801 - mimics Lab.state
        addr = {"a": "127.0.0.1", "b": "127.0.0.1"}

    def popen(self, side: str, argv: list[str], **kw: Any) -> Any:
        import subprocess

        return subprocess.Popen(argv, **kw)


def loopback(args: argparse.Namespace) -> int:
    """The highest rate one core sustains: configured-rate control far above what the CPU
    can do, over loopback, so each process runs flat out; CPU is per process (one core each)."""
    import subprocess

    from lu2k.lab.bench import backend_options

    with tempfile.TemporaryDirectory() as wd:
        certs = backend_options("quic", _Loopback(), Path(wd))  # type: ignore[arg-type]
        common = ["--rtt-ms", str(args.rtt_ms or 1), "--rate-mbit", str(args.rate_mbit or 2000), "--loss", "0",
                  "--warmup", str(args.warmup), "--duration", str(args.duration), "--port", str(args.port)]
        me = [sys.executable, str(Path(__file__).resolve())]
        opts = {"congestion": "rate"}
        r = subprocess.Popen(me + ["--role", "recv", "--options", json.dumps(opts | certs["b"])] + common,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert r.stdout is not None
        if r.stdout.readline().strip() != "listening":
            raise SystemExit(r.stderr.read() if r.stderr else "receiver failed")
        snd = subprocess.Popen(me + ["--role", "send", "--peer", "127.0.0.1", "--src", "127.0.0.1",
                                     "--options", json.dumps(opts | certs["a"])] + common,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        r_out, r_err = r.communicate(timeout=args.warmup + args.duration + 120)
        s_out, s_err = snd.communicate(timeout=120)
    rr = json.loads(r_out.strip().splitlines()[-1])
    ss = json.loads(s_out.strip().splitlines()[-1])
    g = rr["goodput_mbit"]
    elapsed = rr["elapsed_s"]
    recv_cpu, send_cpu = rr["cpu_s"] / elapsed, ss["cpu_s"] / elapsed
    print(f"loopback: {g:.1f} Mbit/s; sender CPU {send_cpu * 100:.0f}% of a core, receiver {recv_cpu * 100:.0f}% "
          f"({send_cpu * 100 / g:.2f} / {recv_cpu * 100 / g:.2f} % of a core per Mbit/s)")
    if args.json:
        print(json.dumps({"goodput_mbit": g, "send_cpu": send_cpu, "recv_cpu": recv_cpu, "series_mbit": rr["series_mbit"]}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=["recv", "send"])
    ap.add_argument("--port", type=int, default=PORT)
    ap.add_argument("--peer")
    ap.add_argument("--src")
    ap.add_argument("--options", default="{}")
    ap.add_argument("--rtt-ms", type=float)
    ap.add_argument("--rate-mbit", type=float)
    ap.add_argument("--loss", default="0")
    ap.add_argument("--profile", default="geo")
    ap.add_argument("--rate")
    ap.add_argument("--rtt")
    ap.add_argument("--queue")
    ap.add_argument("--cc", nargs="*", default=["bbr"], choices=sorted(CONTROLLERS))
    ap.add_argument("--flows", type=int, default=1)
    ap.add_argument("--window", type=int, default=0, help="messages unacknowledged at once (0: bulk, no app window)")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--state-every", type=float, default=5.0, help="seconds between the sender's controller snapshots")
    ap.add_argument("--trace", help="write each sender's snapshots (JSON lines) to TRACE.<cc>.<flow>")
    args = ap.parse_args()
    if args.role:
        args.loss = float(args.loss)
        return _role_main(args)

    if args.profile == "loopback":
        return loopback(args)

    from lu2k.lab.netns import Lab
    from lu2k.lab.spec import build_specs

    specs = build_specs(args.profile, rate=args.rate, rtt=args.rtt, loss=args.loss, queue=args.queue)
    out = []
    for cc in args.cc:
        with Lab(specs) as lab, tempfile.TemporaryDirectory() as wd:
            res = run_one(lab, cc, args, Path(wd))
        spec = specs[0]
        limit = spec.rate_bps / 1e6 * (1 - spec.mean_loss)
        for row in res["rows"]:
            row.update(link_mbit=spec.rate_bps / 1e6, loss=spec.mean_loss, rtt_ms=spec.rtt_s * 1e3, limit_mbit=limit, emulator=res["lab"],
                       lateness_p99_ms=round(res["lab"].get("links", {}).get("ab", {}).get("lateness", {}).get("p99_us", 0) / 1e3, 1))
            out.append(row)
            g = row["goodput_mbit"]
            cpu = (row["recv_cpu_s"] + row["send_cpu_s"]) / row["elapsed_s"]
            print(f"{args.profile} loss {spec.mean_loss * 100:g}% {cc:10s} flow {row['flow']}: {g:6.2f} Mbit/s = {g / limit:6.1%} of "
                  f"rate*(1-p)  cpu {cpu * 100:4.0f}% of a core ({cpu * 100 / max(g, 0.01):.2f} %/Mbit)  lab p99 lateness "
                  f"{row['lateness_p99_ms']} ms  min/max per-s {min(row['series_mbit'], default=0):.1f}/{max(row['series_mbit'], default=0):.1f}",
                  flush=True)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
