"""Build of soupkit's native kernels (everything else is declared in pyproject.toml).

Each ``src/soupkit/kernels/_*.c`` file is one extension module, ``soupkit.kernels._<name>``,
plain C against the CPython API (no torch headers, no C++): a kernel family added by another
file needs no change here. ``-ffp-contract=off`` keeps the compiler from fusing a multiply and
an add that the torch reference rounds separately (bit-identity); the kernels fuse explicitly
(``fmaf`` / FMA intrinsics) exactly where torch does. ISA-specific code is compiled per function
with ``__attribute__((target(...)))`` and chosen at run time, so one wheel serves every x86-64
CPU, and the portable C path compiles anywhere (aarch64, other compilers).

The build is optional by default: without a working C compiler the package installs without
kernels and soupkit runs its torch reference path (``soupkit.kernels.available()`` is False).
``SOUPKIT_REQUIRE_KERNELS=1`` turns a failed build into an error (``make`` sets it, so CI and
developers never test without the kernels by accident).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
KERNELS = Path("src", "soupkit", "kernels")


def _extensions() -> list[Extension]:
    if sys.platform == "win32":  # MSVC: no -ffp-contract (it contracts only under /fp:fast)
        args = ["/O2", "/fp:precise"]
    else:
        args = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c11", "-Wall"]
    return [
        Extension(
            f"soupkit.kernels.{src.stem}",
            sources=[str(src.relative_to(HERE)).replace(os.sep, "/")],
            depends=[
                str(h.relative_to(HERE)).replace(os.sep, "/") for h in (HERE / KERNELS).glob("*.h")
            ],
            extra_compile_args=args,
        )
        for src in sorted((HERE / KERNELS).glob("_*.c"))
    ]


class OptionalBuildExt(build_ext):
    """build_ext that leaves the kernels out (with a warning) when they do not compile."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # distutils' CompileError / PlatformError / LinkError
            self._failed(e)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        if os.environ.get("SOUPKIT_REQUIRE_KERNELS", "") not in ("", "0"):
            raise e
        print(
            f"WARNING: soupkit's native kernels were not built ({e}); soupkit will use its "
            "torch implementation (same results, slower). Set SOUPKIT_REQUIRE_KERNELS=1 to "
            "make this an error.",
            file=sys.stderr,
        )


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
