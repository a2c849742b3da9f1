"""What each dataset name means, without loading anything (no torch import): the names
:func:`convnn.data.load_dataset` accepts, their classes, channels and native image size."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DATASETS", "DatasetInfo", "list_datasets"]


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int | None  # None: read from the data (an image folder's class folders)
    in_chans: int
    img_size: int  # native (or default) side in pixels
    about: str


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(10, 1, 8, "embedded 8x8 grey digits (scikit-learn), no download"),
    "cifar10": DatasetInfo(10, 3, 32, "CIFAR-10 python archive in --data-dir"),
    "cifar100": DatasetInfo(100, 3, 32, "CIFAR-100 python archive in --data-dir"),
    "imagefolder": DatasetInfo(None, 3, 224, "DATA/train/<class>/, DATA/val/<class>/ images"),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`convnn.data.load_dataset`."""
    return sorted(DATASETS)
