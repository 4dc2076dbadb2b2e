"""Who may use the daemon's local sockets, and where those sockets may live.

The shim socket and the control socket are the daemon's only local doors; this module
owns the rules for both.  It is small and mostly pure: the policy is data parsed once from
the YAML mapping (:func:`parse_access`), decisions are functions of a peer's credentials
(:meth:`AccessPolicy.check_attach`, :meth:`AccessPolicy.check_bind`,
:func:`check_control_peer`), and the few system calls (``lstat``, ``mkdir``, ``chmod``,
``getsockopt(SO_PEERCRED)``) are in plain functions the listeners call.

Socket directory (:func:`prepare_socket_dir`)
---------------------------------------------
Sockets are only created in a directory that nobody but the daemon's user (and root) can
write: a directory the daemon creates itself (0700, or 0750 with ``socket_group``), or an
existing one owned by the daemon's user (or by root when the daemon is root) that is not a
symlink and not group- or world-writable.  Every directory above it must be owned by root
or the daemon's user and not writable by others unless it has the sticky bit (``/tmp``): so
no other user can rename a component and swap the sockets.  Anything else is refused with a
message naming the path and what is wrong -- another user who creates the directory first
makes the daemon refuse to start, never makes it use the attacker's directory.

A file already at a socket path (:func:`claim_socket_path`) is replaced only if it is a
socket owned by the daemon's user that nobody listens on (left by a daemon that died);
a live socket means another daemon runs there; anything else is refused.

Peers (:func:`peer_credentials`)
--------------------------------
Clients are identified by the kernel: ``SO_PEERCRED`` (pid, uid, gid at ``connect()``) and
``SO_PEERGROUPS`` (supplementary groups).  Root and the daemon's own user may always
attach and bind any portal.  Others may attach only if a rule of the policy names their
user or one of their groups, and bind only the portals such a rule grants; portals below
``reserved_below`` are never granted by default.  The control socket is for the daemon's
user and root only.  Every refusal is logged with the peer's uid and pid through a
:class:`~lu2k.ratelimit.RateLimitedLog` (re-exported here), so a refused client that retries in a loop cannot flood the log.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, ShimError
from ..ratelimit import RateLimitedLog

__all__ = [
    "AccessPolicy", "PeerCred", "PortalGrant", "RateLimitedLog", "check_control_peer", "claim_socket_path",
    "bind_private_socket", "parse_access", "peer_credentials", "prepare_socket_dir", "secure_runtime_dir",
]

PORTAL_MAX = 0xFFFFFFFF
DEFAULT_RESERVED_BELOW = 1024
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python does not name it
_MAX_GROUPS = 65536


# --- peers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerCred:
    """A local client as the kernel reports it (``-1`` for what could not be read)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    def describe(self) -> str:
        return f"uid {self.uid} pid {self.pid}"


UNKNOWN_PEER = PeerCred(-1, -1, -1)


