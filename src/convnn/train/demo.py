"""``convnn demo``: ConvNN against convolution on the embedded digits, in about a minute.

Two runs of the same compact network (``small_cnn``, ~66,000 parameters, sized for 8x8
images): its replaceable 3x3 convolutions as ConvNN layers, then as convolutions. Then the
comparison (table and ``compare.png``) and one picture, ``neighbors.png``: on a test image,
the neighbours each trained ConvNN layer picks for a few queries, against the 3x3 window a
convolution would use.

The recipe is ``configs/demo.yaml`` (kept identical to :data:`DEMO_RECIPE` by a test, so the
demo also works from an installed package without the repository's configs/ folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import Config, apply_overrides, config_from_dict

__all__ = ["DEMO_RECIPE", "LAYERS", "demo_config", "run_demo"]

DEMO_RECIPE: dict = {
    "model": {"name": "small_cnn", "layer": "convnn", "layer_kwargs": {"K": 9}},
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
    "optim": {"name": "adamw", "lr": 0.003, "lr_batch_size": 64, "weight_decay": 0.05},
    "sched": {"name": "cosine", "warmup_epochs": 1},
    # One thread: for a network this small, a second thread costs more than it brings, and
    # far more on a machine busy with other work.
    "train": {"epochs": 8, "seed": 0, "num_threads": 1},
}

LAYERS = ("convnn", "conv")


def demo_config(overrides: list[str] = ()) -> Config:
    """The demo recipe with ``overrides`` applied (types checked)."""
    cfg = config_from_dict(DEMO_RECIPE)
    return apply_overrides(cfg, list(overrides))


def run_demo(out_dir: str = "runs/demo", overrides: list[str] = ()) -> list[dict]:
    """Train both layers with the demo recipe into ``out_dir/<layer>``, print the comparison
    and draw the neighbour picture. Returns the two runs' summaries."""
    from .distributed import cleanup, init_distributed, say
    from .report import compare_runs
    from .runner import run_training

    dist_info = init_distributed()
    summaries, dirs = [], []
    try:
        for layer in LAYERS:
            cfg = demo_config(overrides)
            cfg.model.layer = layer
            cfg.output.dir, cfg.output.name = out_dir, layer
            run_dir = Path(out_dir) / layer
            if dist_info.is_main and (run_dir / "config.yaml").exists():
                shutil.rmtree(run_dir)  # the demo always starts from scratch
            summaries.append(run_training(cfg, dist_info=dist_info))
            dirs.append(str(run_dir))
    finally:
        cleanup()
    if not dist_info.is_main:
        return summaries
    out = Path(out_dir)
    text, png = compare_runs(dirs, out / "compare.png")
    say(dist_info, f"\n{text}")
    picture = _neighbour_picture(out / LAYERS[0], out / "neighbors.png")
    say(dist_info, f"\ncurves: {png}\nneighbours: {picture}")
    return summaries


def _neighbour_picture(run_dir: Path, path: Path) -> Path:
    """The picks of the trained ConvNN run's layers on a test image, with the 3x3 window."""
    from convnn.viz.neighbors import neighbor_distances, plot_neighbors

    from .loading import load_trained_model, neighbor_picks

    run = load_trained_model(run_dir)
    picks = neighbor_picks(run, index=0)
    for rec in picks.records:
        d = neighbor_distances(rec)[0]
        print(
            f"{rec.name}: on a {rec.grid.H}x{rec.grid.W} map its {rec.indices.shape[-1]} picks "
            f"lie {d.float().mean():.1f} cells from the query on average; "
            f"{(d > 1).float().mean():.0%} of them outside the 3x3 window of a convolution"
        )
    label, predicted = int(picks.labels[0]), int(picks.predicted[0])
    title = (
        f"Neighbours a trained ConvNN picks (digit {label}, predicted {predicted}) "
        "vs a convolution's 3x3 window"
    )
    plot_neighbors(picks.images[0], picks.records, path=path, title=title)
    return path
