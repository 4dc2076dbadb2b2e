"""Build Lustre's own LNet (libcfs, lnet, ksocklnd, lnet_selftest, lnetctl, lst) for the guest kernel.

Lustre's LNet is not packaged by Debian, so the LNet interoperability tests build it from a
lustre-release source tree or ``git archive`` tarball:

* source: ``$LU2K_LUSTRE_SRC`` (a ``lustre-release*.tar.xz`` / ``.tar.gz``, a directory holding
  exactly one such tarball, or an unpacked tree), else ``<repo>/../shared/lustre``; absent, the
  LNet tests are skipped with a message saying how to provide it;
* the kernel: modules are tied to the exact kernel the guest tier boots (the version behind
  ``linux-image-amd64`` moves with Debian security updates), so the build needs
  ``linux-headers-<kver>`` (installed here with apt-get when root) and the cache is keyed by
  ``(kernel version, Lustre commit)``: ``build/kernel-tests/lnet/<kver>-<commit>/``;
* the build: ``sh autogen.sh``; ``./configure`` with ``--with-linux=`` the ``-common`` header
  dir, ``--with-linux-obj=`` the ``-<arch>`` one and everything but LNet disabled; then only
  LNet's Kbuild tree (``make -C <headers> M=<src>/lnet modules`` with the include paths and
  ``-include config.h`` that Lustre's top-level Kbuild would add -- ``--disable-client`` still
  builds Lustre's core modules from the top level, and the top-level make needs the binary test
  images a ``git archive`` lacks); then ``make lib lnet/utils`` for lnetctl and lst;
* the result is staged as ``stage/modules/*.ko``, ``stage/bin/{lnetctl,lst}`` (the real
  binaries, not libtool wrappers) and ``stage/lib/liblnetconfig.so*`` (run them with
  ``LD_LIBRARY_PATH=stage/lib``), described by ``lnet-build.json``; the unpacked source is
  removed once staged.  A partial build never counts: ``lnet-build.json`` is written last.

Run as a script it builds (or finds) the cached build for the guest tier's kernel and prints the
path of ``lnet-build.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ENV_SRC = "LU2K_LUSTRE_SRC"
MANIFEST = "lnet-build.json"
# In load order: lnet needs sunrpc (a stock module) and libcfs; the selftest module needs a net.
MODULES = (
    ("libcfs", "lnet/libcfs/libcfs.ko"),
    ("lnet", "lnet/lnet/lnet.ko"),
    ("ksocklnd", "lnet/klnds/socklnd/ksocklnd.ko"),
    ("lnet_selftest", "lnet/selftest/lnet_selftest.ko"),
)
TOOLS = ("lnetctl", "lst")
# Debian packages the build needs besides linux-headers-<kver> (flex: configure stops without it).
BUILD_PACKAGES = (
    "autoconf", "automake", "libtool", "pkg-config", "flex", "bison", "make", "gcc",
    "libyaml-dev", "libnl-genl-3-dev", "libnl-3-dev", "libkeyutils-dev", "libmount-dev",
    "libssl-dev", "libreadline-dev",
)
CONFIGURE_DISABLE = (
    "--disable-client", "--disable-server", "--disable-tests", "--disable-doc", "--disable-manpages",
    "--disable-iokit", "--disable-gss", "--disable-crypto", "--disable-ldiskfs", "--with-o2ib=no",
    "--without-zfs",
)
# What Lustre's top-level Kbuild adds for every module (besides -include config.h).
KBUILD_WARNING_FLAGS = ("-Wno-format-truncation", "-Wno-stringop-truncation", "-Wno-stringop-overflow")
_TARBALL_RE = re.compile(r"\.tar\.(xz|gz|bz2)$|\.tgz$")
_COMMIT_IN_NAME_RE = re.compile(r"-([0-9a-f]{7,40})\.(?:tar\.(?:xz|gz|bz2)|tgz)$")
_KVER_RE = re.compile(r"^linux-image-(\d+\.\d+\.\d+-\d+(?:-[a-z0-9]+)?-([a-z0-9]+))$")


class LnetBuildError(Exception):
    """LNet could not be built (the message says which step and how to fix it)."""


@dataclass(frozen=True)
class LustreSource:
    """Where the Lustre source is and which commit it is (the second half of the cache key)."""

    path: Path
    is_tarball: bool
    commit: str
    origin: str  # which setting named it (for messages)


@dataclass(frozen=True)
class LnetBuild:
    """A finished, staged build."""

    root: Path
    kver: str
    commit: str

    @property
    def stage(self) -> Path:
        return self.root / "stage"

    @property
    def modules(self) -> list[Path]:
        return [self.stage / "modules" / f"{name}.ko" for name, _ in MODULES]

    @property
    def bin(self) -> Path:
        return self.stage / "bin"

    @property
    def lib(self) -> Path:
        return self.stage / "lib"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST


# --- pure helpers (tested on the host by tests/test_kernel_tier.py) -----------------------------


def kernel_version(image_package: str) -> str:
    """``linux-image-6.1.0-57-amd64`` -> ``6.1.0-57-amd64`` (what ``uname -r`` says in the guest)."""
    m = _KVER_RE.match(image_package)
    if not m:
        raise LnetBuildError(f"cannot tell the kernel version from the package name {image_package!r} "
                             "(expected linux-image-<version>-<flavour>)")
    return m.group(1)


def header_dirs(kver: str) -> tuple[str, str]:
    """Debian's two header packages for ``kver``: the ``-common`` source dir and the ``-<arch>`` obj dir.

    ``6.1.0-57-amd64`` -> ``/usr/src/linux-headers-6.1.0-57-common``, ``/usr/src/linux-headers-6.1.0-57-amd64``.
    """
    base, _, flavour = kver.rpartition("-")
    if not base or not flavour:
        raise LnetBuildError(f"bad kernel version {kver!r}")
    return f"/usr/src/linux-headers-{base}-common", f"/usr/src/linux-headers-{kver}"


def source_candidates(env: Mapping[str, str], repo: Path) -> list[tuple[Path, str]]:
    """Where to look for the Lustre source, in order, each with the setting that names it."""
    explicit = env.get(ENV_SRC, "").strip()
    if explicit:
        return [(Path(explicit), f"${ENV_SRC}")]
    return [(repo.parent / "shared" / "lustre", "../shared/lustre next to the repository")]


def resolve_source_path(path: Path, origin: str) -> tuple[Path, bool]:
    """The tarball or tree at ``path``: ``(path, is_tarball)``; a directory may hold one tarball."""
    if path.is_file():
        if not _TARBALL_RE.search(path.name):
            raise LnetBuildError(f"{origin} names {path}, which is neither a .tar.xz/.tar.gz tarball nor a directory")
        return path, True
    if not path.is_dir():
        raise FileNotFoundError(path)
    if (path / "lnet").is_dir() and (path / "autogen.sh").is_file():
        return path, False
    if (path / "lustre-release" / "lnet").is_dir():
        return path / "lustre-release", False
    tarballs = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith("lustre") and _TARBALL_RE.search(p.name))
    if len(tarballs) != 1:
        raise LnetBuildError(f"{origin} ({path}) is neither a lustre-release tree (lnet/, autogen.sh) nor a directory "
                             f"with exactly one lustre*.tar.xz tarball (found {[p.name for p in tarballs]})")
    return tarballs[0], True


def commit_from_name(name: str) -> str | None:
    """``lustre-release-c881f8eb.tar.xz`` -> ``c881f8eb``: the commit a ``git archive`` was named after."""
    m = _COMMIT_IN_NAME_RE.search(name)
    return m.group(1) if m else None


def cache_key(kver: str, commit: str) -> str:
    """The build cache's directory name: one build per (kernel version, Lustre commit)."""
    for what, value in (("kernel version", kver), ("Lustre commit", commit)):
        if not value or not re.fullmatch(r"[A-Za-z0-9._+-]+", value):
            raise LnetBuildError(f"bad {what} for the LNet build cache: {value!r}")
    return f"{kver}-{commit}"


