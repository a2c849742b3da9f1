"""``convnn demo`` (what ``make demo`` runs)."""

from __future__ import annotations

import argparse

from .common import add_set, keys_epilog

DESCRIPTION = (
    "Train a ConvNN network and its convolution twin on the embedded digits (no download), "
    "compare them and draw the neighbours the trained ConvNN layer picks. The demo's "
    "settings are listed below; --set changes any of them."
)


def epilog() -> str:
    from convnn.train.demo import demo_config

    return keys_epilog(demo_config(), "the demo's settings (model.layer is set per run)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out-dir", default="runs/demo", help="where the runs go (default: %(default)s)"
    )
    add_set(p)


def run(args: argparse.Namespace) -> int:
    from convnn.train.demo import run_demo

    run_demo(args.out_dir, args.overrides)
    return 0
