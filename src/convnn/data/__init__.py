"""Datasets (embedded digits, CIFAR archives, image folders), batch loaders and batched transforms.

Every dataset item is (image (C, H, W) float32 in [0, 1], int label); ``load_dataset`` returns
``(train, val, test, spec)`` with validation carved from the training data. Names load on first
use, so :mod:`convnn.data.catalog` (what each dataset is) is read without importing torch.
"""

from typing import TYPE_CHECKING

from ..utils import lazy_exports

__all__ = [
    "BatchAugment",
    "BatchLoader",
    "DataSpec",
    "DatasetError",
    "ImageFolderDataset",
    "InMemoryDataset",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "stratified_split",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "DatasetError": ".base",
        "DataSpec": ".base",
        "InMemoryDataset": ".base",
        "stratified_split": ".base",
        "list_datasets": ".catalog",
        "load_dataset": ".datasets",
        "ImageFolderDataset": ".folder",
        "BatchLoader": ".loader",
        "make_loader": ".loader",
        "BatchAugment": ".transforms",
    },
)

if TYPE_CHECKING:
    from .base import DatasetError, DataSpec, InMemoryDataset, stratified_split
    from .catalog import list_datasets
    from .datasets import load_dataset
    from .folder import ImageFolderDataset
    from .loader import BatchLoader, make_loader
    from .transforms import BatchAugment
