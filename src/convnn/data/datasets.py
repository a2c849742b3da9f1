"""One entry point for every dataset: ``load_dataset(name, ...) -> (train, val, test, spec)``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from .base import DatasetError, DataSpec, stratified_split
from .catalog import list_datasets
from .cifar import load_cifar
from .digits import load_digits
from .folder import load_imagefolder

DEFAULT_DATA_DIR = "data"


def load_dataset(
    name: str,
    data_dir: str | None = None,
    img_size: int | None = None,
    val_size: float | int = 0.1,
    seed: int = 0,
) -> tuple[Dataset, Dataset, Dataset, DataSpec]:
    """(train, val, test, spec). Items are (image (C, H, W) float32 in [0, 1], int label).

    The validation split is carved out of the training data, stratified, with ``seed``
    (``val_size``: fraction or count); the test set is never touched. ``digits`` uses a fixed
    split seed so its three splits are identical for every ``seed``. ``imagefolder`` uses its
    ``val/`` folder as validation when a ``test/`` folder exists. CIFAR ``data_dir`` defaults to
    ``./data``.
    """
    key = name.lower()
    if key not in list_datasets():
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(list_datasets())}")
    if img_size is not None and (isinstance(img_size, bool) or int(img_size) <= 0):
        raise DatasetError(f"{key}: img_size must be a positive integer, got {img_size!r}")

    if key == "digits":
        return load_digits(img_size, val_size)
    if key == "imagefolder":
        train, val, test, spec = load_imagefolder(data_dir, img_size)
        if val is not None:
            return train, val, test, spec
    else:
        train, test, spec = load_cifar(key, Path(data_dir or DEFAULT_DATA_DIR), img_size)
    labels = train.labels if hasattr(train, "labels") else torch.tensor(train.targets)
    train_idx, val_idx = stratified_split(labels, val_size, seed)
    return train.subset(train_idx), train.subset(val_idx), test, spec
