"""``lu2kctl ping`` / ``discover`` of a node on a socklnd LAN, end to end: lu2kctl's ``main()`` (in a
thread, as the command line runs it) → the control socket → a real ``Daemon`` with a socklnd net on
loopback → an LNet ping GET over socklnd connections lu2kd opens itself → tests/socklnd_node.py's
stand-in node (not the kernel; the guest bed runs Lustre's modules) → its REPLY back.

lu2kd 127.84.1.1@tcp, node 127.84.1.2@tcp; 127.84.1.9@tcp is nobody.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
import yaml

from lu2k.localpair import free_port
from lu2k import logs
from lu2k.cli import ctl
from lu2k.daemon import Daemon
from lu2k.nid import Net, parse_nid
from lu2k.settings import parse_config
from lu2k.socklnd import idl
from lu2k.socklnd.driver import SocklndDriver

from socklnd_node import FakeNode, privileged

pytestmark = pytest.mark.timeout(60)  # a hang guard; nothing here measures time

GW, NODE, NOBODY = parse_nid("127.84.1.1@tcp"), parse_nid("127.84.1.2@tcp"), parse_nid("127.84.1.9@tcp")
NODE_RAIL = parse_nid("127.84.2.2@tcp1")  # a second NI the node lists, DOWN


@dataclass
class Bed:
    daemon: Daemon
    node: FakeNode

    @property
    def driver(self) -> SocklndDriver:
        return self.daemon.lan.drivers[Net("tcp", 0)]


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("error")  # the daemon runs in this process: keep its log lines off lu2kctl's stdout
    port = free_port(GW.host, NODE.host)  # lu2kd and the node each listen on their own address
    cfg = parse_config({
        "net": [{"net type": "tcp", "local NI(s)": [{"nid": str(GW)}],
                 "lu2k": {"backend": "socklnd", "port": port,
                          "options": {"secure_accept": privileged(), "privileged_connect": privileged(), "connect_timeout": 2}}}],
        "routing": {"enable": 1},
        "lu2k": {"shim": {"path": str(tmp_path / "d.shim")}, "control": {"path": str(tmp_path / "d.ctl")}},
    })
    daemon = Daemon(cfg)
    await daemon.start()
    node = FakeNode(NODE, port, GW)
    node.ping_nis = [(idl.nid4_of(NODE_RAIL), idl.LNET_NI_STATUS_DOWN)]
    await node.start()
    try:
        yield Bed(daemon, node)
    finally:
        await node.close()
        await daemon.stop()
        structlog.reset_defaults()
        root.handlers[:], root.level = saved[0], saved[1]
        logging.captureWarnings(False)


async def lu2kctl(bed: Bed, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(ctl.main, ["--socket", bed.daemon.config.control_path, *argv])
    out, err = capsys.readouterr()
    return rc, out, err


async def test_lu2kctl_pings_a_lan_node(bed: Bed, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await lu2kctl(bed, capsys, "ping", str(NODE))
    assert rc == 0, err
    [item] = yaml.safe_load(out)["ping"]
    assert item["primary nid"] == str(NODE) and item["Multi-Rail"] is True
    assert item["peer ni"] == [{"nid": str(NODE)}, {"nid": str(NODE_RAIL)}]  # as lnetctl prints them
    assert item["lu2k"]["ni status"] == {str(NODE): "up", str(NODE_RAIL): "down"}
    assert item["lu2k"]["features"] == ["ni_status", "multi_rail", "discovery"] and item["lu2k"]["rtt_ms"] > 0
    # The node saw LNet's ping GET, from lu2kd's NID, on connections lu2kd opened as ksocklnd does.
    [get] = bed.node.ping_gets
    assert get.src_nid == idl.nid4_of(GW) and get.dest_nid == idl.nid4_of(NODE) and get.sink_length == idl.LNET_PING_BUFFER_MAX
    assert sorted(c.core.ctype.name for c in bed.node.conns) == ["BULK_IN", "BULK_OUT", "CONTROL"]
    if privileged():
        assert all(512 <= p <= 1023 for p in bed.node.accepted_from), bed.node.accepted_from
    rc, out, err = await lu2kctl(bed, capsys, "ping", str(NODE), "--json")
    assert rc == 0, err
    [res] = json.loads(out)
    assert res["peer_ni_status"] == {str(NODE): "up", str(NODE_RAIL): "down"} and res["multi_rail"] and res["discovery"]
    assert len(bed.node.ping_gets) == 2 and len(bed.node.conns) == 3  # the same connections
    # A node that is not Multi-Rail says so in its features.
    bed.node.features = idl.PING_FEAT_NI_STATUS
    rc, out, err = await lu2kctl(bed, capsys, "ping", str(NODE))
    assert rc == 0 and yaml.safe_load(out)["ping"][0]["Multi-Rail"] is False, err


async def test_lu2kctl_discovers_a_lan_node(bed: Bed, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await lu2kctl(bed, capsys, "discover", str(NODE))
    assert rc == 0, err
    [item] = yaml.safe_load(out)["discover"]
    assert item["primary nid"] == str(NODE) and item["Multi-Rail"] is True
    assert [n["nid"] for n in item["peer ni"]] == [str(NODE), str(NODE_RAIL)]
    assert item["lu2k"]["ni status"] == {str(NODE): "up", str(NODE_RAIL): "down"}
    # lu2kd keeps what it discovered: net show lists the node with its NIs.
    rc, out, err = await lu2kctl(bed, capsys, "net", "show", "--json")
    assert rc == 0, err
    [lan] = [n for n in json.loads(out) if n["backend"] == "socklnd"]
    [peer] = lan["peers"]
    assert peer["nid"] == str(NODE) and peer["nis"] == {str(NODE): "up", str(NODE_RAIL): "down"}


async def test_pinging_lu2kds_own_lan_nid_answers_locally(bed: Bed, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await lu2kctl(bed, capsys, "ping", str(GW))
    assert rc == 0, err
    [item] = yaml.safe_load(out)["ping"]
    assert item["primary nid"] == str(GW) and item["peer ni"] == [{"nid": str(GW)}] and item["lu2k"]["local"] is True
    assert not bed.driver.peers  # nothing was sent


async def test_a_nid_nobody_has_fails_after_the_timeout_with_the_reason(bed: Bed, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await lu2kctl(bed, capsys, "ping", f"{NODE},{NOBODY}", "--timeout", "1")
    assert rc == 1
    assert [i["primary nid"] for i in yaml.safe_load(out)["ping"]] == [str(NODE)]  # the other NID still answered
    assert f"lu2kctl: ping {NOBODY}: no reply from {NOBODY} within 1 s (the GET was never sent: connect to {NOBODY.host}:" in err, err
    assert ": Connection refused)" in err and "Traceback" not in err
    rc, out, err = await lu2kctl(bed, capsys, "discover", str(NOBODY), "--timeout", "1")
    assert rc == 1 and out == "" and f"discover {NOBODY}: no reply from {NOBODY} within 1 s" in err and "Traceback" not in err


async def test_a_node_whose_lnet_drops_the_get_times_out(bed: Bed, capsys: pytest.CaptureFixture[str]) -> None:
    bed.node.answer_pings = False
    rc, out, err = await lu2kctl(bed, capsys, "ping", str(NODE), "--timeout", "1")
    assert rc == 1 and out == ""
    assert f"ping {NODE}: no reply from {NODE} within 1 s (the node took the GET; its LNet did not answer)" in err, err
    assert len(bed.node.ping_gets) == 1 and bed.driver.stats["pings_failed"] == 1


async def test_a_garbage_reply_is_an_error_naming_it_and_the_node_stays_usable(bed: Bed, capsys: pytest.CaptureFixture[str]) -> None:
    bed.node.ping_reply = b"\x00garbage, not an lnet_ping_info\x00"
    rc, out, err = await lu2kctl(bed, capsys, "ping", str(NODE))
    assert rc == 1 and out == "" and "Traceback" not in err
    assert f"{NODE} answered the ping with unusable ping info: bad ping info magic" in err, err
    bed.node.ping_reply = bytes(32)[:10]  # shorter than the ping info header
    rc, out, err = await lu2kctl(bed, capsys, "ping", str(NODE))
    assert rc == 1 and "ping info truncated: 10 bytes" in err, err
    # A REPLY for no ping of ours (stale, or forged) is dropped and counted; nothing else changes.
    dropped = bed.driver.stats["dropped"]
    await bed.node.reply(GW, (bed.driver.pinger.interface_cookie, 4242), bed.node.ping_info_bytes())
    while bed.driver.stats["dropped"] == dropped:
        await asyncio.sleep(0.02)
    bed.node.ping_reply = None
    rc, out, err = await lu2kctl(bed, capsys, "ping", str(NODE))
    assert rc == 0 and yaml.safe_load(out)["ping"][0]["primary nid"] == str(NODE), err
    assert len(bed.node.conns) == 3  # the garbage closed no connection
