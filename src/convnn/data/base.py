"""Shared pieces: the dataset spec, the error type, in-memory datasets and splitting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


class DatasetError(ValueError):
    """A dataset is missing, corrupt or malformed; the message is one line that says what to do."""


@dataclass(frozen=True)
class DataSpec:
    """What a model and the transforms need to know about a dataset."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def resize_images(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of (N, C, H, W) to (N, C, size, size); a no-op when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )


class InMemoryDataset(Dataset):
    """Images and labels held as whole tensors so batches are a single index operation.

    ``images``: (N, C, H, W) float32 in [0, 1] at the *stored* resolution; ``labels``: (N,) int64.
    When ``img_size`` differs from the stored H/W (e.g. CIFAR upscaled to 224 px for a ViT, which
    would not fit in memory pre-resized) items and batches are resized on the fly; use
    :meth:`batch` (or ``make_loader``) rather than indexing ``images`` directly in that case.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        classes: Sequence[str],
        img_size: int | None = None,
    ) -> None:
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"images must be (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.img_size = int(img_size if img_size is not None else images.shape[-1])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = resize_images(self.images[index].unsqueeze(0), self.img_size)[0]
        return image, int(self.labels[index])

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``index`` as ((B, C, img_size, img_size) float32, (B,) int64), on the data's device."""
        index = index.to(self.images.device)
        return resize_images(self.images[index], self.img_size), self.labels[index]

    def subset(self, index: Tensor) -> InMemoryDataset:
        """A new dataset holding copies of rows ``index`` (so the parent can be freed)."""
        return InMemoryDataset(self.images[index], self.labels[index], self.classes, self.img_size)

    def to(self, device: torch.device | str) -> InMemoryDataset:
        """The same dataset with its tensors on ``device`` (then batches are made there)."""
        return InMemoryDataset(
            self.images.to(device), self.labels.to(device), self.classes, self.img_size
        )


def _val_count(val_size: float | int, n: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(f"val_size must be a fraction in [0, 1) or a count, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"val_size as a fraction must be in [0, 1), got {val_size}")
        count = round(val_size * n)
    else:
        count = val_size
    if not 0 <= count < n:
        raise ValueError(f"val_size={val_size!r} leaves no training data out of {n} samples")
    return count


def stratified_split(labels: Tensor, val_size: float | int, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices 0..N-1 into (train, val), keeping class proportions; both sorted.

    ``val_size`` is a fraction of N or an absolute count. The split depends only on
    (labels, val_size, seed), so a run that resumes sees exactly the same validation set.
    """
    labels = labels.cpu().long()
    n = labels.numel()
    n_val = _val_count(val_size, n)
    classes, counts = labels.unique(return_counts=True)
    # Largest-remainder apportionment: per-class quotas that sum to exactly n_val.
    exact = counts.double() * n_val / n
    quota = exact.floor().long()
    leftover = n_val - int(quota.sum())
    order = torch.argsort(exact - quota, descending=True, stable=True)
    quota[order[:leftover]] += 1

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm]
    is_val = torch.zeros(n, dtype=torch.bool)
    for cls, q in zip(classes.tolist(), quota.tolist()):
        is_val[perm[shuffled == cls][:q]] = True
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()
