"""The guest booted by contrib/kernel-tests/run has what the kernel tier promises."""

from __future__ import annotations

import os
import socket


def test_kernel_has_rds_rdma_and_netem() -> None:
    with open("/proc/modules") as f:
        modules = f.read()
    for mod in ("rds_tcp", "rdma_rxe", "sch_netem"):
        assert f"{mod} " in modules, f"{mod} not loaded in the guest"
    s = socket.socket(socket.AF_RDS, socket.SOCK_SEQPACKET)
    s.close()
    assert os.path.isdir("/sys/class/infiniband_verbs") or os.path.isdir("/sys/class/infiniband")
