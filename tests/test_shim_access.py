"""Tests for lu2k.kernel_shim.access: the access policy, rate-limited refusals, socket directory and path rules.

The policy and the log limiter are pure (fake clock).  Directory and path rules run on
real files in a private temporary directory; "another user" is simulated with chown to
``nobody`` (root only).  The server tests connect as ``nobody`` through the system Python.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import json
import logging
import os
import pwd
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lu2k.errors import ConfigError, ShimError
from lu2k.kernel_shim.access import (
    AccessPolicy, PeerCred, RateLimitedLog, check_control_peer, claim_socket_path, parse_access, peer_credentials,
    prepare_socket_dir, secure_runtime_dir,
)
from lu2k.kernel_shim.loopback import serve_loopback

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="acting as another user needs root")
NOBODY = pwd.getpwnam("nobody").pw_uid if ROOT else -1
REPO = str(Path(__file__).resolve().parent.parent)


def peer(uid: int, gid: int = 9999, groups: tuple[int, ...] = (), pid: int = 42) -> PeerCred:
    return PeerCred(pid, uid, gid, frozenset(groups))


# --- policy ---------------------------------------------------------------------------------


def test_owner_and_root_may_do_anything_others_need_a_rule() -> None:
    pol = AccessPolicy(owner_uid=1000)
    for who in (peer(0), peer(1000)):
        assert pol.check_attach(who) is None and pol.check_bind(who, 0) is None
    assert "not allowed to attach" in (pol.check_attach(peer(1001)) or "")
    assert pol.check_attach(peer(-1)) == "peer credentials unavailable"


def test_parse_access_example() -> None:
    root_group = grp.getgrgid(0).gr_name
    pol = parse_access({
        "socket_group": root_group,
        "reserved_below": 100,
        "allow": [
            {"users": [2001, "root"], "portals": ["2000-2099"]},
            {"groups": [root_group, 5000], "portals": [12, "1024-"]},
            {"users": [3000]},
        ],
    }, owner_uid=1000)
    assert pol.socket_group == 0 and pol.socket_mode == 0o660 and pol.dir_mode == 0o750
    alice = peer(2001)
    assert pol.check_attach(alice) is None
    assert pol.check_bind(alice, 2050) is None
    assert "not granted" in (pol.check_bind(alice, 3000) or "")
    assert "reserved" in (pol.check_bind(alice, 12) or "")
    member = peer(2002, groups=(5000,))  # by supplementary group
    assert pol.check_bind(member, 12) is None and pol.check_bind(member, 1 << 31) is None
    assert "reserved" in (pol.check_bind(member, 13) or "")
    assert pol.check_bind(peer(2003, gid=5000), 12) is None  # by primary group
    plain = peer(3000)  # a rule without portals: everything from reserved_below up
    assert pol.check_bind(plain, 100) is None and "reserved" in (pol.check_bind(plain, 99) or "")
    assert pol.check_attach(peer(4000)) is not None


def test_parse_access_defaults_and_modes() -> None:
    pol = parse_access(None, owner_uid=7)
    assert pol.owner_uid == 7 and pol.grants == () and pol.socket_mode == 0o600 and pol.dir_mode == 0o700
    assert pol.reserved_below == 1024
    root_group = grp.getgrgid(0).gr_name
    assert parse_access({"socket_group": root_group, "socket_mode": "0640"}).socket_mode == 0o640
    assert parse_access({"socket_group": root_group, "socket_mode": "0o660"}).socket_mode == 0o660
    assert parse_access({"socket_group": root_group, "socket_mode": 0o640}).socket_mode == 0o640


@pytest.mark.parametrize(("raw", "where", "what"), [
    ({"colour": 1}, "lu2k.shim.access.colour", "unknown key"),
    ({"allow": [{"users": ["no-such-user-xyz"]}]}, "lu2k.shim.access.allow[0].users[0]", "no such user"),
    ({"allow": [{"groups": ["no-such-group-xyz"]}]}, "lu2k.shim.access.allow[0].groups[0]", "no such group"),
    ({"allow": [{"users": [1], "portals": ["9-3"]}]}, "lu2k.shim.access.allow[0].portals[0]", "empty"),
    ({"allow": [{"users": [1], "portals": ["lots"]}]}, "lu2k.shim.access.allow[0].portals[0]", "not a portal"),
    ({"allow": [{"users": [1], "portals": [True]}]}, "lu2k.shim.access.allow[0].portals[0]", "not a portal"),
    ({"allow": [{"portals": [1]}]}, "lu2k.shim.access.allow[0]", "names no users or groups"),
    ({"allow": [{"users": [1], "port": 3}]}, "lu2k.shim.access.allow[0].port", "unknown key"),
    ({"allow": "everyone"}, "lu2k.shim.access.allow", "list of rules"),
    ({"allow": ["alice"]}, "lu2k.shim.access.allow[0]", "expected a mapping"),
    ({"socket_mode": "0666", "socket_group": 0}, "lu2k.shim.access.socket_mode", "every local user"),
    ({"socket_mode": "0660"}, "lu2k.shim.access.socket_mode", "no socket_group"),
    ({"socket_mode": "rw-rw----"}, "lu2k.shim.access.socket_mode", "octal"),
    ({"socket_group": "no-such-group-xyz"}, "lu2k.shim.access.socket_group", "no such group"),
    ({"reserved_below": -1}, "lu2k.shim.access.reserved_below", "integer"),
    ({"reserved_below": "low"}, "lu2k.shim.access.reserved_below", "integer"),
    ({"allow": [{"users": [-5]}]}, "lu2k.shim.access.allow[0].users[0]", "out of range"),
])
def test_parse_access_errors_name_the_yaml_path(raw: dict[str, object], where: str, what: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_access(raw)
    assert any(line.startswith(f"{where}: ") and what in line for line in e.value.errors), e.value.errors


def test_parse_access_reports_every_error_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        parse_access({"colour": 1, "reserved_below": "x", "allow": [{"users": ["no-such-user-xyz"]}]})
    assert len(e.value.errors) == 3
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_access(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_control_socket_is_for_owner_and_root() -> None:
    assert check_control_peer(peer(0), 1000) is None
    assert check_control_peer(peer(1000), 1000) is None
    assert "neither root nor" in (check_control_peer(peer(1001), 1000) or "")
    assert check_control_peer(peer(-1), 1000) is not None


# --- rate-limited log -----------------------------------------------------------------------


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_rate_limited_log_bounds_lines_per_key_and_reports_suppressed() -> None:
    logger = logging.getLogger("lu2k.test.ratelimit")
    logger.propagate = False
    h = ListHandler()
    logger.addHandler(h)
    now = [0.0]
    rl = RateLimitedLog(logger, burst=3, per_seconds=30.0, max_keys=4, clock=lambda: now[0])
    for _ in range(100_000):
        rl.warning(("refused", 1001), "refused uid %d", 1001)
    assert h.lines == ["refused uid 1001"] * 3 and rl.suppressed == 99_997
    assert rl.warning(("refused", 1002), "refused uid %d", 1002)  # another key has its own bucket
    now[0] += 10.0  # one token back (3 per 30 s)
    assert rl.warning(("refused", 1001), "refused uid %d", 1001)
    assert h.lines[-1] == "refused uid 1001 (99997 similar lines suppressed)"
    assert not rl.warning(("refused", 1001), "refused uid %d", 1001)
    for uid in range(10_000):  # varying the key does not grow memory or the log without bound
        rl.warning(("refused", uid), "refused uid %d", uid)
    assert len(rl.limiter._kinds) <= 4 and len(h.lines) < 12
    logger.removeHandler(h)


# --- runtime directory choice ---------------------------------------------------------------


def fake_stat(uid: int, mode: int) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 0, 0, 2, uid, uid, 0, 0, 0, 0))


def test_secure_runtime_dir_never_picks_a_predictable_tmp_name() -> None:
    assert secure_runtime_dir({"XDG_RUNTIME_DIR": "/run/user/5"}, 5) == "/run/user/5/lu2k"
    assert secure_runtime_dir({}, 0) == "/run/lu2k"
    ours = {"/run/user/1000": fake_stat(1000, 0o700)}
    assert secure_runtime_dir({"HOME": "/home/u"}, 1000, ours.get) == "/run/user/1000/lu2k"
    theirs = {"/run/user/1000": fake_stat(1001, 0o700)}
    assert secure_runtime_dir({"HOME": "/home/u"}, 1000, theirs.get) == "/home/u/.lu2k/run"
    open_ = {"/run/user/1000": fake_stat(1000, 0o777)}
    assert secure_runtime_dir({"HOME": "/home/u"}, 1000, open_.get) == "/home/u/.lu2k/run"
    assert secure_runtime_dir({"HOME": "/home/u"}, 1000, lambda p: None) == "/home/u/.lu2k/run"
    for env in ({"HOME": "/"}, {"HOME": ""}):
        assert not secure_runtime_dir(env, 4242424, lambda p: None).startswith("/tmp")


# --- socket directory -----------------------------------------------------------------------


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "base"
    d.mkdir(mode=0o700)
    yield d


def test_socket_dir_is_created_private(base: Path) -> None:
    d = base / "a" / "b" / "run"
    prepare_socket_dir(str(d))
    st = os.lstat(d)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    prepare_socket_dir(str(d))  # idempotent
    shared = base / "shared"
    prepare_socket_dir(str(shared), mode=0o750, group=os.getegid())
    assert stat.S_IMODE(os.lstat(shared).st_mode) == 0o750


def test_existing_safe_dir_is_used_as_is(base: Path) -> None:
    d = base / "mine"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    prepare_socket_dir(str(d))
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o755  # an operator's directory is not re-moded


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o702])
def test_writable_by_others_is_refused(base: Path, mode: int) -> None:
    d = base / "open"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(ShimError, match="lets other users replace the sockets") as e:
        prepare_socket_dir(str(d))
    assert str(d) in str(e.value)
    # A shared sticky directory (like /tmp) gets the advice that helps: a directory of its own.
    assert ("subdirectory" in str(e.value)) == bool(mode & 0o1000)


def test_symlink_is_refused(base: Path) -> None:
    real = base / "real"
    real.mkdir(mode=0o700)
    link = base / "link"
    link.symlink_to(real)
    with pytest.raises(ShimError, match="symlink"):
        prepare_socket_dir(str(link))


def test_file_instead_of_dir_is_refused(base: Path) -> None:
    f = base / "file"
    f.write_text("x")
    with pytest.raises(ShimError, match="not a directory"):
        prepare_socket_dir(str(f))


@needs_root
def test_dir_owned_by_another_user_is_refused(base: Path) -> None:
    # The /tmp/lu2k-<uid> take-over: another user created the directory first (even 0700).
    d = base / "taken"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(ShimError, match=f"owned by uid {NOBODY}, not by the daemon's user"):
        prepare_socket_dir(str(d))


@needs_root
def test_unsafe_ancestors_are_refused(base: Path) -> None:
    theirs = base / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(ShimError, match=f"{theirs}: it is owned by uid {NOBODY}"):
        prepare_socket_dir(str(theirs / "run"))
    assert not (theirs / "run").exists()
    open_ = base / "open"
    open_.mkdir()
    os.chmod(open_, 0o777)  # world-writable without the sticky bit: anyone can rename "run"
    with pytest.raises(ShimError, match="rename"):
        prepare_socket_dir(str(open_ / "run"))
    sticky = base / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: others cannot rename our entries
    prepare_socket_dir(str(sticky / "run"))
    hop = base / "hop"
    hop.symlink_to(base / "sticky")
    os.lchown(hop, NOBODY, NOBODY)  # a symlink another user could re-point
    with pytest.raises(ShimError, match="symlink owned by uid"):
        prepare_socket_dir(str(hop / "run"))


# --- socket path ----------------------------------------------------------------------------


def test_planted_file_is_refused_stale_socket_replaced_live_refused(base: Path) -> None:
    path = str(base / "s.sock")
    claim_socket_path(path)  # nothing there
    Path(path).write_text("planted")
    with pytest.raises(ShimError, match="not a socket") as e:
        claim_socket_path(path)
    assert e.value.code == errno.EEXIST and Path(path).read_text() == "planted"
    os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.listen(1)
    with pytest.raises(ShimError) as e:
        claim_socket_path(path)
    assert e.value.code == errno.EADDRINUSE
    s.close()  # the file stays, nobody listens: stale, ours, replaced
    claim_socket_path(path)
    assert not os.path.exists(path)


def test_busy_socket_that_does_not_answer_is_not_stolen(base: Path) -> None:
    # A live daemon whose listen backlog is full times the probe out: that is not "stale".
    path = str(base / "busy.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(0)
    queued = []
    try:
        for _ in range(4):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            c.setblocking(False)
            queued.append(c)
            try:
                c.connect(path)
            except BlockingIOError:
                break  # the backlog is full now
        with pytest.raises(ShimError, match="does not answer") as e:
            claim_socket_path(path)
        assert e.value.code == errno.EADDRINUSE and os.path.exists(path)
    finally:
        for c in queued:
            c.close()
        srv.close()


@needs_root
def test_socket_owned_by_another_user_is_not_replaced(base: Path) -> None:
    path = str(base / "s.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.close()
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ShimError, match=f"owned by uid {NOBODY}"):
        claim_socket_path(path)
    assert os.path.exists(path)


def test_peer_credentials_of_a_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        cred = peer_credentials(a)
        assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.geteuid(), os.getegid())
        assert set(os.getgroups()) <= cred.groups | {os.getegid()}


# --- the shim server with a policy, a client of another uid ---------------------------------

SYSTEM_PYTHON = "/usr/bin/python3"

CLIENT = """
import errno, sys
from lu2k.errors import ShimError
from lu2k.kernel_shim.endpoint import Endpoint
try:
    ep = Endpoint.attach(sys.argv[1], int(sys.argv[2]), tx_pool_bytes=1 << 16, rx_pool_bytes=1 << 16)
