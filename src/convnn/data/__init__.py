"""Datasets (embedded digits, CIFAR archives, image folders), batch loaders and batched transforms.

Every dataset item is (image (C, H, W) float32 in [0, 1], int label); ``load_dataset`` returns
``(train, val, test, spec)`` with validation carved from the training data.
"""

from .base import DatasetError, DataSpec, InMemoryDataset, stratified_split
from .datasets import list_datasets, load_dataset
from .folder import ImageFolderDataset
from .loader import BatchLoader, make_loader
from .transforms import BatchAugment

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
