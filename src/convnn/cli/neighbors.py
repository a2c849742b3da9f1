"""``convnn inspect``: which neighbours the ConvNN layers of a trained run pick.

Loads a run (its best weights) or a checkpoint and a few images of one split, runs the model
in eval mode while recording every ConvNN layer's selections (:mod:`convnn.viz.neighbors`),
prints one line per layer and draws the picks of a few query positions over the first image.
(The module is not named ``inspect``, which would shadow the standard library's.)

Distances are Chebyshev distances, in cells of the layer's input map, from each query to the
neighbours it picked (the query itself included when the layer forces it in): a 3x3
convolution's picks all lie within 1, so the share beyond 1 is how far a layer reaches past
the neighbourhood a convolution would use.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_trained_model_arguments

MAX_QUERIES = 5  # plot_neighbors has one colour per query
DEFAULT_PLOT_LAYERS = 4


def _parse_query(text: str) -> tuple[float, float]:
    try:
        row, col = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ROW,COL fractions of the map in [0, 1], e.g. 0.5,0.5; got {text!r}"
        ) from None
    if not (0.0 <= row <= 1.0 and 0.0 <= col <= 1.0):
        raise argparse.ArgumentTypeError(f"expected ROW,COL fractions in [0, 1], got {text!r}")
    return row, col


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_trained_model_arguments(p)
    p.add_argument(
        "--images",
        type=int,
        default=1,
        metavar="N",
        help="how many images the statistics cover (default: %(default)s); the plot shows the "
        "first",
    )
    p.add_argument(
        "--index", type=int, default=0, metavar="I", help="first image of the split (default: 0)"
    )
    p.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="plot the layers whose name contains any of these (default: up to "
        f"{DEFAULT_PLOT_LAYERS} spread over the depth)",
    )
    p.add_argument(
        "--queries",
        nargs="+",
        type=_parse_query,
        metavar="ROW,COL",
        help=f"query positions to draw, as fractions of the map (at most {MAX_QUERIES}; "
        "default: 0.5,0.5 0.25,0.25 0.75,0.7)",
    )
    p.add_argument(
        "--out",
        metavar="PNG",
        help="plot path, replaced if it exists (default: <run dir>/neighbors.png, or "
        "neighbors-2.png, ... when that exists)",
    )


def _check_args(args: argparse.Namespace) -> None:
    if args.images < 1:
        raise ValueError(f"--images must be a positive integer, got {args.images}")
    if args.index < 0:
        raise ValueError(f"--index must be >= 0, got {args.index}")
    if args.queries is not None and len(args.queries) > MAX_QUERIES:
        raise ValueError(
            f"--queries takes at most {MAX_QUERIES} positions, got {len(args.queries)}"
        )


def _check_range(args: argparse.Namespace, size: int, split: str) -> None:
    if args.index + args.images > size:
        raise ValueError(
            f"--index and --images must pick images within the {size} of the {split} split "
            f"(index + images <= {size}), got index {args.index} and images {args.images}"
        )


def _plot_layers(records: list, patterns: list[str] | None) -> list:
    """The records to draw: those matching any pattern, else a few spread over the depth."""
    if patterns is None:
        if len(records) <= DEFAULT_PLOT_LAYERS:
            return records
        step = (len(records) - 1) / (DEFAULT_PLOT_LAYERS - 1)
        return [records[round(i * step)] for i in range(DEFAULT_PLOT_LAYERS)]
    names = [r.name for r in records]
    for pattern in patterns:
        if not any(pattern in name for name in names):
            raise ValueError(
                f"--layers expected part of a ConvNN layer name ({', '.join(names)}), "
                f"got {pattern!r}"
            )
    return [r for r in records if any(pattern in r.name for pattern in patterns)]


def run(args: argparse.Namespace) -> int:
    from convnn.train.distributed import cleanup
    from convnn.train.loading import load_trained_model, neighbor_picks
    from convnn.utils import unique_path
    from convnn.viz.neighbors import neighbor_table, plot_neighbors

    _check_args(args)
    try:
        loaded = load_trained_model(
            args.path, config=args.config, overrides=args.overrides, split=args.split
        )
    finally:
        cleanup()
    cfg = loaded.cfg
    _check_range(args, len(loaded.dataset), args.split)
    picks = neighbor_picks(loaded, args.index, args.images)
    records, images = picks.records, picks.images
    if not records:
        raise ValueError(
            f"RUN_DIR|CHECKPOINT {args.path!r} is a {cfg.model.name} with layer="
            f"{cfg.model.layer}, which has no ConvNN layer that selects neighbours; expected a "
            "run trained with a ConvNN layer (convnn, branching, convnn_attention, kvt, local, "
            "branching_attention)"
        )
    label, predicted = int(picks.labels[0]), int(picks.predicted[0])

    last = args.index + args.images - 1
    span = f"image {args.index}" if args.images == 1 else f"images {args.index}-{last}"
    epoch = loaded.meta["state"].get("epoch")
    print(
        f"{loaded.checkpoint} (epoch {epoch}): {cfg.model.name}/{cfg.model.layer}, "
        f"{span} of the {args.split} split, {images.shape[-2]}x{images.shape[-1]} px"
    )
    print(neighbor_table(records))

    shown = _plot_layers(records, args.layers)
    run_dir = Path(args.path) if Path(args.path).is_dir() else Path(args.path).parent
    out = Path(args.out) if args.out else Path(unique_path(run_dir / "neighbors.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (
        f"{run_dir.name}: {cfg.model.name} {cfg.model.layer} on {cfg.data.dataset}, "
        f"{args.split} image {args.index} (label {label}, predicted {predicted})"
    )
    plot_neighbors(images[0], shown, args.queries, path=out, title=title)
    print(
        f"plot: {out} (image {args.index}: label {label}, predicted {predicted}; "
        f"layers {', '.join(r.name for r in shown)})"
    )
    return 0
