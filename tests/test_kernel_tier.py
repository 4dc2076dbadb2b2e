"""contrib/kernel-tests/run, host side: the pure helpers that resolve the kernel and read results.

(The tier itself -- booting QEMU -- is run by contrib/kernel-tests/run, after the main suite.)
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
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


# --- the LNet bed: build cache, source resolution, skip logic, topology, lst parsing ----------------


@pytest.fixture(scope="module")
def lnetbuild() -> ModuleType:
    sys.path.insert(0, str(RUN.parent))
    import lnetbuild as module

    return module


@pytest.fixture(scope="module")
def lnetbed() -> ModuleType:
    sys.path.insert(0, str(RUN.parent))
    import lnetbed as module

    return module


def test_run_modes(kt: ModuleType) -> None:
    assert kt.parse_mode([]) == "all"
    assert kt.parse_mode(["lnet"]) == "lnet" and kt.parse_mode(["guest"]) == "guest"
    assert kt.parse_mode(["prepare"]) == "prepare"
    with pytest.raises(kt.KernelTierError, match=r"usage: run \[all\|guest\|lnet\|prepare\]"):
        kt.parse_mode(["lnet", "extra"])


def test_lnet_pytest_command_runs_only_the_bed_tests(kt: ModuleType) -> None:
    repo = RUN.parents[2]
    cmd = kt.lnet_pytest_command("/py", repo, Path("/out"), "-k 'kernel and ping'")
    files = [a for a in cmd if a.endswith(".py")]
    assert files and all(Path(f).name.startswith("test_lnet_") for f in files)
    assert cmd[-2:] == ["-k", "kernel and ping"] and "--junitxml=/out/junit.xml" in cmd


def test_kernel_version_and_header_dirs(lnetbuild: ModuleType) -> None:
    assert lnetbuild.kernel_version("linux-image-6.1.0-57-amd64") == "6.1.0-57-amd64"
    assert lnetbuild.header_dirs("6.1.0-57-amd64") == ("/usr/src/linux-headers-6.1.0-57-common",
                                                        "/usr/src/linux-headers-6.1.0-57-amd64")
    assert lnetbuild.header_dirs("6.1.0-57-cloud-amd64")[1] == "/usr/src/linux-headers-6.1.0-57-cloud-amd64"
    with pytest.raises(lnetbuild.LnetBuildError, match="cannot tell the kernel version"):
        lnetbuild.kernel_version("linux-image-amd64")


def test_cache_key_is_kernel_and_commit(lnetbuild: ModuleType) -> None:
    assert lnetbuild.cache_key("6.1.0-57-amd64", "c881f8eb") == "6.1.0-57-amd64-c881f8eb"
    assert lnetbuild.cache_key("6.1.0-57-amd64", "c881f8eb") != lnetbuild.cache_key("6.1.0-50-amd64", "c881f8eb")
    for kver, commit in (("", "c881f8eb"), ("6.1.0-57-amd64", "../x"), ("6.1 0", "c8")):
        with pytest.raises(lnetbuild.LnetBuildError, match="bad"):
            lnetbuild.cache_key(kver, commit)


def test_commit_from_tarball_name(lnetbuild: ModuleType) -> None:
    assert lnetbuild.commit_from_name("lustre-release-c881f8eb.tar.xz") == "c881f8eb"
    assert lnetbuild.commit_from_name("lustre-release-c881f8ebcbd130cf6c2b9e8862582fc5d2da5289.tar.gz") == \
        "c881f8ebcbd130cf6c2b9e8862582fc5d2da5289"
    assert lnetbuild.commit_from_name("lustre-2.17.tar.xz") is None


def _manifest(root: Path, kver: str, commit: str, with_files: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if with_files:
        (root / "stage" / "modules").mkdir(parents=True, exist_ok=True)
        (root / "stage" / "bin").mkdir(parents=True, exist_ok=True)
        for name in ("libcfs", "lnet", "ksocklnd", "lnet_selftest"):
            (root / "stage" / "modules" / f"{name}.ko").write_bytes(b"\0")
        for tool in ("lnetctl", "lst"):
            (root / "stage" / "bin" / tool).write_bytes(b"\0")
    path = root / "lnet-build.json"
    path.write_text(json.dumps({"kver": kver, "commit": commit}))
    return path


def test_cached_build_is_used_only_for_its_kernel_and_commit(lnetbuild: ModuleType, tmp_path: Path) -> None:
    path = _manifest(tmp_path / "b", "6.1.0-57-amd64", "c881f8eb")
    assert lnetbuild.manifest_matches(path, "6.1.0-57-amd64", "c881f8eb")
    assert not lnetbuild.manifest_matches(path, "6.1.0-58-amd64", "c881f8eb")
    assert not lnetbuild.manifest_matches(path, "6.1.0-57-amd64", "0123abcd")
    (tmp_path / "b" / "stage" / "bin" / "lst").unlink()
    assert not lnetbuild.manifest_matches(path, "6.1.0-57-amd64", "c881f8eb")
    assert not lnetbuild.manifest_matches(tmp_path / "nothing.json", "6.1.0-57-amd64", "c881f8eb")
    (tmp_path / "bad.json").write_text("{not json")
    assert not lnetbuild.manifest_matches(tmp_path / "bad.json", "6.1.0-57-amd64", "c881f8eb")


def test_ensure_lnet_reuses_a_matching_cache_without_building(lnetbuild: ModuleType, tmp_path: Path) -> None:
    _manifest(tmp_path / "lnet" / "6.1.0-57-amd64-c881f8eb", "6.1.0-57-amd64", "c881f8eb")
    source = lnetbuild.LustreSource(tmp_path / "absent.tar.xz", True, "c881f8eb", "test")
    built = lnetbuild.ensure_lnet(tmp_path, "6.1.0-57-amd64", source, log=pytest.fail)
    assert built.root == (tmp_path / "lnet" / "6.1.0-57-amd64-c881f8eb").resolve()
    assert [p.name for p in built.modules] == ["libcfs.ko", "lnet.ko", "ksocklnd.ko", "lnet_selftest.ko"]


def test_source_resolution(lnetbuild: ModuleType, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    # Nothing anywhere: no source, and the skip message says how to give one.
    assert lnetbuild.find_source({}, repo) is None
    msg = lnetbuild.skip_message({}, repo)
    assert "LU2K_LUSTRE_SRC" in msg and str(tmp_path / "shared" / "lustre") in msg
    # ../shared/lustre holding one tarball.
    shared = tmp_path / "shared" / "lustre"
    shared.mkdir(parents=True)
    (shared / "README.md").write_text("x")
    (shared / "lustre-release-c881f8eb.tar.xz").write_bytes(b"")
    src = lnetbuild.find_source({}, repo)
    assert src.is_tarball and src.commit == "c881f8eb" and src.path.name == "lustre-release-c881f8eb.tar.xz"
    # Two tarballs: ambiguous, said so.
    (shared / "lustre-release-0123abcd.tar.xz").write_bytes(b"")
    with pytest.raises(lnetbuild.LnetBuildError, match="exactly one"):
        lnetbuild.find_source({}, repo)
    # $LU2K_LUSTRE_SRC wins; naming something absent is an error, not a silent skip.
    tree = tmp_path / "lustre-release"
    (tree / "lnet").mkdir(parents=True)
    (tree / "autogen.sh").write_text("")
    got = lnetbuild.find_source({"LU2K_LUSTRE_SRC": str(tree)}, repo)
    assert not got.is_tarball and got.path == tree and got.commit.startswith("tree-")
    assert lnetbuild.find_source({"LU2K_LUSTRE_SRC": str(tmp_path)}, repo).path == tree
    with pytest.raises(lnetbuild.LnetBuildError, match="does not exist"):
        lnetbuild.find_source({"LU2K_LUSTRE_SRC": str(tmp_path / "nope")}, repo)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(lnetbuild.LnetBuildError, match="neither"):
        lnetbuild.find_source({"LU2K_LUSTRE_SRC": str(tmp_path / "notes.txt")}, repo)


def test_tree_commit_changes_with_the_tree(lnetbuild: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "lnet").mkdir()
    (tmp_path / "lnet" / "a.c").write_text("int a;")
    first = lnetbuild.source_commit(tmp_path, False)
    assert lnetbuild.source_commit(tmp_path, False) == first
    (tmp_path / "lnet" / "a.c").write_text("int a, b;")
    assert lnetbuild.source_commit(tmp_path, False) != first


def test_build_commands_name_the_headers_and_lustre_includes(lnetbuild: ModuleType) -> None:
    conf = lnetbuild.configure_args("6.1.0-57-amd64")
    assert "--with-linux=/usr/src/linux-headers-6.1.0-57-common" in conf
    assert "--with-linux-obj=/usr/src/linux-headers-6.1.0-57-amd64" in conf
    assert {"--disable-client", "--disable-server", "--disable-tests", "--disable-ldiskfs"} <= set(conf)
    make = lnetbuild.kbuild_command(Path("/s"), "6.1.0-57-amd64", 2)
    assert make[:3] == ["make", "-C", "/usr/src/linux-headers-6.1.0-57-amd64"] and "M=/s/lnet" in make
    nostdinc = next(a for a in make if a.startswith("NOSTDINC_FLAGS="))
    assert nostdinc.split("=", 1)[1].split() == ["-I/s/lnet/include", "-I/s/lustre/include", "-I/s/include/uapi", "-I/s/include"]
    assert next(a for a in make if a.startswith("KCFLAGS=")).startswith("KCFLAGS=-include /s/config.h")


def test_bed_names_stay_prefixed_and_short(lnetbed: ModuleType) -> None:
    a, b = lnetbed.guest_spec("a"), lnetbed.guest_spec("b")
    assert (a.ip, b.ip, a.cidr) == ("10.203.1.10", "10.203.2.10", "10.203.1.10/16")
    assert a.mac != b.mac and lnetbed.gateway_ip("b") == "10.203.2.1"
    cmds = lnetbed.bridge_commands("lg-1234", [a, b]) + lnetbed.attach_commands("lg-1234", "lgbra", "a", "lu2k-x-a", "10.203.1.1")
    names = {c[c.index(k) + 1] for c in cmds for k in ("add", "dev") if k in c and c[c.index(k) + 1] not in ("dev",)}
    devices = {n for n in names if not n.startswith(("lg-", "10."))}
    assert devices and all(n.startswith("lg") and len(n) <= 15 for n in devices), devices
    # Nothing in the bed's own namespace gets an address: it must not route between the sites.
    assert not any("addr" in c and c[2] == "lg-1234" for c in cmds)
    # The leg holding an address has the same MAC each time (the guests' neighbour caches outlive a set of sites).
    assert ["ip", "-n", "lu2k-x-a", "link", "set", "lgla", "address", "02:1c:0a:cb:01:01"] in cmds
    assert lnetbed.leg_mac("10.203.2.1") == "02:1c:0a:cb:02:01"
    with pytest.raises(lnetbed.BedError, match="IFNAMSIZ"):
        lnetbed.check_ifname("lgthisnameistoolong")


def test_vng_argv_puts_the_guest_on_its_tap(lnetbed: ModuleType) -> None:
    spec = lnetbed.guest_spec("b")
    argv = lnetbed.vng_argv("vng", Path("/k/vmlinuz"), Path("/out/b"), Path("/repo"), spec, "/py", ["PATH=/x"])
    opts = next(a for a in argv if a.startswith("--qemu-opts="))
    assert "ifname=lgtapb" in opts and f"mac={spec.mac}" in opts
    assert argv[argv.index("--memory") + 1] == "768M" and argv[argv.index("--cpus") + 1] == "1"
    assert argv[argv.index("--exec") + 1].endswith("lnetagent.py /out/b PATH=/x")


LST_OUTPUT = """SESSION: lu2k FEATURES: 1 TIMEOUT: 300 FORCE: No
bulk is running now
### stat
[LNet Rates of c]
[R] Avg: 53       RPC/s Min: 53       RPC/s Max: 53       RPC/s
[W] Avg: 41       RPC/s Min: 41       RPC/s Max: 41       RPC/s
[LNet Bandwidth of c]
[R] Avg: 11.47    MiB/s Min: 11.47    MiB/s Max: 11.47    MiB/s
[W] Avg: 12.25    MiB/s Min: 12.25    MiB/s Max: 12.25    MiB/s
[LNet Bandwidth of s]
[R] Avg: 12.00    MiB/s Min: 12.00    MiB/s Max: 12.00    MiB/s
[W] Avg: 11.08    MiB/s Min: 11.08    MiB/s Max: 11.08    MiB/s
### query
bulk [0] is stopped
### errors
c:
Total 0 error nodes in c
s:
12345-10.203.2.10@tcp: [Session 3 brw errors, 0 ping errors]
Total 1 error nodes in s
### rpc
c:
12345-10.203.1.10@tcp: [Session 0 brw errors, 0 ping errors] [RPC: 5 errors, 0 dropped, 20 expired]
Total 1 error nodes in c
s:
12345-10.203.2.10@tcp: [Session 3 brw errors, 0 ping errors] [RPC: 1 errors, 0 dropped, 0 expired]
Total 1 error nodes in s
"""


def test_parse_lst_output(lnetbed: ModuleType) -> None:
    got = lnetbed.parse_lst_output(LST_OUTPUT)
    assert got["bandwidth_mib_s"] == {"c": [(11.47, 12.25)], "s": [(12.0, 11.08)]}
    assert got["rpc_s"] == {"c": [(53.0, 41.0)]}
    assert got["error_nodes"] == {"c": 0, "s": 1} and got["stopped"]
    # Only this session's errors decide; the lifetime RPC counters are kept apart.
    assert got["error_lines"] == ["12345-10.203.2.10@tcp: [Session 3 brw errors, 0 ping errors]"]
    assert len(got["rpc_lines"]) == 2 and "20 expired" in got["rpc_lines"][0]
    running = lnetbed.parse_lst_output(LST_OUTPUT.replace("bulk [0] is stopped", "batch still running"))
    assert not running["stopped"]


def test_lst_plan_script_and_volume(lnetbed: ModuleType) -> None:
    plan = lnetbed.LstPlan("10.203.1.10@tcp", "10.203.2.10@tcp1", size="1M", loops=8, concurrency=2)
    script = plan.script()
    assert "brw write check=full size=1M" in script and "brw read check=full size=1M" in script
    assert "lst add_group s 10.203.2.10@tcp1" in script and "lst end_session" in script
    assert "lst show_error --session c s" in script
    assert plan.bytes_each_way() == 16 << 20
    assert lnetbed.LstPlan("x", "y", size="64K", loops=1, concurrency=1).bytes_each_way() == 64 << 10


def test_phase_limit_is_cut_to_the_runs_deadline(kt: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert kt.phase_limit(1500.0, "the guest tier", env={}) == 1500.0  # no deadline: the phase's own limit
    assert kt.phase_limit(1500.0, "the guest tier", env={"LU2K_KT_DEADLINE": "10000"}, now=7000.0) == 1500.0
    assert kt.phase_limit(1800.0, "the LNet bed", env={"LU2K_KT_DEADLINE": "10000"}, now=9000.0) == 1000.0
    assert "cut from 1800 s to the 1000 s left" in capsys.readouterr().out


@pytest.mark.parametrize("env, said", [
    ({"LU2K_KT_DEADLINE": "10000"}, "200 s left before the run's deadline"),  # under the 300 s minimum
    ({"LU2K_KT_DEADLINE": "9000"}, "0 s left"),  # already past
    ({"LU2K_KT_DEADLINE": "tomorrow"}, "must be numbers"),
])
def test_a_phase_without_enough_time_is_not_started_and_says_why(kt: ModuleType, capsys: pytest.CaptureFixture[str],
                                                                 env: dict[str, str], said: str) -> None:
    assert kt.phase_limit(1500.0, "the guest tier", env=env, now=9800.0) is None
    out = capsys.readouterr().out
    assert said in out and "the guest tier not run" in out


def test_run_tests_gives_the_kernel_tier_a_deadline() -> None:
    script = (RUN.parents[1] / "run-tests.sh").read_text()
    assert "export LU2K_KT_DEADLINE=" in script and 'timeout --kill-after=60 "$budget" contrib/kernel-tests/run prepare' in script
