"""contrib/kernel-tests/run, host side: the pure helpers that resolve the kernel and read results.

(The tier itself -- booting QEMU -- is run by contrib/kernel-tests/run, after the main suite.)
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

RUN = Path(__file__).resolve().parents[1] / "contrib" / "kernel-tests" / "run"


@pytest.fixture(scope="module")
def kt() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("lu2k_kernel_tests_run", str(RUN))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_parse_kernel_package_takes_the_versioned_image(kt: ModuleType) -> None:
    out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
    assert kt.parse_kernel_package(out) == "linux-image-6.1.0-56-amd64"
    alternatives = "linux-image-amd64\n |Depends: linux-image-6.1.0-57-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
    assert kt.parse_kernel_package(alternatives) == "linux-image-6.1.0-57-amd64"


def test_parse_kernel_package_explains_an_empty_answer(kt: ModuleType) -> None:
    with pytest.raises(kt.KernelTierError, match="apt-get update"):
        kt.parse_kernel_package("linux-image-amd64\n  Depends: <linux-image-virtual>\n")


def test_find_vmlinuz_needs_image_and_modules(kt: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "vmlinuz-6.1.0-56-amd64").write_bytes(b"\0")
    with pytest.raises(kt.KernelTierError, match="no lib/modules/6.1.0-56-amd64"):
        kt.find_vmlinuz(tmp_path)
    (tmp_path / "lib" / "modules" / "6.1.0-56-amd64").mkdir(parents=True)
    assert kt.find_vmlinuz(tmp_path).name == "vmlinuz-6.1.0-56-amd64"
    (tmp_path / "boot" / "vmlinuz-6.1.0-57-amd64").write_bytes(b"\0")
    with pytest.raises(kt.KernelTierError, match="expected one"):
        kt.find_vmlinuz(tmp_path)


def test_pytest_summary_is_the_last_closing_line(kt: ModuleType) -> None:
    log = (
        "============================= test session starts ==============================\n"
        "tests/guest/test_rds_guest.py ....F\n"
        "=========================== short test summary info ============================\n"
        "FAILED tests/guest/test_rds_guest.py::test_x\n"
        "========================= 1 failed, 26 passed in 74.29s =========================\n"
    )
    assert kt.pytest_summary(log) == "========================= 1 failed, 26 passed in 74.29s ========================="
    assert kt.pytest_summary("kernel panic\n") is None
    assert kt.pytest_summary("============================ no tests ran in 0.59s =============================")


def test_vng_command_boots_read_only_under_tcg(kt: ModuleType) -> None:
    cmd = kt.vng_command("vng", Path("/k/boot/vmlinuz-6.1.0-56-amd64"), Path("/out"), Path("/repo"), "bash g.sh", "1280M", 2)
    assert cmd[:3] == ["vng", "--run", "/k/boot/vmlinuz-6.1.0-56-amd64"]
    assert "--disable-kvm" in cmd and "--force-9p" in cmd and "--rw" not in cmd
    assert cmd[cmd.index("--rwdir") + 1] == "/out" and cmd[cmd.index("--exec") + 1] == "bash g.sh"
