"""``convnn sweep``: a grid of configurations x seeds, one table and one plot."""

from __future__ import annotations

import argparse

from .common import add_run_arguments, keys_epilog, parse_seeds, run_overrides

DESCRIPTION = (
    "Train every combination of the --grid values with every seed through the ordinary "
    "training runner, then write one table (sweep.csv, sweep.md: mean +- std over seeds of "
    "the validation-selected test accuracy, parameters, img/s) and one plot (sweep.png) into "
    "the sweep folder <output.dir>/<name>. Its runs are ordinary run directories "
    "(<point>-seed<k>), so compare and inspect work on them. The whole grid is checked "
    "before anything trains; running the same command again skips finished runs and "
    "resumes interrupted ones. Example: convnn sweep -c configs/demo.yaml --grid "
    "layer.metric=cosine,euclidean layer.K=4,9 --seeds 0,1,2"
)


def epilog() -> str:
    return keys_epilog()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(
        p, name_help="sweep folder name (default: sweep-<model>-<dataset>-<hash of the grid>)"
    )
    p.add_argument(
        "--grid",
        nargs="+",
        action="extend",
        default=[],
        required=True,
        metavar="KEY=V1,V2",
        help="config keys and the values to try, e.g. layer.metric=cosine,euclidean "
        "optim.lr=1e-3,3e-4 (layer.X is short for model.layer_kwargs.X; values are YAML)",
    )
    p.add_argument(
        "--seeds",
        type=parse_seeds,
        default=[0],
        metavar="0,1,2",
        help="seeds of every configuration (default: 0)",
    )


def run(args: argparse.Namespace) -> int:
    from convnn.train.config import load_config
    from convnn.train.sweep import check_grid, default_name, expand_grid, parse_grid, run_sweep

    overrides = [o for o in run_overrides(args) if not o.startswith("output.name=")]
    if args.print_config:
        from pathlib import Path

        cfg = load_config(args.config, overrides)
        points = expand_grid(parse_grid(args.grid))
        name = args.name or default_name(cfg, args.grid, args.seeds)
        check_grid(args.config, overrides, points, Path(cfg.output.dir) / name)
        for point in points:
            print(f"{point.tag}: {' '.join(point.overrides)}  seeds {args.seeds}")
        return 0
    cfg = load_config(args.config, overrides)
    run_sweep(
        args.config,
        overrides,
        args.grid,
        args.seeds,
        name=args.name,
        progress=cfg.output.progress,
    )
    return 0
