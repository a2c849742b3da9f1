"""The scikit-learn handwritten digits: 1,797 real 8x8 grey images, 10 classes, no download."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from .base import DatasetError, DataSpec, InMemoryDataset, resize_images, stratified_split

NATIVE_SIZE = 8
TEST_FRACTION = 0.2
# The split seed is fixed (not the user's seed) so that train/val/test never move between runs
# and numbers on this small benchmark stay comparable.
SPLIT_SEED = 0


def _read_digits():
    """(pixels (1797, 64) in 0..16, labels (1797,)) from the CSV file scikit-learn ships.

    The file is read directly: importing ``sklearn.datasets`` for it takes seconds (most of
    the demo's start-up on a busy machine); the numbers are those of ``load_digits()``.
    """
    spec = importlib.util.find_spec("sklearn")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if path is None or not path.is_file():
        raise DatasetError(
            "digits: needs scikit-learn, which ships the data (sklearn/datasets/data/"
            "digits.csv.gz); pip install scikit-learn"
        )
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1], data[:, -1].astype(np.int64)


def load_digits(
    img_size: int | None = None, val_size: float | int = 0.1
) -> tuple[InMemoryDataset, InMemoryDataset, InMemoryDataset, DataSpec]:
    """(train, val, test, spec): a fixed stratified 20% test split, then ``val_size`` of the rest.

    Pixels 0..16 are scaled to [0, 1]; mean/std come from the training split.
    """
    pixels, target = _read_digits()
    images = torch.as_tensor(pixels, dtype=torch.float32).div_(16.0).view(-1, 1, 8, 8)
    labels = torch.as_tensor(target, dtype=torch.int64)
    size = img_size or NATIVE_SIZE
    # 1,797 tiny images: resizing once up front is cheaper than per batch.
    images = resize_images(images, size)
    full = InMemoryDataset(images, labels, [str(d) for d in range(10)])

    pool_idx, test_idx = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    pool = full.subset(pool_idx)
    train_idx, val_idx = stratified_split(pool.labels, val_size, SPLIT_SEED)
    train, val, test = pool.subset(train_idx), pool.subset(val_idx), full.subset(test_idx)

    spec = DataSpec(
        name="digits",
        num_classes=10,
        in_chans=1,
        img_size=size,
        mean=(round(train.images.mean().item(), 4),),
        std=(round(train.images.std().item(), 4),),
    )
    return train, val, test, spec
