"""``lu2k bench transfer``: what users run -- ``lu2k send`` of one file and an HTTP download
through ``lu2k forward`` -- over an emulated satellite link, next to kernel TCP BBR doing the
same in the same run.

One run, one lab (same link, same seed), one random file of ``--size`` bytes:

1. kernel TCP BBR copy: a plain socket ``sendfile`` from namespace a to b (the receiver
   writes the file, syncs it and answers one byte); time from starting the sender to its exit;
2. per backend: ``lu2kd`` in each namespace (the tcp backend with ``congestion: bbr`` unless
   ``--tcp-congestion`` says otherwise), ``lu2k recv --serve`` in b, then ``lu2k send
   FILE`` in a, timed from start to exit (exit 0 = written and verified at b); the received
   file's SHA-256 is checked.  ``cold``: the first send on freshly started daemons (connection
   set-up and the backend's rate ramp included); ``warm``: the same command again on the same
   daemons, as with a long-running ``lu2kd`` (each send still starts its own process and session);
   With ``--small-files N``, also a directory of N files of ``--small-size`` bytes, sent with
   the connections up twice: with inline offers and with ``--no-inline`` (files per second);
3. HTTP: an HTTP server in b (its sockets use BBR); ``curl`` in a downloads the file
   directly over the link (kernel TCP BBR end to end), then through ``lu2k forward`` (per
   backend given with ``--forward-backends``; the daemons have carried the sends before).

Goodput = file bytes x 8 / wall time, and its share of the limit ``rate x (1 - loss)``.
Wall times include process start-up and the first round trips, as a user sees them.  Each row
also counts the packets the a->b bottleneck queue dropped during it (a sender's overshoot).
``--json`` makes the last line a JSON object with every figure and the lab's counters.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, Lu2kError, NetworkError
from .bench import LabDaemons, backend_availability
from .netns import Lab, child_env
from .spec import LinkSpec

TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
COPY_PORT = 5301
HTTP_PORT = 8080
LU2K = [sys.executable, "-m", "lu2k.cli.main"]


# --- helpers run inside the namespaces ------------------------------------------------------


def _copy_recv(args: argparse.Namespace) -> None:
    srv = socket.create_server((args.bind, args.port))
    print("listening", flush=True)
    conn, _ = srv.accept()
    with open(args.out, "wb") as f:
        while data := conn.recv(1 << 20):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    conn.sendall(b"k")
    conn.close()
    srv.close()


def _copy_send(args: argparse.Namespace) -> None:
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, args.cc.encode())
    s.connect((args.to, args.port))
    with open(args.file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        off = 0
        while off < size:
            off += os.sendfile(s.fileno(), f.fileno(), off, size - off)
    s.shutdown(socket.SHUT_WR)
    if s.recv(1) != b"k":
        raise NetworkError("the copy receiver did not confirm")
    s.close()


def _httpd(args: argparse.Namespace) -> None:
    cc = args.cc.encode()

    class Server(http.server.ThreadingHTTPServer):
        def get_request(self) -> tuple[socket.socket, Any]:
            conn, addr = super().get_request()
            conn.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, cc)
            return conn, addr

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=args.directory, **kw)

        def log_message(self, format: str, *a: Any) -> None:
            pass

    with Server((args.bind, args.port), Quiet) as httpd:
        print("listening", flush=True)
        httpd.serve_forever()


def helper_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lu2k.lab.transfer_bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("copy-recv")
    r.add_argument("--bind", required=True)
    r.add_argument("--port", type=int, default=COPY_PORT)
    r.add_argument("--out", required=True)
    s = sub.add_parser("copy-send")
    s.add_argument("--to", required=True)
    s.add_argument("--port", type=int, default=COPY_PORT)
    s.add_argument("--file", required=True)
    s.add_argument("--cc", default="bbr")
    h = sub.add_parser("httpd")
    h.add_argument("--bind", default="0.0.0.0")
    h.add_argument("--port", type=int, default=HTTP_PORT)
    h.add_argument("--directory", required=True)
    h.add_argument("--cc", default="bbr")
    args = p.parse_args(argv)
    {"copy-recv": _copy_recv, "copy-send": _copy_send, "httpd": _httpd}[args.cmd](args)
    return 0


def _helper(*args: str) -> list[str]:
    return [sys.executable, "-m", "lu2k.lab.transfer_bench", *args]


# --- the run --------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(4 << 20):
            h.update(data)
    return h.hexdigest()


def _same_tree(src: Path, got: Path) -> bool:
    """``got`` holds what ``src`` (a file, or a directory of files) holds, byte for byte."""
    if not src.is_dir():
        return got.is_file() and _sha(got) == _sha(src)
    return all((got / f.relative_to(src)).is_file() and _sha(got / f.relative_to(src)) == _sha(f)
               for f in src.rglob("*") if f.is_file())


def _ready(proc: "subprocess.Popen[str]", what: str, timeout: float = 30.0) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening" not in line:
        err = proc.stderr.read() if proc.stderr else ""
        raise NetworkError(f"{what} did not start: {line}{err[-500:]}")


def _figures(nbytes: int, seconds: float, limit_bps: float, load_before: float | None = None) -> dict[str, Any]:
    """A row's figures, with the machine's 1-minute load average before and after it (the
    machine may be shared: a figure means little without the load it was taken under)."""
    mbit = nbytes * 8 / seconds / 1e6
    return {"seconds": round(seconds, 2), "goodput_mbit": round(mbit, 3), "of_limit": round(mbit * 1e6 / limit_bps, 4) if limit_bps else None,
            "load": [load_before if load_before is not None else _load(), _load()]}


def _bottleneck_drops(lab: Lab) -> int:
    """Packets the a->b bottleneck queue has dropped so far (overflow, not the random loss)."""
    return int(lab.stats()["links"]["ab"]["drops_queue"])


def _connections_lost(daemons: LabDaemons | None) -> int | None:
    """Connections the two daemons opened and have lost so far (ended by an error, a stall or
    the peer), from their ``connections_lost`` counters; None without daemons or an answer."""
    if daemons is None:
        return None
    counts = [daemons.counter(side, "connections_lost") for side in ("a", "b")]
    return None if None in counts else sum(c for c in counts if c is not None)


def _row(lab: Lab, nbytes: int, limit_bps: float, run: Callable[[], dict[str, Any]], daemons: LabDaemons | None = None) -> dict[str, Any]:
    """One measured row: what ``run`` returns, its figures, the queue drops a->b during it (a
    sender's overshoot shows there, e.g. a BBR STARTUP) and, for lu2k's rows, the connections
    the daemons lost during it (a reconnection costs a set-up and, on tcp, a slow start)."""
    load0, drops0, lost0 = _load(), _bottleneck_drops(lab), _connections_lost(daemons)
    r = run()
    out = {**r, **_figures(nbytes, r["seconds"], limit_bps, load0), "queue_drops_ab": _bottleneck_drops(lab) - drops0}
    lost1 = _connections_lost(daemons)
    if lost0 is not None and lost1 is not None:
        out["connections_lost"] = lost1 - lost0
    return out


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def stop_processes(procs: list["subprocess.Popen[Any]"]) -> None:
    """Terminate what still runs, then kill what does not exit within 10 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()


def kernel_copy(lab: Lab, src: Path, out: Path, cc: str = "bbr", timeout: float = 1800) -> dict[str, Any]:
    env = child_env()
    recv = lab.popen("b", _helper("copy-recv", "--bind", lab.addr_b, "--out", str(out)), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, env=env)
    try:
        _ready(recv, "copy receiver")
        t0 = time.monotonic()
        r = lab.run("a", _helper("copy-send", "--to", lab.addr_b, "--file", str(src), "--cc", cc), capture_output=True, text=True,
                    env=env, timeout=timeout)
        t1 = time.monotonic()
        if r.returncode:
            raise NetworkError(f"kernel TCP {cc} copy failed: {r.stderr[-500:]}")
        recv.communicate(timeout=60)
    finally:
        stop_processes([recv])
    ok = _sha(out) == _sha(src)
    out.unlink()
    return {"seconds": t1 - t0, "verified": ok}


def lu2k_send(lab: Lab, daemons: LabDaemons, src: Path, dst: Path, timeout: float = 1800, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    env = child_env()
    dst.mkdir(exist_ok=True)
    srv = lab.popen("b", [*LU2K, "recv", "-q", "--socket", daemons.shim("b"), "--serve", str(dst)], stderr=subprocess.PIPE,
                    text=True, env=env)
    try:
        time.sleep(1.0)  # attach (quiet: no banner to wait for)
        t0 = time.monotonic()
        r = lab.run("a", [*LU2K, "send", "--socket", daemons.shim("a"), *extra, daemons.nids["b"], str(src)], capture_output=True, text=True,
                    env=env, timeout=timeout)
        t1 = time.monotonic()
    finally:
        stop_processes([srv])
    got = dst / src.name
    ok = r.returncode == 0 and _same_tree(src, got)
    summary = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    m = re.search(r"(\d+) resent", summary)
    shutil.rmtree(dst, ignore_errors=True)
    return {"seconds": t1 - t0, "verified": ok, "exit": r.returncode, "resent_chunks": int(m.group(1)) if m else None,
            "summary": summary}


def http_download(lab: Lab, url: str, out: Path, src: Path, timeout: float = 1800) -> dict[str, Any]:
    t0 = time.monotonic()
    r = lab.run("a", ["curl", "-sS", "--fail", "-o", str(out), url], capture_output=True, text=True, timeout=timeout)
    t1 = time.monotonic()
    ok = r.returncode == 0 and _sha(out) == _sha(src)
    if out.exists():
        out.unlink()
    return {"seconds": t1 - t0, "verified": ok, "exit": r.returncode, "error": r.stderr.strip()[-300:]}


def forward_download(lab: Lab, daemons: LabDaemons, src: Path, out: Path, timeout: float = 1800) -> dict[str, Any]:
    env = child_env()
    procs: list[subprocess.Popen[str]] = []
    try:
        srv = lab.popen("b", [*LU2K, "forward", "--socket", daemons.shim("b"), "--serve", "--allow", f"127.0.0.1:{HTTP_PORT}"],
                        stderr=subprocess.PIPE, text=True, env=env)
        procs.append(srv)
        assert srv.stderr is not None
        if "serving" not in srv.stderr.readline():
            raise NetworkError("lu2k forward --serve did not start")
        cli = lab.popen("a", [*LU2K, "forward", "--socket", daemons.shim("a"), "--to", daemons.nids["b"], "--listen", "127.0.0.1:0",
                              "--target", f"127.0.0.1:{HTTP_PORT}"], stderr=subprocess.PIPE, text=True, env=env)
        procs.append(cli)
        assert cli.stderr is not None
        m = re.search(r"127\.0\.0\.1:(\d+) ->", cli.stderr.readline())
        if not m:
            raise NetworkError("lu2k forward did not start")
        return http_download(lab, f"http://127.0.0.1:{m.group(1)}/{src.name}", out, src, timeout)
    finally:
        stop_processes(procs)


def set_backend_option(daemons: LabDaemons, key: str, value: Any) -> None:
    """Give the net of both (not yet started) daemons ``options.<key>: value``."""
    import yaml

    for proc in daemons.procs.values():
        path = Path(proc.config_path)
        cfg = yaml.safe_load(path.read_text())
        cfg["net"][0]["lu2k"].setdefault("options", {})[key] = value
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def set_tcp_congestion(daemons: LabDaemons, cc: str) -> None:
    set_backend_option(daemons, "congestion", cc)


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(os.urandom(n))
            left -= n


def run_transfer(specs: tuple[LinkSpec, LinkSpec], *, size: int, backends: list[str], forward_backends: list[str],
                 http: bool = True, warm: bool = True, tcp_congestion: str | None = "bbr", workdir: str | None = None, log: Any = None,
                 lab_id: str | None = None, options: dict[str, Any] | None = None, small_files: int = 0,
                 small_size: int = 4096, host_tuning: dict[str, int] | None = None) -> dict[str, Any]:
    avail = backend_availability()
    for b in set(backends) | set(forward_backends):
        if b not in avail:
            raise ConfigError(f"unknown backend {b!r} (known: {', '.join(sorted(avail))})", where="bench transfer")
        if avail[b] is not None:
            raise Lu2kError(str(avail[b]))
    if http and shutil.which("curl") is None:
        raise ConfigError("the HTTP part needs curl (apt-get install curl), or pass --no-http", where="bench transfer")
    spec = specs[0]
    limit = spec.rate_bps * (1 - spec.mean_loss) if spec.rate_bps else 0.0
    own = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="lu2k-bench-transfer-"))

    def say(msg: str) -> None:
        if log is not None:
            print(msg, file=log, flush=True)

    src_dir = wd / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    src = src_dir / "payload.bin"
    make_file(src, size)
    small = wd / "small" / "files"
    if small_files:
        small.mkdir(parents=True)
        for i in range(small_files):
            make_file(small / f"f{i:05d}", small_size)
    out: dict[str, Any] = {"tcp_backend_congestion": tcp_congestion, "options": dict(options or {}),
                           "size": size, "rate_mbit": spec.rate_bps / 1e6, "rtt_ms": spec.rtt_s * 1e3, "loss": spec.mean_loss,
                           "limit_mbit": limit / 1e6, "host_tuning": {k: v for k, v in (host_tuning or {}).items() if v},
                           "transfer": {}, "http": {}, "small": {}}
    env = child_env()
    try:
        tuning = host_tuning or {}
        with Lab(specs, lab_id=lab_id, initcwnd=tuning.get("initcwnd", 0), rmem_default=tuning.get("rmem_default", 0)) as lab:
            for side in ("a", "b"):
                lab.run(side, ["ip", "link", "set", "lo", "up"], check=True)
            say(f"kernel TCP BBR copy of {size / 1e6:.0f} MB ...")
            out["transfer"]["kernel-bbr"] = _row(lab, size, limit, lambda: kernel_copy(lab, src, wd / "copy.bin"))
            httpd = None
            if http:
                httpd = lab.popen("b", _helper("httpd", "--directory", str(src_dir)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
                _ready(httpd, "HTTP server")
                say("HTTP download over kernel TCP BBR ...")
                url = f"http://{lab.addr_b}:{HTTP_PORT}/{src.name}"
                out["http"]["kernel-bbr"] = _row(lab, size, limit, lambda: http_download(lab, url, wd / "http.bin", src))
            try:
                for backend in dict.fromkeys([*backends, *forward_backends]):
                    bwd = wd / backend
                    bwd.mkdir(exist_ok=True)
                    daemons = LabDaemons(lab, backend, bwd)
                    if backend == "tcp" and tcp_congestion:
                        set_tcp_congestion(daemons, tcp_congestion)
                    for key, value in (options or {}).items():
                        set_backend_option(daemons, key, value)
                    with daemons:
                        if backend in backends:
                            say(f"lu2k send over {backend} (fresh daemons) ...")
                            out["transfer"][f"lu2k-{backend} cold"] = _row(lab, size, limit, lambda: lu2k_send(lab, daemons, src, wd / "dst"),
                                                                           daemons)
                            if warm:
                                say(f"lu2k send over {backend} again (connections up) ...")
                                out["transfer"][f"lu2k-{backend} warm"] = _row(lab, size, limit, lambda: lu2k_send(lab, daemons, src, wd / "dst"),
                                                                               daemons)
                            for how, extra in (("inline", ()), ("plain", ("--no-inline",))) if small_files else ():
                                say(f"lu2k send of {small_files} files of {small_size} bytes over {backend}, {how} offers ...")
                                row = _row(lab, small_files * small_size, limit,
                                           lambda: lu2k_send(lab, daemons, small, wd / "dst", extra=extra), daemons)
                                out["small"][f"lu2k-{backend} {how}"] = {**row, "files": small_files, "file_size": small_size,
                                                                         "files_per_s": round(small_files / row["seconds"], 2)}
                        if http and backend in forward_backends:
                            say(f"HTTP download through lu2k forward over {backend} ...")
                            out["http"][f"lu2k-forward-{backend}"] = _row(lab, size, limit, lambda: forward_download(lab, daemons, src, wd / "fwd.bin"),
                                                                          daemons)
            finally:
                if httpd is not None:
                    stop_processes([httpd])
            out["lab"] = lab.stats()
    finally:
        if own:
            shutil.rmtree(wd, ignore_errors=True)
    return out


def format_transfer(r: dict[str, Any]) -> str:
    from ..table import render

    rows = []
    for part, title in (("transfer", "file transfer"), ("http", "HTTP download")):
        for name, x in r[part].items():
            share = f"{x['of_limit']:.0%}" if x.get("of_limit") is not None else "-"
            load = "/".join(f"{v:.1f}" for v in x.get("load", []))
            drops = str(x["queue_drops_ab"]) if x.get("queue_drops_ab") is not None else "-"
            lost = str(x["connections_lost"]) if x.get("connections_lost") is not None else "-"
            rows.append([title, name, f"{x['seconds']:.1f}", f"{x['goodput_mbit']:.2f}", share, "yes" if x.get("verified") else "NO", drops, lost,
                         load])
    smalls = [[name, str(x["files"]), str(x["file_size"]), f"{x['seconds']:.1f}", f"{x['files_per_s']:.1f}",
               "yes" if x.get("verified") else "NO", "/".join(f"{v:.1f}" for v in x.get("load", []))]
              for name, x in (r.get("small") or {}).items()]
    cc = r.get("tcp_backend_congestion") or "kernel default"
    options = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items())
    tuning = ", ".join(f"{k} {v}" for k, v in (r.get("host_tuning") or {}).items())
    head = (f"lu2k tcp backend congestion control: {cc}" + (f"; backend options: {options}" if options else "")
            + (f"; both sites' kernel TCP: {tuning}" if tuning else "") + "\n"
            f"{r['size'] / 1e6:.0f} MB over {r['rate_mbit']:g} Mbit/s, {r['rtt_ms']:.0f} ms RTT, {r['loss']:.1%} loss; "
            f"limit rate x (1 - loss) = {r['limit_mbit']:.2f} Mbit/s")
    tail = ""
    links = (r.get("lab") or {}).get("links") or {}
    late = [f"{d} p99 {v['lateness']['p99_us'] / 1e3:.2f} ms, max {v['lateness']['max_us'] / 1e3:.1f} ms"
            for d, v in links.items() if isinstance(v, dict) and v.get("lateness")]
    if late:
        tail = "\nemulator lateness (how late packets left against their schedule): " + "; ".join(late)
    table = render(["what", "path", "seconds", "Mbit/s", "of limit", "verified", "queue drops a->b", "conns lost", "load before/after"], rows)
    if smalls:
        table += "\n\nsmall files, one directory (connections up):\n" + render(
            ["path", "files", "bytes each", "seconds", "files/s", "verified", "load before/after"], smalls)
    return head + "\n" + table + tail


def cmd_transfer(args: argparse.Namespace) -> int:
    from .args import host_tuning_from_args, parse_backend_options, specs_from_args

    specs = specs_from_args(args)
    backends = args.backends if args.backends is not None else [b for b in ("tcp", "quic", "udt") if backend_availability().get(b) is None]
    forward_backends = args.forward_backends if args.forward_backends is not None else backends
    size = int(args.size * 1e6)
    if size <= 0:
        raise ConfigError("--size must be positive (MB)", where="bench transfer")
    if not 0 <= args.small_files <= 100_000 or not 0 <= args.small_size <= 1 << 30:
        raise ConfigError("--small-files must be 0..100000 and --small-size 0..1 GiB", where="bench transfer")
    r = run_transfer(specs, size=size, backends=backends, forward_backends=forward_backends, http=not args.no_http,
                     warm=not args.no_warm, tcp_congestion=args.tcp_congestion or None, log=sys.stderr, lab_id=args.lab_id,
                     options=parse_backend_options(args.option), small_files=args.small_files, small_size=args.small_size,
                     host_tuning=host_tuning_from_args(args))
    print(format_transfer(r))
    if args.json:
        print(json.dumps(r))
    return 0


def register_bench(bsub: Any) -> None:
    """Add ``transfer`` to ``lu2k bench`` (called by :mod:`lu2k.cli.bench`)."""
    from .args import add_backend_option, add_host_tuning, add_link_options

    t = bsub.add_parser("transfer", help="lu2k send and an HTTP download through lu2k forward vs kernel TCP BBR over the lab (needs root)")
    add_link_options(t)
    add_host_tuning(t)
    t.add_argument("--size", type=float, default=200.0, help="file size in MB (default %(default)s)")
    t.add_argument("--backends", nargs="*", help="backends for lu2k send (default: tcp quic udt, those available)")
    t.add_argument("--forward-backends", nargs="*", help="backends for the forwarded download (default: as --backends)")
    t.add_argument("--no-http", action="store_true", help="skip the HTTP downloads")
    t.add_argument("--no-warm", action="store_true", help="only the first lu2k send per backend (fresh daemons)")
    t.add_argument("--small-files", type=int, default=0, metavar="N",
                   help="also send a directory of N small files per backend, connections up (default: none)")
    t.add_argument("--small-size", type=int, default=4096, metavar="BYTES", help="bytes per small file (default %(default)s)")
    t.add_argument("--tcp-congestion", default="bbr", help="congestion control of lu2k's tcp backend ('' for the kernel default; default bbr)")
    add_backend_option(t, "notsent_lowat=0 (applied to every backend run: pick --backends to match)")
    t.add_argument("--lab-id", help="the lab's id (1-8 of a-z0-9; default random): names its namespaces lu2k-ID-a/b")
    t.add_argument("--json", action="store_true", help="last line: every figure as JSON")
    t.set_defaults(func=cmd_transfer)


if __name__ == "__main__":
    sys.exit(helper_main())
