"""The one native part: the CPU top-K and window scores of :mod:`convnn.native` (plain C
and the CPython API, no torch headers). It is optional: where it does not build, the library
runs without it and says so (``convnn.native.status()``)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError


class BuildExt(build_ext):
    """Builds the kernels without their AMX part where the assembler lacks the tile
    instructions (binutils before 2.36 under a newer GCC), rather than not at all."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError):
            ext.extra_compile_args = [*ext.extra_compile_args, "-DCONVNN_NO_AMX"]
            super().build_extension(ext)


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "convnn._rank",
            ["src/convnn/_rank.c"],
            # no fused multiply-add: every build and CPU rounds a score the same way
            extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off"],
            optional=True,
        )
    ],
)
