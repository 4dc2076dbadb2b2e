"""Builds lu2k's optional compiled parts: the UDT binding ``lu2k.backends._udtcore`` and the
mypyc-compiled hot path (``lu2k.hotpath.COMPILED_MODULES``).

Metadata lives in setup.cfg and the build system in pyproject.toml; this file only adds
the extensions.  The UDT binding is built against the system libudt (Debian's ``libudt-dev``: headers in
/usr/include/udt and the static ``libudt.a``).  libudt is linked in statically with its
UDP I/O wrapped (``ld --wrap``), so that the binding authenticates every UDT control packet
before libudt parses it (``lu2k/backends/_udt/packet_auth.h``).  When the headers, the
archive or a C++ compiler are missing the install still succeeds without it, and
``lu2k.backends.udt`` reports the backend unavailable with the reason (set
``LU2K_REQUIRE_UDT=1`` to make a failed build an error).

When built from a checkout (``pip install .``), the module is also copied next to its
sources, as ``build_ext --inplace`` would: the test suite runs from the checkout, where
``import lu2k`` finds the source tree first, and must exercise the real binding.

The hot path: when mypyc is importable (it comes with mypy) and ``LU2K_MYPYC`` is not ``0``,
the pure modules on the per-message path are compiled to C extensions (about 30-40 s).  Next
to them the build writes ``lu2k/_compiled_from.py``, the SHA-256 of each source it compiled;
without that record, or when a source changed since, ``import lu2k`` loads the ``.py`` files
(``lu2k.hotpath``).  The compiled modules go where the build puts them -- the installation,
or the checkout with ``build_ext --inplace`` -- and are not copied into the checkout otherwise.
A build without them (no mypyc, ``LU2K_MYPYC=0``, or a mypyc or compiler failure, which is not
an error) leaves none behind in its target.
"""

from __future__ import annotations

import glob
import os
import runpy
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

UDT_INCLUDE = os.environ.get("LU2K_UDT_INCLUDE", "/usr/include")
UDT_LIBDIR = os.environ.get("LU2K_UDT_LIBDIR", "")
# Where libudt.a may be: the configured directory, else Debian's (libudt-dev) and the usual ones.
UDT_ARCHIVE_DIRS = [UDT_LIBDIR] if UDT_LIBDIR else ["/usr/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/local/lib"]
# libudt's calls that the binding takes over (see udtcore.cpp, "packet authentication").
WRAPPED = ("sendmsg", "recvmsg", "bind", "close")
HERE = os.path.dirname(os.path.abspath(__file__))
RECORD = os.path.join("lu2k", "_compiled_from.py")  # relative to the checkout or the build directory
MYPYC_GROUP = "lu2k_hotpath"  # the shared library of the compiled modules: lu2k_hotpath__mypyc
# Commands that compile; the others (egg_info, dist_info, sdist...) need no mypyc run.
BUILDING = {"build", "build_ext", "bdist_wheel", "bdist_egg", "install", "develop", "editable_wheel"}


