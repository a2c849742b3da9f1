"""CIFAR-10 / CIFAR-100 from the official python-format archives, read without plain pickle.

The official files are pickles (Python 2, protocol 2). Unpickling runs whatever callables the
file names, so they are read with :class:`RestrictedUnpickler`, which only resolves the few numpy
globals needed to rebuild arrays and refuses anything else before it can run.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils import describe_exception
from .base import DatasetError, DataSpec, InMemoryDataset

DOWNLOAD_HINT = (
    "download the python version from https://www.cs.toronto.edu/~kriz/cifar.html "
    "and pass --data-dir"
)
IMAGE_SIZE = 32
PIXELS = 3 * IMAGE_SIZE * IMAGE_SIZE


def _numpy_reconstructors() -> dict[tuple[str, str], Any]:
    """The globals that numpy-array pickles name, mapped to the objects they should resolve to.

    Both module spellings are accepted: the official files say ``numpy.core`` (numpy 1.x) while
    numpy 2.x writes ``numpy._core``. Names are resolved here, never imported from the file.
    """
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        # Protocol-5 pickles written by numpy rebuild arrays from an in-band buffer.
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (it never gets imported or called)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays and plain containers."""

    _allowed = _numpy_reconstructors()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(f"{module}.{name}") from None


@dataclass(frozen=True)
class CifarLayout:
    """File names and keys of one official CIFAR python archive."""

    name: str
    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    files_text: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)

    def hint(self, root: Path) -> str:
        """The 'what was expected, what to do' tail shared by every error message."""
        return (
            f"expected {self.archive} or a folder {self.folder} with {self.files_text} "
            f"under '{root}'; {DOWNLOAD_HINT}"
        )

    def error(self, problem: str, root: Path) -> DatasetError:
        return DatasetError(f"{self.name}: {problem}; {self.hint(root)}")


CIFAR10 = CifarLayout(
    name="cifar10",
    archive="cifar-10-python.tar.gz",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    files_text="data_batch_1..5, test_batch and batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarLayout(
    name="cifar100",
    archive="cifar-100-python.tar.gz",
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    files_text="train, test and meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)
LAYOUTS = {layout.name: layout for layout in (CIFAR10, CIFAR100)}


def locate(layout: CifarLayout, root: Path) -> Path:
    """The archive file or extracted folder that ``root`` points at (itself or a child)."""
    if root.is_file():
        return root
    if root.is_dir():
        if root.name == layout.folder or (root / layout.test_file).is_file():
            return root
        for candidate in (root / layout.folder, root / layout.archive):
            if candidate.exists():
                return candidate
    raise DatasetError(f"{layout.name}: {layout.hint(root)}")


def read_members(layout: CifarLayout, source: Path, root: Path) -> dict[str, bytes]:
    """Raw bytes of every expected file, from the extracted folder or straight from the archive."""
    if source.is_dir():
        found = {f: (source / f).read_bytes() for f in layout.files if (source / f).is_file()}
    else:
        wanted = {f"{layout.folder}/{f}": f for f in layout.files}
        found = {}
        try:
            # Stream once through the gzip: random access into a .tar.gz re-decompresses.
            with tarfile.open(source, mode="r:gz") as tar:
                for member in tar:
                    name = wanted.get(member.name.removeprefix("./"))
                    if name is not None and member.isfile():
                        found[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise layout.error(
                f"cannot read archive '{source}', it is truncated or corrupt ({describe_exception(exc)})",
                root,
            ) from None
    missing = [f for f in layout.files if f not in found]
    if missing:
        raise layout.error(f"'{source}' lacks {', '.join(missing)}", root)
    return found


def unpickle(layout: CifarLayout, raw: bytes, where: str, root: Path) -> dict[bytes, Any]:
    """One CIFAR pickle as a dict with bytes keys, through the restricted unpickler."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except ForbiddenGlobalError as exc:
        raise layout.error(
            f"{where} refers to the forbidden global '{exc}' (only numpy arrays are allowed), "
            "refusing to load it",
            root,
        ) from None
    except Exception as exc:  # any failure to parse means the file is damaged
        raise layout.error(
            f"{where} is not a valid CIFAR pickle ({describe_exception(exc)})", root
        ) from None
    if not isinstance(obj, dict):
        raise layout.error(f"{where} holds a {type(obj).__name__}, not a dict", root)
    # Python 3 re-pickles may carry str keys; the official ones are bytes.
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def parse_batch(
    layout: CifarLayout, batch: dict[bytes, Any], where: str, root: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Check one batch dict and return (data (n, 3072) uint8, labels (n,) int64)."""
    for key in (b"data", layout.label_key):
        if key not in batch:
            raise layout.error(f"{where} has no {key!r} entry", root)
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise layout.error(f"{where}: b'data' is not a 2-D uint8 array", root)
    if data.shape[1] != PIXELS:
        raise layout.error(f"{where}: b'data' has {data.shape[1]} columns, not {PIXELS}", root)
    labels = np.asarray(batch[layout.label_key])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise layout.error(f"{where}: {layout.label_key!r} is not a list of integers", root)
    if len(labels) != len(data):
        raise layout.error(f"{where}: {len(data)} images but {len(labels)} labels", root)
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise layout.error(
            f"{where}: labels outside 0..{layout.num_classes - 1} "
            f"(min {labels.min()}, max {labels.max()})",
            root,
        )
    return data, labels.astype(np.int64)


def parse_class_names(
    layout: CifarLayout, meta: dict[bytes, Any], where: str, root: Path
) -> list[str]:
    names = meta.get(layout.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != layout.num_classes:
        raise layout.error(
            f"{where} has no list of {layout.num_classes} class names under {layout.names_key!r}",
            root,
        )
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(
    name: str, data_dir: str | Path, img_size: int | None = None
) -> tuple[InMemoryDataset, InMemoryDataset, DataSpec]:
    """(train, test, spec) of CIFAR-10/100; images (N, 3, 32, 32) float32 in [0, 1].

    ``data_dir`` may be the .tar.gz, the folder holding it, the extracted folder or its parent.
    With ``img_size`` other than 32 the images stay stored at 32 px and are resized per batch.
    """
    layout = LAYOUTS[name]
    root = Path(data_dir).expanduser()
    source = locate(layout, root)
    raw = read_members(layout, source, root)

    def where(file: str) -> str:
        return f"{file} in '{source}'"

    def parsed(file: str) -> dict[bytes, Any]:
        # pop: drop each raw file once decoded, so peak memory holds one copy of the data.
        return unpickle(layout, raw.pop(file), where(file), root)

    meta = layout.meta_file
    classes = parse_class_names(layout, parsed(meta), where(meta), root)

    def as_dataset(files: tuple[str, ...]) -> InMemoryDataset:
        parts = [parse_batch(layout, parsed(f), where(f), root) for f in files]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        # Row layout is channel-major: [R 1024 | G 1024 | B 1024], each row-major 32x32.
        images = torch.from_numpy(data).view(-1, 3, IMAGE_SIZE, IMAGE_SIZE).float().div_(255.0)
        return InMemoryDataset(images, torch.from_numpy(labels), classes, img_size)

    train, test = as_dataset(layout.train_files), as_dataset((layout.test_file,))
    spec = DataSpec(
        name=name,
        num_classes=layout.num_classes,
        in_chans=3,
        img_size=img_size or IMAGE_SIZE,
        mean=layout.mean,
        std=layout.std,
    )
    return train, test, spec
