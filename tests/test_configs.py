"""The recipes in configs/: each is a valid config whose model builds and trains a step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from _data_formats import CIFAR, cifar_files, make_image_folder, write_archive

from convnn.data import DataSpec, list_datasets
from convnn.train.config import load_config
from convnn.train.engine import build_model
from convnn.train.metrics import read_metrics_csv
from convnn.train.zoo import layer_choices, list_models  # the zoo and small_cnn

CONFIGS = Path(__file__).parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_recipes_cover_the_paper_experiments():
    found = set()
    for path in RECIPES:
        cfg = load_config(path)
        found.add((cfg.model.name, cfg.model.layer, cfg.data.dataset))
    expected = {
        *(("vgg11", layer, ds) for layer in ("conv", "convnn", "branching")
          for ds in ("cifar10", "cifar100")),
        ("vit_tiny", "attention", "cifar10"),
        ("vit_tiny", "kvt", "cifar10"),
        ("vit_tiny", "convnn_attention", "cifar10"),
        ("resnet50", "conv", "imagefolder"),
        ("resnet50", "branching", "imagefolder"),
        ("vit_base", "attention", "imagefolder"),
        ("vit_base", "convnn_attention", "imagefolder"),
    }  # fmt: skip
    assert expected <= found, sorted(expected - found)


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name.startswith("vgg11_cifar")])
def test_vgg_cifar_recipes_use_the_paper_settings(path):
    """AdamW lr 1e-4, weight decay 0.01, batch 256, 150 epochs, no augmentation."""
    cfg = load_config(path)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 1e-4, 0.01)
    assert (cfg.data.batch_size, cfg.train.epochs) == (256, 150)
    assert (cfg.data.crop_padding, cfg.data.flip, cfg.data.mixup, cfg.data.cutmix) == (
        0,
        False,
        0.0,
        0.0,
    )
    if cfg.model.layer == "branching":
        assert cfg.model.layer_kwargs["ratio"] == 0.5


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name.startswith("vit_tiny_cifar")])
def test_vit_tiny_cifar_recipes_are_224_px_patch_16_one_head(path):
    cfg = load_config(path)
    assert (cfg.model.img_size, cfg.model.patch_size) == (224, 16)
    model = build_model(cfg, DataSpec("cifar10", 10, 3, 32, (0.5,) * 3, (0.25,) * 3))
    assert all(block.attn.num_heads == 1 for block in model.blocks)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny data sets in the formats the recipes read: the official CIFAR-10 / CIFAR-100
    python archives and an ImageNet-style image folder (train/ and val/, 3 classes)."""
    root = tmp_path_factory.mktemp("data")
    dirs = {}
    for name in ("cifar10", "cifar100"):
        files, _ = cifar_files(name)
        write_archive(root / name / CIFAR[name]["archive"], CIFAR[name]["folder"], files)
        dirs[name] = root / name
    make_image_folder(root / "imagenet", {"train": 8, "val": 2})
    dirs["imagefolder"] = root / "imagenet"
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_a_few_steps_on_data_in_its_format(path, data_dirs, tmp_path):
    """Each recipe as written, through the real runner, with only its size shrunk: 2 steps
    of batch 4 (its learning rate scaled to that batch), small images for the ImageNet CNNs,
    one block for the ViTs, a validation count that fits the tiny data, and float32."""
    from convnn.train.runner import run_training

    cfg = load_config(path)
    assert cfg.model.name in list_models()
    assert cfg.model.layer in layer_choices(cfg.model.name)
    assert cfg.data.dataset in list_datasets()
    assert cfg.optim.lr_batch_size == cfg.data.batch_size, "a recipe says its lr's batch"
    shrink = [
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "train.num_threads=1",
        "data.batch_size=4",
        "data.eval_batch_size=64",
        "train.amp=false",  # bf16 convolutions on a CPU without bf16 units: 13x slower
        "output.progress=false",
        f"output.dir={tmp_path}",
        "output.name=run",
    ]
    if cfg.data.dataset in data_dirs:
        shrink.append(f"data.data_dir={data_dirs[cfg.data.dataset]}")
    if cfg.data.num_workers:
        shrink.append("data.num_workers=1")
    if isinstance(cfg.data.val_size, int):
        shrink.append("data.val_size=3")  # still a count, as the recipe's
    if cfg.model.name.startswith("vit"):
        shrink.append("model.layer_kwargs.depth=1")  # the recipe's resolution, patch and K
    elif cfg.data.dataset == "imagefolder":
        shrink.append("model.img_size=32")
    summary = run_training(load_config(path, shrink))
    assert summary["status"] == "finished" and summary["epochs"] == 1
    assert summary["lr"] == pytest.approx(cfg.optim.lr * 4 / cfg.optim.lr_batch_size)
    assert 0 <= summary["test_acc"] <= 1 and not summary["warnings"]
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert math.isfinite(rows[0]["train_loss"]) and math.isfinite(rows[0]["val_loss"])
