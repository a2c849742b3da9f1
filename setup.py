"""The one native part: the CPU top-K of :mod:`convnn.backends.native` (plain C and the
CPython API, no torch headers). It is optional: where it does not build, the library runs
without it and says so (``convnn.backends.native.status()``)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "convnn.backends._rank",
            ["src/convnn/backends/_rank.c"],
            extra_compile_args=["-O3", "-std=c99"],
            optional=True,
        )
    ]
)