class OptionalBuildExt(build_ext):
    """Build the UDT binding if possible; otherwise say why and carry on."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure only disables the backend
            self._skip(e)
            return
        target = HERE if self.inplace else self.build_lib
        if HOTPATH_DIGESTS and not self._hotpath_failed:
            _write_record(target, HOTPATH_DIGESTS)
        else:
            _forget_hotpath(target)
        if not self.inplace:
            self._copy_to_checkout()

    def _copy_to_checkout(self) -> None:
        # Only the UDT binding: the hot path in a checkout comes from an in-place build alone, so
        # that its modules and its record always come from the same build.
        built = self.get_ext_fullpath(udtcore.name)
        target = os.path.join(HERE, self.get_ext_filename(udtcore.name))
        if os.path.exists(built) and os.path.isdir(os.path.dirname(target)) and os.access(os.path.dirname(target), os.W_OK):
            # A new file renamed into place: a process that has the old one loaded keeps its mapping.
            shutil.copyfile(built, target + ".new")
            os.replace(target + ".new", target)

    def build_extension(self, ext: Extension) -> None:
        if ext.name != udtcore.name:
            self._build_hotpath(ext)
            return
        header = os.path.join(UDT_INCLUDE, "udt", "udt.h")
        if not os.path.exists(header):
            self._skip(f"{header} not found (apt-get install libudt-dev)")
            return
        archive = next((a for d in UDT_ARCHIVE_DIRS if os.path.exists(a := os.path.join(d, "libudt.a"))), None)
        if archive is None:
            self._skip(f"libudt.a not found in {', '.join(UDT_ARCHIVE_DIRS)} (apt-get install libudt-dev)")
            return
        ext.extra_objects = [archive]
        ext.extra_link_args = ["-Wl," + ",".join(f"--wrap={name}" for name in WRAPPED)]
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._skip(e)

    def _build_hotpath(self, ext: Extension) -> None:
        if self._hotpath_failed:
            return
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - lu2k runs its pure modules instead (run() clears the rest)
            self._hotpath_failed = True
            print(f"lu2k: NOT compiling the hot path ({e}); the pure modules will run", file=sys.stderr)

    _hotpath_failed = False

    def _skip(self, why: object) -> None:
        if os.environ.get("LU2K_REQUIRE_UDT") == "1":
            raise SystemExit(f"lu2k: building the UDT binding failed: {why}")
        print(f"lu2k: NOT building the UDT binding ({why}); the 'udt' backend will be unavailable", file=sys.stderr)


udtcore = Extension(
    "lu2k.backends._udtcore",
    sources=["lu2k/backends/_udt/udtcore.cpp"],
    depends=["lu2k/backends/_udt/rate_law.h", "lu2k/backends/_udt/packet_auth.h"],
    include_dirs=[UDT_INCLUDE, "lu2k/backends/_udt"],
    libraries=["pthread"],  # libudt.a itself comes in build_extension, found at build time
    language="c++",
    extra_compile_args=["-std=c++17", "-O2", "-Wno-deprecated-declarations"],
)



def _forget_hotpath(root: str) -> None:
    """Remove a compiled hot path (its record and modules) from ``root``, a checkout or a build
    directory, so that only the pure sources remain there."""
    for path in [os.path.join(root, RECORD), *glob.glob(os.path.join(root, MYPYC_GROUP + "__mypyc.*"))]:
        if os.path.exists(path):
            os.remove(path)
    for module in _hotpath_modules():
        stem = os.path.join(root, *module.split("."))
        for built in glob.glob(stem + ".cpython-*.so") + glob.glob(stem + ".*.pyd"):
            os.remove(built)


def _write_record(root: str, digests: dict[str, str]) -> None:
    with open(os.path.join(root, RECORD), "w") as f:
        f.write('"""Written by setup.py: the SHA-256 of each source the compiled hot path was built from."""\n\n')
        f.write(f"SOURCES = {digests!r}\n")


def _hotpath_modules() -> tuple[str, ...]:
    # lu2k.hotpath imports nothing outside the standard library; read it without importing lu2k.
    return tuple(runpy.run_path(os.path.join(HERE, "lu2k", "hotpath.py"))["COMPILED_MODULES"])


def hotpath_extensions() -> tuple[list[Extension], dict[str, str]]:
    """The mypyc extensions and the digests of their sources, or none (mypyc missing,
    LU2K_MYPYC=0, or mypyc failed)."""
    if os.environ.get("LU2K_MYPYC", "1") == "0" or not BUILDING.intersection(sys.argv[1:]):
        return [], {}
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("lu2k: mypyc not found; the hot path stays pure Python (pip install mypy to compile it)", file=sys.stderr)
        return [], {}
    modules = _hotpath_modules()
    sources = {m: os.path.join("lu2k", *m.split(".")[1:]) + ".py" for m in modules}
    old = os.getcwd()
    os.chdir(HERE)  # mypyc writes its C files under build/ of the current directory
    try:
        exts = mypycify(list(sources.values()), opt_level="3", group_name=MYPYC_GROUP)
    except BaseException as e:  # noqa: BLE001 - mypyc exits on type errors; lu2k still works without it
        print(f"lu2k: NOT compiling the hot path (mypyc: {e}); the pure modules will run", file=sys.stderr)
        return [], {}
    finally:
        os.chdir(old)
    digest = runpy.run_path(os.path.join(HERE, "lu2k", "hotpath.py"))["source_digest"]
    return list(exts), {m: digest(os.path.join(HERE, p)) for m, p in sources.items()}


HOTPATH_EXTENSIONS, HOTPATH_DIGESTS = hotpath_extensions()
setup(ext_modules=[udtcore, *HOTPATH_EXTENSIONS], cmdclass={"build_ext": OptionalBuildExt})
