"""Builds lu2k's one optional compiled part: the UDT binding ``lu2k.backends._udtcore``.

Metadata lives in setup.cfg and the build system in pyproject.toml; this file only adds
the extension.  It is built against the system libudt (Debian's ``libudt-dev``: headers in
/usr/include/udt, ``libudt.so``).  When the headers or a C++ compiler are missing the
install still succeeds without it, and ``lu2k.backends.udt`` reports the backend
unavailable with the reason (set ``LU2K_REQUIRE_UDT=1`` to make a failed build an error).

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
    depends=["lu2k/backends/_udt/rate_law.h"],
    include_dirs=[UDT_INCLUDE, "lu2k/backends/_udt"],
    library_dirs=[UDT_LIBDIR] if UDT_LIBDIR else [],
    libraries=["udt"],
    language="c++",
    extra_compile_args=["-std=c++17", "-O2", "-Wno-deprecated-declarations"],
)

setup(ext_modules=[udtcore], cmdclass={"build_ext": OptionalBuildExt})
