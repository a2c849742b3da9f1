"""``convnn demo``: a ConvNN branching network and its convolution baseline on digits.

The recipe is ``configs/demo.yaml`` (kept identical to :data:`DEMO_RECIPE` by a test, so the
demo also works from an installed package without the repository's configs/ folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import Config, apply_overrides, config_from_dict

__all__ = ["DEMO_RECIPE", "demo_config", "run_demo"]

DEMO_RECIPE: dict = {
    "model": {"name": "resnet18", "layer": "branching", "img_size": 8, "layer_kwargs": {}},
    "data": {"dataset": "digits", "batch_size": 64},
    "optim": {"name": "adamw", "lr": 0.002, "lr_batch_size": 64, "weight_decay": 0.05},
    "sched": {"name": "cosine", "warmup_epochs": 1},
    "train": {"epochs": 6, "seed": 0},
}

LAYERS = ("branching", "conv")


def demo_config(overrides: list[str] = ()) -> Config:
    """The demo recipe with ``overrides`` applied (types checked)."""
    cfg = config_from_dict(DEMO_RECIPE)
    return apply_overrides(cfg, list(overrides))


def run_demo(out_dir: str = "runs/demo", overrides: list[str] = ()) -> list[dict]:
    """Train both layers with the demo recipe into ``out_dir/<layer>`` and print the table."""
    from .distributed import cleanup, init_distributed
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
    if dist_info.is_main:
        text, png = compare_runs(dirs)
        print()
        print(text)
        if png is not None:
            print(f"plot: {png}")
    return summaries
