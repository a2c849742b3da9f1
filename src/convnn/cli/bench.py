"""``convnn bench``: the benchmark (see :mod:`convnn.bench`)."""

from convnn.bench.command import DESCRIPTION, add_arguments, run

__all__ = ["DESCRIPTION", "add_arguments", "run"]
