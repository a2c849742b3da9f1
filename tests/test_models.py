"""Model zoo: every model x layer runs, names match torchvision/timm, checkpoints load."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convnn import Branching2d, ConvNN2d, ConvNNAttention, convert
from convnn.models import create_model, layer_choices, list_models, load_pretrained

CASES = [(name, layer) for name in list_models() for layer in layer_choices(name)]


def _small(name: str) -> dict:
    return dict(patch_size=8, depth=2, img_size=32) if name.startswith("vit") else dict(img_size=16)


@pytest.mark.parametrize("name,layer", CASES)
def test_forward_backward_every_layer(name, layer):
    torch.manual_seed(0)
    kw = _small(name)
    model = create_model(name, num_classes=10, layer=layer, **kw)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    y = model(x)
    assert y.shape == (2, 10)
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("name", ["vit_tiny", "resnet18", "vgg11"])
def test_full_depth_at_digits_size(name):
    """Full-depth models run on 8x8 single-channel inputs (the embedded digits set)."""
    kw = {"patch_size": 2} if name.startswith("vit") else {}
    layer = layer_choices(name)[1]
    model = create_model(name, num_classes=10, in_chans=1, img_size=8, layer=layer, **kw)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


TORCHVISION_KEYS = {
    "resnet18": [
        "conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.bn2.bias",
        "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean",
        "layer4.1.conv2.weight", "layer4.1.bn2.running_var", "fc.weight", "fc.bias",
    ],
    "resnet50": [
        "layer1.0.conv3.weight", "layer1.0.bn3.weight", "layer3.5.conv2.weight",
        "layer4.0.downsample.0.weight", "fc.weight",
    ],
    "vgg11": [
        "features.0.weight", "features.3.weight", "features.18.weight", "classifier.0.weight",
        "classifier.3.weight", "classifier.6.weight", "classifier.6.bias",
    ],
    "vit_tiny": [
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
        "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
        "blocks.11.mlp.fc2.bias", "norm.weight", "head.weight", "head.bias",
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TORCHVISION_KEYS))
def test_parameter_names_match_torchvision_and_timm(name):
    keys = create_model(name, img_size=224).state_dict().keys()
    assert set(TORCHVISION_KEYS[name]) <= set(keys)


def test_vgg_at_224_is_torchvision_shaped():
    sd = create_model("vgg16", img_size=224).state_dict()
    assert sd["classifier.0.weight"].shape == (4096, 512 * 7 * 7)
    assert sd["classifier.6.weight"].shape == (1000, 4096)


@pytest.mark.parametrize(
    "name,layer,extra",
    [
        ("resnet18", "convnn", (ConvNN2d,)),
        ("resnet18", "branching", (Branching2d,)),
        ("vgg11", "branching", (Branching2d,)),
        ("vit_tiny", "convnn_attention", (ConvNNAttention,)),
    ],
)
def test_checkpoint_loads_with_only_convnn_weights_missing(name, layer, extra):
    kw = {"patch_size": 8, "depth": 2} if name.startswith("vit") else {}
    torch.manual_seed(0)
    source = create_model(name, num_classes=10, img_size=32, **kw).state_dict()
    target = create_model(name, num_classes=10, img_size=32, layer=layer, **kw)
    missing, unexpected = load_pretrained(target, source)
    sd = target.state_dict()
    # Missing keys belong to ConvNN layers only; every shared tensor was copied.
    owners = {n for n, m in target.named_modules() if isinstance(m, extra)}
    assert missing and all(any(k.startswith(o + ".") for o in owners) for k in missing)
    for key, value in source.items():
        if key in sd and key not in missing:
            assert torch.equal(sd[key], value), key
    if layer == "branching":  # the replaced convolutions' weights have no home
        assert unexpected and all(k.endswith("weight") or k.endswith("bias") for k in unexpected)
    else:  # same names (ConvNN2d.weight is (out, in, K): reported missing, not copied)
        assert unexpected == []


def test_attention_vit_is_a_standard_vit():
    """The 'attention' ViT equals a ViT written with nn.MultiheadAttention (float64)."""
    torch.manual_seed(0)
    model = create_model("vit_tiny", num_classes=7, img_size=32, patch_size=8, depth=2)
    model = model.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sd = model.state_dict()
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8)
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat([sd["cls_token"].expand(2, -1, -1), tokens], 1) + sd["pos_embed"]
    for i in range(2):
        p = f"blocks.{i}."
        mha = nn.MultiheadAttention(192, 3, batch_first=True).double()
        mha.in_proj_weight.data = sd[p + "attn.qkv.weight"]
        mha.in_proj_bias.data = sd[p + "attn.qkv.bias"]
        mha.out_proj.weight.data = sd[p + "attn.proj.weight"]
        mha.out_proj.bias.data = sd[p + "attn.proj.bias"]
        h = F.layer_norm(tokens, (192,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        tokens = tokens + mha(h, h, h, need_weights=False)[0]
        h = F.layer_norm(tokens, (192,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        tokens = tokens + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    tokens = F.layer_norm(tokens, (192,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    expected = F.linear(tokens[:, 0], sd["head.weight"], sd["head.bias"])
    assert (model(x) - expected).abs().max() < 1e-10


def test_resnet50_replaces_exactly_the_stride1_3x3_convs():
    model = create_model("resnet50", num_classes=10, img_size=32, layer="convnn")
    replaced = [n for n, m in model.named_modules() if isinstance(m, ConvNN2d)]
    assert len(replaced) == 13  # 16 bottlenecks, minus the stride-2 first blocks of layer2-4
    assert all(n.endswith(".conv2") for n in replaced)
    assert {"layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"}.isdisjoint(replaced)
    assert isinstance(model.layer2[0].conv2, nn.Conv2d)


def test_convert_a_zoo_model_reports_what_changed():
    model = create_model("resnet18", num_classes=10, img_size=32)
    report = convert(model, conv="branching", K=4)
    # resnet18 (CIFAR stem): conv1 + 16 block 3x3 convs; 3 have stride 2.
    assert len(report.replaced) == 14
    assert {name for name, _ in report.skipped} >= {"layer2.0.conv1", "layer3.0.conv1"}
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: create_model("vgg12"), r"name must be one of \[.*'vgg11'"),
        (
            lambda: create_model("vgg11", layer="attention"),
            r"layer must be one of \['conv', 'convnn'",
        ),
        (lambda: create_model("vit_tiny", layer="conv"), r"layer must be one of \['attention'"),
        (lambda: layer_choices("nope"), r"name must be one of"),
        (
            lambda: create_model("vit_tiny", img_size=30, patch_size=16),
            r"img_size must be divisible",
        ),
    ],
)
def test_bad_names_list_the_choices(call, match):
    with pytest.raises(ValueError, match=match):
        call()
