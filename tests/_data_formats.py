"""Small data sets written in the real formats convnn reads: the official CIFAR python
archives (Python 2 pickles in a .tar.gz) and image folders (train/val/<class>/*.png|jpg)."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR = {
    "cifar10": dict(
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test="test_batch",
        meta="batches.meta",
        label_key=b"labels",
        classes=10,
    ),
    "cifar100": dict(
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train=["train"],
        test="test",
        meta="meta",
        label_key=b"fine_labels",
        classes=100,
    ),
}
PER_FILE = 20


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, as in the official (Python 2, protocol 2) files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 calls its module numpy._core; the official files name numpy.core.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_files(name: str, seed: int = 0) -> tuple[dict[str, bytes], dict[str, tuple]]:
    """The official files of a tiny CIFAR: {file: pickle bytes}, {file: (data, labels)}."""
    c = CIFAR[name]
    rng = np.random.default_rng(seed)
    files, arrays = {}, {}
    for file in [*c["train"], c["test"]]:
        data = rng.integers(0, 256, size=(PER_FILE, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, c["classes"], size=PER_FILE)]
        batch = {
            b"batch_label": f"batch {file}".encode(),
            c["label_key"]: labels,
            b"data": data,
            b"filenames": [f"img_{file}_{i}.png".encode() for i in range(PER_FILE)],
        }
        if name == "cifar100":
            batch[b"coarse_labels"] = [v // 5 for v in labels]
        files[file] = py2_pickle(batch)
        arrays[file] = (data, labels)
    names = [f"class{i}".encode() for i in range(c["classes"])]
    meta = (
        {b"num_cases_per_batch": PER_FILE, b"label_names": names, b"num_vis": 3072}
        if name == "cifar10"
        else {b"fine_label_names": names, b"coarse_label_names": names[:20]}
    )
    files[c["meta"]] = py2_pickle(meta)
    return files, arrays


def write_archive(path: Path, folder: str, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        folder_info = tarfile.TarInfo(folder)
        folder_info.type = tarfile.DIRTYPE
        tar.addfile(folder_info)
        for file, raw in files.items():
            info = tarfile.TarInfo(f"{folder}/{file}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def write_folder(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    for file, raw in files.items():
        (path / file).write_bytes(raw)
    return path


COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "owl": (0, 255, 0)}


def make_image_folder(root: Path, splits: dict[str, int]) -> None:
    """``splits``: images per class in each split; sizes and formats vary per image."""
    for split, per_class in splits.items():
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                size = [(20, 12), (12, 30), (16, 16)][i % 3]
                ext = ["png", "jpg", "PNG"][i % 3]
                image = Image.new("RGB", size, colour)
                image = image if i % 2 == 0 else image.convert("L")  # grey files become RGB too
                image.save(folder / f"{i}.{ext}", format="JPEG" if ext == "jpg" else "PNG")
            (folder / "notes.txt").write_text("not an image")
