"""``convnn eval``: a run's best weights (or any checkpoint) on one split."""

from __future__ import annotations

import argparse
import os

from .common import add_trained_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_trained_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from convnn.train.distributed import cleanup
    from convnn.train.loading import evaluate_path

    try:
        result = evaluate_path(
            args.path, config=args.config, overrides=args.overrides, split=args.split
        )
    finally:
        cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(
                f"{result['split']} acc {result['acc']:.4f}  top-5 {result['acc5']:.4f}  "
                f"loss {result['loss']:.4f}  ({result['count']} images, "
                f"{result['img_per_s']:.0f} img/s)  {result['checkpoint']}"
            )
    return 0
