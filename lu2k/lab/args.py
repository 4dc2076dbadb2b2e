"""The command-line options that describe an emulated link, shared by ``lu2k lab up`` and
``lu2k bench link|matrix`` (the lab's, so the lab tools never import the CLI)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from .spec import PROFILES, build_specs, parse_size


def add_link_options(p: argparse.ArgumentParser, *, default_profile: str = "geo") -> None:
    """The link description options, shared with ``lu2k bench link``."""
    p.add_argument("--profile", choices=sorted(PROFILES), default=default_profile,
                   help="geo: 20mbit/600ms, leo: 50mbit/40ms, leo-fast: 200mbit, RTT 30-60ms redrawn every 15s with a 300ms "
                        "outage, 1%% loss; custom: give --rate and --rtt (default %(default)s)")
    p.add_argument("--rate", help="link rate per direction, e.g. 20mbit (overrides the profile)")
    p.add_argument("--rtt", help="round-trip time, e.g. 600ms, or a range redrawn at each reconfiguration, e.g. 30ms-60ms "
                                 "(overrides the profile)")
    p.add_argument("--reconfig", help="reconfiguration period, e.g. 15s: an outage and a new RTT each period (0: never)")
    p.add_argument("--outage", help="how long the link is down at each reconfiguration, e.g. 300ms")
    p.add_argument("--loss", help="random loss per direction, e.g. 1%% or 0.01")
    p.add_argument("--jitter", help="uniform +- delay jitter per direction, e.g. 5ms (order kept)")
    p.add_argument("--burst-loss", help="Gilbert-Elliott burst loss rate on top of --loss, e.g. 0.5%%")
    p.add_argument("--burst-len", type=float, help="mean loss burst length in packets (default 4)")
    p.add_argument("--reorder", help="fraction of packets held back so that later ones overtake them, e.g. 1%%")
    p.add_argument("--reorder-delay", help="how long a reordered packet is held back (default 5ms)")
    p.add_argument("--queue", help="drop-tail queue limit in bytes, e.g. 256k (default: one BDP)")
    p.add_argument("--seed", type=int, default=1, help="random seed; the same seed repeats the same losses")


def add_backend_option(p: argparse.ArgumentParser, example: str) -> None:
    """``--option KEY=VALUE`` (repeatable): an ``options`` entry of the daemons' net."""
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help=f"a backend option for both daemons' net (repeatable), e.g. {example}")


def parse_backend_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``--option`` pairs as the net's ``lu2k.options``; each VALUE read as YAML (``0``, ``true``, ``20mbit``)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or ():
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"expected KEY=VALUE, got {item!r}", where="--option")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key.strip()}: cannot read {raw!r} ({e.__class__.__name__})", where="--option") from None
    return out


def add_host_tuning(p: argparse.ArgumentParser) -> None:
    """Kernel TCP tuning of both lab sites, as a site would tune its hosts for a long path."""
    p.add_argument("--initcwnd", type=int, default=0, metavar="PACKETS",
                   help="initial congestion and receive window of the routes between the sites "
                        "(ip route ... initcwnd N initrwnd N; default: the kernel's, 10)")
    p.add_argument("--rmem-default", metavar="BYTES",
                   help="receive buffer a new TCP socket starts with in both sites, tcp_rmem's middle value, e.g. 8m "
                        "(it bounds the first window a socket advertises; default 128k)")


def host_tuning_from_args(args: argparse.Namespace) -> dict[str, int]:
    """:func:`add_host_tuning`'s options as ``Lab``'s ``initcwnd`` and ``rmem_default``, checked."""
    from .netns import check_host_tuning

    rmem = getattr(args, "rmem_default", None)
    out = {"initcwnd": int(getattr(args, "initcwnd", 0) or 0), "rmem_default": parse_size(rmem, what="--rmem-default") if rmem else 0}
    check_host_tuning(out["initcwnd"], out["rmem_default"])
    return out


def specs_from_args(args: argparse.Namespace) -> Any:
    return build_specs(
        args.profile, rate=args.rate, rtt=args.rtt, loss=args.loss, jitter=args.jitter, burst_loss=args.burst_loss,
        burst_len=args.burst_len, reorder=args.reorder, reorder_delay=args.reorder_delay, queue=args.queue,
        reconfig=getattr(args, "reconfig", None), outage=getattr(args, "outage", None), seed=args.seed,
    )


def profile_summary(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("profile", "rate", "rtt", "loss", "jitter", "burst_loss", "burst_len",
                                          "reorder", "queue", "reconfig", "outage", "seed") if getattr(args, k, None) is not None}


SECOND_PATH_OPTIONS = ("rate", "rtt", "loss", "jitter", "queue")


def add_path_options(p: argparse.ArgumentParser) -> None:
    """A second path between the same two sites (``lu2k lab up``), and IPv6 on every path."""
    p.add_argument("--second-path", metavar="PROFILE",
                   help=f"add a second path with its own link model, from a profile ({', '.join(sorted(PROFILES))})")
    for name in SECOND_PATH_OPTIONS:
        p.add_argument(f"--second-{name}", help=f"the second path's --{name} (needs --second-path)")
    p.add_argument("--ipv6", action="store_true", help="give both sides an IPv6 address (fd6c:7532::/32) on every path too")


def extra_paths_from_args(args: argparse.Namespace) -> list[Any]:
    """The extra paths (as ``Lab(extra_paths=...)`` takes them) the options describe."""
    profile = getattr(args, "second_path", None)
    given = [f"--second-{n}" for n in SECOND_PATH_OPTIONS if getattr(args, f"second_{n}", None) is not None]
    if profile is None:
        if given:
            what = f"{', '.join(given)} describe" if len(given) > 1 else "describes"
            raise ConfigError(f"{what} a second path: add --second-path PROFILE", where=given[0])
        return []
    # Its own seeds, so the two paths do not lose the same packet numbers in lock-step.
    return [build_specs(profile, **{n: getattr(args, f"second_{n}") for n in SECOND_PATH_OPTIONS},
                        seed=args.seed + 1000, option_prefix="--second-", profile_option="--second-path")]


def second_path_summary(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "second_path", None) is None:
        return {}
    return {"second_path": args.second_path,
            **{f"second_{n}": getattr(args, f"second_{n}") for n in SECOND_PATH_OPTIONS if getattr(args, f"second_{n}") is not None}}