def skip_message(env: Mapping[str, str], repo: Path) -> str:
    """Why the LNet tests do not run here, and how to make them run."""
    where = ", ".join(f"{p} ({o})" for p, o in source_candidates(env, repo))
    return (f"no Lustre source found (looked at {where}); to run the LNet interoperability tests set "
            f"{ENV_SRC} to a lustre-release tarball (git archive, e.g. lustre-release-<commit>.tar.xz), "
            "a directory holding one, or an unpacked lustre-release tree")


def configure_args(kver: str) -> list[str]:
    common, obj = header_dirs(kver)
    return ["./configure", f"--with-linux={common}", f"--with-linux-obj={obj}", *CONFIGURE_DISABLE]


def kbuild_command(src: Path, kver: str, jobs: int) -> list[str]:
    """Build LNet's Kbuild tree alone, with what Lustre's top-level Kbuild would add."""
    _, obj = header_dirs(kver)
    includes = " ".join(f"-I{src / d}" for d in ("lnet/include", "lustre/include", "include/uapi", "include"))
    kcflags = " ".join([f"-include {src / 'config.h'}", *KBUILD_WARNING_FLAGS])
    return ["make", "-C", obj, f"M={src / 'lnet'}", f"NOSTDINC_FLAGS={includes}", f"KCFLAGS={kcflags}", f"-j{jobs}", "modules"]


