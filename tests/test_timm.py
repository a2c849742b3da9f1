"""convnn's models in timm's registry and under timm's own training utilities; timm's model
API, torchvision-style builders, and load_pretrained's exact mappings."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from timm.data import Mixup, resolve_data_config
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

import convnn.models as zoo
from convnn import convert
from convnn.nn import Branching2d, ConvNN2d


def test_timm_trains_a_convnn_model_with_its_own_utilities():
    """timm.create_model + Mixup + ModelEmaV3 + create_optimizer_v2 + create_scheduler_v2."""
    torch.manual_seed(0)
    model = timm.create_model("convnn_resnet18", layer="branching", num_classes=10, img_size=16)
    assert isinstance(model.layer1[0].conv1, Branching2d) and model.num_classes == 10
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 16, 16)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10)
    ema = ModelEmaV3(model, decay=0.9)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    scheduler, epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=2)
    no_decay = {
        id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]
    }
    named = dict(model.named_parameters())
    assert id(named["layer1.0.conv1.convnn.weight"]) not in no_decay  # weights decay
    assert (
        id(named["layer1.0.conv1.pointwise.bias"]) in no_decay
        and id(named["bn1.weight"]) in no_decay
    )
    criterion = SoftTargetCrossEntropy()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])
    model.train()
    for step in range(3):
        xm, ym = mixup(x, y)
        loss = criterion(model(xm), ym)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)  # decay 0.9 from the first step
        scheduler.step(step + 1)
        assert loss.isfinite()
    assert not torch.equal(ema.module.fc.weight, model.fc.weight)
    assert optimizer.param_groups[0]["lr"] < 1e-3 and epochs == 2
    assert ema.module.layer1[0].conv1.convnn.weight.isfinite().all()


def test_no_weight_decay_keeps_pos_embed_and_cls_token_out():
    model = timm.create_model(
        "convnn_vit_tiny", layer="kvt", num_classes=10, img_size=32, patch_size=8, depth=1, K=4
    )
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {
        id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]
    }
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay
    assert id(model.blocks[0].attn.qkv.weight) not in no_decay


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("resnet18", {"layer": "convnn"}),
        ("vgg11", {"layer": "branching"}),
        ("vit_tiny", {"layer": "convnn_attention", "patch_size": 8, "depth": 1, "K": 4}),
    ],
)
def test_timm_model_api(name, kw):
    torch.manual_seed(0)
    model = timm.create_model(f"convnn_{name}", num_classes=10, img_size=32, **kw).eval()
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["architecture"] == f"convnn_{name}"
    assert model.default_cfg is cfg
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    logits = model(x)
    assert torch.equal(model.forward_head(features), logits) and logits.shape == (2, 10)
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_registry_is_lazy_and_works_in_either_import_order():
    code = (
        "import sys, convnn, convnn.models; assert 'timm' not in sys.modules; "
        "import timm; m = timm.create_model('convnn_resnet18', num_classes=3, img_size=32); "
        "assert m.fc.out_features == 3; assert 'convnn_vit_tiny' in timm.list_models('convnn_*')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert timm.is_model("convnn_vgg11")  # here timm came first
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("convnn_resnet18", pretrained=True)


def test_torchvision_style_builders():
    model = zoo.resnet18(num_classes=10, layer="branching", img_size=32)
    assert isinstance(model.layer1[0].conv1, Branching2d) and model.fc.out_features == 10
    with pytest.raises(ValueError, match="weights"):
        zoo.resnet50(weights="IMAGENET1K_V1")


def test_load_pretrained_maps_conv_weights_into_spatial_convnn_exactly():
    """torchvision's resnet18 weights in convnn's resnet18 with spatial ConvNN layers: the
    same logits (stride-2 convolutions stay convolutions and load by name)."""
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for p in source.parameters():
            if not p.any() or p.dim() == 1:
                p.normal_(0, 0.05)
    target = zoo.resnet18(num_classes=10, layer="convnn", metric="spatial").eval()
    report = zoo.load_pretrained(target, source.state_dict(), strict=True)
    missing, unexpected = report
    assert missing == [] and unexpected == []
    assert report.mapped["layer1.0.conv1.weight"] == "layer1.0.conv1.weight"
    assert isinstance(target.layer1[0].conv1, ConvNN2d)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (target(x) - source(x)).abs().max() <= 1e-5
    # a cosine ConvNN layer cannot take the kernel exactly: its weight stays missing
    cosine = zoo.resnet18(num_classes=10, layer="convnn")
    report = zoo.load_pretrained(cosine, source.state_dict())
    assert "layer1.0.conv1.weight" in report.missing and report.unexpected == []


@pytest.mark.parametrize("kind", ["kvt", "convnn_attention", "local", "branching_attention"])
def test_load_pretrained_maps_mha_weights_into_every_attention_kind(kind):
    """An nn.TransformerEncoder checkpoint loads into its converted copy: in_proj / out_proj
    go to qkv / proj; only the new ConvNN kernels are missing."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    source = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.1)
    target = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    convert(target, conv=None, attention=kind, grid_size=(3, 3), num_prefix_tokens=1, K=10)
    report = zoo.load_pretrained(target, source.state_dict())
    assert report.unexpected == []
    assert report.mapped["layers.0.self_attn.in_proj_weight"] == (
        "layers.0.self_attn.attention.qkv.weight"
    )
    assert all(
        k.endswith("convnn.weight") or k.endswith("attn.attention.weight") for k in report.missing
    )
    x = torch.randn(2, 10, 16)
    with torch.no_grad():  # K = N: the converted encoder is the source encoder
        assert (target.eval()(x) - source.eval()(x)).abs().max() <= 1e-5
