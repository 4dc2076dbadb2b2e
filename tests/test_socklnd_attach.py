"""lu2k.socklnd.attach through lu2k.daemon.Daemon: a socklnd net comes up beside an lu2k net, shows in
``net show``, answers a LAN node's ping (remote net down while its lu2k gateway is unreachable), and
goes away with the daemon.  The LAN node is tests/socklnd_node.py's stand-in, not the kernel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

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
    probe = await asyncio.start_server(lambda r, w: None, GW.host, 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
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
    assert not d.lan.drivers and Net("tcp", 0) not in d.engine.routes.local_nets