except ShimError as e:
    print("refused", errno.errorcode.get(e.code, e.code), e)
else:
    ep.send("0@lo", b"hi", portal=int(sys.argv[2])).result(10)
    print("attached")
    ep.detach()
"""


ASYNC_CLIENT = """
import asyncio, errno, sys
from lu2k.errors import ShimError
from lu2k.kernel_shim.endpoint import AsyncEndpoint
async def main():
    try:
        ep = await AsyncEndpoint.attach(sys.argv[1], int(sys.argv[2]), tx_pool_bytes=1 << 16, rx_pool_bytes=1 << 16)
    except ShimError as e:
        print("refused", errno.errorcode.get(e.code, e.code), e)
    else:
        print("attached")
        await ep.detach()
asyncio.run(main())
"""


def run_as(uid: int, gid: int, code: str, *args: str, extra_groups: list[int] | None = None) -> str:
    out = subprocess.run([SYSTEM_PYTHON, "-c", code, *args], user=uid, group=gid, extra_groups=extra_groups or [],
                         env={"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"}, cwd="/", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def shared_base(tmp_path: Path) -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is 0700)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="lu2k-acc-"))
    os.chmod(d, 0o711)
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


@needs_root
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs a system Python another user can run")
async def test_policy_enforced_on_the_shim_socket(shared_base: Path, caplog: pytest.LogCaptureFixture) -> None:
    nogroup = pwd.getpwuid(NOBODY).pw_gid
    path = str(shared_base / "run" / "lu2kd.sock")
    policy = parse_access({"socket_group": nogroup, "reserved_below": 1000,
                           "allow": [{"users": [NOBODY], "portals": ["2000-2099"]}]})
    server = serve_loopback(path, access=policy)
    await server.start()
    try:
        st = os.lstat(os.path.dirname(path))
        assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == nogroup
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == nogroup
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(None, lambda: run_as(NOBODY, nogroup, CLIENT, path, "2001"))
        assert got == "attached"
        got = await loop.run_in_executor(None, lambda: run_as(NOBODY, nogroup, CLIENT, path, "5"))
        assert got.startswith("refused EACCES") and "portal 5 is reserved" in got
        got = await loop.run_in_executor(None, lambda: run_as(NOBODY, nogroup, CLIENT, path, "3000"))
        assert got.startswith("refused EACCES") and "portal 3000 is not granted" in got
        # In the socket's group (so the file system lets it connect) but named by no rule.
        other_uid = NOBODY - 1
        got = await loop.run_in_executor(None, lambda: run_as(other_uid, nogroup + 1, CLIENT, path, "2002", extra_groups=[nogroup]))
        assert got.startswith("refused EACCES") and "not allowed to attach" in got
        got = await loop.run_in_executor(None, lambda: run_as(other_uid, nogroup + 1, ASYNC_CLIENT, path, "2002", extra_groups=[nogroup]))
        assert got.startswith("refused EACCES") and "not allowed to attach" in got  # the asyncio client reads why, too
        assert server.counters["refused"] == 4 and server.ports == {}
        refusals = [r.getMessage() for r in caplog.records if "refused for uid" in r.getMessage()]
        assert len(refusals) == 4 and all(f"uid {u} pid " in m for u, m in zip((NOBODY, NOBODY, other_uid, other_uid), refusals))
    finally:
        await server.close()


@needs_root
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs a system Python another user can run")
async def test_control_socket_refuses_other_users(shared_base: Path, caplog: pytest.LogCaptureFixture) -> None:
    from lu2k.control import ControlServer, request

    path = str(shared_base / "ctl" / "lu2kd.ctl")
    ctl = ControlServer(path)

    async def hello(args: dict[str, object]) -> str:
        return "secret"

    ctl.register("hello", hello)
    await ctl.start()
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(os.path.dirname(path)).st_mode) == 0o700
        assert await request(path, "hello") == "secret"
        os.chmod(os.path.dirname(path), 0o755)  # even with the file system opened up ...
        os.chmod(path, 0o666)
        code = ("import json, socket, sys\n"
                "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                "s.sendall(json.dumps({'cmd': 'hello'}).encode() + b'\\n')\n"
                "print(s.makefile().readline().strip())\n")
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, lambda: run_as(NOBODY, NOBODY, code, path))
        reply = json.loads(line)
        assert reply["ok"] is False and "permission denied" in reply["error"] and "secret" not in line
        assert any(f"control connection refused for uid {NOBODY} pid " in r.getMessage() for r in caplog.records)
    finally:
        await ctl.close()



def test_daemon_config_carries_the_policy_with_yaml_paths() -> None:
    import yaml

    from lu2k.settings import DEFAULT_CONFIG_YAML, parse_config

    data = yaml.safe_load(DEFAULT_CONFIG_YAML)
    data["lu2k"] = {"shim": {"max_in_flight": 8, "access": {"reserved_below": 64, "allow": [{"users": [4321], "portals": ["64-"]}]}}}
    cfg = parse_config(data)
    assert cfg.shim.access.reserved_below == 64 and cfg.shim.access.check_bind(peer(4321), 64) is None
    assert "access" not in cfg.shim.options
    data["lu2k"]["shim"]["access"] = {"allow": [{"users": [4321], "portals": ["x"]}], "socket_mode": 0o666}
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert any(m.startswith("lu2k.shim.access.allow[0].portals[0]: ") for m in e.value.errors)
    assert any(m.startswith("lu2k.shim.access.socket_mode: ") for m in e.value.errors)
