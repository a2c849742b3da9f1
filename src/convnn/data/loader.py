"""Batch iteration with shuffling that is a pure function of (seed, epoch), for exact resume."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from .base import DatasetError


class _Failure:
    """A :class:`DatasetError` raised while a DataLoader worker read an item, carried to the
    main process as data: raised there, it would come back as a new exception whose message
    is the worker's whole traceback."""

    def __init__(self, message: str) -> None:
        self.message = message


class _Guarded(Dataset):
    """``dataset`` whose :class:`DatasetError` becomes a :class:`_Failure` item."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except DatasetError as exc:
            return _Failure(str(exc))


def _collate(items: list):
    """The default collation, or the first failure of the batch."""
    return next((i for i in items if isinstance(i, _Failure)), None) or default_collate(items)


class BatchLoader:
    """Yields (images (B, C, H, W) float32, labels (B,) int64); ``len()`` is the batch count.

    Order comes from a :class:`~torch.utils.data.DistributedSampler` (a single replica when not
    distributed): a permutation seeded with ``seed + epoch``, padded so that every rank gets the
    same number of samples. As with that sampler, call :meth:`set_epoch` before each epoch;
    without it every epoch repeats the same order.

    Datasets exposing ``images``/``labels`` tensors are batched by tensor indexing on the
    tensors' device (and through their ``batch(index)`` method when present, which also applies
    on-the-fly resizing); others go through a ``DataLoader`` with ``num_workers`` processes. A
    :class:`DatasetError` reading an item (a corrupt image) is raised here with its own
    one-line message, also when a worker process read the item.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        num_workers: int,
        num_replicas: int,
        rank: int,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed
        )
        self.in_memory = isinstance(getattr(dataset, "images", None), Tensor) and isinstance(
            getattr(dataset, "labels", None), Tensor
        )
        self._loader = None
        if not self.in_memory:
            self._loader = DataLoader(
                _Guarded(dataset),
                batch_size=batch_size,
                sampler=self.sampler,
                drop_last=drop_last,
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
                collate_fn=_collate,
            )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order of ``epoch`` (same seed and epoch give the same batches)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._loader is not None:
            for batch in self._loader:
                if isinstance(batch, _Failure):  # a bad item, from this process or a worker
                    raise DatasetError(batch.message)
                yield batch
            return
        index = torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        batch = getattr(self.dataset, "batch", None)
        images, labels = self.dataset.images, self.dataset.labels  # type: ignore[attr-defined]
        for i in range(len(self)):
            rows = index[i * self.batch_size : (i + 1) * self.batch_size]
            if batch is not None:
                yield batch(rows)
            else:
                rows = rows.to(images.device)
                yield images[rows], labels[rows].long()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    distributed: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> BatchLoader:
    """A :class:`BatchLoader` over ``dataset``.

    With ``distributed=True`` each rank gets its shard (``DistributedSampler`` semantics); rank and
    world size come from ``torch.distributed`` unless ``num_replicas``/``rank`` are given.
    """
    if distributed:
        if num_replicas is None or rank is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "make_loader(distributed=True) needs an initialised torch.distributed "
                    "process group, or explicit num_replicas and rank"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
    elif num_replicas is not None or rank is not None:
        raise ValueError("num_replicas and rank only apply with distributed=True")
    else:
        num_replicas, rank = 1, 0
    return BatchLoader(
        dataset,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        num_workers=num_workers,
        num_replicas=num_replicas,
        rank=rank,
    )
