"""Trained runs as models: a run directory's (or a checkpoint's) weights, config and data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, check_metadata, load_checkpoint, load_weights
from .config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    validate_config,
)
from .distributed import DistInfo, init_distributed
from .engine import build_model, evaluate, model_identity, setup_torch
from .rundir import BEST, CHECKPOINT

__all__ = ["Picks", "TrainedModel", "evaluate_path", "load_trained_model", "neighbor_picks"]


@dataclass
class TrainedModel:
    """A run's model with verified weights, on its device, and one split of its dataset."""

    cfg: Config
    spec: Any
    model: torch.nn.Module
    dataset: Any
    checkpoint: Path
    meta: dict
    dist_info: DistInfo


def _config(path: Path, ckpt: Path, meta: dict, config: str | None, overrides) -> Config:
    """``config`` when given, else the run's config.yaml, else the checkpoint's own."""
    if config is not None:
        return load_config(config, overrides)
    if path.is_dir() and (path / "config.yaml").exists():
        return load_config(path / "config.yaml", overrides)
    saved = check_metadata(ckpt, meta["state"].get("config"), dict[str, Any] | None, "state.config")
    if saved is None:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} carries no config; pass --config")
    try:
        cfg = config_from_dict(saved)
    except ConfigError as e:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} carries an invalid config ({e}); pass --config"
        ) from None
    return validate_config(apply_overrides(cfg, list(overrides)))


def load_trained_model(
    path: str | os.PathLike,
    *,
    config: str | None = None,
    overrides: list[str] = (),
    split: str = "test",
) -> TrainedModel:
    """Load a run directory (its best weights) or a checkpoint file and its ``split``.

    The config is ``config`` when given, else the run's config.yaml, else the one embedded in
    the checkpoint; ``overrides`` apply on top.
    """
    from convnn.data import load_dataset

    p = Path(path)
    if p.is_dir():
        ckpt = p / BEST if (p / BEST).exists() else p / CHECKPOINT
        if not ckpt.exists():
            raise CheckpointError(f"no checkpoint in {str(p)!r}; train the run first")
    else:
        ckpt = p
    tensors, meta = load_checkpoint(ckpt)  # verified before anything in it is used
    cfg = _config(p, ckpt, meta, config, overrides)
    dist_info = init_distributed(cfg.train.device)
    setup_torch(cfg)
    train, val, test, spec = load_dataset(
        cfg.data.dataset, cfg.data.data_dir, img_size=cfg.model.img_size, val_size=cfg.data.val_size
    )
    ds = {"test": test, "val": val, "train": train}[split]
    if ds is None or len(ds) == 0:
        raise ConfigError(f"the {split} split of {cfg.data.dataset} is empty")
    model = build_model(cfg, spec).to(dist_info.device)
    load_weights(ckpt, model, model_identity(cfg, spec), tensors, meta)
    return TrainedModel(cfg, spec, model, ds, ckpt, meta, dist_info)


def evaluate_path(
    path: str,
    *,
    config: str | None = None,
    overrides: list[str] = (),
    split: str = "test",
) -> dict:
    """Evaluate a run directory (its best weights) or a checkpoint file on ``split``."""
    from convnn.data import BatchAugment, make_loader

    run = load_trained_model(path, config=config, overrides=overrides, split=split)
    cfg, dist_info = run.cfg, run.dist_info
    batch = cfg.data.eval_batch_size or cfg.data.batch_size
    loader = make_loader(
        run.dataset, batch // dist_info.world_size, shuffle=False, distributed=dist_info.enabled
    )
    augment = BatchAugment(run.spec, normalize=cfg.data.normalize)
    result = evaluate(
        run.model, loader, augment, dist_info, num_samples=len(run.dataset), amp=cfg.train.amp
    )
    return {
        "checkpoint": str(run.checkpoint),
        "epoch": run.meta["state"].get("epoch"),
        "split": split,
        **result,
    }


@dataclass
class Picks:
    """What the ConvNN layers of a trained model pick on a few images of its split."""

    images: torch.Tensor  # (B, C, H, W) in [0, 1], as stored
    labels: torch.Tensor  # (B,)
    predicted: torch.Tensor  # (B,) the model's classes (eval mode)
    records: list  # convnn.viz.neighbors.LayerNeighbors, one per ConvNN layer


def neighbor_picks(run: TrainedModel, index: int = 0, count: int = 1) -> Picks:
    """Run ``run.model`` in eval mode on images ``index .. index + count - 1`` of its split
    and record the neighbours every ConvNN layer selects."""
    from convnn.data import BatchAugment
    from convnn.viz.neighbors import collect_neighbors

    items = [run.dataset[i] for i in range(index, index + count)]
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([label for _, label in items])
    device = run.dist_info.device
    x, _ = BatchAugment(run.spec, normalize=run.cfg.data.normalize)(
        images.to(device), labels.to(device), train=False
    )
    records = collect_neighbors(run.model, x)
    with torch.no_grad():
        run.model.eval()
        predicted = run.model(x).argmax(-1).cpu()
    return Picks(images, labels, predicted, records)
