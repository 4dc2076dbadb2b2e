"""Tests for lu2k.kernel_shim.abi: ioctl numbers, struct sizes, control packets, layouts."""

from __future__ import annotations

import errno
import os

import pytest

from lu2k.errors import LocalProtocolError, ShimError
from lu2k.kernel_shim import abi


def test_ioc_encoding_matches_linux_formula() -> None:
    # Linux: _IOWR('L', 1, 472) == (3 << 30) | (472 << 16) | (ord('L') << 8) | 1
    assert abi.iowr(1, 472) == (3 << 30) | (472 << 16) | (0x4C << 8) | 1
    assert abi.io(2) == (0x4C << 8) | 2
    assert abi.ior(3, 44) == (2 << 30) | (44 << 16) | (0x4C << 8) | 3
    assert abi.iow(5, 8) == (1 << 30) | (8 << 16) | (0x4C << 8) | 5
    cmd = abi.CMD_ATTACH
    assert (abi.ioc_dir(cmd), abi.ioc_type(cmd), abi.ioc_nr(cmd), abi.ioc_size(cmd)) == (3, 0x4C, 1, abi.ATTACH.size)


def test_ioc_rejects_oversized_argument() -> None:
    with pytest.raises(LocalProtocolError, match="does not fit"):
        abi.ior(9, 1 << 14)


def test_struct_sizes_are_fixed() -> None:
    assert abi.CTL_HDR.size == 8
    assert abi.CTL_REPLY.size == 128
    assert abi.SEND_DESC.size == 48
    assert abi.COMPLETION.size == 64
    assert abi.RX_DESC.size == 48
    assert abi.RELEASE_DESC.size == 8
    assert abi.ATTACH_IN.size == 32
    assert abi.LAYOUT.size == 416
    assert abi.REGION_HDR.size <= abi.HDR_DAEMON_FLAGS
    assert abi.HDR_ENDPOINT_FLAGS - abi.HDR_DAEMON_FLAGS >= 64


def test_request_roundtrip_and_errors() -> None:
    pkt = abi.encode_request(abi.CMD_INFO, 7, bytes(abi.INFO.size))
    assert abi.decode_request(pkt) == (abi.CMD_INFO, 7, bytes(abi.INFO.size))
    with pytest.raises(ShimError) as e:
        abi.decode_request(abi.CTL_HDR.pack(abi.ior(99, 4), 1) + bytes(4))
    assert e.value.code == errno.ENOTTY
    # Right number, wrong size encoded in the command: EINVAL naming the expected command.
    with pytest.raises(ShimError) as e:
        abi.decode_request(abi.CTL_HDR.pack(abi.ior(3, 40), 1) + bytes(40))
    assert e.value.code == errno.EINVAL and "INFO" in str(e.value)
    # Right command, argument of the wrong length.
    with pytest.raises(ShimError) as e:
        abi.decode_request(abi.CTL_HDR.pack(abi.CMD_INFO, 1) + bytes(3))
    assert e.value.code == errno.EINVAL
    with pytest.raises(ShimError) as e:
        abi.decode_request(b"\x01")
    assert e.value.code == errno.EINVAL
    with pytest.raises(LocalProtocolError):
        abi.encode_request(abi.CMD_INFO, 1, b"short")


def test_reply_roundtrip_and_reason_truncation() -> None:
    long_reason = "é" * 100  # 200 bytes of UTF-8: must be cut on a character boundary
    pkt = abi.encode_reply(abi.CMD_DETACH, 3, errno.EINVAL, long_reason)
    cmd, seq, err, reason, arg = abi.decode_reply(pkt)
    assert (cmd, seq, err, arg) == (abi.CMD_DETACH, 3, errno.EINVAL, b"")
    assert reason == "é" * 55  # 110 bytes + NUL fits in 112
    with pytest.raises(ShimError) as e:
        abi.decode_reply(pkt + b"x")
    assert e.value.code == errno.EPROTO


def test_pool_classes_cover_zero_to_max() -> None:
    classes = abi.pool_classes(4 << 20, 64 << 20)
    sizes = [s for s, _n in classes]
    assert sizes[0] == 512 and sizes[-1] == 4 << 20
    assert all(n >= 2 for _s, n in classes)
    tiny = abi.pool_classes(100, 0)
    assert tiny == [(128, 2)]


def test_layout_roundtrip_and_check() -> None:
    layout = abi.build_layout(1 << 20, 8 << 20, 4 << 20, 256)
    assert abi.Layout.unpack(layout.pack()) == layout
    for ring in layout.rings:
        assert ring.entries & (ring.entries - 1) == 0
    assert layout.rings[abi.RING_SUBMIT].entries >= layout.tx.slots
    assert layout.rings[abi.RING_COMPLETE].entries >= 2 * layout.tx.slots
    assert layout.rings[abi.RING_DELIVER].entries >= layout.rx.slots
    hdr = abi.pack_region_header(layout)
    abi.check_region_header(hdr, layout)
    with pytest.raises(ShimError, match="magic"):
        abi.check_region_header(b"\0" * len(hdr), layout)


def test_layout_check_rejects_bad_offsets() -> None:
    layout = abi.build_layout(1 << 20, 8 << 20, 4 << 20, 256)
    small = abi.Layout(layout.region_size // 2, layout.max_message_size, layout.tx, layout.rx, layout.rings)
    with pytest.raises(ShimError) as e:
        small.check()
    assert e.value.code == errno.EPROTO
    r = layout.rings
    overlapping = abi.Layout(layout.region_size, layout.max_message_size, layout.tx, layout.rx,
                             (r[0], abi.RingLayout(r[0].ctrl, r[1].descs, r[1].entries, r[1].desc_size), r[2], r[3]))
    with pytest.raises(ShimError, match="overlaps"):
        overlapping.check()
    bad_entries = abi.Layout(layout.region_size, layout.max_message_size, layout.tx, layout.rx,
                             (abi.RingLayout(r[0].ctrl, r[0].descs, 3, r[0].desc_size), r[1], r[2], r[3]))
    with pytest.raises(ShimError, match="power of two"):
        bad_entries.check()


def test_layout_check_rejects_pool_classes_that_overlap_each_other() -> None:
    layout = abi.build_layout(4096, 0, 0, 1)
    small, big = layout.tx.classes
    # The small class grows into the big one: each lies inside the pool, but two slots share bytes.
    grown = abi.PoolClass(small.offset, (big.offset - small.offset) // small.count + 64, small.count)
    tx = abi.PoolLayout(layout.tx.offset, layout.tx.size, (grown, big))
    bad = abi.Layout(layout.region_size, layout.max_message_size, tx, layout.rx, layout.rings)
    with pytest.raises(ShimError, match="overlaps the class before it") as e:
        abi.Layout.unpack(bad.pack())
    assert e.value.code == errno.EPROTO
    reordered = abi.PoolLayout(layout.tx.offset, layout.tx.size, (big, small))  # listed out of order but apart: fine
    abi.Layout(layout.region_size, layout.max_message_size, reordered, layout.rx, layout.rings).check()


def test_default_shim_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert abi.default_shim_path() == "/run/user/1234/lu2k/lu2kd.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert abi.default_shim_path() == "/run/lu2k/lu2kd.sock"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", "/home/someone")
    path = abi.default_shim_path()  # never a name another user can create first in /tmp
    assert path in ("/run/user/1000/lu2k/lu2kd.sock", "/home/someone/.lu2k/run/lu2kd.sock") and not path.startswith("/tmp")
