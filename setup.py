"""Builds jaxbn's optional native CPU kernels (jaxbn/_kernels.cc, XLA FFI) with the package.

Everything else is in pyproject.toml. The extension is optional: where the build fails (no C++
compiler, no jaxlib headers), installation goes on without it and jaxbn runs its jnp rules
(``jaxbn.native_status()`` says why).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _ffi_include_dir() -> str:
    import jaxlib  # a build requirement: its include/ holds the header-only XLA FFI API

    return os.path.join(os.path.dirname(jaxlib.__file__), "include")


class OptionalBuildExt(build_ext):
    """Builds the native kernels if it can; otherwise warns and installs without them."""

    def build_extension(self, ext):
        try:
            ext.include_dirs.append(_ffi_include_dir())
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any failure means "no native kernels"
            print(f"jaxbn: native kernels not built ({error}); jaxbn will use its jnp rules.",
                  file=sys.stderr)


# -ffp-contract=off: GCC fuses a * b + c into one FMA wherever it likes in C++, so a vector loop
# and the scalar loop after it could round differently; off, every path rounds as written.
flags = ["-std=c++17", "-O3", "-fvisibility=hidden", "-fno-math-errno", "-ffp-contract=off"]
if os.environ.get("JAXBN_PORTABLE_BUILD", "") in ("", "0"):
    flags.append("-march=native")  # built from source on the machine that runs it

setup(
    ext_modules=[Extension("jaxbn._kernels", ["jaxbn/_kernels.cc"], language="c++",
                           extra_compile_args=flags)],
    cmdclass={"build_ext": OptionalBuildExt},
)