def peer_credentials(sock: socket.socket) -> PeerCred:
    """The connected peer's pid/uid/gid and supplementary groups (kernel-verified)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
    except OSError:
        return UNKNOWN_PEER
    groups: frozenset[int] = frozenset()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError as e:
        if e.errno == errno.ERANGE:  # more than 256 groups: ask again with room for all
            try:
                raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_GROUPS)
                groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
            except OSError:
                pass
    return PeerCred(pid, uid, gid, groups)


# --- policy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortalGrant:
    """One rule: these users and groups may attach and bind these portal ranges."""

    uids: frozenset[int]
    gids: frozenset[int]
    portals: tuple[tuple[int, int], ...]  # inclusive ranges

    def matches(self, peer: PeerCred) -> bool:
        return peer.uid in self.uids or peer.gid in self.gids or not self.gids.isdisjoint(peer.groups)

    def covers(self, portal: int) -> bool:
        return any(lo <= portal <= hi for lo, hi in self.portals)


@dataclass(frozen=True)
class AccessPolicy:
    """Who may attach to the shim socket and which portals each may bind.

    ``owner_uid`` (the daemon's user) and root may do anything.  Others need a matching
    :class:`PortalGrant`.  ``socket_group`` opens the socket directory (0750) and the shim
    socket (``socket_mode``, default 0660) to one group; without it both are private (0700
    and 0600).  The control socket is never opened to the group.
    """

    owner_uid: int = field(default_factory=os.geteuid)
    grants: tuple[PortalGrant, ...] = ()
    reserved_below: int = DEFAULT_RESERVED_BELOW
    socket_group: int | None = None
    socket_mode: int = 0o600

    def is_owner(self, peer: PeerCred) -> bool:
        return peer.uid == 0 or (peer.uid == self.owner_uid and peer.uid >= 0)

    def check_attach(self, peer: PeerCred) -> str | None:
        """None if ``peer`` may use the shim socket, else the reason it may not."""
        if self.is_owner(peer):
            return None
        if peer.uid < 0:
            return "peer credentials unavailable"
        if any(g.matches(peer) for g in self.grants):
            return None
        return f"uid {peer.uid} is not allowed to attach (lu2k.shim.access.allow names no rule for it)"

    def check_bind(self, peer: PeerCred, portal: int) -> str | None:
        """None if ``peer`` may bind ``portal``, else the reason it may not."""
        if self.is_owner(peer):
            return None
        if any(g.matches(peer) and g.covers(portal) for g in self.grants):
            return None
        if portal < self.reserved_below:
            return f"portal {portal} is reserved (below {self.reserved_below}) and not granted to uid {peer.uid}"
        return f"portal {portal} is not granted to uid {peer.uid}"

    @property
    def dir_mode(self) -> int:
        return 0o750 if self.socket_group is not None else 0o700


def check_control_peer(peer: PeerCred, owner_uid: int | None = None) -> str | None:
    """The control socket is for the daemon's user and root: None if ``peer`` is one."""
    owner = os.geteuid() if owner_uid is None else owner_uid
    if peer.uid == 0 or (peer.uid == owner and peer.uid >= 0):
        return None
    return f"uid {peer.uid} is neither root nor the daemon's user (uid {owner})"


_POLICY_KEYS = ("allow", "reserved_below", "socket_group", "socket_mode")
_GRANT_KEYS = ("users", "groups", "portals")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _uid(name: Any) -> int:
    if isinstance(name, bool):
        raise ValueError(f"{name!r} is not a user")
    if isinstance(name, int):
        if not 0 <= name < 1 << 32:
            raise ValueError(f"uid {name} out of range")
        return name
    try:
        return pwd.getpwnam(str(name)).pw_uid
    except KeyError:
        raise ValueError(f"no such user {name!r}") from None


def _gid(name: Any) -> int:
    if isinstance(name, bool):
        raise ValueError(f"{name!r} is not a group")
    if isinstance(name, int):
        if not 0 <= name < 1 << 32:
            raise ValueError(f"gid {name} out of range")
        return name
    try:
        return grp.getgrnam(str(name)).gr_gid
    except KeyError:
        raise ValueError(f"no such group {name!r}") from None


def _portal_range(item: Any) -> tuple[int, int]:
    """``5``, ``"5"``, ``"100-199"``, ``"1024-"`` (to the top) or ``"any"``."""
    if isinstance(item, bool):
        raise ValueError(f"{item!r} is not a portal")
    if isinstance(item, int):
        lo = hi = item
    elif isinstance(item, str):
        text = item.strip()
        if text == "any":
            return (0, PORTAL_MAX)
        lo_s, sep, hi_s = text.partition("-")
        try:
            lo = int(lo_s)
            hi = (int(hi_s) if hi_s.strip() else PORTAL_MAX) if sep else lo
        except ValueError:
            raise ValueError(f"{item!r} is not a portal, a range like 100-199, 1024- or 'any'") from None
    else:
        raise ValueError(f"{item!r} is not a portal, a range like 100-199, 1024- or 'any'")
    if not 0 <= lo <= hi <= PORTAL_MAX:
        raise ValueError(f"portal range {lo}-{hi} is empty or outside 0..{PORTAL_MAX}")
    return (lo, hi)


def _mode(value: Any) -> int:
    """An octal mode: the integer 432 (YAML 0o660 reads as a string in YAML 1.1), or "0660"/"0o660"."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a file mode")
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        try:
            mode = int(text, 8)
        except ValueError:
            raise ValueError(f"{value!r} is not an octal file mode like 0660") from None
    else:
        raise ValueError(f"{value!r} is not a file mode")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"mode {oct(mode)} outside 0..0o777")
    return mode


def parse_access(raw: Mapping[str, Any] | None, *, where: str = "lu2k.shim.access", owner_uid: int | None = None) -> AccessPolicy:
    """The ``access:`` mapping as an :class:`AccessPolicy`; ConfigError listing every problem with its YAML path.

    Example::

        access:
          socket_group: lustre        # socket dir 0750 and shim socket 0660, group lustre
          reserved_below: 1024        # portals 0..1023: only rules that list them
          allow:
            - users: [alice, 1002]    # names or uids
              portals: ["2000-2099"]
            - groups: [lustre]
              portals: [12, "1024-"]  # a reserved portal must be listed to be granted
            - groups: [staff]          # no portals: every portal from reserved_below up
    """
    owner = os.geteuid() if owner_uid is None else owner_uid
    if raw is None:
        return AccessPolicy(owner_uid=owner)
    if not isinstance(raw, Mapping):
        raise ConfigError("expected a mapping with allow, reserved_below, socket_group, socket_mode", where=where)
    errs: list[str] = []
    for key in raw:
        if key not in _POLICY_KEYS:
            errs.append(f"{where}.{key}: unknown key (known: {', '.join(_POLICY_KEYS)})")
    reserved = DEFAULT_RESERVED_BELOW
    if "reserved_below" in raw:
        v = raw["reserved_below"]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= PORTAL_MAX + 1:
            errs.append(f"{where}.reserved_below: expected an integer 0..{PORTAL_MAX + 1}, got {v!r}")
        else:
            reserved = v
    group: int | None = None
    if raw.get("socket_group") is not None:
        try:
            group = _gid(raw["socket_group"])
        except ValueError as e:
            errs.append(f"{where}.socket_group: {e}")
    mode = 0o660 if group is not None else 0o600
    if "socket_mode" in raw:
        try:
            mode = _mode(raw["socket_mode"])
        except ValueError as e:
            errs.append(f"{where}.socket_mode: {e}")
        else:
            if mode & 0o007:
                errs.append(f"{where}.socket_mode: {oct(mode)} opens the socket to every local user; "
                            "use socket_group and a mode like 0660")
            elif mode & 0o070 and group is None:
                errs.append(f"{where}.socket_mode: {oct(mode)} gives group access but no socket_group is set")
    grants: list[PortalGrant] = []
    allow = raw.get("allow") or []
    if not isinstance(allow, list):
        errs.append(f"{where}.allow: expected a list of rules (users/groups/portals)")
        allow = []
    for i, rule in enumerate(allow):
        w = f"{where}.allow[{i}]"
        if not isinstance(rule, Mapping):
            errs.append(f"{w}: expected a mapping with users, groups and portals")
            continue
        for key in rule:
            if key not in _GRANT_KEYS:
                errs.append(f"{w}.{key}: unknown key (known: {', '.join(_GRANT_KEYS)})")
        uids: set[int] = set()
        gids: set[int] = set()
        for key, conv, out in (("users", _uid, uids), ("groups", _gid, gids)):
            for j, item in enumerate(_as_list(rule.get(key) or [])):
                try:
                    out.add(conv(item))
                except ValueError as e:
                    errs.append(f"{w}.{key}[{j}]: {e}")
        if not rule.get("users") and not rule.get("groups"):
            errs.append(f"{w}: names no users or groups")
        ranges: list[tuple[int, int]] = []
        if "portals" in rule:
            for j, item in enumerate(_as_list(rule["portals"])):
                try:
                    ranges.append(_portal_range(item))
                except ValueError as e:
                    errs.append(f"{w}.portals[{j}]: {e}")
        elif reserved <= PORTAL_MAX:
            ranges.append((reserved, PORTAL_MAX))
        grants.append(PortalGrant(frozenset(uids), frozenset(gids), tuple(ranges)))
    if errs:
        raise ConfigError(f"{len(errs)} error(s) in the access policy", where=where, errors=errs)
    return AccessPolicy(owner_uid=owner, grants=tuple(grants), reserved_below=reserved, socket_group=group, socket_mode=mode)


# --- socket directory and path --------------------------------------------------------------


def _refuse(path: str, what: str, code: int = errno.EPERM) -> ShimError:
    return ShimError(code, f"refusing to use {path}: {what}")


def _trusted_owner(uid: int) -> bool:
    return uid == 0 or uid == os.geteuid()


def _check_ancestor(path: str, st: os.stat_result) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "it is not a directory", errno.ENOTDIR)
    if not _trusted_owner(st.st_uid):
        raise _refuse(path, f"it is owned by uid {st.st_uid}, who could replace what lies below it")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise _refuse(path, f"mode {stat.S_IMODE(st.st_mode):04o} lets other users rename what lies below it")


def _walk_ancestors(directory: str) -> list[str]:
    """Check every existing component above ``directory``; return the missing ones (top first)."""
    parts = [p for p in directory.split("/") if p]
    cur = "/"
    _check_ancestor(cur, os.stat(cur))
    for i, part in enumerate(parts[:-1]):
        nxt = os.path.join(cur, part)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            return [os.path.join(nxt, *parts[i + 1 : j + 1]) for j in range(i, len(parts) - 1)]
        if stat.S_ISLNK(st.st_mode):
            if not _trusted_owner(st.st_uid):
                raise _refuse(nxt, f"it is a symlink owned by uid {st.st_uid}")
            nxt = os.path.realpath(nxt)
            st = os.stat(nxt)
        _check_ancestor(nxt, st)
        cur = nxt
    return []


def prepare_socket_dir(directory: str, *, mode: int = 0o700, group: int | None = None) -> None:
    """Create ``directory`` for our sockets, or check that an existing one is safe (see module doc).

    Raises ShimError naming the directory and what is wrong with it.
    """
    directory = os.path.abspath(directory)
    euid = os.geteuid()
    try:
        for missing in _walk_ancestors(directory):
            try:
                os.mkdir(missing, 0o755)
            except FileExistsError:
                pass
            _check_ancestor(missing, os.lstat(missing))
        created = False
        try:
            os.mkdir(directory, 0o700)  # group access is granted below, after the owner is certain
            created = True
        except FileExistsError:
            pass
        st = os.lstat(directory)
        if stat.S_ISLNK(st.st_mode):
            raise _refuse(directory, "it is a symlink (the socket directory must be a real directory)")
        if not stat.S_ISDIR(st.st_mode):
            raise _refuse(directory, "it is not a directory", errno.ENOTDIR)
        mode_now = stat.S_IMODE(st.st_mode)
        if mode_now & 0o022 and mode_now & stat.S_ISVTX:
            raise _refuse(directory, f"mode {mode_now:04o} lets other users replace the sockets (a shared directory "
                                     "like /tmp); put the sockets in a directory of their own, e.g. a subdirectory")
        if st.st_uid != euid:
            raise _refuse(directory, f"it is owned by uid {st.st_uid}, not by the daemon's user (uid {euid}); "
                                     "remove it or choose another path")
        if mode_now & 0o022:
            raise _refuse(directory, f"mode {mode_now:04o} lets other users replace the sockets; "
                                     "chmod go-w it or remove it")
        if created or group is not None:
            if group is not None and st.st_gid != group:
                os.chown(directory, -1, group)
            os.chmod(directory, mode)
    except ShimError:
        raise
    except OSError as e:
        raise ShimError(e.errno or errno.EIO, f"cannot prepare socket directory {directory}: {e.strerror}") from None


def claim_socket_path(path: str, sock_type: int = socket.SOCK_SEQPACKET) -> None:
    """Make ``path`` free for our bind(): remove our own stale socket, refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ShimError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it (remove it or choose another path)")
    if st.st_uid != os.geteuid():
        raise ShimError(errno.EEXIST, f"{path} is a socket owned by uid {st.st_uid}, not by the daemon's user; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left over from a daemon that died
        return
    except FileNotFoundError:
        return
    except OSError as e:  # a full backlog, a timeout: somebody is there; never steal its path
        raise ShimError(errno.EADDRINUSE, f"{path} is a socket that does not answer a probe ({e}); is another daemon running?") from None
    finally:
        probe.close()
    raise ShimError(errno.EADDRINUSE, f"another daemon is listening on {path}")


def bind_private_socket(path: str, sock_type: int, *, mode: int, group: int | None = None) -> socket.socket:
    """A listening-ready AF_UNIX socket bound at ``path`` (directory already prepared) with ``mode``/``group``."""
    claim_socket_path(path, sock_type)
    sock = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
    except OSError as e:
        sock.close()
        raise ShimError(e.errno or errno.EIO, f"cannot bind socket {path}: {e.strerror}") from None
    return sock


def secure_runtime_dir(env: Mapping[str, str] | None = None, euid: int | None = None,
                       stat_fn: Callable[[str], os.stat_result | None] | None = None) -> str:
    """Where a daemon of this user keeps its sockets, with no name another user can take first.

    ``$XDG_RUNTIME_DIR/lu2k``; root: ``/run/lu2k``; else ``/run/user/$UID/lu2k`` when that
    runtime directory exists and is ours; else ``$HOME/.lu2k/run`` (the home directory is
    the user's own).  Never a predictable name in a world-writable directory like /tmp.
    """
    env = os.environ if env is None else env
    uid = os.geteuid() if euid is None else euid
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "lu2k")
    if uid == 0:
        return "/run/lu2k"
    look = stat_fn or _stat_or_none
    run_user = f"/run/user/{uid}"
    st = look(run_user)
    if st is not None and st.st_uid == uid and not st.st_mode & 0o077:
        return os.path.join(run_user, "lu2k")
    home = env.get("HOME")
    if not home:
        try:
            home = pwd.getpwuid(uid).pw_dir
        except KeyError:
            home = ""
    if not home or home == "/":
        return os.path.join(run_user, "lu2k")  # creating it fails with a clear message if it is not ours
    return os.path.join(home, ".lu2k", "run")


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None