def manifest_matches(manifest: Path, kver: str, commit: str) -> bool:
    """A cached build is used only if its manifest names this kernel and commit and its files exist."""
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("kver") != kver or data.get("commit") != commit:
        return False
    root = manifest.parent
    wanted = [root / "stage" / "modules" / f"{n}.ko" for n, _ in MODULES] + [root / "stage" / "bin" / t for t in TOOLS]
    return all(p.is_file() for p in wanted)


# --- steps ------------------------------------------------------------------------------------


def find_source(env: Mapping[str, str], repo: Path) -> LustreSource | None:
    """The Lustre source to build, or None when there is none (the tests skip)."""
    for path, origin in source_candidates(env, repo):
        try:
            resolved, is_tarball = resolve_source_path(path, origin)
        except FileNotFoundError:
            if origin.startswith("$"):
                raise LnetBuildError(f"{origin} names {path}, which does not exist") from None
            continue
        return LustreSource(resolved, is_tarball, source_commit(resolved, is_tarball), origin)
    return None


def source_commit(path: Path, is_tarball: bool) -> str:
    """The commit of a source: from a tarball's name, a tree's git HEAD, else a content hash."""
    if is_tarball:
        named = commit_from_name(path.name)
        if named:
            return named
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "sha256-" + h.hexdigest()[:12]
    res = subprocess.run(["git", "-C", str(path), "rev-parse", "--short=8", "HEAD"], capture_output=True, text=True)
    if res.returncode == 0 and res.stdout.strip():
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return res.stdout.strip() + ("-dirty" if dirty else "")
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "tree-" + h.hexdigest()[:12]


def _installed(packages: Sequence[str]) -> list[str]:
    """Which of ``packages`` dpkg does not have installed."""
    missing = []
    for pkg in packages:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if res.returncode != 0 or "install ok installed" not in res.stdout:
            missing.append(pkg)
    return missing


