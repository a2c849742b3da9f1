"""convnn.data: datasets (digits, CIFAR archives, image folders), loaders and batch transforms."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from convnn.data import (
    BatchAugment,
    DatasetError,
    DataSpec,
    InMemoryDataset,
    list_datasets,
    load_dataset,
    make_loader,
)

# ----------------------------------------------------------------------------- digits


def test_list_datasets():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "imagefolder"]
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'; choose one of cifar10"):
        load_dataset("mnist")


def test_digits_splits_sizes_ranges_and_stability():
    train, val, test, spec = load_dataset("digits")
    assert len(train) + len(val) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=2)
    assert len(val) == pytest.approx(0.1 * (len(train) + len(val)), abs=1)
    assert spec == DataSpec("digits", 10, 1, 8, spec.mean, spec.std)
    assert 0.0 < spec.mean[0] < 1.0 and 0.0 < spec.std[0] < 1.0
    for split in (train, val, test):
        assert split.images.shape[1:] == (1, 8, 8) and split.images.dtype == torch.float32
        assert split.labels.dtype == torch.int64
        assert split.images.min() >= 0.0 and split.images.max() <= 1.0
        assert set(split.labels.tolist()) == set(range(10))  # stratified: every class present
        image, label = split[0]
        assert image.shape == (1, 8, 8) and isinstance(label, int)
    # Real 16-level data: pixels are multiples of 1/16 and reach full intensity.
    assert torch.equal(train.images * 16, (train.images * 16).round())
    assert train.images.max() == 1.0

    # A partition: the 1,797 images are all distinct, so each split is a set of pixel rows and
    # the three sets must be disjoint and together give back the whole data set.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    label_of = {r.tobytes(): y for r, y in zip(bunch.data.astype(np.int64), bunch.target)}

    def rows(split: InMemoryDataset) -> set[bytes]:
        pixels = (split.images.reshape(-1, 64) * 16).round().to(torch.int64).numpy()
        keys = [r.tobytes() for r in pixels]
        assert [label_of[k] for k in keys] == split.labels.tolist()  # labels stay with images
        return set(keys)

    tr, va, te = rows(train), rows(val), rows(test)
    assert len(tr) + len(va) + len(te) == 1797 and tr | va | te == set(label_of)

    # The same split for every call and every seed.
    for seed in (0, 7):
        again = load_dataset("digits", seed=seed)
        for a, b in zip((train, val, test), again[:3]):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_digits_resize_and_val_count():
    train, val, test, spec = load_dataset("digits", img_size=16, val_size=100)
    assert len(val) == 100 and spec.img_size == 16
    assert train.images.shape[1:] == (1, 16, 16) and test[0][0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("digits", val_size=1.5)


# ----------------------------------------------------------------------------- CIFAR archives

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


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_round_trip_from_every_location(tmp_path, name):
    c = CIFAR[name]
    files, arrays = cifar_files(name)
    archive = write_archive(tmp_path / "dl" / c["archive"], c["folder"], files)
    extracted = write_folder(tmp_path / "ex" / c["folder"], files)
    train_data = np.concatenate([arrays[f][0] for f in c["train"]])
    train_labels = sum((arrays[f][1] for f in c["train"]), [])
    test_data, test_labels = arrays[c["test"]]

    for where in (archive, archive.parent, extracted, extracted.parent):
        train, val, test, spec = load_dataset(name, data_dir=str(where), val_size=0)
        assert len(val) == 0 and len(train) == len(train_data) and len(test) == PER_FILE
        assert spec.num_classes == c["classes"] and spec.in_chans == 3 and spec.img_size == 32
        assert len(spec.mean) == len(spec.std) == 3
        assert train.classes[:2] == ["class0", "class1"]
        assert train.images.shape == (len(train_data), 3, 32, 32)
        assert train.images.dtype == torch.float32
        # Row layout: channel-major planes of 1024, each row-major 32x32.
        for i, ch, h, w in [(0, 0, 0, 0), (3, 1, 5, 30), (len(train_data) - 1, 2, 31, 31)]:
            assert train.images[i, ch, h, w] == train_data[i, ch * 1024 + h * 32 + w] / 255
        assert torch.equal(
            train.images, torch.from_numpy(train_data).float().view(-1, 3, 32, 32) / 255
        )
        assert train.labels.tolist() == train_labels
        assert torch.equal(test.images.flatten(1) * 255, torch.from_numpy(test_data).float())
        assert test.labels.tolist() == test_labels
        image, label = test[4]
        assert image.shape == (3, 32, 32) and label == test_labels[4]


def test_cifar_val_split_comes_from_train_and_upscaling_is_lazy(tmp_path):
    files, arrays = cifar_files("cifar10")
    archive = write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    train, val, test, spec = load_dataset(
        "cifar10", str(archive), img_size=64, val_size=0.2, seed=1
    )
    assert (len(train), len(val), len(test)) == (80, 20, 20)
    all_train = torch.from_numpy(
        np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    )
    rows = {bytes(r) for r in all_train.numpy()}
    as_rows = lambda ds: {
        bytes(r) for r in (ds.images * 255).round().to(torch.uint8).flatten(1).numpy()
    }
    assert as_rows(val) <= rows and as_rows(train) <= rows and not (as_rows(val) & as_rows(train))
    # Stored at 32 px, served at 64 px.
    assert train.images.shape[-1] == 32 and spec.img_size == 64 and train[0][0].shape == (3, 64, 64)
    images, _ = next(iter(make_loader(train, 8, shuffle=True)))
    assert images.shape == (8, 3, 64, 64)
    other = load_dataset("cifar10", str(archive), val_size=0.2, seed=2)[1]
    assert as_rows(other) != as_rows(val)  # the seed moves the validation split


def _cifar10_hint(root: Path) -> str:
    return re.escape(
        "expected cifar-10-python.tar.gz or a folder cifar-10-batches-py with data_batch_1..5, "
        f"test_batch and batches.meta under '{root}'; download the python version from "
        "https://www.cs.toronto.edu/~kriz/cifar.html and pass --data-dir"
    )


def _raises_one_line(pattern: str, *args, **kwargs) -> str:
    with pytest.raises(DatasetError, match=pattern) as info:
        load_dataset(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_cifar_missing_data_says_what_to_do(tmp_path):
    _raises_one_line(f"^cifar10: {_cifar10_hint(tmp_path)}$", "cifar10", str(tmp_path))
    missing = tmp_path / "nowhere"
    _raises_one_line(f"^cifar10: {_cifar10_hint(missing)}$", "cifar10", str(missing))
    msg = _raises_one_line("^cifar100: expected cifar-100-python.tar.gz", "cifar100", str(tmp_path))
    assert "train, test and meta" in msg


def test_cifar_missing_member(tmp_path):
    files, _ = cifar_files("cifar10")
    del files["test_batch"]
    archive = write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    pattern = f"^cifar10: '{re.escape(str(archive))}' lacks test_batch; {_cifar10_hint(archive)}$"
    _raises_one_line(pattern, "cifar10", str(archive))
    folder = write_folder(tmp_path / "cifar-10-batches-py", files)
    _raises_one_line("lacks test_batch; expected", "cifar10", str(folder))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_cifar_corrupt_archive(tmp_path, damage):
    files, _ = cifar_files("cifar10")
    archive = write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    raw = archive.read_bytes()
    damaged = {"truncated": raw[: len(raw) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    archive.write_bytes(damaged)
    pattern = (
        f"^cifar10: cannot read archive '{re.escape(str(archive))}', it is truncated or corrupt "
        rf"\(.+\); {_cifar10_hint(tmp_path)}$"
    )
    _raises_one_line(pattern, "cifar10", str(tmp_path))


def test_cifar_corrupt_pickle_inside_valid_archive(tmp_path):
    files, _ = cifar_files("cifar10")
    files["data_batch_2"] = files["data_batch_2"][:500]
    write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    _raises_one_line(
        r"^cifar10: data_batch_2 in '.*' is not a valid CIFAR pickle \(", "cifar10", str(tmp_path)
    )


class _RunsCommand:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_cifar_pickle_with_forbidden_global_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    func, arg, qualname = {
        "os.system": (os.system, f"touch {marker}", f"{os.system.__module__}.system"),
        # Protocol 2 spells builtins the Python 2 way.
        "builtins.exec": (builtins.exec, f"open({str(marker)!r}, 'w').close()", "__builtin__.exec"),
    }[kind]
    files, _ = cifar_files("cifar10")
    evil = {b"data": _RunsCommand(func, arg), b"labels": [0]}
    files["data_batch_1"] = py2_pickle(evil)
    write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    pattern = (
        rf"^cifar10: data_batch_1 in '.*' refers to the forbidden global '{re.escape(qualname)}' "
        r"\(only numpy arrays are allowed\), refusing to load it; expected cifar-10-python"
    )
    _raises_one_line(pattern, "cifar10", str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda b: b.update({b"data": b[b"data"][:, :100]}), "has 100 columns, not 3072"),
        (lambda b: b.update({b"data": b[b"data"].astype(np.int64)}), "is not a 2-D uint8 array"),
        (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "20 images but 19 labels"),
        (lambda b: b.update({b"labels": [10] * 20}), "labels outside 0..9 (min 10, max 10)"),
        (lambda b: b.pop(b"labels"), "has no b'labels' entry"),
    ],
)
def test_cifar_wrong_structure(tmp_path, mutate, problem):
    files, _ = cifar_files("cifar10")
    batch = {
        b"data": np.zeros((PER_FILE, 3072), np.uint8),
        b"labels": [1] * PER_FILE,
    }
    mutate(batch)
    files["data_batch_3"] = py2_pickle(batch)
    write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    _raises_one_line(
        f"^cifar10: data_batch_3 in '.*'.*{re.escape(problem)}; expected", "cifar10", str(tmp_path)
    )


def test_cifar_accepts_python3_pickles(tmp_path):
    files, arrays = cifar_files("cifar100")
    for protocol in (3, 4, 5):
        # Re-saved under Python 3: numpy._core globals, protocol 5 uses _frombuffer.
        data, labels = arrays["test"]
        redone = dict(
            files, test=pickle.dumps({b"data": data, b"fine_labels": labels}, protocol=protocol)
        )
        folder = write_folder(tmp_path / f"p{protocol}" / "cifar-100-python", redone)
        test = load_dataset("cifar100", str(folder.parent))[2]
        assert torch.equal(test.images.flatten(1) * 255, torch.from_numpy(data).float())


# ----------------------------------------------------------------------------- image folders

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


def test_imagefolder_val_carved_from_train_when_no_test(tmp_path):
    make_image_folder(tmp_path, {"train": 10, "val": 3})
    train, val, test, spec = load_dataset("imagefolder", str(tmp_path), img_size=16, val_size=0.2)
    assert spec == DataSpec("imagefolder", 3, 3, 16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert train.classes == ["cat", "dog", "owl"]
    assert (len(train), len(val), len(test)) == (24, 6, 9)
    assert sorted(val.targets) == [0, 0, 1, 1, 2, 2]
    assert {Path(p).parent.parent.name for p, _ in test.samples} == {"val"}
    train_paths = {p for p, _ in train.samples}
    assert not train_paths & {p for p, _ in val.samples}
    assert all(Path(p).parent.parent.name == "train" for p in train_paths)
    for ds in (train, test):
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.shape == (3, 16, 16) and image.dtype == torch.float32
            assert 0.0 <= image.min() and image.max() <= 1.0
            assert label == ds.classes.index(Path(ds.samples[i][0]).parent.name)
    red = next(i for i, (p, _) in enumerate(train.samples) if p.endswith("/cat/0.png"))
    assert torch.equal(train[red][0][:, 5, 5], torch.tensor([1.0, 0.0, 0.0]))
    # Lazily decoded batches through the generic DataLoader path.
    loader = make_loader(train, 5, shuffle=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 5
    assert batches[0][0].shape == (5, 3, 16, 16) and batches[0][1].dtype == torch.int64
    assert sum(len(y) for _, y in batches) == 24


def test_imagefolder_with_test_split(tmp_path):
    make_image_folder(tmp_path, {"train": 2, "val": 1, "test": 3})
    train, val, test, spec = load_dataset("imagefolder", str(tmp_path))
    assert (len(train), len(val), len(test)) == (6, 3, 9) and spec.img_size == 224
    assert train[0][0].shape == (3, 224, 224)


def test_imagefolder_errors(tmp_path):
    _raises_one_line("^imagefolder: no data directory given", "imagefolder")
    _raises_one_line(
        f"^imagefolder: '{tmp_path / 'x'}' is not a folder", "imagefolder", str(tmp_path / "x")
    )
    _raises_one_line(
        f"^imagefolder: no folder '{tmp_path / 'train'}'", "imagefolder", str(tmp_path)
    )
    (tmp_path / "train").mkdir()
    _raises_one_line("has no class sub-folders", "imagefolder", str(tmp_path))
    (tmp_path / "train" / "cat").mkdir()
    _raises_one_line(
        f"class folder '{tmp_path / 'train' / 'cat'}' holds no images", "imagefolder", str(tmp_path)
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "a.png")
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "zebra" / "a.png")
    _raises_one_line("'.*zebra' does not exist under train/", "imagefolder", str(tmp_path))
    (tmp_path / "val" / "zebra" / "a.png").rename(tmp_path / "val" / "zebra" / "b.jpg")
    (tmp_path / "val" / "zebra").rename(tmp_path / "val" / "cat")
    (tmp_path / "val" / "cat" / "b.jpg").write_bytes(b"not really a jpeg")
    _, _, test, _ = load_dataset("imagefolder", str(tmp_path), val_size=0)
    with pytest.raises(DatasetError, match="^imagefolder: cannot decode '.*b.jpg'"):
        test[0]


def test_corrupt_image_read_by_a_worker_is_one_line(tmp_path):
    # A worker's exception comes back wrapped, its message the worker's whole traceback; the
    # loader carries the DatasetError as data and raises it with its own message.
    make_image_folder(tmp_path, {"train": 2, "val": 1})
    (tmp_path / "train" / "dog" / "1.jpg").write_bytes(b"not really a jpeg")
    train, _, _, _ = load_dataset("imagefolder", str(tmp_path), img_size=8, val_size=0)
    for workers in (0, 2):
        loader = make_loader(train, 2, shuffle=False, num_workers=workers)
        with pytest.raises(DatasetError) as e:
            list(loader)
        msg = str(e.value)
        assert re.fullmatch(r"imagefolder: cannot decode '.*dog/1\.jpg' \(.*\)", msg), msg
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        make_loader(train, 2, shuffle=False, num_workers=-1)


# ----------------------------------------------------------------------------- loaders


def tiny_dataset(n: int = 23) -> InMemoryDataset:
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return InMemoryDataset(images, torch.arange(n), [str(i) for i in range(n)])


def order(loader) -> list[int]:
    return torch.cat([labels for _, labels in loader]).tolist()


def test_loader_is_deterministic_per_seed_and_epoch():
    ds = tiny_dataset()
    a, b = make_loader(ds, 4, shuffle=True, seed=3), make_loader(ds, 4, shuffle=True, seed=3)
    assert len(a) == 6
    assert order(a) == order(b) == order(a)  # re-iterating the same epoch repeats it
    epoch0 = order(a)
    assert sorted(epoch0) == list(range(23)) and epoch0 != list(range(23))
    a.set_epoch(1)
    assert order(a) != epoch0 and sorted(order(a)) == list(range(23))
    b.set_epoch(1)
    assert order(a) == order(b)
    a.set_epoch(0)
    assert order(a) == epoch0  # resume: epoch alone fixes the order
    assert order(make_loader(ds, 4, shuffle=True, seed=4)) != epoch0
    for images, labels in a:  # images travel with their labels
        assert torch.equal(images[:, 0, 0, 0].long(), labels) and images.shape[1:] == (1, 2, 2)


def test_loader_no_shuffle_and_drop_last():
    ds = tiny_dataset()
    assert order(make_loader(ds, 5, shuffle=False)) == list(range(23))
    loader = make_loader(ds, 5, shuffle=True, drop_last=True)
    sizes = [len(y) for _, y in loader]
    assert len(loader) == 4 and sizes == [5, 5, 5, 5]
    assert len(make_loader(ds, 5, shuffle=True)) == 5


def test_loader_matches_distributed_sampler_shards():
    ds = tiny_dataset()
    shards = []
    for rank in range(3):
        loader = make_loader(
            ds, 2, shuffle=True, seed=5, distributed=True, num_replicas=3, rank=rank
        )
        loader.set_epoch(2)
        expected = DistributedSampler(ds, num_replicas=3, rank=rank, shuffle=True, seed=5)
        expected.set_epoch(2)
        assert order(loader) == list(expected)
        assert len(loader) == 4  # ceil(23 / 3) = 8 samples per rank, padded
        shards.append(order(loader))
    assert set(sum(shards, [])) == set(range(23))
    with pytest.raises(RuntimeError, match="process group"):
        make_loader(ds, 2, shuffle=True, distributed=True)
    with pytest.raises(ValueError, match="distributed=True"):
        make_loader(ds, 2, shuffle=True, num_replicas=2, rank=0)


class _ItemDataset(Dataset):
    """No ``images`` tensor: goes through the per-item DataLoader path."""

    def __init__(self, inner: InMemoryDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


def test_in_memory_and_per_item_paths_agree():
    ds = tiny_dataset()
    fast, slow = (
        make_loader(ds, 4, shuffle=True, seed=1),
        make_loader(_ItemDataset(ds), 4, shuffle=True, seed=1),
    )
    for loader in (fast, slow):
        loader.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(fast, slow, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and yb.dtype == torch.int64


def test_in_memory_resize_on_the_fly():
    ds = InMemoryDataset(torch.rand(6, 3, 8, 8), torch.arange(6), list("abcdef"), img_size=16)
    images, _ = next(iter(make_loader(ds, 6, shuffle=False)))
    assert images.shape == (6, 3, 16, 16) and ds[2][0].shape == (3, 16, 16)
    assert torch.allclose(images[2], ds[2][0])


# ----------------------------------------------------------------------------- BatchAugment

SPEC = DataSpec("toy", 10, 3, 8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))


def batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g) + 0.01, torch.arange(n) % 10


def test_crop_is_a_shift_of_the_zero_padded_image():
    x, y = batch()
    out, labels = BatchAugment(SPEC, crop_padding=2, normalize=False)(x, y, train=True)
    assert out.shape == x.shape and torch.equal(labels, y)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = []
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert len(found) == 1
        shifts.append(found[0])
    assert len(set(shifts)) > 10  # offsets really vary across the batch
    assert (out == 0).any()  # padding zeros entered some images


def test_flip_flips_some_images():
    x, y = batch()
    out, _ = BatchAugment(SPEC, flip=True, normalize=False)(x, y, train=True)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_eval_only_normalises():
    x, y = batch()
    aug = BatchAugment(SPEC, crop_padding=4, flip=True, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    out, targets = aug(x, y, train=False)
    mean, std = torch.tensor(SPEC.mean).view(1, 3, 1, 1), torch.tensor(SPEC.std).view(1, 3, 1, 1)
    assert torch.allclose(out, (x - mean) / std) and torch.equal(targets, y)
    assert targets.dtype == torch.int64
    out, _ = BatchAugment(SPEC, normalize=False)(x, y, train=True)
    assert torch.equal(out, x)


def test_mixup_soft_targets():
    x, y = batch()
    aug = BatchAugment(SPEC, mixup=0.4, label_smoothing=0.1, normalize=False)
    assert aug.soft_targets and not BatchAugment(SPEC, label_smoothing=0.1).soft_targets
    out, targets = aug(x, y, train=True, generator=torch.Generator().manual_seed(1))
    assert targets.shape == (64, 10) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(64)) and targets.min() >= 0.01 - 1e-7
    # Image i is lam * x_i + (1 - lam) * x_{B-1-i}, with the same lam as its target.
    assert y[0] != y[-1]
    lam = (targets[0, y[0]] - 0.01) / 0.9
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-5)


def test_cutmix_targets_match_pasted_area():
    x, y = batch()
    y = torch.arange(64) % 10
    aug = BatchAugment(SPEC, cutmix=1.0, normalize=False)
    for seed in range(5):
        out, targets = aug(x, y, train=True, generator=torch.Generator().manual_seed(seed))
        pasted = (out == x.flip(0)).all(1).float().mean((1, 2))  # fraction of pixels from partner
        assert ((out == x) | (out == x.flip(0))).all()
        partner = y.flip(0)
        differs = partner != y
        assert torch.allclose(targets[differs, partner[differs]], pasted[differs])
        assert torch.allclose(targets.sum(1), torch.ones(64))


def test_generator_makes_augmentation_reproducible():
    x, y = batch()
    aug = BatchAugment(SPEC, crop_padding=2, flip=True, mixup=0.5, cutmix=1.0)
    runs = [aug(x, y, train=True, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])
    with pytest.raises(ValueError, match="label_smoothing"):
        BatchAugment(SPEC, label_smoothing=1.0)
