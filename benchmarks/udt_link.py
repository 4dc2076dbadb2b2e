#!/usr/bin/env python3
"""UDT transport over the lab's emulated link, next to kernel TCP BBR/CUBIC in the same run.

Transport level (no daemons): a UdtBackend receiver in namespace b, a sender in namespace a
pushing 64 KiB MSG frames as fast as UDT takes them, for each congestion control asked for;
then the lab's kernel TCP baselines on the same link.  Goodput counts delivered payload
bytes in the window after warm-up.  CPU is the sender's + receiver's process CPU over the
run, per Mbit/s of goodput.  Needs root (network namespaces).

    python3 benchmarks/udt_link.py --profile geo --losses 0.1% 1% 2% --ccs lu2k-rate udt

The end-to-end figure through lu2kd is ``lu2k bench link --backend udt`` (lab helper's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PORT = 7990
KEY = b"udt-link-bench-key"
SIZE = 64 * 1024


def _backend(args: argparse.Namespace) -> Any:
    from lu2k.backends import get_backend
    from lu2k.backends.base import BackendSettings, LinkProfile
    from lu2k.nid import parse_net

    profile = LinkProfile(rtt_ms=args.rtt_ms, rate_mbit=args.rate_mbit, loss=args.loss) if args.rate_mbit else LinkProfile()
    options: dict[str, Any] = {"cc": args.cc}
    options.update(json.loads(args.options))
    return get_backend("udt")(BackendSettings(parse_net("udt0"), PORT, SIZE + 4096, profile, KEY, options))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _recv(args: argparse.Namespace) -> dict[str, Any]:
    backend = _backend(args)
    got: asyncio.Queue[Any] = asyncio.Queue()
    listener = await backend.listen(args.bind, PORT, got.put)
    print("listening", flush=True)
    t = await asyncio.wait_for(got.get(), 60)
    first = time.monotonic()
    start, end = first + args.warmup, first + args.warmup + args.duration
    counted = 0
    cpu0 = None
    while True:
        frames = await asyncio.wait_for(t.recv(), 60)
        now = time.monotonic()
        if now >= end:
            break
        if now >= start:
            if cpu0 is None:
                cpu0 = _cpu()
            counted += sum(len(f.payload) for f in frames)
    cpu = _cpu() - (cpu0 or 0.0)
    stats = t.stats()
    t.close()
    listener.close()
    await backend.close()
    return {"goodput_mbit": counted * 8 / args.duration / 1e6, "cpu_s": cpu, "stats": stats}


async def _send(args: argparse.Namespace) -> dict[str, Any]:
    from lu2k import wire
    from lu2k.nid import parse_nid
    from lu2k.wire import ConnType

    backend = _backend(args)
    t = await backend.connect(args.to, PORT, ConnType.ANY, 30)
    src, dst = parse_nid("10.0.0.1@udt").to_bytes(), parse_nid("10.0.0.2@udt").to_bytes()
    payload = os.urandom(SIZE)
    cpu0 = _cpu()
    deadline = time.monotonic() + args.max_time
    seq = 0
    last_report = time.monotonic()
    samples: list[dict[str, Any]] = []
    try:
        while time.monotonic() < deadline:
            seq += 1
            await t.send([(wire.encode_msg_header(seq, src, dst, 0, 0, payload, False), payload)])
            if time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                s = t.stats()
                samples.append({k: s.get(k) for k in ("rtt_ms", "send_rate_mbit", "retransmitted", "lost_sent", "naks_received",
                                                      "in_flight_packets", "flow_window_packets", "send_buffer_packets")}
                               | {k: s.get(f"cc_{k}") for k in ("rate_mbit", "timeouts", "rtt_settled", "min_rtt_ms", "backoffs")})
    except Exception as e:  # the receiver hangs up when its window is over
        err = f"{type(e).__name__}: {e}"
    else:
        err = "max-time"
    stats = t.stats()
    t.close()
    await backend.close()
    return {"cpu_s": _cpu() - cpu0, "sent": seq, "ended": err, "stats": stats, "samples": samples}


def _helper(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["recv", "send"])
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--to")
    p.add_argument("--cc", default="lu2k-rate")
    p.add_argument("--rate-mbit", type=float, default=0.0)
    p.add_argument("--rtt-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--max-time", type=float, default=120.0)
    p.add_argument("--options", default="{}", help="extra udt backend options, JSON")
    args = p.parse_args(argv)
    result = asyncio.run(_recv(args) if args.mode == "recv" else _send(args))
    print(json.dumps(result), flush=True)
    return 0


def _run_udt(lab: Any, spec: Any, cc: str, warmup: float, duration: float, use_profile: bool) -> dict[str, Any]:
    from lu2k.lab.netns import child_env

    env = child_env({"PYTHONPATH": str(ROOT)})
    common = ["--cc", cc, "--warmup", str(warmup), "--duration", str(duration)]
    if use_profile:
        common += ["--rate-mbit", str(spec.rate_bps / 1e6), "--rtt-ms", str(spec.rtt_s * 1e3), "--loss", str(spec.mean_loss)]
    me = [sys.executable, str(Path(__file__).resolve())]
    recv = lab.popen("b", me + ["recv", "--bind", lab.addr_b] + common, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert recv.stdout is not None
    line = recv.stdout.readline().strip()
    if line != "listening":
        raise RuntimeError(f"receiver failed: {line} {recv.stderr.read() if recv.stderr else ''}")
    send = lab.popen("a", me + ["send", "--to", lab.addr_b, "--max-time", str(warmup + duration + 60)] + common,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    r_out, r_err = recv.communicate(timeout=warmup + duration + 120)
    s_out, s_err = send.communicate(timeout=120)
    try:
        r = json.loads(r_out.strip().splitlines()[-1])
        s = json.loads(s_out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"helper output unreadable (rc {recv.returncode}/{send.returncode}):\n{r_out}\n{r_err}\n{s_out}\n{s_err}") from None
    return {"goodput_mbit": r["goodput_mbit"], "cpu_s": r["cpu_s"] + s["cpu_s"], "sender": s, "receiver": r}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("recv", "send"):
        return _helper(sys.argv[1:])
    from lu2k.lab.baseline import tcp_baseline
    from lu2k.lab.netns import Lab
    from lu2k.lab.spec import build_specs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="geo")
    p.add_argument("--rate")
    p.add_argument("--losses", nargs="*", default=["0.1%", "1%", "2%"])
    p.add_argument("--ccs", nargs="*", default=["lu2k-rate", "udt"])
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-profile", action="store_true", help="do not tell UDT the link's rate (lu2k-rate probes)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    for loss in args.losses:
        specs = build_specs(args.profile, rate=args.rate, loss=loss, seed=7)
        spec = specs[0]
        with Lab(specs) as lab:
            row: dict[str, Any] = {"loss": loss, "link_mbit": spec.rate_bps / 1e6, "rtt_ms": spec.rtt_s * 1e3,
                                   "limit_mbit": spec.rate_bps / 1e6 * (1 - spec.mean_loss)}
            for cc in args.ccs:
                try:
                    r = _run_udt(lab, spec, cc, args.warmup, args.duration, not args.no_profile)
                    row[f"udt/{cc}"] = r["goodput_mbit"]
                    row[f"udt/{cc} cpu_s_per_mbit"] = r["cpu_s"] / max(r["goodput_mbit"], 1e-9) / (args.warmup + args.duration)
                    row[f"udt/{cc} retrans"] = r["sender"]["stats"].get("retransmitted")
                except Exception as e:  # noqa: BLE001 - one failed cell must not lose the table
                    row[f"udt/{cc}"] = None
                    row[f"udt/{cc} error"] = str(e)[:300]
            if not args.no_baselines:
                for cc in ("bbr", "cubic"):
                    try:
                        row[f"tcp-{cc}"] = tcp_baseline(lab, cc, warmup=args.warmup, duration=args.duration)["goodput_mbit"]
                    except Exception as e:  # noqa: BLE001
                        row[f"tcp-{cc}"] = None
                        row[f"tcp-{cc} error"] = str(e)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = [f"udt/{cc}" for cc in args.ccs] + ([] if args.no_baselines else ["tcp-bbr", "tcp-cubic"])
    print()
    print(f"{args.profile}: goodput Mbit/s (delivered payload, {args.duration:g} s after {args.warmup:g} s warm-up)")
    print("loss    limit  " + "  ".join(f"{c:>14}" for c in cols) + "  udt/lu2k-rate CPU s per Mbit/s·s")
    for row in rows:
        cells = "  ".join(f"{row.get(c):>14.2f}" if isinstance(row.get(c), float) else f"{'FAILED':>14}" for c in cols)
        cpu = row.get("udt/lu2k-rate cpu_s_per_mbit")
        print(f"{row['loss']:<6} {row['limit_mbit']:6.2f}  {cells}  {cpu:.4f}" if cpu else f"{row['loss']:<6} {row['limit_mbit']:6.2f}  {cells}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
