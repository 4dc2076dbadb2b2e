"""lu2k.socklnd.attach through lu2k.daemon.Daemon: a socklnd net comes up beside an lu2k net, shows in
``net show``, answers a LAN node's ping (remote net down while its lu2k gateway is unreachable), and
goes away with the daemon.  The LAN node is tests/socklnd_node.py's stand-in, not the kernel."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from lu2k.localpair import free_port
from lu2k.daemon import Daemon
from lu2k.nid import Net, parse_nid
from lu2k.settings import parse_config
from lu2k.socklnd import idl
from lu2k.socklnd.attach import LanNets, is_lan

from socklnd_node import FakeNode, privileged

pytestmark = pytest.mark.timeout(30)  # a hang guard; nothing here measures time

GW, NODE = parse_nid("127.83.3.1@tcp"), parse_nid("127.83.3.2@tcp")


def daemon_config(tmp: Path, port: int) -> object:
    return parse_config({
        "net": [
            {"net type": "tcp", "local NI(s)": [{"nid": str(GW)}],
             "lu2k": {"backend": "socklnd", "port": port,
                      "options": {"secure_accept": privileged(), "privileged_connect": privileged(), "probe_interval": 0.2}}},
            {"net type": "tcp9", "local NI(s)": [{"nid": "10.83.3.1@tcp9"}],
             "lu2k": {"backend": "inproc", "port": 41900, "key": "socklnd-attach-key"}},
        ],
        # nobody there: the satellite hop is down (two gateways to tcp1, neither answers)
        "route": [{"net": "tcp1", "gateway": "10.83.3.2@tcp9"}, {"net": "tcp1", "gateway": "10.83.3.3@tcp9"}],
        "routing": {"enable": 1},
        "global": {"connect_timeout": 0.2, "transaction_timeout": 0.5},
        "lu2k": {"shim": {"path": str(tmp / "d.shim")}, "control": {"path": str(tmp / "d.ctl")}},
    })


def test_split_keeps_lan_nets_out_of_the_engine(tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, 988)
    lan = LanNets(cfg)  # type: ignore[arg-type]
    assert [n.backend for n in lan.nets] == ["socklnd"] and all(is_lan(n) for n in lan.nets)
    assert [n.backend for n in lan.core_config().nets] == ["inproc"]
    assert lan.remote_gateways() == {Net("tcp", 1): [parse_nid("10.83.3.2@tcp9"), parse_nid("10.83.3.3@tcp9")]}


async def test_daemon_runs_a_socklnd_net(tmp_path: Path) -> None:
    port = free_port(GW.host)
    d = Daemon(daemon_config(tmp_path, port))  # type: ignore[arg-type]
    await d.start()
    node = FakeNode(NODE, port, GW)
    try:
        nets = await d.control.handlers["net show"]({})
        assert [(n["net"], n["backend"]) for n in nets] == [("tcp9", "inproc"), ("tcp", "socklnd")]
        await node.connect_gateway()
        driver = d.lan.drivers[Net("tcp", 0)]
        while driver.remote_up[Net("tcp", 1)] is not False:  # the first probes of both gateways failed
            await asyncio.sleep(0.02)
        info = await node.ping(GW)
        nis = dict(info.nis)
        assert nis[idl.nid4_of(GW)] == idl.LNET_NI_STATUS_UP
        assert nis[idl.nid4_of(parse_nid("127.83.3.1@tcp1"))] == idl.LNET_NI_STATUS_DOWN
        # A message for the far site is dropped (the hop is down); the node's LNet times it out.
        assert await node.put(parse_nid("10.1.1.1@tcp1"), 4, b"x", ack=False) is None
        while driver.stats["dropped_remote_down"] == 0:
            await asyncio.sleep(0.02)
        assert driver.rx_msgs == 0
    finally:
        await node.close()
        await d.stop()
    assert not d.lan.drivers and Net("tcp", 0) not in d.engine.lans and Net("tcp", 0) not in d.engine.core.routes.local_nets


# -- a socklnd net added and removed at run time (lu2kctl net add / route add / net del) -------------

RT_GW = parse_nid("127.83.4.1@tcp")
RT_NODE = parse_nid("127.83.4.2@tcp")


def lu2k_only_config(tmp: Path) -> object:
    return parse_config({
        "net": [{"net type": "tcp9", "local NI(s)": [{"nid": "10.83.4.1@tcp9"}],
                 "lu2k": {"backend": "inproc", "port": 41901, "key": "socklnd-attach-key"}}],
        "route": [{"net": "tcp1", "gateway": "10.83.4.2@tcp9"}],  # nobody there
        "routing": {"enable": 1},
        "global": {"connect_timeout": 0.2, "transaction_timeout": 0.5},
        "lu2k": {"shim": {"path": str(tmp / "r.shim")}, "control": {"path": str(tmp / "r.ctl")}},
    })


async def test_socklnd_net_added_and_removed_at_run_time(tmp_path: Path) -> None:
    from lu2k.control import request

    d = Daemon(lu2k_only_config(tmp_path))  # type: ignore[arg-type]
    await d.start()
    port = free_port(RT_GW.host)
    node = FakeNode(RT_NODE, port, RT_GW)

    async def call(cmd: str, **args: object) -> Any:
        return await request(d.config.control_path, cmd, args)

    try:
        res = await call("net add", net="tcp", nid=str(RT_GW), backend="socklnd", port=port,
                         lu2k={"options": {"secure_accept": privileged(), "privileged_connect": privileged(), "probe_interval": 0.2}})
        assert res["changes"] == [f"net tcp added ({RT_GW}, socklnd)"]
        # The LAN net is the driver's, never the engine's: the engine's config holds lu2k nets only.
        assert [n.backend for n in d.engine.config.nets] == ["inproc"]
        assert [n.backend for n in d.config.nets] == ["inproc", "socklnd"]
        assert Net("tcp", 0) in d.lan.drivers and Net("tcp", 0) in d.engine.lans
        nets = await call("net show")
        assert [(n["net"], n["backend"]) for n in nets] == [("tcp9", "inproc"), ("tcp", "socklnd")]
        await node.connect_gateway()
        info = await node.ping(RT_GW)
        nis = dict(info.nis)
        assert nis[idl.nid4_of(RT_GW)] == idl.LNET_NI_STATUS_UP
        assert idl.nid4_of(parse_nid("127.83.4.1@tcp1")) in nis  # the net routed over lu2k at the time of net add
        # A route added later is learnt by the running driver: its ping shows an NI on that net too.
        await call("route add", net="tcp2", gateway="10.83.4.3@tcp9")
        nis = dict((await node.ping(RT_GW)).nis)
        assert idl.nid4_of(parse_nid("127.83.4.1@tcp2")) in nis
        await call("route del", net="tcp2", gateway="10.83.4.3@tcp9")
        nis = dict((await node.ping(RT_GW)).nis)
        assert idl.nid4_of(parse_nid("127.83.4.1@tcp2")) not in nis
        exported = (await call("export"))["yaml"]
        assert "socklnd" in exported
        res = await call("net del", net="tcp")
        assert res["changes"] == ["net tcp removed"]
        assert not d.lan.drivers and not d.lan.nets and Net("tcp", 0) not in d.engine.lans
        assert [n.backend for n in d.engine.config.nets] == ["inproc"]
        while not all(c.writer.is_closing() or c.reader.at_eof() for c in node.conns):  # lu2kd closed the node's connections
            await asyncio.sleep(0.02)
    finally:
        await node.close()
        await d.stop()


async def test_a_failed_socklnd_net_add_changes_nothing(tmp_path: Path) -> None:
    from lu2k.control import request
    from lu2k.errors import Lu2kError

    d = Daemon(lu2k_only_config(tmp_path))  # type: ignore[arg-type]
    await d.start()
    blocker = await asyncio.start_server(lambda r, w: None, RT_GW.host, 0)
    port = int(blocker.sockets[0].getsockname()[1])
    try:
        with pytest.raises(Lu2kError, match="configuration not applied"):
            await request(d.config.control_path, "net add", {"net": "tcp", "nid": str(RT_GW), "backend": "socklnd", "port": port})
        assert not d.lan.drivers and not d.lan.nets and not d.engine.lans
        assert [n.backend for n in d.config.nets] == [n.backend for n in d.engine.config.nets] == ["inproc"]
    finally:
        blocker.close()
        await d.stop()


async def test_apply_config_without_lan_drivers_refuses_a_socklnd_net(tmp_path: Path) -> None:
    from dataclasses import replace

    from lu2k.confctl import apply_config
    from lu2k.errors import ConfigError

    d = Daemon(lu2k_only_config(tmp_path))  # type: ignore[arg-type]
    await d.start()
    try:
        new = daemon_config(tmp_path, 988)
        with pytest.raises(ConfigError, match="LAN drivers"):
            await apply_config(d.engine, d.config, replace(new, shim=d.config.shim, control_path=d.config.control_path))  # type: ignore[type-var,arg-type]
        assert [n.backend for n in d.engine.config.nets] == ["inproc"] and not d.engine.lans
    finally:
        await d.stop()
