"""The recipes in configs/: each is a valid config whose model builds and trains a step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from convnn.data import DataSpec, list_datasets
from convnn.models import layer_choices, list_models
from convnn.train.config import load_config
from convnn.train.engine import build_model, build_optimizer, build_scheduler, loss_sum

CONFIGS = Path(__file__).parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))

# What each dataset gives a model: (classes, channels); imagefolder recipes are ImageNet-1k.
DATASETS = {"digits": (10, 1), "cifar10": (10, 3), "cifar100": (100, 3), "imagefolder": (1000, 3)}


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


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_builds_and_trains_a_step_at_small_size(path):
    cfg = load_config(path)
    assert cfg.model.name in list_models()
    assert cfg.model.layer in layer_choices(cfg.model.name)
    assert cfg.data.dataset in list_datasets()
    classes, chans = DATASETS[cfg.data.dataset]
    if cfg.model.name.startswith("vit"):
        # The recipe's resolution, patch and layer options (K may need all its tokens); one block.
        cfg.model.layer_kwargs["depth"] = 1
        size = cfg.model.img_size or 32
    else:
        size = cfg.model.img_size = min(cfg.model.img_size or 32, 32)
    spec = DataSpec(cfg.data.dataset, classes, chans, size, (0.5,) * chans, (0.25,) * chans)
    torch.manual_seed(0)
    model = build_model(cfg, spec)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    x, y = torch.randn(2, chans, size, size), torch.tensor([1, classes - 1])
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(x)
    assert logits.shape == (2, classes)
    loss = loss_sum(logits, y, cfg.train.label_smoothing) / 2
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    scheduler.step()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed > 0
