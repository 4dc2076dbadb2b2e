"""A real ``lu2kd`` with a socklnd net, in a network namespace of the test's own, fed bad input
from the LAN side (lu2k.socklnd.driver through the daemon: config, logging, process).

lu2kd listens on LNet's acceptor port 988 inside namespace ``ln<hex>`` (veth to the test's
namespace) with secure accept on.  A good socklnd peer (tests/socklnd_node.py, connected from
privileged ports as a kernel node) pings lu2kd over and over while raw connections send a wrong
magic, a wrong acceptor or hello version, a truncated hello, a header claiming an absurd payload,
or come from an unprivileged source port.  Each bad connection must be refused or closed with
its reason in lu2kd's log; every ping of the good peer must be answered, before, during and
after.  Nothing here is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lu2k.localpair import free_port
from lu2k.localpair import DaemonProcess, daemon_config
from lu2k.nid import Nid, parse_nid
from lu2k.socklnd import idl, proto
from lu2k.socklnd.idl import ConnType, LnetMsgType
from lu2k.socklnd.proto import Hello, LnetHdr

from socklnd_node import FakeNode, open_from

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(120),  # a hang guard
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a network namespace, port 988 and privileged source ports"),
]


@dataclass
class Bed:
    gw: Nid  # lu2kd's NID (in the namespace, port 988)
    node: FakeNode  # the good peer (in the test's namespace)
    daemon: DaemonProcess
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def namespace() -> Iterator[tuple[str, str, str]]:
    """A namespace joined to ours by a veth pair: (name, our address, its address)."""
    tag = "ln" + secrets.token_hex(3)
    net = f"10.{random.randint(160, 199)}.{random.randint(0, 255)}"
    ours, theirs = f"{net}.1", f"{net}.2"
    ip("netns", "add", tag)
    try:
        ip("link", "add", f"{tag}h", "type", "veth", "peer", "name", f"{tag}n")
        ip("link", "set", f"{tag}n", "netns", tag)
        ip("addr", "add", f"{ours}/24", "dev", f"{tag}h")
        ip("link", "set", f"{tag}h", "up")
        ip("-n", tag, "addr", "add", f"{theirs}/24", "dev", f"{tag}n")
        ip("-n", tag, "link", "set", f"{tag}n", "up")
        ip("-n", tag, "link", "set", "lo", "up")
        yield tag, ours, theirs
    finally:
        subprocess.run(["ip", "link", "del", f"{tag}h"], capture_output=True)
        subprocess.run(["ip", "netns", "del", tag], capture_output=True)


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    with namespace() as (ns, ours, theirs):
        gw, node_nid = parse_nid(f"{theirs}@tcp"), parse_nid(f"{ours}@tcp")
        node_port = free_port(ours)  # the good peer's acceptor, where lu2kd connects back to it
        cfg = daemon_config(str(gw), idl.LNET_ACCEPTOR_PORT, tmp_path, backend="socklnd", extra_net={
            "options": {"secure_accept": True, "privileged_connect": True, "peer_port": node_port, "connect_timeout": 3}})
        path = tmp_path / "lu2kd.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        log = tmp_path / "lu2kd.log"
        daemon = DaemonProcess(str(gw), path, cfg["lu2k"]["shim"]["path"], cfg["lu2k"]["control"]["path"], log)
        daemon.start(netns=ns)
        node = FakeNode(node_nid, node_port, gw, gateway_port=idl.LNET_ACCEPTOR_PORT)
        try:
            await node.start()
            await node.connect_gateway()
            yield Bed(gw, node, daemon, log)
        finally:
            await node.close()
            daemon.stop()


def good_prefix(gw: Nid, me: Nid) -> bytes:
    return proto.encode_connreq(idl.nid4_of(gw)) + Hello(3, idl.nid4_of(me), idl.nid4_of(gw), 12345, 0, 77, 0, ConnType.CONTROL).pack()


def bad_bytes(case: str, gw: Nid, me: Nid) -> tuple[bytes, str]:
    """What a bad connection sends, and the reason lu2kd must log for it."""
    gw4 = idl.nid4_of(gw)
    if case == "wrong magic":
        return struct.pack("<IIQ", 0x0BADF00D, 1, gw4), "bad acceptor magic 0x0badf00d"
    if case == "wrong acceptor version":
        return struct.pack("<IIQ", idl.LNET_PROTO_ACCEPTOR_MAGIC, 9, gw4), "acceptor protocol version 9"
    if case == "wrong hello version":
        return proto.encode_connreq(gw4) + struct.pack("<II", idl.LNET_PROTO_MAGIC, 7), "hello version 7 not supported"
    if case == "truncated hello":
        return good_prefix(gw, me)[:40], "in the middle of the hello body"
    if case == "absurd payload length":
        hdr = bytearray(LnetHdr(LnetMsgType.PUT, gw4, idl.nid4_of(me)).pack())
        hdr[28:32] = (4_000_000_000).to_bytes(4, "little")  # payload_length
        return good_prefix(gw, me) + struct.pack("<IIQQ", 0xC1, 0, 0, 0) + bytes(hdr), "claims a 4000000000-byte payload"
    assert case == "unprivileged source port"
    return good_prefix(gw, me), "insecure source port"


CASES = ["wrong magic", "wrong acceptor version", "wrong hello version", "truncated hello", "absurd payload length",
         "unprivileged source port"]


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(65536):
            got += chunk
    return got


async def until(cond: object, what: str) -> None:
    for _ in range(1000):  # a hang guard of about 20 s; the test's timeout is the real bound
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def test_bad_lan_input_is_refused_with_a_logged_reason_and_the_good_peer_carries_on(bed: Bed) -> None:
    node, gw = bed.node, bed.gw
    pings: list[bool] = []
    stop = asyncio.Event()

    async def keep_pinging() -> None:
        while not stop.is_set():
            info = await asyncio.wait_for(node.ping(gw), 15)
            pings.append(dict(info.nis).get(idl.nid4_of(gw)) == idl.LNET_NI_STATUS_UP)
            await asyncio.sleep(0.05)

    pinger = asyncio.ensure_future(keep_pinging())
    try:
        await until(lambda: len(pings) >= 2 or pinger.done(), "the good peer's first pings")
        me = parse_nid(f"{node.nid.host}@tcp")
        for n, case in enumerate(CASES):
            data, reason = bad_bytes(case, gw, me)
            before = len(pings)
            reader, writer = await open_from(node.nid.host, gw.host, idl.LNET_ACCEPTOR_PORT, case != "unprivileged source port")
            writer.write(data)
            await writer.drain()
            if case == "truncated hello":
                writer.write_eof()
            got = await read_to_close(reader)  # lu2kd closes it
            writer.close()
            if case == "unprivileged source port":
                assert got == b"", "an insecure connection must be closed before any hello reply"
            await until(lambda: bed.log_text().count(reason) == 1, f"{case}: {reason!r} in lu2kd's log")
            await until(lambda: len(pings) > before or pinger.done(), f"a good ping after {case}")
            assert not pinger.done(), pinger.exception()
            assert bed.daemon.proc is not None and bed.daemon.proc.poll() is None, bed.daemon.log_tail()
        assert all(pings) and len(pings) >= len(CASES) + 2
    finally:
        stop.set()
        await asyncio.gather(pinger, return_exceptions=True)
    assert pinger.exception() is None
    text = bed.log_text()
    assert "Traceback" not in text
    # The good peer's three connections were never touched.
    assert all(not c.writer.is_closing() for c in node.conns[:3])
