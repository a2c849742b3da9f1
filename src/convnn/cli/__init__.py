"""The ``convnn`` console command: one module per subcommand.

Subcommands are entries of :data:`COMMANDS`. A subcommand living in its own module that
defines ``add_arguments(parser)`` and ``run(args)`` (and, optionally, ``DESCRIPTION`` and
``epilog()``) is one line: ``register_module("verify", "check the special cases",
"convnn.cli.verify")``; the module is imported when the parser is built, so it imports
nothing heavy at its top (``convnn --help`` never imports torch). A function pair works too::

    def _hello_args(p: argparse.ArgumentParser) -> None: ...
    def _hello(args: argparse.Namespace) -> int: ...
    register("hello", "print a greeting", _hello_args, _hello)

Any ``ValueError`` (configuration, dataset, checkpoint problems) or ``OSError`` (a full disk,
a missing permission) is printed as one line ``convnn: error: ...`` and the command exits with
status 2; set ``CONVNN_TRACEBACK=1`` to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..utils import one_line

__all__ = ["COMMANDS", "Command", "build_parser", "main", "register", "register_module"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str = ""


COMMANDS: list[Command] = []


def register(
    name: str,
    help: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
    description: str = "",
) -> None:
    """Add (or replace) the subcommand ``name``."""
    COMMANDS[:] = [c for c in COMMANDS if c.name != name]
    COMMANDS.append(Command(name, help, add_args, run, description or help))


def register_module(name: str, help: str, module: str) -> None:
    """Add the subcommand ``name`` implemented by ``module.add_arguments`` and ``module.run``
    (and its ``DESCRIPTION`` and ``epilog()`` when it has them)."""

    def add_args(p: argparse.ArgumentParser) -> None:
        mod = importlib.import_module(module)
        p.description = getattr(mod, "DESCRIPTION", p.description)
        if hasattr(mod, "epilog"):
            p.epilog = mod.epilog()
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)

    register(name, help, add_args, lambda args: args._run(args))


for _name, _help, _module in (
    ("train", "train a model from a YAML recipe", "train"),
    ("eval", "evaluate a run or checkpoint on the test split", "evaluate"),
    ("compare", "side-by-side table and plot of run directories", "compare"),
    ("sweep", "train a grid of configurations x seeds, then one table and one plot", "sweep"),
    ("demo", "ConvNN against convolution on digits in about a minute, with pictures", "demo"),
    ("verify", "check each special case against the PyTorch module it recovers", "verify"),
    (
        "bench",
        "time and peak memory of the layers against conv, SDPA and the dense formulation",
        "bench",
    ),
    (
        "inspect",
        "which neighbours each ConvNN layer of a trained run picks (table and plot)",
        "neighbors",
    ),
):
    register_module(_name, _help, f"{__name__}.{_module}")


def build_parser() -> argparse.ArgumentParser:
    from convnn import __version__

    parser = argparse.ArgumentParser(
        prog="convnn",
        description="Convolutional Nearest Neighbors: train, evaluate and compare models.",
    )
    parser.add_argument("--version", action="version", version=f"convnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(_run=cmd.run)
        cmd.add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    except BaseException:
        if not _joined_process_group():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if _joined_process_group():
        # A rank of a torchrun job: leave without interpreter finalization, which can abort
        # with SIGABRT after the work is done (see convnn.train.distributed.exit_now).
        sys.modules["convnn.train.distributed"].exit_now(code)
    return code


def _joined_process_group() -> bool:
    # never imported by a command that cannot join
    mod = sys.modules.get("convnn.train.distributed")
    return mod is not None and mod.joined_process_group()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # output piped into a reader that stopped early, e.g. `| head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush stays quiet
        return 0
    except (ValueError, FloatingPointError, OSError) as exc:  # OSError: disk full, permissions
        if os.environ.get("CONVNN_TRACEBACK"):
            raise
        print(f"convnn: error: {one_line(exc) or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convnn: interrupted; continue a training run with --resume", file=sys.stderr)
        return 130
