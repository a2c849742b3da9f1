"""The one native part: the CPU top-K and window scores of :mod:`convnn.native` (plain C
and the CPython API, no torch headers). It is optional: where it does not build, the library
runs without it and says so (``convnn.native.status()``)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "convnn._rank",
            ["src/convnn/_rank.c"],
            # no fused multiply-add: every build and CPU rounds a score the same way
            extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
