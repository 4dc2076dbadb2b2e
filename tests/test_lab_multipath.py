"""Two lu2k nets over the lab's two paths: a two-rail setup built from today's daemon.

Each namespace runs one ``lu2kd`` with two nets, ``tcp`` on path 0 and ``tcp1`` on path 1 (one
NID per path; the daemon's own multi-rail policy over one peer's several NIDs is not part of
this).  Messages sent to the peer's ``tcp1`` NID must cross path 1 and only path 1, those to
its ``tcp`` NID path 0; with path 1 cut, ``tcp`` still delivers every message.  This is the
configuration docs/lab-multipath.md describes.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e_support import check_complete

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


class TwoRailDaemons:
    """``lu2kd`` in each namespace with one tcp net per lab path (what :func:`transfer` needs)."""

    def __init__(self, lab: Any, workdir: Path) -> None:
        from lu2k.localpair import DaemonProcess

        self.lab = lab
        self.rails = {side: [f"{lab.address(side, p)}@{'tcp' if p == 0 else f'tcp{p}'}" for p in range(lab.n_paths)]
                      for side in ("a", "b")}
        self.nids = {side: self.rails[side][0] for side in ("a", "b")}
        self.procs: dict[str, Any] = {}
        for side in ("a", "b"):
            cfg = two_rail_config(lab, side, workdir)
            path = workdir / f"lu2kd-{side}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            self.procs[side] = DaemonProcess(self.rails[side][0], path, cfg["lu2k"]["shim"]["path"],
                                             cfg["lu2k"]["control"]["path"], workdir / f"lu2kd-{side}.log")

    def __enter__(self) -> "TwoRailDaemons":
        for side in ("a", "b"):
            self.procs[side].start(netns=self.lab.ns(side))
        return self

    def __exit__(self, *exc: object) -> None:
        for d in self.procs.values():
            d.stop()

    def pids(self) -> dict[str, int]:
        return {s: d.proc.pid for s, d in self.procs.items() if d.proc is not None}

    def shim(self, side: str) -> str:
        return str(self.procs[side].shim_path)


def two_rail_config(lab: Any, side: str, workdir: Path) -> dict[str, Any]:
    """One daemon's config: a tcp net per path, each with that path's profile."""
    from lu2k.lab.bench import KEY, LU2K_PORT
    from lu2k.localpair import daemon_config

    nets = []
    for p, (ab, _) in enumerate(lab.state.paths):
        nid = f"{lab.address(side, p)}@{'tcp' if p == 0 else f'tcp{p}'}"
        profile = {"rtt_ms": ab.rtt_s * 1e3, "rate_mbit": ab.rate_bps / 1e6, "loss": ab.mean_loss}
        cfg = daemon_config(nid, LU2K_PORT, workdir / side, extra_net={"profile": profile, "key": KEY})
        nets.append(copy.deepcopy(cfg["net"][0]))
    (workdir / side).mkdir(exist_ok=True)
    cfg["net"] = nets
    return cfg


def test_two_rail_config_has_a_net_per_path(tmp_path: Path) -> None:
    from lu2k.lab.netns import Lab
    from lu2k.settings import parse_config
    from lu2k.lab.spec import build_specs

    lab = Lab(build_specs("geo", loss="1%"), "cfg", extra_paths=[build_specs("leo", loss="1%")])
    lab.state.subnet = 3
    cfg = two_rail_config(lab, "a", tmp_path)
    assert [n["local NI(s)"][0]["nid"] for n in cfg["net"]] == ["10.201.3.1@tcp", "10.202.3.1@tcp1"]
    assert [n["lu2k"]["profile"]["rtt_ms"] for n in cfg["net"]] == [600.0, 40.0]
    loaded = parse_config(yaml.safe_load(yaml.safe_dump(cfg)))  # what lu2kd will accept
    assert [str(n.nid) for n in loaded.nets] == ["10.201.3.1@tcp", "10.202.3.1@tcp1"]


@needs_root
@pytest.mark.netns
def test_each_net_uses_its_own_path_and_cutting_one_leaves_the_other(daemons_dir: Path) -> None:
    from lu2k.lab.bench import transfer
    from lu2k.lab.netns import Lab
    from lu2k.lab.spec import build_specs

    geo = build_specs("geo", rtt="200ms", loss="1%")  # shorter than GEO, to keep the test short
    leo = build_specs("leo", loss="1%", seed=5)
    with Lab(geo, extra_paths=[leo]) as lab, TwoRailDaemons(lab, daemons_dir) as daemons:
        def sent(path: int) -> int:
            return int(lab.stats()["paths"][path]["links"]["ab"]["bytes_in"])

        for path in (1, 0):
            daemons.nids = {"a": daemons.rails["a"][path], "b": daemons.rails["b"][path]}
            before = (sent(0), sent(1))
            r = transfer(lab, daemons, size=65536, window=16, count=40, verify=True, timeout=120)  # type: ignore[arg-type]
            check_complete(r, 40)
            grew = (sent(0) - before[0], sent(1) - before[1])
            assert grew[path] > 40 * 65536 and grew[1 - path] < 40 * 65536 // 10
        lab.set_link(False, path=1)
        daemons.nids = {"a": daemons.rails["a"][0], "b": daemons.rails["b"][0]}
        r = transfer(lab, daemons, size=65536, window=16, count=40, verify=True, timeout=120)  # type: ignore[arg-type]
        check_complete(r, 40)
        assert lab.stats()["paths"][0]["links"]["ab"]["drops_down"] == 0
