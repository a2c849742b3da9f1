"""ImageNet-style image folders: ``root/{train,val[,test]}/<class>/<image>``, decoded lazily."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..utils import describe_exception
from .base import DatasetError, DataSpec

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
LAYOUT_HINT = "expected <root>/train/<class>/*.jpg|png and <root>/val/<class>/..., pass --data-dir"


def decode_image(path: str | Path, size: int) -> Tensor:
    """Decode to RGB, resize the shorter side to ``size``, centre-crop: (3, size, size) in [0, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
            # Same rounding as torchvision's CenterCrop.
            left, top = round((new_w - size) / 2), round((new_h - size) / 2)
            im = im.crop((left, top, left + size, top + size))
            array = np.array(im, dtype=np.uint8)
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise DatasetError(
            f"imagefolder: cannot decode '{path}' ({describe_exception(exc)})"
        ) from None
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


class ImageFolderDataset(Dataset):
    """A list of (path, label) decoded on access; items are ((3, img_size, img_size), label)."""

    def __init__(
        self, samples: Sequence[tuple[str, int]], classes: Sequence[str], img_size: int
    ) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.img_size = img_size
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return decode_image(path, self.img_size), label

    def subset(self, index: Tensor) -> ImageFolderDataset:
        return ImageFolderDataset(
            [self.samples[i] for i in index.tolist()], self.classes, self.img_size
        )


def _class_dirs(split: Path) -> list[Path]:
    return sorted(p for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMG_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )


def scan_split(
    split: Path, classes: list[str] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, samples) of one split. ``classes=None`` defines them (train); else they must match."""
    if not split.is_dir():
        raise DatasetError(f"imagefolder: no folder '{split}'; {LAYOUT_HINT}")
    dirs = _class_dirs(split)
    if not dirs:
        raise DatasetError(f"imagefolder: '{split}' has no class sub-folders; {LAYOUT_HINT}")
    if classes is None:
        classes = [d.name for d in dirs]
    index = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    for d in dirs:
        if d.name not in index:
            raise DatasetError(
                f"imagefolder: class folder '{d}' does not exist under train/; "
                "every split must use the training classes"
            )
        images = _images_in(d)
        if not images:
            raise DatasetError(
                f"imagefolder: class folder '{d}' holds no images "
                f"({', '.join(IMG_EXTENSIONS)}); remove it or add images"
            )
        samples += [(str(p), index[d.name]) for p in images]
    return classes, samples


def load_imagefolder(
    data_dir: str | Path | None, img_size: int | None = None
) -> tuple[ImageFolderDataset, ImageFolderDataset | None, ImageFolderDataset, DataSpec]:
    """(train, val, test, spec). ``val`` is None when there is no ``test/``: the caller then uses
    ``val/`` as the test set and carves validation out of train."""
    if data_dir is None:
        raise DatasetError(f"imagefolder: no data directory given; {LAYOUT_HINT}")
    try:
        import PIL  # noqa: F401
    except ImportError as exc:
        raise DatasetError(
            "imagefolder: needs Pillow to decode images; pip install pillow"
        ) from exc
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"imagefolder: '{root}' is not a folder; {LAYOUT_HINT}")
    size = img_size or DEFAULT_SIZE

    classes, train = scan_split(root / "train")
    _, val = scan_split(root / "val", classes)

    def dataset(samples: list[tuple[str, int]]) -> ImageFolderDataset:
        return ImageFolderDataset(samples, classes, size)

    spec = DataSpec("imagefolder", len(classes), 3, size, IMAGENET_MEAN, IMAGENET_STD)
    if (root / "test").exists():
        _, test = scan_split(root / "test", classes)
        return dataset(train), dataset(val), dataset(test), spec
    return dataset(train), None, dataset(val), spec
