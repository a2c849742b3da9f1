"""The scikit-learn handwritten digits: 1,797 real 8x8 grey images, 10 classes, no download."""

from __future__ import annotations

import torch

from .base import DatasetError, DataSpec, InMemoryDataset, resize_images, stratified_split

NATIVE_SIZE = 8
TEST_FRACTION = 0.2
# The split seed is fixed (not the user's seed) so that train/val/test never move between runs
# and numbers on this small benchmark stay comparable.
SPLIT_SEED = 0


def load_digits(
    img_size: int | None = None, val_size: float | int = 0.1
) -> tuple[InMemoryDataset, InMemoryDataset, InMemoryDataset, DataSpec]:
    """(train, val, test, spec): a fixed stratified 20% test split, then ``val_size`` of the rest.

    Pixels 0..16 are scaled to [0, 1]; mean/std come from the training split.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise DatasetError(
            "digits: needs scikit-learn, which ships the data; pip install scikit-learn"
        ) from exc

    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
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
