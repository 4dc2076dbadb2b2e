"""Builds lu2k's one optional compiled part: the UDT binding ``lu2k.backends._udtcore``.

Metadata lives in setup.cfg and the build system in pyproject.toml; this file only adds
the extension.  It is built against the system libudt (Debian's ``libudt-dev``: headers in
/usr/include/udt and the static ``libudt.a``).  libudt is linked in statically with its
UDP I/O wrapped (``ld --wrap``), so that the binding authenticates every UDT control packet
before libudt parses it (``lu2k/backends/_udt/packet_auth.h``).  When the headers, the
archive or a C++ compiler are missing the install still succeeds without it, and
``lu2k.backends.udt`` reports the backend unavailable with the reason (set
``LU2K_REQUIRE_UDT=1`` to make a failed build an error).

When built from a checkout (``pip install .``), the module is also copied next to its
sources, as ``build_ext --inplace`` would: the test suite runs from the checkout, where
``import lu2k`` finds the source tree first, and must exercise the real binding.
"""

from __future__ import annotations

import os
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


class OptionalBuildExt(build_ext):
    """Build the UDT binding if possible; otherwise say why and carry on."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure only disables the backend
            self._skip(e)
            return
        if not self.inplace:
            self._copy_to_checkout()

    def _copy_to_checkout(self) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        for ext in self.extensions:
            built = self.get_ext_fullpath(ext.name)
            target = os.path.join(here, self.get_ext_filename(ext.name))
            if os.path.exists(built) and os.path.isdir(os.path.dirname(target)) and os.access(os.path.dirname(target), os.W_OK):
                shutil.copyfile(built, target)

    def build_extension(self, ext: Extension) -> None:
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

setup(ext_modules=[udtcore], cmdclass={"build_ext": OptionalBuildExt})