def ensure_build_packages(kver: str, log: Callable[[str], None]) -> None:
    """The headers for ``kver`` and the build tools; apt-get installs what is missing (as root)."""
    missing = _installed([f"linux-headers-{kver}", *BUILD_PACKAGES])
    if not missing:
        return
    if os.geteuid() != 0:
        raise LnetBuildError(f"the LNet build needs these Debian packages: {' '.join(missing)} (apt-get install them as root)")
    log(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    res = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        res = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env,
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise LnetBuildError(f"apt-get install {' '.join(missing)} failed: {(res.stderr or res.stdout).strip()[-600:]}")


def _step(what: str, argv: Sequence[str], cwd: Path, logfile: Path, log: Callable[[str], None],
          env: Mapping[str, str] | None = None) -> float:
    log(f"LNet build: {what}")
    started = time.monotonic()
    with open(logfile, "ab") as out:
        out.write(f"\n### {what}: {' '.join(argv)}\n".encode())
        out.flush()
        res = subprocess.run(list(argv), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=dict(env) if env is not None else None)
    if res.returncode != 0:
        tail = logfile.read_text(errors="replace")[-1500:]
        raise LnetBuildError(f"{what} failed (exit {res.returncode}); full log {logfile}:\n{tail}")
    return time.monotonic() - started


def _unpack(source: LustreSource, dest: Path) -> Path:
    if not source.is_tarball:
        shutil.copytree(source.path, dest / "lustre-release", symlinks=True, ignore=shutil.ignore_patterns(".git"))
        return dest / "lustre-release"
    # tar(1), not tarfile: Debian 12's Python 3.11.2 predates extraction filters.
    res = subprocess.run(["tar", "-xf", str(source.path), "-C", str(dest)], capture_output=True, text=True)
    if res.returncode != 0:
        raise LnetBuildError(f"cannot unpack {source.path}: {res.stderr.strip()[-500:]}")
    tops = [p for p in dest.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise LnetBuildError(f"{source.path} should hold one top folder, it holds {sorted(p.name for p in tops)[:5]}")
    return tops[0]


def _stage(src: Path, stage: Path) -> None:
    (stage / "modules").mkdir(parents=True)
    (stage / "bin").mkdir()
    (stage / "lib").mkdir()
    for name, rel in MODULES:
        shutil.copy2(src / rel, stage / "modules" / f"{name}.ko")
    for tool in TOOLS:
        real = src / "lnet" / "utils" / ".libs" / tool
        shutil.copy2(real if real.is_file() else src / "lnet" / "utils" / tool, stage / "bin" / tool)
    libs = src / "lnet" / "utils" / "lnetconfig" / ".libs"
    for so in sorted(libs.glob("liblnetconfig.so*")):
        shutil.copy2(so, stage / "lib" / so.name, follow_symlinks=False)


def ensure_lnet(build: Path, kver: str, source: LustreSource, log: Callable[[str], None], jobs: int = 2) -> LnetBuild:
    """The cached build for (kver, source.commit), building it on a miss (about 1.5 min on 2 cores)."""
    root = build.resolve() / "lnet" / cache_key(kver, source.commit)
    result = LnetBuild(root, kver, source.commit)
    if manifest_matches(result.manifest, kver, source.commit):
        return result
    ensure_build_packages(kver, log)
    for d in header_dirs(kver):
        if not Path(d).is_dir():
            raise LnetBuildError(f"{d} is missing after installing linux-headers-{kver}")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    logfile = root / "build.log"
    log(f"building LNet from {source.path} ({source.commit}) for {kver} into {root}; log {logfile}")
    work = root / "src"
    work.mkdir()
    src = _unpack(source, work)
    times = {
        "autogen": _step("sh autogen.sh", ["sh", "autogen.sh"], src, logfile, log),
        "configure": _step("configure", configure_args(kver), src, logfile, log),
        "modules": _step("LNet kernel modules (lnet/ Kbuild)", kbuild_command(src, kver, jobs), src, logfile, log),
        "utils": _step("lnetctl and lst (make lib lnet/utils)", ["make", f"-j{jobs}", "lib", "lnet/utils"], src, logfile, log),
    }
    for _, rel in MODULES:
        if not (src / rel).is_file():
            raise LnetBuildError(f"the LNet build finished without {rel}; see {logfile}")
    _stage(src, result.stage)
    shutil.rmtree(work)
    manifest = {"kver": kver, "commit": source.commit, "source": str(source.path), "seconds": {k: round(v, 1) for k, v in times.items()},
                "modules": [str(p) for p in result.modules], "bin": str(result.bin), "lib": str(result.lib)}
    tmp = result.manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(result.manifest)
    log(f"LNet built in {sum(times.values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")
    return result


def main(argv: list[str] | None = None) -> int:
    """``lnetbuild.py BUILD_DIR KERNEL_PACKAGE``: print the manifest path, or why there is none (exit 0 skip, 2 error)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: lnetbuild.py BUILD_DIR linux-image-<kver>", file=sys.stderr)
        return 2
    repo = Path(__file__).resolve().parents[2]

    def log(msg: str) -> None:
        print(f"[kernel-tests] {msg}", file=sys.stderr, flush=True)

    try:
        source = find_source(os.environ, repo)
        if source is None:
            log("SKIPPED LNet build: " + skip_message(os.environ, repo))
            return 0
        built = ensure_lnet(Path(args[0]), kernel_version(args[1]), source, log)
    except (LnetBuildError, OSError) as e:
        log(f"ERROR: {e}")
        return 2
    print(built.manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
