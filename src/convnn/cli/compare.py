"""``convnn compare``: a table and a plot of run directories (seeds of one configuration as
mean +- std)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument(
        "--out",
        metavar="PNG",
        help="plot path, replaced if it exists (default: compare.png beside the runs, or "
        "compare-2.png, ... when that exists)",
    )
    p.add_argument("--title", help="plot title (default: the models and the dataset)")


def run(args: argparse.Namespace) -> int:
    from convnn.train.report import compare_runs

    text, png = compare_runs(args.runs, args.out, title=args.title)
    print(text)
    if png is not None:
        print(f"plot: {png}")
    return 0
